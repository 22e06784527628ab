//! The logic of the fuzz targets, as plain functions so that `cargo test` in this crate
//! runs them on random bytes without cargo-fuzz (see the tests at the bottom).

use arbitrary::{Result, Unstructured};
use dilated_attention::ops::{dilated, reference};
use dilated_attention::prelude::*;
use rand::{Rng, SeedableRng};

/// A runtime-shaped problem decoded from fuzz bytes, possibly invalid.
#[derive(Debug)]
pub struct Problem {
    pub dims: Dims,
    pub schedule: Vec<Pattern>,
    pub opts: Options,
    pub mask: Option<Vec<bool>>,
    /// Deviations of the q/k/v buffer lengths from their shapes (0 = right length).
    pub len_skew: [i8; 3],
    pub seed: u64,
    pub amplitude: f64,
}

impl Problem {
    /// Decode from bytes; shapes are small so the oracle stays fast.
    pub fn decode(u: &mut Unstructured<'_>) -> Result<Self> {
        let dims = Dims {
            batch: u.int_in_range(0..=2)?,
            seq: u.int_in_range(0..=24)?,
            heads: u.int_in_range(0..=6)?,
            kv_heads: u.int_in_range(0..=3)?,
            head_dim: u.int_in_range(0..=8)?,
        };
        let g = u.int_in_range(0..=4)?;
        let mut schedule = Vec::with_capacity(g);
        for _ in 0..g {
            let w = u.int_in_range(0..=40)?;
            let r = u.int_in_range(0..=w + 1)?;
            schedule.push(Pattern::new(w, r));
        }
        let opts = Options {
            combine: if u.arbitrary()? { Combine::HeadGroups } else { Combine::Lse },
            causal: u.arbitrary()?,
            scale: match u.int_in_range(0..=3)? {
                0 => Some(0.25),
                1 => Some(f64::NAN),
                _ => None,
            },
            detach_weights: u.arbitrary()?,
        };
        let mask = if u.arbitrary()? {
            let extra: i8 = if u.ratio(1, 8)? { 1 } else { 0 };
            let len = (dims.batch * dims.seq) as i64 + extra as i64;
            Some((0..len.max(0)).map(|_| u.ratio(4, 5)).collect::<Result<_>>()?)
        } else {
            None
        };
        let mut len_skew = [0i8; 3];
        if u.ratio(1, 8)? {
            len_skew[u.int_in_range(0..=2)?] = if u.arbitrary()? { 1 } else { -1 };
        }
        Ok(Problem { dims, schedule, opts, mask, len_skew, seed: u.arbitrary()?, amplitude: u.int_in_range(1..=30)? as f64 / 10.0 })
    }

    /// The rules of SPEC §1, restated independently of `Plan::new`.
    pub fn is_valid(&self) -> bool {
        let d = &self.dims;
        let dims_ok = d.batch > 0 && d.seq > 0 && d.heads > 0 && d.kv_heads > 0 && d.head_dim > 0 && d.heads % d.kv_heads == 0;
        let sched_ok = !self.schedule.is_empty()
            && self.schedule.iter().all(|p| p.segment > 0 && p.dilation >= 1 && p.dilation <= p.segment && d.seq % p.segment.min(d.seq.max(1)) == 0);
        let groups_ok = self.opts.combine == Combine::Lse || self.schedule.len() <= d.heads;
        let scale_ok = self.opts.scale.is_none_or(f64::is_finite);
        dims_ok && sched_ok && groups_ok && scale_ok
    }

    fn buffers(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut gen = |n: usize, skew: i8| -> Vec<f64> {
            let n = (n as i64 + skew as i64).max(0) as usize;
            (0..n).map(|_| rng.gen_range(-self.amplitude..self.amplitude)).collect()
        };
        let (ql, kl) = (self.dims.q_len(), self.dims.kv_len());
        (gen(ql, self.len_skew[0]), gen(kl, self.len_skew[1]), gen(kl, self.len_skew[2]), gen(ql, 0))
    }
}

fn max_err(a: &[f64], b: &[f64]) -> (f64, f64) {
    let norm = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = a.iter().zip(b).map(|(x, y)| if x.is_nan() { f64::INFINITY } else { (x - y).abs() }).fold(0.0, f64::max);
    (err, norm)
}

/// The differential check of the single-device runtime path.
pub fn dilated_differential(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(p) = Problem::decode(&mut u) else { return };
    let plan = Plan::new(p.dims, &p.schedule, p.opts);
    assert_eq!(plan.is_ok(), p.is_valid(), "Plan::new disagrees with the rules: {p:?} -> {plan:?}");
    let Ok(plan) = plan else { return };
    let (q, k, v, go) = p.buffers();
    let mask = p.mask.as_deref();
    let lens_ok = p.len_skew == [0; 3] && mask.is_none_or(|m| m.len() == p.dims.mask_len());
    let q32: Vec<f32> = q.iter().map(|&x| x as f32).collect();
    let k32: Vec<f32> = k.iter().map(|&x| x as f32).collect();
    let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let got = dilated::try_forward(&plan, &q32, &k32, &v32, mask);
    assert_eq!(got.is_ok(), lens_ok, "length checks: {p:?} -> {:?}", got.as_ref().err());
    let Ok(got) = got else { return };
    let up = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (qr, kr, vr) = (up(&q32), up(&k32), up(&v32));
    let want = reference::forward(&plan, &qr, &kr, &vr, mask).unwrap();
    let (err, norm) = max_err(&up(&got.out), &want.out);
    assert!(err <= 1e-5 * norm + 1e-6, "forward: err {err:e}, norm {norm:e}: {p:?}");
    for (a, b) in got.lse.iter().zip(&want.lse) {
        assert!((*b == f64::NEG_INFINITY && *a == f32::NEG_INFINITY) || ((*a as f64) - b).abs() <= 1e-4 * b.abs().max(1.0), "lse {a} vs {b}: {p:?}");
    }
    let go32: Vec<f32> = go.iter().map(|&x| x as f32).collect();
    let g = dilated::try_backward(&plan, &q32, &k32, &v32, mask, &got.out, &got.lse, &go32).unwrap();
    let gw = reference::backward(&plan, &qr, &kr, &vr, mask, &up(&go32)).unwrap();
    for (name, a, b) in [("dq", &g.dq, &gw.dq), ("dk", &g.dk, &gw.dk), ("dv", &g.dv, &gw.dv)] {
        let (err, norm) = max_err(&up(a), b);
        assert!(err <= 1e-5 * norm + 1e-5, "{name}: err {err:e}, norm {norm:e}: {p:?}");
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The fuzz target's logic on random byte strings (a smoke run; the real fuzzing is
    /// `cargo fuzz run`).
    #[test]
    fn dilated_differential_on_random_bytes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0xD11A7ED);
        for _ in 0..2000 {
            let len = rng.gen_range(0..96);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            super::dilated_differential(&bytes);
        }
    }
}
