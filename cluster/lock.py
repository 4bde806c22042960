"""Write the image's lock file: every distribution a package needs, at the exact version installed in
the running environment (the .venv of `make setup`), with the sha256 of each wheel where a PEP 503
index on disk lists it.

    .venv/bin/python cluster/lock.py > cluster/requirements.lock                     # the Ray image
    .venv/bin/python cluster/lock.py --cpu > cluster/requirements-cpu.lock           # CPU-only PyTorch
    .venv/bin/python cluster/lock.py mlflow boto3 --add psycopg2-binary==2.9.13 \\
        --add flask-wtf==1.3.0 --add wtforms==3.3.2 > cluster/mlflow-requirements.lock

Nothing is resolved or downloaded: the dependency closure is read from the installed distributions'
metadata (markers evaluated for this interpreter, so run it on linux x86_64 with CPython 3.11, the
platform of the images). With ``--index DIR`` (default: the PEP 503 mirrors under /opt/pypi*/simple
where they exist) each pin gets the hashes of its wheels for this platform; the file then installs
with pip's hash checking (``pip install --no-deps -r FILE`` turns it on by itself). A pin whose
wheel no index lists makes the whole file hash-free (pip's hash mode is all or nothing), and the
header says so. ``--add NAME==VERSION`` pins a distribution that is not installed here (its own
dependencies must be in the closure or added too).
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

DEFAULT_INDEXES = [Path("/opt/pypi/simple"), Path("/opt/pypi-more/simple")]
# distributions the CPU image leaves out: PyTorch's CUDA runtime (the +cpu wheels need none of it)
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def closure(roots: list[Requirement]) -> dict[str, str]:
    """canonical name -> installed version, for ``roots`` and everything they need here."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo = [(r, set(r.extras)) for r in roots]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here (needed by the closure); run make setup") from None
        seen[name] = dist.version
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                todo.append((dep, set(dep.extras)))
    return seen


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def wheel_hashes(name: str, version: str, indexes: list[Path]) -> list[str]:
    """sha256 of the wheels of ``name==version`` that this interpreter could install."""
    supported = set(sys_tags())
    out = []
    for index in indexes:
        page = index / name / "index.html"
        if not page.is_file():
            continue
        parser = _Links()
        parser.feed(page.read_text())
        for href in parser.links:
            url, _, frag = href.partition("#sha256=")
            filename = url.rsplit("/", 1)[-1]
            if not frag or not filename.endswith(".whl"):
                continue
            wname, wversion, _, tags = parse_wheel_filename(filename)
            if canonicalize_name(wname) == name and str(wversion) == version and tags & supported:
                out.append(frag)
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="*", help="requirements to lock (default: cliplab's own dependencies)")
    p.add_argument("--add", action="append", default=[], metavar="NAME==VERSION")
    p.add_argument("--index", action="append", type=Path, default=None, help="a PEP 503 simple index folder")
    p.add_argument("--cpu", action="store_true", help="CPU-only PyTorch (+cpu wheels, no CUDA runtime)")
    args = p.parse_args(argv)
    indexes = args.index if args.index is not None else [d for d in DEFAULT_INDEXES if d.is_dir()]

    if args.roots:
        roots = [Requirement(r) for r in args.roots]
        command = " ".join(args.roots)
    else:  # cliplab's runtime dependencies; cliplab itself is installed from the source (pip install --no-deps .)
        env = default_environment()
        roots = [r for r in map(Requirement, metadata.requires("cliplab") or [])
                 if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
        command = ""
    pins = closure(roots)
    for add in args.add:
        name, _, version = add.partition("==")
        pins[canonicalize_name(name)] = version
    if args.cpu:
        pins = {n: v for n, v in pins.items() if not CUDA_ONLY.match(n)}
        for n in ("torch", "torchvision"):
            pins[n] = pins[n].split("+")[0] + "+cpu"

    hashes = {} if args.cpu else {n: wheel_hashes(n, v, indexes) for n, v in pins.items()}
    missing = sorted(n for n in pins if not hashes.get(n))
    flags = " --cpu" if args.cpu else ""
    adds = "".join(f" --add {a}" for a in args.add)
    print(f"# generated by `python cluster/lock.py{' ' + command if command else ''}{flags}{adds}` from the "
          f"installed distributions ({sys.platform}, CPython {sys.version_info.major}.{sys.version_info.minor})")
    if args.cpu:
        print(f"# CPU-only PyTorch from {CPU_INDEX} (pins only: its +cpu wheels are not in the local index)")
        print(f"--extra-index-url {CPU_INDEX}")
    elif missing:
        print(f"# pins only, no hashes: {len(missing)} of {len(pins)} pins have no wheel on the local indexes "
              f"({', '.join(missing[:4])}, ...); pip's hash mode is all or nothing")
    else:
        print("# every pin carries the sha256 of its wheels (linux x86_64, cp311): pip checks them")
    if "torch" in pins and not args.cpu:
        cuda = pins.get("cuda-toolkit")
        print(f"# torch {pins['torch']} is PyPI's Linux wheel, built against CUDA {cuda or '?'} "
              "(cluster/image_check.py reads this)")
    for name in sorted(pins):
        line = f"{name}=={pins[name]}"
        if not missing and not args.cpu:
            line += "".join(f" \\\n    --hash=sha256:{h}" for h in hashes[name])
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
