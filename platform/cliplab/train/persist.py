"""Ray Train's checkpoint upload: every file arrives whole, and the ``COMPLETE`` marker last."""

from __future__ import annotations

from pathlib import Path

from cliplab import checkpoint as ckpt


def persist_checkpoint(checkpoint, dir_name: str):
    """Ray Train's ``checkpoint_upload_fn``: on an object store, copy the checkpoint's files with
    :func:`~cliplab.data.sources.put_file`, which raises when a file does not arrive whole.
    Ray's default upload (pyarrow's ``copy_files``) only logs a failed S3 part upload, so a lost
    checkpoint was reported as saved; now the worker fails and ``train.max_failures`` applies.
    The ``COMPLETE`` marker goes last, so a checkpoint cut off mid-upload never looks complete.

    On a local or shared (NFS) folder Ray's own copy is kept (it also checks that this worker sees
    the driver's folder, which a local path on a multi-node cluster would not), but it copies the
    files in no fixed order: the marker is held back from it, each copied file's size is checked,
    and only then is the marker written (to a temporary name, then renamed)."""
    import ray.train

    from cliplab.data.sources import OBJECT_STORES, put_files

    storage = ray.train.get_context().get_storage()  # Ray's DeveloperAPI: the run's filesystem and paths
    if storage.storage_filesystem.type_name not in OBJECT_STORES:
        return _persist_to_folder(storage, checkpoint, dir_name)
    dest = storage.build_checkpoint_path_from_name(dir_name)
    local = Path(checkpoint.path)
    storage.storage_filesystem.create_dir(dest)  # as Ray's own upload does
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == ckpt.MARKER, str(p)))
    put_files(storage.storage_filesystem, local, files, dest)
    return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)


def _persist_to_folder(storage, checkpoint, dir_name: str):
    """:func:`persist_checkpoint` on a local or shared folder: everything but the marker by Ray's
    copy, each file's size verified, then the marker, atomically."""
    from cliplab.data.sources import put_file

    local = Path(checkpoint.path)
    marker = local / ckpt.MARKER
    held = marker.read_bytes() if marker.is_file() else None
    marker.unlink(missing_ok=True)  # Ray copies the rest, in its own order
    persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
    filesystem, dest = storage.storage_filesystem, persisted.path
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target = f"{dest}/{f.relative_to(local).as_posix()}"
        stored = filesystem.get_file_info(target).size
        if stored != f.stat().st_size:
            raise OSError(f"{target} holds {stored} bytes after copying {f.stat().st_size} bytes from {f}")
    if held is not None:
        marker.write_bytes(held)
        put_file(filesystem, marker, f"{dest}/.{ckpt.MARKER}.tmp")
        filesystem.move(f"{dest}/.{ckpt.MARKER}.tmp", f"{dest}/{ckpt.MARKER}")  # a rename: all or nothing
    return persisted
