#!/usr/bin/env bash
# One time-boxed check of modalmoe on one H100/H200 with a CUDA build of torch, for a short GPU lease:
#   deps         the Python packages the tests and the trainer import (installed from a wheels folder)
#   build        pip install -e . with nvcc for sm_90 (MODALMOE_REQUIRE_CUDA=1); build time and log
#   tests        pytest of the CUDA-relevant test files (tests/test_ops.py runs its cuda cases)
#   edge_cases   empty input, one token, all to one expert, capacity drops, bf16, odd H, against the
#                references (benchmarks/gpu_check/edge_cases.py)
#   bench_ops    permute / unpermute GB/s against a device copy of the same bytes (bf16, CUDA events)
#   bench_layer  bf16 MoELayer fwd+bwd against a dense MLP of the same FLOPs, TFLOP/s
#   smoke_train  50 steps of the smoke preset scaled up, bf16, tokens/s (+ tflops / mfu when logged)
#   memcheck, racecheck, synccheck   the edge cases again under compute-sanitizer (last: the least
#                predictable in time, so the measurements come first)
# Every stage runs under `timeout` inside one total budget (default 480 s), and each later stage keeps
# a minimum share of it; a failed stage does not stop the next. All figures and each stage's status go
# to OUT/gpu_check_summary.md and .json, every stage's log to OUT/gpu_check_logs.txt (three files:
# the device tool brings back at most eight).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine; OUT=$OUT or ./gpu_check_out
#   bash benchmarks/gpu_check.sh --cpu --out /tmp/gc   # dry run of every stage on CPU, tiny sizes
#   bash benchmarks/gpu_check.sh --stages bench_ops,bench_layer   # rerun some stages (warm machine)
# Options: --out DIR, --wheels DIR (default .whl when present; --no-index install into /tmp),
# --budget SECONDS, --stages a,b,..., --python PY, --keep-work. Sizes: GC_OPS_ARGS, GC_LAYER_ARGS,
# GC_SMOKE_SET (extra --set items), GC_TEST_FILES. README.md "GPU check" says how to run it there.
set -uo pipefail
[[ -n "${EPOCHREALTIME:-}" ]] || { echo "gpu_check: needs bash >= 5 (EPOCHREALTIME)" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
HELPERS="$HERE/gpu_check"
MODE=gpu
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
WHEELS=""
BUDGET=""
ONLY=""
PY="${PYTHON:-python3}"
KEEP_WORK=0
STAGES=(env deps build tests edge_cases bench_ops bench_layer smoke_train memcheck racecheck synccheck)

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT_DIR="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --stages) ONLY=",$2," ; shift ;;
    --python) PY="$2"; shift ;;
    --keep-work) KEEP_WORK=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$ONLY" ]]; then
  for s in ${ONLY//,/ }; do
    [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "gpu_check: unknown stage $s; stages: ${STAGES[*]}" >&2; exit 2; }
  done
fi
[[ -z "$WHEELS" && "$MODE" == gpu && -d "$REPO/.whl" ]] && WHEELS="$REPO/.whl"

# Stage time caps and the least time worth starting a stage with (seconds), per mode.
declare -A CAP MIN
if [[ "$MODE" == gpu ]]; then
  BUDGET="${BUDGET:-480}"
  DEV=cuda
  caps=(20 60 300 150 60 60 90 150 90 75 75)
  mins=(5 10 60 30 15 20 25 45 30 25 25)
  OPS_ARGS="${GC_OPS_ARGS:---tokens 65536 --hidden 4096 --top-k 2 --experts 64 --repeats 20}"
  LAYER_ARGS="${GC_LAYER_ARGS:---tokens 16384 --hidden 4096 --ffn 2048 --experts 64 --top-k 2 --repeats 10}"
  SMOKE_STEPS=50
  SMOKE_SET="train.device=cuda train.dtype=bfloat16 train.log_every=10 train.eval_batches=2 train.retrieval_size=20
    model.hidden_size=768 model.num_layers=6 model.num_heads=12 model.moe.ffn_hidden_size=1536 model.moe.num_experts=8
    model.image_size=64 data.batch_size=128 data.num_workers=6 ${GC_SMOKE_SET:-}"
  TEST_FILES="${GC_TEST_FILES:-tests/test_ops.py tests/test_moe_layer.py tests/test_moe_router.py tests/test_moe_losses.py}"
else
  BUDGET="${BUDGET:-240}"
  DEV=cpu
  caps=(20 60 900 60 60 60 60 90 0 0 0)
  mins=(5 5 20 10 10 10 10 20 0 0 0)
  OPS_ARGS="${GC_OPS_ARGS:---tokens 2048 --hidden 64 --top-k 2 --experts 8 --repeats 3}"
  LAYER_ARGS="${GC_LAYER_ARGS:---tokens 128 --hidden 32 --ffn 32 --experts 4 --top-k 2 --repeats 2 --peak-size 128}"
  SMOKE_STEPS=3
  SMOKE_SET="train.device=cpu train.log_every=1 train.eval_batches=1 train.retrieval_size=5 data.num_workers=0 ${GC_SMOKE_SET:-}"
  TEST_FILES="${GC_TEST_FILES:-tests/test_ops.py}"
fi
for i in "${!STAGES[@]}"; do CAP[${STAGES[$i]}]=${caps[$i]}; MIN[${STAGES[$i]}]=${mins[$i]}; done

mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
mkdir -p "$WORK/logs" "$WORK/figures"
# wheels go outside the work folder on the GPU machine, so that a rerun on the warm machine finds them
if [[ "$MODE" == gpu ]]; then SITE="${GC_SITE:-/tmp/gpu_check_site}"; else SITE="${GC_SITE:-$WORK/site}"; fi
START_EPOCH="$EPOCHREALTIME"
export REPO HELPERS WORK MODE PY DEV SITE WHEELS OPS_ARGS LAYER_ARGS SMOKE_STEPS SMOKE_SET TEST_FILES
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$REPO" || exit 2

skip_stage() { echo "$1" >"$WORK/note_$STAGE"; exit 99; }  # inside a stage: status skip, with a reason

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
      "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/nvcc)")/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 1
}

stage_env() {
  date -u; uname -a; echo "cores: $(nproc)"; free -g 2>/dev/null | head -2
  if [[ "$MODE" == gpu ]]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true
  fi
  NVCC_VERSION="$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' | head -1)" \
  SANITIZER="$(find_sanitizer || echo none)" "$PY" - <<'EOF'
import json, os, platform, sys
import torch
f = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
     "nvcc": os.environ["NVCC_VERSION"] or "none", "sanitizer": os.environ["SANITIZER"],
     "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    f.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, gpu_mem_GiB=p.total_memory / 2**30)
else:
    f["gpu"] = "none"
json.dump(f, open(os.path.join(os.environ["WORK"], "figures", "env.json"), "w"), indent=1)
print(json.dumps(f, indent=1))
sys.exit(0 if os.environ["MODE"] == "cpu" or torch.cuda.is_available() else 1)
EOF
}

stage_deps() {
  local n=0
  if [[ -n "$WHEELS" ]]; then
    shopt -s nullglob; local whl=("$WHEELS"/*.whl); shopt -u nullglob
    n=${#whl[@]}
    echo "installing ${n} wheel(s) from $WHEELS into $SITE (--no-index --no-deps)"
    if ((n)); then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${whl[@]}" || exit 1
    fi
  fi
  N_WHEELS=$n PYTHONPATH="$( ((n)) && echo "$SITE:")${PYTHONPATH:-}" "$PY" - <<'EOF'
import importlib, json, os, sys
need = ["webdataset", "braceexpand", "sentencepiece", "yaml", "tqdm", "safetensors", "PIL", "numpy", "pytest"]
ok, missing = [], []
for name in need:
    try:
        importlib.import_module(name)
        ok.append(name)
    except Exception as e:  # noqa: BLE001
        missing.append(name)
        print(f"missing {name}: {type(e).__name__}: {e}")
f = {"installed": int(os.environ["N_WHEELS"]), "importable": ok, "missing": missing}
json.dump(f, open(os.path.join(os.environ["WORK"], "figures", "deps.json"), "w"), indent=1)
print(json.dumps(f))
sys.exit(1 if missing else 0)
EOF
}

build_figures() {  # $1: build seconds, $2: reused (0/1)
  BUILD_S="$1" REUSED="$2" "$PY" - <<'EOF'
import glob, json, os, shutil, subprocess, sys
import torch
import modalmoe
from modalmoe import ops
try:
    import modalmoe._C as ext
    so = [ext.__file__]
except ImportError as e:
    print(f"modalmoe._C does not import: {e}")
    so = []
f = {"build_s": float(os.environ["BUILD_S"]), "reused": os.environ["REUSED"] == "1", "extension": ops.HAS_EXTENSION,
     "package_dir": os.path.dirname(modalmoe.__file__), "so": so[-1] if so else "none"}
try:
    f["cuda_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key("modalmoe::permute_rows", "CUDA")
except RuntimeError:
    f["cuda_kernels"] = False
if so and f["reused"]:
    sources = [p for ext in ("cpp", "cu", "h", "cuh")
               for p in glob.glob(os.path.join(os.environ["REPO"], "csrc", "**", f"*.{ext}"), recursive=True)]
    f["stale"] = bool(sources) and max(map(os.path.getmtime, sources)) > os.path.getmtime(so[-1])  # csrc edited since
if so and os.environ["MODE"] == "gpu":
    from torch.utils.cpp_extension import CUDA_HOME
    tool = shutil.which("cuobjdump") or os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "cuobjdump")
    try:
        out = subprocess.run([tool, "--list-elf", so[-1]], capture_output=True, text=True, timeout=30).stdout
        f["sass"] = sorted({p for word in out.split() for p in word.split(".") if p.startswith("sm_")})
    except (OSError, subprocess.TimeoutExpired) as e:
        f["notes"] = [f"cuobjdump did not run ({e}): machine code not checked"]
json.dump(f, open(os.path.join(os.environ["WORK"], "figures", "build.json"), "w"), indent=1)
print(json.dumps(f, indent=1))
ok = f["extension"] and os.path.realpath(f["package_dir"]) == os.path.realpath(os.environ["REPO"])
if os.environ["MODE"] == "gpu":
    ok = ok and f["cuda_kernels"] and ("sass" not in f or "sm_90" in f["sass"])
sys.exit(0 if ok else 1)
EOF
}

stage_build() {
  local t0 rc
  if [[ "$MODE" == cpu ]] && "$PY" -c "import torch, modalmoe._C" 2>/dev/null; then
    echo "--cpu: modalmoe._C already builds and imports here; reusing it (no rebuild)"
    build_figures 0 1
    return
  fi
  if [[ "$MODE" == gpu ]]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MODALMOE_REQUIRE_CUDA=1
  else
    export MODALMOE_NO_CUDA=1
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MODALMOE_REQUIRE_CUDA=${MODALMOE_REQUIRE_CUDA:-} MAX_JOBS=$MAX_JOBS"
  t0="$EPOCHREALTIME"
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . 2>&1
  rc=$?
  local secs; secs="$(awk "BEGIN{print $EPOCHREALTIME - $t0}")"
  echo "pip install -e . exited $rc after $secs s"
  build_figures "$secs" 0 || exit 1
  exit "$rc"
}

stage_tests() {
  local extra=(-q -p no:cacheprovider -rfEs) rc
  "$PY" -c "import webdataset" 2>/dev/null || extra+=(--noconftest)  # conftest.py imports the data pipeline
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=150)
  [[ "$MODE" == gpu ]] && "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 4)  # torch.compile tests take a while
  if [[ "$MODE" == gpu ]]; then
    # shellcheck disable=SC2086
    MODALMOE_REQUIRE_EXTENSION=1 "$PY" -m pytest "${extra[@]}" $TEST_FILES 2>&1
  else
    # shellcheck disable=SC2086
    "$PY" -m pytest "${extra[@]}" --noconftest $TEST_FILES \
      -k "test_extension_is_built or test_public_surface or test_edge_cases" 2>&1
  fi
  rc=$?
  RC="$rc" "$PY" - "$STAGE_LOG" <<'EOF'
import json, os, re, sys
text = open(sys.argv[1], errors="replace").read()
f = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
lines = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1] if lines else ""):
    f["errors" if what.startswith("error") else what] = int(n)
f["exit_status"] = int(os.environ["RC"])
json.dump(f, open(os.path.join(os.environ["WORK"], "figures", "tests.json"), "w"), indent=1)
print(json.dumps(f))
EOF
  exit "$rc"
}

stage_edge_cases() {
  "$PY" "$HELPERS/edge_cases.py" --device "$DEV" --out "$WORK/figures/edge_cases.json"
}

sanitize() {  # $1: memcheck | racecheck | synccheck
  local tool="$1" san rc help filter=() env=()
  [[ "$MODE" == cpu ]] && skip_stage "--cpu: compute-sanitizer needs a GPU"
  san="$(find_sanitizer)" || skip_stage "no compute-sanitizer found"
  "$san" --version | tail -1
  # racecheck and synccheck look at shared memory and barriers: our kernels only (namespace modalmoe)
  help="$("$san" --help 2>&1)"  # (not piped into grep -q: under pipefail its early exit reads as a failure)
  if [[ "$tool" != memcheck && "$help" == *--kernel-name* ]]; then
    filter=(--kernel-name kns=modalmoe)
  fi
  # without the caching allocator each tensor is its own cudaMalloc, so an overrun is caught at its edge
  [[ "$tool" == memcheck ]] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "+ $san --tool $tool ${filter[*]} ... edge_cases.py"
  env "${env[@]}" timeout -k 5 "$((STAGE_TIMEOUT - 12))" "$san" --tool "$tool" --print-limit 20 --error-exitcode 86 \
    "${filter[@]}" ${GC_SANITIZER_ARGS:-} "$PY" "$HELPERS/edge_cases.py" --device cuda 2>&1
  rc=$?
  echo "compute-sanitizer exited $rc"
  "$PY" "$HELPERS/sanitizer_log.py" "$STAGE_LOG" --tool "$tool" --rc "$rc" --out "$WORK/figures/$tool.json"
}
stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }
stage_synccheck() { sanitize synccheck; }

stage_bench_ops() {
  # shellcheck disable=SC2086
  "$PY" "$HELPERS/bench_ops.py" --device "$DEV" $OPS_ARGS --out "$WORK/figures/bench_ops.json"
}

stage_bench_layer() {
  # shellcheck disable=SC2086
  "$PY" "$HELPERS/bench_layer.py" --device "$DEV" $LAYER_ARGS --out "$WORK/figures/bench_layer.json"
}

stage_smoke_train() {
  local run="$WORK/smoke_run" rc
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$PY" -m modalmoe.launch.train --preset smoke --demo-dir "$WORK/demo" --set train.steps="$SMOKE_STEPS" \
    train.run_dir="$run" train.resume=false train.tensorboard=false train.progress=false train.report=false \
    $SMOKE_SET 2>&1
  rc=$?
  echo "training exited $rc"
  "$PY" "$HELPERS/smoke_metrics.py" "$run" --steps "$SMOKE_STEPS" --out "$WORK/figures/smoke_train.json" || exit 1
  exit "$rc"
}

export -f skip_stage find_sanitizer build_figures sanitize
for s in "${STAGES[@]}"; do export -f "stage_$s"; done

elapsed() { awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $START_EPOCH}"; }
selected() { [[ -z "$ONLY" || "$ONLY" == *",$1,"* || "$1" == deps ]]; }  # deps sets PYTHONPATH: always

for i in "${!STAGES[@]}"; do
  name="${STAGES[$i]}"
  idx=$((i + 1))
  log="$WORK/logs/$(printf %02d "$idx")_${name}.log"
  if ! selected "$name"; then
    printf '%s\t%s\tskip\t0\t\t\tnot in --stages\n' "$idx" "$name" >>"$WORK/stages.tsv"
    continue
  fi
  if [[ "$MODE" == cpu && "$name" == *check ]]; then
    printf '%s\t%s\tskip\t0\t\t\t--cpu: compute-sanitizer needs a GPU\n' "$idx" "$name" >>"$WORK/stages.tsv"
    continue
  fi
  reserve=0
  for later in "${STAGES[@]:$((i + 1))}"; do selected "$later" && reserve=$((reserve + MIN[$later])); done
  left=$(awk "BEGIN{printf \"%d\", $BUDGET - ($EPOCHREALTIME - $START_EPOCH)}")
  # the cap, less what the later stages need at least; never below this stage's own minimum
  t=$((left - reserve < CAP[$name] ? left - reserve : CAP[$name]))
  ((t < MIN[$name])) && t=$((MIN[$name] < left ? MIN[$name] : left))
  if ((t < MIN[$name] || t < 1)); then
    printf '%s\t%s\tout_of_time\t0\t\t\t%s s of the budget left\n' "$idx" "$name" "$left" >>"$WORK/stages.tsv"
    echo "[gpu_check $(elapsed)s] $idx $name: out_of_time (${left} s of the budget left)"
    continue
  fi
  echo "[gpu_check $(elapsed)s] $idx $name: start (timeout ${t}s)"
  t0="$EPOCHREALTIME"
  STAGE="$name" STAGE_LOG="$log" STAGE_TIMEOUT="$t" timeout -k 5 "$t" bash -c "stage_$name" >"$log" 2>&1
  rc=$?
  secs=$(awk "BEGIN{printf \"%.1f\", $EPOCHREALTIME - $t0}")
  note=""
  case "$rc" in
    0) status=pass ;;
    99) status=skip; note="$(cat "$WORK/note_$name" 2>/dev/null)" ;;
    124|137) status=timeout; note="killed after ${t} s" ;;
    *) status=fail ;;
  esac
  if [[ "$name" == deps && "$status" != skip && -d "$SITE" && -n "$WHEELS" ]]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$idx" "$name" "$status" "$secs" "$rc" "$t" "$note" >>"$WORK/stages.tsv"
  echo "[gpu_check $(elapsed)s] $idx $name: $status in ${secs}s${note:+ ($note)}"
  [[ "$status" == fail || "$status" == timeout ]] && tail -n 8 "$log" | sed 's/^/    | /'
done

"$PY" "$HELPERS/summary.py" --work "$WORK" --mode "$MODE" --budget "$BUDGET" --started "${START_EPOCH}" \
  --md "$OUT_DIR/gpu_check_summary.md" --json "$OUT_DIR/gpu_check_summary.json" --logs "$OUT_DIR/gpu_check_logs.txt"
rc=$?
echo "[gpu_check $(elapsed)s] summary: $OUT_DIR/gpu_check_summary.md (.json), logs: $OUT_DIR/gpu_check_logs.txt"
if ((KEEP_WORK)); then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
exit "$rc"
