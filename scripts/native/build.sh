#!/usr/bin/env bash
# Build the native runner cam-ort into <build dir> (default build/native): CMake + a C++17 compiler.
# ONNX Runtime: a user's install through onnxruntime_DIR (its CMake config folder) or
# ONNXRUNTIME_ROOT (a release archive or a prefix with include/ and lib/); otherwise
# fetch_ort.sh puts trixie's headers and the Python wheel's library under <build dir>/ort.
# stb_image.h: libstb-dev, or STB_ROOT. The build folder gets a copy of the ONNX Runtime library
# (CMakeLists.txt): it runs when copied to another machine.
# Environment: PYTHON (default .venv/bin/python, else python3), JOBS (default 2), CMAKE.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build/native}
mkdir -p "$build"
build=$(cd "$build" && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x "$python" ]] || python=python3
cmake=${CMAKE:-cmake}

args=(-S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release)
[[ -n "${STB_ROOT:-}" ]] && args+=("-DSTB_ROOT=$STB_ROOT")
if [[ -n "${onnxruntime_DIR:-}" ]]; then
    args+=("-Donnxruntime_DIR=$onnxruntime_DIR")
elif [[ -n "${ONNXRUNTIME_ROOT:-}" ]]; then
    args+=("-DONNXRUNTIME_ROOT=$ONNXRUNTIME_ROOT")
else
    "$root/scripts/native/fetch_ort.sh" "$build/ort" "$python"
    args+=("-DONNXRUNTIME_ROOT=$build/ort")
fi
"$cmake" "${args[@]}" >/dev/null
"$cmake" --build "$build" -j "${JOBS:-2}"
echo "$build/cam-ort"
