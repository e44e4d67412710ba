"""The docs say what the code does: every setting and metric has its row, the README's
benchmark sentences are the ones `make bench` wrote into docs/benchmarks.md, links resolve."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.serving.metrics import Metrics
from service.settings import Settings
from tests.helpers import ROOT

HEADLINE = re.compile(
    r"<!-- headline: written by make bench \(bench/report\.py\) -->\n(.*?)<!-- /headline -->",
    re.DOTALL,
)


def rows(page: str) -> dict[str, str]:
    """First cell (without backticks) -> the whole row, for every table row of ``page``."""
    table = [x for x in (ROOT / page).read_text().splitlines() if x.startswith("| `")]
    return {line.split("|")[1].strip().strip("`"): line for line in table}


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_has_a_row_with_its_default(name: str) -> None:
    variable = f"DROPOUT_{name.upper()}"
    table = rows("docs/settings.md")
    assert variable in table, f"docs/settings.md has no row for {variable}"
    default = Settings.model_fields[name].default
    if default is not None:
        shown = (
            str(default).lower()
            if isinstance(default, bool)
            else f"{default:g}"
            if (isinstance(default, float))
            else str(default)
        )
        assert f"`{shown}`" in table[variable], (variable, shown)


def test_every_metric_has_a_row() -> None:
    metrics = Metrics()
    names = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    table = rows("docs/operations.md")
    documented = {re.sub(r"_total$", "", name) for name in table}
    assert names <= documented, names - documented


def test_the_readme_headline_is_the_one_make_bench_wrote() -> None:
    readme = HEADLINE.search((ROOT / "README.md").read_text())
    bench = HEADLINE.search((ROOT / "docs" / "benchmarks.md").read_text())
    assert readme is not None
    assert bench is not None, "docs/benchmarks.md has no headline: run make bench"
    assert readme.group(1).strip()
    assert readme.group(1) == bench.group(1)


@pytest.mark.parametrize(
    "page", ["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_to_files_resolve(page: str) -> None:
    text = (ROOT / page).read_text()
    folder = (ROOT / page).parent
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (folder / target).exists(), f"{page} links to {target}, which does not exist"
