"""Resolve shard URLs (local or ``s3://``) to a pyarrow filesystem and a checked list of paths.

pyarrow ignores ``AWS_ENDPOINT_URL``, so the endpoint is passed as ``endpoint_override``.
Keys come from the standard AWS chain (env vars, then ``profile``) and are never logged.
Every check here is quick (one connection attempt, short timeouts) and runs in the driver
before any Ray work, so a typo or a dead endpoint is one clear line, not a hang.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from cliplab.errors import DataError


@dataclass(frozen=True)
class ShardSet:
    """Concrete shard paths (as the filesystem names them) and the filesystem to read them."""

    url: str
    paths: tuple[str, ...]
    filesystem: object  # pyarrow.fs.FileSystem

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def endpoint_url(s3cfg) -> str | None:
    return s3cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(s3cfg):
    """A pyarrow S3FileSystem with the endpoint override, short timeouts and few attempts: an
    endpoint that accepts the connection and never answers fails after ``max_attempts`` ×
    ``request_timeout_s`` (curl's idle limit), not the SDK's minutes."""
    from pyarrow import fs

    kwargs = {
        "region": s3cfg.region,
        "connect_timeout": s3cfg.connect_timeout_s,
        "request_timeout": s3cfg.request_timeout_s,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=s3cfg.max_attempts),
    }
    endpoint = endpoint_url(s3cfg)
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs["endpoint_override"] = rest or scheme
        kwargs["scheme"] = scheme if rest else "https"
    key, secret, token = credentials(s3cfg)
    if key:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return fs.S3FileSystem(**kwargs)


def credentials(s3cfg) -> tuple[str | None, str | None, str | None]:
    """``(access key, secret key, session token)``: the AWS_* variables when both keys are set
    (with AWS_SESSION_TOKEN), else the profile (``data.s3.profile``, then AWS_PROFILE) with its own
    ``aws_session_token``, else Nones (pyarrow's default chain). The two sources never mix."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return key, secret, os.environ.get("AWS_SESSION_TOKEN") or None
    profile = s3cfg.profile or os.environ.get("AWS_PROFILE")
    if profile:
        import boto3
        import botocore.exceptions

        try:
            creds = boto3.Session(profile_name=profile).get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise DataError(f"AWS profile '{profile}' not found; check ~/.aws/credentials "
                            "(or AWS_SHARED_CREDENTIALS_FILE) and AWS_PROFILE / data.s3.profile") from None
        if creds is None:
            raise DataError(f"AWS profile '{profile}' has no credentials; check ~/.aws/credentials")
        frozen = creds.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token or None
    return None, None, None


def _expand(url: str) -> list[str]:
    return [u for part in url.split("::") for u in braceexpand(part.strip()) if u]


def resolve_shards(url: str, s3cfg) -> ShardSet:
    """Expand ``url`` (braces, ``::``-joined lists, a directory/prefix of ``*.tar``) and check
    that every shard exists. Raises :class:`DataError` naming the problem."""
    urls = _expand(url)
    if not urls:
        raise DataError(f"no shard URLs in '{url}'")
    if all(u.startswith("s3://") for u in urls):
        return _resolve_s3(url, urls, s3cfg)
    if any(u.startswith("s3://") or "://" in u for u in urls):
        raise DataError(f"'{url}': mix of URL schemes; use either s3:// or local paths")
    return _resolve_local(url, urls)


def _resolve_local(url: str, urls: list[str]) -> ShardSet:
    from pyarrow import fs

    paths: list[str] = []
    for u in urls:
        p = Path(u).expanduser()
        if p.is_dir():
            found = sorted(str(t.resolve()) for t in p.glob("*.tar"))
            if not found:
                raise DataError(f"shard directory {p} holds no .tar files")
            paths.extend(found)
        elif p.is_file():
            paths.append(str(p.resolve()))
        else:
            raise DataError(f"shard path not found: {p}")
    return ShardSet(url, tuple(paths), fs.LocalFileSystem())


def _resolve_s3(url: str, urls: list[str], s3cfg) -> ShardSet:
    from pyarrow import fs

    filesystem = s3_filesystem(s3cfg)
    endpoint = endpoint_url(s3cfg) or "AWS S3"
    paths: list[str] = []
    for u in urls:
        path = u[len("s3://"):].rstrip("/")
        bucket = path.split("/", 1)[0]
        try:
            info = filesystem.get_file_info(path)
            if info.type == fs.FileType.Directory or u.endswith("/"):
                found = [
                    f.path for f in filesystem.get_file_info(fs.FileSelector(path, recursive=False))
                    if f.type == fs.FileType.File and f.path.endswith(".tar")
                ]
                if not found:
                    raise DataError(f"s3://{path}/ holds no .tar shards")
                paths.extend(sorted(found))
            elif info.type == fs.FileType.File:
                paths.append(path)
            else:
                _check_bucket(filesystem, bucket, endpoint)
                raise DataError(f"shard not found: {u}")
        except OSError as err:
            raise DataError(explain_s3_error(err, u, bucket, endpoint)) from None
    return ShardSet(url, tuple(paths), filesystem)


def _check_bucket(filesystem, bucket: str, endpoint: str) -> None:
    from pyarrow import fs

    if filesystem.get_file_info(bucket).type == fs.FileType.NotFound:
        raise DataError(f"S3 bucket '{bucket}' does not exist at {endpoint}")


def explain_s3_error(err: OSError, url: str, bucket: str, endpoint: str) -> str:
    text = str(err)
    low = text.lower()
    squeezed = low.replace("_", "").replace(" ", "")  # AWS codes come as AccessDenied or ACCESS_DENIED
    if any(s in squeezed for s in ("accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch")) \
            or re.search(r"\b403\b", low):
        return (f"S3 rejected the credentials for {url} at {endpoint}: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if any(s in low for s in ("when uploading", "timeout was reached", "empty reply", "operation too slow")):
        first = text.splitlines()[0][:300]
        return (f"the S3 endpoint {endpoint} accepted the connection but dropped or stalled a transfer under "
                f"{url} ({first}): check the server's health and free space, then run the command again")
    if any(s in low for s in ("curl error", "couldn't connect", "connection refused", "timed out",
                              "could not resolve", "connect")):
        return (f"cannot reach the S3 endpoint {endpoint} while opening {url}: is the server "
                "running? Set data.s3.endpoint_url or AWS_ENDPOINT_URL")
    if "nosuchbucket" in squeezed or ("bucket" in low and "not" in low):
        return f"S3 bucket '{bucket}' does not exist at {endpoint}"
    return f"S3 error opening {url} at {endpoint}: {text.splitlines()[0] if text else type(err).__name__}"


def s3_error_message(err: OSError, url: str, s3cfg=None) -> str:
    """:func:`explain_s3_error` for an ``s3://`` URL, its bucket and endpoint worked out."""
    from cliplab.config import S3Config

    bucket = url[len("s3://"):].split("/")[0]
    return explain_s3_error(err, url, bucket, endpoint_url(s3cfg or S3Config()) or "AWS")


OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow filesystem type names


def put_file(filesystem, local: Path, target: str, chunk_bytes: int = 8 << 20) -> int:
    """Copy the local file ``local`` to ``target`` on ``filesystem`` (an object store: there are
    no folders to create), check that all of it arrived, and return its size in bytes.

    Not ``pyarrow.fs.copy_files``: when an S3 part upload fails it only logs "Error ignored when
    destroying file" and returns, so files were lost without an error. Closing the stream
    ourselves raises instead.
    """
    size = local.stat().st_size
    with open(local, "rb") as src, filesystem.open_output_stream(target) as out:
        while chunk := src.read(chunk_bytes):
            out.write(chunk)
    stored = filesystem.get_file_info(target).size
    if stored != size:
        raise OSError(f"{target} holds {stored} bytes after uploading {size} bytes from {local}")
    return size


def put_files(filesystem, local_root: Path, files, dest: str) -> int:
    """:func:`put_file` for each of ``files`` (under ``local_root``), in the given order, to the
    same relative paths under ``dest``. Returns the bytes copied."""
    return sum(put_file(filesystem, Path(f), f"{dest}/{Path(f).relative_to(local_root).as_posix()}") for f in files)


def upload(local_dir: str | Path, url: str, s3cfg, *, progress: bool = False, workers: int = 8) -> int:
    """Copy every file under ``local_dir`` to ``s3://bucket/prefix/`` (same relative paths), a few
    files at a time, with a progress bar in bytes when ``progress``. Returns the number of files."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if not url.startswith("s3://"):
        raise DataError(f"upload target must be an s3:// URL, got '{url}'")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise DataError(f"nothing to upload: {local_dir} is not a directory")
    dest = url[len("s3://"):].rstrip("/")
    filesystem = s3_filesystem(s3cfg)
    endpoint = endpoint_url(s3cfg) or "AWS S3"
    bucket = dest.split("/", 1)[0]
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    try:
        _check_bucket(filesystem, bucket, endpoint)
        with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc=f"uploading to {url}",
                  disable=not progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda p: bar.update(put_files(filesystem, local_dir, [p], dest)), files))
    except OSError as err:
        raise DataError(explain_s3_error(err, url, bucket, endpoint)) from None
    return len(files)
