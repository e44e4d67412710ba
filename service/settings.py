"""Service settings: one class, one env prefix (``DROPOUT_``), validated ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.core.cpus import available_cpus


class Settings(BaseSettings):
    """Every knob of the service; read from ``DROPOUT_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="DROPOUT_", extra="forbid")

    model_dir: Path = Field(Path("models"), description="Model repository folder.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol over gRPC, beside HTTP (0: off).",
    )
    workers: int = Field(1, ge=1, le=64, description="Server processes.")
    max_rows: int = Field(1024, ge=1, le=1_000_000, description="Most rows in one request.")
    default_n_samples: int = Field(100, ge=2, description="MC samples when a request names none.")
    max_n_samples: int = Field(10_000, ge=2, le=1_000_000, description="Most MC samples.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads per worker over which a large MC request spreads its tiles; "
        "every pass computes on one core, so no answer depends on it (default: the cores "
        "this process may use, divided by the workers).",
    )
    inference_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Threads per worker running forward jobs off the event loop: as many for "
        "eval jobs and again for MC jobs.",
    )
    inline_max_macs: int = Field(
        2_000_000,
        ge=0,
        description="Forward jobs of at most this many multiply-adds (about 0.2 ms on one "
        "core) run on the event loop instead of a pool thread: the hand-off costs "
        "more than they do. 0 sends every job to the threads.",
    )
    inline_alone_max_macs: int = Field(
        16_000_000,
        ge=0,
        description="An MC job of at most this many multiply-adds (about 2 ms on one core) "
        "also runs on the event loop when its request is the only one in flight in the "
        "worker: nothing waits for the loop, and the hand-off to a thread and back costs "
        "a tenth of such a job. 0 turns this off.",
    )
    max_sample_values: int = Field(
        1_000_000, ge=1, description="Most values (T x rows x outputs) return_samples may send."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413 unread."
    )
    device: str = Field(
        "auto",
        pattern="^(auto|cpu|cuda(:[0-9]+)?)$",
        description="Torch device (auto: CUDA if present).",
    )
    allow_partial_ready: bool = Field(
        False, description="Report ready when some models failed to load (others still serve)."
    )
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    max_json_depth: int = Field(
        32,
        ge=2,
        le=256,  # well below Python's recursion limit, which the JSON parser would hit
        description="Deepest nesting of JSON arrays and objects in a body; deeper gets 422.",
    )
    batching: bool = Field(True, description="Coalesce concurrent eval requests per model.")
    max_batch_size: int = Field(
        64, ge=1, le=65_536, description="Most rows in one coalesced eval batch."
    )
    max_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="Longest wait after a batch's first request for more."
    )
    eval_block_rows: int = Field(
        16,
        ge=8,
        le=4096,
        multiple_of=8,
        description="Rows of every eval forward pass (zero-padded): what makes batching "
        "bit-exact. Checked per model at load on this machine; where a row's bits would move "
        "with its position, 64 rows, else one row per pass, with a warning.",
    )
    mc_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Eval first: while eval requests are being served, MC jobs take turns "
        "and compute at most this share of the time; 1 turns the priority off.",
    )
    max_queue_size: int = Field(
        256, ge=1, description="Most requests per model in progress at once; more get 503."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Deadline for a request's queueing and compute (504)."
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Deadline for a request's headers (from the connection's start or the "
        "request's first byte) and again for its body; past it 408 and the connection closes.",
    )
    max_connections: int = Field(
        1000, ge=1, description="Most open connections per worker; the next gets 503."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the model-control endpoints (/v2/repository/...); "
        "unset, they answer 403. Never logged.",
    )
    access_log: bool = Field(True, description="One JSON access-log line per request, stdout.")
    mc_mask: Literal["packed", "torch"] = Field(
        "torch",
        description="How MC draws dropout masks: packed (fast, exact Bernoulli) or torch "
        "(torch's bernoulli_, mask for mask). Part of what a seed replays.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Settings:
        if self.default_n_samples > self.max_n_samples:
            raise ValueError("default_n_samples must not exceed max_n_samples")
        return self

    def intra_op_threads(self) -> int:
        """Tile threads per worker: the setting, else the usable CPUs shared by the workers
        (a container's CPU quota, not the host's core count)."""
        return self.torch_threads or max(1, available_cpus() // self.workers)

    def torch_device(self) -> str:
        """The device to load models on; ``auto`` takes CUDA when torch sees one. Raises
        ``ValueError`` for a device this machine does not have."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(self.device.partition(":")[2] or 0)
            if index >= count:
                seen = f"{count} CUDA device(s)" if count else "no CUDA device"
                raise ValueError(
                    f"DROPOUT_DEVICE={self.device}, but torch {torch.__version__} sees {seen}; "
                    "use cpu, or auto to take CUDA only where present"
                )
        return self.device
