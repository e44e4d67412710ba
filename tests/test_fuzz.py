"""Schema-driven fuzzing: schemathesis generates requests from the service's own OpenAPI
document and sends them over real HTTP to a live server. Every operation in the document is
covered, so endpoints added later are fuzzed without touching this file.

Checks: no 5xx; status codes, content types, headers and bodies as documented; bodies that
break the schema are refused with a 4xx. ``positive_data_acceptance`` is left out: a body can
match the schema and still be refused with 422 (a row of the wrong width for that model).

``make test`` runs FUZZ_EXAMPLES (default 15) examples per operation and mode; ``make fuzz``
runs many more.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.helpers import LiveServer, live_server, write_test_repository

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
SERVED = ["clf", "concrete", "deep", "tiny"]
NAME_MAX = 256  # ModelName's max_length: longer names are the negative cases, kept as drawn


def fuzz_settings(model_dir: Path) -> Settings:
    return Settings(model_dir=model_dir, max_rows=64, max_n_samples=2000)


# The document the live server serves at /openapi.json (test_schema_is_the_served_one checks
# it): building it needs no server and loads no model, so pytest can collect one test per
# operation.
schema = schemathesis.openapi.from_dict(create_app(fuzz_settings(ROOT / "models")).openapi())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES
)


@schema.hook
def flatmap_path_parameters(
    _: Any, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[Any]:
    """Send most requests to a served model: a random name only ever meets the 404."""
    name = (path_parameters or {}).get("name")
    if not isinstance(name, str) or len(name) > NAME_MAX:
        return st.just(path_parameters)
    served = st.sampled_from(SERVED).map(lambda n: {**(path_parameters or {}), "name": n})
    return st.one_of(served, st.just(path_parameters))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("fuzz-models")
    write_test_repository(root)
    shutil.copytree(ROOT / "models" / "concrete", root / "concrete")  # the schema's examples
    with live_server(fuzz_settings(root)) as s:
        yield s


def test_schema_is_the_served_one(fuzz_server: LiveServer) -> None:
    served = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    assert served == schema.raw_schema
    assert httpx.get(f"{fuzz_server.url}/readyz").json()["models"] == SERVED


@schema.parametrize()
def test_api_conforms_to_its_schema(case: schemathesis.Case, fuzz_server: LiveServer) -> None:
    case.call_and_validate(base_url=fuzz_server.url, excluded_checks=[positive_data_acceptance])


def test_fuzzing_reached_the_models(fuzz_server: LiveServer) -> None:
    """The cases above reached served models (the metrics label only those), not only 404s."""
    text = httpx.get(f"{fuzz_server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [
        s.labels
        for s in families["dropout_http_requests"].samples
        if s.name == "dropout_http_requests_total"
    ]
    assert any(s["endpoint"] == "/v1/models/{name}" and s["status"] == "200" for s in samples)
    for endpoint in ("/v1/models/{name}/predict", "/v1/models/{name}/predict/mc"):
        assert any(s["endpoint"] == endpoint and s["model"] in SERVED for s in samples), endpoint
