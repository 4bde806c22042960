"""The config tree: loading, overrides, type checks and validation, all before any Ray work."""

from pathlib import Path

import pytest

from cliplab.config import ExperimentConfig, flatten, load_experiment, parse_override, to_dict, with_overrides
from cliplab.errors import ConfigError


def test_override_types_and_nesting():
    cfg = with_overrides(ExperimentConfig(), {"optim.lr": 1e-3, "train.max_steps": 5,
                                              "eval.templates": ["a {}"], "data.s3.endpoint_url": "http://x:1"})
    assert cfg.optim.lr == 1e-3
    assert cfg.train.max_steps == 5
    assert cfg.eval.templates == ("a {}",)
    assert cfg.data.s3.endpoint_url == "http://x:1"
    assert ExperimentConfig().optim.lr != 1e-3  # frozen defaults untouched


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert with_overrides(ExperimentConfig(), {"optim.lr": 1}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        with_overrides(ExperimentConfig(), {"train.epochs": 1.5})
    with pytest.raises(ConfigError, match="expected true/false"):
        with_overrides(ExperimentConfig(), {"train.use_gpu": "yes"})


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*"):
        with_overrides(ExperimentConfig(), {"optim.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="did you mean 'objective.temperature'"):
        with_overrides(ExperimentConfig(), {"objective.temprature": 0.1})


def test_parse_override_yaml_scalars():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_yaml_roundtrip_and_validation(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  train: /data/train\noptim:\n  lr: 0.01\n")
    cfg = load_experiment(path, ["train.epochs=3"])
    assert cfg.data.train == "/data/train" and cfg.optim.lr == 0.01 and cfg.train.epochs == 3
    flat = flatten(to_dict(cfg))
    assert flat["optim.lr"] == 0.01 and flat["data.s3.region"] == "us-east-1"


@pytest.mark.parametrize("text, message", [
    ("data: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("data:\n  train: x\nobjective:\n  name: nope\n", "objective.name 'nope'"),
    ("data:\n  train: x\n  batch_size: 1\n", "batch_size must be >= 2"),
    ("optim:\n  lr: 0.1\n", "data.train is empty"),
])
def test_bad_configs_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert "\n" not in str(info.value)


def test_a_zero_temperature_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  train: x\n")
    with pytest.raises(ConfigError, match=r"objective.temperature must be in \(0, 1\]") as info:
        load_experiment(path, ["objective.temperature=0"])
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "nope.yaml")


def _sweep_file(tmp_path, space: str):
    path = tmp_path / "s.py"
    path.write_text(
        '"""Hypothesis: a test."""\n'
        "from ray import tune\n"
        "from cliplab.config import ExperimentConfig, DataConfig\n"
        "from cliplab.tune import Sweep\n"
        f"SWEEP = Sweep(base=ExperimentConfig(data=DataConfig(train='x')), space={space})\n"
    )
    return path


def test_sweep_file_loads_with_hypothesis_and_trial_count(tmp_path):
    from cliplab.tune import load_sweep

    sweep = load_sweep(_sweep_file(tmp_path, "{'objective.temperature': tune.grid_search([0.07, 0.03]),"
                                             " 'optim.lr': tune.grid_search([1e-3, 2e-3, 3e-3])}"),
                       ["train.epochs=2"])
    assert sweep.num_trials == 6
    assert sweep.hypothesis == "Hypothesis: a test."
    assert sweep.base.train.epochs == 2 and sweep.name == "s"


@pytest.mark.parametrize("space, message", [
    ("{'objective.temperature': tune.grid_search([0.07, 2.0])}", "objective.temperature must be in"),
    ("{'optim.lrate': tune.choice([1e-3])}", "unknown config key 'optim.lrate'; valid keys: lr,"),
    ("{'objective.hopfield_beta': tune.uniform(8.0, 2.0)}", "search space 'objective.hopfield_beta': empty range"),
    ("{'optim.lr': tune.grid_search([])}", "search space 'optim.lr': grid_search needs at least one value"),
])
def test_sweep_space_is_validated_before_any_ray_work(tmp_path, space, message):
    from cliplab.tune import load_sweep

    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep_file(tmp_path, space))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "sweeps").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_loads_and_validates(path):
    from cliplab.tune import load_sweep

    sweep = load_sweep(path)
    assert sweep.hypothesis and sweep.num_trials >= 2 and sweep.space


def test_shootout_summary_is_mean_and_std_over_seeds():
    from cliplab.config import load_python_file

    shootout = load_python_file(Path(__file__).parents[1] / "sweeps" / "shootout.py")
    rows = [{"objective.name": "clip", "val/image_to_text_R1": v, "val/text_to_image_R1": 0.1,
             "val/zeroshot_top1": 0.2} for v in (0.1, 0.2, 0.3)]
    rows.append({"objective.name": "meru", "val/image_to_text_R1": 0.5})
    text = shootout.summarize(rows)
    assert "| clip      | 3     | 0.2000 ± 0.1000 | 0.1000 ± 0.0000 | 0.2000 ± 0.0000 |" in text
    assert "| meru      | 1     | 0.5000 ± 0.0000 |" in text
    assert shootout.SWEEP.num_trials == 15
