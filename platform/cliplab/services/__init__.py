"""Local services for the demo, the tests and the CLI: S3 (SeaweedFS), MLflow and Ray."""

from cliplab.services.base import Service, free_port
from cliplab.services.mlflow_server import MlflowService
from cliplab.services.ray_cluster import RayService
from cliplab.services.s3 import S3Service

__all__ = ["MlflowService", "RayService", "S3Service", "Service", "free_port"]
