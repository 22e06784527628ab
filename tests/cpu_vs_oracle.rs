//! The CPU kernel against the float64 oracle on random problems (SPEC §5 tolerances).
//!
//! Replay a failure: the panic message prints the whole `Case` (shapes, schedule,
//! options, mask, seed); `PROPTEST_CASES=5000 cargo test --release --test cpu_vs_oracle`
//! runs the long mode.

mod common;

use common::*;
use dilated_attention::ops::{dilated, reference};
use dilated_attention::prelude::*;
use proptest::prelude::*;

/// f32 kernel: relative to the output norm (SPEC §5), plus a floor for all-masked cases.
const REL32: f64 = 1e-5;
const REL64: f64 = 1e-12;

fn check_f32(case: &Case, with_grads: bool) {
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let want = reference::forward(&plan, &q, &k, &v, mask).unwrap();
    let (q32, k32, v32, go32) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&go));
    let got = dilated::try_forward(&plan, &q32, &k32, &v32, mask).unwrap();
    // Compare against the oracle run on the f32-rounded inputs.
    let (qr, kr, vr, gr) = (
        from_f32(&q32),
        from_f32(&k32),
        from_f32(&v32),
        from_f32(&go32),
    );
    let want_r = reference::forward(&plan, &qr, &kr, &vr, mask).unwrap();
    let _ = want;
    assert_close("out", &from_f32(&got.out), &want_r.out, REL32, 1e-6, case);
    assert_lse(&from_f32(&got.lse), &want_r.lse, 1e-5, case);
    if with_grads {
        let g = dilated::try_backward(&plan, &q32, &k32, &v32, mask, &got.out, &got.lse, &go32)
            .unwrap();
        let gw = reference::backward(&plan, &qr, &kr, &vr, mask, &gr).unwrap();
        // Absolute floor for gradients that are exactly zero in exact arithmetic (a query
        // whose only keys are itself: dS = P·(dO·v − dO·out) cancels) — f32 rounding of
        // the two length-D dots, 8·eps·D (faer's habit), never below 1e-5.
        let floor = (8.0 * f32::EPSILON as f64 * case.dims.head_dim as f64).max(1e-5);
        assert_close("dq", &from_f32(&g.dq), &gw.dq, REL32, floor, case);
        assert_close("dk", &from_f32(&g.dk), &gw.dk, REL32, floor, case);
        assert_close("dv", &from_f32(&g.dv), &gw.dv, REL32, floor, case);
    }
}

fn check_f64(case: &Case) {
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let want = reference::forward(&plan, &q, &k, &v, mask).unwrap();
    let got = dilated::try_forward(&plan, &q, &k, &v, mask).unwrap();
    assert_close("out", &got.out, &want.out, REL64, 1e-12, case);
    assert_lse(&got.lse, &want.lse, 1e-12, case);
    let g = dilated::try_backward(&plan, &q, &k, &v, mask, &got.out, &got.lse, &go).unwrap();
    let gw = reference::backward(&plan, &q, &k, &v, mask, &go).unwrap();
    assert_close("dq", &g.dq, &gw.dq, REL64, 1e-11, case);
    assert_close("dk", &g.dk, &gw.dk, REL64, 1e-11, case);
    assert_close("dv", &g.dv, &gw.dv, REL64, 1e-11, case);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300), ..ProptestConfig::default() })]

    /// Small problems: every feature, forward and gradients, f32 and f64.
    #[test]
    fn small_problems_match_oracle(case in case(40, 2)) {
        check_f32(&case, true);
        check_f64(&case);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300) / 4, ..ProptestConfig::default() })]

    /// Longer sequences (several tiles per segment, tiles cut by causality).
    #[test]
    fn longer_sequences_match_oracle(case in case(300, 1)) {
        check_f32(&case, true);
    }
}

/// A fixed case across tile boundaries: 2 tiles of queries, 3 of keys, causal, GQA.
#[test]
fn tile_boundaries() {
    let case = Case {
        dims: Dims {
            batch: 2,
            seq: 260,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        },
        schedule: vec![
            Pattern::new(130, 1),
            Pattern::new(260, 2),
            Pattern::new(1000, 3),
        ],
        opts: Options::default().causal(true),
        mask: None,
        seed: 7,
    };
    check_f32(&case, true);
    check_f64(&case);
}

/// Fully masked rows give zeros and `L = -inf`, never NaN.
#[test]
fn fully_masked_rows_are_zero() {
    let dims = Dims::mha(1, 16, 2, 4);
    let plan = Plan::new(dims, &[Pattern::new(8, 1)], Options::default()).unwrap();
    let q = to_f32(&normal(1, dims.q_len()));
    let mut mask = vec![true; 16];
    mask[..8].iter_mut().for_each(|m| *m = false); // first segment has no key
    let f = dilated::try_forward(&plan, &q, &q, &q, Some(&mask)).unwrap();
    assert!(f.out[..8 * 2 * 4].iter().all(|&x| x == 0.0));
    assert!(f.lse[..8 * 2].iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(f.out.iter().all(|x| !x.is_nan()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300) / 6, ..ProptestConfig::default() })]

    /// Head dims that take the AVX-512 fast path (multiples of 16 up to 128) on CPUs that
    /// have it; the generic path elsewhere. Long enough for several tiles per segment.
    #[test]
    fn simd_head_dims_match_oracle(base in case(200, 2), dsel in 0usize..8) {
        let mut case = base;
        case.dims.head_dim = [16, 32, 48, 64, 80, 96, 112, 128][dsel];
        check_f32(&case, true);
    }
}
