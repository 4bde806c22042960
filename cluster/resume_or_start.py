"""The RayJobs' entrypoint guard: run ``cliplab train`` / ``cliplab sweep`` so that a retry resumes.

    python cluster/resume_or_start.py sweep sweeps/cloob_beta_tau.py --set storage_path=s3://cliplab/runs ...
    python cluster/resume_or_start.py train cluster/experiments/emoji_clip.yaml

A RayJob with ``backoffLimit`` > 0 runs its entrypoint again on a new cluster after a failure (a lost
head, a preempted node the run could not survive), and KubeRay's HTTPMode submits it again on a new
head. Each attempt must pick up where the last one stopped, and only that RayJob's attempts may:

- the run id is the RayJob's name. KubeRay names the Ray job ``<RayJob name>-<5 characters>`` and
  draws a new suffix for each retry, so the id is the submission id without that suffix (Ray passes
  the submission id to the driver in RAY_JOB_CONFIG_JSON_ENV_VAR). CLIPLAB_RUN_ID overrides it;
  ``ray job submit`` ids (raysubmit_...) are used whole, so nothing resumes across submissions.
- sweep: the sweep lives under ``<storage_path>/<run id>/<sweep name>``; when Tune can restore it
  there, ``--resume`` is added (finished trials kept, the others restart from their checkpoints),
  else the sweep starts. (``cliplab sweep --resume`` refuses a sweep that does not exist yet.)
- train: the run is named ``<run id>``; with a complete checkpoint under ``<storage_path>/<run id>``
  it runs ``cliplab train CONFIG --resume <run id>``, else ``cliplab train CONFIG --name <run id>``.

The decision is printed, then cliplab replaces this process (its exit code is the job's).
"""

from __future__ import annotations

import json
import os
import re
import sys

# KubeRay's utils.GenerateRayJobId: "<name>-" + rand.String(5) (k8s.io/apimachinery's alphabet)
KUBERAY_JOB_ID = re.compile(r"^(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-[bcdfghjklmnpqrstvwxz2456789]{5}$")


def run_id(environ=os.environ) -> str:
    if environ.get("CLIPLAB_RUN_ID"):
        return environ["CLIPLAB_RUN_ID"]
    config = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    submission = json.loads(config).get("metadata", {}).get("job_submission_id") if config else None
    if not submission:
        raise SystemExit("resume_or_start: not inside a Ray job; set CLIPLAB_RUN_ID to name the run")
    match = KUBERAY_JOB_ID.match(submission)
    return match["name"] if match else submission


def decide(argv: list[str], environ=os.environ) -> tuple[list[str], str]:
    """The cliplab command line to run for ``argv`` (``train ...`` or ``sweep ...``), and why."""
    from cliplab.cli.main import build_parser

    args = build_parser().parse_args(argv)
    if args.command not in ("train", "sweep"):
        raise SystemExit(f"resume_or_start: runs `cliplab train` or `cliplab sweep`, not {args.command}")
    if getattr(args, "resume", None) or getattr(args, "name", None):
        raise SystemExit("resume_or_start: leave --resume and --name to the guard")
    rid = run_id(environ)
    if args.command == "sweep":
        from ray import tune

        from cliplab.train.launch import storage_kwargs
        from cliplab.tune import load_sweep

        base = load_sweep(args.file, args.overrides).base.storage_path.rstrip("/")
        override = f"storage_path={base}/{rid}"
        argv = [*argv, "--set", override]
        sweep = load_sweep(args.file, [*args.overrides, override])
        storage = storage_kwargs(sweep.base)
        path = f"{storage['storage_path'].rstrip('/')}/{sweep.name}"
        if tune.Tuner.can_restore(path, storage_filesystem=storage.get("storage_filesystem")):
            return [*argv, "--resume"], f"sweep {sweep.name} of run {rid} found at {base}/{rid}: resuming it"
        return argv, f"no sweep {sweep.name} of run {rid} under {base}/{rid} yet: starting it"
    from cliplab.checkpoint import latest_in_storage
    from cliplab.config import load_experiment

    cfg = load_experiment(args.config, args.overrides)
    run_uri = f"{cfg.storage_path.rstrip('/')}/{rid}"
    if latest_in_storage(run_uri, cfg.data.s3) is not None:
        return [*argv, "--resume", rid], f"run {rid} has a complete checkpoint under {run_uri}: resuming it"
    return [*argv, "--name", rid], f"no checkpoint of run {rid} under {run_uri} yet: starting it"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command, why = decide(argv)
    print(f"resume_or_start: {why}\nresume_or_start: cliplab {' '.join(command)}", flush=True)
    os.execvp("cliplab", ["cliplab", *command])


if __name__ == "__main__":
    main()
