# Copyright: autoglm-tune developers
# MIT License (see the project's pyproject.toml; ansible.module_utils.basic, which it imports, is BSD-2-Clause)

"""Ansible module autoglm.tune.autoglm_tune: a thin wrapper over the autoglm-tune CLI's JSON interface.

Everything is decided by the CLI and its root helper (apply --json, rollback --json, status --json, launch
--unit); this module maps their answers onto Ansible's conventions: check mode is the helper's dry-run, diff mode
shows before/after per knob, `changed` comes from the same report in both, and a CLI error is a module failure
carrying the CLI's one-line message and exit code.
"""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: autoglm_tune
short_description: Apply or roll back the autoglm-tune plan on a host; render its model service unit
version_added: "0.1.0"
description:
  - Plans the host's tuning from its facts and a policy and applies it through the autoglm-tune root helper
    over D-Bus (one journaled transaction, undone on failure), or rolls back what autoglm-tune applied.
  - Runs the C(autoglm-tune) command on the managed host, which must be installed there (with its helper's
    D-Bus and polkit files, C(autoglm-tune system install)); the task needs C(become) or a polkit rule.
  - In check mode the helper checks the plan against the live system (its dry-run) and nothing is written;
    C(changed) is computed from the same report in check mode and in a real run, so check mode predicts the
    real run and a second run reports no change.
  - Kernel-wide knobs (zswap, swap, vm sysctls) are left to the host kernel when autoglm-tune finds itself
    inside a container; the plan is then empty.
options:
  state:
    description:
      - C(applied) applies the plan made from this host's facts and the policy. Knobs already at their
        target are left alone; nothing to do is C(changed=false).
      - C(rolled_back) undoes every autoglm-tune transaction still applied, newest first, so the host is as it
        was before autoglm-tune; when nothing is applied this is C(changed=false).
    type: str
    choices: [applied, rolled_back]
    default: applied
  policy:
    description:
      - The policy inline, either as a mapping of sections (C(vm), C(zswap), C(swap), C(services), C(process),
        C(model)), written as JSON, or as TOML text. It is written to a temporary file on the host and passed as
        C(--policy), so it applies on top of the host's C(/etc/autoglm-tune/policy.toml) and
        C(policy.d/). Only the keys given change; see the project's C(policies/default.toml).
      - Mutually exclusive with O(policy_file).
    type: raw
  policy_file:
    description:
      - A policy file on the managed host (TOML, or JSON when its name ends in C(.json)), passed as C(--policy).
    type: path
  force:
    description:
      - Apply although a live value changed since the plan was made, or roll back although an applied
        value was changed since (the helper's C(force)).
    type: bool
    default: false
  model_unit:
    description:
      - Render the model server's systemd service (C(autoglm-tune launch --unit)) from the policy's
        C([model]) section and this host's plan (CPU set, threads, scheduling, nice, I/O class, OOM score)
        and write it to this path when its content differs (mode 0644). Enable and start it with
        M(ansible.builtin.systemd_service). Only with O(state=applied).
    type: path
  calibrate:
    description:
      - Before applying, measure the model on this host (C(autoglm-tune calibrate --json -o)) and write the
        choice (CPU set, threads and, as root, nice) to O(calibrate_output), which C(plan) then uses.
      - Runs only when O(calibrate_output) is missing or stale (another CPU topology or model file, as
        C(autoglm-tune facts --json) reports it), so a second run reports no change; delete the file to
        measure again. C(changed) when the file's content changes. In check mode nothing is measured; it reports
        C(would_calibrate) and C(changed) when a calibration would run. Only with O(state=applied).
    type: bool
    default: false
  calibrate_output:
    description: The policy drop-in calibrate writes (a C(.toml) file in a directory root may write).
    type: path
    default: /etc/autoglm-tune/policy.d/50-calibrated.toml
  calibrate_model:
    description: The GGUF model to measure (C(--model)); default the policy's C([model] model_path).
    type: path
  calibrate_budget:
    description: How long calibrate may measure (C(--budget)), such as C(120s) or C(2m).
    type: str
    default: 120s
  executable:
    description: The autoglm-tune command, a name on PATH or a full path.
    type: str
    default: autoglm-tune
notes:
  - Supports check mode and diff mode.
  - The helper is found on the system bus; C(DBUS_SYSTEM_BUS_ADDRESS) in the task's C(environment) points
    it at another bus (the project's tests use a private one).
requirements:
  - autoglm-tune on the managed host (Python 3.11 or newer)
author:
  - autoglm-tune developers (@autoglm-tune)
"""

EXAMPLES = r"""
- name: Tune the host for the local LLM server
  autoglm.tune.autoglm_tune:
    policy:
      vm: {swappiness: 133, page-cluster: 0}
      zswap: {enabled: true, compressor: [lz4, zstd, lzo-rle], max_pool_percent: 25}
      services: {disable: [cups.service, bluetooth.service]}
  become: true

- name: Apply a policy file already on the host and render the model service
  autoglm.tune.autoglm_tune:
    policy_file: /etc/autoglm-tune/fleet.toml
    model_unit: /etc/systemd/system/autoglm-model.service
  become: true

- name: Measure the model on each host once, then apply the plan that uses the measurement
  autoglm.tune.autoglm_tune:
    policy_file: /etc/autoglm-tune/fleet.toml
    calibrate: true
    calibrate_model: /var/lib/models/autoglm-phone-9b-q4_0.gguf
    calibrate_budget: 3m
  become: true

- name: Undo everything autoglm-tune applied
  autoglm.tune.autoglm_tune:
    state: rolled_back
  become: true
"""

RETURN = r"""
changed:
  description: Whether a knob changed (or, in check mode, would change); the unit file counts too.
  type: bool
  returned: always
result:
  description:
    - For O(state=applied) the helper's result, C(committed), C(unchanged) or C(dry-run).
    - For O(state=rolled_back) C(rolled-back), C(dry-run) or C(unchanged) (nothing was applied).
  type: str
  returned: success
  sample: committed
txid:
  description: The transaction applied (empty when nothing was committed).
  type: str
  returned: when O(state=applied)
  sample: 20261126-145446-cb0b40eb
txids:
  description: The transactions rolled back (or, in check mode, to be rolled back), newest first.
  type: list
  elements: str
  returned: when O(state=rolled_back)
changes:
  description:
    - Per knob the helper's report, C(subject), C(old) (the live value found), C(target), C(new) (read back
      after the write; null in check mode) and C(state). For O(state=rolled_back), the steps undone.
  type: list
  elements: dict
  returned: success
diff:
  description: With C(--diff), before/after per knob (and the unit file's text when it changes).
  type: list
  elements: dict
  returned: when diff mode is on and something changes
calibration:
  description:
    - With O(calibrate), C(path) (the drop-in), C(changed), C(would_calibrate) (a calibration was due, the
      drop-in was missing or stale) and, when one ran, C(result) (C(autoglm-tune calibrate --json)'s object,
      less its C(drop_in) text).
  type: dict
  returned: when O(calibrate) is true
unit:
  description: The model service unit written (or, in check mode, to be written), with C(path) and C(changed).
  type: dict
  returned: when O(model_unit) is set
rc:
  description: The exit code of the failing autoglm-tune command (2 bad input, 1 drift, 3 not authorized,
    4 failed and undone, 5 helper unreachable).
  type: int
  returned: failure
msg:
  description: The autoglm-tune command's one-line error.
  type: str
  returned: failure
"""

import json
import os
from typing import Any, NoReturn

from ansible.module_utils.basic import AnsibleModule

ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "state": {"type": "str", "choices": ["applied", "rolled_back"], "default": "applied"},
    "policy": {"type": "raw"},
    "policy_file": {"type": "path"},
    "force": {"type": "bool", "default": False},
    "model_unit": {"type": "path"},
    "calibrate": {"type": "bool", "default": False},
    "calibrate_output": {"type": "path", "default": "/etc/autoglm-tune/policy.d/50-calibrated.toml"},
    "calibrate_model": {"type": "path"},
    "calibrate_budget": {"type": "str", "default": "120s"},
    "executable": {"type": "str", "default": "autoglm-tune"},
}
UNDOABLE = ("committed", "conflict")  # transaction states the helper's Rollback accepts
TO_UNDO = ("done", "conflict", "failed")  # step states a rollback restores


class Tune:
    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        p = module.params
        exe = p["executable"]
        self.exe = exe if os.path.isabs(exe) else module.get_bin_path(exe, required=True)
        self.policy_args: list[str] = []
        self.inline_path = ""  # the temporary file an inline policy is written to; named "policy" in errors
        if p["policy_file"]:
            self.policy_args = ["--policy", p["policy_file"]]
        elif p["policy"] is not None:
            # TOML text as given; a mapping as JSON, which the CLI reads with the same schema (its name says which)
            inline = p["policy"]
            name, text = ("policy.toml", inline) if isinstance(inline, str) else ("policy.json", json.dumps(inline))
            self.inline_path = os.path.join(module.tmpdir, name)
            with open(self.inline_path, "w") as f:
                f.write(text)
            self.policy_args = ["--policy", self.inline_path]
        self.force = ["--force"] if p["force"] else []
        self.dry_run = ["--dry-run"] if module.check_mode else []

    def fail(self, rc: int, err: str, cmd: list[str], error: str | None = None) -> NoReturn:
        """A module failure with the command's one-line error as msg and its exit code as rc."""
        lines = err.strip().splitlines()
        msg = lines[-1].removeprefix("autoglm-tune: error: ") if lines else f"{cmd[1]} exited with {rc}"
        if self.inline_path:
            msg = msg.replace(self.inline_path, "policy")
        self.module.fail_json(msg=msg, rc=rc, error=error, cmd=cmd, stderr=err)

    def run(self, *args: str) -> dict[str, Any]:
        """Run autoglm-tune with --json; its object, or a module failure with its message and exit code."""
        rc, out, err = self.module.run_command([self.exe, *args, "--json"])
        try:
            data = json.loads(out) if out.strip() else {}
        except ValueError:
            data = {}
        if rc != 0:
            self.fail(rc, err, [self.exe, *args], data.get("error"))
        if not isinstance(data, dict) or not data:
            self.module.fail_json(msg=f"autoglm-tune {args[0]} printed no JSON object", rc=rc, stdout=out)
        for line in err.splitlines():  # what the CLI tells besides its JSON (e.g. changes left out of the plan)
            self.module.warn(line)
        return data

    def calibrated(self) -> dict[str, Any]:
        """Calibrate unless the drop-in is there and fresh (facts --json says); in check mode only say whether."""
        p = self.module.params
        path = p["calibrate_output"]
        cal = self.run("facts", *self.policy_args).get("calibration") or {}
        if cal.get("source") == path and not cal.get("stale"):
            return {"path": path, "changed": False, "would_calibrate": False}
        if self.module.check_mode:
            return {"path": path, "changed": True, "would_calibrate": True}
        before = _read(path)
        model = ["--model", p["calibrate_model"]] if p["calibrate_model"] else []
        result = self.run("calibrate", "-o", path, "--budget", p["calibrate_budget"], *model, *self.policy_args)
        result.pop("drop_in", None)
        return {"path": path, "changed": _read(path) != before, "would_calibrate": True, "result": result}

    def applied(self) -> dict[str, Any]:
        calibration = self.calibrated() if self.module.params["calibrate"] else None
        unit = self.render_unit() if self.module.params["model_unit"] else None
        report = self.run("apply", "--yes", *self.dry_run, *self.force, *self.policy_args)
        moved = [c for c in report["changes"] if c["old"] != c["target"]]
        result: dict[str, Any] = {"changed": report["changed"], "result": report["result"], "txid": report["txid"],
                                  "changes": report["changes"]}
        diffs = []
        if moved:
            diffs.append({"before_header": "live knobs", "after_header": "planned knobs",
                          "before": {c["subject"]: c["old"] for c in moved},
                          "after": {c["subject"]: c["target"] if c["new"] is None else c["new"] for c in moved}})
        if calibration is not None:
            result["calibration"] = calibration
            result["changed"] = result["changed"] or calibration["changed"]
        if unit is not None:
            result["unit"], unit_diff = unit
            result["changed"] = result["changed"] or result["unit"]["changed"]
            diffs += unit_diff
        if self.module._diff and diffs:
            result["diff"] = diffs
        return result

    def render_unit(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Render the model service to a temporary file (before anything changes); move it into place when it
        differs, unless in check mode."""
        path = self.module.params["model_unit"]
        rendered = os.path.join(self.module.tmpdir, "model.service")
        cmd = [self.exe, "launch", "--unit", "-o", rendered, *self.policy_args]
        rc, _out, err = self.module.run_command(cmd)
        if rc != 0:
            self.fail(rc, err, cmd)
        for line in err.splitlines():  # settings this host will refuse, and why
            self.module.warn(line)
        with open(rendered) as f:
            after = f.read()
        before = None
        if os.path.exists(path):
            with open(path) as f:
                before = f.read()
        changed = before != after
        if changed and not self.module.check_mode:
            os.chmod(rendered, 0o644)
            self.module.atomic_move(rendered, path)
        diff = [{"before_header": path, "after_header": path, "before": before or "", "after": after}]
        return {"path": path, "changed": changed}, diff if changed else []

    def rolled_back(self) -> dict[str, Any]:
        """Undo every transaction still applied, newest first; the diff is live value → value before autoglm-tune."""
        for option in ("model_unit", "calibrate"):
            if self.module.params[option]:
                self.module.fail_json(msg=f"{option}: only with state=applied")
        status = self.run("status")
        todo = [tx for tx in reversed(status["transactions"]) if tx["state"] in UNDOABLE]
        if not todo:
            return {"changed": False, "result": "unchanged", "txids": [], "changes": []}
        live = {a["subject"]: a["live"] for a in status["applied"]}
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        for tx in todo:
            for step in (s for s in tx["changes"] if s["state"] in TO_UNDO and s["subject"] in live):
                before[step["subject"]] = live[step["subject"]]
                after[step["subject"]] = step["old"]  # the oldest transaction's old value wins
        if self.module.check_mode:
            report = self.run("rollback", todo[0]["txid"], "--dry-run", *self.force)
            reports = [report]
        else:
            reports = [self.run("rollback", tx["txid"], "--yes", *self.force) for tx in todo]
        result: dict[str, Any] = {
            "changed": True,
            "result": reports[-1]["result"],
            "txids": [tx["txid"] for tx in todo],
            "changes": [c for r in reports for c in r["changes"]],
        }
        if self.module._diff and before:
            result["diff"] = [{"before_header": "live knobs", "after_header": "before autoglm-tune",
                               "before": before, "after": after}]
        return result


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def main() -> None:
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC, mutually_exclusive=[("policy", "policy_file")], supports_check_mode=True
    )
    tune = Tune(module)
    result = tune.applied() if module.params["state"] == "applied" else tune.rolled_back()
    module.exit_json(**result)


if __name__ == "__main__":
    main()
