#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, over the folder staged by
# scripts/gpu_check.sh (.gpu/): GPU tests against the oracle, compute-sanitizer memcheck and
# racecheck, the bench, then the PyTorch peers (same call, ratios printed last).
# Usage: bash .gpu/run_all.sh [tests] [sanitize] [bench] [peers] [quick]   (default: all)
#        named-only stages: ring, ringbench (2 GPUs), profile (Nsight Compute),
#        ab (gpu_bench against gpu_bench_base, staged by gpu_check.sh with BASE_REV),
#        variants (every staged gpu_bench_<v> / gpu_vs_oracle_<v> pair: tested, then timed
#        against gpu_bench_base in alternating rounds; see below)
# Logs go to $OUT (or /tmp/gpu_out).
set -u
G=.gpu
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
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
    echo "== compute-sanitizer $tool (sanitizer_small)"
    # SAN_TIMEOUT (seconds, default 300): a hung kernel under the sanitizer ends this run only.
    timeout ${SAN_TIMEOUT:-300} "$SAN" --tool $tool --error-exitcode 9 "$G/gpu_vs_oracle" --ignored --test-threads=1 --exact sanitizer_small > "$O/$tool.log" 2>&1
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
  # per kernel).
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
if named ab; then
  # This build's bench against the base revision's, in one call: first both modules compiled
  # at once (each process's first use JIT-compiles its module, ~140 s on a fresh machine),
  # then AB_ROUNDS (default 2) alternating rounds of AB_ARGS, and the comparison (best round
  # of each build; + means this build is faster).
  if [ -x "$G/gpu_bench_base" ]; then
    AB=${AB_ARGS:---quick --max-n 65536 --defaults-only}
    echo "== ab: warm-up (both modules)"
    for b in gpu_bench gpu_bench_base; do
      timeout 300 "$G/$b" --quick --max-n 16384 --defaults-only --no-bwd > "$O/ab_warm_$b.txt" 2>&1 &
    done
    wait
    news="" bases=""
    for r in $(seq 1 "${AB_ROUNDS:-2}"); do
      for b in gpu_bench gpu_bench_base; do
        timeout 200 "$G/$b" $AB > "$O/ab_${b}_$r.txt" 2>&1
        echo "$b round $r exit $?"
      done
      news="$news $O/ab_gpu_bench_$r.txt" bases="$bases $O/ab_gpu_bench_base_$r.txt"
    done
    python3 "$G/ab_compare.py" $news -- $bases | tee "$O/ab.txt"
  else
    echo "ab: no $G/gpu_bench_base (stage it with BASE_REV=<rev> bash scripts/gpu_check.sh)"
  fi
fi
if named variants; then
  # Several builds of one change in one call (stop 17: three variants of the backward's
  # turns, their tests and 4 rounds in ~300 s). Stage, besides BASE_REV's gpu_bench_base,
  # one pair per variant: build it here (cargo test --release --features cuda --test
  # gpu_vs_oracle --no-run; cargo bench --features cuda --bench gpu_bench --no-run) and copy
  # the two binaries to .gpu/gpu_vs_oracle_<v> and .gpu/gpu_bench_<v>. First every
  # variant's oracle tests side by side (their module compiles overlap) with the base
  # bench's module compiled beside them, then AB_ROUNDS (default 4) rounds of AB_ARGS with
  # all builds alternating, then each variant against the base (+: faster).
  if [ -x "$G/gpu_bench_base" ]; then
    vs=$(cd "$G" && ls gpu_bench_* 2>/dev/null | sed 's/^gpu_bench_//' | grep -vx base)
    AB=${AB_ARGS:---quick --max-n 65536 --defaults-only}
    t0=$(date +%s)
    timeout 300 "$G/gpu_bench_base" --quick --max-n 16384 --defaults-only --no-bwd > "$O/var_warm_base.txt" 2>&1 &
    for v in $vs; do
      [ -x "$G/gpu_vs_oracle_$v" ] && timeout ${TEST_TIMEOUT:-420} "$G/gpu_vs_oracle_$v" --ignored \
        --test-threads=1 --nocapture > "$O/var_tests_$v.log" 2>&1 &
    done
    wait
    echo "variants: tests and compiles $(( $(date +%s) - t0 )) s"
    for v in $vs; do
      echo "tests $v: $(grep -E 'test result' "$O/var_tests_$v.log" 2>/dev/null || echo 'none / not finished')"
    done
    for r in $(seq 1 "${AB_ROUNDS:-4}"); do
      for b in base $vs; do
        timeout 200 "$G/gpu_bench_$b" $AB > "$O/var_${b}_$r.txt" 2>&1 || echo "$b round $r failed"
      done
    done
    echo "variants: rounds done $(( $(date +%s) - t0 )) s"
    for v in $vs; do
      echo "== $v against the base"
      python3 "$G/ab_compare.py" $(ls "$O"/var_${v}_[0-9]*.txt) -- $(ls "$O"/var_base_[0-9]*.txt)
    done | tee "$O/variants.txt"
    # The device tool returns at most 8 files.
    ( cd "$O" && tar cf variants_runs.tar var_*.txt && rm -f var_*_[0-9]*.txt var_warm_base.txt )
  else
    echo "variants: no $G/gpu_bench_base (stage it with BASE_REV=<rev> bash scripts/gpu_check.sh)"
  fi
fi
