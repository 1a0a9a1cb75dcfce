"""DecodeSettings: every sampler setting validated once, changed only through `replace`."""

import dataclasses

import numpy as np
import pytest

from omnijax.diffusion.settings import DecodeSettings


@pytest.mark.parametrize("changes,message", [
    (dict(canvas=0), "canvas=0 must be an integer >= 1"),
    (dict(canvas=2.5), "canvas=2.5 must be an integer"),
    (dict(steps=True), "steps=True must be an integer"),
    (dict(alg="greedy"), "alg='greedy' is not one of"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_p=0.0), r"top_p=0.0 must lie in \(0, 1\]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0"),
    (dict(repeat_penalty=0.0), "repeat_penalty=0.0 must be > 0"),
    (dict(position_penalty=-2.0), "position_penalty=-2.0 must be > 0"),
    (dict(cfg=-0.5), "cfg=-0.5 must be >= 0"),
    (dict(block_size=-4), "block_size=-4 must be an integer >= 0"),
    (dict(threshold=float("nan")), "threshold=nan must be finite"),
    (dict(prefill={8: 3}), r"prefill offset 8 is outside the canvas \[0, 8\)"),
    (dict(cache="block"), r"cache='block' is not one of \('none', 'prefix', 'dual'\)"),
    (dict(cache_refresh=-1), "cache_refresh=-1 must be an integer >= 0"),
])
def test_each_bad_setting_is_refused_naming_it(changes, message):
  with pytest.raises(ValueError, match=message):
    DecodeSettings(**{"canvas": 8, "steps": 4, **changes})


def test_prefill_is_normalised_so_equal_settings_compare_and_hash_equal():
  as_mapping = DecodeSettings(canvas=8, steps=4, prefill={np.int64(2): np.int32(7)})
  as_pairs = DecodeSettings(canvas=8, steps=4, prefill=[(2, 7)])
  assert as_mapping.prefill == ((2, 7),)
  assert as_mapping == as_pairs and hash(as_mapping) == hash(as_pairs)
  assert DecodeSettings(canvas=np.int64(8), steps=4).canvas == 8


def test_replace_keeps_values_given_as_none_and_refuses_unknown_names():
  base = DecodeSettings(canvas=8, steps=4, alg="entropy", cfg=2.0)
  changed = base.replace(steps=2, cfg=None, threshold=0.9)
  assert (changed.steps, changed.cfg, changed.threshold, changed.alg) == (2, 2.0, 0.9, "entropy")
  assert base.steps == 4  # frozen: the original is unchanged
  with pytest.raises(dataclasses.FrozenInstanceError):
    base.steps = 3
  with pytest.raises(ValueError, match="unknown decode setting 'temprature'"):
    base.replace(temprature=1.0)
  with pytest.raises(ValueError, match="top_k=-3 must be >= 0"):
    base.replace(top_k=-3)  # a replaced value is validated too
