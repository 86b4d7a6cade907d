#!/usr/bin/env bash
# llama.cpp's own `llama-server` for the guest test host, built on this machine from the llama.cpp source
# vendored in the llama-cpp-python sdist that tests/setup-llama.sh downloads (research: guest-test-host.md).
# The guest's CPU model has no AVX, and its glibc (2.41) is newer than the host's: so no AVX/FMA/F16C, no
# -march=native, libstdc++/libgcc linked statically, no OpenMP (ggml's own thread pool), no curl.
# `host` builds for this machine instead (the bench): portable AVX2 as tests/setup-llama.sh builds the wheel
# (not -march=native: the CI VM advertises AMX and does not allow it), with OpenMP as llama.cpp's default
# build has it, and llama-bench beside llama-server.
# Cached under $CACHE/llama-server[-host]-<version>-<hash of this recipe>; prints the binary's path.
set -euo pipefail
VARIANT=${1:-guest}
case "$VARIANT" in
    guest) CPU_FLAGS="-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF -DGGML_OPENMP=OFF"
           TARGETS=(llama-server); suffix="" ;;
    host) CPU_FLAGS="-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=ON"
          TARGETS=(llama-server llama-bench); suffix="-host" ;;
    *) echo "build-llama-server.sh: unknown variant '$VARIANT'; allowed: guest, host" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
VERSION=0.3.36  # the same sdist as tests/setup-llama.sh
LLAMA_CACHE=${AUTOGLM_LLAMA_CACHE:-/opt/llama-build}
CACHE=${AUTOGLM_GUEST_CACHE:-/var/cache/autoglm-tune-test}
SDIST="$LLAMA_CACHE/dl/llama_cpp_python-$VERSION.tar.gz"
hash=$(sha256sum "$0" | cut -c1-12)
out="$CACHE/llama-server$suffix-$VERSION-$hash"
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
    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF $CPU_FLAGS \
    -DGGML_AVX512=OFF -DGGML_BMI2=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DCMAKE_EXE_LINKER_FLAGS="-static-libgcc -static-libstdc++" >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target "${TARGETS[@]}" -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
mkdir -p "$out.tmp"
for target in "${TARGETS[@]}"; do install -m 0755 "$work/build/bin/$target" "$out.tmp/$target"; done
echo "built in $(( $(date +%s) - start )) s on $(nproc) CPUs" > "$out.tmp/built"
mv "$out.tmp" "$out"
echo "$out/llama-server"
