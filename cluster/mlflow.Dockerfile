# syntax=docker/dockerfile:1
# The MLflow tracking server's image (cluster/base/mlflow.yaml): Python slim, mlflow 3.17.2 with its
# basic-auth app, psycopg2 for Postgres and boto3 for the S3 artifacts; no CUDA, no Ray, no PyTorch.
# Build from the repo root:
#   docker build -f cluster/mlflow.Dockerfile -t REGISTRY/cliplab-mlflow:3.17.2 .
# The versions are cluster/mlflow-requirements.lock's (cluster/lock.py), installed without resolving.
# Pin the base by digest at release: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_TELEMETRY_DISABLED=1 \
    HOME=/tmp
COPY cluster/mlflow-requirements.lock /opt/mlflow/requirements.lock
RUN pip install --no-deps -r /opt/mlflow/requirements.lock \
 && python -c "import mlflow, psycopg2, boto3, flask_wtf; assert mlflow.__version__ == '3.17.2'" \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp mlflow
COPY --chmod=0755 cluster/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint

# non-root; the Deployment runs it with a read-only root filesystem and an emptyDir on /tmp
USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]
CMD ["--host=0.0.0.0", "--port=5000"]
