#!/usr/bin/env bash
# coopsgd GPU check: under 8 minutes on one CUDA GPU.
#
# Installs nothing. It assumes what it needs is installed already: this package (pip install -e .), a CUDA
# build of torch, and pytest. It refuses to start (exit 2) when one of them is missing or no GPU is visible.
#
#   1. runs the tests that exercise --device cuda (tests/cuda/: simulator float64 on the GPU = CPU, compressors
#      on the GPU = CPU, whole runs and bit-exact resume on the GPU, the distributed engine on GPUs, the CLI);
#   2. measures the simulator's step for m = 8 and m = 64 workers of ResNet-20 and of the small GPT against m
#      separate models on the same GPU, and a stacked mixing round against one memory pass
#      (benchmarks/bench_gpu.py);
#   3. prints one table (the tests' outcome, then the measurements).
#
# Usage (from anywhere): bash benchmarks/gpu_check.sh [OUT_DIR]
#   OUT_DIR (default: $OUT if set, else ./gpu_check_out) receives pytest.log, cuda_tests.xml, bench_gpu.json
#   and table.txt. Exit status: 0 when every test passed and the benchmark ran, else 1 (2: could not start).
#   GPU_CHECK_DEVICE=cpu dry-runs the same steps with the CPU in the GPU's place and small sizes (for checking
#   this script on a machine without a GPU; its numbers say nothing about a GPU).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
out_dir=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out_dir" || exit 2
device=${GPU_CHECK_DEVICE:-cuda}
py=${PYTHON:-python}
start=$(date +%s)

if ! "$py" -c "import coopsgd, torch, pytest" 2>/dev/null; then
    echo "gpu_check: needs coopsgd, torch and pytest importable by $py (pip install -e . and pytest); installs nothing" >&2
    exit 2
fi
if [ "$device" = "cuda" ]; then
    if ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    bench_args=(--device cuda --workers 8,64)
    export COOPSGD_TEST_ACCELERATOR=cuda
else
    bench_args=(--device cpu --quick --threads 1)
    export COOPSGD_TEST_ACCELERATOR=cpu
fi
"$py" -c "import torch, coopsgd; print(f'coopsgd {coopsgd.__version__} | torch {torch.__version__} | CUDA {torch.version.cuda}')"

echo "== 1/2 tests/cuda (device $device; log: $out_dir/pytest.log)"
# runs the tests in this process tree; the executor-calibration cache goes to a private folder
export COOPSGD_CACHE_DIR="$out_dir/cache"
timeout 330 "$py" -m pytest -q -p no:cacheprovider tests/cuda --junitxml "$out_dir/cuda_tests.xml" \
    >"$out_dir/pytest.log" 2>&1
rc_tests=$?
tail -n 15 "$out_dir/pytest.log"
[ "$rc_tests" -eq 124 ] && echo "gpu_check: the tests ran out of their 330 s" >&2

echo "== 2/2 benchmarks/bench_gpu.py ${bench_args[*]}"
timeout 150 "$py" benchmarks/bench_gpu.py "${bench_args[@]}" --budget-s 110 --json "$out_dir/bench_gpu.json" \
    --pytest-junit "$out_dir/cuda_tests.xml" | tee "$out_dir/table.txt"
rc_bench=${PIPESTATUS[0]}
[ "$rc_bench" -eq 124 ] && echo "gpu_check: the benchmark ran out of its 150 s" >&2

echo "gpu_check: $(($(date +%s) - start)) s in all; pytest exit $rc_tests, bench_gpu exit $rc_bench"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
