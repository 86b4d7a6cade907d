"""The installed `autoglm-tune` command end to end: outputs, formats and exit codes."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import tomllib
from pathlib import Path

import pytest
from autoglm_helper.contract.plan_schema import changes_from_plan
from support import CLI
from support import run_cli as run
from trees import build_tree


@pytest.fixture(autouse=True)
def isolated_etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No system policy: the tests see the built-in default plus what they pass."""
    etc = tmp_path / "etc-autoglm"
    etc.mkdir()
    monkeypatch.setenv("AUTOGLM_TUNE_ETC", str(etc))
    return etc


def policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoglm-tune: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_plan_json_contract_on_this_machine() -> None:
    proc = run("plan", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert changes_from_plan(plan) is not None  # the helper would accept it as it is
    for change in plan["changes"]:
        assert {"knob", "current", "target", "persistence", "reason"} <= set(change)
        assert change["persistence"] in ("runtime", "persistent")
        assert change["reason"]
        if change["knob"] == "swap.priority":
            assert change["area"].startswith("/")
    cpus = plan["process"]["cpus"]
    assert cpus == sorted(cpus) and set(cpus) <= os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    assert isinstance(plan["process"]["threads"], int) and plan["process"]["threads"] >= 1


def test_plan_toml_and_output_file_say_the_same_as_json(tmp_path: Path) -> None:
    as_json = json.loads(run("plan", "--json").stdout)
    out = tmp_path / "plan.toml"
    proc = run("plan", "--toml", "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == ""
    as_toml = tomllib.loads(out.read_text())
    assert as_toml["plan_id"] == as_json["plan_id"]
    assert [c["knob"] for c in as_toml["changes"]] == [c["knob"] for c in as_json["changes"]]
    assert as_toml["process"] == as_json["process"]


def test_facts_file_plans_like_the_live_machine(tmp_path: Path) -> None:
    facts = run("facts", "--json")
    assert facts.returncode == 0
    path = tmp_path / "facts.json"
    path.write_text(facts.stdout)
    live = json.loads(run("plan", "--json").stdout)
    offline = json.loads(run("plan", "--json", "--facts", str(path)).stdout)
    assert offline == live


def test_diff_exit_status_follows_the_plan(tmp_path: Path) -> None:
    proc = run("diff", "--json")
    body = json.loads(proc.stdout)
    assert proc.returncode == (0 if body["in_sync"] else 1)
    assert body["in_sync"] == (body["changes"] == [])
    # A policy that keeps everything leaves nothing to do: in sync, exit 0.
    keep_all = policy(
        tmp_path,
        '[vm]\nswappiness = "keep"\nvfs_cache_pressure = "keep"\npage-cluster = "keep"\n'
        '[zswap]\nenabled = "keep"\ncompressor = "keep"\nmax_pool_percent = "keep"\nshrinker_enabled = "keep"\n'
        '[swap]\nprioritize = false\nfile = "off"\n'
        "[services]\ndisable = []\n",
    )
    proc = run("diff", "--policy", keep_all)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("in sync")


def test_diff_text_is_plain_when_piped_and_coloured_on_a_terminal(tmp_path: Path) -> None:
    piped = run("diff", "--policy", policy(tmp_path, "[vm]\nswappiness = 1\n"))
    assert piped.returncode == 1
    assert "vm.swappiness" in piped.stdout and "\x1b[" not in piped.stdout

    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal
        os.execv(CLI, [CLI, "diff", "--policy", str(tmp_path / "policy.toml")])
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 1
    assert "vm.swappiness" in screen and "\x1b[" in screen


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["plan", "--sysroot", "/nonexistent-root"], ["--sysroot /nonexistent-root", "not a directory"]),
        (["plan", "--sysroot", "/etc/hostname"], ["--sysroot /etc/hostname"]),
        (["plan", "--facts", "/nonexistent.json"], ["--facts /nonexistent.json", "cannot read"]),
        (["plan", "--facts", "/etc/hostname"], ["not valid JSON"]),
        (["plan", "--json", "--toml"], ["--json and --toml"]),
        (["plan", "--sysroot", "/", "--facts", "/etc/hostname"], ["give one source of facts"]),
        (["diff", "--policy", "/nonexistent.toml"], ["/nonexistent.toml: no such policy file"]),
        (["facts", "--policy", "/nonexistent.toml"], ["no such policy file"]),
        (["plan", "-o", "/nonexistent-dir/plan.json"], ["-o /nonexistent-dir/plan.json", "cannot write"]),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(run(*args), *needles)


def test_bad_facts_files(tmp_path: Path) -> None:
    good = json.loads(run("facts", "--json").stdout)
    cases = {
        "version": ({**good, "version": 99}, "facts version 99 is not supported; allowed: 1"),
        "type": ({**good, "memory": {**good["memory"], "total_kib": "lots"}}, "facts.memory.total_kib: expected int"),
        "unknown": ({**good, "colour": "blue"}, "facts.colour: unknown field"),
        "missing": ({k: v for k, v in good.items() if k != "cpu"}, "facts.cpu: missing"),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        assert_one_line_error(run("plan", "--facts", str(path)), f"--facts {path}", needle)


def test_bad_policy_through_the_cli_changes_nothing_and_names_the_key(tmp_path: Path) -> None:
    before = run("facts", "--json").stdout
    proc = run("diff", "--policy", policy(tmp_path, "[vm]\nswappiness = 500\n"))
    assert_one_line_error(proc, "[vm] swappiness = 500", "allowed: an integer 0–200")
    assert json.loads(run("facts", "--json").stdout)["knobs"] == json.loads(before)["knobs"]


def test_units_are_left_alone_where_systemd_is_not_pid_1(tmp_path: Path) -> None:
    """A container, WSL or a plain VM: the helper cannot change units there, so the plan holds none (apply
    would otherwise refuse the whole plan) and a note says why."""
    root = build_tree("no-swap-4g", tmp_path / "root")  # cups, bluetooth, ModemManager: disabled with systemd
    with_systemd = json.loads(run("plan", "--json", "--sysroot", str(root)).stdout)
    assert any(c["knob"] == "unit" for c in with_systemd["changes"])
    (root / "run/systemd/system").rmdir()
    proc = run("plan", "--json", "--sysroot", str(root))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [c for c in plan["changes"] + plan["unchanged"] if c["knob"] == "unit"] == []
    assert any("services left alone: systemd is not PID 1" in n for n in plan["notes"]), plan["notes"]


def test_more_threads_than_online_cpus_is_bad_input(tmp_path: Path) -> None:
    """The policy cannot know the CPU count; the plan can: threads beyond the online CPUs is exit 2, here and for a
    fleet's facts folder (naming the host's file)."""
    root = build_tree("smt-2c4t", tmp_path / "root")  # 4 online CPUs
    ok = run("plan", "--json", "--sysroot", str(root), "--policy", policy(tmp_path, "[process]\nthreads = 4\n"))
    assert ok.returncode == 0 and json.loads(ok.stdout)["process"]["threads"] == 4, ok.stderr
    too_many = policy(tmp_path, "[process]\nthreads = 1000\n")
    needles = ["[process] threads = 1000", "4 online CPUs", 'allowed: an integer 1–4 or "auto"']
    assert_one_line_error(run("plan", "--sysroot", str(root), "--policy", too_many), *needles)
    fleet = tmp_path / "facts"
    fleet.mkdir()
    (fleet / "laptop.json").write_text(run("facts", "--json", "--sysroot", str(root)).stdout)
    in_fleet = run("plan", "--facts", str(fleet), "--policy", too_many)
    assert_one_line_error(in_fleet, f"--facts {fleet / 'laptop.json'}: ", *needles)


@pytest.mark.parametrize(
    ("text", "warned"),
    [
        ("[vm]\nswappiness = 20\n[zswap]\nenabled = true\n", True),  # the blog recipe, in front of the disk swap
        ("[vm]\nswappiness = 60\n[zswap]\nenabled = true\n", True),
        ("[vm]\nswappiness = 61\n[zswap]\nenabled = true\n", False),
        ("[vm]\nswappiness = 20\n[zswap]\nenabled = false\n", False),
        ("[vm]\nswappiness = 20\n", False),  # zswap auto: left off
        ('[vm]\nswappiness = "keep"\n[zswap]\nenabled = true\n', True),  # the kernel's 60 stays, zswap turned on
        ("[zswap]\nenabled = true\n", False),  # swappiness auto: 133 with zswap
    ],
)
def test_low_swappiness_with_zswap_is_a_conflict(tmp_path: Path, text: str, warned: bool) -> None:
    """Measured: the recipe's swappiness 20 with zswap OOM-killed the desktop; the plan and diff say so."""
    root = build_tree("nvme-hdd-swap", tmp_path / "root")
    proc = run("plan", "--json", "--sysroot", str(root), "--policy", policy(tmp_path, text))
    assert proc.returncode == 0, proc.stderr
    conflicts = [c for c in json.loads(proc.stdout)["conflicts"] if c.startswith("vm.swappiness")]
    assert len(conflicts) == warned, conflicts
    if warned:
        for needle in ("with zswap on: measured to OOM-kill the desktop", "5 of 5 heavy runs",
                       "docs/bench/2026-11-26-heavy-mild.json", "0.4 tok/s", "docs/BENCHMARKS.md"):
            assert needle in conflicts[0]
        diff = run("diff", "--sysroot", str(root), "--policy", str(tmp_path / "policy.toml"))
        assert f"conflict: {conflicts[0]}" in diff.stdout


def test_unknown_flag_is_a_usage_error_without_traceback() -> None:
    proc = run("plan", "--bogus")
    assert proc.returncode == 2
    assert "No such option: --bogus" in proc.stderr and "Traceback" not in proc.stderr


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    proc = run("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"autoglm-tune {version('autoglm-tune')}\n"


def test_diff_does_not_load_the_version_machinery() -> None:
    """--version imports importlib.metadata on use only: `diff`'s start-up stays as measured (README)."""
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoglm_tune", "diff"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    assert "importlib.metadata" not in proc.stderr


def test_diff_loads_only_the_bench_command_s_options() -> None:
    """`bench` registers its options on every start; its machinery (the autoglm_tune.bench subpackage's other
    modules) is imported on use only."""
    import re
    import sys

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoglm_tune", "diff"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    loaded = set(re.findall(r"\|\s*(autoglm_tune\.bench\S*)$", proc.stderr, re.MULTILINE))
    assert loaded == {"autoglm_tune.bench", "autoglm_tune.bench.cli"}


HEAVY_FOR_DIFF = ("psutil", "jinja2", "tomli_w", "dbus_fast", "rich", "pydantic", "asyncio", "statistics")


def test_diff_imports_no_heavy_module(tmp_path: Path) -> None:
    """`diff` imports none of the heavy modules other commands use (psutil for `status`, jinja2 for
    units, tomli_w for --toml, dbus-fast for the bus, statistics for calibrate): its start-up stays as measured."""
    import sys

    env = {"PATH": "/usr/bin:/bin", "AUTOGLM_TUNE_ETC": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "autoglm_tune", "diff"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode in (0, 1), proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "autoglm_tune.planner" in imported
    on_systemd = Path("/run/systemd/system").is_dir()  # there diff reads unit states over the bus: dbus-fast, asyncio
    heavy = {m for m in HEAVY_FOR_DIFF if not (on_systemd and m in ("dbus_fast", "asyncio"))}
    assert not {m for m in imported if m.split(".")[0] in heavy}, sorted(imported)


def test_bad_plan_files_exit_2_naming_the_file(tmp_path: Path) -> None:
    from autoglm_helper.contract.plan_schema import MAX_PLAN_BYTES

    cases = {
        "empty.json": (b"", "is empty"),
        "blank.toml": (b"\n  \n", "is empty"),
        "latin1.toml": ("note = 'Größe'".encode("latin-1"), "not UTF-8 text"),
        "broken.toml": (b"version = = 1", "not a TOML plan"),
        "broken.json": (b"{\"version\": 1,", "not a JSON plan"),
        "list.json": (b"[1, 2]", "not a plan object"),
        "date.toml": (b"version = 1\nchanges = []\nplan_id = 1979-05-27\n", "not a TOML plan"),
        "big.json": (b" " * (MAX_PLAN_BYTES + 1), f"larger than {MAX_PLAN_BYTES} bytes"),
        "old.toml": (b"version = 7\nchanges = []\n", "plan.version: 7 is not supported"),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        proc = run("apply", "--plan", str(path), "--yes")
        assert_one_line_error(proc, f"--plan {path}", needle)
        assert "plan --toml -o FILE" in proc.stderr or "allowed: 1" in proc.stderr
    assert_one_line_error(run("apply", "--plan", str(tmp_path), "--yes"), f"--plan {tmp_path}: cannot read")


def test_a_toml_plan_with_nothing_to_change_is_in_sync(tmp_path: Path) -> None:
    """A saved TOML plan is read like the JSON one; with no changes nothing is sent to any helper."""
    keep = policy(tmp_path, '[vm]\nswappiness = "keep"\nvfs_cache_pressure = "keep"\npage-cluster = "keep"\n'
                  '[zswap]\nenabled = "keep"\ncompressor = "keep"\nmax_pool_percent = "keep"\n'
                  'shrinker_enabled = "keep"\n[swap]\nprioritize = false\nfile = "off"\n[services]\ndisable = []\n')
    saved = tmp_path / "plan.toml"
    assert run("plan", "--policy", keep, "--toml", "-o", str(saved)).returncode == 0
    proc = run("apply", "--plan", str(saved), "--yes", env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/x"})
    assert proc.returncode == 0 and proc.stdout == "in sync: nothing to change\n", proc


def test_helper_unreachable_names_the_bus_and_what_to_start(tmp_path: Path) -> None:
    socket = tmp_path / "no-such-bus"
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"}
    for args in (("status",), ("verify",), ("rollback", "--yes")):
        proc = run(*args, env=env)
        assert proc.returncode == 5 and proc.stdout == "", proc
        line = proc.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"system bus unix:path={socket} (from DBUS_SYSTEM_BUS_ADDRESS)" in line
        assert "'sudo autoglm-tune system install'" in line and "dbus is running" in line


def readme_options() -> dict[str, set[str]]:
    """README's table of common options: option → the commands it lists for it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| option | commands | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in table.strip().splitlines()[1:]]
    return {opt.strip().strip("`").split()[0]: {c.strip(" `") for c in cmds.split(",")} for opt, cmds in rows}


def test_every_command_takes_exactly_the_options_the_readme_table_says() -> None:
    table = readme_options()
    assert set(table) == {"--policy", "--sysroot", "--facts", "--json"}
    commands = ("facts", "plan", "diff", "apply", "rollback", "status", "verify", "launch", "bench", "calibrate",
                "system")
    for command in commands:
        helptext = run(command, "--help").stdout
        for option, takers in table.items():
            assert ((f"  {option} " in helptext) or (f"  {option}\n" in helptext)) == (command in takers), (
                command, option)


def test_status_and_verify_accept_policy(tmp_path: Path) -> None:
    """--policy is parsed and validated there too: a bad policy is exit 2 before the helper is asked."""
    bad = policy(tmp_path, "[vm]\nswappiness = 500\n")
    for command in ("status", "verify"):
        assert_one_line_error(run(command, "--policy", bad), "[vm] swappiness = 500")



COUNT_BUILT = """
import sys, typer.main as m
built = []
build = m.get_command_from_info
m.get_command_from_info = lambda *a, **k: (built.append(1), build(*a, **k))[1]
whole = sys.argv[1] == "--whole"
sys.argv = ["autoglm-tune", *sys.argv[1 + whole:]]
from autoglm_tune.cli import app, main
try:
    app() if whole else main()
except SystemExit as exc:
    print(f"exit {exc.code}")
print(f"built {len(built)}", file=sys.stderr)
"""


def _built(*args: str) -> tuple[str, str, int]:
    """stdout, stderr and how many commands typer built, for `autoglm-tune ARGS` through main() (or the whole
    app, with --whole first)."""
    import sys

    proc = subprocess.run([sys.executable, "-c", COUNT_BUILT, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100", "TYPER_USE_RICH": "0"})
    err, count = proc.stderr.rsplit("built ", 1)
    return proc.stdout, err, int(count)


@pytest.mark.parametrize("args", [["diff", "--help"], ["plan", "--bogus"], ["system", "--help"], ["dif"], ["--help"]])
def test_only_the_named_command_is_built_and_it_behaves_as_in_the_whole_app(args: list[str]) -> None:
    """main() builds the one command named on the line (typer's reading of every signature is part of diff's
    start-up); what the user sees is what the whole app says."""
    out, err, built = _built(*args)
    whole_out, whole_err, whole = _built("--whole", *args)
    assert (out, err) == (whole_out, whole_err)
    assert "Usage: autoglm-tune" in out + err, (out, err)
    assert whole > 10
    if args[0] in ("diff", "plan"):
        assert built == 1
    elif args[0] == "system":
        assert 1 < built < whole
    else:
        assert built == whole
