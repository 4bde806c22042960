"""Every tensor that meets a model is on the model's device: in-training eval, zero-shot prompts,
``cliplab eval``'s loader and shard embedding, and the MLflow pyfunc.

This machine has no GPU, so the model here lives on PyTorch's ``meta`` device, a device that is
not the default: a path that hands a default-device (CPU) tensor to an encoder fails the probe's
assertion exactly as a CUDA model would fail on a CPU batch. Meta tensors carry no values, so the
probe stops the path (``Reached``) once it has seen the inputs it was waiting for; the GPU suite
(``tests/test_gpu_e2e.py``) runs the same paths to the end on a real GPU.
"""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

DIM = 8
PROBE_DEVICE = torch.device("meta")


class Reached(Exception):
    """The probe saw every encoder call it waited for, each on the model's device."""


class DeviceProbe(nn.Module):
    """An open_clip stand-in whose encoders assert that their inputs are on its own device."""

    def __init__(self, stop_after: int, out_device: torch.device = PROBE_DEVICE) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(DIM, device=PROBE_DEVICE))
        self.stop_after = stop_after
        self.out_device = out_device  # meta features have no values to copy to the host; CPU ones do
        self.calls: list[tuple[str, torch.device]] = []

    def _encode(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((kind, x.device))
        assert x.device == self.weight.device, f"{kind} input on {x.device}, the model is on {self.weight.device}"
        if len(self.calls) >= self.stop_after:
            raise Reached(kind)
        return torch.zeros(len(x), DIM, device=self.out_device)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("image", images)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("text", tokens)


def _tokenizer(texts):
    return torch.ones(len(texts), 4, dtype=torch.long)  # CPU, as open_clip's tokenizers return


def _transform(image):
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def _module(stop_after: int):
    from cliplab.config import ObjectiveConfig
    from cliplab.models import DualEncoder
    from cliplab.objectives import build_objective

    return DualEncoder(DeviceProbe(stop_after), build_objective(ObjectiveConfig(name="clip"), DIM)).to(PROBE_DEVICE)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_in_training_eval_moves_val_batches_and_captions_to_the_model():
    """The trainer's val eval (``train/worker.py:_evaluate``): numpy batches from Ray Data and the
    tokenizer's CPU output reached the encoders unmoved, so every GPU run with data.val failed."""
    from cliplab.eval import evaluate_module

    module = _module(stop_after=2)  # one image batch, then its captions
    batches = [{"image": np.zeros((2, 3, 8, 8), np.float32), "caption": np.array(["a cat", "a dog"]),
                "label": np.array(["", ""])}]
    with pytest.raises(Reached, match="text"):
        evaluate_module(module, _tokenizer, iter(batches), ["a photo of {}."])
    assert module.model.calls == [("image", PROBE_DEVICE), ("text", PROBE_DEVICE)]
    assert not module.training  # eval mode, as before


def test_zero_shot_prompts_reach_the_model_on_its_device():
    from cliplab.eval.scoring import class_embeddings
    from cliplab.models import encode_texts

    module = _module(stop_after=1)
    with pytest.raises(Reached, match="text"):
        class_embeddings(module.objective, lambda t: encode_texts(module.model, _tokenizer, t), ["cat", "dog"],
                         ["a photo of {}."])


def test_cliplab_eval_text_features_and_shard_embedding_use_the_model_device(tmp_path):
    from pyarrow import fs

    from cliplab.eval.embedding import encode_piece
    from cliplab.eval.loading import LoadedModel

    module = _module(stop_after=1)
    loaded = LoadedModel(module, SimpleNamespace(tokenizer=_tokenizer, embed_dim=DIM), None, "probe")
    with pytest.raises(Reached, match="text"):
        loaded.encode_texts(["a cat"])
    assert loaded.device == PROBE_DEVICE  # where cliplab eval scores

    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("a.png", _png()), ("a.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    probe = DeviceProbe(stop_after=2, out_device=torch.device("cpu"))  # encode_piece copies features to the host
    with pytest.raises(Reached, match="text"):
        encode_piece(probe, _transform, _tokenizer, str(shard), fs.LocalFileSystem(), "retrieval")
    assert probe.calls == [("image", PROBE_DEVICE), ("text", PROBE_DEVICE)]


def test_the_pyfunc_model_embeds_on_its_device():
    from cliplab.tracking.pyfunc import CliplabPyfunc

    pyfunc = CliplabPyfunc()
    pyfunc.bundle = SimpleNamespace(val_transform=_transform, tokenizer=_tokenizer)
    pyfunc.module = _module(stop_after=1)
    with pytest.raises(Reached, match="image"):
        pyfunc.embed_images([_png()])
    pyfunc.module = _module(stop_after=1)
    with pytest.raises(Reached, match="text"):
        pyfunc.embed_texts(["a red square"])


def test_a_device_that_is_not_there_is_a_config_error():
    from cliplab.errors import ConfigError
    from cliplab.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible.*--device cpu"):
            resolve_device("cuda")
