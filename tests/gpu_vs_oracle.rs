//! Every CUDA kernel against the float64 oracle on random problems (SPEC §5 tolerances).
//!
//! These tests need a CUDA GPU. Without one they are reported as *ignored*, never as
//! passed: run them on a GPU machine with
//! `cargo test --release --features cuda --test gpu_vs_oracle -- --ignored --test-threads=1`
//! (or the prebuilt binary with `--ignored`; see `scripts/gpu_check.sh`). Run that way on
//! a machine without a GPU, they fail.
//!
//! Inputs are random normal, drawn per case from a logged seed (the failing `Case` is
//! printed); outputs are poisoned with NaN before the kernels run; the oracle runs on the
//! inputs rounded to the kernel's dtype. Tolerances: `‖got − ref‖ / ‖ref‖ ≤ 1e-2` for
//! bf16/f16 and `1e-4` for f32, NaN never passes, `L` is `-inf` exactly where the oracle's is.
#![cfg(feature = "cuda")]

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use common::gpu::*;
use common::*;
use dilated_attention::ops::dilated::cuda as gpu;
use dilated_attention::ops::reference;
use dilated_attention::prelude::*;
use dilated_attention::tensor::cuda::{Cuda, CudaElement, KernelPref};
use proptest::prelude::*;

/// Backward variant the next checks use: `v % 3` is the tensor-core dK/dV kernel
/// (`Cuda::set_bwd_variant`), `v >= 3` runs dQ on 4 warps instead of 8.
static BWD: AtomicU8 = AtomicU8::new(2);

const NEEDS_GPU: &str = "needs a CUDA GPU: run with --ignored on the GPU machine";

fn dev() -> std::sync::MutexGuard<'static, Cuda> {
    static DEV: OnceLock<Mutex<Cuda>> = OnceLock::new();
    DEV.get_or_init(|| {
        let d = Cuda::new(0).expect("these tests need a CUDA GPU");
        d.set_poison(true);
        eprintln!("GPU: {}", d.name().unwrap_or_default());
        // The module's compile and load, timed, so that a slow first use (NVRTC, ~90 s for
        // sm_90a) is not mistaken for a hung kernel; with DILATED_ATTENTION_KERNEL_CACHE
        // naming a folder with a matching precompiled module, a load of well under 1 s.
        let t = std::time::Instant::now();
        gpu::warm_up(&d).expect("compile the kernels");
        eprintln!(
            "kernels compiled and loaded in {:.1} s ({}={:?})",
            t.elapsed().as_secs_f64(),
            gpu::KERNEL_CACHE_VAR,
            std::env::var_os(gpu::KERNEL_CACHE_VAR)
        );
        Mutex::new(d)
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// The float64 forward oracle of `case` in dtype `E`'s rounding, remembered for the next
/// calls with the same case and dtype (one entry per dtype: the tests check one case on
/// several kernels in a row, each in f32, bf16 and f16; the oracle of a 4K or 8K case takes
/// most of such a test's time).
fn oracle_forward<E: CudaElement>(
    case: &Case,
    plan: &Plan,
    qr: &[f64],
    kr: &[f64],
    vr: &[f64],
) -> Arc<reference::RefForward> {
    type Memo = Vec<(&'static str, String, Arc<reference::RefForward>)>;
    static LAST: Mutex<Memo> = Mutex::new(Vec::new());
    let key = format!("{case:?}");
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, want)) = last.iter().find(|(e, k, _)| *e == E::NAME && *k == key) {
        return want.clone();
    }
    let want = Arc::new(reference::forward(plan, qr, kr, vr, case.mask.as_deref()).unwrap());
    last.retain(|(e, _, _)| *e != E::NAME);
    last.push((E::NAME, key, want.clone()));
    want
}

/// Run forward (and backward) of `case` on the GPU in dtype `E` with kernel preference
/// `pref`; compare with the oracle. Returns the worst relative error seen.
///
/// Gradients are compared with the oracle's gradients *from the saved output*
/// ([`reference::backward_from_saved`] with the kernel's own rounded `out`): like
/// FlashAttention, the backward uses `Δ = rowsum(dO ∘ O)` from the saved output. Where a
/// row's exact `dS = P·(dP − Δ)` cancels (a query with a single key), bf16 rounding of `O`
/// (2⁻⁹) would otherwise dominate such rows; it is a property of the saved output, not of
/// the kernel.
fn check_w<E: CudaElement>(case: &Case, pref: KernelPref, grads: bool, warps: u8) -> f64 {
    let rel = if E::TENSOR_CORES { 1e-2 } else { 1e-4 };
    let lse_tol = if E::TENSOR_CORES { 2e-3 } else { 1e-5 };
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let ((qe, qr), (ke, kr), (ve, vr), (ge, gr)) = (
        round::<E>(&q),
        round::<E>(&k),
        round::<E>(&v),
        round::<E>(&go),
    );
    let want = oracle_forward::<E>(case, &plan, &qr, &kr, &vr);
    let dev = dev();
    // warps = 0: the default kernels (on Hopper the warp-specialised wgmma forward with the
    // intra-warpgroup overlap, its K/V tiles by tensor-map box loads where the rows are boxes,
    // persistent on non-causal problems: fwd_wsps / fwd_wsot; and the fused backward with
    // its dQ through the tensor memory accelerator and a staging buffer per warpgroup:
    // bwd_wgt2, at D = 128 with 80-row query tiles and a producer warpgroup: bwd_wgt2ws,
    // non-causal bwd_wgt2wsn (bwd_wgt2w where Q and dO are no boxes of its maps);
    // where a dilation divides neither N nor its segment the two-pass ping-pong wgmma
    // backward, its dQ pass with register A operands: dq_wgr + dkdv_wg, which every other
    // code below but 1, 9 and 12 runs); 1:
    // on Hopper the lockstep wgmma forward and the fused-dQ backward with the ping-pong turns
    // (bwd_wgp); 9: the fused-dQ backward in lockstep (bwd_wg); 10: the default forward
    // with Q as the register A operand of S = Q·Kᵀ (fwd_wspr, causal: fwd_wsor); 11: the
    // default forward with 176-key tiles (fwd_wspwt, causal: fwd_wsowt; 14: the same with
    // cp.async, fwd_wspw / fwd_wsow); 12: the forward with
    // its K/V tiles by cp.async (fwd_wsp, causal: fwd_wso) and the fused-dQ backward with its
    // dQ through the tensor memory accelerator and one staging buffer (bwd_wgt; the two
    // passes where a dilation divides neither N nor its segment); 13: the default with the
    // backward's Q/dO by tensor-map box loads too (bwd_wgt3); 15: the default with the
    // persistent forward as up to stop 21, without the block end before its wait for P·V
    // (fwd_wsptn; causal problems run fwd_wsot, as by default); 16: the default with the
    // fused backward's query tiles of 64 rows at D = 128 too (bwd_wgt2; the default there is
    // bwd_wgt2w, 80 rows); 17: the default with the persistent forward's output rows stored
    // under the next work item's first MMA (fwd_wspx; causal problems run fwd_wsot); 18: the
    // persistent forward's 4-byte stores at each item's end (fwd_wspt; the default, fwd_wsps,
    // stores 16 bytes per instruction); 19: the persistent forward with two
    // Q buffers and two K/V stages (fwd_wspq; causal problems run fwd_wsot); 20: the
    // persistent forward with its work items crossed in one turn, on two Q tiles, two K and
    // three V stages (fwd_wspi; causal problems run fwd_wsot); 21: the default with the
    // 80-row fused backward's Q/dO and metadata loaded by its consumer warpgroups, without
    // the producer warpgroup (bwd_wgt2w, the default of stops 24-32; elsewhere the
    // default); 22: the default with the producer backward's metadata as one record per query
    // (bwd_wgt2wp, the default of stop 33; the default since stop 34 splits it into arrays:
    // bwd_wgt2ws, for non-causal problems without causal limits: bwd_wgt2wsn); 23: the
    // default with the split metadata's causal kernel for non-causal problems too
    // (bwd_wgt2ws); 24: the default with the persistent forward's head-group items dealt in
    // the grid's order (fwd_wsps; by default the items with keys are numbered and dealt
    // apart from the keyless ones); 3: the
    // lockstep wgmma forward and the two-pass lockstep backward; 5: the warp-specialised forward without
    // the overlap; 6: the overlapped forward, not persistent, and the dQ pass reading Q and
    // dO from shared memory (dq_wg + dkdv_wg); 7: the backward with deferred MMA waits
    // (dq_wgrd + dkdv_wgd) and the persistent forward for causal problems
    // too (tiles dealt in pairs); 4 or 8: the mma.sync forward on that many warps; 2:
    // mma.sync, 4 warps with two row tiles per warp.
    dev.set_warp_specialized(warps != 1 && warps != 3);
    dev.set_fwd_overlap(warps != 5);
    dev.set_fwd_persistent(warps != 6);
    dev.set_fwd_persistent_causal(warps == 7);
    dev.set_fused_dq(matches!(
        warps,
        0 | 1 | 9 | 12 | 13 | 15 | 16 | 17 | 18 | 19 | 20 | 21 | 22 | 23 | 24
    ));
    dev.set_fused_dq_tma(matches!(
        warps,
        0 | 12 | 13 | 15 | 16 | 17 | 18 | 19 | 20 | 21 | 22 | 23 | 24
    ));
    dev.set_fused_dq_tma_split(matches!(
        warps,
        0 | 13 | 15 | 16 | 17 | 18 | 19 | 20 | 21 | 22 | 23 | 24
    ));
    dev.set_bwd_producer(warps != 21);
    dev.set_bwd_split_meta(warps != 22);
    dev.set_bwd_noncausal_kernel(warps != 23);
    dev.set_bwd_wide_tiles(warps != 16);
    dev.set_fused_tma_loads(warps == 13);
    dev.set_fwd_tma_loads(warps != 12 && warps != 14);
    dev.set_wait_block_ends(warps != 15);
    dev.set_fwd_deferred_stores(warps == 17);
    dev.set_fwd_vector_stores(warps != 18);
    dev.set_fwd_double_q(warps == 19);
    dev.set_fwd_cross_items(warps == 20);
    dev.set_fwd_keyed_first(warps != 24);
    dev.set_bwd_pingpong(warps != 3 && warps != 9);
    dev.set_bwd_reg_operands(warps != 6);
    dev.set_bwd_deferred_waits(warps == 7);
    dev.set_fwd_reg_operands(warps == 10);
    dev.set_fwd_wide_tiles(warps == 11 || warps == 14);
    let pref = if pref == KernelPref::Auto && matches!(warps, 2 | 4 | 8) {
        KernelPref::MmaSync
    } else {
        pref
    };
    dev.set_kernel_pref(pref);
    dev.set_fwd_warps(warps);
    dev.set_fwd_row_tiles(if warps == 2 { 2 } else { 1 });
    let bwd = BWD.load(Ordering::Relaxed);
    dev.set_bwd_variant(bwd % 3);
    dev.set_dq_warps(if bwd >= 3 { 4 } else { 8 });
    let (qd, kd, vd) = (
        dev.htod(&qe).unwrap(),
        dev.htod(&ke).unwrap(),
        dev.htod(&ve).unwrap(),
    );
    let md = gpu::mask_to_device(&dev, mask).unwrap();
    let f = gpu::try_forward(&dev, &plan, &qd, &kd, &vd, md.as_ref()).unwrap();
    let out = dev.dtoh(&f.out).unwrap();
    let lse = dev.dtoh(&f.lse).unwrap();
    let mut worst = check_norm(
        &format!("out ({})", E::NAME),
        &to64(&out),
        &want.out,
        rel,
        case.dims.head_dim,
        case,
    );
    check_lse(&lse, &want.lse, lse_tol, case);
    if grads {
        let saved = to64(&out);
        let gw = reference::backward_from_saved(&plan, &qr, &kr, &vr, mask, &gr, &saved).unwrap();
        let gd = dev.htod(&ge).unwrap();
        let g = gpu::try_backward(&dev, &plan, &qd, &kd, &vd, md.as_ref(), &f.out, &f.lse, &gd)
            .unwrap();
        for (name, got, want) in [
            ("dq", dev.dtoh(&g.dq).unwrap(), &gw.dq),
            ("dk", dev.dtoh(&g.dk).unwrap(), &gw.dk),
            ("dv", dev.dtoh(&g.dv).unwrap(), &gw.dv),
        ] {
            let what = format!("{name} ({})", E::NAME);
            worst = worst.max(check_norm(
                &what,
                &to64(&got),
                want,
                rel,
                case.dims.head_dim,
                case,
            ));
        }
    }
    dev.set_kernel_pref(KernelPref::Auto);
    dev.set_warp_specialized(true);
    dev.set_fwd_overlap(true);
    dev.set_fwd_persistent(true);
    dev.set_fwd_persistent_causal(false);
    dev.set_fused_dq(true);
    dev.set_fused_dq_tma(true);
    dev.set_fused_dq_tma_split(true);
    dev.set_fused_tma_loads(false);
    dev.set_bwd_wide_tiles(true);
    dev.set_fwd_tma_loads(true);
    dev.set_wait_block_ends(true);
    dev.set_bwd_pingpong(true);
    dev.set_bwd_reg_operands(true);
    dev.set_bwd_deferred_waits(false);
    dev.set_fwd_reg_operands(false);
    dev.set_fwd_wide_tiles(false);
    dev.set_fwd_warps(4);
    dev.set_fwd_row_tiles(2);
    dev.set_bwd_variant(2);
    dev.set_dq_warps(8);
    worst
}

/// A random case with the head dim replaced by one of `ds`.
fn case_with_d(max_n: usize, max_b: usize, ds: Vec<usize>) -> impl Strategy<Value = Case> {
    (case(max_n, max_b), prop::sample::select(ds)).prop_map(|(mut c, d)| {
        c.dims.head_dim = d;
        c
    })
}

fn all_dtypes(case: &Case, pref: KernelPref, grads: bool) {
    all_dtypes_w(case, pref, grads, 0)
}

fn all_dtypes_w(case: &Case, pref: KernelPref, grads: bool, warps: u8) {
    let e32 = check_w::<f32>(case, pref, grads, warps);
    let eb = check_w::<half::bf16>(case, pref, grads, warps);
    let eh = check_w::<half::f16>(case, pref, grads, warps);
    eprintln!(
        "ok {:?}/{warps}w/bwd{} n={} d={} G={} {:?} causal={} mask={} grads={grads} : rel err f32 {e32:.1e} bf16 {eb:.1e} f16 {eh:.1e}",
        pref,
        BWD.load(Ordering::Relaxed),
        case.dims.seq,
        case.dims.head_dim,
        case.schedule.len(),
        case.opts.combine,
        case.opts.causal,
        case.mask.is_some(),
    );
}

#[test]
fn new_without_gpu_is_err_not_panic() {
    // On a machine without CUDA this must return Err (not panic); with a GPU, Ok.
    match Cuda::new(0) {
        Ok(d) => eprintln!("GPU present: {}", d.name().unwrap_or_default()),
        Err(e) => eprintln!("no GPU (expected on CPU machines): {e}"),
    }
    assert!(Cuda::new(usize::MAX).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(60), ..ProptestConfig::default() })]

    /// Generic kernels (any D), every dtype, forward and gradients, the same random
    /// problems as the CPU proptests.
    #[test]
    #[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
    fn generic_kernels_match_oracle(case in case(40, 2)) {
        all_dtypes(&case, KernelPref::Generic, true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(60) / 3, ..ProptestConfig::default() })]

    /// Longer sequences (several tiles per segment) for the generic kernels.
    #[test]
    #[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
    fn generic_kernels_longer_sequences(case in case(300, 1)) {
        all_dtypes(&case, KernelPref::Generic, true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(60) / 2, ..ProptestConfig::default() })]

    /// Tensor-core forward (bf16/f16, D = 64, 128) on random schedules, masks, GQA.
    #[test]
    #[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
    fn tensor_core_kernels_match_oracle(case in case_with_d(200, 2, vec![64, 128])) {
        BWD.store(((case.seed / 3) % 6) as u8, Ordering::Relaxed);
        let w = [0, 1, 3, 4, 8, 2, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23][(case.seed % 24) as usize];
        all_dtypes_w(&case, KernelPref::Auto, true, w);
        BWD.store(2, Ordering::Relaxed);
    }
}

/// A LongNet-shaped schedule, scaled down: every head its own offsets, classes of rows
/// with uniform participation (the fast tiling), both combines, causal or not.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn longnet_schedule_matches_oracle() {
    let _ = NEEDS_GPU;
    let schedule = vec![
        Pattern::new(64, 1),
        Pattern::new(128, 2),
        Pattern::new(256, 4),
        Pattern::new(512, 8),
    ];
    let mut seed = 7;
    for d in [64, 128] {
        for combine in [Combine::Lse, Combine::HeadGroups] {
            for causal in [false, true] {
                seed += 1;
                let case = Case {
                    dims: Dims {
                        batch: 1,
                        seq: 1024,
                        heads: 8,
                        kv_heads: 4,
                        head_dim: d,
                    },
                    schedule: schedule.clone(),
                    opts: Options::default().combine(combine).causal(causal),
                    mask: None,
                    seed,
                };
                BWD.store((seed % 6) as u8, Ordering::Relaxed);
                all_dtypes_w(&case, KernelPref::Auto, true, 0);
                all_dtypes_w(&case, KernelPref::Auto, true, 12);
                all_dtypes_w(&case, KernelPref::Auto, true, 13);
                all_dtypes_w(&case, KernelPref::Auto, true, 15);
                all_dtypes_w(&case, KernelPref::Auto, true, 16);
                all_dtypes_w(&case, KernelPref::Auto, true, 17);
                all_dtypes_w(&case, KernelPref::Auto, true, 18);
                all_dtypes_w(&case, KernelPref::Auto, true, 19);
                all_dtypes_w(&case, KernelPref::Auto, true, 20);
                all_dtypes_w(&case, KernelPref::Auto, true, 21);
                all_dtypes_w(&case, KernelPref::Auto, true, 22);
                all_dtypes_w(&case, KernelPref::Auto, true, 23);
                BWD.store(2, Ordering::Relaxed);
                all_dtypes_w(
                    &case,
                    KernelPref::Auto,
                    true,
                    [1, 3, 9][(seed % 3) as usize],
                );
                let w = 5 + (seed % 3) as u8;
                all_dtypes_w(&case, KernelPref::Auto, true, w);
                all_dtypes_w(&case, KernelPref::Auto, false, 10);
                all_dtypes_w(&case, KernelPref::Auto, false, 11);
                all_dtypes_w(&case, KernelPref::Auto, false, 14);
                all_dtypes_w(&case, KernelPref::Auto, false, 4);
                all_dtypes_w(&case, KernelPref::Auto, false, 8);
                all_dtypes_w(&case, KernelPref::Auto, false, 2);
            }
        }
    }
}

/// The kernel module came from where the environment says: with
/// `DILATED_ATTENTION_KERNEL_CACHE` naming a folder (as the device runs stage it, with this
/// build's precompiled module in it), loaded from or written to that folder under the name
/// `precompile` gives for the device's target; without it, compiled by this process only.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn kernel_module_origin() {
    let dev = dev();
    let info = gpu::module_info(&dev).unwrap();
    eprintln!("{info:?}");
    match std::env::var_os(gpu::KERNEL_CACHE_VAR).filter(|d| !d.is_empty()) {
        Some(dir) => {
            let used = info
                .loaded_from
                .as_ref()
                .or(info.written_to.as_ref())
                .expect("with the cache folder set, the module is loaded from it or written to it");
            assert_eq!(used.parent(), Some(std::path::Path::new(&dir)));
            // The same file by name: precompile finds it there and compiles nothing.
            let again = gpu::precompile(&info.arch, std::path::Path::new(&dir)).unwrap();
            assert_eq!(&again, used);
        }
        None => assert!(
            info.loaded_from.is_none() && info.written_to.is_none(),
            "{info:?}"
        ),
    }
}

/// Dense attention is the schedule [(N, 1)]: causal, padding mask, detach.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn dense_matches_oracle() {
    for (d, causal, masked) in [(64, true, false), (128, false, true), (128, true, true)] {
        let n = 384;
        let mask = masked.then(|| (0..2 * n).map(|i| i % 7 != 3).collect());
        let case = Case {
            dims: Dims {
                batch: 2,
                seq: n,
                heads: 2,
                kv_heads: 1,
                head_dim: d,
            },
            schedule: vec![Pattern::new(n, 1)],
            opts: Options::default().causal(causal),
            mask,
            seed: 99 + d as u64,
        };
        all_dtypes(&case, KernelPref::Auto, true);
        all_dtypes_w(&case, KernelPref::Auto, true, 1);
        all_dtypes_w(&case, KernelPref::Auto, true, 12);
        all_dtypes_w(&case, KernelPref::Auto, true, 13);
        all_dtypes_w(&case, KernelPref::Auto, true, 9);
        all_dtypes_w(&case, KernelPref::Auto, true, 10);
        all_dtypes_w(&case, KernelPref::Auto, true, 11);
        all_dtypes_w(&case, KernelPref::Auto, true, 14);
        all_dtypes_w(&case, KernelPref::Auto, true, 15);
        all_dtypes_w(&case, KernelPref::Auto, true, 16);
        all_dtypes_w(&case, KernelPref::Auto, true, 17);
        all_dtypes_w(&case, KernelPref::Auto, true, 18);
        all_dtypes_w(&case, KernelPref::Auto, true, 19);
        all_dtypes_w(&case, KernelPref::Auto, true, 20);
        all_dtypes_w(&case, KernelPref::Auto, true, 21);
        all_dtypes_w(&case, KernelPref::Auto, true, 22);
        all_dtypes_w(&case, KernelPref::Auto, true, 23);
        all_dtypes_w(&case, KernelPref::Auto, true, 3);
        all_dtypes_w(&case, KernelPref::Auto, true, 5);
        all_dtypes_w(&case, KernelPref::Auto, true, 6);
        all_dtypes_w(&case, KernelPref::Auto, true, 7);
        all_dtypes_w(&case, KernelPref::Auto, false, 4);
        all_dtypes_w(&case, KernelPref::Auto, false, 8);
        all_dtypes_w(&case, KernelPref::Auto, false, 2);
        all_dtypes(&case, KernelPref::Generic, false);
    }
}

/// The persistent forward with several work items per CTA (~132 CTAs): non-causal (where
/// the default picks it) under head groups (items heads fastest) and the LSE combine (items
/// in the grid's order), 256 items each; causal head groups (the non-persistent kernel by
/// default, heads fastest when made persistent); causal LSE at 8K (256 pairs of tiles when
/// made persistent with `set_fwd_persistent_causal`). Padding masks throughout; the
/// non-persistent kernel on every case too.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn persistent_forward_many_items() {
    for (combine, causal, n, seed) in [
        (Combine::HeadGroups, false, 4096, 44),
        (Combine::Lse, false, 4096, 43),
        (Combine::HeadGroups, true, 4096, 41),
        (Combine::Lse, true, 8192, 45),
        (Combine::HeadGroups, false, 16384, 46),
    ] {
        let case = Case {
            dims: Dims {
                batch: 2,
                seq: n,
                heads: 4,
                kv_heads: 2,
                head_dim: 128,
            },
            schedule: vec![
                Pattern::new(512, 1),
                Pattern::new(1024, 2),
                Pattern::new(2048, 4),
            ],
            opts: Options::default().combine(combine).causal(causal),
            mask: Some((0..2 * n).map(|i| i % 11 != 4).collect()),
            seed,
        };
        for warps in [0, 6, 7, 10, 11, 12, 14, 15, 17, 18, 19, 20, 24] {
            // 16K under head groups: ~8 items per CTA, keyed and keyless (1024 items, 704
            // with keys), dealt keyed first (0) and in the grid's order (24).
            if n == 16384 && !matches!(warps, 0 | 24) {
                continue;
            }
            // The kernel each code stands for here, and for the persistent ones the name
            // prefix of what must have run (the settings of check_w's last call are the
            // device's still).
            let (kernel, expect) = match warps {
                0 if causal => ("default", None),
                0 => ("default", Some("fwd_wsps_")),
                6 => ("fwd_wsot", None),
                12 if causal => ("fwd_wso", None),
                12 => ("fwd_wsp", None),
                10 if causal => ("fwd_wsor", None),
                10 => ("fwd_wspr", None),
                11 if causal => ("fwd_wsowt", None),
                11 => ("fwd_wspwt", None),
                14 if causal => ("fwd_wsow", None),
                14 => ("fwd_wspw", None),
                15 | 17 | 18 | 19 | 20 | 24 if causal => continue, // fwd_wsot, the default kernel again
                15 => ("fwd_wsptn", None),
                17 => ("fwd_wspx", Some("fwd_wspx_")),
                18 => ("fwd_wspt (4-byte stores)", Some("fwd_wspt_")),
                19 => ("fwd_wspq", Some("fwd_wspq_")),
                20 => ("fwd_wspi", Some("fwd_wspi_")),
                24 => ("fwd_wsps (items in the grid's order)", Some("fwd_wsps_")),
                _ if causal => ("fwd_wsps (causal)", None),
                _ => continue, // the default kernel again
            };
            let t = std::time::Instant::now();
            let e = check_w::<half::bf16>(&case, KernelPref::Auto, false, warps);
            if let Some(want) = expect {
                let ran =
                    gpu::tensor_core_kernel::<half::bf16>(&dev(), &case.plan()).unwrap_or_default();
                assert!(ran.starts_with(want), "code {warps} ran {ran}, not {want}*");
            }
            eprintln!(
                "ok {kernel} n={n} {combine:?} causal={causal} : rel err bf16 {e:.1e} ({:.1} s)",
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// The 80-row fused backward with its producer warpgroup against the oracle, and that each
/// kernel is what ran: the default (code 0) with split metadata (`bwd_wgt2ws`; non-causal
/// problems `bwd_wgt2wsn`), one record per query (`bwd_wgt2wp`, code 22), the causal kernel
/// on every problem (`bwd_wgt2ws`, code 23), and without the producer (`bwd_wgt2w`, code
/// 21): dense
/// with GQA and a padding mask, causal or not, and a dilated schedule under both combines
/// whose segments' query rows (48, 24, 12 per class) fill no 80-row tile (rows past a
/// segment's end come from the box loads as zeros).
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn producer_backward_matches_oracle() {
    let _ = NEEDS_GPU;
    let dense = |causal: bool, seed: u64| Case {
        dims: Dims {
            batch: 2,
            seq: 320,
            heads: 4,
            kv_heads: 2,
            head_dim: 128,
        },
        schedule: vec![Pattern::new(320, 1)],
        opts: Options::default().causal(causal),
        mask: Some((0..640).map(|i| i % 9 != 5).collect()),
        seed,
    };
    let dilated = |combine: Combine, causal: bool, seed: u64| Case {
        dims: Dims {
            batch: 1,
            seq: 480,
            heads: 6,
            kv_heads: 3,
            head_dim: 128,
        },
        schedule: vec![
            Pattern::new(48, 1),
            Pattern::new(96, 4),
            Pattern::new(480, 40),
        ],
        opts: Options::default().combine(combine).causal(causal),
        mask: None,
        seed,
    };
    let cases = [
        dense(false, 301),
        dense(true, 302),
        dilated(Combine::Lse, false, 303),
        dilated(Combine::HeadGroups, false, 304),
        dilated(Combine::Lse, true, 305),
    ];
    for code in [0, 23, 22, 21] {
        for case in &cases {
            let kernel = match code {
                0 if !case.opts.causal => "bwd_wgt2wsn",
                0 | 23 => "bwd_wgt2ws",
                22 => "bwd_wgt2wp",
                _ => "bwd_wgt2w",
            };
            BWD.store(2, Ordering::Relaxed);
            let t = std::time::Instant::now();
            let eb = check_w::<half::bf16>(case, KernelPref::Auto, true, code);
            let ran = dev().last_fused_backward();
            assert_eq!(ran, format!("{kernel}_bf16_128"), "code {code}");
            let eh = check_w::<half::f16>(case, KernelPref::Auto, true, code);
            let ran = dev().last_fused_backward();
            assert_eq!(ran, format!("{kernel}_f16_128"), "code {code}");
            eprintln!(
                "ok {kernel} n={} {:?} causal={} : rel err bf16 {eb:.1e} f16 {eh:.1e} ({:.1} s)",
                case.dims.seq,
                case.opts.combine,
                case.opts.causal,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// The sanitizer's case: N = 96, GQA, causal, a padding mask, two patterns (one dilated).
fn sanitizer_case(d: usize, combine: Combine, detach: bool) -> Case {
    let n = 96;
    Case {
        dims: Dims {
            batch: 1,
            seq: n,
            heads: 4,
            kv_heads: 2,
            head_dim: d,
        },
        schedule: vec![Pattern::new(32, 1), Pattern::new(96, 3)],
        opts: Options::default()
            .combine(combine)
            .causal(true)
            .detach_weights(detach),
        mask: Some((0..n).map(|i| i % 5 != 0).collect()),
        seed: 3,
    }
}

/// The sanitizer's case on the tensor-map backwards only (`bwd_wgt2`, the default,
/// `bwd_wgt3` and `bwd_wgt`):
/// racecheck of every kernel (`sanitizer_small`) takes ~190 s, this a fraction.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn sanitizer_fused_tma() {
    for (d, combine) in [(64, Combine::Lse), (128, Combine::HeadGroups)] {
        let case = sanitizer_case(d, combine, false);
        all_dtypes(&case, KernelPref::Auto, true);
        all_dtypes_w(&case, KernelPref::Auto, true, 12);
        all_dtypes_w(&case, KernelPref::Auto, true, 13);
        all_dtypes_w(&case, KernelPref::Auto, true, 16);
        // Not causal: the persistent forwards (fwd_wsps, fwd_wsp) too.
        let mut free = sanitizer_case(d, combine, false);
        free.opts = free.opts.causal(false);
        all_dtypes(&free, KernelPref::Auto, true);
        all_dtypes_w(&free, KernelPref::Auto, true, 12);
        all_dtypes_w(&free, KernelPref::Auto, true, 16);
        // The wide forwards with box loads (fwd_wsowt, fwd_wspwt).
        all_dtypes_w(&case, KernelPref::Auto, false, 11);
        all_dtypes_w(&free, KernelPref::Auto, false, 11);
        // The persistent forward without the block end (fwd_wsptn).
        all_dtypes_w(&free, KernelPref::Auto, false, 15);
        // ... with the output stores under the next item's first MMA (fwd_wspx), and with
        // the 4-byte stores of fwd_wspt (the default, fwd_wsps, stores 16 bytes at a time).
        all_dtypes_w(&free, KernelPref::Auto, false, 17);
        all_dtypes_w(&free, KernelPref::Auto, false, 18);
        // ... and with two Q buffers (fwd_wspq).
        all_dtypes_w(&free, KernelPref::Auto, false, 19);
        // ... and with the items crossed in one turn (fwd_wspi).
        all_dtypes_w(&free, KernelPref::Auto, false, 20);
    }
}

/// Small fixed cases for compute-sanitizer (memcheck, racecheck): every kernel once.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn sanitizer_small() {
    for (d, combine, detach) in [
        (64, Combine::Lse, false),
        (128, Combine::HeadGroups, false),
        (8, Combine::Lse, true),
    ] {
        let case = sanitizer_case(d, combine, detach);
        // The default kernels (on Hopper: wgmma forward and backward), then every mma.sync
        // backward variant.
        all_dtypes(&case, KernelPref::Auto, true);
        all_dtypes_w(&case, KernelPref::Auto, true, 1);
        all_dtypes_w(&case, KernelPref::Auto, true, 12);
        all_dtypes_w(&case, KernelPref::Auto, true, 13);
        all_dtypes_w(&case, KernelPref::Auto, true, 9);
        all_dtypes_w(&case, KernelPref::Auto, true, 10);
        all_dtypes_w(&case, KernelPref::Auto, true, 11);
        all_dtypes_w(&case, KernelPref::Auto, true, 14);
        all_dtypes_w(&case, KernelPref::Auto, true, 15);
        all_dtypes_w(&case, KernelPref::Auto, true, 16);
        all_dtypes_w(&case, KernelPref::Auto, true, 17);
        all_dtypes_w(&case, KernelPref::Auto, true, 18);
        all_dtypes_w(&case, KernelPref::Auto, true, 19);
        all_dtypes_w(&case, KernelPref::Auto, true, 3);
        all_dtypes_w(&case, KernelPref::Auto, true, 5);
        all_dtypes_w(&case, KernelPref::Auto, true, 6);
        all_dtypes_w(&case, KernelPref::Auto, true, 7);
        for bwd in 0..6 {
            BWD.store(bwd, Ordering::Relaxed);
            all_dtypes_w(&case, KernelPref::Auto, true, 2);
        }
        BWD.store(2, Ordering::Relaxed);
        all_dtypes_w(&case, KernelPref::Auto, false, 4);
        all_dtypes_w(&case, KernelPref::Auto, false, 8);
        all_dtypes_w(&case, KernelPref::Auto, false, 2);
        all_dtypes(&case, KernelPref::Generic, true);
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on the GPU machine"]
fn peak_memory_tracks_allocations() {
    let d = dev();
    d.synchronize().unwrap();
    d.reset_peak_memory().unwrap();
    let base = d.peak_memory().unwrap();
    let big = d.htod(&vec![0u8; 64 << 20]).unwrap();
    let peak = d.peak_memory().unwrap();
    assert!(
        peak >= base + (64 << 20),
        "peak {peak} after a 64 MiB buffer (base {base})"
    );
    drop(big);
    d.synchronize().unwrap();
    d.reset_peak_memory().unwrap();
    let after = d.peak_memory().unwrap();
    assert!(
        after < peak,
        "reset: {after} should fall below {peak} once the buffer is freed"
    );
}
