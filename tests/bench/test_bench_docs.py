"""Every paired ratio docs/BENCHMARKS.md quotes in a part's "Further paired ratios" table, and every row of its
CPU hog table, is what tuner/bench/stats.py computes from that part's committed JSON, to the digits shown."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from autoglm_tune.bench.stats import paired_ratio

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = r"\**([\d.]+) \[([\d.]+)–([\d.]+)\]\**"
RATIO_ROW = re.compile(rf"^\| \**(?:(heavy|mild|fits|cpu|idle|cold|prompt) )?([\w-]+) ÷ ([\w-]+)\** \| {INTERVAL} \|$")
HOG_ROW = re.compile(rf"^\| ([\w-]+) \| {INTERVAL} \|$")


def _table_after(part: str, heading: str) -> list[str]:
    return part.split(heading, 1)[1].split("\n\n", 2)[1].splitlines() if heading in part else []


def _parts() -> list[tuple[list[dict[str, Any]], list[re.Match[str]], list[re.Match[str]]]]:
    text = (ROOT / "docs/BENCHMARKS.md").read_text()
    out = []
    for part in text.split("\n### Part ")[1:]:
        ratios = [m for line in _table_after(part, "Further paired ratios") if (m := RATIO_ROW.match(line))]
        hog = [m for line in _table_after(part, "The CPU hog's own progress") if (m := HOG_ROW.match(line))]
        if ratios or hog:
            link = re.search(r"\]\((bench/[\w.-]+\.json)\)", part)
            assert link, part[:80]
            out.append((json.loads((ROOT / "docs" / link.group(1)).read_text())["runs"], ratios, hog))
    return out


def _check(runs: list[dict[str, Any]], scenario: str | None, a: str, b: str, key: str, shown: tuple[str, ...],
           row: str) -> None:
    by = {(r["config"], r["round"]): r[key] for r in runs
          if r.get(key) and (scenario is None or r["scenario"] == scenario)}
    rounds = sorted({rnd for _, rnd in by})
    got = paired_ratio([(by[(a, r)], by[(b, r)]) for r in rounds if (a, r) in by and (b, r) in by])
    for text, value in zip(shown, (got["ratio"], got["low"], got["high"]), strict=True):
        assert f"{value:.{len(text.split('.')[1])}f}" == text, (row, got)


def test_quoted_ratios_are_the_jsons() -> None:
    parts = _parts()
    assert len(parts) >= 2 and all(ratios for _, ratios, _ in parts), parts  # the tables are found and parsed
    assert any(hog for _, _, hog in parts)
    for runs, ratios, hog in parts:
        for m in ratios:
            scenario, a, b, *shown = m.groups()
            _check(runs, scenario, a, b, "value", tuple(shown), m.group(0))
        for m in hog:
            config, *shown = m.groups()
            _check(runs, "cpu", config, "untuned", "hog_loops_s", tuple(shown), m.group(0))
