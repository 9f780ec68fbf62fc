#!/usr/bin/env bash
# What needs a CUDA GPU, in one run (for the device tool's machine, where python3 has torch):
#
#   bash scripts/gpu_checks.sh [DEST]
#
# 1. the CUDA tests: tests/test_cuda.py and the CUDA case of tests/test_postprocess.py;
# 2. `cam-engine bench` of resnet50, batch 64, 224 px, Grad-CAM and CAM, four ways: float32,
#    bf16 autocast, channels-last, and the compiled trunk replayed as CUDA graphs.
#
# DEST (default out/gpu) receives tests.log, BENCHMARKS-<run>.md for each run and results.tgz
# (each run's results.json and bench.png): 6 files. The work itself goes to out/gpu-work.
# Wheels in .wheels/ are installed first: the peer libraries, made with
#   pip wheel --no-deps -w .wheels grad-cam ttach torchcam captum     (0.6 MB; carry .wheels)
# and onnxruntime-gpu for the ONNX Runtime rows on CUDA (its 255 MB wheel is over what the device
# tool carries, so there those rows are skipped: "this onnxruntime has no CUDA provider").
# MODELS, BATCH, SIZE, REPEATS and DEVICE override the defaults (a smoke run on a CPU:
# DEVICE=cpu MODELS=resnet18 BATCH=2 SIZE=64 REPEATS=2).
set -uo pipefail
dest=${1:-out/gpu}
work=out/gpu-work
python=${PYTHON:-python3}
mkdir -p "$dest" "$work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-deps --no-index .wheels/*.whl
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

"$python" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_postprocess.py \
    -k "cuda" 2>&1 | tee "$dest/tests.log"

failed=0
bench() {  # NAME [bench arguments...]
    local name=$1
    shift
    "$python" -m cam_engine.cli bench --device "${DEVICE:-cuda}" --models "${MODELS:-resnet50}" \
        --batch "${BATCH:-64}" --size "${SIZE:-224}" --repeats "${REPEATS:-10}" \
        --methods gradcam,cam --no-all-classes --out "$work/$name" \
        --markdown "$dest/BENCHMARKS-$name.md" "$@" >"$work/$name.log" 2>&1 \
        || { failed=1; tail -20 "$work/$name.log"; }
    echo "bench $name: done"
}
bench fp32
bench bf16 --autocast bf16
bench channels-last --channels-last
bench cuda-graphs --backends plain,engine,engine-compile --compile-mode reduce-overhead
tar czf "$dest/results.tgz" -C "$work" --exclude=models .
exit $failed
