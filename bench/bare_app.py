"""The framework's floor: a FastAPI app that parses the predict body and answers a constant.

It reads the body with the service's own pydantic schema, so the HTTP benchmark's gap between
this app and the service is what the service adds (routing, checks, tensors, encoding).
Run: uvicorn bare_app:app (from bench/).
"""

from __future__ import annotations

from fastapi import FastAPI, Response

from service.protocols.http.schemas_v1 import PredictRequest

ANSWER = b'{"model":"bare","version":"1","outputs":[[0.0]]}'

app = FastAPI()


@app.post("/predict")
async def predict(body: PredictRequest) -> Response:
    return Response(ANSWER, media_type="application/json")
