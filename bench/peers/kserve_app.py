"""The concrete model behind KServe's Python model server (a ``kserve.Model``, as its docs
show): v1 ``POST /v1/models/concrete:predict`` with ``{"instances": rows}`` (and
``"parameters": {"n_samples": T}`` for MC), and v2 ``POST /v2/models/concrete/infer``."""

from __future__ import annotations

import sys
from typing import Any

import torch
from common import load, predict, predict_mc
from kserve import InferRequest, InferResponse, Model, ModelServer


class Concrete(Model):  # type: ignore[misc]
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        self.model = load()
        self.ready = True
        return True

    async def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        if isinstance(payload, InferRequest):  # the v2 protocol
            rows = torch.as_tensor(payload.inputs[0].as_numpy(), dtype=torch.float32)
            n_samples = (payload.parameters or {}).get("n_samples")
            if n_samples is None:
                outputs = {"output": predict(self.model, rows).numpy()}
            else:
                mean, var = predict_mc(self.model, rows, int(n_samples))
                outputs = {"mean": mean.numpy(), "variance": var.numpy()}
            response = InferResponse(
                response_id=payload.id or "", model_name=self.name, infer_outputs=[]
            )
            from kserve import InferOutput

            for name, array in outputs.items():
                out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
                out.set_data_from_numpy(array, binary_data=False)
                response.outputs.append(out)
            return response
        rows = torch.tensor(payload["instances"], dtype=torch.float32)
        n_samples = payload.get("parameters", {}).get("n_samples")
        if n_samples is None:
            return {"predictions": predict(self.model, rows).tolist()}
        mean, var = predict_mc(self.model, rows, int(n_samples))
        return {"predictions": mean.tolist(), "variance": var.tolist()}


if __name__ == "__main__":
    server = ModelServer(http_port=int(sys.argv[1]), grpc_port=int(sys.argv[2]), workers=1,
                         enable_grpc=False)  # fmt: skip
    server.start([Concrete("concrete")])
