#!/usr/bin/env bash
# The one GPU script of GPU.md: GPU tests, then the kernel sweep, then the pipeline
# benchmark if present; logs and CSV under $OUT (at most 8 files come back).
#
# On the lent machine (device tool), from the repository root, carrying the wheels:
#     run(command="ANYMS_COMMIT=<git rev-parse --short=10 HEAD here> bash benchmarks/gpu/run.sh",
#         carry=[".whl"], timeout_s=570)        # .git does not travel: the commit comes by name
# Dry run here, on CPU with tiny shapes and the Triton interpreter (checks the script end to end):
#     OUT=/tmp/gpu_dry bash benchmarks/gpu/run.sh --dry-run
#
# Budget (whole script <= ~8.5 minutes): tests <= TEST_BUDGET s, sweep <= SWEEP_BUDGET s,
# pipeline <= PIPE_BUDGET s; each part is cut by `timeout` so the files still come back.
set -u -o pipefail

DRY=0
[[ "${1:-}" == "--dry-run" || "${DRY_RUN:-0}" == "1" ]] && DRY=1
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/outputs/gpu}
mkdir -p "$OUT"
TEST_BUDGET=${TEST_BUDGET:-140}
SWEEP_BUDGET=${SWEEP_BUDGET:-220}
PIPE_BUDGET=${PIPE_BUDGET:-150}
START=$(date +%s)
export PYTHONUNBUFFERED=1
log() { echo "[run.sh +$(( $(date +%s) - START ))s] $*"; }

# 1. diffusers (and anything else missing there) travels as wheels in .whl/ (device README).
SITE=/tmp/site
[[ $DRY == 1 ]] && SITE=$(mktemp -d /tmp/anyms_site.XXXX)
if compgen -G ".whl/*.whl" > /dev/null; then
  log "installing $(ls .whl | tr '\n' ' ') into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { log "wheel install failed"; exit 1; }
else
  log "no .whl/ folder: relying on an installed diffusers"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 2. The machine and the versions, into env.txt.
{
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: none"
  $PY - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: missing", e)
try:
    import diffusers; print("diffusers", diffusers.__version__, diffusers.__file__)
except Exception as e: print("diffusers: missing", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs", "cc", f"{p.major}.{p.minor}")
PY
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: ${ANYMS_COMMIT:-unknown (no .git)}"
  git status --short 2>/dev/null | head -20
} 2>&1 | tee "$OUT/env.txt"

if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1     # the kernel runs on CPU tensors, slowly: tiny shapes only
  DEVICE=cpu
else
  DEVICE=cuda
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { log "no CUDA device visible: stopping"; exit 1; }
fi

# 3. Tests: the whole suite minus slow tests; on the GPU the CUDA-parametrised ones run for real.
log "tests (budget ${TEST_BUDGET}s)"
TEST_ARGS=(tests/ -m "not slow" -q -rfEs -p no:cacheprovider --durations=15)
[[ $DRY == 1 ]] && TEST_ARGS=(tests/kernels -m "not slow" -q -x -rfE -p no:cacheprovider
                              -k "${DRY_TEST_FILTER:-softmax_scale or subject_scale_vector}")
timeout -k 10 "$TEST_BUDGET" $PY -m pytest "${TEST_ARGS[@]}" > "$OUT/tests.log" 2>&1
rc=$?
tail -n 25 "$OUT/tests.log"
log "tests exit code $rc (124 = cut by the budget)"

# 4. The kernel sweep: fp16 full, bf16 at S=5 T=16, B1 (Flex) on a subset; CUDA-graph medians.
log "sweep (budget ${SWEEP_BUDGET}s)"
if [[ $DRY == 1 ]]; then
  SWEEP=(--device cpu --quick --peers B0 B1 B2 B3 B4 crop ours ours_sum --tokens 4 --subjects 2
         --grids 16 --layouts overlap --threads 2)
  # On CPU 'ours' is the torch backend; the Triton path is exercised by the tests above.
else
  SWEEP=(--device cuda --time-limit $(( SWEEP_BUDGET - 45 )) --no-plot)   # PNG: --plot-from here
fi
timeout -k 10 "$SWEEP_BUDGET" $PY benchmarks/bench_region_attention.py "${SWEEP[@]}" --out "$OUT/bench" \
  > "$OUT/sweep.log" 2>&1
rc=$?
tail -n 30 "$OUT/sweep.log"
log "sweep exit code $rc"

# 5. The pipeline benchmark (another helper's script), if it exists and has a GPU mode.
if [[ -f benchmarks/bench_pipeline.py ]]; then
  log "pipeline (budget ${PIPE_BUDGET}s)"
  mkdir -p "$OUT/pipeline"
  PIPE=(--device "$DEVICE" --out "$OUT/pipeline/pipeline.csv")
  [[ $DRY == 1 ]] && PIPE+=(--quick)
  timeout -k 10 "$PIPE_BUDGET" $PY benchmarks/bench_pipeline.py "${PIPE[@]}" > "$OUT/pipeline.log" 2>&1
  log "pipeline exit code $? (see pipeline.log)"
  tail -n 15 "$OUT/pipeline.log"
fi

# At most 8 files come back, 2 folders deep: env.txt tests.log sweep.log pipeline.log, bench/ (csv,
# summary) and 2 left for pipeline/.
find "$OUT" -type f | sort
log "done"
