"""The CLI: --help on every command, and one-line errors (exit 2) before any Ray work."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cliplab.cli.main import build_parser

CLIPLAB = [sys.executable, "-m", "cliplab.cli.main"]


def _commands(parser, prefix=()):
    """Every command path in the argparse tree."""
    import argparse

    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


ALL_COMMANDS = list(_commands(build_parser()))


def test_the_tree_has_the_documented_commands():
    names = {" ".join(c) for c in ALL_COMMANDS}
    assert {"train", "sweep", "demo", "data emoji", "data build", "services s3", "services mlflow",
            "services ray"} <= names


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: " ".join(c) or "cliplab")
def test_help(command):
    proc = subprocess.run([*CLIPLAB, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: cliplab")


def _run_fails_fast(args, tmp_path) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([*CLIPLAB, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 30
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cliplab: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (Path(tmp_path) / ".cliplab").exists()  # no run dir: nothing started
    return lines[0]


def test_missing_shard_path(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"data:\n  train: {tmp_path}/nowhere/train-{{000000..000003}}.tar\n")
    line = _run_fails_fast(["train", str(cfg)], tmp_path)
    assert "shard path not found" in line and "nowhere" in line


def test_unreachable_s3_endpoint(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"data:\n  train: s3://bucket/train/\n  s3:\n    endpoint_url: http://127.0.0.1:{port}\n")
    line = _run_fails_fast(["train", str(cfg)], tmp_path)
    assert f"cannot reach the S3 endpoint http://127.0.0.1:{port}" in line


@pytest.mark.parametrize("text, expected", [
    ("data: [oops\n", "malformed YAML"),
    ("data:\n  train: x\ntrain:\n  epochs: many\n", "train.epochs: expected an integer"),
    ("data:\n  train: x\nmodle:\n  name: RN50\n", "did you mean 'model'"),
])
def test_malformed_config(tmp_path, text, expected):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    assert expected in _run_fails_fast(["train", str(cfg)], tmp_path)


def test_bad_override_on_sweep(tmp_path):
    sweep = Path(__file__).parents[1] / "sweeps" / "demo.py"
    line = _run_fails_fast(["sweep", str(sweep), "--set", "optim.lrr=1"], tmp_path)
    assert "did you mean 'optim.lr'" in line


def test_data_build_command_writes_shards_and_prints_a_summary(tmp_path):
    from PIL import Image

    src = tmp_path / "pairs"
    src.mkdir()
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (8, 8), color).save(src / f"{i}.jpg")
        (src / f"{i}.txt").write_text(f"a {color} tile")
    (src / "3.jpg").write_bytes(b"garbage")
    (src / "3.txt").write_text("broken")
    proc = subprocess.run([*CLIPLAB, "data", "build", str(src), "--out", str(tmp_path / "out"),
                           "--val-fraction", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 samples" in proc.stdout and "corrupt_image 1" in proc.stdout
    assert (tmp_path / "out" / "train" / "train-000000.tar").is_file()
    assert (tmp_path / "out" / "stats.json").is_file()


@pytest.mark.parametrize("address, expected", [
    (None, r"could not start a local Ray: The current node timed out during startup\. .*`ray stop --force`"),
    ("10.0.0.9:6379", r"could not connect to Ray at 10\.0\.0\.9:6379: The current node timed out.*`ray status --address"),
])
def test_a_ray_that_fails_to_start_or_answer_is_one_line_that_says_what_to_do(monkeypatch, capsys, address, expected):
    """`cliplab sweep` on a starved machine printed Ray's bare traceback ("The current node timed out
    during startup"); now every command that reaches Ray gets one line and exit 2."""
    import os

    import ray

    from cliplab.cli import main as cli_main
    from cliplab.errors import ServiceError
    from cliplab.ray_connect import init_ray

    def refuse(**kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ServiceError, match=expected):
        init_ray(address)

    class Parser:  # a command whose work is to reach Ray, through the CLI's own error handling
        def parse_args(self, argv):
            return type("Args", (), {"func": staticmethod(lambda args: init_ray(address))})()

    monkeypatch.setattr(cli_main, "build_parser", Parser)
    assert cli_main.main([]) == 2
    out = capsys.readouterr().err
    assert out.startswith("cliplab: error: could not") and "Traceback" not in out and out.count("\n") == 1
