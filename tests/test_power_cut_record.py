"""docs/HELPER.md's power-cut figures are what the committed records say (tests/guest/test_power_cut.py appends one
JSON line per cut): the number of cuts, and how many since the last cut recovery got wrong came back exactly as
before the apply and exactly as committed, none with a journal quarantined."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\((bench/[\w.-]+-power-cuts\.jsonl)\)")
COUNT = re.compile(r"\*\*(\d+) cuts\*\*")
SINCE = re.compile(r"\*\*(\d+) of (\d+) cuts recovered\*\* \((\d+) as before, (\d+) as committed\)")
EXACT = ("before", "committed")


def test_the_power_cut_figures_in_the_helper_docs_are_the_committed_records() -> None:
    text = (ROOT / "docs/HELPER.md").read_text()
    section = text.split("**Power cuts**", 1)[1].split("\n\n", 1)[0]
    links = LINK.findall(section)
    assert links, "the power-cut paragraph links no JSONL record"
    rows = sorted((json.loads(line) for link in dict.fromkeys(links)
                   for line in (ROOT / "docs" / link).read_text().splitlines() if line.strip()),
                  key=lambda r: r["time"])
    assert [int(n) for n in COUNT.findall(section)] == [len(rows)], (COUNT.findall(section), len(rows))
    wrong = [i for i, r in enumerate(rows) if r["outcome"] not in EXACT]
    since = rows[wrong[-1] + 1:] if wrong else rows
    shown = SINCE.search(section)
    assert shown, "the paragraph does not say how many cuts since the last wrong one recovered"
    recovered, of, before, committed = map(int, shown.groups())
    outcomes = Counter(r["outcome"] for r in since)
    assert (recovered, of, before, committed) == (len(since), len(since), outcomes["before"], outcomes["committed"])
    assert not any(r["quarantined"] for r in since)
