#!/usr/bin/env bash
# What a session with a lent GPU runs. A lent GPU has 15 minutes of device time all told (a fresh
# machine's start included) and 10 minutes a call: the first call is `window`, a second `window2`
# only if 5 minutes remain (benchmarks/window.py; benchmarks/results/README.md says how the time goes):
#
#   RESNEXT_GIT_SHA=<commit> bash benchmarks/gpu_session.sh window   # one call, <= 8 min: smoke, blocks,
#                                                        # bottlenecks, models at batch 256 and 32, tune, report
#   bash benchmarks/gpu_session.sh window --dry-run      # its plan, on any machine: compiles, runs, seconds
#   bash benchmarks/gpu_session.sh window2 [--dry-run]   # torch.compile baselines, an ncu profile
#
# and, one at a time, the steps sessions used before (each call has a 10-minute limit):
#
#   bash benchmarks/gpu_session.sh tests                 # versions + the whole suite, interpreter off
#   bash benchmarks/gpu_session.sh blocks [pytest -k]    # block benchmarks, bfloat16 by default
#   bash benchmarks/gpu_session.sh bottleneck [pytest -k]  # whole blocks: cudnn, fused_conv, fused_block, compile
#   bash benchmarks/gpu_session.sh models [pytest -k]    # model benchmarks (cudnn, fused, fused_block, compile)
#   bash benchmarks/gpu_session.sh patch                 # torchvision resnext50_32x4d patched vs not
#   bash benchmarks/gpu_session.sh report                # merge the JSONs -> benchmarks/results/
#   bash benchmarks/gpu_session.sh profile [STAGE] [STRIDE]   # ncu of the fused kernels, inference + train
#   bash benchmarks/gpu_session.sh trainer               # the trainer: eager vs fused, --data, --compile
#   bash benchmarks/gpu_session.sh trainer-block         # the trainer with every bottleneck fused, and --compile
#   bash benchmarks/gpu_session.sh host [STAGE]          # host (CPU) time per fused call vs cuDNN, + cProfile
#   bash benchmarks/gpu_session.sh aot                   # the sm_90 compile report with this machine's triton
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
  window|window2)
    if [ "${1:-}" = "--dry-run" ]; then
      python -m benchmarks.window plan "$step"
    else
      OUT="$out" python -m benchmarks.window run "$step"
      cat "$out/window.log"
    fi
    ;;
  tests)
    versions | tee "$out/versions.txt"
    # every test, not -x: one GPU failure must not hide the next; -n compiles the kernels in parallel
    { versions; timeout -s INT "${TESTS_TIMEOUT:-560}" python -m pytest -q -rs -n "${WORKERS:-12}" --durations=25 tests/; } \
      > "$out/tests.txt" 2>&1
    tail -40 "$out/tests.txt"
    ;;
  blocks)
    versions
    # one JSON per -k selection (blocks-<selection>.json), so that split runs do not overwrite
    # each other; the report step merges every blocks*.json
    tag=$(printf '%s' "${1:-all}" | tr -c 'A-Za-z0-9' '_')
    # SIGINT, not SIGTERM, at the limit: pytest-benchmark still writes the JSON of what finished
    timeout -s INT "${BENCH_TIMEOUT:-560}" python -m pytest benchmarks/test_block_bench.py --benchmark-only -q \
      --bench-dtypes "${BENCH_DTYPES:-bfloat16}" -k "${1:-}" \
      --benchmark-json="$out/blocks-$tag.json" > "$out/blocks-$tag.log" 2>&1
    tail -40 "$out/blocks-$tag.log"
    ;;
  models)
    versions
    timeout -s INT "${BENCH_TIMEOUT:-560}" python -m pytest benchmarks/test_model_bench.py --benchmark-only -q \
      -k "${1:-}" --benchmark-json="$out/models.json" > "$out/models.log" 2>&1
    tail -40 "$out/models.log"
    ;;
  bottleneck)
    versions
    tag=$(printf '%s' "${1:-all}" | tr -c 'A-Za-z0-9' '_')
    timeout -s INT "${BENCH_TIMEOUT:-560}" python -m pytest benchmarks/test_bottleneck_bench.py --benchmark-only -q \
      -k "${1:-}" --benchmark-json="$out/bottleneck-$tag.json" > "$out/bottleneck-$tag.log" 2>&1
    tail -40 "$out/bottleneck-$tag.log"
    ;;
  host)  # where the GPU idles at the small stages: CPU time per call, and a cProfile of the fused call
    versions
    for stage in ${1:-3 2 1}; do
      timeout 170 python -m benchmarks.host_overhead --stage "$stage" --prof "$out/host-stage$stage.prof.txt" \
        2>&1 | tee "$out/host-stage$stage.txt"
    done
    ;;
  patch)  # torchvision's resnext50_32x4d, unpatched vs resnext.fuse_kernels(model)
    versions
    timeout 560 python -m pytest benchmarks/test_patch_bench.py --benchmark-only -q \
      --benchmark-json="$out/patch.json" 2>&1 | tail -20
    ;;
  report)
    python -m benchmarks.report $(ls "$out"/blocks*.json "$out"/models.json "$out"/patch.json 2>/dev/null) \
      --out-dir benchmarks/results
    ;;
  profile)
    # Nsight Compute at one stage (default: stage 1, stride 1, where the ratio to cuDNN is
    # expected to be worst), inference and training forward+backward; the summary is markdown.
    stage=${1:-1}; stride=${2:-1}
    for mode in inference train; do
      name="ncu-stage${stage}-s${stride}-${mode}"
      timeout 280 ncu --profile-from-start off --set full --import-source no -f -o "$out/$name" \
        python -m benchmarks.profile_block --stage "$stage" --stride "$stride" --mode "$mode" --iters 1 \
        > "$out/$name.log" 2>&1 || { echo "ncu $mode failed:"; tail -20 "$out/$name.log"; }
      ncu -i "$out/$name.ncu-rep" --csv --page raw > "$out/$name.csv" 2>/dev/null \
        && python -m benchmarks.ncu_summary "$out/$name.csv" | tee "$out/$name.md"
    done
    ;;
  trainer)
    versions
    common=(--synthetic --arch resnext50_32x4d --amp bf16 --channels-last --batch-size 256 --epochs 1
            --synthetic-samples 5120 --workers 8)
    timeout 170 python -m resnext.train "${common[@]}" --out "$out/train-eager" 2>&1 | tail -3
    timeout 170 python -m resnext.train "${common[@]}" --fused-kernels --out "$out/train-fused" 2>&1 | tail -3
    timeout 170 python -m resnext.train "${common[@]}" --fused-kernels --compile --synthetic-samples 2560 \
      --out "$out/train-fused-compile" 2>&1 | tail -3
    # a tiny ImageFolder (2 classes x 20 images), so the torchvision data path has run once
    python - "$out/tiny-imagefolder" <<'PY'
import sys
from pathlib import Path
from PIL import Image
import numpy as np
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
for split, count in (("train", 16), ("val", 4)):
    for label in ("a", "b"):
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / label / f"{i}.jpg")
PY
    timeout 120 python -m resnext.train --data "$out/tiny-imagefolder" --arch resnext50_32x4d --fused-kernels \
      --amp bf16 --channels-last --batch-size 8 --epochs 1 --workers 2 --out "$out/train-data" 2>&1 | tail -3
    for run in train-eager train-fused train-fused-compile train-data; do
      echo "$run: $(tail -1 "$out/$run/metrics.jsonl" 2>/dev/null)"
    done | tee "$out/trainer.txt"
    rm -rf "$out"/train-*/*.pt "$out/tiny-imagefolder"  # keep the metrics, not 100 MB checkpoints
    ;;
  trainer-block)
    # the whole bottleneck fused (issue 13), as the trainer step's runs: which level trains faster
    versions
    common=(--synthetic --arch resnext50_32x4d --amp bf16 --channels-last --batch-size 256 --epochs 1
            --synthetic-samples 5120 --workers 8)
    timeout 200 python -m resnext.train "${common[@]}" --fused-kernels block --out "$out/train-block" 2>&1 | tail -3
    timeout 200 python -m resnext.train "${common[@]}" --fused-kernels block --compile --synthetic-samples 2560 \
      --out "$out/train-block-compile" 2>&1 | tail -3
    for run in train-block train-block-compile; do
      echo "$run: $(tail -1 "$out/$run/metrics.jsonl" 2>/dev/null)"
    done | tee "$out/trainer-block.txt"
    rm -rf "$out"/train-*/*.pt
    ;;
  aot)
    python -m benchmarks.compile_report --out-dir "$out" 2>&1 | tail -20
    ;;
  *)
    echo "usage: $0 window [--dry-run]|window2 [--dry-run]|tests|blocks [-k expr]|bottleneck [-k expr]|models [-k expr]|patch|report|profile [stage] [stride]|trainer|trainer-block|aot" >&2
    exit 2
    ;;
esac
