"""The workdir guards: one run at a time, and a resumed run's config compared key by key."""

import pytest

from omnijax.train.workdir import WorkdirBusyError, WorkdirLock, config_differences


def test_lock_admits_one_holder_at_a_time(tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(WorkdirBusyError, match=r"in use by another `omnijax train` \(pid \d+ on"):
      WorkdirLock(tmp_path).acquire()
  with WorkdirLock(tmp_path):  # released on exit
    pass


def test_config_differences_name_keys_and_ignore_how_the_run_is_computed():
  run = {"model": {"num_layers": 2, "param_dtype": "float32", "attention": "xla"},
         "mesh": {"data": 1, "fsdp": 8}, "train": {"log_every": 1, "stages": {"s1": {"steps": 4}}}}
  now = {"model": {"num_layers": 3, "param_dtype": "bfloat16", "attention": "splash"},
         "mesh": {"data": 2, "fsdp": 4}, "train": {"log_every": 5, "stages": {"s2": {"steps": 4}}}}
  assert config_differences(run, now) == [
      "model.num_layers: 2 in the run, 3 now",
      "model.param_dtype: float32 in the run, bfloat16 now",
      "train.stages.s1.steps: 4 in the run, (absent) now",
      "train.stages.s2.steps: (absent) in the run, 4 now"]
