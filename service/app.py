"""App factory: wires settings, routers, errors, middleware and the model-loading lifespan.

Importing this module loads no model and reads no environment; ``create_app`` does the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import __version__
from service.core.errors import install_error_handlers
from service.core.repository import ModelRepository
from service.protocols.http import health, v1, v2
from service.protocols.http.hotpath import FastPredict
from service.protocols.http.limits import BodyLimits, JSONGuard
from service.serving.dataplane import Runtime
from service.serving.metrics import Metrics
from service.serving.observe import Observed, configure_access_log, flush_access_log
from service.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Serves PyTorch MLPs with dropout.

* `predict`: eval mode, dropout off. The same input gives the same bits, always.
* `predict/mc`: Monte-Carlo dropout, T seeded stochastic passes: mean, variance and (for
  classifiers) entropy and mutual information. Send the returned `seed` back to replay.
* `compare`: eval, single train-mode passes and MC side by side, with timings: why
  production serves eval.
"""


async def load_models(app: FastAPI) -> None:
    """Load the repository off the event loop, then publish it (readiness flips to 200)."""
    settings: Settings = app.state.settings
    runtime: Runtime = app.state.runtime
    metrics: Metrics = app.state.metrics
    try:
        repo = await asyncio.to_thread(
            ModelRepository.load, settings.model_dir, app.state.device, settings.mc_mask
        )
    except Exception as exc:  # an unreadable repository: say so in /readyz, never hang there
        log.error("could not read the model repository %s", settings.model_dir, exc_info=exc)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        repo = ModelRepository(failures={"(repository)": f"could not be read: {reason}"})
    for model in repo:
        c = model.config
        metrics.model_info.labels(c.name, c.version, c.sha256, c.task).set(1)
    runtime.repository = repo


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The event loop computes only jobs under inline_max_macs, for which one thread is the
    # fastest (a team of two costs more to wake than it saves); the inference threads run
    # with the configured intra-op count (Runtime's pool initializer).
    torch.set_num_threads(1)
    app.state.device = app.state.settings.torch_device()  # a device it lacks stops the start
    app.state.metrics.torch_threads.set(app.state.settings.intra_op_threads())
    loading = asyncio.create_task(load_models(app))
    try:
        yield
    finally:
        loading.cancel()
        app.state.runtime.close()
        app.state.metrics.close()
        flush_access_log()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; ``settings`` defaults to the ``DROPOUT_*`` environment."""
    settings = settings or Settings()
    app = FastAPI(
        title="dropout-service", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.runtime = runtime = Runtime(settings, metrics)

    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    install_error_handlers(app)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def known_model(name: str) -> bool:
        return runtime.repository is not None and name in runtime.repository.models

    # Added first, so innermost: it buffers only what BodyLimits let through.
    app.add_middleware(JSONGuard, max_depth=settings.max_json_depth)
    routes = {getattr(route, "path", ""): route for route in v1.router.routes}
    app.add_middleware(
        FastPredict, runtime=runtime, routes=routes, max_json_depth=settings.max_json_depth
    )
    app.add_middleware(
        BodyLimits, max_bytes=settings.max_body_bytes, read_timeout_s=settings.read_timeout_s
    )
    configure_access_log()
    # Outermost: its request id, latency and status cover the whole answer.
    app.add_middleware(
        Observed, metrics=metrics, known_model=known_model, access_log=settings.access_log
    )
    return app
