//! A small decoder-only LongNet trained on associative recall across segments.
//!
//! ```text
//! cargo run --release --example longnet_train            # N = 256, a few minutes at most
//! cargo run --release --example longnet_train -- --ci    # N = 128, seconds
//! cargo run --release --example longnet_train -- --steps 800
//! ```
//!
//! The task: each sequence holds `KEYS` facts `key -> value`, each written as a run of
//! `RUN` identical tokens somewhere before the last segment, among noise tokens. The last
//! `QUERIES` positions (exactly the last local segment) ask `key?`; the model must answer
//! the value at that position. A model whose attention is dense but local (segments of
//! `LOCAL` tokens) never sees a fact from a query position and stays at chance
//! (`1 / VALUES`); the same model with a LongNet schedule — the local pattern plus a
//! dilated pattern spanning the whole sequence — reaches the facts and learns the task.
//! (A run of `RUN >= r` tokens is visible from every dilation offset, so every query
//! head sees every fact.)

use std::io::{IsTerminal, Write};
use std::time::Instant;

use dfdx::losses::cross_entropy_with_logits_loss;
use dfdx::nn::builders::{Embedding, FastGeLU, LayerNorm1D, Linear, Residual};
use dfdx::nn::{BuildOnDevice, DeviceBuildExt, ModuleMut, ZeroGrads};
use dfdx::optim::{Adam, AdamConfig, Optimizer};
use dfdx::shapes::Rank0;
use dfdx::tensor::{AsArray, PutTape, SplitTape, Trace};
use dfdx::tensor_ops::Backward;
use dilated_attention::nn::builder::MultiheadDilatedAttention;
use dilated_attention::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The op on its own: gradients of `q`, `k`, `v` through `loss.backward()`.
pub fn op_gradients() -> [usize; 3] {
    use dfdx::tensor_ops::SumTo;
    // ANCHOR: op
    let dev = Cpu::default();
    let q: Tensor<Rank4<1, 64, 4, 8>, f32, _> = dev.sample_normal();
    let k: Tensor<Rank4<1, 64, 2, 8>, f32, _> = dev.sample_normal();
    let v: Tensor<Rank4<1, 64, 2, 8>, f32, _> = dev.sample_normal();
    let attn = DilatedAttention::<(Seg<16, 1>, Seg<64, 4>)>::new().causal(true);
    let out = attn.forward_taped(q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
    let grads = out.square().sum().backward();
    let (dq, dk, dv) = (grads.get(&q), grads.get(&k), grads.get(&v));
    // ANCHOR_END: op
    [dq.as_vec().len(), dk.as_vec().len(), dv.as_vec().len()]
}

// ANCHOR: task
/// Number of distinct keys (every sequence states one fact per key).
pub const KEYS: usize = 8;
/// Number of distinct values; chance accuracy is `1 / VALUES`.
pub const VALUES: usize = 8;
/// Noise tokens.
pub const NOISE: usize = 16;
/// Token ids: `key * VALUES + value` for a fact, then noise, then one query per key.
pub const VOCAB: usize = KEYS * VALUES + NOISE + KEYS;
/// Length of the local segment (the dense-local baseline sees only this far).
pub const LOCAL: usize = 16;
/// Query positions at the end of each sequence (one local segment).
pub const QUERIES: usize = LOCAL;
/// Each fact is written `RUN` times in a row (at least the largest dilation).
pub const RUN: usize = 4;

/// One batch: token ids `(B, N)` and one-hot targets `(B, N, VOCAB)` (zero rows where
/// nothing is asked), plus the answers for accuracy.
pub struct Batch<const B: usize, const N: usize> {
    /// Input tokens.
    pub tokens: Tensor<Rank2<B, N>, usize, Cpu>,
    /// One-hot answers at the query positions, zeros elsewhere.
    pub targets: Tensor<Rank3<B, N, VOCAB>, f32, Cpu>,
    /// `(batch, position, value)` for every query.
    pub answers: Vec<(usize, usize, usize)>,
}

/// A random batch of the recall task.
pub fn batch<const B: usize, const N: usize>(dev: &Cpu, rng: &mut StdRng) -> Batch<B, N> {
    assert!(
        (N - QUERIES) / RUN >= KEYS,
        "sequence too short for the task"
    );
    let mut tokens = vec![0usize; B * N];
    let mut targets = vec![0f32; B * N * VOCAB];
    let mut answers = vec![];
    let slots = (N - QUERIES) / RUN; // fact slots before the query segment
    for b in 0..B {
        let row = &mut tokens[b * N..(b + 1) * N];
        for t in row.iter_mut() {
            *t = KEYS * VALUES + rng.gen_range(0..NOISE);
        }
        let values: Vec<usize> = (0..KEYS).map(|_| rng.gen_range(0..VALUES)).collect();
        // KEYS distinct slots, in random order.
        let mut chosen: Vec<usize> = vec![];
        while chosen.len() < KEYS {
            let s = rng.gen_range(0..slots);
            if !chosen.contains(&s) {
                chosen.push(s);
            }
        }
        for (key, &slot) in chosen.iter().enumerate() {
            for t in &mut row[slot * RUN..(slot + 1) * RUN] {
                *t = key * VALUES + values[key];
            }
        }
        for p in N - QUERIES..N {
            let key = rng.gen_range(0..KEYS);
            row[p] = KEYS * VALUES + NOISE + key;
            // The answer is a fact token `key * VALUES + value`: the model only has to
            // copy the token it retrieves.
            let answer = key * VALUES + values[key];
            targets[(b * N + p) * VOCAB + answer] = 1.0;
            answers.push((b, p, answer));
        }
    }
    Batch {
        tokens: dev.tensor_from_vec(tokens, (Const, Const)),
        targets: dev.tensor_from_vec(targets, (Const, Const, Const)),
        answers,
    }
}
// ANCHOR_END: task

// ANCHOR: model
/// Model width, heads, head dim, MLP width.
pub const M: usize = 32;
/// Query heads (= kv heads here).
pub const H: usize = 4;
/// Head dim (`M = H · HD`).
pub const HD: usize = 8;
/// MLP hidden width.
pub const F: usize = 64;

/// One pre-LayerNorm decoder block: causal multi-head dilated attention, then an MLP.
pub type Block<S> = (
    Residual<(
        LayerNorm1D<M>,
        MultiheadDilatedAttention<M, H, H, HD, S, Causal>,
    )>,
    Residual<(LayerNorm1D<M>, Linear<M, F>, FastGeLU, Linear<F, M>)>,
);

/// Decoder-only LongNet: token embedding, two blocks, final norm, vocabulary head.
pub type LongNet<S> = (
    Embedding<VOCAB, M>,
    (Block<S>, Block<S>),
    LayerNorm1D<M>,
    Linear<M, VOCAB>,
);
// ANCHOR_END: model

/// What a training run reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// Loss of every step.
    pub losses: Vec<f32>,
    /// Accuracy on fresh batches before training.
    pub acc_before: f32,
    /// Accuracy on fresh batches after training.
    pub acc_after: f32,
    /// Wall time of the training loop.
    pub seconds: f64,
}

impl Report {
    /// Mean loss of the first / last `k` steps.
    pub fn first_last(&self, k: usize) -> (f32, f32) {
        let k = k.min(self.losses.len()).max(1);
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
        (
            mean(&self.losses[..k]),
            mean(&self.losses[self.losses.len() - k..]),
        )
    }
}

fn accuracy<const B: usize, const N: usize>(logits: &[f32], batch: &Batch<B, N>) -> (usize, usize) {
    let mut hits = 0;
    for &(b, p, answer) in &batch.answers {
        let row = &logits[(b * N + p) * VOCAB..(b * N + p + 1) * VOCAB];
        let best = (0..VOCAB)
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .unwrap();
        hits += (best == answer) as usize;
    }
    (hits, batch.answers.len())
}

/// The built model (dfdx builders name the architecture, `Built` the parameters).
pub type Model<S> = <LongNet<S> as BuildOnDevice<Cpu, f32>>::Built;

/// Accuracy on 4 fresh batches.
fn evaluate<Mdl, const B: usize, const N: usize>(
    model: &mut Mdl,
    dev: &Cpu,
    rng: &mut StdRng,
) -> f32
where
    Mdl: ModuleMut<Tensor<Rank2<B, N>, usize, Cpu>, Output = Tensor<Rank3<B, N, VOCAB>, f32, Cpu>>,
{
    let (mut hits, mut total) = (0, 0);
    for _ in 0..4 {
        let batch = batch::<B, N>(dev, rng);
        let logits = model.try_forward_mut(batch.tokens.clone()).ok().unwrap();
        let (h, t) = accuracy(&logits.as_vec(), &batch);
        hits += h;
        total += t;
    }
    hits as f32 / total as f32
}

/// Train `LongNet<S>` for `steps` steps on batches of `B` sequences of `N` tokens.
/// `label` names the run in the progress bar (printed to stderr).
pub fn train<S: Schedule, const B: usize, const N: usize>(
    label: &str,
    steps: usize,
    seed: u64,
) -> Report {
    let dev = Cpu::seed_from_u64(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    // ANCHOR: train
    let mut model = dev.build_module::<LongNet<S>, f32>();
    // MAGNETO: scale the value / output projections by sqrt(ln(2 · layers)).
    let gamma = dilated_attention::nn::magneto_gamma(2);
    for block in [&mut model.1 .0, &mut model.1 .1] {
        block.0 .0 .1.try_reset_magneto(gamma).unwrap();
    }
    let mut opt = Adam::new(
        &model,
        AdamConfig {
            lr: 3e-3,
            ..Default::default()
        },
    );
    let mut grads = model.alloc_grads();
    // ANCHOR_END: train
    let acc_before = evaluate::<_, B, N>(&mut model, &dev, &mut rng);

    let start = Instant::now();
    let mut losses = Vec::with_capacity(steps);
    let mut bar = Progress::new(label, steps);
    for step in 0..steps {
        let batch = batch::<B, N>(&dev, &mut rng);
        // ANCHOR: step
        // The tokens are integers; the tape (with the reused gradient buffers) rides on
        // them into the embedding.
        let anchor: Tensor<Rank0, f32, Cpu> = dev.zeros();
        let tape = anchor.traced(grads).split_tape().1;
        let logits = model.forward_mut(batch.tokens.clone().put_tape(tape));
        // Mean cross-entropy over the query positions (zero targets elsewhere).
        let loss = cross_entropy_with_logits_loss(logits, batch.targets.clone())
            * (N as f32 / QUERIES as f32);
        let value = loss.array();
        grads = loss.backward();
        opt.update(&mut model, &grads).unwrap();
        model.zero_grads(&mut grads);
        // ANCHOR_END: step
        losses.push(value);
        bar.tick(step + 1, value);
    }
    bar.finish();
    let seconds = start.elapsed().as_secs_f64();
    let acc_after = evaluate::<_, B, N>(&mut model, &dev, &mut rng);
    Report {
        losses,
        acc_before,
        acc_after,
        seconds,
    }
}

/// A hand-written progress bar on stderr.
struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last: Instant,
}

impl Progress {
    fn new(label: &str, total: usize) -> Self {
        Progress {
            label: label.to_string(),
            total,
            start: Instant::now(),
            last: Instant::now(),
        }
    }
    fn tick(&mut self, done: usize, loss: f32) {
        // Redraw at most every 100 ms; when stderr is not a terminal (CI, `cargo test`),
        // only the final state is printed.
        let tty = std::io::stderr().is_terminal();
        if done != self.total && (!tty || self.last.elapsed().as_millis() < 100) {
            return;
        }
        self.last = Instant::now();
        const WIDTH: usize = 30;
        let filled = WIDTH * done / self.total.max(1);
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let eta = (self.total - done) as f64 / rate.max(1e-9);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{:<10} [{}{}] {done:>4}/{} loss {loss:.3} {rate:.1} it/s eta {eta:.0}s ",
            self.label,
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            self.total
        );
        let _ = err.flush();
    }
    fn finish(&self) {
        eprintln!();
    }
}

type LongNetSchedule = (Seg<LOCAL, 1>, Seg<64, 2>, Seg<256, RUN>);
type CiSchedule = (Seg<LOCAL, 1>, Seg<128, RUN>);
type LocalOnly = Seg<LOCAL, 1>;

/// The run used by CI (and by `tests/longnet_train.rs`): `N = 128`, 8 sequences a batch.
pub fn train_ci(steps: usize) -> Report {
    train::<CiSchedule, 8, 128>("longnet-ci", steps, 7)
}

#[allow(dead_code)]
fn main() {
    let ci = std::env::args().any(|a| a == "--ci");
    let show = |name: &str, r: &Report| {
        let (first, last) = r.first_last(20);
        println!(
            "{name:<22} loss {first:.3} -> {last:.3}   accuracy {:.1}% -> {:.1}%   ({:.1}s, {:.0} ms/step)",
            100.0 * r.acc_before,
            100.0 * r.acc_after,
            r.seconds,
            1e3 * r.seconds / r.losses.len() as f64
        );
    };
    println!(
        "associative recall: {KEYS} facts among noise, {QUERIES} queries in the last segment; chance {:.1}%",
        100.0 / VALUES as f64
    );
    if ci {
        let r = train_ci(60);
        show("LongNet (N=128)", &r);
        let (first, last) = r.first_last(10);
        assert!(last < first, "loss did not decrease: {first} -> {last}");
    } else {
        let steps = std::env::args()
            .skip_while(|a| a != "--steps")
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(400);
        let longnet = train::<LongNetSchedule, 16, 256>("longnet", steps, 1);
        let local = train::<LocalOnly, 16, 256>("local", steps, 1);
        show("LongNet (N=256)", &longnet);
        show("dense-local (w=16)", &local);
    }
}
