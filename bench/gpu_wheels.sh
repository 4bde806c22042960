#!/usr/bin/env bash
# The wheel set bench/gpu_checks.sh installs on a lent GPU machine (Python 3.12 with torch, no Ray,
# open_clip or MLflow): ../shared/device/ray-wheels.sh's Ray + open_clip set, plus MLflow's client
# (mlflow-skinny: `cliplab eval` loads models through the pyfunc) and what the GPU suite
# (tests/test_gpu_e2e.py) imports beyond that machine's packages (not boto3: 17 MB, and the suite
# reads local disk). Into .whl/ (ignored by git); about 60 MB with the repository, under the
# 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/device/ray-wheels.sh
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl \
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 databricks-sdk google-auth cachetools pyasn1-modules pyasn1 rsa \
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions importlib-metadata \
  fastapi starlette uvicorn gitpython gitdb smmap sqlparse python-dotenv sniffio typing-extensions \
  emoji
du -sh .whl
