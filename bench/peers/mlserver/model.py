"""The concrete model behind MLServer (a custom ``MLModel`` runtime, as its docs show):
``POST /v2/models/concrete/infer``, with ``"parameters": {"n_samples": T}`` for MC."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import load, predict, predict_mc


class Concrete(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self.model = load()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = torch.as_tensor(NumpyCodec.decode_input(payload.inputs[0]), dtype=torch.float32)
        params = payload.parameters.model_dump() if payload.parameters else {}
        n_samples = params.get("n_samples")
        if n_samples is None:
            outputs = {"output": predict(self.model, rows).numpy()}
        else:
            mean, var = predict_mc(self.model, rows, int(n_samples))
            outputs = {"mean": mean.numpy(), "variance": var.numpy()}
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, a) for name, a in outputs.items()],
        )
