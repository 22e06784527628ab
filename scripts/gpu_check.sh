#!/usr/bin/env bash
# Build the GPU test and bench binaries on this (GPU-less) machine, stage them with the
# peer script and the run script into a folder (default: .gpu/ at the repository root,
# git-ignored; override with GPU_STAGE_DIR), and print the one device command that runs
# them all on the GPU machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=${GPU_STAGE_DIR:-$root/.gpu}

exe() { # the executable that cargo reports for a target
  grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//' | grep "$1" | tail -1
}
test_bin=$(cargo test --release --features cuda --test gpu_vs_oracle --no-run --message-format=json 2>/dev/null | exe gpu_vs_oracle)
bench_bin=$(cargo bench --features cuda --bench gpu_bench --no-run --message-format=json 2>/dev/null | exe gpu_bench)
ring_bin=$(cargo test --release --features nccl,cuda --test gpu_ring --no-run --message-format=json 2>/dev/null | exe gpu_ring)
nccl_bin=$(cargo test --release --features nccl,cuda --test nccl_ring --no-run --message-format=json 2>/dev/null | exe nccl_ring)
ring_bench_bin=$(cargo bench --features nccl,cuda --bench gpu_ring_bench --no-run --message-format=json 2>/dev/null | exe gpu_ring_bench)
cargo build --release --features nccl,cuda --example ring_nccl 2>/dev/null
example_bin=target/release/examples/ring_nccl
[ -n "$test_bin" ] && [ -n "$bench_bin" ] && [ -n "$ring_bin" ] && [ -n "$nccl_bin" ] \
  && [ -n "$ring_bench_bin" ] && [ -x "$example_bin" ] || { echo "build failed" >&2; exit 1; }

rm -rf "$stage"
mkdir -p "$stage"
cp "$test_bin" "$stage/gpu_vs_oracle"
cp "$bench_bin" "$stage/gpu_bench"
cp "$ring_bin" "$stage/gpu_ring"
cp "$nccl_bin" "$stage/nccl_ring"
cp "$ring_bench_bin" "$stage/gpu_ring_bench"
cp "$example_bin" "$stage/ring_nccl"
strip "$stage"/gpu_vs_oracle "$stage"/gpu_bench "$stage"/gpu_ring "$stage"/nccl_ring \
  "$stage"/gpu_ring_bench "$stage"/ring_nccl 2>/dev/null || true
cp benches/peers/torch_dilated.py "$stage/"
# stage_module [CARGO_ARGS...]: builds precompile_kernels (this checkout's, or with
# CARGO_ARGS "--manifest-path <worktree>/Cargo.toml --target-dir <here>" a worktree's),
# compiles its module into target/precompiled-kernels (named by the sources' key: a file
# already there is kept) and copies it into $stage/kernels; prints its path.
stage_module() {
  local cubin
  cargo build --release "$@" --features cuda --example precompile_kernels 2>/dev/null || return 1
  cubin=$(LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    target/release/examples/precompile_kernels sm_90a target/precompiled-kernels | cut -d: -f1) || return 1
  [ -n "$cubin" ] && cp "$cubin" "$stage/kernels/" && echo "$cubin"
}
# The kernels, compiled here ahead of time with NVRTC 13.0 (the GPU machine's CUDA version;
# NVIDIA's PyPI wheel, fetched once by ptx_check.py into its cache folder) into the folder
# the run script points DILATED_ATTENTION_KERNEL_CACHE at: every process there (tests,
# sanitizers, bench) then loads the module instead of compiling it (~150 s on a fresh
# machine until stop 22). The same SASS ptx_check.py shows. PRECOMPILE=0 skips it.
if [ "${PRECOMPILE:-1}" != 0 ]; then
  nvrtc_lib=$(python3 -c 'import sys; sys.path.insert(0, "scripts"); import ptx_check; print(ptx_check.toolkit()[0])')
  mkdir -p "$stage/kernels"
  cubin=$(stage_module) || { echo "precompile failed (PRECOMPILE=0 stages without)" >&2; exit 1; }
  echo "kernels: $cubin"
fi
cp scripts/gpu_run.sh "$stage/run_all.sh"
cp scripts/ab_compare.py "$stage/"
# at_rev REV TARGET...: builds TARGET (gpu_bench, gpu_vs_oracle) at git revision REV from a
# temporary worktree into this target folder (only the crate itself recompiles), prints each
# executable's path, one per line, and (PRECOMPILE, as above) puts that revision's module
# into $stage/kernels, so that its processes on the device load it instead of compiling it
# (~140 s each on a fresh machine: stop 35 staged this by hand).
at_rev() {
  local rev=$1 wt t bin
  shift
  wt=$(mktemp -d)
  git worktree add -q --detach "$wt" "$rev"
  for t in "$@"; do
    case $t in
      gpu_bench) bin=$(cargo bench --manifest-path "$wt/Cargo.toml" --target-dir "$root/target" \
        --features cuda --bench gpu_bench --no-run --message-format=json 2>/dev/null | exe gpu_bench || true) ;;
      gpu_vs_oracle) bin=$(cargo test --release --manifest-path "$wt/Cargo.toml" --target-dir "$root/target" \
        --features cuda --test gpu_vs_oracle --no-run --message-format=json 2>/dev/null | exe gpu_vs_oracle || true) ;;
    esac
    [ -n "$bin" ] || { git worktree remove --force "$wt"; echo "build of $t at $rev failed" >&2; return 1; }
    echo "$bin"
  done
  if [ "${PRECOMPILE:-1}" != 0 ]; then
    stage_module --manifest-path "$wt/Cargo.toml" --target-dir "$root/target" >&2 \
      || { git worktree remove --force "$wt"; echo "precompile at $rev failed" >&2; return 1; }
  fi
  git worktree remove --force "$wt"
  # The worktree's build shares this target folder; without a fresh mtime here, the next
  # cargo build of this checkout linked a bench against the base's library (seen in stop 23).
  touch src/lib.rs
}
# BASE_REV=<git revision>: also the bench of that revision, as gpu_bench_base, for the `ab`
# and `variants` stages (the builds timed in one call, alternating), with its module.
if [ -n "${BASE_REV:-}" ]; then
  base_bin=$(at_rev "$BASE_REV" gpu_bench) || exit 1
  cp "$base_bin" "$stage/gpu_bench_base"
  strip "$stage/gpu_bench_base" 2>/dev/null || true
  echo "gpu_bench_base: the bench at $BASE_REV ($(git rev-parse --short "$BASE_REV"))"
fi
# VARIANTS="<name>=<git revision> ...": for the `variants` stage, each revision's oracle
# tests and bench as gpu_vs_oracle_<name> / gpu_bench_<name>, with its module (e.g. stop
# 35's VARIANTS="fold=5217af1 dqo=476e24e" with BASE_REV=HEAD).
for nv in ${VARIANTS:-}; do
  name=${nv%%=*}
  bins=$(at_rev "${nv#*=}" gpu_vs_oracle gpu_bench) || exit 1
  cp "$(echo "$bins" | sed -n 1p)" "$stage/gpu_vs_oracle_$name"
  cp "$(echo "$bins" | sed -n 2p)" "$stage/gpu_bench_$name"
  strip "$stage/gpu_vs_oracle_$name" "$stage/gpu_bench_$name" 2>/dev/null || true
  echo "gpu_vs_oracle_$name, gpu_bench_$name: at ${nv#*=} ($(git rev-parse --short "${nv#*=}"))"
done
du -sh "$stage"
cat <<MSG
Staged into $stage. On the device tool (it ships the lead checkout; stage there with
GPU_STAGE_DIR=<that checkout>/.gpu), run:
  run  carry=[".gpu"]  command="bash .gpu/run_all.sh"              (1 GPU: kind nvidia-h200)
  run  carry=[".gpu"]  command="bash .gpu/run_all.sh ring ringbench" (kind nvidia-h200-x2)
(stages: tests sanitize bench peers quick ring ringbench profile ab variants; default all but ring,
ringbench, profile, ab, variants; ab and variants need BASE_REV here: this build, or each
VARIANTS build (gpu_bench_<v> / gpu_vs_oracle_<v>), against that one,
same call; results in ab.txt / variants.txt, round logs in ab_runs.tar / variants_runs.tar)
A call may run 600 s at most; where the stages together need more (without the staged
kernels, PRECOMPILE=0, the module's first compile and load on a fresh H200 alone took
~140 s, the whole tests stage ~200 s with it, racecheck ~190 s: stop 16),
split it:
  command="bash .gpu/run_all.sh tests sanitize", then command="bash .gpu/run_all.sh bench peers quick"
MSG
