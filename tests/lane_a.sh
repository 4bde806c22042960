#!/bin/sh
# Lane A of `make test` (the Makefile starts it with `setsid`, in a session of its own): the
# in-process tests, then the Postgres pass, beside lane B's service tests, at the lowest CPU
# priority. Lane B's runs are chains of process start-ups that leave the cores idle about a third of
# the time; lane A fills those gaps instead of slowing the chains. With Linux's autogroup
# scheduling a process's nice counts only inside its session, so the session's own autogroup is
# niced too (where the kernel lets us; plain `nice` is the fallback).
# usage: tests/lane_a.sh BIN SERVICE_TESTS_MARKERS
set -u
BIN=$1
SERVICE_TESTS=$2
echo 19 > /proc/self/autogroup 2>/dev/null || true
OMP_WAIT_POLICY=PASSIVE nice -n 19 "$BIN/pytest" -m "not ($SERVICE_TESTS)" --basetemp=/tmp/cliplab-tests-lane-a &&
  CLIPLAB_TEST_MLFLOW_BACKEND=postgres nice -n 19 "$BIN/pytest" -m "not slow" --basetemp=/tmp/cliplab-tests-postgres \
    tests/test_tracking.py tests/test_postgres.py
