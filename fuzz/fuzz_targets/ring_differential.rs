//! Differential fuzzing of ring attention over loopback against one device, through the
//! runtime-shaped path: arbitrary small ring configurations (world size, local length,
//! layout, schedule — valid or not —, combine, causal, scale, mask, GQA, values).
//!
//! Properties:
//! * the ring and the single device agree on validity: both `Ok` or both `Err` (a ring
//!   may also reject a world size that does not divide `N`, or an odd zigzag chunk);
//!   neither panics;
//! * when both succeed, `out`, `L` and the gradients agree and nothing is NaN. Both run
//!   in float64, so the check is about the protocol, not rounding: fuzzed inputs easily
//!   make gradients that are exactly zero up to cancellation noise, where any float32
//!   tolerance relative to the result would be meaningless.
//!
//! ```text
//! cargo fuzz run ring_differential
//! ```
#![no_main]

use arbitrary::{Result, Unstructured};
use dilated_attention::ops::dilated;
use dilated_attention::ring::{simulate_backward, simulate_forward, CommConfig, Layout};
use dilated_attention::{Combine, Dims, Options, Pattern, Plan};
use libfuzzer_sys::fuzz_target;

struct Input {
    world: usize,
    layout: Layout,
    dims: Dims,
    schedule: Vec<Pattern>,
    opts: Options,
    mask: Option<Vec<bool>>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    go: Vec<f64>,
}

fn values(u: &mut Unstructured<'_>, len: usize) -> Result<Vec<f64>> {
    (0..len)
        .map(|_| Ok(u.int_in_range(-64i8..=64)? as f64 / 16.0 + 0.01))
        .collect()
}

fn input(u: &mut Unstructured<'_>) -> Result<Input> {
    let world = u.int_in_range(1usize..=6)?;
    let layout = if u.arbitrary()? {
        Layout::Zigzag
    } else {
        Layout::Contiguous
    };
    let local = u.int_in_range(1usize..=8)?;
    let seq = world * local;
    let kv_heads = u.int_in_range(1usize..=2)?;
    let heads = kv_heads * u.int_in_range(1usize..=3)?;
    let dims = Dims {
        batch: u.int_in_range(1usize..=2)?,
        seq,
        heads,
        kv_heads,
        head_dim: u.int_in_range(1usize..=4)?,
    };
    let np = u.int_in_range(1usize..=3)?;
    let mut schedule = Vec::with_capacity(np);
    for _ in 0..np {
        // Mostly valid segments (divisors of N, or longer than N), sometimes not.
        let w = match u.int_in_range(0u8..=3)? {
            0 => u.int_in_range(1usize..=2 * seq + 1)?,
            1 => seq + u.int_in_range(0usize..=seq)?,
            _ => {
                let divs: Vec<usize> = (1..=seq).filter(|d| seq % d == 0).collect();
                *u.choose(&divs)?
            }
        };
        let r = u.int_in_range(1usize..=w.clamp(1, 9))?;
        schedule.push(Pattern::new(w, r));
    }
    let opts = Options {
        combine: if u.arbitrary()? {
            Combine::HeadGroups
        } else {
            Combine::Lse
        },
        causal: u.arbitrary()?,
        scale: if u.arbitrary()? { Some(0.5) } else { None },
        detach_weights: u.arbitrary()?,
    };
    let mask = if u.arbitrary()? {
        Some(
            (0..dims.batch * seq)
                .map(|_| u.ratio(4u8, 5u8))
                .collect::<Result<Vec<bool>>>()?,
        )
    } else {
        None
    };
    Ok(Input {
        world,
        layout,
        q: values(u, dims.q_len())?,
        k: values(u, dims.kv_len())?,
        v: values(u, dims.kv_len())?,
        go: values(u, dims.q_len())?,
        dims,
        schedule,
        opts,
        mask,
    })
}

fn close(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let norm = b
        .iter()
        .filter(|x| x.is_finite())
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(!x.is_nan(), "{what}[{i}] is NaN");
        if y.is_infinite() {
            assert_eq!(x, y, "{what}[{i}]");
        } else {
            assert!(
                (x - y).abs() <= 1e-9 * norm.max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(inp) = input(&mut u) else { return };
    let plan = match Plan::new(inp.dims, &inp.schedule, inp.opts) {
        Ok(p) => p,
        Err(_) => return, // invalid schedules are rejected before any kernel runs
    };
    let mask = inp.mask.as_deref();
    let cfg = CommConfig::default();
    let single = dilated::try_forward(&plan, &inp.q, &inp.k, &inp.v, mask)
        .expect("a valid plan runs on one device");
    let ring = simulate_forward(
        inp.world, inp.layout, cfg, &plan, &inp.q, &inp.k, &inp.v, mask,
    );
    let ring_ok = inp.dims.seq % inp.world == 0
        && (inp.layout == Layout::Contiguous || (inp.dims.seq / inp.world) % 2 == 0);
    let (ring, _) = match ring {
        Ok(r) => {
            assert!(ring_ok, "the ring accepted an invalid configuration");
            r
        }
        Err(e) => {
            assert!(!ring_ok, "the ring rejected a valid configuration: {e}");
            return;
        }
    };
    close("out", &ring.out, &single.out);
    close("lse", &ring.lse, &single.lse);
    let gs = dilated::try_backward(
        &plan,
        &inp.q,
        &inp.k,
        &inp.v,
        mask,
        &single.out,
        &single.lse,
        &inp.go,
    )
    .expect("single-device backward");
    let (gr, _) = simulate_backward(
        inp.world, inp.layout, cfg, &plan, &inp.q, &inp.k, &inp.v, mask, &ring.out, &ring.lse,
        &inp.go,
    )
    .expect("ring backward after a successful ring forward");
    close("dq", &gr.dq, &gs.dq);
    close("dk", &gr.dk, &gs.dk);
    close("dv", &gr.dv, &gs.dv);
});
