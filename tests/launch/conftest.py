"""The llama.cpp workload for the launch tests: llama-cpp-python built once (tests/setup-llama.sh,
cached) and a tiny random-weight GGUF generated per session in a temp dir."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LLAMA_VENV = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv"))
LLAMA_CACHE = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build"))


@pytest.fixture(scope="session")
def llama_python() -> Path:
    """Python with llama-cpp-python[server]; the first run on a machine builds it (~6 min)."""
    subprocess.run([str(HERE.parent / "setup-llama.sh")], check=True, timeout=3600)
    return LLAMA_VENV / "bin" / "python"


@pytest.fixture(scope="session")
def tiny_model(llama_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """research test-environment.md §9 preset `tiny`: n_embd 256, 4 layers, 4/2 heads, Llama SPM vocab."""
    out = tmp_path_factory.mktemp("models") / "tiny.gguf"
    vocab = LLAMA_CACHE / "vocab" / "ggml-vocab-llama-spm.gguf"
    worker = HERE.parent.parent / "tuner" / "bench" / "worker.py"  # the bench's model writer, preset "tiny"
    subprocess.run([str(llama_python), str(worker), "model", "tiny", str(vocab), str(out)], check=True, timeout=120)
    return out


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An empty system policy directory: no /etc/autoglm-tune policy leaks into the tests."""
    path = tmp_path / "etc-autoglm"
    path.mkdir()
    return path
