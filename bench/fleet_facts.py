"""Write N facts files of varied shapes, as a fleet's `facts --json` folder would hold.

The shapes are every hand-made snapshot tree of tests/trees.py, every real host snapshot in
../shared/hosts and this machine, collected with the product's own collector. The snapshots hold no unit
files, so every host running systemd gets a share (the first 50-100 %) of this machine's unit files, as a
Debian host has a hundred or so. Each host then gets its own name, memory size and sysctl values, so no
two files are alike. The same N on the same machine gives the same files.

Usage: python3 bench/fleet_facts.py N DIR
"""

from __future__ import annotations

import json
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from autoglm_tune.collect import collect_facts  # noqa: E402
from trees import TREES, build_tree, host_tarballs  # noqa: E402

MEMORY_FACTORS = (0.5, 1, 2, 4, 8)
SWAPPINESS = ("60", "10", "100", "133", "1")
CACHE_PRESSURE = ("100", "50", "200")


def shapes(work: Path) -> dict[str, dict]:
    """Shape name → its facts as `facts --json` writes them."""
    roots = {name: build_tree(name, work / "trees" / name) for name in TREES}
    for tgz in host_tarballs():
        dest = work / "hosts" / tgz.name.removesuffix(".tgz")
        dest.mkdir(parents=True)
        with tarfile.open(tgz) as tar:
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        roots[dest.name] = dest / "root"
    roots["this-machine"] = Path("/")
    return {name: json.loads(collect_facts(root).to_json()) for name, root in roots.items()}


def vary(facts: dict, i: int, units: list[dict]) -> dict:
    """Host i of a shape: its own hostname, memory size, sysctl values and (under systemd) unit files."""
    out = json.loads(json.dumps(facts))
    if out["systemd_running"] and not out["units"]:
        out["units"] = units[: len(units) * (50 + i % 51) // 100]
    out["hostname"] = f"host-{i:05d}"
    mem = out["memory"]
    factor = MEMORY_FACTORS[i % len(MEMORY_FACTORS)]
    for key in ("total_kib", "available_kib"):
        if mem[key] is not None:
            mem[key] = int(mem[key] * factor)
    knobs = out["knobs"]
    if "vm.swappiness" in knobs:
        knobs["vm.swappiness"] = SWAPPINESS[(i // 3) % len(SWAPPINESS)]
    if "vm.vfs_cache_pressure" in knobs:
        knobs["vm.vfs_cache_pressure"] = CACHE_PRESSURE[(i // 7) % len(CACHE_PRESSURE)]
    return out


def write_fleet(n: int, folder: Path) -> list[str]:
    """Write host-00000.json … into `folder`; returns the shape names used, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = shapes(Path(tmp))
    names = sorted(base)
    units = base["this-machine"]["units"]
    for i in range(n):
        facts = vary(base[names[i % len(names)]], i, units)
        (folder / f"host-{i:05d}.json").write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return names


def main() -> None:
    if len(sys.argv) != 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__.strip().splitlines()[-1])
    used = write_fleet(int(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[1]} facts files in {sys.argv[2]} from {len(used)} shapes: {', '.join(used)}")


if __name__ == "__main__":
    main()
