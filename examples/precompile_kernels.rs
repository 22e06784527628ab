//! Compile the CUDA kernels ahead of time, on a machine with NVRTC but no GPU.
//!
//! ```text
//! cargo run --release --features cuda --example precompile_kernels -- [ARCH] [DIR]
//! ```
//!
//! `ARCH` is NVRTC's target (default `sm_90a`, Hopper; `sm_80`, `sm_89`, ... for others),
//! `DIR` the folder (default `kernels`). A process with
//! `DILATED_ATTENTION_KERNEL_CACHE=DIR` then loads the module from there instead of
//! compiling it (about 90 s of NVRTC for `sm_90a`), as long as the crate's kernel sources,
//! the target and NVRTC's major.minor version are the same; otherwise it compiles as
//! usual and adds its own file. `scripts/gpu_check.sh` uses this for the device runs.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "sm_90a".into());
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "kernels".into()));
    let t = std::time::Instant::now();
    match dilated_attention::ops::dilated::cuda::precompile(&arch, &dir) {
        Ok(path) => println!(
            "{}: {} bytes, in {:.1} s (a file already there is kept)",
            path.display(),
            std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            t.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("precompile for {arch}: {e}");
            std::process::exit(1);
        }
    }
}
