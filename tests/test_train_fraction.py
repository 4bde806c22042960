"""data.train_fraction: a deterministic, nested subset of the training samples (data-scarcity
studies such as X-CLR's), the same on every rank and run, and part of the resume fingerprint."""

import pytest

from cliplab.config import ConfigError, DataConfig, ExperimentConfig, validate, with_overrides
from cliplab.data.plan import data_changes, fingerprint
from cliplab.errors import DataError
from cliplab.train.launch import train_index


def _cfg(corpus_and_stats, **data):
    corpus = corpus_and_stats[0]
    return ExperimentConfig(data=DataConfig(train=str(corpus / "train"), val=str(corpus / "val"), **data))


def _ranges(index):
    return {(s.path, int(a), int(b)) for s in index.shards for a, b in zip(s.starts, s.ends, strict=True)}


def test_fractions_are_nested_deterministic_and_about_the_asked_share(emoji_corpus):
    full = train_index(_cfg(emoji_corpus))
    n = int(full.counts().sum())
    subsets = {f: _ranges(train_index(_cfg(emoji_corpus, train_fraction=f))) for f in (0.1, 0.3, 1.0)}
    assert subsets[1.0] == _ranges(full)
    assert subsets[0.1] < subsets[0.3] < subsets[1.0]
    for f in (0.1, 0.3):  # binomial: within 5 standard deviations of f·n
        assert abs(len(subsets[f]) - f * n) < 5 * (n * f * (1 - f)) ** 0.5, (f, len(subsets[f]), n)
    from cliplab.train import launch
    launch._INDEXES.clear()  # built again from scratch (the disk cache holds the full scan): the same subset
    assert _ranges(train_index(_cfg(emoji_corpus, train_fraction=0.3))) == subsets[0.3]
    other_seed = _ranges(train_index(_cfg(emoji_corpus, train_fraction=0.3, train_fraction_seed=1)))
    assert other_seed != subsets[0.3] and other_seed < subsets[1.0]
    assert train_index(_cfg(emoji_corpus, train_fraction=0.3)).skipped() == full.skipped()  # drops are not skips


def test_a_changed_fraction_is_a_data_change_on_resume_and_bad_fractions_are_config_errors(emoji_corpus):
    cfg = _cfg(emoji_corpus, train_fraction=0.3)
    saved = fingerprint(train_index(cfg), cfg.data)
    assert data_changes(saved, fingerprint(train_index(cfg), cfg.data)) == []
    seed1 = with_overrides(cfg, {"data.train_fraction_seed": 1})
    assert any("train_fraction_seed" in c for c in data_changes(saved, fingerprint(train_index(seed1), seed1.data)))
    full = _cfg(emoji_corpus)
    assert "train_fraction" not in fingerprint(train_index(full), full.data)["config"]  # old checkpoints still match
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="train_fraction"):
            validate(_cfg(emoji_corpus, train_fraction=bad))
    with pytest.raises(DataError, match="raise the fraction"):
        train_index(_cfg(emoji_corpus, train_fraction=1e-9))
