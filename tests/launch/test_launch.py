"""launch/: the dry-run commands for a v5p-128 slice and a 2 x v5e-256 multi-slice job."""

import pathlib
import subprocess
import sys

import pytest
import yaml

LAUNCH = pathlib.Path(__file__).parents[2] / "launch"
TRAIN = ["omnijax", "train", "--config", "tpu_configs/experiments/omni7b_v5p128.yaml",
         "--workdir", "gs://bucket/omni"]


def dry_run(script, *args):
  result = subprocess.run([sys.executable, str(LAUNCH / script), *args], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_v5p_128_slice_runs_on_all_16_workers_with_per_worker_logs():
  script = dry_run("tpu_vm.py", "--project", "proj", "--zone", "us-east5-a", "--accelerator",
                   "v5p-128", "--tpu", "omni", "--run-name", "r1", "--dry-run", "--", *TRAIN)
  lines = script.splitlines()
  assert lines[0] == "set -euo pipefail"
  assert lines[1].startswith("tar czf /tmp/omnijax-r1.tar.gz --exclude=.git")
  assert lines[2] == ("gcloud compute tpus tpu-vm scp /tmp/omnijax-r1.tar.gz --zone=us-east5-a "
                      "--project=proj omni:~/ --worker=all")
  assert lines[3].startswith("gcloud compute tpus tpu-vm ssh omni --zone=us-east5-a "
                             "--project=proj --worker=all --command=")
  assert "pip install -q -e \"${HOME}/omnijax[tpu,gcs]\"" in lines[3]
  # 64 chips on 16 hosts: one ssh per worker, all started before any is waited for.
  assert "for worker in $(seq 0 15); do" in lines
  run = next(line for line in lines if "--worker=${worker}" in line)
  assert run == (
      "  gcloud compute tpus tpu-vm ssh omni --zone=us-east5-a --project=proj "
      "--worker=${worker} --command=\"cd ~/omnijax && mkdir -p logs && ~/omnijax-venv/bin/"
      "omnijax train --config tpu_configs/experiments/omni7b_v5p128.yaml --workdir "
      "gs://bucket/omni 2>&1 | tee logs/r1.log; exit \\${PIPESTATUS[0]}\" "
      "> logs/r1/omni-worker-${worker}.log 2>&1 &")
  assert "MEGASCALE" not in script
  assert lines[-1] == 'exit "${status}"'
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_queued_2_x_v5e_256_creates_waits_joins_slices_and_deletes_on_exit():
  script = dry_run("queued.py", "--project", "proj", "--zone", "us-east5-a", "--accelerator",
                   "v5e-256", "--name", "omni", "--slices", "2", "--tier", "spot", "--run-name",
                   "r2", "--dry-run", "--", *TRAIN, "mesh.dcn_data=2")
  lines = script.splitlines()
  assert lines[1] == (
      "gcloud compute tpus queued-resources create omni-qr --zone=us-east5-a --project=proj "
      "--node-count=2 --node-prefix=omni --accelerator-type=v5litepod-256 "
      "--runtime-version=v2-alpha-tpuv5-lite --spot")
  # The delete is armed right after the create, before anything else can fail.
  assert lines[2] == ("trap 'gcloud compute tpus queued-resources delete omni-qr "
                      "--zone=us-east5-a --project=proj --force --quiet' EXIT")
  assert "  case \"${state}\" in ACTIVE) break ;; FAILED|SUSPENDED) exit 1 ;; esac" in lines
  for node in ("omni-0", "omni-1"):
    assert (f"gcloud compute tpus tpu-vm scp /tmp/omnijax-r2.tar.gz --zone=us-east5-a "
            f"--project=proj {node}:~/ --worker=all") in lines
  assert ("coordinator_ip=$(gcloud compute tpus tpu-vm describe omni-0 --zone=us-east5-a "
          "--project=proj --format='value(networkEndpoints[0].ipAddress)')") in lines
  # 256 chips on 64 hosts per slice; each slice gets its MEGASCALE_SLICE_ID.
  assert lines.count("for worker in $(seq 0 63); do") == 2
  for slice_id in (0, 1):
    run = next(line for line in lines if f"ssh omni-{slice_id} " in line and "${worker}" in line)
    assert (f"--command=\"export MEGASCALE_COORDINATOR_ADDRESS=${{coordinator_ip}}:8080 "
            f"MEGASCALE_PORT=8080 MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={slice_id} && cd "
            "~/omnijax") in run
    assert run.endswith(f"> logs/r2/omni-{slice_id}-worker-${{worker}}.log 2>&1 &")
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_queued_single_v5p_128_names_its_node():
  script = dry_run("queued.py", "--project", "proj", "--zone", "us-east5-a", "--accelerator",
                   "v5p-128", "--name", "omni", "--run-name", "r3", "--dry-run", "--", *TRAIN)
  assert ("gcloud compute tpus queued-resources create omni-qr --zone=us-east5-a "
          "--project=proj --node-id=omni --accelerator-type=v5p-128 "
          "--runtime-version=v2-alpha-tpuv5") in script.splitlines()
  assert "for worker in $(seq 0 15); do" in script


def test_jobset_manifest_for_2_x_v5e_256():
  out = dry_run("jobset.py", "--accelerator", "v5e-256", "--slices", "2", "--image",
                "us-docker.pkg.dev/proj/omnijax:1", "--name", "omni", "--", *TRAIN)
  manifest_text, commands = out.split("---\n")
  manifest = yaml.safe_load(manifest_text)
  job = manifest["spec"]["replicatedJobs"][0]
  assert job["replicas"] == 2
  assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 64
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "16x16"}
  container = pod["containers"][0]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"] == ["bash", "-c", " ".join(TRAIN)]
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env["MEGASCALE_NUM_SLICES"] == "2"
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "omni-slice-0-0.omni:8080"
  assert "kubectl apply -f omni.yaml" in commands


def test_jobset_v5p_128_single_slice_has_no_megascale():
  out = dry_run("jobset.py", "--accelerator", "v5p-128", "--image", "img", "--name", "omni",
                "--", *TRAIN)
  manifest = yaml.safe_load(out.split("---\n")[0])
  pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x4"
  assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 4
  assert "MEGASCALE" not in out


@pytest.mark.parametrize("args,message", [
    (["--accelerator", "v5p-127"], "no v5p slice of that size"),
    (["--accelerator", "v9-8"], "expected e.g. v5p-128"),
])
def test_bad_accelerators_fail_in_one_line(args, message):
  result = subprocess.run(
      [sys.executable, str(LAUNCH / "tpu_vm.py"), "--project", "p", "--zone", "z", "--tpu", "t",
       *args, "--dry-run", "--", "omnijax", "train"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert message in result.stderr and "Traceback" not in result.stderr


def test_the_package_never_imports_launch():
  package = pathlib.Path(__file__).parents[2] / "omnijax"
  for path in package.rglob("*.py"):
    assert "launch" not in [part for line in path.read_text().splitlines()
                            if line.lstrip().startswith(("import ", "from "))
                            for part in line.replace(".", " ").split()], path


def test_jobset_out_in_a_missing_directory_fails_in_one_line(tmp_path):
  out = tmp_path / "missing" / "omni.yaml"
  result = subprocess.run(
      [sys.executable, str(LAUNCH / "jobset.py"), "--accelerator", "v5p-128", "--image", "img",
       "--name", "omni", "--out", str(out), "--", *TRAIN], capture_output=True, text=True,
      timeout=60)
  assert result.returncode == 2 and not out.exists()
  assert f"--out {out}: No such file or directory" in result.stderr
  assert "Traceback" not in result.stderr
