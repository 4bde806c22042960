"""One frozen, typed config tree for an experiment.

Every component owns a small frozen dataclass; the CLI (``--set a.b=v``), experiment files and
Tune search spaces all address it by dotted keys. :func:`validate` runs before any Ray work, so
an unknown key, a wrong type or an out-of-range value fails in the driver with one line.

Credentials never live here: S3 keys come from the standard AWS environment/profile chain.

Import from ``cliplab.config``; its modules are :mod:`~cliplab.config.schema` (the dataclasses),
:mod:`~cliplab.config.codec` (dicts, flattening and dotted-key overrides),
:mod:`~cliplab.config.checks` (:func:`validate`) and :mod:`~cliplab.config.load` (experiment files).
The submodules import each other, never the package.

May import: models, objectives (what an objective needs, for :func:`validate`), errors (the layers
below it). Never data, checkpoint, tracking, eval, train, tune, submit, demo or cli.
"""

from cliplab.config.checks import validate
from cliplab.config.codec import flatten, from_dict, parse_override, to_dict, with_overrides
from cliplab.config.load import load_experiment, load_python_file
from cliplab.config.schema import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    S3Config,
    SourceConfig,
    TrackingConfig,
    TrainConfig,
)
from cliplab.errors import ConfigError

__all__ = [
    "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig", "ObjectiveConfig", "OptimConfig",
    "S3Config", "SourceConfig", "TrackingConfig", "TrainConfig", "flatten", "from_dict", "load_experiment",
    "load_python_file", "parse_override", "to_dict", "validate", "with_overrides",
]
