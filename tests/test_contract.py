"""The helper's contract (autoglm_helper.contract) is pure and is all the tuner imports of the helper."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from autoglm_helper.contract import bus, procfs
from autoglm_tune.helper_client import HELPER_ERRORS

REPO = Path(__file__).resolve().parents[1]
CONTRACT = "autoglm_helper.contract"


def test_importing_the_contract_pulls_in_no_bus_library_and_no_other_helper_module() -> None:
    code = ("import sys, autoglm_helper.contract.bus, autoglm_helper.contract.catalogue, "
            "autoglm_helper.contract.plan_schema, autoglm_helper.contract.procfs\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('dbus_fast', 'autoglm_helper')))))")
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert not [m for m in loaded if m.startswith("dbus_fast")]
    assert [m for m in loaded if m != "autoglm_helper" and not m.startswith(CONTRACT)] == []


def test_the_contract_imports_only_the_standard_library_and_itself() -> None:
    for path in sorted((REPO / "helpers" / "contract").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            outside = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names]
            assert not outside, f"{path.name}:{node.lineno} imports {outside}"


def _helper_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every helper module a tuner file imports, wherever the import statement is."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            # `from autoglm_helper import x` may name a module x: count it as autoglm_helper.x
            bare = node.module == "autoglm_helper"
            found += [(node.lineno, f"{node.module}.{a.name}" if bare else node.module) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "autoglm_helper"]


def test_the_tuner_imports_nothing_of_the_helper_but_its_contract() -> None:
    outside = [f"{path.relative_to(REPO)}:{line} imports {name}"
               for path in sorted((REPO / "tuner").rglob("*.py"))
               for line, name in _helper_imports(ast.parse(path.read_text()))
               if name != CONTRACT and not name.startswith(CONTRACT + ".")]
    assert outside == []


def test_the_import_check_sees_a_service_import_inside_a_function() -> None:
    tree = ast.parse("def f():\n    from autoglm_helper.service import BUS_NAME\n"
                     "    from autoglm_helper import knobs\n")
    assert _helper_imports(tree) == [(2, "autoglm_helper.service"), (3, "autoglm_helper.knobs")]


def test_every_error_kind_has_its_exit_code_in_the_client() -> None:
    assert set(HELPER_ERRORS) == set(bus.ERROR_KINDS)


SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/nvme0n1p3                          partition\t8388604\t\t1024\t\t-2
/var/swap/my\\040swap\\134file               file\t\t1048572\t\t0\t\t10
none                                    virtual\t\t4194304\t0\t\t0
"""


def test_swaps_rows_keep_the_shown_name_and_unescape_the_path() -> None:
    rows = procfs.parse_swaps(SWAPS)
    assert [(r.shown, r.path, r.type, r.size_kib, r.used_kib, r.priority) for r in rows] == [
        ("/dev/nvme0n1p3", "/dev/nvme0n1p3", "partition", 8388604, 1024, -2),
        ("/var/swap/my\\040swap\\134file", "/var/swap/my swap\\file", "file", 1048572, 0, 10),
        ("none", "none", "virtual", 4194304, 0, 0),
    ]
    assert procfs.parse_swaps("Filename Type Size Used Priority\n") == []


def test_meminfo_is_in_kib_and_leaves_out_lines_without_a_number() -> None:
    text = "MemTotal:       16318412 kB\nMemAvailable:    9216004 kB\nHugePages_Total:       4\nOdd:\n"
    assert procfs.parse_meminfo(text) == {"MemTotal": 16318412, "MemAvailable": 9216004, "HugePages_Total": 4}


def test_the_live_proc_files_parse() -> None:
    assert procfs.parse_meminfo(Path("/proc/meminfo").read_text())["MemTotal"] > 0
    assert all(r.size_kib > 0 for r in procfs.parse_swaps(Path("/proc/swaps").read_text()))


def test_cpu_weight_is_the_nice_values_cfs_share_on_systemds_scale() -> None:
    from autoglm_helper.contract.catalogue import NICE_RANGE, cpu_weight

    assert (cpu_weight(0), cpu_weight(-10), cpu_weight(-5), cpu_weight(10), cpu_weight(19)) == (100, 932, 305, 11, 1)
    weights = [cpu_weight(n) for n in range(NICE_RANGE[0], NICE_RANGE[1] + 1)]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) > 35  # one nice step, about 1.25×
    assert all(1 <= w <= 10000 for w in weights)
