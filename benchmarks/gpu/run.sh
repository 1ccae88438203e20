#!/usr/bin/env bash
# The GPU check: correctness on the GPU, then the kernel and pipeline benchmarks. Two modes. Every
# file it writes under $OUT is named <mode>_<GPU>_<commit>_* (the sweep's own files:
# region_attention_cuda_<GPU>_<commit>*), and <mode>_<GPU>_<commit>_summary.txt gets each step's
# result the moment that step ends, so a run cut short still reports what finished.
#
#   main (default)  the CUDA tests first (tests/kernels/test_cuda.py and every test parametrised on
#                   cuda: pytest -k cuda), then the rest of the suite (-k "not cuda"), the kernel
#                   sweep (fp16 + bf16, the median of calls each timed after an L2 flush), the
#                   pipeline step benchmark (SDXL U-Net, 1024^2 and 2048^2, none / plain / B0 / AnyMS).   <= 9 minutes, cold Triton cache
#   --max-size      the largest square image whose U-Net step (fp16, CFG batch 2) + SDXL VAE decode
#                   fits in 16, 12 and 8 GiB (set_per_process_memory_fraction): plain IP-Adapter,
#                   B0 (diffusers' masks, S=5), AnyMS (S=5), VAE tiling on and off.   <= 5 minutes
#
# On a machine with an NVIDIA GPU, from the repository root:
#     pip install -e ".[triton,diffusers,test,bench]"      # or put a diffusers wheel in .whl/ (below)
#     OUT=gpu-results bash benchmarks/gpu/run.sh
#     OUT=gpu-results bash benchmarks/gpu/run.sh --max-size
# The commit goes into the file names: from a git checkout it is read here; from a copy without
# .git, set ANYMS_COMMIT=<commit> (`--print-commands` prints both commands with it filled in, for a
# copy made from this checkout).
#
# Wheels: where diffusers is not installed, put its wheel in the ignored .whl/, once:
#     python -m pip download --no-deps -d .whl diffusers==0.42.1
# The first step installs .whl/*.whl into a scratch folder and imports everything the mode needs;
# if anything is missing it says what and how to get it, in one line, and stops (exit 3) before any
# test or benchmark. No CUDA device: exit 4. No commit name: exit 2.
#
# Dry runs on a CPU (tiny shapes; the tests under the Triton interpreter): same steps, same files.
#     OUT=/tmp/gpu_dry bash benchmarks/gpu/run.sh --dry-run                  # about 2 minutes
#     OUT=/tmp/gpu_dry_ms bash benchmarks/gpu/run.sh --max-size --dry-run    # about 1 minute
#
# Budgets, seconds, env-overridable. Each part runs under `timeout`, and no part may run past the
# mode's RUN_BUDGET (a part that would is shortened; one with under 15 s left is skipped):
#   main      RUN_BUDGET=540: setup ~25, CUDA_TEST_BUDGET=120, TEST_BUDGET=90, SWEEP_BUDGET=190,
#             PIPE_BUDGET=110 (the sweep and the pipeline also stop starting cases 45 / 30 s early)
#   max-size  RUN_BUDGET=300: setup ~25, MAXSIZE_BUDGET=270 (no try started that would end in its
#             last 25 s)
# Files under $OUT: main 7, max-size 4, at most 2 folders deep.
set -u -o pipefail

DIFFUSERS_VERSION=0.42.1       # what the CPU suite runs against
DRY=0 MODE=run PRINT=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --max-size) MODE=maxsize ;;
    --print-commands) PRINT=1 ;;
    *) echo "run.sh: unknown argument $arg (use --dry-run, --max-size, --print-commands)" >&2; exit 2 ;;
  esac
done
[[ "${DRY_RUN:-0}" == "1" ]] && DRY=1
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[[ $DRY == 1 && -z ${PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python
WHEELS=${WHEELS:-.whl}
GET_DIFFUSERS="python -m pip download --no-deps -d .whl diffusers==$DIFFUSERS_VERSION"

if [[ $PRINT == 1 ]]; then
  c=$(git rev-parse --short=10 HEAD) || exit 2
  [[ -n $(git status --porcelain --untracked-files=no) ]] && c="$c-dirty"
  compgen -G "$WHEELS/diffusers-*.whl" > /dev/null \
    || echo "first: $WHEELS/ holds no diffusers wheel; get it with: $GET_DIFFUSERS"
  echo "ANYMS_COMMIT=$c OUT=gpu-results bash benchmarks/gpu/run.sh             # main: <= 9 min"
  echo "ANYMS_COMMIT=$c OUT=gpu-results bash benchmarks/gpu/run.sh --max-size  # max size: <= 5 min"
  exit 0
fi

if [[ $MODE == run ]]; then
  RUN_BUDGET=${RUN_BUDGET:-540}
else
  RUN_BUDGET=${RUN_BUDGET:-300}
fi
CUDA_TEST_BUDGET=${CUDA_TEST_BUDGET:-120}
TEST_BUDGET=${TEST_BUDGET:-90}
SWEEP_BUDGET=${SWEEP_BUDGET:-190}
PIPE_BUDGET=${PIPE_BUDGET:-110}
MAXSIZE_BUDGET=${MAXSIZE_BUDGET:-270}
START=$(date +%s)
export PYTHONUNBUFFERED=1
log() { echo "[run.sh +$(( $(date +%s) - START ))s] $*"; }
stop() { local code=$1; shift; echo "run.sh: $*" >&2; exit "$code"; }

OUT=${OUT:-$ROOT/outputs/gpu}
mkdir -p "$OUT" || stop 2 "cannot create OUT=$OUT"

# 1. The commit that names every file. In a copy without .git, ANYMS_COMMIT must say it (and no git
#    repository above the copy may answer instead).
if [[ ! -e .git ]]; then
  [[ -n ${ANYMS_COMMIT:-} ]] || stop 2 "no .git here and ANYMS_COMMIT is unset, so results cannot be named: \
run ANYMS_COMMIT=<git rev-parse --short=10 HEAD, in the checkout it was copied from> bash benchmarks/gpu/run.sh (--print-commands prints it)"
  export GIT_DIR=/nonexistent-anyms-git     # benchmarks/_env.py then falls back to ANYMS_COMMIT
fi

# 2. Wheels (.whl/: diffusers, and anything else missing there) into a scratch folder on PYTHONPATH.
SITE=${SITE:-/tmp/site}
if [[ $DRY == 1 ]]; then
  SITE=$(mktemp -d /tmp/anyms_site.XXXX)
  trap 'rm -rf "$SITE"' EXIT
fi
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  log "installing $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')into $SITE"
  pipout=$($PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
           "$WHEELS"/*.whl 2>&1) \
    || stop 3 "installing the wheels of $WHEELS/ failed ($(echo "$pipout" | grep -v '^\s*$' | tail -n 1)); \
keep one version of each package there"
else
  log "no wheels in $WHEELS/: diffusers must be installed already"
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# 3. Every import the mode needs, the CUDA device, the name of the results: one python, seconds.
#    Prints the file tag (<GPU or CPU>_<commit>) first, then the header lines of the summary.
DEVICE=cuda
[[ $DRY == 1 ]] && DEVICE=cpu
[[ $DRY == 1 && $MODE == run ]] && export TRITON_INTERPRET=1   # the kernel on CPU tensors: tiny shapes only
setup=$(TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore \
        $PY - "$MODE" "$DEVICE" "$DIFFUSERS_VERSION" "$GET_DIFFUSERS" "$SITE" <<'PY'
import importlib, platform, sys, time
mode, device, want, get_diffusers, site = sys.argv[1:6]
t0 = time.time()
needed = ["torch", "diffusers", "diffusers.models.attention_processor", "anyms_kernels", "anyms.layout",
          "anyms.processor"]
if device == "cuda" or mode == "run":
    needed.insert(1, "triton")
if mode == "run":
    needed += ["transformers", "einops", "pytest", "anyms.pipeline", "anyms.tiny"]
DIST = {"PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python-headless", "sklearn": "scikit-learn"}
OWN = ("anyms", "anyms_kernels")
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        why = f"{type(exc).__name__}: {exc}"
        if missing and missing.split(".")[0] == "diffusers":
            msg = (f"cannot import {name} ({why}): the diffusers wheel is missing; get it "
                   f"with `{get_diffusers}` (it installs from .whl/)")
        elif missing and missing.split(".")[0] not in OWN:
            top = missing.split(".")[0]
            msg = (f"cannot import {name} ({why}): package {DIST.get(top, top.replace('_', '-'))} is missing here; "
                   f"put its wheel in .whl/ (python -m pip download --no-deps --only-binary=:all: "
                   f"--python-version {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]} "
                   f"--platform manylinux_2_17_x86_64 -d .whl {DIST.get(top, top.replace('_', '-'))})")
        elif name.split(".")[0] in OWN:
            msg = f"the repository's own {name} does not import ({why}): fix the tree before spending GPU time"
        else:
            msg = f"cannot import {name} ({why})"
        print("run.sh: " + msg.replace("\n", " "), file=sys.stderr)
        sys.exit(3)
import torch, diffusers  # noqa: E402
if device == "cuda" and not torch.cuda.is_available():
    print("run.sh: no CUDA device is visible to torch " + torch.__version__, file=sys.stderr)
    sys.exit(4)
sys.path.insert(0, "benchmarks")
from bench_pipeline import result_tag  # noqa: E402
print(result_tag(device))
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
src = "wheel in " + site if diffusers.__file__.startswith(site) else diffusers.__file__
print(f"python {platform.python_version()} | torch {torch.__version__} (cuda {torch.version.cuda}) | triton {tv} | "
      f"diffusers {diffusers.__version__} ({src})" + ("" if diffusers.__version__ == want else f", NOT {want}"))
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} | {p.total_memory / 2**30:.1f} GiB | {p.multi_processor_count} SMs | cc {p.major}.{p.minor}")
else:
    from _env import machine_name
    print(f"cpu {machine_name('cpu')} | {torch.get_num_threads()} threads | load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
print(f"imports checked in {time.time() - t0:.1f} s: {' '.join(needed)}")
PY
)
rc=$?
(( rc == 0 )) || exit "$rc"          # the python printed the one line (stderr) that says why
TAG=$(head -n 1 <<< "$setup")
P="$OUT/${MODE}_${TAG}"
SUMMARY="${P}_summary.txt"
note() { log "$*"; echo "$*" >> "$SUMMARY"; }
{
  echo "anyms GPU script, mode $MODE$([[ $DRY == 1 ]] && echo ' (DRY RUN: CPU, tiny shapes)') | $(date -u '+%Y-%m-%d %H:%M UTC') | $TAG"
  tail -n +2 <<< "$setup"
} > "$SUMMARY"
cat "$SUMMARY"
{
  cat "$SUMMARY"
  nvidia-smi 2>/dev/null || echo "nvidia-smi: none"
  git log -1 --format='commit %H %s' 2>/dev/null || echo "commit ${ANYMS_COMMIT:-?} (ANYMS_COMMIT; no .git)"
  git status --short 2>/dev/null | head -20
  $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|diffusers|transformers|accelerate|einops|pytest|numpy|pillow|safetensors|huggingface)' || true
} > "${P}_env.txt" 2>&1

# part NAME BUDGET LOG CMD...: CMD under `timeout`, output appended to LOG, never past RUN_BUDGET.
# Sets PART_S (seconds taken) and PART_RC (124: cut by its budget; 99: not run, no time left).
PART_S=0 PART_RC=0 FAILED=""
effective() { local left=$(( RUN_BUDGET - ($(date +%s) - START) - 5 )); (( $1 < left )) && echo "$1" || echo "$left"; }
# limit BUDGET MARGIN: a python's own --time-limit inside a part of BUDGET seconds (at least 10).
limit() { local b; b=$(( $(effective "$1") - $2 )); (( b > 10 )) && echo "$b" || echo 10; }
part() {
  local name=$1 budget=$2 logf=$3; shift 3
  budget=$(effective "$budget")
  if (( budget < 15 )); then
    PART_RC=99 PART_S=0
    note "$name: not run, ${budget}s left of RUN_BUDGET=${RUN_BUDGET}s"
    return 0
  fi
  log "$name (budget ${budget}s)"
  echo "=== $name: $* (budget ${budget}s)" >> "$logf"
  local t0; t0=$(date +%s)
  timeout -k 10 "$budget" "$@" >> "$logf" 2>&1
  PART_RC=$?
  PART_S=$(( $(date +%s) - t0 ))
  (( PART_RC == 0 )) || FAILED="$FAILED ${name// /_}"
  return 0
}
ended() { case $PART_RC in 0) echo "exit 0" ;; 124|137) echo "CUT by its budget (exit $PART_RC)" ;; *) echo "exit $PART_RC" ;; esac; }
# The result line of the pytest run that ends LOG (after its last === header).
pytest_line() {
  awk '/^=== /{buf=""} {buf=buf"\n"$0} END{print buf}' "$1" \
    | grep -E '[0-9]+ (passed|failed|skipped|error|errors|deselected)|no tests ran' | tail -n 1 | tr -d '=' \
    | sed 's/^ *//; s/ *$//'
}

if [[ $MODE == run ]]; then
  # 4. Tests: CUDA first (a run cut later still reports them), then the rest; one log.
  TESTS="${P}_tests.log"
  COMMON=(-m "not slow" -q -rfEs -p no:cacheprovider --durations=15)
  part "tests, CUDA first" "$CUDA_TEST_BUDGET" "$TESTS" $PY -m pytest tests/ "${COMMON[@]}" -k cuda
  (( PART_RC != 99 )) && note "tests, CUDA first (-k cuda): $(pytest_line "$TESTS") | $(ended) | ${PART_S}s"
  if [[ $DRY == 1 ]]; then      # the interpreter is slow: a few kernel tests stand for the rest
    part "tests, the rest" "$TEST_BUDGET" "$TESTS" $PY -m pytest tests/kernels "${COMMON[@]}" -x \
      -k "not cuda and (${DRY_TEST_FILTER:-softmax_scale or subject_scale_vector})"
  else
    part "tests, the rest" "$TEST_BUDGET" "$TESTS" $PY -m pytest tests/ "${COMMON[@]}" -k "not cuda"
  fi
  (( PART_RC != 99 )) && note "tests, the rest (-k 'not cuda'): $(pytest_line "$TESTS") | $(ended) | ${PART_S}s"

  # 5. The kernel sweep: fp16 full, bf16 at S=5 T=16, B1 (Flex) on a subset; the target case first.
  BENCH="${P}_bench.log"
  if [[ $DRY == 1 ]]; then
    SWEEP=(--device cpu --quick --peers B0 B1 B2 B3 B4 crop ours ours_sum --tokens 4 --subjects 2
           --grids 16 --layouts overlap --threads 2 --no-plot)
    # On CPU 'ours' is the torch backend; the Triton path is exercised by the tests above.
  else
    SWEEP=(--device cuda --time-limit "$(limit "$SWEEP_BUDGET" 45)" --no-plot)   # PNG: --plot-from, here
  fi
  t_sweep=$(date +%s)
  part "sweep" "$SWEEP_BUDGET" "$BENCH" $PY benchmarks/bench_region_attention.py "${SWEEP[@]}" --out "$OUT"
  if (( PART_RC != 99 )); then      # this sweep's summary, not one left in a reused $OUT
    sw=$(find "$OUT" -maxdepth 1 -name 'region_attention_*_summary.txt' -newermt "@$t_sweep" | head -n 1)
    if [[ -n $sw ]]; then
      sed 's/^/sweep: /' "$sw" >> "$SUMMARY"
      note "sweep: $(ended) | ${PART_S}s | $(basename "$sw")"
    else
      note "sweep: no summary written | $(ended) | ${PART_S}s | last line: $(tail -n 1 "$BENCH")"
    fi
  fi

  # 6. The pipeline step benchmark: each row goes to the CSV and the summary as it is measured.
  PIPE=(--device "$DEVICE" --out "${P}_pipeline.csv" --summary "$SUMMARY"
        --time-limit "$(limit "$PIPE_BUDGET" 30)")
  [[ $DRY == 1 ]] && PIPE+=(--quick)
  part "pipeline" "$PIPE_BUDGET" "$BENCH" $PY benchmarks/bench_pipeline.py "${PIPE[@]}"
  (( PART_RC != 99 )) && note "pipeline: $(ended) | ${PART_S}s | $(basename "${P}_pipeline.csv")"
else
  # 4. The largest size per cap: each search's row goes to the CSV and the summary as it ends.
  MS=(--max-size --device "$DEVICE" --out "${P}.csv" --summary "$SUMMARY"
      --time-limit "$(limit "$MAXSIZE_BUDGET" 25)")
  [[ $DRY == 1 ]] && MS+=(--quick --threads 1)      # 1 thread: a loaded 2-core machine stalls OpenMP
  part "max-size" "$MAXSIZE_BUDGET" "${P}_log.txt" $PY benchmarks/bench_pipeline.py "${MS[@]}"
  (( PART_RC != 99 )) && note "max-size: $(ended) | ${PART_S}s | $(basename "${P}.csv")"
fi

note "done: mode $MODE in $(( $(date +%s) - START ))s (RUN_BUDGET ${RUN_BUDGET}s)${FAILED:+; not clean:$FAILED}"
n=$(find "$OUT" -type f | wc -l)
find "$OUT" -type f | sort
(( n > 8 )) && log "WARNING: $n files under $OUT, more than the 8 this script is meant to write"
[[ -z $FAILED ]]      # exit 1 when a part failed or was cut; every file is written either way
