"""Local services for the demo, the tests and the CLI: S3 (SeaweedFS), MLflow, Ray and PostgreSQL.

A foundation. May import: errors only. Used by demo and cli.
"""

from cliplab.services.base import Service, free_port
from cliplab.services.mlflow_server import MlflowService
from cliplab.services.postgres import PostgresService
from cliplab.services.ray_cluster import RayService
from cliplab.services.s3 import S3Service

__all__ = ["MlflowService", "PostgresService", "RayService", "S3Service", "Service", "free_port"]
