"""Memory stays bounded for the largest request: max n_samples with max rows."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Allowed growth of peak RSS over the process baseline (MiB). Without chunking, the
#: activations alone would take 10000 x 1024 x 64 x 4 bytes = 2.6 GB per layer.
BOUND_MIB = 300

SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from service.core.engine import MLPEngine
    from tests.helpers import deep_regression_config, random_tensors

    torch.set_num_threads(2)
    config = deep_regression_config(
        hidden=[32], dropout=[0.1], input_dropout=0.0, activation="relu"
    )
    engine = MLPEngine(config, random_tensors(config))
    x = torch.randn(1024, 4)
    engine.predict_mc(x, 2, seed=0)  # warm up allocator and kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = engine.predict_mc(x, 10_000, seed=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert bool(torch.isfinite(r.mean).all()) and bool((r.variance > 0).all())
    print((peak - base) / 1024)
    """
)


def test_max_samples_on_max_rows_stays_within_bound() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True
    )
    growth_mib = float(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth {growth_mib:.0f} MiB")
    assert growth_mib < BOUND_MIB, f"peak RSS grew by {growth_mib:.0f} MiB"
