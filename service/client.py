"""A Python client of the service's v1 API, on httpx: ``Client`` and ``AsyncClient``.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        y = client.predict("concrete", [[540, 0, 0, 162, 2.5, 1040, 676, 28]])
        mc = client.predict_mc("concrete", [[540, 0, 0, 162, 2.5, 1040, 676, 28]], seed=7)
        print(y, mc.mean, mc.std)

Answers come back as numpy arrays. A 503 (loading, or overloaded) is retried after its
``Retry-After``, a bounded number of times; any other error raises ``ServiceError`` with the
status and the server's message. Connections are reused across calls. Importing this module
loads no torch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

#: Seconds waited before retrying a 503 that names no Retry-After, and the most waited.
DEFAULT_RETRY_S, MAX_RETRY_S = 1.0, 30.0

Rows = Any  # rows of numbers: a list of lists or a 2-D array


class ServiceError(Exception):
    """An answer other than 200: its HTTP status and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class MCPrediction:
    """A Monte-Carlo dropout answer: arrays of ``(rows, outputs)``, or ``(rows,)`` per row;
    the fields of another task, of an uncalibrated model, of a coverage not asked for, or
    samples not asked for, are None.

    ``interval_lower`` and ``interval_upper`` (regression) or ``prediction_sets`` (a
    ``(rows, classes)`` boolean mask) come with ``coverage``; ``coverage_method`` says how
    they were made (``conformal`` from the model's held-out calibration, else ``gaussian``
    or ``probability``).
    """

    model: str
    version: str
    n_samples: int
    seed: int
    mean: np.ndarray
    variance: np.ndarray
    std: np.ndarray
    mc_standard_error: np.ndarray
    predictive_variance: np.ndarray | None = None
    entropy: np.ndarray | None = None
    mutual_information: np.ndarray | None = None
    calibrated_probabilities: np.ndarray | None = None
    interval_lower: np.ndarray | None = None
    interval_upper: np.ndarray | None = None
    prediction_sets: np.ndarray | None = None  # (rows, classes) bool
    coverage: float | None = None
    coverage_method: str | None = None
    ood_score: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None  # (rows,) bool
    samples: np.ndarray | None = None  # (T, rows, outputs)
    extra: dict[str, Any] = field(default_factory=dict)  # fields this client does not know

    @classmethod
    def from_json(cls, body: dict[str, Any], coverage: float | None = None) -> MCPrediction:
        """The answer from a v1 body; ``coverage``, the one asked for (v1 names it in an
        interval, not beside prediction sets)."""
        arrays: dict[str, Any] = {
            k: np.asarray(v, dtype=np.float32 if k == "samples" else np.float64)
            for k, v in body.items()
            if k in _ARRAYS
        }
        if "out_of_distribution" in body:
            arrays["out_of_distribution"] = np.asarray(body["out_of_distribution"], dtype=bool)
        interval = body.get("interval")
        if interval is not None:
            arrays["interval_lower"] = np.asarray(interval["lower"], dtype=np.float64)
            arrays["interval_upper"] = np.asarray(interval["upper"], dtype=np.float64)
            arrays["coverage"], arrays["coverage_method"] = interval["coverage"], interval["method"]
        sets = body.get("prediction_sets")
        if sets is not None:
            mask = np.zeros(np.shape(body["mean"]), dtype=bool)
            for row, members in enumerate(sets):
                mask[row, members] = True
            arrays["prediction_sets"] = mask
            arrays["coverage"], arrays["coverage_method"] = coverage, body["prediction_set_method"]
        known = {"model", "version", "n_samples", "seed", *_ARRAYS, *_STRUCTURED}
        extra = {k: v for k, v in body.items() if k not in known}
        return cls(
            model=body["model"],
            version=body["version"],
            n_samples=body["n_samples"],
            seed=body["seed"],
            **arrays,
            extra=extra,
        )


_ARRAYS = (
    "mean",
    "variance",
    "std",
    "mc_standard_error",
    "predictive_variance",
    "entropy",
    "mutual_information",
    "calibrated_probabilities",
    "ood_score",
    "samples",
)
_STRUCTURED = ("interval", "prediction_sets", "prediction_set_method", "out_of_distribution")


def _rows(inputs: Rows) -> list[list[float]]:
    rows = np.asarray(inputs, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[None, :]
    return rows.tolist()  # type: ignore[no-any-return]


def _mc_body(
    inputs: Rows,
    n_samples: int | None,
    seed: int | None,
    coverage: float | None,
    target_se: float | None,
    return_samples: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": _rows(inputs)}
    optional = {"n_samples": n_samples, "seed": seed, "coverage": coverage, "target_se": target_se}
    body.update({k: v for k, v in optional.items() if v is not None})
    if return_samples:
        body["return_samples"] = True
    return body


def _error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()
    except ValueError:
        return ServiceError(response.status_code, response.text[:500])
    detail = body.get("detail", body.get("error", body)) if isinstance(body, dict) else body
    if isinstance(detail, list):  # v1's 422: one entry per field
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in detail
        )
    return ServiceError(response.status_code, str(detail))


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(MAX_RETRY_S, max(0.0, float(response.headers["retry-after"])))
    except (KeyError, ValueError):
        return DEFAULT_RETRY_S


class _Base:
    def __init__(self, retries: int) -> None:
        self.retries = retries

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise _error(response)
        return response.json()


class Client(_Base):
    """A blocking client; use it as a context manager, or call ``close``."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        retries: int = 3,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(retries)
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, json=body)
            if response.status_code != 503 or attempt == self.retries:
                return self._answer(response)
            time.sleep(_retry_after(response))
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        """Whether every model is loaded (GET /readyz answers 200); never retried."""
        return self._http.get("/readyz").status_code == 200

    def models(self) -> list[dict[str, Any]]:
        """The metadata of every model served."""
        return list(self._call("GET", "/v1/models")["models"])

    def predict(self, model: str, inputs: Rows) -> np.ndarray:
        """Eval-mode outputs ``(rows, outputs)``: class probabilities for a classifier."""
        body = self._call("POST", f"/v1/models/{model}/predict", {"inputs": _rows(inputs)})
        return np.asarray(body["outputs"], dtype=np.float32)

    def predict_mc(
        self,
        model: str,
        inputs: Rows,
        n_samples: int | None = None,
        seed: int | None = None,
        coverage: float | None = None,
        target_se: float | None = None,
        return_samples: bool = False,
    ) -> MCPrediction:
        """Monte-Carlo dropout; the answer's ``seed`` replays it. ``coverage`` asks for
        intervals (or prediction sets), ``target_se`` for as many passes as that MC standard
        error needs (at most ``n_samples``)."""
        body = _mc_body(inputs, n_samples, seed, coverage, target_se, return_samples)
        answer = self._call("POST", f"/v1/models/{model}/predict/mc", body)
        return MCPrediction.from_json(answer, coverage)


class AsyncClient(_Base):
    """The same calls, awaited; use it as an async context manager, or await ``aclose``."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 60.0,
        retries: int = 3,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(retries)
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, path, json=body)
            if response.status_code != 503 or attempt == self.retries:
                return self._answer(response)
            await asyncio.sleep(_retry_after(response))
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/v1/models"))["models"])

    async def predict(self, model: str, inputs: Rows) -> np.ndarray:
        body = await self._call("POST", f"/v1/models/{model}/predict", {"inputs": _rows(inputs)})
        return np.asarray(body["outputs"], dtype=np.float32)

    async def predict_mc(
        self,
        model: str,
        inputs: Rows,
        n_samples: int | None = None,
        seed: int | None = None,
        coverage: float | None = None,
        target_se: float | None = None,
        return_samples: bool = False,
    ) -> MCPrediction:
        body = _mc_body(inputs, n_samples, seed, coverage, target_se, return_samples)
        answer = await self._call("POST", f"/v1/models/{model}/predict/mc", body)
        return MCPrediction.from_json(answer, coverage)
