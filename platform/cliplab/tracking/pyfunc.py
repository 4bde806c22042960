"""cliplab models as MLflow pyfunc: images and/or texts in, embeddings (and similarity) out.

Input: a DataFrame with a ``text`` column (strings) and/or an ``image`` column (raw bytes or
base64 strings). Output: a DataFrame with ``image_embedding`` / ``text_embedding`` (lists, in
the objective's geometry) and, when both are given, ``similarity`` per row.
"""

from __future__ import annotations

import base64
import io

import mlflow.pyfunc
import pandas as pd


def _image_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return base64.b64decode(value)


class CliplabPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from cliplab.checkpoint import load_module
        from cliplab.models import resolve_device

        loaded = load_module(context.artifacts["checkpoint"])
        self.module, self.bundle = loaded.module, loaded.bundle
        # a GPU host serves on its GPU: `mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})` opts out
        self.module.to(resolve_device((getattr(context, "model_config", None) or {}).get("device", "auto")))

    def embed_images(self, images: list[bytes]):
        import torch
        from PIL import Image

        from cliplab.models import encode_images

        batch = torch.stack([self.bundle.val_transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        with torch.no_grad():
            return self.module.objective.embed(encode_images(self.module.model, batch), "image")

    def embed_texts(self, texts: list[str]):
        import torch

        from cliplab.models import encode_texts

        with torch.no_grad():
            return self.module.objective.embed(encode_texts(self.module.model, self.bundle.tokenizer, texts), "text")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # a DataFrame hint: MLflow validates against the logged signature, not the hint
        out = pd.DataFrame(index=model_input.index)
        img = txt = None
        if "image" in model_input:
            img = self.embed_images([_image_bytes(v) for v in model_input["image"]])
            out["image_embedding"] = [row.tolist() for row in img.cpu()]
        if "text" in model_input:
            txt = self.embed_texts([str(v) for v in model_input["text"]])
            out["text_embedding"] = [row.tolist() for row in txt.cpu()]
        if img is not None and txt is not None:
            sim = self.module.objective.similarity(img, txt).diagonal()
            out["similarity"] = sim.cpu().tolist()
        return out
