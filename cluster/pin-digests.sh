#!/usr/bin/env bash
# Pin the overlays' images by digest at release: for every `images:` entry with a `digest:` in
# cluster/overlays/**/kustomization.yaml, look up the digest of NEWNAME:NEWTAG in its registry and
# write it in place of the all-zero placeholder (or of the previous digest).
#   cluster/pin-digests.sh                 # after `docker push` of the tags the overlays name
#   cluster/pin-digests.sh --check         # exit 1 while a placeholder is left (make image-check RELEASE=1)
# The lookup is `docker buildx imagetools inspect REF --format '{{.Manifest.Digest}}'` (the manifest
# list's digest for multi-arch images); set RESOLVE to another command that prints a digest for REF
# (e.g. RESOLVE='crane digest').
set -euo pipefail
cd "$(dirname "$0")"
exec python3 - "$@" <<'PY'
import os, re, shlex, subprocess, sys
from pathlib import Path

PLACEHOLDER = "sha256:" + "0" * 64
check = "--check" in sys.argv[1:]
resolve = shlex.split(os.environ.get("RESOLVE", "docker buildx imagetools inspect --format {{.Manifest.Digest}}"))
left, cache = [], {}
for path in sorted(Path("overlays").rglob("kustomization.yaml")):
    lines = path.read_text().splitlines(keepends=True)
    entry = {}
    for i, line in enumerate(lines):
        m = re.match(r"^  - name: (\S+)", line) or re.match(r"^    (newName|newTag|digest): (\S+)", line)
        if not m:
            continue
        if line.startswith("  - name:"):
            entry = {"name": m.group(1)}
            continue
        key, value = m.group(1), m.group(2).strip("'\"")
        entry[key] = value
        if key != "digest":
            continue
        ref = f"{entry.get('newName', entry['name'])}:{entry.get('newTag', 'latest')}"
        if check:
            if value == PLACEHOLDER:
                left.append(f"{path}: {ref}")
            continue
        if ref not in cache:
            out = subprocess.run([*resolve, ref], capture_output=True, text=True)
            digest = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                sys.exit(f"pin-digests: no digest for {ref}: {out.stderr.strip() or out.stdout.strip()}")
            cache[ref] = digest
        lines[i] = line.replace(value, cache[ref])
        print(f"{path}: {ref}@{cache[ref]}")
    if not check:
        path.write_text("".join(lines))
if left:
    print("placeholder digests left (run cluster/pin-digests.sh after pushing):\n  " + "\n  ".join(left))
    sys.exit(1)
PY
