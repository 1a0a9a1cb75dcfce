"""`model.attention: auto`: the backend it resolves to per platform and row kind, and that it is
used (and logged once) where the model and the sampler trace attention."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.config import CONFIG_ROOT, ConfigError, load_config
from omnijax.diffusion import sample
from omnijax.kernels import attention, tuning
from omnijax.kernels.attention import attention_rows, resolve_auto
from omnijax.model.build import create_model

H200 = "NVIDIA H200"


def _resolve(platform, rows, device_kind="some device", head_dim=128, length=4096,
             dtype=jnp.bfloat16):
  return resolve_auto(platform, rows, device_kind=device_kind, head_dim=head_dim, length=length,
                      dtype=dtype)


@pytest.mark.parametrize("rows", tuning.ROW_KINDS)
def test_cpu_runs_xla_and_tpu_runs_the_pallas_kernel(rows):
  assert _resolve("cpu", rows) == "xla"
  assert _resolve("tpu", rows, device_kind="TPU v5 lite") == "pallas"


def test_gpu_without_a_table_entry_packed_rows_take_pallas_dense_rows_cudnn():
  assert _resolve("gpu", "packed", device_kind="NVIDIA A100-SXM4-80GB") == "pallas"
  assert _resolve("gpu", "dense", device_kind="NVIDIA A100-SXM4-80GB") == "cudnn"


def test_gpu_follows_the_measured_winner_of_the_tuning_table(tmp_path, monkeypatch):
  # The shipped table's H200 facts (issue 12): cuDNN wins dense rows, pallas packed rows.
  assert _resolve("gpu", "dense", device_kind=H200) == "cudnn"
  assert _resolve("gpu", "packed", device_kind=H200) == "pallas"
  # A table that measured pallas ahead on dense rows too makes auto pick it there.
  table = tmp_path / "tuning.json"
  tuning.write_table([tuning.TuningEntry("NVIDIA H100 80GB HBM3", 128, 16384, "dense", 128, 64,
                                         "pallas", "test")], table)
  monkeypatch.setattr(tuning, "TABLE_PATH", table)
  assert _resolve("gpu", "dense", device_kind="NVIDIA H100 80GB HBM3", length=16384) == "pallas"
  assert _resolve("gpu", "dense", device_kind=H200) == "cudnn"  # no entry there: the default


def test_gpu_takes_pallas_where_cudnn_cannot_run():
  assert _resolve("gpu", "dense", device_kind=H200, dtype=jnp.float32) == "pallas"
  assert _resolve("gpu", "dense", device_kind=H200, head_dim=256) == "pallas"


def test_auto_never_picks_the_mosaic_gpu_kernel(tmp_path, monkeypatch):
  """Its values are verified only by lowering until a GPU session runs its numerics, so even a
  table naming it the winner on a Hopper GPU leaves auto on the default."""
  table = tmp_path / "tuning.json"
  tuning.write_table([tuning.TuningEntry(H200, 128, 4096, rows, 128, 128, "mosaic_gpu", "test")
                      for rows in tuning.ROW_KINDS], table)
  monkeypatch.setattr(tuning, "TABLE_PATH", table)
  assert _resolve("gpu", "packed", device_kind=H200) == "pallas"
  assert _resolve("gpu", "dense", device_kind=H200) == "cudnn"
  assert _tiny("mosaic_gpu").attention == "mosaic_gpu"  # an explicit opt-in only


def test_bad_row_kind_is_refused():
  with pytest.raises(ValueError, match="rows='causal'"):
    _resolve("gpu", "causal")
  with pytest.raises(ValueError, match="rows='causal'"):
    with attention_rows("causal"):
      pass


def _tiny(attention_name):
  config = load_config(CONFIG_ROOT / "model" / "tiny.yaml",
                       [f"model.attention={attention_name}", "model.scan_layers=false"]).model
  return config


def test_config_accepts_auto_and_names_the_key_on_a_typo():
  assert _tiny("auto").attention == "auto"
  with pytest.raises(ConfigError, match="model.attention='fastest'"):
    _tiny("fastest")


def test_auto_model_equals_xla_on_cpu_and_logs_its_choice_once(caplog, monkeypatch):
  monkeypatch.setattr(attention, "_LOGGED", set())
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 512, size=(2, 24)), jnp.int32)
  segment_ids = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    # Two unscanned layers: attention is traced twice per forward, and the forward twice.
    auto = create_model(_tiny("auto"), seed=0)(tokens, segment_ids)
    create_model(_tiny("auto"), seed=1)(tokens, segment_ids)
  xla = create_model(_tiny("xla"), seed=0)(tokens, segment_ids)
  np.testing.assert_array_equal(auto, xla)
  lines = [r.getMessage() for r in caplog.records if "model.attention=auto" in r.getMessage()]
  assert lines == ["model.attention=auto: xla for packed rows on cpu (cpu)"]


def test_the_sampler_traces_attention_as_dense_rows(caplog, monkeypatch):
  monkeypatch.setattr(attention, "_LOGGED", set())
  config = dataclasses.replace(_tiny("auto"), scan_layers=True)
  vocab = config.vocab.build()
  with caplog.at_level(logging.INFO, logger=attention.__name__):
    sample(create_model(config, seed=0), vocab, [np.arange(1, 6, dtype=np.int32)], canvas=4,
           steps=2)
  lines = [r.getMessage() for r in caplog.records if "model.attention=auto" in r.getMessage()]
  assert lines == ["model.attention=auto: xla for dense rows on cpu (cpu)"]
