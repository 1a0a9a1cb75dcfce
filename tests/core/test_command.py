"""The `omnijax` command as README spells it: every subcommand, its options and the main job's
config, whatever module owns them."""

import pathlib
import re
import subprocess
import sys

import pytest

from omnijax.cli import build_parser
from omnijax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[2]

# Each README subcommand with options README shows for it.
COMMANDS = {
    "train": ["--config", "--workdir", "--stage", "--max-steps", "--checkpoint-every",
              "--log-every"],
    "compile": ["--config", "--topology", "--stage", "--out"],
    "scaling": ["--config", "--generation", "--chips", "--strategies", "--out"],
    "shardings": ["--update", "--golden-dir"],
    "info": ["--config"],
    "convert": ["--vocab", "--dtype", "--force", "--grow-vocab", "--seed"],
    "prepare": [],
    "data": [],
    "generate": ["--checkpoint", "--task", "--text", "--image", "--image-codes", "--speech-codes",
                 "--input", "--out", "--steps", "--canvas", "--alg", "--temperature", "--top-p",
                 "--top-k", "--repeat-penalty", "--position-penalty", "--cfg", "--block-size",
                 "--threshold", "--seed"],
    "eval": ["--checkpoint", "--split", "--tasks", "--steps", "--out"],
}


def test_readme_names_only_commands_that_exist():
  readme = (REPO / "README.md").read_text()
  code = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.DOTALL))
  named = set(re.findall(r"^\s*omnijax (?:--\S+ (?:\S+ )?)*([a-z]+)\b", code, re.MULTILINE))
  assert named and named <= set(COMMANDS), named - set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_offers_its_readme_options(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    build_parser().parse_args([command, "--help"])
  assert exit_info.value.code == 0
  shown = capsys.readouterr().out
  assert shown.startswith(f"usage: omnijax {command}")
  for option in COMMANDS[command] + ["--debug", "--host-devices"]:
    assert option in shown, f"omnijax {command} --help lacks {option}"


def test_the_installed_command_lists_every_subcommand():
  result = subprocess.run([sys.executable, "-m", "omnijax.cli", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
  assert result.returncode == 0, result.stderr
  listed = re.search(r"\{([a-z,]+)\}", result.stdout).group(1).split(",")
  assert sorted(listed) == sorted(COMMANDS)


def test_the_main_job_config_loads_as_readme_describes_it():
  config = load_config(REPO / "tpu_configs" / "experiments" / "toy.yaml")
  assert config.model.name == "toy" and config.data.dir == "data/toyworld"
  assert [name for name, _ in config.train.ordered_stages] == ["stage1", "stage2", "stage3"]
  assert config.toyworld.dir == config.data.dir and config.toyworld.scenes > 0
  assert config.eval.after_training
  # The tasks each stage adds, in the release's order.
  mixtures = [set(stage.mixture) for _, stage in config.train.ordered_stages]
  assert mixtures[0] == {"t2i", "caption", "vqa"}
  assert mixtures[1] - mixtures[0] == {"asr", "tts"}
  assert mixtures[2] - mixtures[1] == {"s2i", "svqa"}
