"""Where a command's CPU goes, by process kind: run CMD, sample every process's CPU time from /proc
every 0.25 s while it runs, and print the CPU seconds per kind (Ray names its actors' processes
``ray::Class.method``; services and tools by their command). Linux only.

    .venv/bin/python bench/cpu_by_process.py -- .venv/bin/pytest -q tests/test_sweep_ray.py

Processes that end between two samples lose at most their last 0.25 s; processes that were already
running count only what they use after the start. The total against the wall time says whether
the command was CPU-bound (total ≈ wall × cores) or waiting.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
KNOWN = re.compile(r"(raylet|gcs_server|dashboard_agent|dashboard\.py|log_monitor|monitor\.py|runtime_env_agent|"
                   r"mlflow|uvicorn|gunicorn|weed|pytest|postgres|cliplab|chromium)")


def kind(pid: str) -> str | None:
    """``ray::TrainController`` (the method suffix dropped), a known tool's name, or the command."""
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]
    if "default_worker.py" in cmd:
        return None  # not yet named: ask again at the next sample
    match = KNOWN.search(cmd)
    return match.group(1) if match else (cmd[:48] or None)


def sample(seen: dict, base: dict, first: bool) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        key = (pid, fields[19])  # a pid with its start time: pids are reused
        base.setdefault(key, cpu if first else 0.0)
        name = seen.get(key, (None, 0.0))[0]
        if name is None or name == "ray::IDLE":
            name = kind(pid) or name
        seen[key] = (name, cpu - base[key])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25, help="kinds to print (default 25)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command to measure after --")
    seen: dict = {}
    base: dict = {}
    sample(seen, base, first=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        sample(seen, base, first=False)
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    totals: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for name, cpu in seen.values():
        totals[name or "?"] += cpu
        counts[name or "?"] += 1
    print("\n| process kind | processes | CPU s |\n| --- | --- | --- |")
    for name, cpu in totals.most_common(args.top):
        if cpu >= 0.05:
            print(f"| {name} | {counts[name]} | {cpu:.1f} |")
    total = sum(totals.values())
    print(f"\nexit {proc.returncode}; wall {wall:.1f} s; CPU {total:.1f} s on {os.cpu_count()} cores "
          f"({100 * total / (wall * (os.cpu_count() or 1)):.0f}% busy)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
