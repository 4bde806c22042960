"""``model.cache_locked_text``: a locked Hugging Face text trunk's pooled output is computed once
per caption; later batches run only the trainable projection, and give what the eval-mode tower
gives."""

import pytest
import torch

from cliplab.config import ExperimentConfig, ModelConfig, with_overrides
from cliplab.config.checks import validate
from cliplab.errors import ConfigError
from cliplab.models import build_dual_encoder, build_model, cache_locked_text, lock_towers

LIT = ModelConfig(name="cliplab-tiny-minilm", lock_text=True)
CAPTIONS = ["a red apple", "a boat on the sea", "a sleeping cat", "a drum", "an egg", "a fish", "a hat", "a kite"]


@pytest.fixture(scope="module")
def towers():
    """Two identical LiT models (same seed): one plain, one with the cache installed."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        bundle = build_model(LIT)
        lock_towers(bundle.model, LIT)
        out.append(bundle)
    return out


def _trunk_calls(tower) -> list[int]:
    calls = []
    tower.transformer.register_forward_hook(lambda module, args, kwargs, out: calls.append(len(kwargs["input_ids"])),
                                            with_kwargs=True)
    return calls


def test_cached_rows_equal_the_eval_mode_tower_and_later_batches_skip_the_trunk(towers):
    plain, cached = towers
    cache = cache_locked_text(cached.model, capacity=100)
    calls = _trunk_calls(cached.model.text)
    tokens = cached.tokenizer(CAPTIONS)
    plain.model.eval()
    with torch.no_grad():
        want = plain.model.encode_text(tokens, normalize=False)
    cached.model.train()  # the trunk still runs in eval mode: a locked tower without dropout
    first = cached.model.encode_text(tokens[:5], normalize=False)
    mixed = cached.model.encode_text(tokens[3:], normalize=False)  # 2 cached rows, 3 new
    again = cached.model.encode_text(tokens, normalize=False)
    assert calls == [5, 3]  # the trunk saw each caption once; the last batch never reached it
    assert (cache.hits, cache.misses) == (2 + 8, 5 + 3)
    torch.testing.assert_close(first, want[:5], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed, want[3:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, want, rtol=1e-6, atol=1e-6)
    # the state dict is open_clip's, key for key and value for value
    assert list(cached.model.state_dict()) == list(plain.model.state_dict())


def test_the_projection_still_learns_through_cached_rows_and_the_trunk_gets_no_gradient():
    torch.manual_seed(0)
    bundle = build_model(LIT)
    lock_towers(bundle.model, LIT)
    cache_locked_text(bundle.model, capacity=100)
    tokens = bundle.tokenizer(CAPTIONS)
    for _ in range(2):  # a miss, then a hit: both paths reach the projection
        bundle.model.zero_grad()
        bundle.model.encode_text(tokens, normalize=False).square().sum().backward()
        grads = {n: p.grad for n, p in bundle.model.text.named_parameters() if p.grad is not None}
        assert grads and all(n.startswith("proj") for n in grads), sorted(grads)
        assert all(g.abs().sum() > 0 for g in grads.values())


def test_the_least_recently_used_captions_go_once_the_cache_is_full():
    torch.manual_seed(0)
    bundle = build_model(LIT)
    lock_towers(bundle.model, LIT)
    cache = cache_locked_text(bundle.model, capacity=3)
    tokens = bundle.tokenizer(CAPTIONS)
    bundle.model.encode_text(tokens[:3], normalize=False)
    bundle.model.encode_text(tokens[:1], normalize=False)  # caption 0 is now the most recent
    bundle.model.encode_text(tokens[3:5], normalize=False)  # evicts captions 1 and 2
    assert len(cache.rows) == 3
    assert set(cache.rows) == {tokens[i].numpy().tobytes() for i in (0, 3, 4)}


def test_the_option_is_refused_where_the_trunk_is_not_locked_whole_or_not_hugging_faces():
    base = with_overrides(ExperimentConfig(), {"data.train": "/data/train"})
    for overrides, needle in (
            ({"model.name": "cliplab-tiny-minilm", "model.cache_locked_text": 1000}, "model.lock_text=true"),
            ({"model.name": "cliplab-tiny-minilm", "model.lock_text": True, "model.lock_text_unlocked_layers": 1,
              "model.cache_locked_text": 1000}, "model.lock_text_unlocked_layers=0"),
            ({"model.name": "cliplab-tiny", "model.lock_text": True, "model.cache_locked_text": 1000},
             "Hugging Face text tower"),
            ({"model.cache_locked_text": -1}, "must be >= 0")):
        with pytest.raises(ConfigError, match=needle):
            validate(with_overrides(base, overrides))
    # built directly (not through validate), the model says the same
    bundle = build_model(ModelConfig(name="cliplab-tiny-minilm"))
    with pytest.raises(ConfigError, match="whole text trunk locked"):
        cache_locked_text(bundle.model, 10)


def test_build_dual_encoder_installs_it_from_the_config():
    cfg = with_overrides(ExperimentConfig(), {"data.train": "/data/train", "model.name": "cliplab-tiny-minilm",
                                              "model.lock_text": True, "model.cache_locked_text": 50})
    bundle, module = build_dual_encoder(cfg)
    tokens = bundle.tokenizer(CAPTIONS)
    calls = _trunk_calls(module.model.text)
    images = torch.randn(len(CAPTIONS), 3, 64, 64)
    module(images, tokens)
    module(images, tokens)
    assert calls == [len(CAPTIONS)]
