"""Mistakes on the command line and in configs: one line naming the key or file, exit 2, and
nothing written. Also: overrides and global options in any order, tracebacks only with --debug."""

import pytest

from fault_helpers import ALIAS_BOMB, TINY_EXPERIMENT, assert_refused, omnijax, train_args


@pytest.mark.parametrize("fault,overrides,message", [
    ("unknown key", ["model.num_layer=3"], r"unknown config key model\.num_layer"),
    ("wrong type", ["model.hidden_size=big"], r"model\.hidden_size: expected an integer, got 'big'"),
    ("not key=value", ["model.hidden_size"], r"override 'model\.hidden_size' is not of the form"),
    ("inconsistent values", ["model.num_heads=3"], r"model\.num_heads=3 is not divisible"),
    ("unknown stage on the command line", ["--stage", "7"], r"--stage 7: expected one of"),
])
def test_config_mistakes_are_one_line_and_write_nothing(toy_data, tmp_path, fault, overrides,
                                                       message):
  workdir = tmp_path / "run"
  assert_refused(omnijax(*train_args(workdir, toy_data, *overrides)), 2,
                 r"^omnijax train: config error: .*" + message)
  assert not workdir.exists()


def test_broken_config_files(tmp_path):
  tagged = tmp_path / "tagged.yaml"
  tagged.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
  assert_refused(omnijax("info", "--config", tagged), 2,
                 r"tagged\.yaml: not valid YAML: could not determine a constructor for the tag "
                 r"'tag:yaml\.org,2002:python/object/apply:os\.system' \(line 1, column 8\)$")
  assert_refused(omnijax("info", "--config", tmp_path / "missing.yaml"), 2,
                 r"config file .*missing\.yaml does not exist")
  listed = tmp_path / "list.yaml"
  listed.write_text("- just\n- a list\n")
  assert_refused(omnijax("info", "--config", listed), 2, r"top level must be a mapping")


def test_alias_bombs_and_huge_values_are_refused_in_a_short_line(tmp_path):
  # An alias bomb under a valid key used to print an error line of 254 MB.
  bomb = tmp_path / "bomb.yaml"
  bomb.write_text(ALIAS_BOMB + "model: {hidden_size: *i}\n")
  assert_refused(omnijax("info", "--config", bomb), 2,
                 rf"^omnijax info: config error: {bomb}: not valid YAML: aliases expand to more "
                 r"than 100000 values \(an alias bomb\?\); write the values out \(line \d+")
  nested = "[&a [x, x, x, x, x, x, x, x, x, x]" + "".join(
      f", &{b} [{', '.join(['*' + a] * 10)}]" for a, b in zip("abcde", "bcdef")) + "]"
  assert_refused(omnijax("info", "--config", TINY_EXPERIMENT, f"model.hidden_size={nested}"), 2,
                 r"override 'model\.hidden_size=\[&a \[x, .*….*': its value: not valid YAML: "
                 r"aliases expand to more than 100000 values")
  line = assert_refused(omnijax("info", "--config", TINY_EXPERIMENT,
                                "model.hidden_size=" + "y" * 100_000), 2,
                        r"model\.hidden_size: expected an integer, got 'y+…y+'$")
  assert len(line) < 400
  assert_refused(omnijax("info", "--config", "/dev/zero"), 2,
                 r"config file /dev/zero is not a regular file")


def test_bad_host_devices(tmp_path):
  assert_refused(omnijax("--host-devices", "-2", "info", "--config", TINY_EXPERIMENT), 2,
                 r"--host-devices -2: expected a number of devices >= 1")


def test_compile_distinguishes_a_missing_libtpu_from_a_bad_topology(tmp_path):
  assert_refused(omnijax("compile", "--config", TINY_EXPERIMENT, "--topology", "v9z:1x1"), 2,
                 r"topology\.name='v9z:1x1': libtpu cannot describe it")
  shim = tmp_path / "no_libtpu" / "libtpu"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('simulated: libtpu is not installed')\n")
  result = omnijax("compile", "--config", TINY_EXPERIMENT, "--topology", "v5e:2x4",
                   env={"PYTHONPATH": f"{shim.parent}:{TINY_EXPERIMENT.parents[2]}"})
  assert_refused(result, 1, r"topology\.name='v5e:2x4' needs libtpu, the TPU compiler, which is "
                            r"not installed: pip install")


def test_overrides_and_global_options_in_any_order():
  result = omnijax("info", "--config", TINY_EXPERIMENT, "model.num_layers=3", "--host-devices",
                   "4", "model.hidden_size=32", "--debug")
  assert result.returncode == 0, result.stderr
  assert "in 3 layers" in result.stdout and "hidden 32" in result.stdout
  assert "over 4 cpu device(s)" in result.stdout


def test_traceback_only_with_debug(tmp_path):
  quiet = omnijax("info", "--config", TINY_EXPERIMENT, "model.num_layer=3")
  assert_refused(quiet, 2, r"unknown config key model\.num_layer")
  loud = omnijax("info", "--config", TINY_EXPERIMENT, "model.num_layer=3", "--debug")
  assert loud.returncode != 0
  assert "Traceback (most recent call last)" in loud.stderr
  assert "ConfigError: " in loud.stderr
