"""``cliplab dashboard SWEEP``: TensorBoard over a sweep's Tune results, live while it runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="TensorBoard over a sweep's trials (Ray's dashboard has no Tune view)",
                       description="Start TensorBoard on 127.0.0.1 over the Tune results of a sweep: every "
                                   "trial's metrics by step, refreshed while the sweep runs. SWEEP is a sweep "
                                   "name under --storage-path, or a sweep folder (local or s3://). A sweep on "
                                   "S3 is mirrored (its event files only) into a local folder every --refresh "
                                   "seconds.")
    p.add_argument("sweep", help="sweep name (e.g. demo) or its folder: a path or s3://bucket/prefix/NAME")
    p.add_argument("--storage-path", default=".cliplab/runs",
                   help="where sweeps live: a folder or s3://bucket/prefix (default: .cliplab/runs)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint for an s3:// sweep (default: AWS_ENDPOINT_URL, then AWS itself)")
    p.add_argument("--refresh", type=float, default=10.0, help="seconds between S3 mirror passes (default 10)")
    p.add_argument("--port", type=int, default=6006, help="TensorBoard port (default 6006; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal
    import sys
    import tempfile
    from pathlib import Path

    from cliplab.config import S3Config
    from cliplab.errors import ConfigError
    from cliplab.tune.dashboard import Mirror, locate_sweep

    def interrupt(*_):  # `kill` stops TensorBoard and removes the mirror as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if args.refresh <= 0:
        raise ConfigError("--refresh must be > 0 seconds")
    location = locate_sweep(args.sweep, args.storage_path, S3Config(endpoint_url=args.endpoint_url))
    name = location.uri.rstrip("/").rsplit("/", 1)[-1]
    if not location.remote:
        return _serve(location.uri, name, args, note="")
    with tempfile.TemporaryDirectory(prefix="cliplab-dashboard-") as mirror_dir:
        mirror = Mirror(location, Path(mirror_dir), interval=args.refresh,
                        report=lambda line: print(line, file=sys.stderr, flush=True))
        mirror.sync_once()
        mirror.start()
        try:
            return _serve(mirror_dir, name, args, note=f"  (mirroring {location.uri} every {args.refresh:g} s)")
        finally:
            mirror.stop()
            mirror.join(timeout=args.refresh + 30)


def _serve(logdir: str, name: str, args: argparse.Namespace, note: str) -> int:
    """TensorBoard over ``logdir`` until it exits or the user stops it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cliplab.services.base import free_port

    port = args.port or free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tensorboard) if tensorboard.exists() else "tensorboard", "--logdir", logdir,
           "--host", args.host, "--port", str(port), "--reload_interval", "5"]
    proc = subprocess.Popen(cmd, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL,
                            stderr=None if os.environ.get("CLIPLAB_DEBUG") else subprocess.DEVNULL)
    try:  # the URL only once TensorBoard is a child we can stop (a stop right after the URL must reach it)
        print(f"TensorBoard for sweep {name}: http://{args.host}:{port}/#scalars{note}  (Ctrl-C stops it)",
              flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
