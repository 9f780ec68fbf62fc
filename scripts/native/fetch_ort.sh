#!/usr/bin/env bash
# ONNX Runtime for the native runner, without installing anything on the system:
#   <dest>/include  C/C++ headers of Debian trixie's libonnxruntime-dev (1.21), fetched with
#                   apt-get download into temporary apt state and unpacked with dpkg -x;
#   <dest>/lib      libonnxruntime.so.1 / .so -> the onnxruntime wheel's capi/libonnxruntime.so.*
#                   (plus its provider libraries, which ORT loads from its own folder).
# Older headers with a newer library work: ORT's C API is backwards compatible, never forwards.
# Usage: scripts/native/fetch_ort.sh <dest> [python]
set -euo pipefail
dest=${1:?usage: fetch_ort.sh <dest> [python]}
python=${2:-python3}
mkdir -p "$dest/lib"
dest=$(cd "$dest" && pwd)

# Without apt or the wheel, the user points the build at an ONNX Runtime.
give_up() {
    echo "fetch_ort: $1. Point the build at an ONNX Runtime instead:" >&2
    echo "  ONNXRUNTIME_ROOT=<prefix with include/ and lib/> make native   (e.g. a release" \
        "archive from https://github.com/microsoft/onnxruntime/releases, unpacked)" >&2
    echo "  onnxruntime_DIR=<folder of onnxruntimeConfig.cmake> make native" >&2
    exit 1
}
capi=$("$python" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))' \
    2>/dev/null)/capi || give_up "no onnxruntime Python package for $python (PYTHON=...)"

if [[ ! -f "$dest/include/onnxruntime_cxx_api.h" ]]; then
    command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
        give_up "no apt-get / dpkg to fetch the ONNX Runtime headers"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian trixie main" >"$tmp/trixie.list"
    apt_opts=(
        -o "Dir::Etc::SourceList=$tmp/trixie.list" -o "Dir::Etc::SourceParts=$tmp/parts"
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
        -o Debug::NoLocking=1 -o "APT::Sandbox::User=$(id -un)"
    )
    echo "fetch_ort: ONNX Runtime headers from Debian trixie's libonnxruntime-dev" >&2
    apt-get "${apt_opts[@]}" -qq update
    (cd "$tmp" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
    dpkg -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/root"
    rm -rf "$dest/include"
    cp -r "$tmp/root/usr/include/onnxruntime" "$dest/include"
fi

library=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | head -n 1)
[[ -n "$library" ]] || give_up "no libonnxruntime.so.* in $capi"
ln -sf "$library" "$dest/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
for provider in "$capi"/libonnxruntime_providers_*.so; do
    [[ -e "$provider" ]] && ln -sf "$provider" "$dest/lib/"
done
echo "fetch_ort: $dest (library $(basename "$library"))" >&2
