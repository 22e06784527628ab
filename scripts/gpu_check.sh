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
[ -n "$test_bin" ] && [ -n "$bench_bin" ] || { echo "build failed" >&2; exit 1; }

rm -rf "$stage"
mkdir -p "$stage"
cp "$test_bin" "$stage/gpu_vs_oracle"
cp "$bench_bin" "$stage/gpu_bench"
strip "$stage/gpu_vs_oracle" "$stage/gpu_bench" 2>/dev/null || true
cp benches/peers/torch_dilated.py "$stage/"
cp scripts/gpu_run.sh "$stage/run_all.sh"
du -sh "$stage"
cat <<MSG
Staged into $stage. On the device tool (it ships the lead checkout; stage there with
GPU_STAGE_DIR=<that checkout>/.gpu), run:
  run  carry=[".gpu"]  command="bash .gpu/run_all.sh"
(stages: tests sanitize bench peers quick; default all)
MSG
