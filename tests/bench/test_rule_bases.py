"""The figures tuner/rules.py's bases quote come from the committed JSON they name: every docs/bench file a basis
cites exists, and reserve_cores' ratios are what bench.stats computes from bench/threads_contention.py's runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from autoglm_tune import rules
from autoglm_tune.bench.stats import paired_ratio

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"docs/bench/[\w.-]+\.json")


def test_every_json_a_basis_cites_is_committed() -> None:
    cited = set(CITED.findall((ROOT / "tuner" / "rules.py").read_text()))
    assert len(cited) >= 3, cited  # the pattern finds the citations
    assert sorted(c for c in cited if not (ROOT / c).is_file()) == []


def shown(runs: dict[str, list[dict[str, float]]], a: str, b: str) -> str:
    """The paired a ÷ b tok/s ratio with its 95 % interval, to 3 significant digits, as a basis writes it."""
    got = paired_ratio([(x["tok_s"], y["tok_s"]) for x, y in zip(runs[a], runs[b], strict=True)])
    return f"{got['ratio']:.3g}× [{got['low']:.3g}–{got['high']:.3g}]"


APART, TOGETHER = rules.THREADS_APART, rules.THREADS_TOGETHER


@pytest.mark.parametrize(("cores", "source", "a", "b"), [
    (2, APART, "alone, all but one", "alone, all CPUs"),
    (2, APART, "busy loop, all but one", "busy loop, all CPUs"),
    (2, TOGETHER, "busy loop, all CPUs, nice -10", "busy loop, all but one"),
    (3, APART, "busy loop, all but one", "busy loop, all CPUs"),
    (3, APART, "busy loop, all CPUs, nice -10", "busy loop, all but one"),
    (3, TOGETHER, "busy loop, all CPUs, nice -10", "busy loop, all but one"),
])
def test_reserve_cores_quotes_its_json(cores: int, source: str, a: str, b: str) -> None:
    _, basis = rules.reserve_cores(cores, 0)
    assert source in basis, basis
    runs = json.loads((ROOT / source).read_text())["runs"]
    assert shown(runs, a, b) in basis, (basis, shown(runs, a, b))
