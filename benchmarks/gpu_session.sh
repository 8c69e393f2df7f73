#!/usr/bin/env bash
# What a session with a lent GPU runs, in a few device calls (each call has a 10-minute limit):
#
#   bash benchmarks/gpu_session.sh tests                 # versions + the whole suite, interpreter off
#   bash benchmarks/gpu_session.sh blocks [pytest -k]    # block benchmarks, bfloat16 by default
#   bash benchmarks/gpu_session.sh models                # model benchmarks
#   bash benchmarks/gpu_session.sh report                # merge the JSONs -> benchmarks/results/
#
# Nothing installs on the GPU machine: it runs from the tree with PYTHONPATH=. Logs and raw JSON go
# to $OUT (the device tool brings that folder back) or benchmarks/results/raw.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
unset TRITON_INTERPRET
out=${OUT:-benchmarks/results/raw}
mkdir -p "$out"
step=${1:-tests}
shift || true

versions() {
  nvidia-smi || true
  python - <<'PY'
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuDNN {torch.backends.cudnn.version()}, "
      f"triton {triton.__version__}, GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
}

case "$step" in
  tests)
    versions | tee "$out/versions.txt"
    python -m pytest -q -rs -x --durations=15 tests/ 2>&1 | tee "$out/tests.txt"
    ;;
  blocks)
    versions
    timeout 560 python -m pytest benchmarks/test_block_bench.py --benchmark-only -q \
      --bench-dtypes "${BENCH_DTYPES:-bfloat16}" -k "${1:-}" \
      --benchmark-json="$out/blocks.json" 2>&1 | tail -40
    ;;
  models)
    versions
    timeout 560 python -m pytest benchmarks/test_model_bench.py --benchmark-only -q \
      --benchmark-json="$out/models.json" 2>&1 | tail -40
    ;;
  report)
    python -m benchmarks.report $(ls "$out"/blocks.json "$out"/models.json 2>/dev/null) \
      --out-dir benchmarks/results
    ;;
  *)
    echo "usage: $0 tests|blocks [-k expr]|models|report" >&2
    exit 2
    ;;
esac
