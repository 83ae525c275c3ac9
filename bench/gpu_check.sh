#!/usr/bin/env bash
# The prepared check of tierd's GPU paths, for a session that is lent a GPU machine.
#
# On the device machine (Python 3.12, PyTorch with CUDA, no network), from the
# repository root, with the wheels it lacks carried in .whl/ (README, "GPU check"):
#
#     bash bench/gpu_check.sh            # run(command=..., carry=[".whl"], timeout_s=540)
#
# It installs the wheels the machine lacks into a private site directory,
# installs the project with --no-deps, runs tests/test_gpu.py and
# tests/test_training.py, then `tierd bench gpu training --quick`, each step
# under its own timeout (7.5 minutes in all), and leaves every log and result
# under $OUT: summary.txt (one line per step: status, seconds, command),
# gpu_check.log (everything), junit.xml, bench.md, bench.json and the plots.
# It exits non-zero when a step failed; later steps still run.
#
#     bash bench/gpu_check.sh --dry      # anywhere: check the wheels, print the plan, run nothing
#
# Environment: TIERD_WHEELS (default .whl), OUT (default /tmp/tierd-gpu-check),
# PYTHON (default python3: the one that holds PyTorch there).
set -uo pipefail

cd "$(dirname "$0")/.."
WHEELS=${TIERD_WHEELS:-.whl}
OUT=${OUT:-/tmp/tierd-gpu-check}
PYTHON=${PYTHON:-python3}
SITE=/tmp/tierd-site
BENCH_OUT=/tmp/tierd-gpu-bench
TOTAL_LIMIT_S=450  # 7.5 minutes: the issue's 8, less the machine's start and the transfers' slack

# What the GPU image lacks (the rest, pytest and torch included, is there):
# the project's own dependencies, and kvikio with what it needs beyond the image.
REQUIRED_WHEELS=(msgspec lmdb zstandard kvikio_cu13 libkvikio_cu13 rapids_logger)

# name|timeout seconds|command
STEPS=(
  "wheels|60|$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
  "project|60|$PYTHON -m pip install -q --no-index --no-deps --no-build-isolation -e ."
  "machine|30|nvidia-smi; $PYTHON -c 'import kvikio; print(\"kvikio\", kvikio.__version__)'; $PYTHON -m tierd doctor; $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'"
  "tests|180|$PYTHON -m pytest -q -p no:cacheprovider -o timeout=120 --junitxml=$OUT/junit.xml tests/test_gpu.py tests/test_training.py"
  "bench|120|$PYTHON -m tierd bench gpu training --quick --out $BENCH_OUT"
)

wheel_problems() {
  # One wheel per required name, each installable by CPython 3.12 on x86-64 Linux.
  local name files f base tags py abi plat bad=0
  for name in "${REQUIRED_WHEELS[@]}"; do
    files=("$WHEELS/$name"-[0-9]*.whl)
    if [[ ! -e ${files[0]} ]]; then
      echo "missing wheel: $name (download it as the device README says, into $WHEELS/)"
      bad=1
      continue
    fi
    if ((${#files[@]} > 1)); then
      echo "two versions of $name in $WHEELS: ${files[*]##*/} (keep one: pip refuses both)"
      bad=1
    fi
    for f in "${files[@]}"; do
      base=${f##*/}
      tags=${base%.whl}
      plat=${tags##*-}; tags=${tags%-*}
      abi=${tags##*-}; tags=${tags%-*}
      py=${tags##*-}
      if ! [[ $py == cp312 || $py == py3 || ($abi == abi3 && $py =~ ^cp3([0-9]+)$ && ${BASH_REMATCH[1]} -le 12) ]] ||
        ! [[ $abi == cp312 || $abi == abi3 || $abi == none ]]; then
        echo "$base is not for CPython 3.12 (python tag $py, abi $abi)"
        bad=1
      fi
      if ! [[ $plat == *x86_64* && ($plat == *manylinux* || $plat == linux_x86_64) ]]; then
        echo "$base is not for x86-64 Linux (platform $plat)"
        bad=1
      fi
    done
  done
  return $bad
}

plan() {
  local total=0 s name limit cmd
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    printf 'step %-8s %4ss  %s\n' "$name" "$limit" "$cmd"
    total=$((total + limit))
  done
  echo "total limit: ${total}s of ${TOTAL_LIMIT_S}s"
  ((total <= TOTAL_LIMIT_S)) || { echo "the steps' limits exceed ${TOTAL_LIMIT_S}s"; return 1; }
  for f in tests/test_gpu.py tests/test_training.py bench/gpu.py bench/training.py; do
    [[ -f $f ]] || { echo "the plan names $f, which is not in this checkout"; return 1; }
  done
}

if [[ ${1:-} == --dry ]]; then
  status=0
  wheel_problems || status=2
  plan || status=2
  ((status == 0)) && echo "dry run: wheels and plan are in order"
  exit $status
fi
[[ $# -eq 0 ]] || { echo "usage: bench/gpu_check.sh [--dry]" >&2; exit 64; }

mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TIERD_LOG_LEVEL=${TIERD_LOG_LEVEL:-WARNING}
echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" | tee -a "$LOG"
wheel_problems 2>&1 | tee -a "$LOG" || echo "wheel problems above: the installs may fail" | tee -a "$LOG"

failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  echo "=== $name (limit ${limit}s): $cmd" | tee -a "$LOG"
  start=$SECONDS
  timeout -k 10 "$limit" bash -c "$cmd" >>"$LOG" 2>&1
  rc=$?
  took=$((SECONDS - start))
  case $rc in
    0) result=ok ;;
    124 | 137) result="timed out"; failed=1 ;;
    *) result="failed rc=$rc"; failed=1 ;;
  esac
  printf '%-8s %-14s %4ss  %s\n' "$name" "$result" "$took" "$cmd" | tee -a "$SUMMARY" "$LOG"
done

# At most 8 files come back from $OUT: summary, log, junit, the bench tables, then plots.
cp "$BENCH_OUT/results.md" "$OUT/bench.md" 2>/dev/null
cp "$BENCH_OUT/results.json" "$OUT/bench.json" 2>/dev/null
n=0
for png in "$BENCH_OUT"/*.png; do
  [[ -e $png && $n -lt 3 ]] || break
  cp "$png" "$OUT/" && n=$((n + 1))
done
echo "--- summary"
cat "$SUMMARY"
grep -E "passed|failed|error" "$LOG" | tail -3
exit $failed
