"""The peak-FLOPs table MFU is measured against, and the measured matmul rate fallback."""

import jax
import pytest

from omnijax.train import flops


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("TPU v5", 459e12),
])
def test_spec_peak_by_the_device_kind_jax_reports(kind, peak, monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *a: [type("Device", (), {"device_kind": kind})()])
  assert flops.peak_flops_per_device() == (peak, f"spec sheet ({kind})")


def test_an_unknown_device_falls_back_to_the_measured_matmul_rate():
  peak, source = flops.peak_flops_per_device()
  assert peak > 0 and source == "measured fp32 matmul rate (cpu)"
  assert flops.peak_flops_per_device(123.0) == (123.0, "train.peak_flops_per_device")


def _speech_config(*overrides):
  from omnijax.config import CONFIG_ROOT, load_config
  return load_config(CONFIG_ROOT / "experiments" / "omni7b_speech_stage3_v5e-16.yaml",
                     list(overrides))


def test_encoder_matmul_parameters_by_hand():
  encoder = _speech_config().model.speech_encoder
  # The input block: q, k, v 560 x 512, out 512 x 512, FFN 2 x 512 x 2048; the other 69 blocks
  # the same from 512 wide.
  input_block = 3 * 560 * 512 + 512 * 512 + 2 * 512 * 2048
  block = 3 * 512 * 512 + 512 * 512 + 2 * 512 * 2048
  assert flops.speech_encoder_matmul_params(encoder) == input_block + 69 * block == 220_274_688
  # What is not a matmul: the query table, 70 FSMN filters, biases and LayerNorms.
  biases = 70 * (3 * 512 + 512 + 2048 + 512)
  norms = 2 * 560 + 2 * 512 + 69 * 4 * 512 + 2 * 2 * 512
  assert encoder.param_count() - 220_274_688 == 16 * 560 + 70 * 11 * 512 + biases + norms


def test_speech_flops_per_row_by_hand():
  config = _speech_config()
  stage = config.train.stages["stage3"]
  # One 30 s clip (500 frames + 4 queries = 504) per row. The frozen encoder runs forward only:
  # 2 x 220,274,688 x 504 matmul FLOPs + 70 blocks x 4 x 504^2 x 512 for the scores; the
  # trained projector (512 -> 3584 -> 3584) forward and backward, 6 x 4096 x 3584 x 504.
  encoder_forward = 222_036_885_504 + 36_415_733_760
  projector = 44_392_513_536
  assert flops.speech_flops_per_row(config, stage) == encoder_forward + projector
  # Two clips per row: twice that; an unfrozen encoder trains (x3); a stage that freezes the
  # projector runs it forward only.
  two = _speech_config("data.speech_clips=2")
  assert flops.speech_flops_per_row(two, stage) == 2 * (encoder_forward + projector)
  unfrozen = _speech_config("train.stages.stage3.freeze_speech_encoder=false")
  assert flops.speech_flops_per_row(unfrozen, unfrozen.train.stages["stage3"]) == \
      3 * encoder_forward + projector
  backbone_only = _speech_config("train.stages.stage3.trainable=[layers/.*]")
  assert flops.speech_flops_per_row(backbone_only, backbone_only.train.stages["stage3"]) == \
      encoder_forward + projector // 3
  # Per token, a row's speech FLOPs are spread over its 3072 tokens; no encoder, no speech FLOPs.
  model = config.model
  assert flops.training_flops_per_token(model, 3072, 3072e6) == \
      flops.training_flops_per_token(model, 3072) + 1e6
  assert flops.speech_flops_per_row(_speech_config("model.speech_encoder=null"), stage) == 0


def test_mfu_counts_the_speech_encoder_when_batches_carry_speech(tmp_path):
  from omnijax.config import CONFIG_ROOT, load_config
  from omnijax.sharding import make_mesh
  from omnijax.train.loop import _StepLoop

  experiment = tmp_path / "speech.yaml"
  experiment.write_text(f"defaults: [{CONFIG_ROOT / 'experiments' / 'toy.yaml'}, "
                        "model/tiny_speech.yaml]\n")
  config = load_config(experiment, ["data.seq_len=64", "data.global_batch_size=4",
                                    "data.speech_frames=10", "train.peak_flops_per_device=1e12"])
  loop = _StepLoop(config, make_mesh(config.mesh), checkpoints=None, metrics_log=None)
  try:
    tokens = 4 * 64 * flops.training_flops_per_token(config.model, 64)
    speech = 4 * flops.speech_flops_per_row(config, config.train.stages["stage2"])
    assert speech > 0
    assert loop._step_flops("stage2", {"tokens": None}) == pytest.approx(tokens)
    assert loop._step_flops("stage2", {"tokens": None, "speech_features": None}) == \
        pytest.approx(tokens + speech)
    # MFU: the steps' FLOPs over their time, against every device's peak.
    devices = loop.mesh.devices.size
    assert loop._mfu(tokens + speech, 2.0) == pytest.approx((tokens + speech) / 2.0 /
                                                            (1e12 * devices))
  finally:
    loop.close()
