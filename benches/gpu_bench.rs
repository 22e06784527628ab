//! GPU benchmark (feature `cuda`): bf16, H = 16, D = 128, CUDA-event timing, median of
//! several runs after warm-up, random normal inputs.
//!
//! * dense attention (schedule `[(N, 1)]`), N = 16K, 64K, causal or not: forward and
//!   forward + backward;
//! * dilated attention, schedule `[(2048,1),(4096,2),(8192,4),(16384,8)]`, N = 16K … 1M,
//!   head-group combine and LSE combine: forward.
//!
//! FLOPs: forward `4·D` per attended (query, key) pair (`Plan::attended_pairs`, causal
//! halves), backward 2.5× forward. Writes one JSON record per measurement to `--json FILE`
//! and, with `--check-dir DIR`, the inputs and outputs of three small configurations for
//! the PyTorch peers (`benches/peers/torch_dilated.py`), which check their own output
//! against ours before timing and print the ratios.
//!
//! `cargo bench --features cuda --bench gpu_bench -- --json out.json [--quick] [--max-n N]
//! [--no-bwd] [--no-dense] [--defaults-only | --variants a,b]` (only the default kernels, no
//! alternatives; or only the named alternatives of `FWD_VARIANTS` / `BWD_VARIANTS`).
//! `--no-dense` skips the dense problems, so that a profiler's first launch of a kernel is a
//! dilated problem's.

#[path = "common/gpu.rs"]
mod gpu_common;

use std::io::Write;

use cudarc::driver::CudaSlice;
use dilated_attention::ops::dilated::cuda as gpu;
use dilated_attention::prelude::*;
use dilated_attention::tensor::cuda::{Cuda, KernelPref};
use gpu_common::rand_buf;
use half::bf16;

const H: usize = 16;
const D: usize = 128;

struct Args {
    json: Option<String>,
    check_dir: Option<String>,
    quick: bool,
    max_n: usize,
    /// Lengths below this are skipped (`--min-n`: a profile of one length's first launch).
    min_n: usize,
    bwd: bool,
    /// Skip the dense problems (`--no-dense`).
    no_dense: bool,
    /// Also time the alternative kernels (the [`FWD_VARIANTS`] and [`BWD_VARIANTS`]).
    variants: bool,
    /// Only these variants (labels), when given.
    only: Option<Vec<String>>,
}

impl Args {
    fn wants(&self, label: &str) -> bool {
        self.variants
            && self
                .only
                .as_ref()
                .is_none_or(|o| o.iter().any(|x| x == label))
    }
}

/// A kernel choice other than the default, timed beside it in the same run: the label
/// (`fwd-<label>` / `fwdbwd-<label>` in the output) and how to select it (`true`) or go
/// back to the default (`false`). Hopper only.
type Variant = (&'static str, fn(&Cuda, bool));

/// The mma.sync kernels on Hopper (`true`) or the default preference (`false`).
fn mma_sync(d: &Cuda, on: bool) {
    d.set_kernel_pref(if on {
        KernelPref::MmaSync
    } else {
        KernelPref::Auto
    })
}

/// Forward alternatives: the mma.sync kernels, the lockstep wgmma forward (`fwd_wg`), the
/// warp-specialised forward without the intra-warpgroup overlap (`fwd_ws`), the overlapped
/// one without persistence (`fwd_wsot`), persistence for causal problems too (`fwd_wspt`
/// with tiles dealt in pairs; the same as the default on non-causal ones), Q as the
/// register A operand of `S = Q·Kᵀ` (`fwd_wspr` / `fwd_wsor`), K/V tiles by cp.async
/// (`fwdcp`: `fwd_wsp` / `fwd_wso`, the default until stop 20; the default since has them by
/// tensor-map box loads: `fwd_wspt` / `fwd_wsot`), 176-key tiles (`fwd_wspwt`
/// where the default is persistent, `fwd_wsowt` elsewhere; `wideo`: `fwd_wsowt` throughout;
/// `widecp`: 176-key tiles by cp.async, `fwd_wspw` / `fwd_wsow`), the persistent forward
/// storing an item's output under the next item's first MMA (`xitem`: `fwd_wspx`), its
/// 4-byte stores as up to stop 26 (`stores4`: `fwd_wspt`; the default since stop 27,
/// `fwd_wsps`, stores 16 bytes per instruction), two Q buffers and two K/V stages
/// (`qdouble`: `fwd_wspq`), work items crossed in one turn on two Q tiles, two K and three
/// V stages (`xcross`: `fwd_wspi`), the persistent forward's head-group items dealt in the
/// grid's order (`griddeal`; by default the items with keys are dealt apart from the keyless
/// ones, evenly).
const FWD_VARIANTS: &[Variant] = &[
    ("mma", mma_sync),
    ("wg", |d, on| d.set_warp_specialized(!on)),
    ("ws", |d, on| d.set_fwd_overlap(!on)),
    ("wso", |d, on| d.set_fwd_persistent(!on)),
    ("wspc", |d, on| d.set_fwd_persistent_causal(on)),
    ("wsr", |d, on| d.set_fwd_reg_operands(on)),
    ("fwdcp", |d, on| d.set_fwd_tma_loads(!on)),
    ("oldwaits", |d, on| d.set_wait_block_ends(!on)),
    ("xitem", |d, on| d.set_fwd_deferred_stores(on)),
    ("stores4", |d, on| d.set_fwd_vector_stores(!on)),
    ("qdouble", |d, on| d.set_fwd_double_q(on)),
    ("xcross", |d, on| d.set_fwd_cross_items(on)),
    ("griddeal", |d, on| d.set_fwd_keyed_first(!on)),
    ("wide", |d, on| d.set_fwd_wide_tiles(on)),
    ("widecp", |d, on| {
        d.set_fwd_wide_tiles(on);
        d.set_fwd_tma_loads(!on)
    }),
    ("wideo", |d, on| {
        d.set_fwd_wide_tiles(on);
        d.set_fwd_persistent(!on)
    }),
];

/// Backward alternatives (the default on Hopper: `bwd_wgt2`, the fused backward with its dQ
/// through the tensor memory accelerator and a staging buffer per warpgroup, at D = 128
/// with query tiles of 80 rows and a producer warpgroup for their Q/dO tiles and metadata,
/// `bwd_wgt2wp`, its metadata split into arrays, `bwd_wgt2ws`, on non-causal problems without
/// causal limits, `bwd_wgt2wsn`): the metadata as one record per query (`bwd_wgt2wp`,
/// `aosmeta`), the causal kernel on non-causal problems too (`causalkern`), the 80-row tiles
/// without the producer (`bwd_wgt2w`, `noproducer`), query
/// tiles of 64 rows at D = 128 too (`bwd_wgt2`, `narrowq`), its Q/dO tiles by tensor-map box
/// loads (`bwd_wgt3`, `tmaloads`), the mma.sync
/// kernels, the two passes (`dq_wgr` + `dkdv_wg`, the default until stop 20), fused dQ by
/// per-thread atomics with the ping-pong turns (`bwd_wgp`), one staging buffer for both
/// warpgroups (`bwd_wgt`), the fused kernel in lockstep (`bwd_wg`), the lockstep two-pass
/// backward (`dq_wgs` + `dkdv_wgs`), Q/dO from shared memory in the dQ pass (`dq_wg`), the
/// deferred MMA waits (`dq_wgrd` + `dkdv_wgd`).
const BWD_VARIANTS: &[Variant] = &[
    ("mma", mma_sync),
    ("twopass", |d, on| d.set_fused_dq(!on)),
    ("fused", |d, on| d.set_fused_dq_tma(!on)),
    ("fusedt", |d, on| d.set_fused_dq_tma_split(!on)),
    ("tmaloads", |d, on| d.set_fused_tma_loads(on)),
    ("narrowq", |d, on| d.set_bwd_wide_tiles(!on)),
    ("noproducer", |d, on| d.set_bwd_producer(!on)),
    ("aosmeta", |d, on| d.set_bwd_split_meta(!on)),
    ("causalkern", |d, on| d.set_bwd_noncausal_kernel(!on)),
    ("fusedls", |d, on| d.set_bwd_pingpong(!on)),
    ("lockstep", |d, on| {
        d.set_fused_dq(!on);
        d.set_bwd_pingpong(!on)
    }),
    ("smema", |d, on| {
        d.set_fused_dq(!on);
        d.set_bwd_reg_operands(!on)
    }),
    ("deferred", |d, on| {
        d.set_fused_dq(!on);
        d.set_bwd_deferred_waits(on)
    }),
];

fn args() -> Args {
    let mut a = Args {
        json: None,
        check_dir: None,
        quick: false,
        max_n: 1 << 20,
        min_n: 0,
        bwd: true,
        no_dense: false,
        variants: true,
        only: None,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        match v[i].as_str() {
            "--json" => {
                a.json = v.get(i + 1).cloned();
                i += 1;
            }
            "--check-dir" => {
                a.check_dir = v.get(i + 1).cloned();
                i += 1;
            }
            "--max-n" => {
                a.max_n = v.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(a.max_n);
                i += 1;
            }
            "--min-n" => {
                a.min_n = v.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(a.min_n);
                i += 1;
            }
            "--quick" => a.quick = true,
            "--no-bwd" => a.bwd = false,
            "--no-dense" => a.no_dense = true,
            "--defaults-only" => a.variants = false,
            "--variants" => {
                a.only = v
                    .get(i + 1)
                    .map(|s| s.split(',').map(str::to_string).collect());
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// Median milliseconds of `f` over CUDA events, after warm-up.
fn time_ms(dev: &Cuda, quick: bool, mut f: impl FnMut()) -> f64 {
    use cudarc::driver::sys::CUevent_flags;
    let ev = || {
        dev.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap()
    };
    let once = || {
        let (s, e) = (ev(), ev());
        s.record(dev.stream()).unwrap();
        (s, e)
    };
    // Warm-up, and a first estimate to choose the repetitions.
    f();
    dev.synchronize().unwrap();
    let (s, e) = once();
    f();
    e.record(dev.stream()).unwrap();
    let first = s.elapsed_ms(&e).unwrap() as f64;
    let reps = if quick || first > 500.0 {
        2
    } else if first > 50.0 {
        5
    } else {
        15
    };
    let mut ts = vec![first];
    for _ in 0..reps {
        let (s, e) = once();
        f();
        e.record(dev.stream()).unwrap();
        ts.push(s.elapsed_ms(&e).unwrap() as f64);
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ts[ts.len() / 2]
}

/// Time `run` on the default kernels, then under each of `variants` that the arguments
/// ask for (Hopper only); `emit((pass label, ms, peak bytes))` for each: `pass` (with the
/// peak of one call), then `pass-<label>`.
fn time_variants(
    dev: &Cuda,
    a: &Args,
    pass: &str,
    variants: &[Variant],
    mut run: impl FnMut(),
    mut emit: impl FnMut((&str, f64, Option<u64>)),
) {
    let ms = time_ms(dev, a.quick, &mut run);
    emit((pass, ms, Some(peak_bytes(dev, &mut run))));
    for &(label, set) in variants {
        if dev.is_hopper() && a.wants(label) {
            set(dev, true);
            let ms = time_ms(dev, a.quick, &mut run);
            set(dev, false);
            emit((&format!("{pass}-{label}"), ms, None));
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Peak bytes of the device pool's allocations during one call of `run` (what is already
/// allocated, the inputs, included; outputs freed at the end of the call count too).
fn peak_bytes(dev: &Cuda, run: &mut impl FnMut()) -> u64 {
    dev.synchronize().unwrap();
    dev.reset_peak_memory().unwrap();
    run();
    dev.synchronize().unwrap();
    dev.peak_memory().unwrap()
}

fn longnet4() -> Vec<Pattern> {
    vec![
        Pattern::new(2048, 1),
        Pattern::new(4096, 2),
        Pattern::new(8192, 4),
        Pattern::new(16384, 8),
    ]
}

fn write_raw<T: Copy>(path: &str, data: &[T]) {
    // SAFETY: T is a plain numeric type (bf16 / f32); viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
    };
    std::fs::write(path, bytes).unwrap();
}

fn main() {
    let a = args();
    let dev = match Cuda::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_bench skipped: {e}");
            return;
        }
    };
    let name = dev.name().unwrap_or_default();
    println!("device: {name}");
    let t = std::time::Instant::now();
    gpu::warm_up(&dev).unwrap();
    println!(
        "kernels compiled and loaded in {:.1} s (from cache: {:?})",
        t.elapsed().as_secs_f64(),
        gpu::module_info(&dev).map(|i| i.loaded_from)
    );
    let mut recs: Vec<String> = Vec::new();
    // One record: the pass's median time and, for the default kernels, the peak of the
    // device pool's allocations during one call (inputs included).
    let mut emit = |kind: &str,
                    n: usize,
                    causal: bool,
                    combine: &str,
                    (pass, ms, peak): (&str, f64, Option<u64>),
                    flops: f64| {
        let tf = flops / (ms * 1e-3) / 1e12;
        let gib = peak.map_or(String::new(), |b| {
            format!("  peak {:.2} GiB", b as f64 / GIB)
        });
        println!(
            "{kind:8} n={n:8} causal={causal:5} combine={combine:10} {pass:7} {ms:10.3} ms {tf:8.1} TFLOP/s{gib}"
        );
        let peak = peak.map_or("null".to_string(), |b| b.to_string());
        recs.push(format!(
            "{{\"kind\":\"{kind}\",\"n\":{n},\"causal\":{causal},\"combine\":\"{combine}\",\"pass\":\"{pass}\",\"ms\":{ms},\"tflops\":{tf},\"flops\":{flops},\"peak_bytes\":{peak},\"device\":\"{name}\"}}"
        ));
    };

    // Dense.
    for &n in &[16384usize, 65536] {
        if n > a.max_n || n < a.min_n || a.no_dense {
            continue;
        }
        let q = rand_buf(&dev, n * H * D, 1);
        let k = rand_buf(&dev, n * H * D, 2);
        let v = rand_buf(&dev, n * H * D, 3);
        let go = rand_buf(&dev, n * H * D, 4);
        for causal in [false, true] {
            let plan = Plan::new(
                Dims::mha(1, n, H, D),
                &[Pattern::new(n, 1)],
                Options::default().causal(causal),
            )
            .unwrap();
            let fl = 4.0 * plan.attended_pairs() as f64 * D as f64;
            let run_fwd = || {
                gpu::try_forward(&dev, &plan, &q, &k, &v, None).unwrap();
            };
            time_variants(&dev, &a, "fwd", FWD_VARIANTS, run_fwd, |r| {
                emit("dense", n, causal, "-", r, fl)
            });
            if a.bwd {
                let run = || {
                    let f = gpu::try_forward(&dev, &plan, &q, &k, &v, None).unwrap();
                    gpu::try_backward(&dev, &plan, &q, &k, &v, None, &f.out, &f.lse, &go).unwrap();
                };
                time_variants(&dev, &a, "fwdbwd", BWD_VARIANTS, run, |r| {
                    emit("dense", n, causal, "-", r, 3.5 * fl)
                });
            }
            if let (Some(dir), true, 16384) = (&a.check_dir, causal, n) {
                dump(&dev, dir, "dense", &plan, &q, &k, &v);
            }
        }
    }

    // Dilated.
    for &n in &[16384usize, 65536, 262144, 1 << 20] {
        if n > a.max_n || n < a.min_n {
            continue;
        }
        let q = rand_buf(&dev, n * H * D, 5);
        let k = rand_buf(&dev, n * H * D, 6);
        let v = rand_buf(&dev, n * H * D, 7);
        for (combine, cname) in [(Combine::HeadGroups, "headgroups"), (Combine::Lse, "lse")] {
            let plan = Plan::new(
                Dims::mha(1, n, H, D),
                &longnet4(),
                Options::default().combine(combine),
            )
            .unwrap();
            let fl = 4.0 * plan.attended_pairs() as f64 * D as f64;
            let run_fwd = || {
                gpu::try_forward(&dev, &plan, &q, &k, &v, None).unwrap();
            };
            time_variants(&dev, &a, "fwd", FWD_VARIANTS, run_fwd, |r| {
                emit("dilated", n, false, cname, r, fl)
            });
            if a.bwd && n <= 65536 {
                let go = &q; // any random tensor of the right shape
                let run = || {
                    let f = gpu::try_forward(&dev, &plan, &q, &k, &v, None).unwrap();
                    gpu::try_backward(&dev, &plan, &q, &k, &v, None, &f.out, &f.lse, go).unwrap();
                };
                time_variants(&dev, &a, "fwdbwd", BWD_VARIANTS, run, |r| {
                    emit("dilated", n, false, cname, r, 3.5 * fl)
                });
            }
            if let (Some(dir), 16384) = (&a.check_dir, n) {
                dump(&dev, dir, &format!("dilated_{cname}"), &plan, &q, &k, &v);
            }
        }
    }

    if let Some(path) = &a.json {
        let mut f = std::fs::File::create(path).unwrap();
        writeln!(f, "[\n{}\n]", recs.join(",\n")).unwrap();
        println!("wrote {path}");
    }
}

/// Inputs and our outputs of one configuration, for the peers' own check.
fn dump(
    dev: &Cuda,
    dir: &str,
    tag: &str,
    plan: &Plan,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let f = gpu::try_forward(dev, plan, q, k, v, None).unwrap();
    for (name, buf) in [("q", q), ("k", k), ("v", v), ("out", &f.out)] {
        write_raw(&format!("{dir}/{tag}_{name}.bin"), &dev.dtoh(buf).unwrap());
    }
    write_raw(&format!("{dir}/{tag}_lse.bin"), &dev.dtoh(&f.lse).unwrap());
    let dm = plan.dims();
    let pats: Vec<String> = plan
        .patterns()
        .iter()
        .map(|p| format!("[{},{}]", p.segment, p.dilation))
        .collect();
    std::fs::write(
        format!("{dir}/{tag}.json"),
        format!(
            "{{\"n\":{},\"h\":{},\"d\":{},\"causal\":{},\"combine\":\"{:?}\",\"schedule\":[{}]}}",
            dm.seq,
            dm.heads,
            dm.head_dim,
            plan.options().causal,
            plan.options().combine,
            pats.join(",")
        ),
    )
    .unwrap();
}
