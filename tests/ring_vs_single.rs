//! Ring attention over loopback vs one device (SPEC §2): for random world sizes 1–8,
//! local lengths, schedules, combines, causal, masks, GQA and both layouts, every rank's
//! rows of `out`, `L`, `dq`, `dk`, `dv` equal the single-device result on the gathered
//! global inputs (SPEC §5 tolerance), and in float64 equal the oracle.
//!
//! Replay: the panic message prints the whole case; `PROPTEST_CASES=2000 cargo test
//! --release --test ring_vs_single` runs the long mode.

mod common;

use common::*;
use dilated_attention::ops::{dilated, reference};
use dilated_attention::prelude::*;
use dilated_attention::ring::{simulate_backward, simulate_forward, CommConfig, Layout};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct RingCase {
    world: usize,
    layout: Layout,
    case: Case,
}

/// A random ring problem: `W` in 1..=8, `n` in 1..=max_local (even for zigzag), a
/// schedule valid for `N = W·n`, every option.
fn ring_case(max_local: usize, max_b: usize) -> impl Strategy<Value = RingCase> {
    (
        1usize..=8,
        1usize..=max_local,
        any::<bool>(),
        1usize..=max_b,
        1usize..=3,
        1usize..=3,
        1usize..=6,
    )
        .prop_flat_map(move |(world, n, zig, b, hkv, grp, d)| {
            let layout = if zig {
                Layout::Zigzag
            } else {
                Layout::Contiguous
            };
            let n = if zig { 2 * n.div_ceil(2) } else { n };
            let seq = world * n;
            let h = hkv * grp;
            (
                prop::collection::vec(pattern(seq), 1..=h.min(3)),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), b * seq)),
                any::<u64>(),
            )
                .prop_map(
                    move |(schedule, causal, head_groups, detach, mask, seed)| RingCase {
                        world,
                        layout,
                        case: Case {
                            dims: Dims {
                                batch: b,
                                seq,
                                heads: h,
                                kv_heads: hkv,
                                head_dim: d,
                            },
                            schedule,
                            opts: Options {
                                combine: if head_groups {
                                    Combine::HeadGroups
                                } else {
                                    Combine::Lse
                                },
                                causal,
                                scale: None,
                                detach_weights: detach && !head_groups,
                            },
                            mask,
                            seed,
                        },
                    },
                )
        })
}

fn cfg() -> CommConfig {
    CommConfig::default()
}

/// f32 ring vs f32 single device (SPEC §5: 1e-5 of the norm).
fn check_vs_single(rc: &RingCase) {
    let case = &rc.case;
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let (q, k, v, go) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&go));
    let mask = case.mask.as_deref();
    let single = dilated::try_forward(&plan, &q, &k, &v, mask).unwrap();
    let (ring, sf) = simulate_forward(rc.world, rc.layout, cfg(), &plan, &q, &k, &v, mask)
        .unwrap_or_else(|e| panic!("ring forward failed: {e}; case {rc:?}"));
    assert_close(
        "out",
        &from_f32(&ring.out),
        &from_f32(&single.out),
        1e-5,
        1e-6,
        rc,
    );
    assert_lse(&from_f32(&ring.lse), &from_f32(&single.lse), 1e-5, rc);
    let gs = dilated::try_backward(&plan, &q, &k, &v, mask, &single.out, &single.lse, &go).unwrap();
    let (gr, sb) = simulate_backward(
        rc.world,
        rc.layout,
        cfg(),
        &plan,
        &q,
        &k,
        &v,
        mask,
        &ring.out,
        &ring.lse,
        &go,
    )
    .unwrap_or_else(|e| panic!("ring backward failed: {e}; case {rc:?}"));
    check_stats(rc, &sf, &sb);
    assert_close("dq", &from_f32(&gr.dq), &from_f32(&gs.dq), 1e-5, 1e-5, rc);
    assert_close("dk", &from_f32(&gr.dk), &from_f32(&gs.dk), 1e-5, 1e-5, rc);
    assert_close("dv", &from_f32(&gr.dv), &from_f32(&gs.dv), 1e-5, 1e-5, rc);
}

/// Invariants of the statistics on every case: what is sent is received, a rank never
/// holds more than 2 (forward) or 4 (backward) remote packets, nor more remote bytes
/// than that many of its own full K/V blocks (with mask bits).
fn check_stats(rc: &RingCase, sf: &[RingStats], sb: &[RingStats]) {
    let dm = rc.case.dims;
    let n = dm.seq / rc.world;
    let block = (2 * dm.batch * n * dm.kv_heads * dm.head_dim * 4 + dm.batch * n) as u64;
    for (s, most) in [(sf, 2u64), (sb, 4)] {
        let sent: u64 = s.iter().map(|x| x.bytes_sent).sum();
        let recv: u64 = s.iter().map(|x| x.bytes_recv).sum();
        assert_eq!(sent, recv, "case {rc:?}");
        for x in s {
            assert!(x.max_remote_blocks as u64 <= most, "{x:?}; case {rc:?}");
            assert!(x.peak_remote_bytes <= most * block, "{x:?}; case {rc:?}");
        }
    }
    if rc.world == 1 {
        assert!(sf
            .iter()
            .chain(sb)
            .all(|x| x.bytes_sent == 0 && x.steps == 0));
    }
}

/// f64 ring vs the float64 oracle (tight).
fn check_vs_oracle(rc: &RingCase) {
    let case = &rc.case;
    let plan = case.plan();
    let (q, k, v, go) = case.data();
    let mask = case.mask.as_deref();
    let want = reference::forward(&plan, &q, &k, &v, mask).unwrap();
    let (ring, _) = simulate_forward(rc.world, rc.layout, cfg(), &plan, &q, &k, &v, mask).unwrap();
    assert_close("out", &ring.out, &want.out, 1e-12, 1e-12, rc);
    assert_lse(&ring.lse, &want.lse, 1e-12, rc);
    let gw = reference::backward(&plan, &q, &k, &v, mask, &go).unwrap();
    let (gr, _) = simulate_backward(
        rc.world,
        rc.layout,
        cfg(),
        &plan,
        &q,
        &k,
        &v,
        mask,
        &ring.out,
        &ring.lse,
        &go,
    )
    .unwrap();
    assert_close("dq", &gr.dq, &gw.dq, 1e-12, 1e-11, rc);
    assert_close("dk", &gr.dk, &gw.dk, 1e-12, 1e-11, rc);
    assert_close("dv", &gr.dv, &gw.dv, 1e-12, 1e-11, rc);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128), ..ProptestConfig::default() })]

    /// Every feature, forward and gradients, f32 against the single-device kernel.
    #[test]
    fn ring_matches_single_device(rc in ring_case(12, 2)) {
        check_vs_single(&rc);
    }

    /// Small problems in float64 against the oracle.
    #[test]
    fn ring_matches_oracle(rc in ring_case(6, 2)) {
        check_vs_oracle(&rc);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(128) / 4, ..ProptestConfig::default() })]

    /// Longer local chunks: several query/key tiles per run, tiles cut by causality.
    #[test]
    fn ring_longer_chunks(rc in ring_case(80, 1)) {
        check_vs_single(&rc);
    }
}

/// Fixed cases that exercise the interesting paths: segments spanning 2 of 4 ranks,
/// dense causal zigzag, dilation with GQA.
#[test]
fn fixed_cases() {
    let mk = |world, layout, seq, schedule: Vec<Pattern>, causal, hkv, grp| RingCase {
        world,
        layout,
        case: Case {
            dims: Dims {
                batch: 2,
                seq,
                heads: hkv * grp,
                kv_heads: hkv,
                head_dim: 8,
            },
            schedule,
            opts: Options::default().causal(causal),
            mask: None,
            seed: 11,
        },
    };
    let cases = [
        mk(
            4,
            Layout::Contiguous,
            64,
            vec![Pattern::new(8, 1), Pattern::new(32, 2)],
            true,
            2,
            2,
        ),
        mk(4, Layout::Zigzag, 64, vec![Pattern::new(64, 1)], true, 1, 2),
        mk(
            3,
            Layout::Contiguous,
            96,
            vec![Pattern::new(24, 3), Pattern::new(96, 4)],
            false,
            2,
            3,
        ),
        mk(
            8,
            Layout::Zigzag,
            128,
            vec![
                Pattern::new(16, 1),
                Pattern::new(64, 2),
                Pattern::new(128, 4),
            ],
            true,
            2,
            2,
        ),
    ];
    for rc in &cases {
        check_vs_single(rc);
        check_vs_oracle(rc);
    }
}

/// The typed front door on a loopback ring gives the gathered single-device rows.
#[test]
fn typed_ring_matches_typed_single() {
    use dilated_attention::ring::loopback::run;
    type S = (Seg<8, 1>, Seg<32, 2>);
    const N: usize = 32;
    let dev = Cpu::default();
    let q: Tensor<Rank4<1, N, 4, 8>, f32, _> = dev.sample_normal();
    let k: Tensor<Rank4<1, N, 2, 8>, f32, _> = dev.sample_normal();
    let v: Tensor<Rank4<1, N, 2, 8>, f32, _> = dev.sample_normal();
    let single = DilatedAttention::<S>::new().causal(true);
    let (out, _) = single.forward(&q, &k, &v);
    let layout = Layout::Zigzag;
    let (qs, ks, vs) = (
        layout.split(&q.as_vec(), 1, 32, 4).unwrap(),
        layout.split(&k.as_vec(), 1, 16, 4).unwrap(),
        layout.split(&v.as_vec(), 1, 16, 4).unwrap(),
    );
    let res = run(4, CommConfig::default(), |comm| {
        let r = comm.rank();
        let attn =
            RingDilatedAttention::<_, S, LseCombine, 8, 4>::try_new(&comm, layout)?.causal(true);
        let dev = Cpu::default();
        let ql: Tensor<Rank4<1, 8, 4, 8>, f32, _> =
            dev.tensor_from_vec(qs[r].clone(), Default::default());
        let kl: Tensor<Rank4<1, 8, 2, 8>, f32, _> =
            dev.tensor_from_vec(ks[r].clone(), Default::default());
        let vl: Tensor<Rank4<1, 8, 2, 8>, f32, _> =
            dev.tensor_from_vec(vs[r].clone(), Default::default());
        let (o, _, _) = attn.try_forward(&ql, &kl, &vl, None)?;
        Ok(o.as_vec())
    })
    .unwrap();
    let locals: Vec<Vec<f32>> = res.into_iter().map(|r| r.unwrap()).collect();
    let got = layout.gather(&locals, 1, 32).unwrap();
    assert_close(
        "typed out",
        &from_f32(&got),
        &from_f32(&out.as_vec()),
        1e-5,
        1e-6,
        &"typed",
    );
}

/// The communicator's world size is checked at construction, with the numbers.
#[test]
fn typed_world_mismatch_is_an_error() {
    let comms = Loopback::ring(3, CommConfig::default()).unwrap();
    let e = RingDilatedAttention::<_, Seg<8, 1>, LseCombine, 8, 4>::try_new(
        &comms[0],
        Layout::Contiguous,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("4 ranks") && e.to_string().contains("has 3"),
        "{e}"
    );
    let comms2 = Loopback::ring(2, CommConfig::default()).unwrap();
    let e =
        RingDilatedAttention::<_, Seg<6, 1>, LseCombine, 3, 2>::try_new(&comms2[0], Layout::Zigzag)
            .unwrap_err();
    assert!(e.to_string().contains("even"), "{e}");
}

/// Invalid runtime inputs are errors on every rank, never a panic or a hang.
#[test]
fn runtime_errors_not_panics() {
    let plan = Plan::new(
        Dims::mha(1, 12, 1, 2),
        &[Pattern::new(12, 1)],
        Options::default(),
    )
    .unwrap();
    let x = vec![0.5f32; 24];
    // 12 positions over 5 ranks.
    assert!(simulate_forward(5, Layout::Contiguous, cfg(), &plan, &x, &x, &x, None).is_err());
    // Zigzag with n = 3.
    assert!(simulate_forward(4, Layout::Zigzag, cfg(), &plan, &x, &x, &x, None).is_err());
    // A rank with a short buffer: every rank returns Err (the others are told).
    let res = dilated_attention::ring::loopback::run(2, cfg(), |c| {
        let n = if c.rank() == 1 { 10 } else { 12 };
        dilated_attention::ring::try_forward(
            &c,
            &plan,
            Layout::Contiguous,
            &x[..n],
            &x[..12],
            &x[..12],
            None,
        )
    })
    .unwrap();
    assert!(res.iter().all(|r| r.is_err()), "{res:?}");
}
