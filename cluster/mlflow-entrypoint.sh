#!/bin/sh
# Entrypoint of the MLflow image (cluster/mlflow.Dockerfile): writes the basic-auth app's config to
# $MLFLOW_AUTH_CONFIG_PATH, then runs `mlflow server "$@"`.
# The auth app keeps its users in the backend store's database (its own tables and alembic version
# table), so its database_uri is $MLFLOW_BACKEND_STORE_URI. The admin comes from
# MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, which mlflow reads itself.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (the cliplab-mlflow-server Secret)}"
: "${MLFLOW_AUTH_CONFIG_PATH:=/tmp/mlflow-auth/basic_auth.ini}"
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
umask 077
# configparser interpolates '%': a URL-encoded password (%40 ...) must be written as %%
uri=$(printf '%s' "$MLFLOW_BACKEND_STORE_URI" | sed 's/%/%%/g')
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH
exec mlflow server "$@"
