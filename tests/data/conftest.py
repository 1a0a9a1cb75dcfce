"""The reference for the speech front end: FunASR's WavFrontend and its pieces."""

import types

import pytest


@pytest.fixture(scope="session")
def funasr_frontend():
  """torch, funasr.frontends.wav_frontend (WavFrontend, apply_lfr), funasr.utils.fbank."""
  torch = pytest.importorskip("torch")
  torch.set_num_threads(1)
  return types.SimpleNamespace(
      torch=torch, wav_frontend=pytest.importorskip("funasr.frontends.wav_frontend"),
      fbank=pytest.importorskip("funasr.utils.fbank"))
