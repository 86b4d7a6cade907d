"""The autoglm.tune.autoglm_tune module in a real playbook on localhost (connection local, as root), driving the
installed CLI and the real root helper on the private bus: check mode, diff mode, idempotence, rollback through
the module, the model service unit, and bad input as a clean failure."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ansible_parts import Ansible
from helper_parts import BIN, ROOT, Helper, live, read_knobs


def env_for(helper: Helper, tmp_path: Path) -> dict[str, str]:
    """The module's environment: the private bus, and no system policy files (only the test's policy)."""
    etc = tmp_path / "etc-autoglm"
    etc.mkdir(exist_ok=True)
    return {"DBUS_SYSTEM_BUS_ADDRESS": helper.bus.address, "AUTOGLM_TUNE_ETC": str(etc)}


def kernel_policy() -> tuple[dict[str, Any], dict[str, Any]]:
    """A policy that moves vm and zswap knobs away from their live values and touches nothing else (no swap file,
    no swap priorities, no units); returns (policy, the targets per knob)."""
    swappiness, pressure, cluster = live("vm.swappiness"), live("vm.vfs_cache_pressure"), live("vm.page-cluster")
    pool, enabled = live("zswap.max_pool_percent"), live("zswap.enabled")
    targets = {
        "vm.swappiness": swappiness + 7 if swappiness <= 193 else swappiness - 7,
        "vm.vfs_cache_pressure": pressure + 1 if pressure < 1000 else pressure - 1,
        "vm.page-cluster": cluster - 1 if cluster > 0 else 1,
        "zswap.max_pool_percent": pool + 1 if pool < 100 else pool - 1,
    }
    if not enabled:  # switched on, not off: the planner leaves zswap's other parameters alone while it is off
        targets["zswap.enabled"] = True
    policy = {
        "vm": {"swappiness": targets["vm.swappiness"], "vfs_cache_pressure": targets["vm.vfs_cache_pressure"],
               "page-cluster": targets["vm.page-cluster"]},
        "zswap": {"enabled": True, "compressor": "keep",
                  "max_pool_percent": targets["zswap.max_pool_percent"], "accept_threshold_percent": "keep",
                  "shrinker_enabled": "keep"},
        "swap": {"prioritize": False, "file": "off"},
        "services": {"disable": []},
    }
    return policy, targets


def model_section(tmp_path: Path) -> dict[str, Any]:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a real model, but a readable file")
    return {"preset": "llama-server", "program": "/bin/true", "model_path": str(model), "port": 18089,
            "keep_resident": "none", "memory_fit": "off"}


def test_check_apply_again_diff_and_rollback(helper: Helper, ansible: Ansible, tmp_path: Path) -> None:
    env = env_for(helper, tmp_path)
    policy, targets = kernel_policy()
    policy["model"] = model_section(tmp_path)
    unit = tmp_path / "autoglm-model.service"
    args = {"policy": policy, "model_unit": str(unit), "executable": str(BIN / "autoglm-tune")}
    before = read_knobs()

    check = ansible.playbook(args, env, "--check", "--diff")
    assert check.rc == 0, check.stdout + check.stderr
    assert check.recap()["changed"] == 1 and check.result["changed"] is True
    assert check.result["result"] == "dry-run" and check.result["unit"] == {"path": str(unit), "changed": True}
    assert read_knobs() == before and not unit.exists()  # check mode changed nothing
    assert not (helper.state_dir / "tx").exists() or not list((helper.state_dir / "tx").glob("*.json"))
    for knob in targets:
        assert f'"{knob}"' in check.stdout, f"--diff does not name {knob}"

    real = ansible.playbook(args, env, "--diff")
    assert real.rc == 0, real.stdout + real.stderr
    assert real.recap()["changed"] == 1 and real.result["result"] == "committed" and real.result["txid"]
    assert {knob: live(knob) for knob in targets} == targets
    assert {c["subject"] for c in real.result["changes"]} == set(targets)
    [knob_diff, unit_diff] = real.result["diff"]
    assert knob_diff["before"] == {k: check.result["diff"][0]["before"][k] for k in targets}
    assert knob_diff["after"] == targets
    assert unit.read_text() == unit_diff["after"] and "ExecStart=/bin/true" in unit.read_text()
    for knob in targets:
        assert f'"{knob}"' in real.stdout

    again = ansible.playbook(args, env, "--diff")
    assert again.rc == 0 and again.recap()["changed"] == 0, again.stdout
    assert again.result["result"] == "unchanged" and again.result["unit"]["changed"] is False
    assert "diff" not in again.result
    check_again = ansible.playbook(args, env, "--check")
    assert check_again.rc == 0 and check_again.recap()["changed"] == 0, check_again.stdout

    # a second transaction on top of the first: rolled_back undoes both, newest first
    policy["vm"]["swappiness"] = targets["vm.swappiness"] - 1  # never the original value: that is 7 away
    more = ansible.playbook({**args, "policy": policy}, env)
    assert more.rc == 0 and more.result["changed"] is True, more.stdout
    assert [c["subject"] for c in more.result["changes"]] == ["vm.swappiness"]

    back_args = {"state": "rolled_back", "executable": str(BIN / "autoglm-tune")}
    back_check = ansible.playbook(back_args, env, "--check", "--diff")
    assert back_check.rc == 0 and back_check.recap()["changed"] == 1, back_check.stdout
    assert back_check.result["txids"] == [more.result["txid"], real.result["txid"]]
    assert back_check.result["diff"][0]["before"]["vm.swappiness"] == policy["vm"]["swappiness"]
    assert back_check.result["diff"][0]["after"] == {k: knob_diff["before"][k] for k in targets}
    assert live("vm.swappiness") == policy["vm"]["swappiness"]  # check mode undid nothing
    back = ansible.playbook(back_args, env, "--diff")
    assert back.rc == 0 and back.recap()["changed"] == 1, back.stdout
    assert back.result["result"] == "rolled-back" and back.result["txids"] == back_check.result["txids"]
    assert read_knobs() == before
    back_again = ansible.playbook(back_args, env)
    assert back_again.rc == 0 and back_again.recap()["changed"] == 0, back_again.stdout
    assert back_again.result["result"] == "unchanged"


def test_bad_policy_fails_with_the_cli_message(helper: Helper, ansible: Ansible, tmp_path: Path) -> None:
    env = env_for(helper, tmp_path)
    policy = tmp_path / "bad.toml"
    policy.write_text("[vm]\nswappiness = 300\n")
    before = read_knobs()
    run = ansible.playbook({"policy_file": str(policy), "executable": str(BIN / "autoglm-tune")}, env)
    assert run.rc != 0 and run.recap()["failed"] == 1, run.stdout
    cli = subprocess.run([str(BIN / "autoglm-tune"), "apply", "--yes", "--policy", str(policy)],
                         env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and cli.stderr.startswith("autoglm-tune: error: ")
    assert run.result["failed"] is True and run.result["rc"] == 2
    assert run.result["msg"] == cli.stderr.strip().removeprefix("autoglm-tune: error: ")
    assert "swappiness" in run.result["msg"] and "Traceback" not in run.stdout + run.stderr
    assert read_knobs() == before

    toml = ansible.playbook({"policy": policy.read_text(), "executable": str(BIN / "autoglm-tune")}, env)
    assert toml.rc != 0 and toml.result["rc"] == 2
    assert toml.result["msg"] == run.result["msg"].replace(str(policy), "policy")  # not the temporary file's name

    inline = ansible.playbook({"policy": {"vm": {"swappiness": None}}, "executable": str(BIN / "autoglm-tune")}, env)
    # a mapping goes to the CLI as JSON, which names the key like any policy file (null is what JSON says)
    assert inline.rc != 0 and inline.result["rc"] == 2, inline.result
    assert inline.result["msg"].startswith("policy: [vm] swappiness = null: ") and "allowed" in inline.result["msg"]
    assert read_knobs() == before


def module_spec() -> dict[str, Any]:
    """The module's ARGUMENT_SPEC, read from its file (ansible_collections is a namespace package under ansible/)."""
    sys.path.insert(0, str(ROOT / "ansible"))
    try:
        module = importlib.import_module("ansible_collections.autoglm.tune.plugins.modules.autoglm_tune")
    finally:
        sys.path.remove(str(ROOT / "ansible"))
    return module.ARGUMENT_SPEC


def test_documentation_matches_the_module(ansible: Ansible) -> None:
    """ansible-doc parses DOCUMENTATION, EXAMPLES and RETURN, and documents every parameter with its type."""
    proc = ansible.run("ansible-doc", "--json", "autoglm.tune.autoglm_tune")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)["autoglm.tune.autoglm_tune"]
    options = {name: (o["type"], o.get("default"), o.get("choices")) for name, o in doc["doc"]["options"].items()}
    spec = {name: (o["type"], o.get("default"), o.get("choices")) for name, o in module_spec().items()}
    assert options == spec and "state" in spec
    assert doc["examples"] and {"changed", "changes", "diff", "msg", "rc"} <= set(doc["return"])
