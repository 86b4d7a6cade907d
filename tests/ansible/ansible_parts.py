"""Running ansible-playbook for the tests: the test venv's Ansible, the collection from ansible/, every file
Ansible writes kept under a temporary home."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helper_parts import BIN, ROOT

PLAYBOOK = Path(__file__).with_name("playbook.yml")


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    result: dict[str, Any]  # the module's registered result

    def recap(self) -> dict[str, int]:
        """The PLAY RECAP counters for localhost (ok, changed, failed, …)."""
        line = next(ln for ln in self.stdout.splitlines() if ln.startswith("localhost") and "changed=" in ln)
        return {k: int(v) for k, v in (f.split("=") for f in line.split(":", 1)[1].split())}


class Ansible:
    """ansible-playbook from the test venv, the collection from ansible/, its home and temp files under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "ANSIBLE_HOME": str(home / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_REMOTE_TEMP": str(home / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        }

    def run(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """An Ansible command (ansible-playbook, ansible, …) from the test venv."""
        return subprocess.run([str(BIN / command), *args], env=self.env, capture_output=True, text=True, timeout=300)

    def playbook(self, args: dict[str, Any], env: dict[str, str], *flags: str) -> Run:
        n = len(list(self.home.glob("vars-*.json")))
        result_file = self.home / f"result-{n}.json"
        variables = self.home / f"vars-{n}.json"
        variables.write_text(json.dumps({**args, "module_env": env, "result_file": str(result_file)}))
        proc = self.run("ansible-playbook", "-i", "localhost,", "-e", f"@{variables}", *flags, str(PLAYBOOK))
        assert result_file.exists(), proc.stdout + proc.stderr
        return Run(proc.returncode, proc.stdout, proc.stderr, json.loads(result_file.read_text()))
