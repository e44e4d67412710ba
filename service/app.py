"""App factory: the data plane, the HTTP front doors on it, and the lifespan that loads the
models and runs the gRPC front door beside HTTP.

Importing this module loads no model and reads no environment; ``create_app`` does the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from service import __version__
from service.protocols.http import health, playground, repository, v1, v2
from service.protocols.http.errors import install_error_handlers
from service.protocols.http.hotpath import HotPath
from service.protocols.http.limits import BodyLimits, JSONGuard
from service.protocols.http.middleware import Observed
from service.serving.dataplane import DataPlane
from service.serving.metrics import Metrics
from service.serving.observe import configure_access_log, flush_access_log
from service.settings import Settings

DESCRIPTION = """\
Serves PyTorch MLPs with dropout.

* `predict`: eval mode, dropout off. The same input gives the same bits, always.
* `predict/mc`: Monte-Carlo dropout, T seeded stochastic passes: mean, variance and (for
  classifiers) entropy and mutual information. Send the returned `seed` back to replay.
* `compare`: eval, single train-mode passes and MC side by side, with timings: why
  production serves eval.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    plane: DataPlane = app.state.plane
    # Jobs small enough run on the event loop, with one intra-op thread like every pass.
    torch.set_num_threads(1)
    device = settings.torch_device()  # a device this machine lacks stops the start here
    plane.metrics.torch_threads.set(settings.intra_op_threads())
    loading = asyncio.create_task(plane.load(device))
    grpc_server = None
    try:
        if settings.grpc_port:  # imported here: grpc costs nothing where it is off
            from service.protocols.grpc import server as grpc_door

            grpc_server = await grpc_door.start(plane, settings)
        yield
    finally:
        if grpc_server is not None:
            # uvicorn has drained HTTP by now; calls in flight get as long as a deadline.
            await grpc_server.stop(grace=settings.request_timeout_s)
        loading.cancel()
        plane.close()
        plane.metrics.close()
        flush_access_log()


class ServiceApp(FastAPI):
    """FastAPI behind a front: every HTTP request passes ``front`` first (``Observed``: its
    id, metrics and access line; ``BodyLimits``; ``HotPath``: the hot routes), and what the
    front passes on meets FastAPI's own layers (``behind``). The hot routes need none of
    those layers (the server-error page, the telemetry and body-limit wrappers), which cost
    a one-row request about 15 us in process (docs/benchmarks.md)."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http":
            await self.front(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def behind(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself: its middleware, routes and error handlers."""
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> ServiceApp:
    """Build the service; ``settings`` defaults to the ``DROPOUT_*`` environment."""
    settings = settings or Settings()
    app = ServiceApp(
        title="dropout-service", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    metrics = Metrics()
    app.state.plane = plane = DataPlane(settings, metrics)

    app.include_router(playground.router)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    app.include_router(repository.router)
    app.include_router(v2.catch_all(v2.router, repository.router))  # last: any other /v2/...
    install_error_handlers(app)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def known_model(name: str) -> bool:
        return plane.repository is not None and name in plane.repository.models

    # Innermost: it buffers only what BodyLimits let through, for FastAPI's routes.
    app.add_middleware(JSONGuard, max_depth=settings.max_json_depth)
    routes = {getattr(r, "path", ""): r for r in [*v1.router.routes, *v2.router.routes]}
    hot = HotPath(app.behind, plane=plane, routes=routes, max_json_depth=settings.max_json_depth)
    limited = BodyLimits(
        hot, max_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s
    )
    configure_access_log()
    # Outermost: its request id, latency and status cover the whole answer.
    app.front = Observed(
        limited, metrics=metrics, known_model=known_model, access_log=settings.access_log
    )
    return app
