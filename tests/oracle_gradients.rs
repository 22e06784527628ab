//! The oracle's gradients against central finite differences of the oracle's forward.
//! This is what makes the oracle's backward trustworthy enough to test kernels against.

mod common;

use common::*;
use dilated_attention::ops::reference;
use dilated_attention::prelude::*;
use proptest::prelude::*;

/// `loss = Σ out · grad_out`; returns `(dq, dk, dv)` by central differences.
fn finite_differences(case: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let detach = plan.options().detach_weights;
    // With detach_weights the combine weights c_i = exp(lse_i - L) are frozen at the
    // unperturbed inputs: loss(x) = Σ_i c_i(x0) · out_i(x) · dO.
    let single = |i: usize| {
        let mut opts = *plan.options();
        opts.detach_weights = false;
        Plan::new(*plan.dims(), &case.schedule[i..=i], opts).unwrap()
    };
    let g = case.schedule.len();
    let base = reference::forward(&plan, &q, &k, &v, mask).unwrap();
    let weights: Vec<Vec<f64>> = (0..g)
        .map(|i| {
            let f = reference::forward(&single(i), &q, &k, &v, mask).unwrap();
            f.lse
                .iter()
                .zip(&base.lse)
                .map(|(li, l)| {
                    if *li == f64::NEG_INFINITY {
                        0.0
                    } else {
                        (li - l).exp()
                    }
                })
                .collect()
        })
        .collect();
    let hd = plan.dims().head_dim;
    let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
        if !detach {
            let f = reference::forward(&plan, q, k, v, mask).unwrap();
            return f.out.iter().zip(&go).map(|(a, b)| a * b).sum();
        }
        (0..g)
            .map(|i| {
                let f = reference::forward(&single(i), q, k, v, mask).unwrap();
                f.out
                    .iter()
                    .zip(&go)
                    .enumerate()
                    .map(|(x, (a, b))| weights[i][x / hd] * a * b)
                    .sum::<f64>()
            })
            .sum()
    };
    let eps = 1e-5;
    let fd = |which: usize| -> Vec<f64> {
        let base = [&q, &k, &v][which];
        (0..base.len())
            .map(|i| {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which][i] += eps;
                let plus = loss(&args[0], &args[1], &args[2]);
                args[which][i] -= 2.0 * eps;
                let minus = loss(&args[0], &args[1], &args[2]);
                (plus - minus) / (2.0 * eps)
            })
            .collect()
    };
    (fd(0), fd(1), fd(2))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300) / 3, ..ProptestConfig::default() })]

    #[test]
    fn oracle_gradients_match_finite_differences(case in case(12, 2)) {
        let plan = case.plan();
        let (q, k, v, go) = case.data();
        let g = reference::backward(&plan, &q, &k, &v, case.mask.as_deref(), &go).unwrap();
        let (dq, dk, dv) = finite_differences(&case);
        assert_close("dq", &g.dq, &dq, 1e-6, 1e-7, &case);
        assert_close("dk", &g.dk, &dk, 1e-6, 1e-7, &case);
        assert_close("dv", &g.dv, &dv, 1e-6, 1e-7, &case);
    }
}

/// `detach_weights` really changes the gradient (it is not a no-op) when several patterns
/// overlap, and leaves the forward unchanged.
#[test]
fn detach_weights_changes_only_gradients() {
    let mut case = Case {
        dims: Dims::mha(1, 8, 2, 3),
        schedule: vec![Pattern::new(4, 1), Pattern::new(8, 2)],
        opts: Options::default(),
        mask: None,
        seed: 11,
    };
    let (q, k, v, go) = case.data();
    let exact = reference::backward(&case.plan(), &q, &k, &v, None, &go).unwrap();
    let f1 = reference::forward(&case.plan(), &q, &k, &v, None).unwrap();
    case.opts.detach_weights = true;
    let detached = reference::backward(&case.plan(), &q, &k, &v, None, &go).unwrap();
    let f2 = reference::forward(&case.plan(), &q, &k, &v, None).unwrap();
    assert_eq!(f1.out, f2.out);
    assert_eq!(
        exact.dv, detached.dv,
        "dV does not depend on the weights' gradient"
    );
    let diff: f64 = exact
        .dq
        .iter()
        .zip(&detached.dq)
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(diff > 1e-6, "detach_weights must change dQ");
}

/// Dense attention is the schedule `[(N, 1)]`: compare with a textbook softmax.
#[test]
fn dense_schedule_is_softmax_attention() {
    let case = Case {
        dims: Dims::mha(1, 6, 1, 4),
        schedule: vec![Pattern::new(6, 1)],
        opts: Options::default(),
        mask: None,
        seed: 3,
    };
    let (q, k, v, _) = case.data();
    let f = reference::forward(&case.plan(), &q, &k, &v, None).unwrap();
    let scale = 0.5;
    for p in 0..6 {
        let s: Vec<f64> = (0..6)
            .map(|j| scale * (0..4).map(|x| q[p * 4 + x] * k[j * 4 + x]).sum::<f64>())
            .collect();
        let z: f64 = s.iter().map(|x| x.exp()).sum();
        for x in 0..4 {
            let want: f64 = (0..6).map(|j| s[j].exp() / z * v[j * 4 + x]).sum();
            assert!((f.out[p * 4 + x] - want).abs() < 1e-12);
        }
        assert!((f.lse[p] - z.ln()).abs() < 1e-12);
    }
}
