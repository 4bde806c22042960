#!/usr/bin/env bash
# Create one of an overlay's RayJobs with a generated name, so that a second submission of the same
# job is a second RayJob (cliplab-sweep-cloob-x7k2p, cliplab-sweep-cloob-q4m9z, ...) instead of
# "AlreadyExists":
#   cluster/create-rayjob.sh cluster/overlays/h100-x8/jobs sweep      # or train
#   cluster/create-rayjob.sh cluster/overlays/h100-x8/jobs sweep -n team-a --dry-run=server
# kustomize refuses resources without metadata.name, so the RayJobs carry their prefix as a name in
# the manifests; this turns it into metadata.generateName ("<name>-") on the way to `kubectl create`
# (which, unlike `apply`, accepts generateName). The RayJob's name is the run id its entrypoint
# resumes under (cluster/resume_or_start.py), so each submission is its own run.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OVERLAY_JOBS_DIR COMPONENT [kubectl create flags]   (COMPONENT: sweep or train)" >&2
  exit 2
fi
dir=$1 component=$2
shift 2
kubectl=${KUBECTL:-kubectl}
"$kubectl" kustomize "$dir" \
  | awk '/^---/ { rayjob = 0 }
         /^kind: RayJob$/ { rayjob = 1 }
         rayjob && /^  name: / { sub(/^  name: /, "  generateName: "); print $0 "-"; next }
         { print }' \
  | "$kubectl" create -f - -l "app.kubernetes.io/component=$component" "$@"
