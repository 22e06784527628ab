//! Criterion benches of the CPU kernel: forward and forward+backward throughput for a
//! LongNet schedule `[(2048,1), (4096,2), (8192,4)]`, 8 heads, D = 64, f32, causal and not.
//!
//! `cargo bench --bench cpu_forward` runs N = 4K and 16K; `BENCH_LARGE=1` adds 64K.
//! Throughput is reported in attended (query, key) pairs per second; GFLOP/s is
//! `4·D·pairs / time` for the forward and `2.5×` that for the backward (GPU.md's
//! convention).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dilated_attention::ops::dilated;
use dilated_attention::prelude::*;
use rand::{Rng, SeedableRng};

fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn bench(c: &mut Criterion) {
    let mut sizes = vec![4096, 16384];
    if std::env::var_os("BENCH_LARGE").is_some() {
        sizes.push(65536);
    }
    let schedule = dilated_attention::shape::longnet_schedule();
    for causal in [false, true] {
        let mut g = c.benchmark_group(format!(
            "cpu_f32_longnet_h8_d64_{}",
            if causal { "causal" } else { "full" }
        ));
        g.sample_size(10);
        for &n in &sizes {
            let dims = Dims::mha(1, n, 8, 64);
            let plan = Plan::new(dims, &schedule, Options::default().causal(causal)).unwrap();
            let (q, k, v, go) = (
                random(1, dims.q_len()),
                random(2, dims.kv_len()),
                random(3, dims.kv_len()),
                random(4, dims.q_len()),
            );
            g.throughput(Throughput::Elements(plan.attended_pairs()));
            g.bench_with_input(BenchmarkId::new("forward", n), &n, |b, _| {
                b.iter(|| dilated::try_forward(&plan, &q, &k, &v, None).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("forward_backward", n), &n, |b, _| {
                b.iter(|| {
                    let f = dilated::try_forward(&plan, &q, &k, &v, None).unwrap();
                    dilated::try_backward(&plan, &q, &k, &v, None, &f.out, &f.lse, &go).unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
