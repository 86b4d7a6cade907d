#!/usr/bin/env bash
# llama.cpp's own `llama-server` for the guest test host, built on this machine from the llama.cpp source
# vendored in the llama-cpp-python sdist that tests/setup-llama.sh downloads (research: guest-test-host.md).
# The guest's CPU model has no AVX, and its glibc (2.41) is newer than the host's: so no AVX/FMA/F16C, no
# -march=native, libstdc++/libgcc linked statically, no OpenMP (ggml's own thread pool), no curl.
# Cached under $CACHE/llama-server-<version>-<hash of this recipe>; prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VERSION=0.3.36  # the same sdist as tests/setup-llama.sh
LLAMA_CACHE=${AUTOGLM_LLAMA_CACHE:-/opt/llama-build}
CACHE=${AUTOGLM_GUEST_CACHE:-/var/cache/autoglm-tune-test}
SDIST="$LLAMA_CACHE/dl/llama_cpp_python-$VERSION.tar.gz"
hash=$(sha256sum "$0" | cut -c1-12)
out="$CACHE/llama-server-$VERSION-$hash"
if [ -x "$out/llama-server" ]; then
    echo "$out/llama-server"
    exit 0
fi
[ -f "$SDIST" ] || "$here/../setup-llama.sh" >&2
[ -f "$SDIST" ] || { echo "build-llama-server.sh: no sdist at $SDIST" >&2; exit 1; }
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/llama.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar xzf "$SDIST" -C "$work" --strip-components=2 "llama_cpp_python-$VERSION/vendor/llama.cpp"
start=$(date +%s)
cmake -S "$work/llama.cpp" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF \
    -DGGML_AVX512=OFF -DGGML_BMI2=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DCMAKE_EXE_LINKER_FLAGS="-static-libgcc -static-libstdc++" >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
install -m 0755 "$work/build/bin/llama-server" "$out.tmp/llama-server"
echo "built in $(( $(date +%s) - start )) s on $(nproc) CPUs" > "$out.tmp/built"
mv "$out.tmp" "$out"
echo "$out/llama-server"
