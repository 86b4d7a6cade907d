"""Every paired ratio docs/BENCHMARKS.md quotes in a part's "Further paired ratios" table is what
tuner.bench_stats computes from that part's committed JSON, to the digits shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

from autoglm_tune.bench_stats import paired_ratio

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| \**([\w-]+) ÷ ([\w-]+)\** \| \**([\d.]+) \[([\d.]+)–([\d.]+)\]\** \|$")


def _sections() -> list[tuple[Path, list[re.Match[str]]]]:
    text = (ROOT / "docs/BENCHMARKS.md").read_text()
    out = []
    for part in text.split("\n### Part ")[1:]:
        if "Further paired ratios" not in part:
            continue
        json_path = ROOT / "docs" / re.search(r"\]\((bench/[\w.-]+\.json)\)", part).group(1)  # type: ignore[union-attr]
        table = part.split("Further paired ratios", 1)[1].split("\n\n", 2)[1]
        out.append((json_path, [m for line in table.splitlines() if (m := ROW.match(line))]))
    return out


def _same(shown: str, value: float) -> bool:
    digits = len(shown.split(".")[1])
    return f"{value:.{digits}f}" == shown


def test_quoted_ratios_are_the_jsons() -> None:
    sections = _sections()
    assert sections and all(rows for _, rows in sections), sections  # the table is found and parsed
    for json_path, rows in sections:
        runs = json.loads(json_path.read_text())["runs"]
        by = {(r["config"], r["round"]): r["value"] for r in runs if r.get("value")}
        rounds = sorted({rnd for _, rnd in by})
        for m in rows:
            a, b, *shown = m.groups()
            pairs = [(by[(a, r)], by[(b, r)]) for r in rounds if (a, r) in by and (b, r) in by]
            got = paired_ratio(pairs)
            for text, value in zip(shown, (got["ratio"], got["low"], got["high"]), strict=True):
                assert _same(text, value), (json_path.name, m.group(0), got)
