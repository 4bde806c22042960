"""``cliplab jobs list|logs|stop``: the Ray Jobs of a cluster (as ``cliplab submit`` made them)."""

from __future__ import annotations

import argparse
import sys

from cliplab.errors import ServiceError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, follow or stop Ray Jobs on a cluster",
                       description="The Ray Jobs of a cluster's job server (see `cliplab submit`).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    address_help = ("Ray job server (dashboard) URL (default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, "
                    "else http://127.0.0.1:8265)")

    ls = actions.add_parser("list", help="jobs with their status and entrypoint, newest first")
    ls.add_argument("--address", default=None, help=address_help)
    ls.set_defaults(func=run_list)

    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    logs.add_argument("--address", default=None, help=address_help)
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(func=run_logs)

    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("job_id")
    stop.add_argument("--address", default=None, help=address_help)
    stop.set_defaults(func=run_stop)


def _call(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # the Ray client: RuntimeError with the server's multi-line reply
        from cliplab.submit import _first_line

        raise ServiceError(f"{what}: {_first_line(err)}") from None


def run_list(args: argparse.Namespace) -> int:
    from cliplab.report import markdown_table
    from cliplab.submit import client, status_name

    jobs = _call("listing jobs", client(args.address).list_jobs)
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        entry = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        start = _when(job.start_time)
        rows.append({"id": job.submission_id or job.job_id, "status": status_name(job.status),
                     "start": start, "entrypoint": entry})
    if not rows:
        print("no jobs")
        return 0
    # never the runtime env: it carries forwarded credentials
    print(markdown_table(rows, [("job", "id"), ("status", "status"), ("started", "start"),
                                ("entrypoint", "entrypoint")]))
    return 0


def _when(ms: int | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def run_logs(args: argparse.Namespace) -> int:
    from cliplab.submit import client, follow

    job_client = client(args.address)
    if args.follow:
        status = follow(job_client, args.job_id)
        print(f"job {args.job_id} {status}", file=sys.stderr)
        return 0 if status == "SUCCEEDED" else 1
    from cliplab.submit import redacted_writer

    redacted_writer()(_call(f"logs of {args.job_id}", job_client.get_job_logs, args.job_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from cliplab.submit import client

    stopped = _call(f"stopping {args.job_id}", client(args.address).stop_job, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0
