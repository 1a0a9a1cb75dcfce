"""Test setup: CPU-only JAX (read when jax is imported) with 8 forced host devices, and the
rest of omnijax's process environment, before any test touches a backend. Also the speech
references several areas share: FunASR's PyTorch SenseVoiceSmall built offline from a
SpeechEncoderConfig (every tensor random, seeded), the release's projector, and am.mvn files."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from omnijax import processes  # noqa: E402
from omnijax.config import CONFIG_ROOT, load_config  # noqa: E402

processes.configure_environment(host_devices=8)


def pytest_collection_modifyitems(config, items):
  if importlib.util.find_spec("libtpu") is not None:
    return
  # CI installs libtpu, so these run there; a machine without it says why they were skipped.
  skip = pytest.mark.skip(reason="needs libtpu (pip install -e '.[tpu]') for TPU AOT compilation")
  for item in items:
    if "libtpu" in item.keywords:
      item.add_marker(skip)


# --- speech references ----------------------------------------------------------------------


def _tiny_speech_model(*overrides):
  """The tiny backbone with the tiny speech encoder (a ModelConfig)."""
  return load_config(CONFIG_ROOT / "model" / "tiny_speech.yaml", list(overrides)).model


@pytest.fixture(scope="session")
def tiny_speech_model():
  return _tiny_speech_model


class SenseVoiceReference:
  """FunASR's model classes, as the release uses them (`SenseVoiceSmall.encode` path)."""

  def __init__(self):
    self.torch = pytest.importorskip("torch")
    self.model_module = pytest.importorskip("funasr.models.sense_voice.model")
    self.torch.set_num_threads(1)

  def _model(self, config):
    """The release's SenseVoiceSmall (config.yaml: dropout 0.1, "pe" input) at config's sizes."""
    encoder_conf = dict(output_size=config.hidden_size, attention_heads=config.num_heads,
                        linear_units=config.mlp_size, num_blocks=config.num_blocks,
                        tp_blocks=config.tp_blocks, kernel_size=config.fsmn_kernel_size,
                        sanm_shfit=0, normalize_before=True, dropout_rate=0.1,
                        positional_dropout_rate=0.1, attention_dropout_rate=0.1,
                        input_layer="pe")
    return self.model_module.SenseVoiceSmall(
        encoder="SenseVoiceEncoderSmall", encoder_conf=encoder_conf,
        input_size=config.feature_size, vocab_size=25055)

  def shapes(self, config) -> dict[str, tuple]:
    """Tensor name -> shape, built on the meta device (no memory, any size)."""
    with self.torch.device("meta"):
      return {name: tuple(p.shape) for name, p in self._model(config).named_parameters()}

  def build(self, config, seed: int = 0):
    """SenseVoiceSmall in eval mode; LayerNorms and biases are random too (not 1 and 0), so that
    a weight read into the wrong place shows."""
    torch = self.torch
    torch.manual_seed(seed)
    model = self._model(config).eval()
    with torch.no_grad():
      for name, param in model.named_parameters():
        if "norm" in name:
          param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
        elif name.endswith("bias"):
          param.copy_(0.1 * torch.randn_like(param))
    return model

  def build_projector(self, width: int, hidden: int, seed: int = 0):
    """resampler_projector.py's ResamplerProjector, by its module names; LayerNorm not 1 and 0."""
    torch = self.torch
    torch.manual_seed(seed)
    projector = torch.nn.Module()
    projector.pre_proj_layernorm = torch.nn.LayerNorm(width)
    projector.mlp = torch.nn.Sequential(
        torch.nn.Linear(width, hidden, bias=False), torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden, bias=False))
    with torch.no_grad():
      projector.pre_proj_layernorm.weight.add_(0.1 * torch.randn(width))
      projector.pre_proj_layernorm.bias.add_(0.1 * torch.randn(width))
    return projector

  def project(self, projector, x: np.ndarray) -> np.ndarray:
    with self.torch.no_grad():
      return projector.mlp(projector.pre_proj_layernorm(self.torch.from_numpy(x))).numpy()

  def encode(self, model, features: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[B, T, F] features -> [B, T + 4, d]: language "auto" (a text id outside the language
    table), events and emotions, text norm "woitn" (text id 25017), as the release prepends."""
    torch = self.torch
    text = torch.tensor([[0, 0, 0, 25017]] * len(features))
    with torch.no_grad():
      out, out_lengths = model.encode(torch.from_numpy(features.copy()),
                                      torch.from_numpy(lengths.copy()), text=text)
    np.testing.assert_array_equal(out_lengths.numpy(), lengths + 4)
    return out.numpy()

  def state_dict(self, module) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in module.state_dict().items()}


@pytest.fixture(scope="session")
def sensevoice():
  return SenseVoiceReference()


def _write_am_mvn(path, shift: np.ndarray, scale: np.ndarray) -> None:
  """An am.mvn in the layout SenseVoiceSmall ships (Kaldi nnet text)."""
  from omnijax.data.speech_frontend import Cmvn, write_cmvn

  write_cmvn(path, Cmvn(shift=shift, scale=scale))


@pytest.fixture(scope="session")
def write_am_mvn():
  return _write_am_mvn
