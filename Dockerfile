# syntax=docker/dockerfile:1
# Production image of dropout-service. Build and run (docs/deploy.md has the rest):
#   docker build -t dropout-service .
#   docker run --rm -p 8000:8000 -p 8001:8001 dropout-service      (REST, gRPC)
# tests/test_container.py replays the build stage's commands and the runtime's entrypoint
# and health check outside Docker, so keep each step a plain RUN, ENV or exec-form command.

# -- build: a wheel of the package. Pure Python, so no compiler is needed at any stage. --
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir dist .

# -- runtime: the wheel and its pinned dependencies; no source tree, compiler or pip cache. --
FROM python:3.11-slim AS runtime
# PyPI's torch for Linux is the CUDA build (GBs of libraries a CPU service never loads): take
# torch alone from the CPU-only index. constraints.txt pins torch==2.13.0 for make and for
# this image alike; the 2.13.0+cpu build satisfies that pin, so the second install keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Bind mounts, not COPY: the wheel and constraints never become a layer of the image.
RUN --mount=type=bind,from=build,source=/src/dist,target=/tmp/dist \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    python -m venv /opt/venv \
    && pip install --no-cache-dir --no-deps --index-url "$TORCH_INDEX_URL" \
        -c /tmp/constraints.txt torch \
    && pip install --no-cache-dir -c /tmp/constraints.txt /tmp/dist/*.whl
# A fixed numeric uid and gid, so that Kubernetes' runAsNonRoot can check them.
RUN groupadd --system --gid 10001 dropout \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin dropout
WORKDIR /app
# Owned by root, read-only to the service. Mount your own repository over it, or anywhere
# with DROPOUT_MODEL_DIR pointing there.
COPY models ./models
ENV DROPOUT_HOST=0.0.0.0 \
    DROPOUT_PORT=8000 \
    DROPOUT_GRPC_PORT=8001 \
    DROPOUT_WORKERS=1 \
    DROPOUT_MODEL_DIR=/app/models
USER 10001:10001
# REST, and the Open Inference Protocol over gRPC.
EXPOSE 8000 8001
# The slim image has no curl; the venv's python checks liveness on the configured port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DROPOUT_PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and receives SIGTERM itself; it drains and exits 0.
# Settings come from the DROPOUT_* environment; arguments after the image name are added
# to `serve` (docker run IMAGE --workers 4).
ENTRYPOINT ["dropout-service", "serve"]
