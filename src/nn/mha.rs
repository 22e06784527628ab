//! [`MultiheadDilatedAttention`]: a dfdx module around the taped dilated-attention op.
//!
//! ```text
//! x (B, N, M) ─┬─ w_q ─> q (B, N, H,   HD) ─┐
//!              ├─ w_k ─> k (B, N, HKV, HD) ─┼─ dilated attention (schedule S, combine C,
//!              └─ w_v ─> v (B, N, HKV, HD) ─┘   causal if A = Causal, key padding mask)
//!                                               │ (B, N, H, HD) -> (B, N, M)
//!                                               ├─ dropout(p)      (only with an OwnedTape)
//!                                               ├─ sub-LayerNorm   (MAGNETO)
//!                                               └─ w_o: Linear<M, M> -> (B, N, M)
//! ```
//!
//! Design notes:
//!
//! * `M = H · HD` is a const assertion (stable Rust cannot compute `M / H` in a type), so
//!   the head dim `HD` is spelled out; `H % HKV == 0` (grouped-query attention) is checked
//!   by the same compile-time machinery as the op (`Checked`).
//! * The q/k/v projections are [`HeadLinear`]s, a `Linear` whose output is already split
//!   into heads: `(…, M) -> (…, G, HD)`. With GQA the k/v projections are `HKV · HD`
//!   wide, a width a `Linear<M, O>` could only name with one more const parameter.
//! * Dropout: the kernel never materialises attention probabilities, so the dropout is
//!   applied to the attention output (per head and channel, before the sub-LayerNorm) —
//!   the place fused attention kernels offer. It uses dfdx's `dropout` op and therefore
//!   the device RNG: seed it with `Cpu::seed_from_u64`. It runs only when the input
//!   carries an `OwnedTape` (training); with a `NoneTape` it is the identity.
//! * The causal flag is a type (`Causal` / `NonCausal`) and the dropout probability is a
//!   dfdx scalar field, so both survive `to_device`, `to_dtype` and serialisation.
//! * `Module::Error` is dfdx's device error, as for every dfdx module, so the module can
//!   sit in tuples and `Residual`s with dfdx's own; [`MultiheadDilatedAttention::try_forward_masked`]
//!   returns this crate's [`Error`] with its context.

use std::marker::PhantomData;

use dfdx::nn::modules::{LayerNorm1D, Linear};
use dfdx::nn::{
    BuildModule, BuildOnDevice, Module, ModuleVisitor, NonMutableModule, ScalarOptions,
    TensorCollection, TensorOptions,
};
use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::{Cpu, CpuError, Merge, Storage, Tape, Tensor};
use dfdx::tensor_ops::{BroadcastTo, PermuteTo, ReshapeTo};
use dfdx::tensor_ops::{Device, TryAdd, TryMatMul};
use num_traits::Float;
use rand::distributions::uniform::SampleUniform;
use rand::distributions::Uniform;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::typed::{CombineKind, LseCombine, Schedule};
use crate::tensor::{DilatedAttention, KeyMask};

/// Whether attention is causal, as a type (so it is part of the module's type).
pub trait Causality: 'static + Default + Copy + Send + Sync + std::fmt::Debug {
    /// `true` for causal masking on global positions.
    const CAUSAL: bool;
}

/// Causal (decoder) attention: query `p` sees keys `k <= p`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Causal;
/// Bidirectional (encoder) attention.
#[derive(Debug, Default, Clone, Copy)]
pub struct NonCausal;
impl Causality for Causal {
    const CAUSAL: bool = true;
}
impl Causality for NonCausal {
    const CAUSAL: bool = false;
}

/// MAGNETO's initialisation gain for a model of `layers` layers: `sqrt(ln(2 · layers))`
/// (applied to the value and output projections, and to the MLP).
pub fn magneto_gamma(layers: usize) -> f64 {
    ((2 * layers.max(1)) as f64).ln().sqrt()
}

/// Builders (the types you name in a model definition), dfdx style.
pub mod builder {
    use super::*;

    /// Builds a [`HeadLinear`](super::HeadLinear).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct HeadLinear<const M: usize, const G: usize, const HD: usize>;

    /// Builds a [`MultiheadDilatedAttention`](super::MultiheadDilatedAttention):
    /// model width `M`, `H` query heads, `HKV` key/value heads, head dim `HD`
    /// (`M = H · HD`), schedule `S`, causality `A`, combine `C`.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MultiheadDilatedAttention<
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        A = NonCausal,
        C = LseCombine,
    >(PhantomData<(S, A, C)>);
}

/// A linear map whose output is split into `G` heads of `HD`: `(…, M) -> (…, G, HD)`,
/// `y = x · Wᵀ + b` with `W: (G, HD, M)`, `b: (G, HD)`. Xavier-uniform weight, zero bias.
#[derive(Debug, Clone)]
pub struct HeadLinear<const M: usize, const G: usize, const HD: usize, E: Dtype, D: Storage<E>> {
    /// `(G, HD, M)`: output row `(g, d)` is a weight row over the `M` inputs.
    pub weight: Tensor<(Const<G>, Const<HD>, Const<M>), E, D>,
    /// `(G, HD)`.
    pub bias: Tensor<(Const<G>, Const<HD>), E, D>,
}

/// Xavier-uniform bound `gain · sqrt(6 / (fan_in + fan_out))`.
pub(crate) fn xavier_bound(fan_in: usize, fan_out: usize, gain: f64) -> f64 {
    gain * (6.0 / (fan_in + fan_out) as f64).sqrt()
}

impl<const M: usize, const G: usize, const HD: usize, E, D> TensorCollection<E, D>
    for HeadLinear<M, G, HD, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = HeadLinear<M, G, HD, E2, D2>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> std::result::Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::tensor(
                    "weight",
                    |s| &s.weight,
                    |s| &mut s.weight,
                    TensorOptions::reset_with(|t| {
                        let b = E::from(xavier_bound(M, G * HD, 1.0)).unwrap();
                        t.try_fill_with_distr(Uniform::new(-b, b))
                    }),
                ),
                Self::tensor(
                    "bias",
                    |s| &s.bias,
                    |s| &mut s.bias,
                    TensorOptions::reset_to_zeros(),
                ),
            ),
            |(weight, bias)| HeadLinear { weight, bias },
        )
    }
}

impl<const M: usize, const G: usize, const HD: usize, E, D> BuildOnDevice<D, E>
    for builder::HeadLinear<M, G, HD>
where
    E: Dtype,
    D: Device<E>,
    HeadLinear<M, G, HD, E, D>: BuildModule<D, E>,
{
    type Built = HeadLinear<M, G, HD, E, D>;
}

impl<const M: usize, const G: usize, const HD: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for HeadLinear<M, G, HD, E, D>
{
}

impl<B: Dim, const N: usize, const M: usize, const G: usize, const HD: usize, E, T>
    Module<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>> for HeadLinear<M, G, HD, E, Cpu>
where
    E: Dtype,
    Cpu: Device<E>,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Tensor<(B, Const<N>, Const<G>, Const<HD>), E, Cpu, T>;
    type Error = CpuError;

    fn try_forward(
        &self,
        x: Tensor<(B, Const<N>, Const<M>), E, Cpu, T>,
    ) -> std::result::Result<Self::Output, CpuError> {
        let b = x.shape().0;
        let w = self
            .weight
            .retaped::<T>()
            .try_reshape_like(&(G * HD, Const::<M>))?
            .try_permute::<_, dfdx::shapes::Axes2<1, 0>>()?;
        let y = x.try_matmul(w)?;
        let shape = (b, Const::<N>, Const::<G>, Const::<HD>);
        let y = y.try_reshape_like(&shape)?;
        y.try_add(self.bias.retaped::<T>().try_broadcast_like(&shape)?)
    }
}

/// Multi-head dilated attention (LongNet) as a dfdx module; see the [module docs](self).
///
/// `M` model width, `H` query heads, `HKV` key/value heads (`H % HKV == 0`), `HD` head
/// dim (`M = H · HD`), `S` the schedule (e.g. `(Seg<64, 1>, Seg<256, 4>)`), `E` the
/// element type, `D` the device (the forward runs on [`Cpu`]), `A` causality, `C` how
/// patterns combine.
#[derive(Debug, Clone)]
pub struct MultiheadDilatedAttention<
    const M: usize,
    const H: usize,
    const HKV: usize,
    const HD: usize,
    S: Schedule,
    E: Dtype,
    D: Storage<E> = Cpu,
    A: Causality = NonCausal,
    C: CombineKind = LseCombine,
> {
    /// Query projection `(…, M) -> (…, H, HD)`.
    pub w_q: HeadLinear<M, H, HD, E, D>,
    /// Key projection `(…, M) -> (…, HKV, HD)`.
    pub w_k: HeadLinear<M, HKV, HD, E, D>,
    /// Value projection `(…, M) -> (…, HKV, HD)`.
    pub w_v: HeadLinear<M, HKV, HD, E, D>,
    /// MAGNETO's sub-LayerNorm on the attention output, before `w_o`.
    pub norm: LayerNorm1D<M, E, D>,
    /// Output projection.
    pub w_o: Linear<M, M, E, D>,
    /// Dropout probability on the attention output while training (`OwnedTape`); 0 by
    /// default.
    pub dropout: f64,
    _m: PhantomData<(S, A, C)>,
}

impl<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, A, C>
    builder::MultiheadDilatedAttention<M, H, HKV, HD, S, A, C>
{
    /// `M = H · HD`; evaluated when the module is built or run.
    pub const TYPE_CHECK: () = assert!(
        M == H * HD && H > 0 && HKV > 0 && H.is_multiple_of(HKV),
        "MultiheadDilatedAttention<M, H, HKV, HD>: needs M == H * HD and H % HKV == 0"
    );
}

impl<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, A, C, E, D>
    BuildOnDevice<D, E> for builder::MultiheadDilatedAttention<M, H, HKV, HD, S, A, C>
where
    S: Schedule,
    A: Causality,
    C: CombineKind,
    E: Dtype,
    D: Device<E>,
    MultiheadDilatedAttention<M, H, HKV, HD, S, E, D, A, C>: BuildModule<D, E>,
{
    type Built = MultiheadDilatedAttention<M, H, HKV, HD, S, E, D, A, C>;
    fn try_build_on_device(device: &D) -> std::result::Result<Self::Built, D::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Self::TYPE_CHECK;
        Self::Built::try_build(device)
    }
}

impl<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, E, D, A, C>
    TensorCollection<E, D> for MultiheadDilatedAttention<M, H, HKV, HD, S, E, D, A, C>
where
    S: Schedule,
    A: Causality,
    C: CombineKind,
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = MultiheadDilatedAttention<M, H, HKV, HD, S, E2, D2, A, C>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> std::result::Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("w_q", |s| &s.w_q, |s| &mut s.w_q),
                Self::module("w_k", |s| &s.w_k, |s| &mut s.w_k),
                Self::module("w_v", |s| &s.w_v, |s| &mut s.w_v),
                Self::module("norm", |s| &s.norm, |s| &mut s.norm),
                Self::module("w_o", |s| &s.w_o, |s| &mut s.w_o),
                Self::scalar(
                    "dropout",
                    |s| &s.dropout,
                    |s| &mut s.dropout,
                    ScalarOptions::from_default(0.0),
                ),
            ),
            |(w_q, w_k, w_v, norm, w_o, dropout)| MultiheadDilatedAttention {
                w_q,
                w_k,
                w_v,
                norm,
                w_o,
                dropout,
                _m: PhantomData,
            },
        )
    }
}

impl<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, E, D, A, C>
    NonMutableModule for MultiheadDilatedAttention<M, H, HKV, HD, S, E, D, A, C>
where
    S: Schedule,
    E: Dtype,
    D: Storage<E>,
    A: Causality,
    C: CombineKind,
{
}

impl<const M: usize, const H: usize, const HKV: usize, const HD: usize, S, E, A, C>
    MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
{
    /// The attention op this module runs (schedule `S`, combine `C`, causal if `A` is).
    pub fn attention(&self) -> DilatedAttention<S, C> {
        DilatedAttention::new().causal(A::CAUSAL)
    }

    /// MAGNETO initialisation (Wang et al. 2022, "Foundation Transformers"): every
    /// projection xavier-uniform, the value and output projections with gain
    /// `gamma_init` (use [`magneto_gamma`]`(layers)`), biases zero, sub-LayerNorm reset
    /// to `(1, 0)`. Parameters keep their identity (optimizer state stays attached).
    pub fn try_reset_magneto(&mut self, gamma_init: f64) -> std::result::Result<(), CpuError> {
        let u = |fan_in, fan_out, gain| {
            let b = E::from(xavier_bound(fan_in, fan_out, gain)).unwrap();
            Uniform::new(-b, b)
        };
        self.w_q.weight.try_fill_with_distr(u(M, H * HD, 1.0))?;
        self.w_k.weight.try_fill_with_distr(u(M, HKV * HD, 1.0))?;
        self.w_v
            .weight
            .try_fill_with_distr(u(M, HKV * HD, gamma_init))?;
        self.w_o.weight.try_fill_with_distr(u(M, M, gamma_init))?;
        self.w_q.bias.try_fill_with_zeros()?;
        self.w_k.bias.try_fill_with_zeros()?;
        self.w_v.bias.try_fill_with_zeros()?;
        self.w_o.bias.try_fill_with_zeros()?;
        self.norm.gamma.try_fill_with_ones()?;
        self.norm.beta.try_fill_with_zeros()
    }

    /// Self-attention over `x: (batch, seq, M)` with an optional `(batch, seq)` key
    /// padding mask (`true` = attend). The tape of `x` carries the whole backward.
    #[allow(clippy::type_complexity)]
    pub fn try_forward_masked<B: Dim, const N: usize, T>(
        &self,
        x: Tensor<(B, Const<N>, Const<M>), E, Cpu, T>,
        mask: Option<&KeyMask<B, N>>,
    ) -> Result<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>>
    where
        T: Tape<E, Cpu> + Merge<T>,
    {
        #[allow(clippy::let_unit_value)]
        let () = builder::MultiheadDilatedAttention::<M, H, HKV, HD, S, A, C>::TYPE_CHECK;
        let b = x.shape().0;
        let q = self.w_q.try_forward(x.retaped::<T>()).map_err(dfdx_err)?;
        let k = self.w_k.try_forward(x.retaped::<T>()).map_err(dfdx_err)?;
        let v = self.w_v.try_forward(x).map_err(dfdx_err)?;
        let o = self.attention().try_forward_taped(q, k, v, mask)?;
        output_block(o, b, self.dropout, &self.norm, &self.w_o)
    }
}

/// What follows the attention op in both module flavours: heads merged back to `M`,
/// dropout (training only), sub-LayerNorm, output projection.
#[allow(clippy::type_complexity)]
pub(crate) fn output_block<
    B,
    const N: usize,
    const M: usize,
    const H: usize,
    const HD: usize,
    E,
    T,
>(
    o: Tensor<(B, Const<N>, Const<H>, Const<HD>), E, Cpu, T>,
    b: B,
    dropout: f64,
    norm: &LayerNorm1D<M, E, Cpu>,
    w_o: &Linear<M, M, E, Cpu>,
) -> Result<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>>
where
    B: Dim,
    E: Dtype,
    Cpu: Device<E>,
    T: Tape<E, Cpu> + Merge<T>,
{
    let mut o = o
        .try_reshape_like(&(b, Const::<N>, Const::<M>))
        .map_err(dfdx_err)?;
    if T::OWNS_TAPE && dropout > 0.0 {
        o = o.try_dropout(dropout).map_err(dfdx_err)?;
    }
    let o = norm.try_forward(o).map_err(dfdx_err)?;
    w_o.try_forward(o).map_err(dfdx_err)
}

pub(crate) fn dfdx_err(e: CpuError) -> Error {
    Error::Device {
        msg: format!("dfdx: {e}"),
    }
}

/// Only this crate's shape/mask errors can occur here, and a dfdx module reports the
/// device error type; the message is lost, the failure is not.
pub(crate) fn to_cpu(_: Error) -> CpuError {
    CpuError::WrongNumElements
}

impl<
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        B,
        T,
        const N: usize,
    > Module<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>>
    for MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
    B: Dim,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Tensor<(B, Const<N>, Const<M>), E, Cpu, T>;
    type Error = CpuError;

    /// Batched self-attention, `(batch, seq, M) -> (batch, seq, M)`.
    fn try_forward(
        &self,
        x: Tensor<(B, Const<N>, Const<M>), E, Cpu, T>,
    ) -> std::result::Result<Self::Output, CpuError> {
        self.try_forward_masked(x, None).map_err(to_cpu)
    }
}

impl<
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        B,
        T,
        const N: usize,
    > Module<(Tensor<(B, Const<N>, Const<M>), E, Cpu, T>, KeyMask<B, N>)>
    for MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
    B: Dim,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Tensor<(B, Const<N>, Const<M>), E, Cpu, T>;
    type Error = CpuError;

    /// Batched self-attention with a `(batch, seq)` key padding mask.
    fn try_forward(
        &self,
        (x, mask): (Tensor<(B, Const<N>, Const<M>), E, Cpu, T>, KeyMask<B, N>),
    ) -> std::result::Result<Self::Output, CpuError> {
        self.try_forward_masked(x, Some(&mask)).map_err(to_cpu)
    }
}

impl<
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        T,
        const N: usize,
    > Module<Tensor<(Const<N>, Const<M>), E, Cpu, T>>
    for MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Tensor<(Const<N>, Const<M>), E, Cpu, T>;
    type Error = CpuError;

    /// Unbatched self-attention, `(seq, M) -> (seq, M)`.
    fn try_forward(
        &self,
        x: Tensor<(Const<N>, Const<M>), E, Cpu, T>,
    ) -> std::result::Result<Self::Output, CpuError> {
        let x = x.try_reshape_like(&(Const::<1>, Const::<N>, Const::<M>))?;
        let y = self.try_forward_masked(x, None).map_err(to_cpu)?;
        y.try_reshape_like(&(Const::<N>, Const::<M>))
    }
}

impl<
        const M: usize,
        const H: usize,
        const HKV: usize,
        const HD: usize,
        S,
        E,
        A,
        C,
        T,
        const N: usize,
    >
    Module<(
        Tensor<(Const<N>, Const<M>), E, Cpu, T>,
        Tensor<(Const<N>,), bool, Cpu>,
    )> for MultiheadDilatedAttention<M, H, HKV, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Tensor<(Const<N>, Const<M>), E, Cpu, T>;
    type Error = CpuError;

    /// Unbatched self-attention with a `(seq,)` key padding mask.
    fn try_forward(
        &self,
        (x, mask): (
            Tensor<(Const<N>, Const<M>), E, Cpu, T>,
            Tensor<(Const<N>,), bool, Cpu>,
        ),
    ) -> std::result::Result<Self::Output, CpuError> {
        let x = x.try_reshape_like(&(Const::<1>, Const::<N>, Const::<M>))?;
        let mask: KeyMask<Const<1>, N> = dfdx::tensor::TensorFromVec::try_tensor_from_vec(
            mask.device(),
            mask.as_vec(),
            (Const::<1>, Const::<N>),
        )?;
        let y = self.try_forward_masked(x, Some(&mask)).map_err(to_cpu)?;
        y.try_reshape_like(&(Const::<N>, Const::<M>))
    }
}
