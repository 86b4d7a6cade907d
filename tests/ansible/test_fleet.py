"""Fleet use: the example playbook's facts play collects this machine's facts (three inventory hosts on
localhost, one per group) with each group's rendered policy, and `plan --facts DIR` plans a folder of collected
facts offline — this machine's and the real host snapshots' (../shared/hosts)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from ansible_parts import Ansible
from helper_parts import BIN, ROOT
from support import run_cli
from trees import build_tree, host_snapshots

EXAMPLES = ROOT / "ansible" / "examples"


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """No system policy files: only the built-in default and what a test passes."""
    etc = tmp_path / "etc-autoglm"
    etc.mkdir()
    return {"PATH": "/usr/bin:/bin", "AUTOGLM_TUNE_ETC": str(etc)}


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2 and proc.stdout == "", proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoglm-tune: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def facts_dir(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, cli_env: dict[str, str]) -> Path:
    """A folder of collected facts: every host snapshot (facts --json --sysroot), a desktop with NVMe and HDD
    swap under systemd (the only one with changes: the others run no systemd, so their units are left alone)
    and this machine."""
    folder = tmp_path / "facts"
    folder.mkdir()
    roots = {name: snapshot / "root" for name, snapshot in host_snapshots(tmp_path_factory).items()}
    roots["nvme-hdd-desktop"] = build_tree("nvme-hdd-swap", tmp_path / "tree")
    for name, root in roots.items():
        proc = run_cli("facts", "--json", "--sysroot", str(root), env=cli_env)
        assert proc.returncode == 0, proc.stderr
        (folder / f"{name}.json").write_text(proc.stdout)
    (folder / "this-machine.json").write_text(run_cli("facts", "--json", env=cli_env).stdout)
    (folder / "notes.txt").write_text("not a facts file: ignored\n")
    return folder


def test_plan_a_folder_of_facts_like_each_file_alone(facts_dir: Path, cli_env: dict[str, str]) -> None:
    batch = run_cli("plan", "--json", "--facts", str(facts_dir), env=cli_env)
    assert batch.returncode == 0, batch.stderr
    plans = json.loads(batch.stdout)
    files = sorted(p.name for p in facts_dir.glob("*.json"))
    assert list(plans) == files and len(files) >= 3
    for name, plan in plans.items():
        alone = run_cli("plan", "--json", "--facts", str(facts_dir / name), env=cli_env)
        assert alone.returncode == 0 and json.loads(alone.stdout) == plan, name
    assert any(plan["changes"] for plan in plans.values())

    text = run_cli("plan", "--facts", str(facts_dir), env=cli_env)
    assert text.returncode == 0 and text.stderr == ""
    blocks = text.stdout.split("\n")
    for name, plan in plans.items():
        header = f"{plan['host'] or 'unknown host'} ({name}): "
        [first] = [i for i, line in enumerate(blocks) if line.startswith(header)]
        n = len(plan["changes"])
        if n:
            assert blocks[first] == f"{header}{n} setting(s) differ from the plan:"
            listed = blocks[first + 1 : first + 1 + n]
            assert [line.split()[0] for line in listed] == [c["knob"] for c in plan["changes"]]
        else:
            assert blocks[first].startswith(f"{header}in sync")

    out = facts_dir.parent / "fleet-plan.json"
    written = run_cli("plan", "--json", "--facts", str(facts_dir), "-o", str(out), env=cli_env)
    assert written.returncode == 0 and written.stdout == "" and json.loads(out.read_text()) == plans


def test_a_bad_facts_file_in_the_folder_names_the_file_and_field(facts_dir: Path, cli_env: dict[str, str]) -> None:
    good = json.loads((facts_dir / "this-machine.json").read_text())
    broken = facts_dir / "zz-broken.json"
    broken.write_text(json.dumps({**good, "memory": {**good["memory"], "total_kib": "lots"}}))
    assert_one_line_error(run_cli("plan", "--facts", str(facts_dir), env=cli_env),
                          f"--facts {broken}", "facts.memory.total_kib: expected int")
    assert_one_line_error(run_cli("plan", "--json", "--facts", str(facts_dir), env=cli_env), f"--facts {broken}")
    broken.write_text("{not json")
    assert_one_line_error(run_cli("plan", "--facts", str(facts_dir), env=cli_env), f"--facts {broken}",
                          "not valid JSON")
    broken.unlink()
    assert_one_line_error(run_cli("plan", "--toml", "--facts", str(facts_dir), env=cli_env), "--toml writes one plan")
    assert_one_line_error(run_cli("plan", "--sysroot", "/", "--facts", str(facts_dir), env=cli_env),
                          "give one source of facts")
    empty = facts_dir.parent / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("plan", "--facts", str(empty), env=cli_env), f"--facts {empty}: no *.json file")


def test_example_playbook_collects_facts_and_group_policies_for_offline_review(
    ansible: Ansible, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    playbook = tmp_path / "examples" / "fleet.yml"
    shutil.copytree(EXAMPLES, playbook.parent)  # group_vars/ and templates/ beside the playbook, no facts/ left
    syntax = ansible.run("ansible-playbook", "--syntax-check", "-i", str(playbook.parent / "inventory.ini"),
                         str(playbook))
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr

    inventory = tmp_path / "localhost.ini"
    hosts = {"laptops": "laptop-local", "desktops": "desk-local", "servers": "srv-local"}
    inventory.write_text("".join(f"[{group}]\n{host} ansible_connection=local\n" for group, host in hosts.items())
                         + "[fleet:children]\n" + "\n".join(hosts) + "\n")
    facts = tmp_path / "collected"
    run = ansible.run("ansible-playbook", "-i", str(inventory), "--tags", "facts",
                      "-e", f"autoglm_bin={BIN}/autoglm-tune", "-e", f"autoglm_facts_dir={facts}", str(playbook))
    assert run.returncode == 0, run.stdout + run.stderr
    live = json.loads(run_cli("facts", "--json", env=cli_env).stdout)
    expected = {"laptops": ("batch", 5), "desktops": ("other", 0), "servers": ("batch", -5)}
    for group, host in hosts.items():
        collected = json.loads((facts / group / f"{host}.json").read_text())
        assert collected["hostname"] == live["hostname"] and collected["cpu"] == live["cpu"]
        review = run_cli("plan", "--json", "--facts", str(facts / group), "--policy", str(facts / f"{group}.toml"),
                         env=cli_env)
        assert review.returncode == 0, review.stderr
        process = json.loads(review.stdout)[f"{host}.json"]["process"]
        assert (process["sched_policy"], process["nice"]) == expected[group]
