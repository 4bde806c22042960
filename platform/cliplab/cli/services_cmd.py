"""``cliplab services s3|mlflow|ray``: run one local service in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("services", help="run a local S3, MLflow or Ray service on 127.0.0.1",
                       description="Run one embedded service in the foreground (Ctrl-C stops it). "
                                   "The demo and the tests start the same code on free ports.")
    services = p.add_subparsers(dest="service", metavar="SERVICE", required=True)

    s3 = services.add_parser("s3", help="SeaweedFS S3 server with one access key",
                             description="A local S3 server (SeaweedFS `weed mini`) on 127.0.0.1.")
    _common(s3, "s3", 8333)
    s3.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable; default cliplab)")
    s3.add_argument("--access-key", default="cliplab-s3-admin", help="access key id (default: cliplab-s3-admin)")
    s3.add_argument("--secret-key", default="cliplab-s3-secret-key", help="secret key (default: cliplab-s3-secret-key)")
    s3.set_defaults(func=run_s3)

    ml = services.add_parser("mlflow", help="mlflow server with sqlite and local artifacts",
                             description="A local `mlflow server` on 127.0.0.1; runs persist in --dir.")
    _common(ml, "mlflow", 5000)
    ml.add_argument("--artifacts-destination", default=None, metavar="URI",
                    help="where artifacts live, e.g. s3://bucket/mlflow (default: DIR/artifacts); for S3 "
                         "the server uses AWS_* and MLFLOW_S3_ENDPOINT_URL from the environment")
    ml.set_defaults(func=run_mlflow)

    ray = services.add_parser("ray", help="a Ray head node with its dashboard",
                              description="A local Ray head node (GCS on --port) with the dashboard.")
    _common(ray, "ray", 6379)
    ray.add_argument("--dashboard-port", type=int, default=8265, help="dashboard port (default 8265; 0 = free)")
    ray.add_argument("--num-cpus", type=int, default=None, help="CPUs to offer (default: all)")
    ray.set_defaults(func=run_ray)


def _common(p: argparse.ArgumentParser, name: str, port: int) -> None:
    p.add_argument("--dir", type=Path, default=Path(f".cliplab/services/{name}"),
                   help=f"state directory (default: .cliplab/services/{name})")
    p.add_argument("--port", type=int, default=port, help=f"port on 127.0.0.1 (default {port}; 0 = any free port)")


def _serve(service, lines: list[str]) -> int:
    with service:
        for line in lines:
            print(line, flush=True)
        print("press Ctrl-C to stop", flush=True)
        service.wait()
    print("stopped")
    return 0


def run_s3(args: argparse.Namespace) -> int:
    from cliplab.services import S3Service

    svc = S3Service(args.dir, args.port or None, args.access_key, args.secret_key,
                    tuple(args.bucket or ["cliplab"]))
    svc.start()
    env = " ".join(f"{k}={v}" for k, v in svc.env().items())
    return _serve(svc, [f"S3 endpoint: {svc.endpoint}  buckets: {', '.join(svc.buckets)}", f"export {env}"])


def run_mlflow(args: argparse.Namespace) -> int:
    from cliplab.services import MlflowService

    svc = MlflowService(args.dir, args.port or None, artifacts_destination=args.artifacts_destination)
    svc.start()
    return _serve(svc, [f"MLflow UI: {svc.uri}", f"export MLFLOW_TRACKING_URI={svc.uri}"])


def run_ray(args: argparse.Namespace) -> int:
    from cliplab.services import RayService

    svc = RayService(args.dir, args.port or None, args.dashboard_port or None, args.num_cpus)
    svc.start()
    return _serve(svc, [f"Ray address: {svc.address}  dashboard: {svc.dashboard_url}",
                        f"export RAY_ADDRESS={svc.address} RAY_AUTH_MODE=token"])
