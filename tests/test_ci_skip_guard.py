"""The CI=true guard of tests/conftest.py: a skip fails the run, also one made while a module is collected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    "body",
    [
        "import pytest\n\ndef test_a():\n    pytest.skip('no real part')\n",
        "import pytest\n\npytest.skip('no real part', allow_module_level=True)\n\ndef test_a():\n    pass\n",
        "import pytest\n\npytest.importorskip('no_such_module_for_the_guard')\n\ndef test_a():\n    pass\n",
    ],
    ids=["in-a-test", "module-level", "importorskip"],
)
def test_a_skip_fails_the_run_under_ci(tmp_path: Path, body: str) -> None:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(body)
    (tmp_path / "test_other.py").write_text("def test_b():\n    pass\n")
    env = {**os.environ, "CI": "true"}
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "CI=true: 1 test(s) skipped, which is a failure here" in done.stdout
    quiet = subprocess.run(argv, capture_output=True, text=True, env={**env, "CI": "false"}, cwd=tmp_path,
                           timeout=120)
    assert quiet.returncode == 0, quiet.stdout  # outside CI a skip is only a skip
