"""The reference for the speech front end: FunASR's WavFrontend and its pieces."""

import types

import numpy as np
import pytest


def _write_am_mvn(path, shift: np.ndarray, scale: np.ndarray) -> None:
  """An am.mvn in the layout SenseVoiceSmall ships (Kaldi nnet text)."""
  vector = lambda v: " ".join(f"{x:.9g}" for x in v)
  size = len(shift)
  path.write_text(f"<Nnet>\n<Splice> {size} {size}\n[ 0 ]\n"
                  f"<AddShift> {size} {size}\n<LearnRateCoef> 0 [ {vector(shift)} ]\n"
                  f"<Rescale> {size} {size}\n<LearnRateCoef> 0 [ {vector(scale)} ]\n</Nnet>\n")


@pytest.fixture(scope="session")
def write_am_mvn():
  return _write_am_mvn


@pytest.fixture(scope="session")
def funasr_frontend():
  """torch, funasr.frontends.wav_frontend (WavFrontend, apply_lfr), funasr.utils.fbank."""
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)
  return types.SimpleNamespace(
      torch=torch, wav_frontend=pytest.importorskip("funasr.frontends.wav_frontend"),
      fbank=pytest.importorskip("funasr.utils.fbank"))
