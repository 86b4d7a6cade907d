"""The collection as Ansible's own tools judge it: `ansible-test sanity` (validate-modules, pylint, pep8,
yamllint, import, ansible-doc, runtime-metadata, …) on ansible/ansible_collections/autoglm/tune, in the venv
tests/run prepares with ansible-test's pinned sanity requirements."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "ansible/ansible_collections/autoglm/tune"
SANITY_VENV = Path(os.environ.get("AUTOGLM_SANITY_VENV", "/opt/autoglm-sanity-venv"))
# ansible-test's HOME: its per-test venvs are kept there between runs (each installs from the package index once)
HOME = Path("/var/cache/autoglm-tune-test/ansible-test-home")
# ansible-test bootstraps pip into each venv with a get-pip.py it downloads from a host outside the package
# registries; this stand-in does the same from the standard library and the index
GET_PIP = '''"""Stand-in for ansible-test's get-pip.py: ensurepip, then the pip it asks for from the package index."""
import ensurepip, subprocess, sys
ensurepip.bootstrap()
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
'''


def _prepare_home() -> None:
    source = next(SANITY_VENV.glob("lib/python3*/site-packages/ansible_test/_internal/python_requirements.py"))
    pip = re.search(r"pip='([\d.]+)'", source.read_text())
    assert pip, source
    cache = HOME / ".ansible/test/cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"get_pip_{pip.group(1).replace('.', '_')}.py").write_text(GET_PIP)


def sanity(collection: Path, *only: str) -> subprocess.CompletedProcess[str]:
    _prepare_home()
    tests = [arg for name in only for arg in ("--test", name)]
    # the venv's own Python only: others on PATH (pyenv shims on the CI host) are not the users' and may not run
    version = next(SANITY_VENV.glob("lib/python3*")).name.removeprefix("python")
    return subprocess.run([str(SANITY_VENV / "bin/ansible-test"), "sanity", "--local", "--python", version,
                           "--color", "no", *tests], cwd=collection, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HOME": str(HOME)})


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The collection at an ansible_collections/NS/NAME path of its own, outside this repository's git."""
    dest = tmp_path / "ansible_collections/autoglm/tune"
    shutil.copytree(COLLECTION, dest, ignore=shutil.ignore_patterns("__pycache__", "tests/output"))
    return dest


def test_ansible_test_sanity_passes(copy: Path) -> None:
    if not (SANITY_VENV / "bin/ansible-test").exists():
        pytest.skip(f"{SANITY_VENV} is missing (tests/run makes it)")
    done = sanity(copy)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert 'Running sanity test "validate-modules"' in done.stdout + done.stderr


def test_sanity_notices_an_import_above_the_documentation(copy: Path) -> None:
    """The check can fail: the module with an import moved above DOCUMENTATION is refused."""
    if not (SANITY_VENV / "bin/ansible-test").exists():
        pytest.skip(f"{SANITY_VENV} is missing (tests/run makes it)")
    module = copy / "plugins/modules/autoglm_tune.py"
    text = module.read_text()
    module.write_text(text.replace("from __future__ import annotations\n",
                                   "from __future__ import annotations\n\nimport json  # noqa\n", 1))
    done = sanity(copy, "validate-modules")
    assert done.returncode != 0 and "import-before-documentation" in done.stdout + done.stderr, done.stdout[-3000:]
