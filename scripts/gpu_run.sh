#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over the folder staged by
# scripts/gpu_check.sh (.gpu/): GPU tests against the oracle, compute-sanitizer memcheck and
# racecheck, the bench, then the PyTorch peers (same call, ratios printed last).
# Usage: bash .gpu/run_all.sh [tests] [sanitize] [bench] [peers] [quick]   (default: all)
#        named-only stages: ring, ringbench (2 GPUs), profile (Nsight Compute),
#        ab (gpu_bench against gpu_bench_base, staged by gpu_check.sh with BASE_REV, in
#        alternating rounds), variants (every staged gpu_bench_<v> / gpu_vs_oracle_<v> pair:
#        tested, then timed against gpu_bench_base the same way; see time_against_base)
# Logs go to $OUT (or /tmp/gpu_out).
set -u
G=.gpu
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# The module compiled ahead of time by gpu_check.sh (loaded, not compiled, by every process
# whose kernel sources match; a mismatch compiles as usual and adds its own file).
if [ -d "$G/kernels" ]; then export DILATED_ATTENTION_KERNEL_CACHE=$PWD/$G/kernels; fi
stages=" ${*:-all} "
has() { [[ "$stages" == *" $1 "* || "$stages" == *" all "* ]]; }
# The 2-GPU stages run only when asked for by name.
named() { [[ "$stages" == *" $1 "* ]]; }
SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv | tee "$O/gpu.txt"
QUICK=""
if has quick; then QUICK="--quick"; fi

if has tests; then
  echo "== tests: every kernel vs the float64 oracle"
  # TESTS names a subset (libtest filters, e.g. TESTS="dense longnet"); default: all.
  # TEST_TIMEOUT (seconds, default 420): a hung kernel ends the stage, not the whole call.
  timeout ${TEST_TIMEOUT:-420} "$G/gpu_vs_oracle" --ignored --test-threads=1 --nocapture ${TESTS:-} > "$O/tests.log" 2>&1
  echo "tests exit $?"
  grep -E "^test |test result|panicked|GPU:" "$O/tests.log" | tail -20
  grep -E "^ok " "$O/tests.log" | awk '{print $2}' | sort | uniq -c
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    # SAN_TEST (default sanitizer_small, every kernel): the test run under the sanitizer,
    # e.g. sanitizer_fused_tma (the tensor-map backwards and the defaults only, faster).
    echo "== compute-sanitizer $tool (${SAN_TEST:-sanitizer_small})"
    # SAN_TIMEOUT (seconds, default 300): a hung kernel under the sanitizer ends this run only.
    timeout ${SAN_TIMEOUT:-300} "$SAN" --tool $tool --error-exitcode 9 "$G/gpu_vs_oracle" --ignored --test-threads=1 --exact ${SAN_TEST:-sanitizer_small} > "$O/$tool.log" 2>&1
    echo "$tool exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|Error|error" "$O/$tool.log" | head -8
    # The persistent forward over several work items per CTA (stage ring and Q buffer
    # reused across items); SAN_PERSISTENT=0 skips it (a round that did not touch it).
    [ "${SAN_PERSISTENT:-1}" = 0 ] && continue
    echo "== compute-sanitizer $tool (persistent_forward_many_items)"
    timeout 300 "$SAN" --tool $tool --error-exitcode 9 "$G/gpu_vs_oracle" --ignored --test-threads=1 --exact persistent_forward_many_items > "$O/${tool}_persistent.log" 2>&1
    echo "$tool exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|Error|error" "$O/${tool}_persistent.log" | head -8
  done
fi
if has bench; then
  echo "== bench (ours)"
  rm -rf /tmp/dilated_check
  "$G/gpu_bench" --json /tmp/ours.json --check-dir /tmp/dilated_check $QUICK ${BENCH_ARGS:-} 2>&1 | tee "$O/bench.log"
  cp /tmp/ours.json "$O/ours.json" 2>/dev/null
fi
if has peers; then
  echo "== peers (PyTorch)"
  python3 "$G/torch_dilated.py" --ours /tmp/ours.json --check-dir /tmp/dilated_check 2>&1 | tee "$O/peers.log" | tail -30
fi
if named ring; then
  echo "== GPU-resident ring on 2 GPUs vs the oracle and the single GPU"
  timeout 300 "$G/gpu_ring" --ignored --test-threads=1 > "$O/gpu_ring.log" 2>&1
  echo "gpu_ring exit $?"
  grep -E "^test |test result|panicked|rel err" "$O/gpu_ring.log" | tail -40
  echo "== host-path ring over NCCL"
  timeout 200 "$G/nccl_ring" --ignored --test-threads=1 > "$O/nccl_ring.log" 2>&1
  echo "nccl_ring exit $?"
  grep -E "^test |test result|panicked" "$O/nccl_ring.log" | tail -12
  echo "== example, one process per GPU (torchrun-style environment)"
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 \
      timeout 120 "$G/ring_nccl" --mode env --gpu true > "$O/ring_nccl_env_$r.log" 2>&1 &
  done
  wait
  tail -n 5 "$O/ring_nccl_env_0.log" "$O/ring_nccl_env_1.log"
  echo "== example, one process, one thread per GPU"
  timeout 120 "$G/ring_nccl" --mode threads --gpu true 2>&1 | tee "$O/ring_nccl_threads.log" | tail -8
  echo "== compute-sanitizer memcheck on the GPU ring (small cases)"
  timeout 240 "$SAN" --tool memcheck --report-api-errors no --error-exitcode 9 "$G/gpu_ring" --ignored --test-threads=1 --exact dense_causal_zigzag > "$O/ring_memcheck.log" 2>&1
  echo "memcheck exit $?"
  grep -E "ERROR SUMMARY|test result" "$O/ring_memcheck.log" | head -4
fi
if named profile; then
  # Nsight Compute, full section set, on the first launch of each default Hopper kernel (dense
  # 16K, the bench's first case; KERNS overrides the list): the summary, every raw metric
  # (CSV, gzipped: stall reasons, pipe utilisation, shared-memory wavefronts) and the SASS with
  # per-instruction stall samples (CSV, gzipped). Only when asked for by name (about a minute
  # per kernel). PROFILE_ARGS is passed to gpu_bench after --quick --max-n 16384, so a later
  # --max-n overrides: KERNS=fwd_wspt PROFILE_ARGS="--defaults-only --no-dense --no-bwd
  # --min-n 65536 --max-n 65536" profiles the first head-group launch at 64K (stop 25).
  NCU=$(command -v ncu || echo "$CUDA_HOME/bin/ncu")
  if [ -x "$NCU" ]; then
    for kern in ${KERNS:-fwd_ws dq_wg dkdv_wg}; do
      echo "== ncu $kern (bf16, D=128)"
      timeout 240 "$NCU" -k "${kern}_bf16_128" -c 1 --set full --import-source no -o "/tmp/ncu_$kern" -f \
        "$G/gpu_bench" --quick --max-n 16384 ${PROFILE_ARGS:---defaults-only} > "$O/ncu_run_$kern.txt" 2>&1
      echo "ncu exit $?"
      "$NCU" -i "/tmp/ncu_$kern.ncu-rep" --page details --print-details all > "$O/ncu_$kern.txt" 2>&1
      "$NCU" -i "/tmp/ncu_$kern.ncu-rep" --page raw --csv | gzip > "$O/ncu_raw_$kern.csv.gz"
      "$NCU" -i "/tmp/ncu_$kern.ncu-rep" --page source --csv --print-source sass | gzip > "$O/ncu_sass_$kern.csv.gz"
      grep -E "Compute \(SM\) Throughput|Duration|Issue Slots Busy|Executed Ipc Active" "$O/ncu_$kern.txt" | head -6
    done
    # The device tool returns at most 8 files: the reports go back as one archive.
    ( cd "$O" && files=$(ls ncu_*.txt ncu_*.csv.gz 2>/dev/null) && [ -n "$files" ] \
        && tar cf ncu_reports.tar $files && rm -f $files )
  else
    echo "ncu not found"
  fi
fi
if named ringbench; then
  echo "== GPU ring bench"
  timeout 540 "$G/gpu_ring_bench" --json "$O/ring_bench.json" ${RING_BENCH_ARGS:-} 2>&1 | tee "$O/ring_bench.log"
fi
# time_against_base STAGE TAG ROUNDS BENCH...: the timing that `ab` and `variants` share.
# BENCH... are gpu_bench builds staged in $G, gpu_bench_base among them, in the order each
# round runs them. First all of them warm up at once (each process's first use JIT-compiles
# its module, ~140 s on a fresh machine): a gpu_bench_<v> with a staged gpu_vs_oracle_<v>
# runs those oracle tests (TEST_TIMEOUT; they compile the same module), any other build a
# short bench. Then AB_ROUNDS (default ROUNDS) rounds of AB_ARGS with the builds alternating,
# so clock and thermal drift hit all alike, and each build against the base (best round of
# each; +: faster; a gpu_bench_<v>'s table headed by <v>) into $O/STAGE.txt. The warm-up and
# round logs go back as one archive, STAGE_runs.tar (the device tool returns at most 8
# files); the test logs stay beside it as TAG_tests_<v>.log.
time_against_base() {
  local stage=$1 tag=$2 rounds=${AB_ROUNDS:-$3} b v r t0 logs="" tested=""
  local args=${AB_ARGS:---quick --max-n 65536 --defaults-only}
  shift 3
  if [ ! -x "$G/gpu_bench_base" ]; then
    echo "$stage: no $G/gpu_bench_base (stage it with BASE_REV=<rev> bash scripts/gpu_check.sh)"
    return
  fi
  if [ $# -lt 2 ]; then
    echo "$stage: no build staged to time against $G/gpu_bench_base"
    return
  fi
  echo "== $stage: warm-up ($*)"
  t0=$(date +%s)
  for b in "$@"; do
    v=${b#gpu_bench_}
    if [ "$v" != "$b" ] && [ -x "$G/gpu_vs_oracle_$v" ]; then
      # VAR_TESTS: libtest filters for these runs (e.g. "dense longnet"; default: all).
      timeout ${TEST_TIMEOUT:-420} "$G/gpu_vs_oracle_$v" --ignored --test-threads=1 --nocapture \
        ${VAR_TESTS:-} > "$O/${tag}_tests_$v.log" 2>&1 &
      tested="$tested $v"
    else
      timeout 300 "$G/$b" --quick --max-n 16384 --defaults-only --no-bwd > "$O/${tag}_warm_$b.txt" 2>&1 &
      logs="$logs ${tag}_warm_$b.txt"
    fi
  done
  wait
  echo "$stage: warm-up done $(( $(date +%s) - t0 )) s"
  for v in $tested; do
    echo "tests $v: $(grep -E 'test result' "$O/${tag}_tests_$v.log" || echo 'none / not finished')"
  done
  for r in $(seq 1 "$rounds"); do
    for b in "$@"; do
      timeout 200 "$G/$b" $args > "$O/${tag}_${b}_$r.txt" 2>&1
      echo "$b round $r exit $?"
      logs="$logs ${tag}_${b}_$r.txt"
    done
  done
  echo "$stage: rounds done $(( $(date +%s) - t0 )) s"
  # Each build's round logs by name (no glob: gpu_bench_x would also match gpu_bench_x_2's).
  runs() { local i; for i in $(seq 1 "$rounds"); do echo "$O/${tag}_$1_$i.txt"; done; }
  for b in "$@"; do
    [ "$b" = gpu_bench_base ] && continue
    [ "$b" != gpu_bench ] && echo "== ${b#gpu_bench_} against the base"
    python3 "$G/ab_compare.py" $(runs "$b") -- $(runs gpu_bench_base)
  done | tee "$O/$stage.txt"
  ( cd "$O" && tar cf "${stage}_runs.tar" $logs && rm -f $logs )
}
if named ab; then
  # This build's bench against the base revision's (staged by gpu_check.sh with BASE_REV), in
  # one call: both modules warmed, AB_ROUNDS (default 2) rounds, this build first; ab.txt.
  time_against_base ab ab 2 gpu_bench gpu_bench_base
fi
if named variants; then
  # Several builds of one change in one call (stop 17: three variants of the backward's
  # turns, their tests and 4 rounds in ~300 s). Stage, besides BASE_REV's gpu_bench_base,
  # one pair per variant: build it here (cargo test --release --features cuda --test
  # gpu_vs_oracle --no-run; cargo bench --features cuda --bench gpu_bench --no-run) and copy
  # the two binaries to .gpu/gpu_vs_oracle_<v> and .gpu/gpu_bench_<v>. Every variant's
  # oracle tests run side by side as its warm-up (their module compiles overlap), the base
  # bench's beside them; then AB_ROUNDS (default 4) rounds, the base first, and each variant
  # against the base; variants.txt.
  time_against_base variants var 4 gpu_bench_base \
    $(cd "$G" && ls gpu_bench_* 2>/dev/null | grep -vx gpu_bench_base)
fi
