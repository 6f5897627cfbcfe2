#!/usr/bin/env bash
# One device call (10 min at most): install, then PHASE=tests (every GPU test, the newest files
# first), PHASE=bench (the rows in ROWS beside their peers; KERNELS=1: each row's kernels too),
# PHASE=all (both) or PHASE=sanitize (the CALLS groups of bench/sanitize.py, inputs of each DTYPES
# dtype: compiled, then its four tools on each group at once). Run from the repo root with
# .whl carried (fla wheels, the unpacked mamba_ssm archive); logs under $OUT, a summary on stdout.
# Compiles dominate a call: the cubins it compiled come back in $OUT/tmcache.tgz.a, .b (15 MB parts),
# and archives of them carried in .tmcache/*.tgz (parts joined) seed the next call's kernel cache.
set -o pipefail
OUT=${OUT:-/tmp/tilemix-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
mamba=$(ls -d "$PWD"/.whl/mamba_ssm-*/ 2>/dev/null | head -1)  # bench/mixers.py imports its Triton modules
# OMP_NUM_THREADS: each xdist worker's torch would start a thread per core (bench/NOTES.md)
export PYTHONPATH=/tmp/site${mamba:+:$mamba} PYTHONUNBUFFERED=1 TILEMIX_CACHE=${TILEMIX_CACHE:-/tmp/tmcache} \
  OMP_NUM_THREADS=2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
mkdir -p "$TILEMIX_CACHE" && for t in .tmcache/*.tgz; do [ ! -f "$t" ] || tar xzf "$t" -C "$TILEMIX_CACHE"; done
touch /tmp/cache-start
send_cache() { (cd "$TILEMIX_CACHE" && find . -name '*.cubin' -newer /tmp/cache-start | tar cz -T - | split -b 15m -a 1 - "$OUT/tmcache.tgz."); }
trap send_cache EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "${PHASE:-all}" = sanitize ]; then
  logs=/tmp/sanitize-logs && mkdir -p $logs  # one file comes back: at most 8 do (device README)
  # compile first, one process per group, target and dtype (NVRTC is single-threaded), then each tool on
  # each group at once: a log each, so a group that runs out of time leaves the others' results
  for c in ${CALLS:-tail}; do for t in auto generic; do for d in ${DTYPES:-bfloat16 float16}; do
    timeout "${COMPILE_TIMEOUT:-200}" python3 -m tilemix.bench.sanitize --launch --calls="$c" --target="$t" \
      --dtype="$d" >"$logs/launch-$c-$t-$d.log" 2>&1 &
  done; done; done
  wait
  for c in ${CALLS:-tail}; do for tool in memcheck racecheck synccheck initcheck; do
    # shellcheck disable=SC2046  # one --dtype per word of DTYPES
    python3 -m tilemix.bench.sanitize --tool "$tool" --calls="$c" --timeout="${SANITIZE_TIMEOUT:-360}" \
      $(for d in ${DTYPES:-}; do echo "--dtype=$d"; done) \
      >"$logs/$tool-$c.log" 2>&1 &
  done; done
  wait
  for log in "$logs"/launch-*.log; do echo "$log: $(grep -c '^kernel:' "$log") kernels"; done
  for log in "$logs"/*check-*.log; do echo "== $log"; tail -8 "$log"; done
  tar czf "$OUT/sanitize-logs.tgz" -C $logs .
  exit 0
fi
if [ "${PHASE:-all}" != bench ]; then
  timeout -s INT -k 30 "${TEST_TIMEOUT:-400}" python3 -m pytest -m gpu -n "${WORKERS:-14}" -v -p no:cacheprovider -rfE \
    --durations=25 ${TESTS:-tests} >"$OUT/pytest.log" 2>&1
  echo "tests rc=$?"
  grep -a -oE "(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) tests/[a-z_]+\.py" "$OUT/pytest.log" | sort | uniq -c
  grep -a -E "^(FAILED|ERROR)" "$OUT/pytest.log" | cut -c1-300 | head -40
  tail -3 "$OUT/pytest.log"
fi
if [ "${PHASE:-all}" != tests ]; then
  # shellcheck disable=SC2086  # ROWS is a list of bench rows
  timeout "${BENCH_TIMEOUT:-300}" tilemix bench ${ROWS:-} ${KERNELS:+--kernels} --json "$OUT/bench.json" \
    >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -a -E " \| |Error|error| ms  " "$OUT/bench.log" | cut -c1-250
fi
