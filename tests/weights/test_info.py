"""`omnijax info`: what a config builds, the speech encoder and projector included."""

import math
import re

from omnijax.config import CONFIG_ROOT, load_config
from omnijax.weights.info import print_info

TINY_SPEECH = CONFIG_ROOT / "model" / "tiny_speech.yaml"
# A table row: name, shape, logical axes, mesh spec.
ROW = re.compile(r"^(\S+)\s+(\([\d, ]*\))\s+(\(.*?\))\s+(P\(.*\))$")


def test_info_lists_the_speech_encoder_and_projector_with_their_sharding(capsys):
  overrides = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]
  assert print_info(str(TINY_SPEECH), overrides) == 0
  out = capsys.readouterr().out
  rows = {match.group(1): match.groups()[1:] for line in out.splitlines()
          if (match := ROW.match(line))}
  size = lambda shape: math.prod(int(n) for n in re.findall(r"\d+", shape))
  model = load_config(TINY_SPEECH, overrides).model
  speech = {name: row for name, row in rows.items()
            if name.startswith(("speech_encoder/", "speech_projector/"))}
  assert sum(size(shape) for shape, _, _ in speech.values()) == model.speech_param_count()
  assert sum(size(shape) for shape, _, _ in rows.values()) == model.param_count()
  # Sharded like the backbone: width on fsdp, heads and FFN on tensor.
  assert speech["speech_encoder/blocks/self_attn/linear_q/kernel"] == (
      "(2, 64, 64)", "('layers', 'embed', 'heads')", "P(None, 'fsdp', 'tensor')")
  assert speech["speech_encoder/input_block/self_attn/linear_q/kernel"] == (
      "(560, 64)", "('speech_features', 'heads')", "P('fsdp', 'tensor')")
  assert speech["speech_projector/linear_in/kernel"] == (
      "(64, 64)", "('embed', 'mlp')", "P('fsdp', 'tensor')")
  assert speech["speech_encoder/queries"][2] == "P(None, 'fsdp')"  # [4, 560]: the input width
  assert (f"{model.param_count():,} parameters" in out
          and f"{model.speech_param_count():,} in the speech encoder and projector" in out)
  assert "speech encoder: 560-d input, 3 + 2 SANM blocks" in out
