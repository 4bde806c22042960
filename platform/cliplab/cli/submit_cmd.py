"""``cliplab submit FILE --address http://HOST:8265``."""

from __future__ import annotations

import argparse
import sys

from cliplab.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run a train or sweep file on a remote Ray cluster as a Ray Job",
        description="Submit `cliplab sweep FILE` (files under sweeps/ or defining SWEEP) or `cliplab train FILE` "
                    "to a Ray cluster's job server, uploading the working dir (data, runs, .venv, .git and "
                    ".cliplab excluded) with the runtime env of cluster/runtime_env.yaml, then stream the job's "
                    "logs until it ends. S3 and MLflow settings set here (AWS_ENDPOINT_URL, AWS_REGION, "
                    "MLFLOW_TRACKING_URI, ...) are forwarded to the job; secrets (AWS keys and session tokens, "
                    "MLflow passwords and tokens) never are: Ray shows a job's runtime env to anyone with the "
                    "cluster token, so the cluster provides them (Kubernetes Secrets, see cluster/README.md). "
                    "--forward-secrets sends them anyway, with a warning.")
    p.add_argument("file", help="sweep file (sweeps/*.py) or experiment file (.yaml/.py), inside the working dir")
    p.add_argument("--address", default=None,
                   help="Ray job server (dashboard) URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                        "else http://127.0.0.1:8265)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to the job's cliplab command (repeatable)")
    p.add_argument("--runtime-env", default=None, metavar="YAML",
                   help="runtime env file (default: cluster/runtime_env.yaml in the working dir, if any)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--as", dest="command", choices=("train", "sweep"), default=None,
                   help="force the job's command (default: sweep for sweeps/ files and files defining SWEEP)")
    p.add_argument("--name", default=None, help="train: the run name")
    p.add_argument("--no-register", action="store_true", help="sweep: do not register the best model")
    p.add_argument("--job-id", default=None, help="submission id to use (default: Ray picks one)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="also forward this environment variable to the job (repeatable)")
    p.add_argument("--no-forward-env", dest="forward_env", action="store_false",
                   help="do not forward AWS_*/MLFLOW_* variables from this shell")
    p.add_argument("--forward-secrets", action="store_true",
                   help="also forward secrets (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD, "
                        "...) and allow them in --env/--set: anyone with the cluster's auth token can read them "
                        "(`ray job list`, the dashboard)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cliplab import jobspec, submit

    extra: list[str] = []
    if args.name:
        extra += ["--name", args.name]
    if args.no_register:
        extra.append("--no-register")
    job = jobspec.build_job(args.file, overrides=args.overrides, extra_args=extra, working_dir=args.working_dir,
                            runtime_env_file=args.runtime_env, forward_env=args.forward_env, env=args.env,
                            submission_id=args.job_id, command=args.command, forward_secrets=args.forward_secrets)
    kind = job.entrypoint.split()[1]
    if args.no_register and kind != "sweep":
        raise ConfigError("--no-register applies to sweeps only")
    if args.name and kind != "train":
        raise ConfigError("--name applies to train runs only")
    address = submit.normalize_address(args.address)
    job_client = submit.client(address)  # first: a dead address is one line within seconds
    jobspec.check_config(args.file, kind, args.overrides)
    if job.secrets:
        print(jobspec.SECRETS_WARNING.format(names=", ".join(job.secrets)), file=sys.stderr, flush=True)
    job_id = submit.submit(job, job_client=job_client)
    print(f"submitted {job_id} to {address}: {job.entrypoint}", flush=True)
    if job.forwarded:
        print(f"forwarded from this shell: {', '.join(job.forwarded)}", flush=True)
    if job.withheld:
        print(f"not forwarded (secrets; the cluster provides them): {', '.join(job.withheld)}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        status = submit.follow(job_client, job_id)
    except KeyboardInterrupt:
        print(f"\ncliplab: stopped following; the job goes on. Stop it with: cliplab jobs stop {job_id} "
              f"--address {address}", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
        return 0
    message = submit.job_message(job_client, job_id)
    print(f"cliplab: job {job_id} {status}" + (f": {message}" if message else "")
          + f" (logs: cliplab jobs logs {job_id} --address {address})", file=sys.stderr)
    return 1
