"""``cliplab dashboard SWEEP``: TensorBoard over a sweep's Tune results, live while it runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="TensorBoard over a sweep's trials (Ray's dashboard has no Tune view)",
                       description="Start TensorBoard on 127.0.0.1 over the Tune results of a sweep: every "
                                   "trial's metrics by step, refreshed while the sweep runs. SWEEP is a sweep "
                                   "name under --storage-path, or a sweep folder.")
    p.add_argument("sweep", help="sweep name (e.g. demo) or path to its folder")
    p.add_argument("--storage-path", default=".cliplab/runs", help="where sweeps live (default: .cliplab/runs)")
    p.add_argument("--port", type=int, default=6006, help="TensorBoard port (default 6006; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.set_defaults(func=run)


def sweep_folder(sweep: str, storage_path: str) -> Path:
    from cliplab.errors import ConfigError

    for candidate in (Path(sweep), Path(storage_path).expanduser() / sweep):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"no sweep folder '{sweep}' (looked in . and {storage_path}); pass the sweep's name as "
                      "`cliplab sweep` printed it, or --storage-path")


def run(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import sys

    from cliplab.services.base import free_port

    folder = sweep_folder(args.sweep, args.storage_path)
    port = args.port or free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tensorboard) if tensorboard.exists() else "tensorboard", "--logdir", str(folder),
           "--host", args.host, "--port", str(port), "--reload_interval", "5"]
    print(f"TensorBoard for sweep {folder.name}: http://{args.host}:{port}/#scalars  (Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL,
                            stderr=None if os.environ.get("CLIPLAB_DEBUG") else subprocess.DEVNULL)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
