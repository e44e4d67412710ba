"""The concrete model behind LitServe (a ``LitAPI``, as its docs show). POST /predict with
``{"inputs": rows}``, and ``"n_samples": T`` for MC dropout."""

from __future__ import annotations

import sys

import litserve as ls
import torch
from common import load, predict, predict_mc


class ConcreteAPI(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.model = load()

    def decode_request(self, request: dict) -> tuple[torch.Tensor, int | None]:  # type: ignore[type-arg]
        return torch.tensor(request["inputs"], dtype=torch.float32), request.get("n_samples")

    def predict(self, x: tuple[torch.Tensor, int | None]) -> dict:  # type: ignore[type-arg]
        rows, n_samples = x
        if n_samples is None:
            return {"outputs": predict(self.model, rows).tolist()}
        mean, var = predict_mc(self.model, rows, n_samples)
        return {"mean": mean.tolist(), "variance": var.tolist()}

    def encode_response(self, output: dict) -> dict:  # type: ignore[type-arg]
        return output


if __name__ == "__main__":
    server = ls.LitServer(ConcreteAPI(), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), generate_client_file=False)
