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

if [[ ! -f "$dest/include/onnxruntime_cxx_api.h" ]]; then
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

capi=$("$python" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))')/capi
library=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | head -n 1)
if [[ -z "$library" ]]; then
    echo "fetch_ort: no libonnxruntime.so.* in $capi (is onnxruntime installed for $python?)" >&2
    exit 1
fi
ln -sf "$library" "$dest/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
for provider in "$capi"/libonnxruntime_providers_*.so; do
    [[ -e "$provider" ]] && ln -sf "$provider" "$dest/lib/"
done
echo "fetch_ort: $dest (library $(basename "$library"))" >&2
