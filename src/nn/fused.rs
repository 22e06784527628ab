//! [`FusedMultiheadDilatedAttention`]: the multi-head module with one fused q/k/v
//! projection (one parameter `(3, H, HD, M)`, one matrix product), as PyTorch's
//! `in_proj_weight`. Same math as [`MultiheadDilatedAttention`] with `HKV = H`; use the
//! latter for grouped-query attention (a fused `(H + 2·HKV)`-head width cannot be named
//! by a const generic on stable Rust).
//!
//! [`MultiheadDilatedAttention`]: super::MultiheadDilatedAttention

use std::marker::PhantomData;

use dfdx::nn::modules::{LayerNorm1D, Linear};
use dfdx::nn::{
    BuildModule, BuildOnDevice, Module, ModuleVisitor, NonMutableModule, ScalarOptions,
    TensorCollection, TensorOptions,
};
use dfdx::shapes::{Axes2, Axes5, Const, Dim, Dtype, HasShape};
use dfdx::tensor::{Cpu, CpuError, Merge, Storage, Tape, Tensor, TensorFrom};
use dfdx::tensor_ops::{BroadcastTo, Device, PermuteTo, ReshapeTo, SelectTo, TryAdd, TryMatMul};
use num_traits::Float;
use rand::distributions::uniform::SampleUniform;
use rand::distributions::Uniform;

use super::mha::{dfdx_err, output_block, to_cpu, xavier_bound, Causality, NonCausal};
use crate::dtype::Element;
use crate::error::Result;
use crate::shape::typed::{CombineKind, LseCombine, Schedule};
use crate::tensor::{DilatedAttention, KeyMask};

/// `(…, M) -> 3 × (…, H, HD)`: q, k and v from one product with a `(3, H, HD, M)` weight
/// (xavier-uniform over each of the three `(H·HD, M)` blocks) and a `(3, H, HD)` zero bias.
#[derive(Debug, Clone)]
pub struct QkvLinear<const M: usize, const H: usize, const HD: usize, E: Dtype, D: Storage<E>> {
    /// `(3, H, HD, M)`: blocks for q, k, v.
    pub weight: Tensor<(Const<3>, Const<H>, Const<HD>, Const<M>), E, D>,
    /// `(3, H, HD)`.
    pub bias: Tensor<(Const<3>, Const<H>, Const<HD>), E, D>,
}

impl<const M: usize, const H: usize, const HD: usize, E, D> TensorCollection<E, D>
    for QkvLinear<M, H, HD, E, D>
where
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = QkvLinear<M, H, HD, E2, D2>;

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
                        let b = E::from(xavier_bound(M, H * HD, 1.0)).unwrap();
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
            |(weight, bias)| QkvLinear { weight, bias },
        )
    }
}

impl<const M: usize, const H: usize, const HD: usize, E: Dtype, D: Storage<E>> NonMutableModule
    for QkvLinear<M, H, HD, E, D>
{
}

/// `(q, k, v)`, each `(B, N, H, HD)`.
pub type Qkv<B, const N: usize, const H: usize, const HD: usize, E, T> = (
    Tensor<(B, Const<N>, Const<H>, Const<HD>), E, Cpu, T>,
    Tensor<(B, Const<N>, Const<H>, Const<HD>), E, Cpu, T>,
    Tensor<(B, Const<N>, Const<H>, Const<HD>), E, Cpu, T>,
);

impl<B: Dim, const N: usize, const M: usize, const H: usize, const HD: usize, E, T>
    Module<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>> for QkvLinear<M, H, HD, E, Cpu>
where
    E: Dtype,
    Cpu: Device<E>,
    T: Tape<E, Cpu> + Merge<T>,
{
    type Output = Qkv<B, N, H, HD, E, T>;
    type Error = CpuError;

    fn try_forward(
        &self,
        x: Tensor<(B, Const<N>, Const<M>), E, Cpu, T>,
    ) -> std::result::Result<Self::Output, CpuError> {
        let b = x.shape().0;
        let w = self
            .weight
            .retaped::<T>()
            .try_reshape_like(&(3 * H * HD, Const::<M>))?
            .try_permute::<_, Axes2<1, 0>>()?;
        let shape = (b, Const::<N>, Const::<3>, Const::<H>, Const::<HD>);
        let y = x.try_matmul(w)?.try_reshape_like(&shape)?;
        let y = y.try_add(self.bias.retaped::<T>().try_broadcast_like(&shape)?)?;
        // (3, B, N, H, HD): q, k, v are the three entries of the leading axis.
        let y = y.try_permute::<_, Axes5<2, 0, 1, 3, 4>>()?;
        let dev = y.device().clone();
        let q = y.retaped::<T>().try_select(dev.tensor(0usize))?;
        let k = y.retaped::<T>().try_select(dev.tensor(1usize))?;
        let v = y.try_select(dev.tensor(2usize))?;
        Ok((q, k, v))
    }
}

/// Builds a [`FusedMultiheadDilatedAttention`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FusedBuilder<
    const M: usize,
    const H: usize,
    const HD: usize,
    S,
    A = NonCausal,
    C = LseCombine,
>(PhantomData<(S, A, C)>);

impl<const M: usize, const H: usize, const HD: usize, S, A, C> FusedBuilder<M, H, HD, S, A, C> {
    /// `M = H · HD`; evaluated when the module is built or run.
    pub const TYPE_CHECK: () = assert!(
        M == H * HD && H > 0,
        "FusedMultiheadDilatedAttention<M, H, HD>: needs M == H * HD"
    );
}

/// Multi-head dilated attention with a fused q/k/v projection (`HKV = H`); otherwise as
/// [`MultiheadDilatedAttention`](super::MultiheadDilatedAttention).
#[derive(Debug, Clone)]
pub struct FusedMultiheadDilatedAttention<
    const M: usize,
    const H: usize,
    const HD: usize,
    S: Schedule,
    E: Dtype,
    D: Storage<E> = Cpu,
    A: Causality = NonCausal,
    C: CombineKind = LseCombine,
> {
    /// Fused q/k/v projection.
    pub w_qkv: QkvLinear<M, H, HD, E, D>,
    /// MAGNETO's sub-LayerNorm on the attention output, before `w_o`.
    pub norm: LayerNorm1D<M, E, D>,
    /// Output projection.
    pub w_o: Linear<M, M, E, D>,
    /// Dropout probability on the attention output while training.
    pub dropout: f64,
    _m: PhantomData<(S, A, C)>,
}

impl<const M: usize, const H: usize, const HD: usize, S, A, C, E, D> BuildOnDevice<D, E>
    for FusedBuilder<M, H, HD, S, A, C>
where
    S: Schedule,
    A: Causality,
    C: CombineKind,
    E: Dtype,
    D: Device<E>,
    FusedMultiheadDilatedAttention<M, H, HD, S, E, D, A, C>: BuildModule<D, E>,
{
    type Built = FusedMultiheadDilatedAttention<M, H, HD, S, E, D, A, C>;
    fn try_build_on_device(device: &D) -> std::result::Result<Self::Built, D::Err> {
        #[allow(clippy::let_unit_value)]
        let () = Self::TYPE_CHECK;
        Self::Built::try_build(device)
    }
}

impl<const M: usize, const H: usize, const HD: usize, S, E, D, A, C> TensorCollection<E, D>
    for FusedMultiheadDilatedAttention<M, H, HD, S, E, D, A, C>
where
    S: Schedule,
    A: Causality,
    C: CombineKind,
    E: Dtype + Float + SampleUniform,
    D: Device<E>,
{
    type To<E2: Dtype, D2: Device<E2>> = FusedMultiheadDilatedAttention<M, H, HD, S, E2, D2, A, C>;

    fn iter_tensors<V: ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> std::result::Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        visitor.visit_fields(
            (
                Self::module("w_qkv", |s| &s.w_qkv, |s| &mut s.w_qkv),
                Self::module("norm", |s| &s.norm, |s| &mut s.norm),
                Self::module("w_o", |s| &s.w_o, |s| &mut s.w_o),
                Self::scalar(
                    "dropout",
                    |s| &s.dropout,
                    |s| &mut s.dropout,
                    ScalarOptions::from_default(0.0),
                ),
            ),
            |(w_qkv, norm, w_o, dropout)| FusedMultiheadDilatedAttention {
                w_qkv,
                norm,
                w_o,
                dropout,
                _m: PhantomData,
            },
        )
    }
}

impl<const M: usize, const H: usize, const HD: usize, S, E, D, A, C> NonMutableModule
    for FusedMultiheadDilatedAttention<M, H, HD, S, E, D, A, C>
where
    S: Schedule,
    E: Dtype,
    D: Storage<E>,
    A: Causality,
    C: CombineKind,
{
}

impl<const M: usize, const H: usize, const HD: usize, S, E, A, C>
    FusedMultiheadDilatedAttention<M, H, HD, S, E, Cpu, A, C>
where
    S: Schedule,
    E: Dtype + Element + Float + SampleUniform,
    Cpu: Device<E>,
    A: Causality,
    C: CombineKind,
{
    /// The attention op this module runs.
    pub fn attention(&self) -> DilatedAttention<S, C> {
        DilatedAttention::new().causal(A::CAUSAL)
    }

    /// MAGNETO initialisation, as
    /// [`MultiheadDilatedAttention::try_reset_magneto`](super::MultiheadDilatedAttention::try_reset_magneto):
    /// q and k blocks xavier-uniform, v block and output projection with gain
    /// `gamma_init`, biases zero, sub-LayerNorm `(1, 0)`.
    pub fn try_reset_magneto(&mut self, gamma_init: f64) -> std::result::Result<(), CpuError> {
        // Xavier-uniform with gain g is g times xavier-uniform with gain 1.
        let b = E::from(xavier_bound(M, H * HD, 1.0)).unwrap();
        self.w_qkv.weight.try_fill_with_distr(Uniform::new(-b, b))?;
        let mut w = self.w_qkv.weight.as_vec();
        let gamma = E::from(gamma_init).unwrap();
        w[2 * H * HD * M..].iter_mut().for_each(|x| *x *= gamma);
        self.w_qkv.weight.copy_from(&w);
        let b = E::from(xavier_bound(M, M, gamma_init)).unwrap();
        self.w_o.weight.try_fill_with_distr(Uniform::new(-b, b))?;
        self.w_qkv.bias.try_fill_with_zeros()?;
        self.w_o.bias.try_fill_with_zeros()?;
        self.norm.gamma.try_fill_with_ones()?;
        self.norm.beta.try_fill_with_zeros()
    }

    /// Self-attention over `x: (batch, seq, M)` with an optional `(batch, seq)` key
    /// padding mask (`true` = attend).
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
        let () = FusedBuilder::<M, H, HD, S, A, C>::TYPE_CHECK;
        let b = x.shape().0;
        let (q, k, v) = self.w_qkv.try_forward(x).map_err(dfdx_err)?;
        let o = self.attention().try_forward_taped(q, k, v, mask)?;
        output_block(o, b, self.dropout, &self.norm, &self.w_o)
    }
}

impl<const M: usize, const H: usize, const HD: usize, S, E, A, C, B, T, const N: usize>
    Module<Tensor<(B, Const<N>, Const<M>), E, Cpu, T>>
    for FusedMultiheadDilatedAttention<M, H, HD, S, E, Cpu, A, C>
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

impl<const M: usize, const H: usize, const HD: usize, S, E, A, C, B, T, const N: usize>
    Module<(Tensor<(B, Const<N>, Const<M>), E, Cpu, T>, KeyMask<B, N>)>
    for FusedMultiheadDilatedAttention<M, H, HD, S, E, Cpu, A, C>
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

impl<const M: usize, const H: usize, const HD: usize, S, E, A, C, T, const N: usize>
    Module<Tensor<(Const<N>, Const<M>), E, Cpu, T>>
    for FusedMultiheadDilatedAttention<M, H, HD, S, E, Cpu, A, C>
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
