//! Ring attention (SPEC §2, §3): dilated attention over `W` ranks that each hold `n`
//! rows of a global sequence `N = W·n`, exchanging only the dilated K/V rows that other
//! ranks can see, point to point, overlapped with compute.
//!
//! * [`RingComm`] — the communicator trait; [`Loopback`] runs `W` ranks as threads.
//! * [`try_forward`] / [`try_backward`] — the runtime-shaped ring on one rank's slices.
//! * [`RingDilatedAttention`] — the typed front door on dfdx tensors: local length and
//!   world size are const generics, the global length is checked against the schedule
//!   at compile time, the communicator's world size once at construction.
//! * [`Layout`] — which global positions a rank holds (`Contiguous`, `Zigzag`), with
//!   split/gather helpers; [`simulate_forward`] / [`simulate_backward`] run a whole
//!   loopback ring on global tensors.
//! * [`try_all_reduce_sum`] ([`collective`]) — a ring all-reduce, for summing the
//!   parameter gradients of sequence-parallel training.
//!
//! Every rank's result equals the single-device result's rows at its positions
//! (`ops::dilated::try_forward` on the gathered inputs). The protocol, the layouts, what
//! travels and the failure modes are described in `src/ring/README.md`.
//!
//! ```
//! use dilated_attention::prelude::*;
//! use dilated_attention::ring::{simulate_forward, CommConfig, Layout};
//! let plan = Plan::new(Dims::mha(1, 64, 2, 8), &[Pattern::new(16, 1), Pattern::new(64, 4)],
//!                      Options::default().causal(true))?;
//! let q: Vec<f32> = (0..64 * 2 * 8).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
//! let (ring, stats) = simulate_forward(4, Layout::Zigzag, CommConfig::default(), &plan,
//!                                      &q, &q, &q, None)?;
//! let single = dilated_attention::ops::dilated::try_forward(&plan, &q, &q, &q, None)?;
//! let err = ring.out.iter().zip(&single.out).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//! assert!(err < 1e-5);
//! assert!(stats.iter().all(|s| s.max_remote_blocks <= 2));
//! # Ok::<(), dilated_attention::Error>(())
//! ```

pub mod collective;
mod comm;
mod driver;
#[cfg(all(feature = "nccl", feature = "cuda"))]
pub mod gpu;
mod layout;
pub mod loopback;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub use collective::try_all_reduce_sum;
pub use comm::{CommConfig, CommFault, Packet, RingComm, RingStats, Tag};
pub use driver::{attended_pairs, try_backward, try_forward, RingForward};
pub use layout::{Geometry, Layout};
pub use loopback::{simulate_backward, simulate_forward, Loopback};
#[cfg(feature = "nccl")]
pub use nccl::NcclComm;

use std::marker::PhantomData;

use dfdx::shapes::{Const, Dim, Dtype, HasShape};
use dfdx::tensor::TensorFromVec;

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::shape::typed::{CheckedRing, CheckedRingConfig, CombineKind, Schedule};
use crate::shape::{Dims, Options, Plan};
use crate::tensor::{Bnh, Bnhd, KeyMask};

/// Typed ring dilated attention on one rank: schedule `S`, combine `C`, `LOCAL` rows per
/// rank, `WORLD` ranks, over the communicator `Cm`.
///
/// Tensors are this rank's rows: `q` is `(B, LOCAL, H, D)`, `k`/`v` are
/// `(B, LOCAL, HKV, D)`, the mask `(B, LOCAL)`, in the local order of the layout.
///
/// ```
/// use dilated_attention::prelude::*;
/// use dilated_attention::ring::{CommConfig, Layout, Loopback, RingDilatedAttention};
/// type S = (Seg<8, 1>, Seg<32, 2>);
/// let outs = dilated_attention::ring::loopback::run(2, CommConfig::default(), |comm| {
///     let attn = RingDilatedAttention::<_, S, LseCombine, 16, 2>::try_new(&comm, Layout::Zigzag)?
///         .causal(true);
///     let dev = Cpu::default();
///     let q: Tensor<Rank4<1, 16, 2, 4>, f32, _> = dev.sample_normal();
///     let (out, _lse, stats) = attn.try_forward(&q, &q, &q, None)?;
///     Ok((out.as_vec().len(), stats.steps))
/// })?;
/// assert!(outs.iter().all(|r| matches!(r, Ok((128, _)))));
/// # Ok::<(), dilated_attention::Error>(())
/// ```
///
/// A global length that does not satisfy the schedule is a compile error:
///
/// ```compile_fail,E0080
/// use dilated_attention::prelude::*;
/// use dilated_attention::ring::{CommConfig, Layout, Loopback, RingDilatedAttention};
/// let comm = Loopback::ring(2, CommConfig::default()).unwrap().remove(0);
/// // 2 x 12 = 24 is not a multiple of the segment 16.
/// let attn = RingDilatedAttention::<_, Seg<16, 1>, LseCombine, 12, 2>::try_new(&comm, Layout::Contiguous).unwrap();
/// let q: Tensor<Rank4<1, 12, 2, 4>, f32, _> = Cpu::default().sample_normal();
/// let _ = attn.try_forward(&q, &q, &q, None);
/// ```
#[derive(Debug)]
pub struct RingDilatedAttention<'c, Cm, S, C, const LOCAL: usize, const WORLD: usize> {
    comm: &'c Cm,
    layout: Layout,
    opts: Options,
    _m: PhantomData<(S, C)>,
}

impl<'c, Cm: RingComm, S: Schedule, C: CombineKind, const LOCAL: usize, const WORLD: usize>
    RingDilatedAttention<'c, Cm, S, C, LOCAL, WORLD>
{
    /// Bind to a communicator. `Err` if its world size is not `WORLD`, or if the zigzag
    /// layout is asked for with an odd `LOCAL`.
    pub fn try_new(comm: &'c Cm, layout: Layout) -> Result<Self> {
        #[allow(clippy::let_unit_value)]
        let () = CheckedRing::<LOCAL, WORLD, S>::OK;
        if comm.world_size() != WORLD {
            return Err(Error::Ring {
                msg: format!(
                    "RingDilatedAttention is typed for a world of {WORLD} ranks, the communicator has {}",
                    comm.world_size()
                ),
            });
        }
        layout::Geometry::new(layout, WORLD, LOCAL)?;
        Ok(RingDilatedAttention {
            comm,
            layout,
            opts: Options {
                combine: C::COMBINE,
                ..Options::default()
            },
            _m: PhantomData,
        })
    }
    /// Causal masking on global positions.
    pub fn causal(mut self, causal: bool) -> Self {
        self.opts.causal = causal;
        self
    }
    /// A custom softmax scale.
    pub fn scale(mut self, scale: f64) -> Self {
        self.opts.scale = Some(scale);
        self
    }
    /// Combine weights carry no gradient (`Lse` only).
    pub fn detach_weights(mut self, detach: bool) -> Self {
        self.opts.detach_weights = detach;
        self
    }
    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The communicator.
    pub fn comm(&self) -> &'c Cm {
        self.comm
    }

    /// The global plan for batch `batch`.
    pub fn plan<const H: usize, const HKV: usize, const D: usize>(
        &self,
        batch: usize,
    ) -> Result<Plan> {
        #[allow(clippy::let_unit_value)]
        let () = CheckedRingConfig::<LOCAL, WORLD, H, HKV, D, S, C>::OK;
        Plan::new(
            Dims {
                batch,
                seq: LOCAL * WORLD,
                heads: H,
                kv_heads: HKV,
                head_dim: D,
            },
            S::PATTERNS,
            self.opts,
        )
    }

    /// Forward on this rank: local `(out, L)` and the call's statistics. Every rank of
    /// the ring must call it.
    #[allow(clippy::type_complexity)]
    pub fn try_forward<B: Dim, const H: usize, const HKV: usize, const D: usize, E>(
        &self,
        q: &Bnhd<B, LOCAL, H, D, E>,
        k: &Bnhd<B, LOCAL, HKV, D, E>,
        v: &Bnhd<B, LOCAL, HKV, D, E>,
        mask: Option<&KeyMask<B, LOCAL>>,
    ) -> Result<(Bnhd<B, LOCAL, H, D, E>, Bnh<B, LOCAL, H, E>, RingStats)>
    where
        E: Element + Dtype,
    {
        let batch = q.shape().0;
        let plan = self.plan::<H, HKV, D>(batch.size())?;
        let mv = mask.map(|m| m.as_vec());
        let f = try_forward(
            self.comm,
            &plan,
            self.layout,
            &q.as_vec(),
            &k.as_vec(),
            &v.as_vec(),
            mv.as_deref(),
        )?;
        let dev = q.device();
        Ok((
            dev.tensor_from_vec(f.out, *q.shape()),
            dev.tensor_from_vec(f.lse, (batch, Const::<LOCAL>, Const::<H>)),
            f.stats,
        ))
    }

    /// Backward on this rank from the saved local `out`, `L`: local `(dq, dk, dv)`.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn try_backward<B: Dim, const H: usize, const HKV: usize, const D: usize, E>(
        &self,
        q: &Bnhd<B, LOCAL, H, D, E>,
        k: &Bnhd<B, LOCAL, HKV, D, E>,
        v: &Bnhd<B, LOCAL, HKV, D, E>,
        mask: Option<&KeyMask<B, LOCAL>>,
        out: &Bnhd<B, LOCAL, H, D, E>,
        lse: &Bnh<B, LOCAL, H, E>,
        grad_out: &Bnhd<B, LOCAL, H, D, E>,
    ) -> Result<(
        Bnhd<B, LOCAL, H, D, E>,
        Bnhd<B, LOCAL, HKV, D, E>,
        Bnhd<B, LOCAL, HKV, D, E>,
        RingStats,
    )>
    where
        E: Element + Dtype,
    {
        let batch = q.shape().0;
        let plan = self.plan::<H, HKV, D>(batch.size())?;
        let mv = mask.map(|m| m.as_vec());
        let (g, stats) = try_backward(
            self.comm,
            &plan,
            self.layout,
            &q.as_vec(),
            &k.as_vec(),
            &v.as_vec(),
            mv.as_deref(),
            &out.as_vec(),
            &lse.as_vec(),
            &grad_out.as_vec(),
        )?;
        let dev = q.device();
        Ok((
            dev.tensor_from_vec(g.dq, *q.shape()),
            dev.tensor_from_vec(g.dk, *k.shape()),
            dev.tensor_from_vec(g.dv, *v.shape()),
            stats,
        ))
    }
}
