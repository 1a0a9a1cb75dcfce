"""A GKE JobSet manifest for an omnijax job on TPU slices: one Job per slice, one pod per TPU
VM host, every pod running the same command; several slices are joined over the data-center
network (MEGASCALE variables from the JobSet's labels).

Prints the manifest (or writes it with --out) and the kubectl commands that submit and follow
it; nothing here contacts a cluster. The image must hold this checkout installed with
`pip install -e '.[tpu,gcs]'` (e.g. built from python:3.11 with `COPY . /omnijax`).

  python launch/jobset.py --accelerator v5p-128 --image IMAGE --name omni \\
      -- omnijax train --config tpu_configs/experiments/omni7b_v5p128.yaml --workdir gs://b/r
"""

from __future__ import annotations

import argparse
import shlex
import sys

import yaml

import common


def manifest(name: str, accelerator: common.Accelerator, slices: int, image: str,
             command: list[str]) -> dict:
  env = [{"name": "JAX_PLATFORMS", "value": "tpu"}]
  if slices > 1:
    env += [
        # The first pod of the first slice coordinates the slices.
        {"name": "MEGASCALE_COORDINATOR_ADDRESS",
         "value": f"{name}-slice-0-0.{name}:{common.MEGASCALE_PORT}"},
        {"name": "MEGASCALE_PORT", "value": str(common.MEGASCALE_PORT)},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(slices)},
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
    ]
  pod = {
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      "restartPolicy": "Never",
      "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": accelerator.facts["gke"],
                       "cloud.google.com/gke-tpu-topology": accelerator.topology},
      "containers": [{
          "name": "omnijax",
          "image": image,
          "workingDir": "/omnijax",
          "command": ["bash", "-c", shlex.join(command)],
          "env": env,
          "ports": [{"containerPort": 8471}, {"containerPort": common.MEGASCALE_PORT}],
          "securityContext": {"privileged": True},
          "resources": {"limits": {"google.com/tpu": accelerator.chips_per_host}},
      }],
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": name, "annotations": {
          # One slice per node pool, never two slices' pods mixed on one.
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": 0},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{
              "name": "slice",
              "replicas": slices,
              "template": {"spec": {
                  "parallelism": accelerator.hosts,
                  "completions": accelerator.hosts,
                  "backoffLimit": 0,
                  "template": {"spec": pod},
              }},
          }],
      },
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="JobSet name (lower case, digits, -)")
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-128, v5e-256")
  parser.add_argument("--slices", type=int, default=1)
  parser.add_argument("--image", required=True, help="container image with omnijax installed")
  parser.add_argument("--out", default=None, help="write the manifest here (default: print)")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command every pod runs after --, e.g. -- omnijax train --config X")
  try:
    accelerator = common.Accelerator.parse(args.accelerator)
  except common.LaunchError as e:
    parser.error(str(e))
  if args.slices < 1:
    parser.error(f"--slices={args.slices}: expected at least 1")
  text = yaml.safe_dump(manifest(args.name, accelerator, args.slices, args.image, command),
                        sort_keys=False)
  if args.out:
    try:
      with open(args.out, "w") as f:
        f.write(text)
    except OSError as e:
      parser.error(f"--out {args.out}: {e.strerror}")
    target = args.out
  else:
    sys.stdout.write(text + "---\n")
    target = f"{args.name}.yaml"
  print(f"# submit: kubectl apply -f {target}\n"
        f"# follow: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={args.name} "
        "--max-log-requests=1000 --prefix\n"
        f"# delete: kubectl delete jobset {args.name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
