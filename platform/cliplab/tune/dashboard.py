"""Where ``cliplab dashboard`` finds a sweep, and a live local mirror of a sweep kept on S3.

TensorBoard reads local folders; without TensorFlow it cannot list ``s3://`` with cliplab's
endpoint override. A sweep whose ``storage_path`` is on S3 (the KubeRay manifests' default) is
therefore watched through a mirror: every ``events.out.tfevents*`` file under the sweep is copied
into a local folder, and re-read every few seconds. Event files only grow, so a later pass
appends just the new bytes to the local copy, which TensorBoard (holding the file open) then
reads as it would a local file being written. Checkpoints and everything else stay on S3.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENT_PREFIX = "events.out.tfevents"


@dataclass(frozen=True)
class SweepLocation:
    """A sweep folder: local (``filesystem`` None) or on S3."""

    uri: str  # what to show the user: a local path or s3://bucket/prefix
    filesystem: Any = None  # a pyarrow filesystem for s3://, None for a local folder
    root: str = ""  # the folder on ``filesystem`` (bucket/prefix for S3)

    @property
    def remote(self) -> bool:
        return self.filesystem is not None


def locate_sweep(sweep: str, storage_path: str, s3cfg=None) -> SweepLocation:
    """``sweep`` as a folder (local path or ``s3://`` URI) or as a name under ``storage_path``.

    Raises :class:`ConfigError` naming the places looked at, or the S3 problem (unreachable
    endpoint, rejected credentials, missing bucket)."""
    from pyarrow import fs

    from cliplab.checkpoint import run_storage
    from cliplab.errors import ConfigError

    if not sweep.startswith("s3://") and Path(sweep).is_dir():
        return SweepLocation(str(Path(sweep).resolve()))
    if sweep.startswith("s3://") or storage_path.startswith("s3://"):
        uri = sweep if sweep.startswith("s3://") else f"{storage_path.rstrip('/')}/{sweep}"
        filesystem, root = run_storage(uri, s3cfg)
        try:
            found = filesystem.get_file_info(root).type == fs.FileType.Directory
        except OSError as err:
            from cliplab.data.sources import s3_error_message

            raise ConfigError(s3_error_message(err, uri, s3cfg)) from None
        if not found:
            raise ConfigError(f"no sweep at {uri}: pass the sweep's name as `cliplab sweep` printed it and the "
                              "storage_path it ran with (--storage-path s3://bucket/prefix)")
        return SweepLocation(uri.rstrip("/"), filesystem, root)
    candidate = Path(storage_path).expanduser() / sweep
    if candidate.is_dir():
        return SweepLocation(str(candidate.resolve()))
    raise ConfigError(f"no sweep folder '{sweep}' (looked in . and {storage_path}); pass the sweep's name as "
                      "`cliplab sweep` printed it, or --storage-path")


def sync_event_files(filesystem, root: str, local: Path) -> int:
    """Bring ``local`` up to date with the event files under ``root`` (same relative layout).

    A file that grew gets only its new bytes appended; one that shrank (rewritten) is copied
    again in place. Returns how many files changed."""
    from pyarrow import fs

    changed = 0
    for info in filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != fs.FileType.File or not info.base_name.startswith(EVENT_PREFIX):
            continue
        target = local / Path(info.path).relative_to(root)
        have = target.stat().st_size if target.exists() else 0
        if have == info.size:
            continue
        start = have if have < info.size else 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_file(info.path) as src:
            data = src.read_at(info.size - start, start)
        with open(target, "r+b" if target.exists() else "wb") as out:
            if start == 0:
                out.truncate(0)
            out.seek(start)
            out.write(data)
        changed += 1
    return changed


class Mirror(threading.Thread):
    """Re-runs :func:`sync_event_files` every ``interval`` seconds until :meth:`stop`.

    An S3 error does not end it (the sweep may be writing, the network may blink): it is
    reported once, and again only when it changes or clears."""

    def __init__(self, location: SweepLocation, local: Path, interval: float = 10.0, report=print) -> None:
        super().__init__(name="cliplab-dashboard-mirror", daemon=True)
        self.location, self.local, self.interval, self.report = location, local, interval, report
        self._stop_event = threading.Event()
        self._last_error: str | None = None

    def sync_once(self) -> int:
        try:
            changed = sync_event_files(self.location.filesystem, self.location.root, self.local)
        except OSError as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if message != self._last_error:
                self.report(f"warning: cannot read {self.location.uri} ({message}); retrying every "
                            f"{self.interval:g} s")
                self._last_error = message
            return 0
        if self._last_error is not None:
            self.report(f"reading {self.location.uri} again")
            self._last_error = None
        return changed

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sync_once()

    def stop(self) -> None:
        self._stop_event.set()
