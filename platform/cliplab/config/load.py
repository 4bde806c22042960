"""Experiment files: YAML (the tree as a mapping) or Python (a module-level ``CONFIG``),
with ``--set`` overrides, validated."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import yaml

from cliplab.config.checks import validate
from cliplab.config.codec import from_dict, parse_override, with_overrides
from cliplab.config.schema import ExperimentConfig
from cliplab.errors import ConfigError


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from YAML (the tree as a mapping) or Python (a module-level ``CONFIG``),
    apply ``--set`` overrides and validate. Raises :class:`ConfigError` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        cfg = from_dict(ExperimentConfig, data)
    elif path.suffix == ".py":
        cfg = getattr(load_python_file(path), "CONFIG", None)
        if not isinstance(cfg, ExperimentConfig):
            raise ConfigError(f"{path}: must define CONFIG = ExperimentConfig(...)")
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml or .py")
    cfg = with_overrides(cfg, dict(parse_override(o) for o in overrides or []))
    validate(cfg)
    return cfg


def load_python_file(path: Path) -> types.ModuleType:
    """Import a Python file (an experiment or sweep) as a module."""
    spec = importlib.util.spec_from_file_location(f"cliplab_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as err:  # user code: report where it broke, in one line
        raise ConfigError(f"{path}: failed to import: {type(err).__name__}: {err}") from None
    return module
