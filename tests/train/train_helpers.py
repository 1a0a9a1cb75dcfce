"""The tiny three-stage experiment the training tests run (see tiny_experiment.yaml)."""

import pathlib

from omnijax.config import load_config

TINY_EXPERIMENT = pathlib.Path(__file__).parent / "tiny_experiment.yaml"


def tiny_config(data_dir, *overrides):
  return load_config(TINY_EXPERIMENT, [f"data.dir={data_dir}", *overrides])
