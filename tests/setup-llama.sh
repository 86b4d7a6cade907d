#!/usr/bin/env bash
# The llama.cpp workload for tests/launch (research: test-environment.md §8-§9), built once and cached:
#   $CACHE/dl/      the llama-cpp-python sdist
#   $CACHE/wheels/  the portable AVX2 wheel built from it (~5-6 min on 2 cores, then reused)
#   $CACHE/vocab/   the Llama SPM vocabulary GGUF from the sdist (for generated test models)
#   $VENV           python with that wheel, the server extras, gguf and numpy
# A plain `pip install llama-cpp-python` builds with -march=native, which crashes with SIGILL on the CI
# VM (it advertises AMX but does not allow it); hence the explicit CMAKE_ARGS. A rerun takes < 1 s.
set -euo pipefail
VERSION=0.3.36
CACHE=${AUTOGLM_LLAMA_CACHE:-/opt/llama-build}
VENV=${AUTOGLM_LLAMA_VENV:-/opt/autoglm-llama-venv}
STAMP="$VENV/.autoglm-llama-$VERSION"
VOCAB="$CACHE/vocab/ggml-vocab-llama-spm.gguf"
SDIST="$CACHE/dl/llama_cpp_python-$VERSION.tar.gz"

if [ -f "$STAMP" ] && [ -f "$VOCAB" ]; then
    exit 0
fi
if ! command -v g++ >/dev/null || ! command -v cmake >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ cmake ninja-build >/dev/null
fi
mkdir -p "$CACHE/dl" "$CACHE/wheels" "$CACHE/vocab"
[ -x "$VENV/bin/pip" ] || /usr/bin/python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" -q --disable-pip-version-check)
[ -f "$SDIST" ] || "${PIP[@]}" download --no-deps --no-binary :all: -d "$CACHE/dl" "llama-cpp-python==$VERSION"

shopt -s nullglob
wheels=("$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "tests/setup-llama.sh: building llama-cpp-python $VERSION (portable AVX2, takes ~6 min once)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
        "${PIP[@]}" wheel --no-deps -w "$CACHE/wheels" "$SDIST"
    wheels=("$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl)
fi
"${PIP[@]}" install "${wheels[0]}[server]" "gguf==0.19.0" numpy
tar xzf "$SDIST" -C "$CACHE/vocab" --strip-components=4 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
chmod -R a+rX "$VENV" "$CACHE/vocab"
touch "$STAMP"
