//! The CUDA device (feature `cuda`): context, stream, typed device tensors, host copies.
//!
//! cudarc is built with `dynamic-loading`, so the crate builds and its CPU tests run on
//! machines without CUDA. [`Cuda::new`] checks for the driver library first and returns
//! [`Error::Device`] when the driver, a GPU or NVRTC is missing — never a panic.
//!
//! A [`CudaTensor<S, E>`] is a device buffer with a dfdx shape `S` — the same shape types
//! as the CPU path, e.g. `(B, Const<N>, Const<H>, Const<D>)` — in one of the element types
//! of [`CudaElement`]: `f32`, `half::f16`, `half::bf16`.
//!
//! ```no_run
//! use dilated_attention::prelude::*;
//! use dilated_attention::tensor::cuda::{Cuda, CudaTensor};
//! let dev = Cuda::new(0)?; // Err without a GPU
//! let host = vec![half::bf16::from_f32(0.5); 2 * 64 * 4 * 64];
//! let q: CudaTensor<Rank4<2, 64, 4, 64>, half::bf16> = dev.tensor_from_vec(&host, Default::default())?;
//! let attn = DilatedAttention::<(Seg<16, 1>, Seg<64, 4>)>::new().causal(true);
//! let (out, lse) = attn.try_forward_cuda(&dev, &q, &q, &q, None)?;
//! assert_eq!(out.to_vec()?.len(), host.len());
//! # let _ = lse;
//! # Ok::<(), dilated_attention::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use dfdx::shapes::Shape;

use crate::error::{Error, Result};

/// Turn any displayable CUDA error into [`Error::Device`] with context.
pub(crate) fn dev_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Device {
        msg: format!("{what}: {e:?}"),
    }
}

/// An element type the CUDA kernels read and write. Accumulation is always `f32`.
pub trait CudaElement:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static
{
    /// Suffix of the kernel names (`f32`, `bf16`, `f16`).
    const NAME: &'static str;
    /// Whether tensor-core kernels exist for this type.
    const TENSOR_CORES: bool;
    /// Conversion from `f64` (round to nearest).
    fn from_f64(x: f64) -> Self;
    /// Conversion to `f64`.
    fn to_f64(self) -> f64;
    /// A NaN used to poison outputs in tests.
    fn nan() -> Self;
}

/// Let the device's default memory pool (cudarc allocates from it, stream-ordered) keep
/// freed memory instead of returning it to the driver at every synchronisation: without
/// this, each call re-maps its buffers (milliseconds per GiB). The memory stays reserved
/// for this process; [`Cuda::trim_pool`] gives it back.
fn keep_pool_memory(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<()> {
    ctx.bind_to_thread().map_err(dev_err("bind context"))?;
    set_pool_u64(
        default_pool(ordinal)?,
        cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
}

/// The default memory pool of GPU `ordinal` (the caller has bound its context).
fn default_pool(ordinal: usize) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: valid out-pointers; callers pass an ordinal checked against the device count.
    unsafe {
        sys::cuDeviceGet(&mut dev, ordinal as i32)
            .result()
            .map_err(dev_err("cuDeviceGet"))?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, dev)
            .result()
            .map_err(dev_err("cuDeviceGetDefaultMemPool"))?;
    }
    Ok(pool)
}

/// Set a 64-bit attribute of a memory pool.
fn set_pool_u64(
    pool: cudarc::driver::sys::CUmemoryPool,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> Result<()> {
    // SAFETY: `pool` is a live pool; the attributes used here (release threshold, used
    // high-water mark) take a u64.
    unsafe {
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            attr,
            &mut value as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(dev_err("memory pool attribute"))
    }
}

impl CudaElement for f32 {
    const NAME: &'static str = "f32";
    const TENSOR_CORES: bool = false;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn nan() -> Self {
        f32::NAN
    }
}

impl CudaElement for half::bf16 {
    const NAME: &'static str = "bf16";
    const TENSOR_CORES: bool = true;
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn nan() -> Self {
        half::bf16::NAN
    }
}

impl CudaElement for half::f16 {
    const NAME: &'static str = "f16";
    const TENSOR_CORES: bool = true;
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn nan() -> Self {
        half::f16::NAN
    }
}

/// Which forward kernel to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum KernelPref {
    /// Tensor cores where the dtype and head dim allow (bf16/f16, D = 64 or 128), else
    /// the generic kernel.
    #[default]
    Auto = 0,
    /// Always the generic (CUDA-core, f32 arithmetic) kernel, D <= 128.
    Generic = 1,
    /// Tensor cores through `mma.sync` (the sm_80 kernels) even where the Hopper `wgmma`
    /// forward would run: for comparisons and tests.
    MmaSync = 2,
}

/// A CUDA device: one context (the device's primary context) and one stream.
///
/// Kernels are compiled by NVRTC at first use and cached per device ordinal for the
/// process (see `ops/dilated/CUDA.md`).
#[derive(Debug)]
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    poison: AtomicBool,
    pref: AtomicU8,
    fwd_warps: AtomicU8,
    fwd_mt: AtomicU8,
    bwd_variant: AtomicU8,
    dq_warps: AtomicU8,
    /// Compute capability 9.0 (H100, H200): the `wgmma` forward (`hopper.cu`) can run.
    hopper: bool,
    /// Hopper forward: warp-specialised (`fwd_ws`, the default) or not (`fwd_wg`).
    ws: AtomicBool,
    /// Warp-specialised Hopper forward with the softmax of `S(n)` under `P(c)·V(c)`
    /// (`fwd_wso`) or after it (`fwd_ws`).
    fwd_overlap: AtomicBool,
    /// Persistent warp-specialised Hopper forward (`fwd_wsp`).
    fwd_persistent: AtomicBool,
    /// ... for causal problems too (tiles dealt in pairs; opt-in, measured 4 % slower).
    fwd_persistent_causal: AtomicBool,
    /// Overlapped warp-specialised Hopper forward with Q as the register A operand of
    /// `S = Q·Kᵀ` (`fwd_wsor`, `fwd_wspr`; opt-in).
    fwd_reg_operands: AtomicBool,
    /// Overlapped warp-specialised Hopper forward with 176-key tiles (`fwd_wspw`,
    /// `fwd_wsow`; opt-in).
    fwd_wide_tiles: AtomicBool,
    /// Streaming multiprocessors (the persistent forward's grid).
    sms: u32,
    /// Hopper backward: dQ fused into the key-owner kernel (the default: `bwd_wgt2`;
    /// `bwd_wgp`, `bwd_wg`) or its own pass.
    fused_dq: AtomicBool,
    /// Fused Hopper backward with its dQ columns staged in shared memory and added by the
    /// tensor memory accelerator (`bwd_wgt`, `bwd_wgt2`; the default).
    fused_dq_tma: AtomicBool,
    /// ... with a staging buffer per warpgroup and two Q/dO stages (`bwd_wgt2`; the default).
    fused_dq_tma_split: AtomicBool,
    fused_tma_loads: AtomicBool,
    /// `bwd_wgt2` at D = 128 with query tiles of 80 rows (`bwd_wgt2w`; the default).
    bwd_wide_tiles: AtomicBool,
    /// `bwd_wgt2w` with a producer warpgroup (`bwd_wgt2wp`, `bwd_wgt2ws`, `bwd_wgt2wsn`; the
    /// default since stop 33).
    bwd_producer: AtomicBool,
    /// `bwd_wgt2wp`'s query metadata split into arrays (`bwd_wgt2ws`; the default since
    /// stop 34).
    bwd_split_meta: AtomicBool,
    /// ... and for non-causal problems without causal limits (`bwd_wgt2wsn`).
    bwd_noncausal_kernel: AtomicBool,
    /// The name of the fused Hopper backward kernel of the last backward (tests ask which ran).
    last_fused_bwd: Mutex<String>,
    fwd_tma_loads: AtomicBool,
    /// A branch before the persistent forward's wait for P·V that ptxas would otherwise
    /// hoist (`false`: `fwd_wsptn`).
    wait_block_ends: AtomicBool,
    /// The persistent forward stores an item's output rows under the next item's first MMA
    /// (`fwd_wspx`; opt-in).
    fwd_deferred_stores: AtomicBool,
    /// ... 16-byte stores at each item's end (`fwd_wsps`, the default since stop 27;
    /// `false`: `fwd_wspt`'s 4-byte stores).
    fwd_vector_stores: AtomicBool,
    /// The persistent forward with two Q buffers and two K/V stages (`fwd_wspq`; opt-in).
    fwd_double_q: AtomicBool,
    /// The persistent forward with work items crossed in one turn (`fwd_wspi`; opt-in).
    fwd_cross_items: AtomicBool,
    /// The persistent forward deals head-group items with keys out apart from the keyless
    /// ones (the default since stop 37; `false`: the grid's order).
    fwd_keyed_first: AtomicBool,
    /// Hopper backward with ping-pong between warpgroups (`dq_wgr` + `dkdv_wg`, the
    /// default) or in lockstep (`dq_wgs` + `dkdv_wgs`).
    bwd_pingpong: AtomicBool,
    /// Hopper ping-pong dQ pass with Q and dO as register A operands (`dq_wgr`).
    bwd_reg_operands: AtomicBool,
    /// Hopper ping-pong backward without the end-of-tile MMA waits (`dkdv_wgd`, `dq_wgrd`;
    /// opt-in).
    bwd_deferred_waits: AtomicBool,
}

impl Cuda {
    /// Open GPU `ordinal`. `Err` (never a panic) if the CUDA driver library is not
    /// installed, no GPU is present or the ordinal is out of range.
    ///
    /// The device's default memory pool is set to keep freed memory for reuse (a caching
    /// allocator, as deep-learning frameworks have); [`trim_pool`](Self::trim_pool)
    /// returns it.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to open the shared library; no CUDA call is made.
        let present = unsafe { cudarc::driver::sys::is_culib_present() };
        if !present {
            return Err(Error::Device {
                msg: "the CUDA driver library (libcuda) was not found".into(),
            });
        }
        let count = CudaContext::device_count().map_err(dev_err("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device {
                msg: format!("GPU {ordinal} requested, {count} present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err("creating the CUDA context"))?;
        // One stream per device handle: no cross-stream event tracking needed.
        // SAFETY: every buffer of this crate is used on this device's one stream only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_pool_memory(&ctx, ordinal)?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(dev_err("multiprocessor count"))?
            .max(1) as u32;
        let hopper = ctx
            .compute_capability()
            .map_err(dev_err("compute capability"))?
            == (9, 0);
        Ok(Cuda {
            ctx,
            stream,
            poison: AtomicBool::new(false),
            pref: AtomicU8::new(KernelPref::Auto as u8),
            fwd_warps: AtomicU8::new(4),
            fwd_mt: AtomicU8::new(2),
            bwd_variant: AtomicU8::new(2),
            dq_warps: AtomicU8::new(8),
            hopper,
            ws: AtomicBool::new(true),
            fwd_overlap: AtomicBool::new(true),
            fwd_reg_operands: AtomicBool::new(false),
            fwd_wide_tiles: AtomicBool::new(false),
            fwd_persistent: AtomicBool::new(true),
            fwd_persistent_causal: AtomicBool::new(false),
            sms,
            fused_dq: AtomicBool::new(true),
            fused_dq_tma: AtomicBool::new(true),
            fused_dq_tma_split: AtomicBool::new(true),
            fused_tma_loads: AtomicBool::new(false),
            bwd_wide_tiles: AtomicBool::new(true),
            bwd_producer: AtomicBool::new(true),
            bwd_split_meta: AtomicBool::new(true),
            bwd_noncausal_kernel: AtomicBool::new(true),
            last_fused_bwd: Mutex::new(String::new()),
            fwd_tma_loads: AtomicBool::new(true),
            wait_block_ends: AtomicBool::new(true),
            fwd_deferred_stores: AtomicBool::new(false),
            fwd_vector_stores: AtomicBool::new(true),
            fwd_double_q: AtomicBool::new(false),
            fwd_cross_items: AtomicBool::new(false),
            fwd_keyed_first: AtomicBool::new(true),
            bwd_pingpong: AtomicBool::new(true),
            bwd_reg_operands: AtomicBool::new(true),
            bwd_deferred_waits: AtomicBool::new(false),
        })
    }

    /// Return the memory the device's pool keeps for reuse (see [`Cuda::new`]) to the
    /// driver, after waiting for queued work.
    pub fn trim_pool(&self) -> Result<()> {
        self.synchronize()?;
        let pool = default_pool(self.ordinal())?;
        // SAFETY: a live pool; trimming to 0 bytes only releases memory no allocation uses.
        unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(dev_err("cuMemPoolTrimTo"))
    }

    /// The most bytes this device's allocations (the crate's buffers and the caller's,
    /// stream-ordered from the default pool) have held at once since the last
    /// [`reset_peak_memory`](Self::reset_peak_memory) (or since start).
    pub fn peak_memory(&self) -> Result<u64> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        let pool = default_pool(self.ordinal())?;
        let mut v: u64 = 0;
        // SAFETY: a live pool; USED_MEM_HIGH writes a u64.
        unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
        }
        .result()
        .map_err(dev_err("memory pool high-water mark"))?;
        Ok(v)
    }

    /// Restart [`peak_memory`](Self::peak_memory) from what is in use now.
    pub fn reset_peak_memory(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        set_pool_u64(
            default_pool(self.ordinal())?,
            cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            0,
        )
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every kernel of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
    /// Device name.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(dev_err("device name"))
    }
    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }
    /// Fill every output with NaN before kernels write it (tests: unwritten elements show).
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }
    pub(crate) fn poison(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }
    /// Choose the forward kernel (tests run every kernel).
    pub fn set_kernel_pref(&self, p: KernelPref) {
        self.pref.store(p as u8, Ordering::Relaxed);
    }
    /// The current kernel preference.
    pub fn kernel_pref(&self) -> KernelPref {
        match self.pref.load(Ordering::Relaxed) {
            1 => KernelPref::Generic,
            2 => KernelPref::MmaSync,
            _ => KernelPref::Auto,
        }
    }

    /// Tensor-core `dK, dV` kernel: 2 (the default: 8 warps, 128 key rows per CTA, each
    /// streamed query tile shared by twice the keys), 0 (4 warps, 64 key rows; streamed
    /// query tiles of 32 rows for D = 128), 1 (4 warps, streamed tiles of 64 rows).
    pub fn set_bwd_variant(&self, v: u8) {
        self.bwd_variant.store(v.min(2), Ordering::Relaxed);
    }
    /// Warps per CTA of the tensor-core `dQ` kernel: 8 (the default: 128 query rows per
    /// CTA) or 4 (64 rows).
    pub fn set_dq_warps(&self, warps: u8) {
        self.dq_warps
            .store(if warps == 4 { 4 } else { 8 }, Ordering::Relaxed);
    }
    /// Warps per CTA of the tensor-core `dQ` kernel.
    pub fn dq_warps(&self) -> u8 {
        self.dq_warps.load(Ordering::Relaxed)
    }
    /// The tensor-core `dK, dV` kernel variant.
    pub fn bwd_variant(&self) -> u8 {
        self.bwd_variant.load(Ordering::Relaxed)
    }
    /// Warps per CTA of the one-row-tile tensor-core forward (see `set_fwd_row_tiles`):
    /// 4 (64 query rows per CTA, the default) or 8 (128 rows).
    pub fn set_fwd_warps(&self, warps: u8) {
        self.fwd_warps
            .store(if warps == 8 { 8 } else { 4 }, Ordering::Relaxed);
    }
    /// Row tiles of 16 per warp in the tensor-core forward: 2 (the default: each K/V
    /// fragment feeds two MMAs; 4 warps, 128 rows per CTA; `set_fwd_warps` is then ignored)
    /// or 1 (16 rows per warp, `set_fwd_warps` warps).
    pub fn set_fwd_row_tiles(&self, tiles: u8) {
        self.fwd_mt
            .store(if tiles == 2 { 2 } else { 1 }, Ordering::Relaxed);
    }
    /// Row tiles of 16 per warp in the tensor-core forward.
    pub fn fwd_row_tiles(&self) -> u8 {
        self.fwd_mt.load(Ordering::Relaxed)
    }
    /// Warps per CTA of the tensor-core forward.
    pub fn fwd_warps(&self) -> u8 {
        self.fwd_warps.load(Ordering::Relaxed)
    }
    /// Whether this is a compute capability 9.0 GPU (H100, H200), where the forward runs on
    /// warpgroup MMAs (`wgmma`) under [`KernelPref::Auto`].
    pub fn is_hopper(&self) -> bool {
        self.hopper
    }
    /// Hopper forward: warp-specialised with a producer warpgroup and two consumer
    /// warpgroups taking turns on the tensor cores (`true`, the default), or every warp
    /// loading and computing in lockstep (`false`). For comparisons and tests; no effect
    /// elsewhere.
    pub fn set_warp_specialized(&self, on: bool) {
        self.ws.store(on, Ordering::Relaxed);
    }
    /// See [`set_warp_specialized`](Self::set_warp_specialized).
    pub fn warp_specialized(&self) -> bool {
        self.ws.load(Ordering::Relaxed)
    }
    /// Warp-specialised Hopper forward: each consumer warpgroup runs the softmax of the next
    /// score tile while its own `P·V` product of the current tile is still on the tensor
    /// cores (`true`, the default: `fwd_wso`), or only after both products have landed
    /// (`false`: `fwd_ws`, where only the other warpgroup's MMAs hide the softmax). For
    /// comparisons and tests; no effect elsewhere or without
    /// [`set_warp_specialized`](Self::set_warp_specialized).
    pub fn set_fwd_overlap(&self, on: bool) {
        self.fwd_overlap.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_overlap`](Self::set_fwd_overlap).
    pub fn fwd_overlap(&self) -> bool {
        self.fwd_overlap.load(Ordering::Relaxed)
    }
    /// Overlapped warp-specialised Hopper forward: each consumer warpgroup holds its 64 Q
    /// rows in registers as the A operand of `S = Q·Kᵀ`, so that the product reads only K
    /// from shared memory (`true`: `fwd_wsor`, `fwd_wspr`; 32 more registers per consumer
    /// thread), or reads both from shared memory (`false`, the default: `fwd_wso`,
    /// `fwd_wsp`). Opt-in: both pass the oracle and racecheck on the H200 but measured
    /// −8.5…+1.6 % against the default (`benches/results/gpu_h200_wsr.txt`; see CUDA.md).
    /// For comparisons and tests; no effect without
    /// [`set_fwd_overlap`](Self::set_fwd_overlap).
    pub fn set_fwd_reg_operands(&self, on: bool) {
        self.fwd_reg_operands.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_reg_operands`](Self::set_fwd_reg_operands).
    pub fn fwd_reg_operands(&self) -> bool {
        self.fwd_reg_operands.load(Ordering::Relaxed)
    }
    /// Overlapped warp-specialised Hopper forward with key tiles of 176 rows in two stages
    /// (`true`: `fwd_wspw`, `fwd_wsow`; FlashAttention-3's tile for D = 128 without a
    /// causal mask) instead of 128 rows in three (`false`, the default). Each ping-pong turn
    /// then carries 1.375× the MMA time for the other warpgroup's softmax to hide under;
    /// a segment of `m` keys costs ⌈m/176⌉ tiles (2048 keys: 12 tiles, 3 % of them
    /// padding). Opt-in: it passes the oracle tests and racecheck, but on an H200 it
    /// measured 5–20 % slower than the default in every bench case
    /// (`benches/results/gpu_h200_wide.txt`; see CUDA.md). No effect without
    /// [`set_fwd_overlap`](Self::set_fwd_overlap) or with
    /// [`set_fwd_reg_operands`](Self::set_fwd_reg_operands).
    pub fn set_fwd_wide_tiles(&self, on: bool) {
        self.fwd_wide_tiles.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_wide_tiles`](Self::set_fwd_wide_tiles).
    pub fn fwd_wide_tiles(&self) -> bool {
        self.fwd_wide_tiles.load(Ordering::Relaxed)
    }
    /// Overlapped warp-specialised Hopper forward: persistent where it measured faster
    /// (`true`, the default: `fwd_wsp`, one CTA per SM looping over the (query tile, head,
    /// batch) items with the K/V pipeline running on from one item to the next, for
    /// non-causal problems; `fwd_wso` for causal ones and the GPU ring's launches), or
    /// never (`false`: `fwd_wso`, one CTA per item). For comparisons and tests; no effect
    /// without [`set_fwd_overlap`](Self::set_fwd_overlap).
    pub fn set_fwd_persistent(&self, on: bool) {
        self.fwd_persistent.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_persistent`](Self::set_fwd_persistent).
    pub fn fwd_persistent(&self) -> bool {
        self.fwd_persistent.load(Ordering::Relaxed)
    }
    /// Persistent forward for causal problems as well (`true`), with each (head, batch)'s
    /// query tiles dealt to the CTAs in pairs (x, T − 1 − x) of equal total causal cost, or
    /// not (`false`, the default: on an H200 the pair deal measured 4 % slower than `fwd_wso`
    /// at 16K and 64K, see CUDA.md); needs [`set_fwd_persistent`](Self::set_fwd_persistent).
    pub fn set_fwd_persistent_causal(&self, on: bool) {
        self.fwd_persistent_causal.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_persistent_causal`](Self::set_fwd_persistent_causal).
    pub fn fwd_persistent_causal(&self) -> bool {
        self.fwd_persistent_causal.load(Ordering::Relaxed)
    }
    /// Streaming multiprocessors of this GPU.
    pub fn sm_count(&self) -> u32 {
        self.sms
    }
    /// Hopper backward: dQ accumulated by the key-owner kernel into an f32 buffer of
    /// `B·N·H·D` floats (`true`, the default: five matrix products per tile pair instead of
    /// seven) or computed by its own query-owner pass (`false`: `dq_wgr` + `dkdv_wg`, the
    /// default until stop 20, and the only backward of the GPU ring's launch problems). Which
    /// fused kernel runs: [`set_fused_dq_tma`](Self::set_fused_dq_tma) and
    /// [`set_fused_dq_tma_split`](Self::set_fused_dq_tma_split) (both on by default:
    /// `bwd_wgt2`), the ping-pong turns of [`set_bwd_pingpong`](Self::set_bwd_pingpong)
    /// (off: `bwd_wg`, lockstep). On an H200 the default fused kernel measured 3–14 % faster
    /// (forward + backward) than the two passes of the same build
    /// (`benches/results/gpu_h200_s20.txt`); see CUDA.md.
    pub fn set_fused_dq(&self, on: bool) {
        self.fused_dq.store(on, Ordering::Relaxed);
    }
    /// See [`set_fused_dq`](Self::set_fused_dq).
    pub fn fused_dq(&self) -> bool {
        self.fused_dq.load(Ordering::Relaxed)
    }
    /// Hopper fused backward (with [`set_fused_dq`](Self::set_fused_dq) and the ping-pong
    /// default): each warpgroup's dQ columns of a tile go to shared memory and one thread
    /// adds them into the f32 buffer with two bulk tensor reduce-adds
    /// (`cp.reduce.async.bulk.tensor`, one tensor map per pattern: `bwd_wgt`, `bwd_wgt2`;
    /// `true`, the default, FlashAttention-3's dQ) or sixteen `red.global.add` per thread
    /// (`false`: `bwd_wgp`). Where a pattern's dilation does not divide the sequence length
    /// and its segment, its rows are no tensor-map box, and the two passes run instead
    /// (they measured faster than `bwd_wgp`).
    pub fn set_fused_dq_tma(&self, on: bool) {
        self.fused_dq_tma.store(on, Ordering::Relaxed);
    }
    /// See [`set_fused_dq_tma`](Self::set_fused_dq_tma).
    pub fn fused_dq_tma(&self) -> bool {
        self.fused_dq_tma.load(Ordering::Relaxed)
    }
    /// With [`set_fused_dq_tma`](Self::set_fused_dq_tma): a staging buffer per warpgroup
    /// (`true`, the default, `bwd_wgt2`: no hand-over between the warpgroups; the shared
    /// memory comes from a Q/dO ring of two stages instead of three; the next tile's copies
    /// issued under the S/dP MMAs) or one buffer both use in turn (`false`, `bwd_wgt`).
    pub fn set_fused_dq_tma_split(&self, on: bool) {
        self.fused_dq_tma_split.store(on, Ordering::Relaxed);
    }
    /// See [`set_fused_dq_tma_split`](Self::set_fused_dq_tma_split).
    pub fn fused_dq_tma_split(&self) -> bool {
        self.fused_dq_tma_split.load(Ordering::Relaxed)
    }
    /// With [`set_fused_dq_tma_split`](Self::set_fused_dq_tma_split): the Q and dO tiles
    /// loaded by the tensor memory accelerator, one thread issuing a tile's box loads
    /// (`true`, `bwd_wgt3`; needs at most 8 patterns and 16-byte aligned Q and dO, else
    /// `bwd_wgt2` runs), or by 16-byte `cp.async` copies from every thread (`false`, the
    /// default, `bwd_wgt2`). On an H200 the two measured the same (−2.1…+1.3 % forward +
    /// backward, `benches/results/gpu_h200_tma_loads.txt`): the copies, though 18 % of
    /// `bwd_wgt2`'s samples, ran under its S/dP MMAs, off the critical path.
    pub fn set_fused_tma_loads(&self, on: bool) {
        self.fused_tma_loads.store(on, Ordering::Relaxed);
    }
    /// See [`set_fused_tma_loads`](Self::set_fused_tma_loads).
    pub fn fused_tma_loads(&self) -> bool {
        self.fused_tma_loads.load(Ordering::Relaxed)
    }
    /// Hopper fused backward (`bwd_wgt2`), head dim 128: query tiles of 80 rows
    /// (`true`, the default: `bwd_wgt2w`, with dQ computed transposed) or 64 (`false`, the
    /// default until stop 24). Where `bwd_wgt2` does not run, or at head dim 64, this has no
    /// effect. The 80-row tiles measured 3.5–10 % faster forward + backward on every bench
    /// case on an H200 (stop 24), and 5.6–10 % on 7 of 8 on an H100 (dense 64K causal
    /// −0.1 %; `benches/results/gpu_h100_s25.txt`, bench variant `narrowq`).
    pub fn set_bwd_wide_tiles(&self, on: bool) {
        self.bwd_wide_tiles.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_wide_tiles`](Self::set_bwd_wide_tiles).
    pub fn bwd_wide_tiles(&self) -> bool {
        self.bwd_wide_tiles.load(Ordering::Relaxed)
    }
    /// Hopper fused backward with 80-row query tiles (`bwd_wgt2w`): a third, producer
    /// warpgroup loads each query tile's Q and dO by tensor-map box loads and its L and Δ
    /// (`true`, the default since stop 33: `bwd_wgt2wp`, since stop 34 `bwd_wgt2ws` /
    /// `bwd_wgt2wsn`, see [`set_bwd_split_meta`](Self::set_bwd_split_meta);
    /// FlashAttention-3's arrangement, `setmaxnreg` 24 / 240), or the two consumer
    /// warpgroups issue those loads themselves under their MMAs (`false`: `bwd_wgt2w`, the
    /// default of stops 24–32). Where `bwd_wgt2w` does not run, or Q and dO are no boxes of
    /// the plan's maps (or not 16-byte aligned, or the plan has more than 8 patterns),
    /// `bwd_wgt2w` runs. Stop 33 on an H100, same process, three rounds of medians: forward +
    /// backward +2.3…+5.1 % on the dense benches (dense causal 16K, whose default row ran
    /// slow in two rounds, +3.3…+10.2 %), +0.8…+4.8 % on the head-group and LSE benches but
    /// LSE at 16K, which measured −3.4 / −3.5 / +8.7 % (`benches/results/gpu_h100_s33.txt`).
    pub fn set_bwd_producer(&self, on: bool) {
        self.bwd_producer.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_producer`](Self::set_bwd_producer).
    pub fn bwd_producer(&self) -> bool {
        self.bwd_producer.load(Ordering::Relaxed)
    }
    /// The producer backward's per-query metadata (causal limit, L, Δ) as three arrays
    /// (`true`, the default since stop 34: `bwd_wgt2ws`), so that a consumer thread reads a
    /// pair of query columns' values with one 8-byte shared load, or as one 16-byte record
    /// per query (`false`: `bwd_wgt2wp`, stop 33). Stop 34 on an H100, same process, three
    /// rounds, with the non-causal kernel below: forward + backward +1.3…+8.5 % on the
    /// head-group and LSE benches, −0.8…+3.1 % on the dense ones (causal −1.7…+2.5 %);
    /// under Nsight Compute the dense 16K backward took 10.77 against 11.32 ms
    /// (`benches/results/gpu_h100_s34.txt`).
    pub fn set_bwd_split_meta(&self, on: bool) {
        self.bwd_split_meta.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_split_meta`](Self::set_bwd_split_meta).
    pub fn bwd_split_meta(&self) -> bool {
        self.bwd_split_meta.load(Ordering::Relaxed)
    }
    /// With split metadata, non-causal problems run a kernel without causal limits
    /// (`true`, the default: `bwd_wgt2wsn`, which reads only L and Δ and loads L of the
    /// first eight column groups before the S and dP MMAs), or the causal one (`false`; in stop
    /// 34's two rounds it was slower in 10 of 12 non-causal cases, by up to 14.4 % on LSE
    /// at 64K, equal in one and +1.7 % in one).
    pub fn set_bwd_noncausal_kernel(&self, on: bool) {
        self.bwd_noncausal_kernel.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_noncausal_kernel`](Self::set_bwd_noncausal_kernel).
    pub fn bwd_noncausal_kernel(&self) -> bool {
        self.bwd_noncausal_kernel.load(Ordering::Relaxed)
    }
    /// The name of the fused Hopper backward kernel of this device's last backward (empty if
    /// that backward was not fused, or none ran yet), so that a test can check which kernel
    /// its settings chose.
    pub fn last_fused_backward(&self) -> String {
        self.last_fused_bwd
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
    pub(crate) fn note_fused_backward(&self, name: &str) {
        if let Ok(mut s) = self.last_fused_bwd.lock() {
            name.clone_into(&mut s);
        }
    }
    /// Hopper warp-specialised forward (the overlapped 128-key kernels): the producer's K
    /// and V tiles loaded by the tensor memory accelerator, its thread 0 issuing a tile's box
    /// loads (`true`, the default: `fwd_wsps` / `fwd_wsot`), or by 16-byte `cp.async` copies
    /// from all its 128 threads (`false`: `fwd_wsp` / `fwd_wso`, the default until stop 20).
    /// Box loads need a whole-device problem, at most 8 patterns, dilations dividing their
    /// segments and 16-byte aligned K, V; elsewhere the cp.async kernels run. On an H200 the
    /// box loads measured +3.8…+4.2 % on dense forwards, +7.1…+10.2 % causal, −1.7…+4.0 % on
    /// the dilated ones (`benches/results/gpu_h200_fwd_tma.txt`).
    pub fn set_fwd_tma_loads(&self, on: bool) {
        self.fwd_tma_loads.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_tma_loads`](Self::set_fwd_tma_loads).
    pub fn fwd_tma_loads(&self) -> bool {
        self.fwd_tma_loads.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward (`fwd_wsps`, the default on non-causal problems, and
    /// `fwd_wspt`): end the basic block before the wait for `P(c)·V(c)`, so that ptxas
    /// cannot schedule that wait ahead of the softmax of `S(n)` meant to run under it
    /// (`true`, the default), or
    /// leave the schedule to ptxas (`false`: `fwd_wsptn`, the kernel as up to stop 21, whose
    /// SASS has the wait before the whole softmax). For comparisons.
    pub fn set_wait_block_ends(&self, on: bool) {
        self.wait_block_ends.store(on, Ordering::Relaxed);
    }
    /// See [`set_wait_block_ends`](Self::set_wait_block_ends).
    pub fn wait_block_ends(&self) -> bool {
        self.wait_block_ends.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward with box loads (non-causal problems): pack a work
    /// item's output rows at its end and store them only once the next item's first
    /// `S = Q·Kᵀ` is issued, so that the stores run under that MMA (`true`: `fwd_wspx`), or
    /// store them before the next item starts (`false`, the default: `fwd_wsps`, see
    /// [`set_fwd_vector_stores`](Self::set_fwd_vector_stores)). Both store 16 bytes per
    /// instruction (after a transpose across each quad of lanes). Opt-in: measured on an
    /// H100 in stop 27 no better than `fwd_wsps` (head groups +7.7 / +6.4 / +3.8 / −1.0 %
    /// against `fwd_wspt`, `fwd_wsps` +9.4 / +7.0 / +1.6 / +2.5 %); GPU oracle code 17. See
    /// CUDA.md.
    pub fn set_fwd_deferred_stores(&self, on: bool) {
        self.fwd_deferred_stores.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_deferred_stores`](Self::set_fwd_deferred_stores).
    pub fn fwd_deferred_stores(&self) -> bool {
        self.fwd_deferred_stores.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward with box loads (non-causal problems) storing its output
    /// 16 bytes per instruction at each work item's end (`true`, the default since stop 27:
    /// `fwd_wsps`), after a transpose across each quad of lanes, or 4 bytes per instruction
    /// (`false`: `fwd_wspt`, the default up to stop 26; GPU oracle code 18). Measured on an
    /// H100 against `fwd_wspt` in the same process (`benches/results/gpu_h100_s27.txt`):
    /// head groups +9.4 / +7.0 / +1.6 / +2.5 % (16K … 1M), dense +1.5 / +2.6 %, LSE
    /// +3.4 / +1.0 / −0.9 / −4.0 %. [`set_fwd_deferred_stores`](Self::set_fwd_deferred_stores)
    /// and [`set_fwd_double_q`](Self::set_fwd_double_q) win where on.
    pub fn set_fwd_vector_stores(&self, on: bool) {
        self.fwd_vector_stores.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_vector_stores`](Self::set_fwd_vector_stores).
    pub fn fwd_vector_stores(&self) -> bool {
        self.fwd_vector_stores.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward with box loads (non-causal problems) with two Q buffers
    /// and two K/V stages (`true`: `fwd_wspq`) instead of one and three, so that the next
    /// work item's Q loads while this item still streams its keys (see hopper.cu). Wins over
    /// the vector stores; the deferred stores win over it. Opt-in: measured 31–42 % slower
    /// than `fwd_wspt` on an H100 (stop 27: one stage of key prefetch is too few); GPU
    /// oracle code 19.
    pub fn set_fwd_double_q(&self, on: bool) {
        self.fwd_double_q.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_double_q`](Self::set_fwd_double_q).
    pub fn fwd_double_q(&self) -> bool {
        self.fwd_double_q.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward with box loads (non-causal problems) with its work
    /// items crossed in one ping-pong turn (`true`: `fwd_wspi`): the turn that issues an
    /// item's last `P·V` issues the next item's first `S = Q·Kᵀ` with it, on a second Q tile
    /// (K and V staged apart: two K stages, three V stages), and items without keys are
    /// written by the producer warps without taking a turn (see hopper.cu). Aimed at the
    /// head-group combine's short items. Wins over every other persistent-forward setting
    /// but [`set_wait_block_ends`](Self::set_wait_block_ends)`(false)`. Opt-in: slower than
    /// the default on every case measured (H100, stop 30: 4–22 %; CUDA.md). GPU oracle
    /// code 20.
    pub fn set_fwd_cross_items(&self, on: bool) {
        self.fwd_cross_items.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_cross_items`](Self::set_fwd_cross_items).
    pub fn fwd_cross_items(&self) -> bool {
        self.fwd_cross_items.load(Ordering::Relaxed)
    }
    /// The persistent Hopper forward under the head-group combine (non-causal problems,
    /// every dilation dividing the class step, at most 16 items with keys per CTA on
    /// average): work items with keys numbered before the keyless ones and dealt out evenly,
    /// each CTA interleaving its two kinds (`true`, the default since stop 37), or every item
    /// in the grid's order (`false`). Dealt in the grid's order, the 960 keyed items of the
    /// LongNet schedule at 16K fall 5 to 9 to a CTA (7.27 on average); keyed first, 7 or 8.
    /// Measured on an H100: 16K +2.7 / +3.8 %; at 64K and beyond (29 or more keyed items per
    /// CTA) the grid's order was 1.5–3 % faster, so it stays there. GPU oracle code 24
    /// (`false`). See hopper.cu (`deal_keyed`) and CUDA.md.
    pub fn set_fwd_keyed_first(&self, on: bool) {
        self.fwd_keyed_first.store(on, Ordering::Relaxed);
    }
    /// See [`set_fwd_keyed_first`](Self::set_fwd_keyed_first).
    pub fn fwd_keyed_first(&self) -> bool {
        self.fwd_keyed_first.load(Ordering::Relaxed)
    }
    /// Hopper backward: stages tracked by mbarriers (`true`, the default: 2-5 % faster on an
    /// H100 than the lockstep kernels once the per-tile instruction count was cut, see
    /// CUDA.md), or one CTA barrier per tile (`false`). With mbarriers the fused kernel's
    /// warpgroups take turns issuing their dV/dK/dQ MMAs (`bwd_wgp`); the two passes run free
    /// (since stop 17: fwd+bwd 0.7–4.2 % faster than with the turns in 7 of 8 H200 cases).
    /// For comparisons and tests.
    pub fn set_bwd_pingpong(&self, on: bool) {
        self.bwd_pingpong.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_pingpong`](Self::set_bwd_pingpong).
    pub fn bwd_pingpong(&self) -> bool {
        self.bwd_pingpong.load(Ordering::Relaxed)
    }
    /// Hopper ping-pong backward: the dQ pass holds its warpgroup's Q and dO rows in
    /// registers as the A operands of `S = Q·Kᵀ` and `dP = dO·Vᵀ` (`dq_wgr`, `true`, the
    /// default), or reads them from shared memory with every tile (`dq_wg`, `false`). For
    /// comparisons and tests.
    pub fn set_bwd_reg_operands(&self, on: bool) {
        self.bwd_reg_operands.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_reg_operands`](Self::set_bwd_reg_operands).
    pub fn bwd_reg_operands(&self) -> bool {
        self.bwd_reg_operands.load(Ordering::Relaxed)
    }
    /// Hopper ping-pong backward: a tile's last MMAs (dV and dK; dQ in the register-operand
    /// dQ pass) are not waited for at the end of the tile: the next tile's wait for its `S`
    /// covers them, so the warpgroup issues the next tile's loads and MMAs meanwhile
    /// (`dkdv_wgd`, `dq_wgrd`; `true`), or waited for at once (`false`, the default: on an
    /// H200 the deferred waits measured 0.4–6 % slower in 7 of 8 bench cases, see CUDA.md).
    /// For comparisons and tests.
    pub fn set_bwd_deferred_waits(&self, on: bool) {
        self.bwd_deferred_waits.store(on, Ordering::Relaxed);
    }
    /// See [`set_bwd_deferred_waits`](Self::set_bwd_deferred_waits).
    pub fn bwd_deferred_waits(&self) -> bool {
        self.bwd_deferred_waits.load(Ordering::Relaxed)
    }

    /// Copy host data to a new device buffer.
    pub fn htod<E: DeviceRepr>(&self, host: &[E]) -> Result<CudaSlice<E>> {
        self.stream
            .clone_htod(host)
            .map_err(dev_err("host to device copy"))
    }
    /// Copy a device buffer to a new host vector.
    pub fn dtoh<E: DeviceRepr>(&self, dev: &CudaSlice<E>) -> Result<Vec<E>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(dev_err("device to host copy"))
    }
    /// A new zero-filled device buffer (stream-ordered: no host synchronisation, unlike
    /// [`htod`](Self::htod), which waits for the stream because the host data is borrowed).
    pub(crate) fn zeros<E: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<E>> {
        self.stream
            .alloc_zeros::<E>(len)
            .map_err(dev_err("device allocation"))
    }
    /// A new output buffer of `len` elements: NaN-filled when poisoning is on, else
    /// uninitialised (the kernels write every element).
    pub(crate) fn output<E: CudaElement>(&self, len: usize) -> Result<CudaSlice<E>> {
        if self.poison() {
            self.htod(&vec![E::nan(); len])
        } else {
            // SAFETY: callers pass the buffer to a kernel that writes all `len` elements
            // before anything reads it.
            unsafe { self.stream.alloc::<E>(len) }.map_err(dev_err("device allocation"))
        }
    }

    /// A typed tensor from host data in row-major order.
    pub fn tensor_from_vec<S: Shape, E: DeviceRepr>(
        &self,
        host: &[E],
        shape: S,
    ) -> Result<CudaTensor<S, E>> {
        crate::shape::check_len("tensor", shape.num_elements(), host.len())?;
        Ok(CudaTensor {
            data: self.htod(host)?,
            shape,
            stream: self.stream.clone(),
        })
    }

    /// A typed `f32` tensor from a dfdx CPU tensor of the same shape.
    pub fn tensor_from_cpu<S: Shape>(
        &self,
        t: &dfdx::tensor::Tensor<S, f32, dfdx::tensor::Cpu>,
    ) -> Result<CudaTensor<S, f32>> {
        use dfdx::shapes::HasShape;
        self.tensor_from_vec(&t.as_vec(), *t.shape())
    }
}

/// A device tensor with a dfdx shape `S` (row-major), e.g. `(B, Const<N>, Const<H>, Const<D>)`.
#[derive(Debug)]
pub struct CudaTensor<S: Shape, E> {
    pub(crate) data: CudaSlice<E>,
    pub(crate) shape: S,
    pub(crate) stream: Arc<CudaStream>,
}

impl<S: Shape, E: DeviceRepr> CudaTensor<S, E> {
    /// Wrap a device buffer; `Err` if its length does not match the shape.
    pub fn from_slice(dev: &Cuda, data: CudaSlice<E>, shape: S) -> Result<Self> {
        crate::shape::check_len("tensor", shape.num_elements(), data.len())?;
        Ok(CudaTensor {
            data,
            shape,
            stream: dev.stream.clone(),
        })
    }
    /// The shape.
    pub fn shape(&self) -> &S {
        &self.shape
    }
    /// The device buffer.
    pub fn slice(&self) -> &CudaSlice<E> {
        &self.data
    }
    /// Unwrap the device buffer.
    pub fn into_slice(self) -> CudaSlice<E> {
        self.data
    }
    /// Copy to the host (row-major).
    pub fn to_vec(&self) -> Result<Vec<E>> {
        self.stream
            .clone_dtoh(&self.data)
            .map_err(dev_err("device to host copy"))
    }
}

impl<S: Shape> CudaTensor<S, f32> {
    /// Copy to a dfdx CPU tensor of the same shape.
    pub fn to_cpu(
        &self,
        cpu: &dfdx::tensor::Cpu,
    ) -> Result<dfdx::tensor::Tensor<S, f32, dfdx::tensor::Cpu>> {
        use dfdx::tensor::TensorFromVec;
        Ok(cpu.tensor_from_vec(self.to_vec()?, self.shape))
    }
}

use crate::ops::dilated::cuda_kernel;
use crate::shape::typed::{CombineKind, Schedule};
use crate::tensor::{check_batch, DilatedAttention};
use dfdx::shapes::{Const, Dim};

/// `(B, N, H, D)` tensor on the GPU.
pub type CudaBnhd<B, const N: usize, const H: usize, const D: usize, E> =
    CudaTensor<(B, Const<N>, Const<H>, Const<D>), E>;
/// `(B, N, H)` `f32` tensor on the GPU (the log-sum-exp `L`).
pub type CudaBnh<B, const N: usize, const H: usize> = CudaTensor<(B, Const<N>, Const<H>), f32>;
/// `(B, N)` key padding mask on the GPU (nonzero = attend).
pub type CudaKeyMask<B, const N: usize> = CudaTensor<(B, Const<N>), u8>;

/// Typed calls take `B` from `q`: the batch of `k`, `v` (and the mask) must match
/// (a runtime `Dim` is not checked by the types).
pub(crate) fn check_qkv_batch<
    B: Dim,
    const N: usize,
    const H: usize,
    const HKV: usize,
    const D: usize,
    E,
>(
    q: &CudaBnhd<B, N, H, D, E>,
    k: &CudaBnhd<B, N, HKV, D, E>,
    v: &CudaBnhd<B, N, HKV, D, E>,
    mask: Option<&CudaKeyMask<B, N>>,
) -> Result<()> {
    check_batch(
        q.shape.0.size(),
        &[k.shape.0.size(), v.shape.0.size()],
        mask.map(|m| m.shape.0.size()),
    )
}

/// A forward's device `(out, L)` as typed tensors shaped like `q`.
#[allow(clippy::type_complexity)]
pub(crate) fn typed_forward<
    B: Dim,
    const N: usize,
    const H: usize,
    const D: usize,
    E: DeviceRepr,
>(
    dev: &Cuda,
    q: &CudaBnhd<B, N, H, D, E>,
    out: CudaSlice<E>,
    lse: CudaSlice<f32>,
) -> Result<(CudaBnhd<B, N, H, D, E>, CudaBnh<B, N, H>)> {
    Ok((
        CudaTensor::from_slice(dev, out, q.shape)?,
        CudaTensor::from_slice(dev, lse, (q.shape.0, Const::<N>, Const::<H>))?,
    ))
}

/// A backward's device `(dq, dk, dv)` as typed tensors shaped like `q` and `k`.
#[allow(clippy::type_complexity)]
pub(crate) fn typed_grads<
    B: Dim,
    const N: usize,
    const H: usize,
    const HKV: usize,
    const D: usize,
    E: DeviceRepr,
>(
    dev: &Cuda,
    q: &CudaBnhd<B, N, H, D, E>,
    k: &CudaBnhd<B, N, HKV, D, E>,
    (dq, dk, dv): (CudaSlice<E>, CudaSlice<E>, CudaSlice<E>),
) -> Result<(
    CudaBnhd<B, N, H, D, E>,
    CudaBnhd<B, N, HKV, D, E>,
    CudaBnhd<B, N, HKV, D, E>,
)> {
    Ok((
        CudaTensor::from_slice(dev, dq, q.shape)?,
        CudaTensor::from_slice(dev, dk, k.shape)?,
        CudaTensor::from_slice(dev, dv, k.shape)?,
    ))
}

impl<S: Schedule, C: CombineKind> DilatedAttention<S, C> {
    /// Forward on the GPU: `(out, L)`. The same compile-time checks as the CPU path.
    #[allow(clippy::type_complexity)]
    pub fn try_forward_cuda<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E: CudaElement,
    >(
        &self,
        dev: &Cuda,
        q: &CudaBnhd<B, N, H, D, E>,
        k: &CudaBnhd<B, N, HKV, D, E>,
        v: &CudaBnhd<B, N, HKV, D, E>,
        mask: Option<&CudaKeyMask<B, N>>,
    ) -> Result<(CudaBnhd<B, N, H, D, E>, CudaBnh<B, N, H>)> {
        let plan = self.plan::<N, H, HKV, D>(q.shape.0.size())?;
        check_qkv_batch(q, k, v, mask)?;
        let f =
            cuda_kernel::try_forward(dev, &plan, &q.data, &k.data, &v.data, mask.map(|m| &m.data))?;
        typed_forward(dev, q, f.out, f.lse)
    }

    /// Backward on the GPU from saved `out` and `L`: `(dq, dk, dv)`.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn try_backward_cuda<
        B: Dim,
        const N: usize,
        const H: usize,
        const HKV: usize,
        const D: usize,
        E: CudaElement,
    >(
        &self,
        dev: &Cuda,
        q: &CudaBnhd<B, N, H, D, E>,
        k: &CudaBnhd<B, N, HKV, D, E>,
        v: &CudaBnhd<B, N, HKV, D, E>,
        mask: Option<&CudaKeyMask<B, N>>,
        out: &CudaBnhd<B, N, H, D, E>,
        lse: &CudaBnh<B, N, H>,
        grad_out: &CudaBnhd<B, N, H, D, E>,
    ) -> Result<(
        CudaBnhd<B, N, H, D, E>,
        CudaBnhd<B, N, HKV, D, E>,
        CudaBnhd<B, N, HKV, D, E>,
    )> {
        let plan = self.plan::<N, H, HKV, D>(q.shape.0.size())?;
        check_qkv_batch(q, k, v, mask)?;
        let g = cuda_kernel::try_backward(
            dev,
            &plan,
            &q.data,
            &k.data,
            &v.data,
            mask.map(|m| &m.data),
            &out.data,
            &lse.data,
            &grad_out.data,
        )?;
        typed_grads(dev, q, k, (g.dq, g.dk, g.dv))
    }
}
