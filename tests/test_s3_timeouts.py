"""S3 against a hostile network: a stalled endpoint (TCP accepted, no answer) is one clear line
within the 10 s goal, and temporary credentials (a session token) reach the filesystem from the
environment and from an AWS profile. On a real TCP staller and on the SeaweedFS fixture."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from netfaults import StallingServer

AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def _options(filesystem) -> dict:
    """The options a pyarrow S3FileSystem was built with (what it pickles to the workers)."""
    return filesystem.__reduce__()[1][0]


def _clear_aws(monkeypatch, tmp_path) -> None:
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))  # never the machine's ~/.aws
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def test_the_default_timeouts_report_a_stalled_endpoint_within_10_s():
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem

    cfg = S3Config(endpoint_url="http://127.0.0.1:1")
    opts = _options(s3_filesystem(cfg))
    assert opts["connect_timeout"] == cfg.connect_timeout_s == 3.0
    assert opts["request_timeout"] == cfg.request_timeout_s == 3.0  # was 10 s, twice: 20-27 s
    assert cfg.max_attempts * cfg.request_timeout_s + 2 <= 10  # each attempt idles out, 1-2 s of backoff


@pytest.mark.timeout(60)
def test_a_stalled_endpoint_fails_with_one_clear_line(monkeypatch, tmp_path, capsys):
    """TCP accepted, nothing answered: every attempt waits request_timeout_s, then one line."""
    from cliplab.config import S3Config
    from cliplab.data.sources import resolve_shards
    from cliplab.errors import DataError

    _clear_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stall-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stall-secret")
    with StallingServer() as stalled:
        cfg = S3Config(endpoint_url=stalled.endpoint)
        start = time.monotonic()
        with pytest.raises(DataError) as err:
            resolve_shards("s3://cliplab/emoji/train/", cfg)
        elapsed = time.monotonic() - start
        accepted = stalled.accepted
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"the S3 endpoint {stalled.endpoint} accepted the connection but dropped or stalled" in message
    assert "last 3 seconds" in message  # the configured idle limit, not the SDK's
    assert accepted == cfg.max_attempts  # each attempt was a connection the server accepted and sat on
    print(f"stalled endpoint reported after {elapsed:.1f} s")


@pytest.mark.timeout(120)
def test_cliplab_data_inspect_on_a_stalled_endpoint_is_one_line(tmp_path):
    with StallingServer() as stalled:
        env = {k: v for k, v in os.environ.items() if k not in AWS_VARS}
        env.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL=stalled.endpoint,
                   AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "cliplab.cli.main", "data", "inspect", "s3://cliplab/emoji/train/"],
                             capture_output=True, text=True, timeout=90, env=env)
        elapsed = time.monotonic() - start
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert "accepted the connection but dropped or stalled" in lines[0]
    print(f"`cliplab data inspect` on a stalled endpoint: exit {out.returncode} after {elapsed:.1f} s")


def test_a_session_token_in_the_environment_reaches_the_filesystem(monkeypatch, tmp_path):
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem

    _clear_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-session-token")
    opts = _options(s3_filesystem(S3Config(endpoint_url="http://127.0.0.1:1")))
    assert (opts["access_key"], opts["secret_key"], opts["session_token"]) == \
        ("ASIAENVKEY", "env-secret", "env-session-token")


def _profile(tmp_path, name: str, key: str, secret: str, token: str | None) -> str:
    path = tmp_path / "credentials"
    lines = [f"[{name}]", f"aws_access_key_id = {key}", f"aws_secret_access_key = {secret}"]
    if token:
        lines.append(f"aws_session_token = {token}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_profile_with_a_session_token_passes_the_token_and_never_mixes_with_env(monkeypatch, tmp_path):
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem

    _clear_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", _profile(tmp_path, "temp", "ASIAPROFILE", "profile-secret",
                                                               "profile-session-token"))
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-stray-token-of-other-keys")  # no env keys: must not be used
    for cfg, env_profile in ((S3Config(endpoint_url="http://127.0.0.1:1", profile="temp"), None),
                             (S3Config(endpoint_url="http://127.0.0.1:1"), "temp")):
        if env_profile:
            monkeypatch.setenv("AWS_PROFILE", env_profile)
        opts = _options(s3_filesystem(cfg))
        assert (opts["access_key"], opts["secret_key"], opts["session_token"]) == \
            ("ASIAPROFILE", "profile-secret", "profile-session-token")


def test_an_unknown_profile_is_one_clear_error(monkeypatch, tmp_path):
    from cliplab.config import S3Config
    from cliplab.data.sources import s3_filesystem
    from cliplab.errors import DataError

    _clear_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", _profile(tmp_path, "temp", "k", "s", None))
    with pytest.raises(DataError, match="AWS profile 'nope' not found; check ~/.aws/credentials"):
        s3_filesystem(S3Config(profile="nope"))


@pytest.mark.s3
def test_a_profiles_keys_and_token_go_to_the_real_server(monkeypatch, tmp_path, s3_server, emoji_on_s3):
    """Keys only in a profile file (as `aws configure` or an SSO login writes them): the shards
    resolve and read on SeaweedFS. With an ``aws_session_token`` in the profile the token is sent:
    SeaweedFS checks session tokens against its own STS and refuses one it did not issue (before,
    the profile's token was dropped and the same request passed)."""
    from cliplab.config import S3Config
    from cliplab.data.sources import resolve_shards
    from cliplab.errors import DataError

    _clear_aws(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_PROFILE", "seaweed")
    cfg = S3Config(endpoint_url=s3_server.endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE",
                       _profile(tmp_path, "seaweed", s3_server.access_key, s3_server.secret_key, None))
    shards = resolve_shards(f"{emoji_on_s3}/train/", cfg)
    assert shards.paths and all(p.endswith(".tar") for p in shards.paths)
    with shards.filesystem.open_input_stream(shards.paths[0]) as f:
        assert len(f.read(1024)) == 1024

    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", _profile(tmp_path, "seaweed", s3_server.access_key,
                                                               s3_server.secret_key, "not-issued-by-seaweed"))
    with pytest.raises(DataError, match="S3 rejected the credentials"):
        resolve_shards(f"{emoji_on_s3}/train/", cfg)

    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE",
                       _profile(tmp_path, "seaweed", s3_server.access_key, "not-the-secret", None))
    with pytest.raises(DataError, match="S3 rejected the credentials"):  # the profile's keys are what is sent
        resolve_shards(f"{emoji_on_s3}/train/", cfg)
