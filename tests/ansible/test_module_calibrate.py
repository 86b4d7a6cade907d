"""The module's `calibrate: true` in a real playbook on localhost as root: check mode says it would calibrate and
measures nothing; a real run measures the tiny model with the host llama.cpp build, writes the drop-in and
applies the plan that uses it; a second run finds the drop-in fresh and changes nothing; a bad budget is the
CLI's one line with exit 2 and nothing written; calibrate with rolled_back is refused."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from ansible_parts import Ansible
from autoglm_tune.policy import load_policy
from helper_parts import BIN, ROOT, Helper
from test_module import env_for, kernel_policy

# the bench tests' fixtures: the host llama.cpp build (llama-bench beside llama-server) and the tiny model
_spec = importlib.util.spec_from_file_location("bench_fixtures", ROOT / "tests" / "bench" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
root, llama_python, llama_server, tiny_model = _bench.root, _bench.llama_python, _bench.llama_server, _bench.tiny_model


def test_calibrate_once_then_fresh_check_mode_and_bad_input(
    helper: Helper, ansible: Ansible, tmp_path: Path, llama_server: Path, tiny_model: Path
) -> None:
    env = env_for(helper, tmp_path)
    env["PATH"] = f"{llama_server.parent}:{BIN}:/usr/sbin:/usr/bin:/sbin:/bin"  # llama-bench found on PATH
    drop_in = Path(env["AUTOGLM_TUNE_ETC"]) / "policy.d" / "50-calibrated.toml"
    drop_in.parent.mkdir()
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_model, model)
    policy, _ = kernel_policy()
    args = {"policy": policy, "calibrate": True, "calibrate_output": str(drop_in), "calibrate_model": str(model),
            "calibrate_budget": "30s", "executable": str(BIN / "autoglm-tune")}

    check = ansible.playbook(args, env, "--check")
    assert check.rc == 0, check.stdout + check.stderr
    assert check.result["calibration"] == {"path": str(drop_in), "changed": True, "would_calibrate": True}
    assert not drop_in.exists()

    real = ansible.playbook(args, env)
    assert real.rc == 0, real.stdout + real.stderr
    cal = real.result["calibration"]
    assert cal["changed"] is True and cal["would_calibrate"] is True and real.result["changed"] is True
    assert cal["result"]["output"] == str(drop_in) and "drop_in" not in cal["result"]
    assert cal["result"]["nice"]["rounds"] >= 1  # as root the nice comparison ran
    values = load_policy(None, drop_in.parent.parent).calibration.values  # type: ignore[union-attr]
    assert values["model_path"] == str(model) and values["nice"] == cal["result"]["nice"]["nice"]
    text = drop_in.read_text()

    again = ansible.playbook(args, env)
    assert again.rc == 0 and again.recap()["changed"] == 0, again.stdout
    assert again.result["calibration"] == {"path": str(drop_in), "changed": False, "would_calibrate": False}
    assert drop_in.read_text() == text
    check_again = ansible.playbook(args, env, "--check")
    assert check_again.rc == 0 and check_again.recap()["changed"] == 0, check_again.stdout

    other = drop_in.with_name("60-calibrated.toml")
    bad = ansible.playbook({**args, "calibrate_output": str(other), "calibrate_budget": "soon"}, env)
    assert bad.rc != 0 and bad.result["rc"] == 2, bad.result
    assert bad.result["msg"] == "--budget 'soon': not a duration; allowed: seconds or minutes such as 120s, 90, 2m"
    assert not other.exists()

    back = ansible.playbook({"state": "rolled_back", "calibrate": True, "executable": str(BIN / "autoglm-tune")}, env)
    assert back.rc != 0 and back.result["msg"] == "calibrate: only with state=applied"
    assert ansible.playbook({"state": "rolled_back", "executable": str(BIN / "autoglm-tune")}, env).rc == 0
