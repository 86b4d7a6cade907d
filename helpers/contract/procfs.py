"""Parsers of /proc text, shared by the helper and the tuner: text in, values out, no I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass


def unescape(field: str) -> str:
    """/proc/swaps and mountinfo write space, tab, newline and backslash as octal escapes (\\040 etc.)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo → {name: value}, in KiB (HugePages_* are counts); lines without a number are left out."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name] = int(value[0])
    return out


@dataclass(frozen=True)
class SwapArea:
    """One row of /proc/swaps."""

    shown: str  # the Filename column as /proc/swaps writes it (octal escapes kept)
    path: str  # the same, unescaped
    type: str  # partition, file (lxcfs shows a container's limit as "none virtual")
    size_kib: int
    used_kib: int
    priority: int


def parse_swaps(text: str) -> list[SwapArea]:
    """/proc/swaps → its rows, in order (the header and short lines are left out)."""
    rows = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5:
            shown, kind, size, used, priority = fields[:5]
            rows.append(SwapArea(shown, unescape(shown), kind, int(size), int(used), int(priority)))
    return rows
