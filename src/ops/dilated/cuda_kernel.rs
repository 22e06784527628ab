//! The CUDA kernels of dilated attention: NVRTC compilation, module cache, launches.
//!
//! The design note is `CUDA.md` beside this file; the kernels are in `dilated.cu`.
//! Public entry points: [`try_forward`] and [`try_backward`] on device buffers, re-exported
//! as `ops::dilated::cuda`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};
use crate::shape::{check_len, Combine, Dims, Plan};
use crate::tensor::cuda::{dev_err, Cuda, CudaElement, KernelPref};

/// The kernel source, compiled by NVRTC once per device.
pub(crate) const SRC: &str = include_str!("dilated.cu");
/// Helper kernels of the GPU-resident ring (gather, merge, scatter-add), compiled into
/// the same module (they use the element helpers of `dilated.cu`).
/// The Hopper (`wgmma`) forward, appended to [`SRC`]; compiled for `sm_90a` on 9.0.
const HOPPER_SRC: &str = include_str!("hopper.cu");
const RING_SRC: &str = include_str!("../../ring/gpu.cu");

/// Most patterns a schedule may have on the GPU (size of the arrays in `Params`).
pub const MAX_PATTERNS: usize = 16;
/// Largest head dim of the generic kernels.
pub const MAX_HEAD_DIM: usize = 128;

const THREADS: u32 = 128;
/// Owner-tile rows of the generic kernels (`GR` in the .cu).
const GENERIC_ROWS: usize = 16;
/// Query rows of the tensor-core forward (`TBQ` in the .cu).
const TC_ROWS: usize = 64;

/// Kernel parameters, mirrored field by field by `struct Params` in `dilated.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    delta_stride: i64,
    b: i32,
    n: i32,
    h: i32,
    hkv: i32,
    d: i32,
    g: i32,
    headgroups: i32,
    causal: i32,
    has_mask: i32,
    blk: i32,
    step: i32,
    /// Query tiles per (head, batch) of the forward grid; read by the persistent forward.
    tiles: i32,
    /// Head groups: the number of work items with keys, which the persistent forward deals
    /// out evenly apart from the keyless ones (`keyed_items`), set where that pays
    /// (`keyed_first_pays`); 0 keeps the grid's order.
    keyed: i32,
    scale: f32,
    fac: f32,
    w: [i32; MAX_PATTERNS],
    r: [i32; MAX_PATTERNS],
    hg0: [i32; MAX_PATTERNS],
    hg1: [i32; MAX_PATTERNS],
    off: [i32; MAX_PATTERNS],
}

// SAFETY: `Params` is plain old data with `#[repr(C)]` layout identical to the CUDA
// `struct Params` (same field order and types: i64, 13 × i32, 2 × f32, 5 × i32[16]).
unsafe impl DeviceRepr for Params {}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The tiling of positions for `(capped segment, dilation)` pairs: blocks of `blk` rows
/// (dividing every capped segment), classes by residue modulo `step` (dividing `blk`).
fn tiling_of(pats: impl Iterator<Item = (usize, usize)> + Clone) -> (usize, usize) {
    let blk = pats.clone().fold(0, |acc, (w, _)| gcd(acc, w));
    // lcm of gcd(r_i, blk): divides blk, cannot overflow.
    let step = pats.fold(1usize, |acc, (_, r)| {
        let x = gcd(r, blk);
        acc / gcd(acc, x) * x
    });
    (blk, step)
}

fn to_i32(what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Device {
        msg: format!("{what} = {x} does not fit the kernels' 32-bit positions"),
    })
}

/// One launch problem: the kernel parameters and the buffer dims they describe. A whole
/// plan ([`Prob::of_plan`]), some of its patterns on a rank's local rows
/// ([`Prob::patterns`]) or one dense block of a ring ([`Prob::dense_block`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prob {
    pub(crate) p: Params,
    pub(crate) dims: Dims,
    /// Patterns in `p`.
    pub(crate) npat: usize,
    /// The forward may occupy every SM for its whole run (the persistent kernel): true for
    /// a whole plan on one GPU; false for the ring's launch problems, whose compute runs
    /// beside NCCL kernels that need SMs to progress while it runs.
    pub(crate) whole_device: bool,
}

impl Prob {
    /// `pats`: `(capped segment, dilation, head group, head-group offset)` per pattern.
    #[allow(clippy::too_many_arguments)]
    fn build(
        dims: Dims,
        pats: &[(usize, usize, std::ops::Range<usize>, usize)],
        headgroups: bool,
        causal: bool,
        scale: f64,
        fac: f64,
        delta_stride: usize,
        has_mask: bool,
    ) -> Result<Prob> {
        let g = pats.len();
        if g > MAX_PATTERNS {
            return Err(Error::Device {
                msg: format!("{g} patterns; the CUDA kernels take at most {MAX_PATTERNS}"),
            });
        }
        if dims.head_dim > MAX_HEAD_DIM {
            return Err(Error::Device {
                msg: format!(
                    "head dim {} is not supported on CUDA (at most {MAX_HEAD_DIM})",
                    dims.head_dim
                ),
            });
        }
        to_i32("batch·seq·heads", dims.batch * dims.seq * dims.heads)?;
        let (blk, step) = tiling_of(pats.iter().map(|(w, r, _, _)| (*w, *r)));
        let mut p = Params {
            delta_stride: delta_stride as i64,
            b: to_i32("batch", dims.batch)?,
            n: to_i32("seq", dims.seq)?,
            h: to_i32("heads", dims.heads)?,
            hkv: to_i32("kv_heads", dims.kv_heads)?,
            d: to_i32("head_dim", dims.head_dim)?,
            g: g as i32,
            headgroups: i32::from(headgroups),
            causal: i32::from(causal),
            has_mask: i32::from(has_mask),
            blk: to_i32("block", blk)?,
            step: to_i32("step", step)?,
            tiles: 0,
            keyed: 0,
            scale: scale as f32,
            fac: fac as f32,
            w: [1; MAX_PATTERNS],
            r: [1; MAX_PATTERNS],
            hg0: [0; MAX_PATTERNS],
            hg1: [0; MAX_PATTERNS],
            off: [0; MAX_PATTERNS],
        };
        for (i, (w, r, hg, off)) in pats.iter().enumerate() {
            p.w[i] = to_i32("segment", *w)?;
            p.r[i] = to_i32("dilation", *r)?;
            p.hg0[i] = hg.start as i32;
            p.hg1[i] = hg.end as i32;
            p.off[i] = *off as i32;
        }
        Ok(Prob {
            p,
            dims,
            npat: g,
            whole_device: false,
        })
    }

    /// `(capped segment, dilation, head group, head-group offset)` of pattern `i`.
    fn pattern(plan: &Plan, i: usize) -> (usize, usize, std::ops::Range<usize>, usize) {
        let pat = plan.patterns()[i];
        let hg = match plan.options().combine {
            Combine::Lse => 0..plan.dims().heads,
            Combine::HeadGroups => plan.head_group(i),
        };
        (pat.segment, pat.dilation, hg, i % pat.dilation)
    }

    /// The whole plan.
    pub(crate) fn of_plan(plan: &Plan, delta_stride: usize, has_mask: bool) -> Result<Prob> {
        let pats: Vec<_> = (0..plan.num_patterns())
            .map(|i| Self::pattern(plan, i))
            .collect();
        let o = plan.options();
        let mut pr = Self::build(
            *plan.dims(),
            &pats,
            o.combine == Combine::HeadGroups,
            o.causal,
            plan.scale(),
            plan.pattern_factor(),
            delta_stride,
            has_mask,
        )?;
        pr.whole_device = true;
        Ok(pr)
    }

    /// Patterns `pats` of `plan` on `seq` local rows whose segments all start at
    /// multiples of their length (a rank's rows where every such segment is local), with
    /// output factor `fac`. Offsets and head groups are the plan's.
    // Used by the GPU ring (feature nccl) and the tests.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn patterns(
        plan: &Plan,
        seq: usize,
        pats: &[usize],
        fac: f64,
        has_mask: bool,
    ) -> Result<Prob> {
        let pv: Vec<_> = pats.iter().map(|&i| Self::pattern(plan, i)).collect();
        let o = plan.options();
        let dims = Dims {
            seq,
            ..*plan.dims()
        };
        Self::build(
            dims,
            &pv,
            o.combine == Combine::HeadGroups,
            o.causal,
            plan.scale(),
            fac,
            0,
            has_mask,
        )
    }

    /// Dense attention of `rows` compact query rows against `rows` compact key rows
    /// (`causal`: key `j` visible to query `i` iff `j <= i`), softmax scale of `plan`,
    /// output factor `fac`; `has_mask`: a `(batch, rows)` key padding mask comes along.
    // Used by the GPU ring (feature nccl) and the tests.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn dense_block(
        plan: &Plan,
        dims: Dims,
        causal: bool,
        fac: f64,
        has_mask: bool,
    ) -> Result<Prob> {
        let all = 0..dims.heads;
        Self::build(
            dims,
            &[(dims.seq, 1, all, 0)],
            false,
            causal,
            plan.scale(),
            fac,
            0,
            has_mask,
        )
    }

    /// Number of owner tiles of `rows` rows per (batch, head).
    fn tiles(&self, rows: usize) -> usize {
        let (blk, step) = (self.p.blk as usize, self.p.step as usize);
        let cls_rows = blk.div_ceil(step);
        (self.dims.seq / blk) * step * cls_rows.div_ceil(rows)
    }
}

type Cache = Mutex<HashMap<usize, (Arc<CudaModule>, ModuleInfo)>>;

/// Where a device's kernel module came from ([`module_info`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleInfo {
    /// NVRTC's target, e.g. `sm_90a`.
    pub arch: String,
    /// The cache file it was loaded from (`None`: compiled by this process).
    pub loaded_from: Option<std::path::PathBuf>,
    /// The cache file this process wrote after compiling (`None`: no cache folder set, or
    /// the write failed).
    pub written_to: Option<std::path::PathBuf>,
    /// Seconds from the lookup to the loaded module (compile included).
    pub seconds: f64,
}

/// Environment variable naming a folder of compiled modules kept across processes: a
/// process loads its kernels from there when the folder holds a module compiled from the
/// same sources for the same target by the same NVRTC version, and writes the one it
/// compiles otherwise ([`module_info`] says which happened; [`precompile`] fills the folder
/// without a GPU). Unset, every process compiles once per device.
pub const KERNEL_CACHE_VAR: &str = "DILATED_ATTENTION_KERNEL_CACHE";

/// The whole module's source: `dilated.cu`, `hopper.cu`, the ring's `gpu.cu`.
fn kernel_source() -> String {
    format!("{SRC}\n{HOPPER_SRC}\n{RING_SRC}")
}

/// NVRTC's target for compute capability `major.minor`: `sm_90a` on 9.0 (`wgmma` exists
/// only in the arch-specific target, hopper.cu), `sm_XY` elsewhere.
fn target_arch(major: i32, minor: i32) -> String {
    let suffix = if (major, minor) == (9, 0) { "a" } else { "" };
    format!("sm_{major}{minor}{suffix}")
}

/// Include paths from `$CUDA_HOME` / `$CUDA_PATH` (`include`, `include/cccl`) where they
/// exist. The kernels include no header (checked by a unit test), so these paths cannot
/// change the compiled code and stay out of the cache key.
fn include_options() -> Vec<String> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let root = std::path::PathBuf::from(root);
            for sub in ["include", "include/cccl"] {
                let p = root.join(sub);
                if p.is_dir() {
                    v.push(format!("--include-path={}", p.to_string_lossy()));
                }
            }
        }
    }
    v
}

/// The options that determine the code: the target and the language standard.
fn code_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// NVRTC's (major, minor) version.
fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live locals; NVRTC's presence was checked by the caller.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Device {
            msg: format!("nvrtcVersion failed: {rc:?}"),
        });
    }
    Ok((major, minor))
}

/// 64-bit FNV-1a over `parts`, each followed by a zero byte: the cache key. Stable across
/// Rust versions and platforms (std's `DefaultHasher` is not), and plenty for telling
/// sources apart (it is not a defence against a crafted file: the folder is trusted).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The cache file name of the module for `arch` compiled from `src` by NVRTC `version`:
/// `<arch>-<key>.cubin`, the key over the source, the code options and the version.
fn cache_name(src: &str, arch: &str, version: (i32, i32)) -> String {
    let opts = code_options(arch).join(" ");
    let ver = format!("nvrtc {}.{}", version.0, version.1);
    let key = fnv1a(&[
        b"dilated-attention module v1",
        opts.as_bytes(),
        ver.as_bytes(),
        src.as_bytes(),
    ]);
    format!("{arch}-{key:016x}.cubin")
}

/// The cache file in folder `dir` for the module of `arch` compiled from `src` by this
/// process's NVRTC.
fn cache_file(dir: &std::path::Path, src: &str, arch: &str) -> Result<std::path::PathBuf> {
    Ok(dir.join(cache_name(src, arch, nvrtc_version()?)))
}

/// Compile the module for `arch` with NVRTC straight to a CUBIN (SASS for that target).
///
/// NVRTC assembles the SASS itself whenever the target is a real architecture; loading
/// its PTX instead, as the crate did until stop 23, had the driver assemble the same
/// module a second time (about half of the first call's ~150 s on a fresh H200).
fn compile_cubin(src: &str, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let fail = |what: &str, e: &dyn std::fmt::Debug| Error::Device {
        msg: format!("NVRTC {what} (dilated.cu, {arch}): {e:?}"),
    };
    let csrc = std::ffi::CString::new(src).map_err(|e| fail("source", &e))?;
    let prog = result::create_program(&csrc, None).map_err(|e| fail("create", &e))?;
    let mut opts = code_options(arch);
    opts.extend(include_options());
    // SAFETY: `prog` is a live program from create_program; it is destroyed once below,
    // after its log or CUBIN has been copied out.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| {
                        let bytes: Vec<u8> = l.iter().map(|&c| c as u8).collect();
                        String::from_utf8_lossy(&bytes)
                            .trim_end_matches('\0')
                            .to_string()
                    })
                    .unwrap_or_default();
                Err(Error::Device {
                    msg: format!("NVRTC failed to compile dilated.cu for {arch}: {e:?}\n{log}"),
                })
            }
            Ok(()) => {
                let mut n = 0usize;
                let rc = sys::nvrtcGetCUBINSize(prog, &mut n);
                if rc != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
                    Err(fail("CUBIN size", &rc))
                } else {
                    let mut bin = vec![0u8; n];
                    let rc = sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr().cast());
                    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                        Err(fail("CUBIN", &rc))
                    } else {
                        Ok(bin)
                    }
                }
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// Write `bin` to `path` (creating its folder) through a temporary file in the same folder
/// and a rename, so that a reader never sees a partial file (a process that loses the race
/// overwrites an identical one).
fn write_atomic(path: &std::path::Path, bin: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bin)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn check_nvrtc() -> Result<()> {
    // SAFETY: only tries to open the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device {
            msg: "NVRTC (libnvrtc) was not found; it compiles the CUDA kernels at run time".into(),
        });
    }
    Ok(())
}

/// Compile the module for `arch` (`"sm_90a"` for Hopper, `"sm_80"`, ...) without a GPU and
/// write it into folder `dir` under the name a process with [`KERNEL_CACHE_VAR`] = `dir`
/// looks for; returns the file's path. Needs NVRTC (no driver, no GPU): for building the
/// kernels ahead of time on another machine (`examples/precompile_kernels.rs`). A file of
/// that name already there is kept (the name is the content's key) and nothing is compiled.
pub fn precompile(arch: &str, dir: &std::path::Path) -> Result<std::path::PathBuf> {
    check_nvrtc()?;
    let src = kernel_source();
    let path = cache_file(dir, &src, arch)?;
    if path.is_file() {
        return Ok(path);
    }
    let bin = compile_cubin(&src, arch)?;
    write_atomic(&path, &bin).map_err(|e| Error::Device {
        msg: format!("writing {}: {e}", path.display()),
    })?;
    Ok(path)
}

/// The compiled module of device `dev`, compiling it at first use.
///
/// With [`KERNEL_CACHE_VAR`] set to a folder, the module is first looked up there (file
/// name from [`cache_name`]: source, target, NVRTC version), and a freshly compiled one is
/// written there; a file the driver refuses (another GPU, a damaged file) is compiled
/// again and replaced. A failure to write the cache costs only the next process's compile
/// and is not an error.
fn module(dev: &Cuda) -> Result<Arc<CudaModule>> {
    module_entry(dev).map(|(m, _)| m)
}

/// Where the kernels of `dev` came from — the cache file they were loaded from, or compiled
/// by this process (and written where) — compiling or loading them first if needed. For
/// diagnostics: whether a [`KERNEL_CACHE_VAR`] folder was used.
pub fn module_info(dev: &Cuda) -> Result<ModuleInfo> {
    module_entry(dev).map(|(_, i)| i)
}

fn module_entry(dev: &Cuda) -> Result<(Arc<CudaModule>, ModuleInfo)> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = map.get(&dev.ordinal()) {
        return Ok(e.clone());
    }
    let t = std::time::Instant::now();
    check_nvrtc()?;
    let (major, minor) = dev
        .context()
        .compute_capability()
        .map_err(dev_err("compute capability"))?;
    if major < 8 {
        return Err(Error::Device {
            msg: format!("compute capability {major}.{minor}: the kernels need 8.0 or newer"),
        });
    }
    let arch = target_arch(major, minor);
    let src = kernel_source();
    let cached = std::env::var_os(KERNEL_CACHE_VAR)
        .filter(|d| !d.is_empty())
        .map(|d| cache_file(std::path::Path::new(&d), &src, &arch))
        .transpose()?;
    let mut info = ModuleInfo {
        arch: arch.clone(),
        loaded_from: None,
        written_to: None,
        seconds: 0.0,
    };
    if let Some(path) = &cached {
        if let Ok(bin) = std::fs::read(path) {
            if let Ok(m) = dev.context().load_module(Ptx::from_binary(bin)) {
                info.loaded_from = Some(path.clone());
                info.seconds = t.elapsed().as_secs_f64();
                map.insert(dev.ordinal(), (m.clone(), info.clone()));
                return Ok((m, info));
            }
        }
    }
    let bin = compile_cubin(&src, &arch)?;
    let m = dev
        .context()
        .load_module(Ptx::from_binary(bin.clone()))
        .map_err(dev_err("loading the compiled module"))?;
    if let Some(path) = &cached {
        if write_atomic(path, &bin).is_ok() {
            info.written_to = Some(path.clone());
        }
    }
    info.seconds = t.elapsed().as_secs_f64();
    map.insert(dev.ordinal(), (m.clone(), info.clone()));
    Ok((m, info))
}

pub(crate) fn function(dev: &Cuda, name: &str) -> Result<CudaFunction> {
    module(dev)?
        .load_function(name)
        .map_err(dev_err(&format!("kernel {name}")))
}

/// Allow `bytes` of dynamic shared memory for `f` (above the 48 KiB default).
fn set_smem(f: &CudaFunction, bytes: u32) -> Result<()> {
    f.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(dev_err("shared memory limit"))
}

/// Kernel `name` and its launch over the owner tiles of `pr`: `(rows per tile, heads,
/// threads)`, with `smem` bytes of dynamic shared memory (allowed above the default).
fn kernel(
    dev: &Cuda,
    name: &str,
    pr: &Prob,
    (rows, heads, threads): (usize, usize, u32),
    smem: Option<u32>,
) -> Result<(CudaFunction, LaunchConfig)> {
    let f = function(dev, name)?;
    let mut cfg = grid_t(pr, rows, heads, threads)?;
    if let Some(bytes) = smem {
        set_smem(&f, bytes)?;
        cfg.shared_mem_bytes = bytes;
    }
    Ok((f, cfg))
}

/// Compile (if needed) the kernels of `dev` now, so that timing excludes NVRTC.
pub fn warm_up(dev: &Cuda) -> Result<()> {
    module(dev).map(|_| ())
}

/// Output of a CUDA forward.
#[derive(Debug)]
pub struct CudaForward<E> {
    /// `(batch, seq, heads, dim)`.
    pub out: CudaSlice<E>,
    /// Log-sum-exp `L`, `(batch, seq, heads)`, always `f32` on the GPU; `-inf` where
    /// nothing is attended.
    pub lse: CudaSlice<f32>,
}

/// Gradients from a CUDA backward.
#[derive(Debug)]
pub struct CudaGrads<E> {
    /// `(batch, seq, heads, dim)`.
    pub dq: CudaSlice<E>,
    /// `(batch, seq, kv_heads, dim)`.
    pub dk: CudaSlice<E>,
    /// `(batch, seq, kv_heads, dim)`.
    pub dv: CudaSlice<E>,
}

fn check_inputs<E>(
    plan: &Plan,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
) -> Result<()> {
    plan.check_inputs(q.len(), k.len(), v.len(), mask.map(|m| m.len()))
}

/// Which forward kernel runs for this problem: `Some(name)` for tensor cores (`fwd_wsp_*`,
/// `fwd_wso_*` (`fwd_wspr_*`, `fwd_wsor_*` with Q in registers), `fwd_ws_*` or `fwd_wg_*`
/// on Hopper, `fwd_tc*_*` for the `mma.sync` kernels), `None` for the generic kernel.
pub fn tensor_core_kernel<E: CudaElement>(dev: &Cuda, plan: &Plan) -> Option<String> {
    let persist = may_persist(dev, plan.options().causal, true);
    // Device addresses unknown here: taken as aligned (as every cudarc allocation is).
    let tma = Prob::of_plan(plan, 0, false)
        .map(|pr| fwd_tma_fits(dev, &pr, std::mem::size_of::<E>(), 0, 0))
        .unwrap_or(false);
    fwd_kernel::<E>(
        dev,
        plan.dims().head_dim,
        persist,
        plan.options().causal,
        tma,
    )
    .map(|k| k.name)
}

/// The forward's key tiles may come by tensor-map box loads (`fwd_wspt` / `fwd_wsot`,
/// [`Cuda::set_fwd_tma_loads`]): asked for, a whole-device problem (the ring's launch
/// problems keep cp.async, on which the ring was validated), every pattern's rows boxes of
/// [`load_map`]'s maps, and K, V (device addresses `k`, `v`, elements of `elem_bytes`) maps
/// the kernel takes ([`loads_fit`]).
fn fwd_tma_fits(dev: &Cuda, pr: &Prob, elem_bytes: usize, k: u64, v: u64) -> bool {
    dev.fwd_tma_loads()
        && pr.whole_device
        && dq_rows_are_boxes(pr)
        && loads_fit(pr, elem_bytes, k, v)
}

/// Tensor cores take this problem: bf16/f16, D = 64 or 128, not forced to the generic
/// kernels.
fn tensor_cores<E: CudaElement>(dev: &Cuda, d: usize) -> bool {
    E::TENSOR_CORES && dev.kernel_pref() != KernelPref::Generic && (d == 64 || d == 128)
}

/// The Hopper (`wgmma`, hopper.cu) kernels take this problem.
fn wgmma<E: CudaElement>(dev: &Cuda, d: usize) -> bool {
    tensor_cores::<E>(dev, d) && dev.kernel_pref() == KernelPref::Auto && dev.is_hopper()
}

/// A kernel and its launch shape: owner rows per CTA, threads, dynamic shared memory.
struct Launch {
    name: String,
    rows: usize,
    threads: u32,
    smem: Option<u32>,
    /// One CTA per SM looping over the work items (`fwd_wsp`) instead of one per item.
    persistent: bool,
}

/// Where the persistent forward (`fwd_wsp`) runs when allowed
/// ([`Cuda::set_fwd_persistent`]): non-causal problems. Measured on the H200 against the
/// one-CTA-per-item `fwd_wso` in the same run: LSE +8-15 %, dense 16K +6 %, 64K equal
/// (items in the grid's order, `benches/results/gpu_h200_persistent.txt`), head groups
/// +7-13 % (items heads fastest, `gpu_h200_persistent_heads_first.txt`; the kernel orders
/// head-group items that way); but causal −35 % at 16K and −12 % at 64K: with items
/// dealt out statically (CTA c takes c, c + 132, …) the busiest CTA gets 1.57× the average
/// causal work at 16K (2048 items of cost ∝ tile index) and 1.03× at 64K (CUDA.md).
/// The hardware's block scheduler hands the next tile to whichever SM is free.
pub(crate) fn persistent_pays(causal: bool) -> bool {
    !causal
}

/// The persistent forward's count of work items with keys under the head-group combine
/// (`Params::keyed`; hopper.cu's `keyed_item` numbers them, `deal_keyed` deals them), or
/// `None` where its numbering does not hold: causal problems (dealt heaviest first), a
/// dilation not dividing the class step (a tile's rows would not all take part or all not),
/// an offset not below its dilation, head groups that do not cover the heads in order, or
/// `p.tiles` (set first) not `blocks × step × tiles per class` of `rows`-row tiles.
/// Pattern i's heads have keys in the classes `c % r == off` of each block: `step / r` of
/// its `step` classes.
fn keyed_items(p: &Params, rows: usize) -> Option<i32> {
    if p.headgroups == 0 || p.causal != 0 || p.blk <= 0 || p.step <= 0 || p.n % p.blk != 0 {
        return None;
    }
    let g = usize::try_from(p.g).ok()?;
    let (blk, step) = (p.blk as i64, p.step as i64);
    let tpc = ((blk + step - 1) / step + rows as i64 - 1) / rows as i64;
    let nb = i64::from(p.n) / blk;
    if i64::from(p.tiles) != nb * step * tpc {
        return None;
    }
    let mut next_head = 0;
    let mut keyed = 0i64;
    for i in 0..g {
        let (r, off) = (i64::from(p.r[i]), i64::from(p.off[i]));
        if r <= 0 || step % r != 0 || off >= r || p.hg0[i] != next_head || p.hg1[i] < p.hg0[i] {
            return None;
        }
        next_head = p.hg1[i];
        keyed += i64::from(p.hg1[i] - p.hg0[i]) * i64::from(p.b) * nb * (step / r) * tpc;
    }
    if next_head != p.h {
        return None;
    }
    i32::try_from(keyed).ok()
}

/// Whether the keyed-first deal pays for `keyed` items with keys over `ctas` CTAs: where a
/// CTA gets at most 16 of them on average. Measured on an H100 against the grid's order
/// (stop 37, `benches/results/gpu_h100_s37.txt`, three alternating rounds and the same
/// process's `griddeal` row): the LongNet schedule's head-group forward at 16K (7.3 keyed
/// items per CTA) +2.7 / +3.8 %, at 64K, 256K and 1M (29, 116 and 465 per CTA) −2.7 / −3.0,
/// −1.5 / +1.7 and −2.1 / −2.9 %: where a CTA has many items the grid's order is within
/// one item of an even deal already, and it shares K/V in L2 better (numbered pattern by
/// pattern, the CTAs of one moment work on one head group). The bound between 7.3 and 29
/// is a choice, not a measurement.
pub(crate) fn keyed_first_pays(keyed: i32, ctas: u32) -> bool {
    keyed > 0 && i64::from(keyed) <= 16 * i64::from(ctas)
}

/// The persistent forward may run: on a problem that may take every SM (`whole_device`),
/// where it pays, or causal with [`Cuda::set_fwd_persistent_causal`].
fn may_persist(dev: &Cuda, causal: bool, whole_device: bool) -> bool {
    whole_device && (persistent_pays(causal) || dev.fwd_persistent_causal())
}

/// The tensor-core forward for head dim `d`, if tensor cores take the problem.
/// `persist`: the persistent kernel may run ([`may_persist`]).
/// `causal`: the problem's causal mask (`fwd_wspi` takes non-causal problems only).
/// `tma`: the key tiles by box loads ([`fwd_tma_fits`]; the overlapped 128-key kernels).
fn fwd_kernel<E: CudaElement>(
    dev: &Cuda,
    d: usize,
    persist: bool,
    causal: bool,
    tma: bool,
) -> Option<Launch> {
    if !tensor_cores::<E>(dev, d) {
        return None;
    }
    let e = E::NAME;
    if wgmma::<E>(dev, d) {
        return Some(if dev.warp_specialized() {
            let persist = dev.fwd_persistent() && persist;
            let ra = dev.fwd_reg_operands();
            let wide = dev.fwd_wide_tiles() && !ra && dev.fwd_overlap();
            // The persistent box-load forward without the block end before its wait for
            // P·V (for comparisons).
            let ends = dev.wait_block_ends();
            let (kind, persistent) = match (dev.fwd_overlap(), persist) {
                (true, true) if wide => (if tma { "wspwt" } else { "wspw" }, true),
                (true, false) if wide => (if tma { "wsowt" } else { "wsow" }, false),
                (true, true) if ra => ("wspr", true),
                (true, false) if ra => ("wsor", false),
                (true, true) if tma && !ends => ("wsptn", true),
                (true, true) if tma && !causal && dev.fwd_cross_items() => ("wspi", true),
                (true, true) if tma && dev.fwd_deferred_stores() => ("wspx", true),
                (true, true) if tma && dev.fwd_double_q() => ("wspq", true),
                (true, true) if tma && dev.fwd_vector_stores() => ("wsps", true),
                (true, true) => (if tma { "wspt" } else { "wsp" }, true),
                (true, false) => (if tma { "wsot" } else { "wso" }, false),
                (false, _) => ("ws", false),
            };
            Launch {
                name: format!("fwd_{kind}_{e}_{d}"),
                rows: 128,
                threads: 384,
                smem: Some(if kind == "wspi" {
                    wspi_smem(d)
                } else {
                    ws_smem(d, wide, kind == "wspq")
                }),
                persistent,
            }
        } else {
            Launch {
                name: format!("fwd_wg_{e}_{d}"),
                rows: 128,
                threads: 256,
                smem: Some(wg_smem(d)),
                persistent: false,
            }
        });
    }
    let (warps, mt) = if dev.fwd_row_tiles() == 2 {
        (4, 2)
    } else {
        (dev.fwd_warps() as usize, 1)
    };
    let family = match (warps, mt) {
        (_, 2) => "fwd_tc2",
        (8, _) => "fwd_tc8",
        _ => "fwd_tc",
    };
    let rows = 16 * warps * mt;
    Some(Launch {
        name: format!("{family}_{e}_{d}"),
        rows,
        threads: 32 * warps as u32,
        // Q tile + 2 stages of K and V tiles of 64 rows (rows padded by 8 elements) + key
        // metadata.
        smem: Some(((rows + 4 * 64) * (d + 8) * 2 + 2 * 64 * 4 * 2) as u32),
        persistent: false,
    })
}

/// Dynamic shared memory of `fwd_wg_*` (hopper.cu): alignment slack, the Q tile (128
/// rows), two stages of K and V tiles (128 rows), key positions and flags.
fn wg_smem(d: usize) -> u32 {
    (1024 + 128 * d * 2 + 4 * 128 * d * 2 + 2 * 128 * 4 * 2) as u32
}

/// Dynamic shared memory of `fwd_ws_*` / `fwd_wso_*` / `fwd_wsp_*` (hopper.cu): alignment
/// slack, the Q tile, three stages of K and V tiles of 128 rows, key metadata, eight
/// mbarriers (full and empty per stage, qfull, qempty). `wide` (`fwd_wsow_*` /
/// `fwd_wspw_*`): two stages of 176 rows (`WIDE_BK`), and full and empty for the V half of
/// each stage too: ten mbarriers. `double_q` (`fwd_wspq_*`): two Q tiles and two stages of
/// 128 rows (full and empty per stage, qfull and qempty per Q tile: eight mbarriers).
fn ws_smem(d: usize, wide: bool, double_q: bool) -> u32 {
    let (keys, stages, bars) = if wide {
        (176, 2, 10)
    } else if double_q {
        (128, 2, 8)
    } else {
        (128, 3, 8)
    };
    let q_tiles = if double_q { 2 } else { 1 };
    ws_layout(d, q_tiles, stages, stages, keys, bars)
}

/// Dynamic shared memory of `fwd_wspi_*` (hopper.cu): two Q tiles, two K stages and three V
/// stages of 128 rows, fourteen mbarriers (full and empty per K and per V stage, qfull and
/// qempty per Q tile).
fn wspi_smem(d: usize) -> u32 {
    ws_layout(d, 2, 2, 3, 128, 14)
}

/// The warp-specialised forwards' shared memory: 1024 bytes of alignment slack, `q_tiles`
/// Q tiles of 128 rows, `k_stages` K and `v_stages` V tiles of `keys` rows, a key-metadata
/// word per K stage row, `bars` mbarriers.
fn ws_layout(
    d: usize,
    q_tiles: usize,
    k_stages: usize,
    v_stages: usize,
    keys: usize,
    bars: usize,
) -> u32 {
    (1024
        + q_tiles * 128 * d * 2
        + (k_stages + v_stages) * keys * d * 2
        + k_stages * keys * 4
        + bars * 8) as u32
}

/// Streamed tile rows of `dq_wg_*` / `dkdv_wg_*` (`WG_BS` in hopper.cu).
const WG_BS: usize = 64;

/// Dynamic shared memory of `dq_wg_*` / `dkdv_wg_*`: alignment slack, two owner tiles of
/// 128 rows, three stages of two streamed tiles, up to four words of row metadata per stage
/// row, six stage mbarriers (8-byte aligned).
fn wg_bwd_smem(d: usize) -> u32 {
    (1024 + 2 * 128 * d * 2 + 3 * 2 * WG_BS * d * 2 + 3 * WG_BS * 4 * 4 + 8 + 6 * 8) as u32
}

/// Dynamic shared memory of `bwd_wg_*`: as [`wg_bwd_smem`], plus alignment slack and dSᵀ
/// (128 key rows of 128 bytes).
fn wg_fused_smem(d: usize) -> u32 {
    wg_bwd_smem(d) + (1024 + 128 * 128) as u32
}

/// Dynamic shared memory of `bwd_wgp_*`: as [`wg_fused_smem`] with two dSᵀ buffers, and
/// four more mbarriers (dsfull, dsempty).
fn wg_fused_pp_smem(d: usize) -> u32 {
    wg_bwd_smem(d) + (1024 + 2 * 128 * 128 + 4 * 8) as u32
}

/// Dynamic shared memory of `bwd_wgt_*`: as [`wg_fused_pp_smem`], two more mbarriers
/// (stgdone), alignment slack and the 16 KiB dQ staging buffer (64 rows × 64 f32 columns).
fn wg_fused_tma_smem(d: usize) -> u32 {
    wg_fused_pp_smem(d) + (2 * 8 + 1024 + 64 * 64 * 4) as u32
}

/// Dynamic shared memory of `bwd_wgt2_*`: `bwd_wgt_*`'s layout with two Q/dO stages
/// instead of three (two streamed tiles and their metadata less) and a second 16 KiB
/// staging buffer.
fn wg_fused_tma2_smem(d: usize) -> u32 {
    wg_fused_tma_smem(d) - (2 * WG_BS * d * 2 + WG_BS * 4 * 4) as u32 + 64 * 64 * 4
}

/// Query rows per tile of `bwd_wgt2w_*` (`WG_BS_WIDE` in hopper.cu).
const WG_BS_WIDE: usize = 80;

/// Dynamic shared memory of `bwd_wgt2w_*` (D = 128 only; hopper.cu lays it out from the
/// dynamic base, without alignment slack): the owner K and V tiles (128 rows), two stages
/// of Q and dO tiles of [`WG_BS_WIDE`] rows, two dS buffers (the tile's rows × 128 keys,
/// 16-bit), a staging buffer per warpgroup (the rows × 64 f32 columns), the row metadata
/// (16 bytes per row and stage), twelve mbarrier slots.
fn wg_fused_wide_smem() -> u32 {
    let (d, rows) = (128, WG_BS_WIDE);
    (2 * 128 * d * 2
        + 2 * 2 * rows * d * 2
        + 2 * rows * 128 * 2
        + 2 * rows * 64 * 4
        + 2 * rows * 16
        + 12 * 8) as u32
}

/// The tensor maps of `bwd_wgt_*` / `bwd_wgt2_*` (`struct TMaps` in hopper.cu), one per pattern.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct DqMaps([cudarc::driver::sys::CUtensorMap; MAX_PATTERNS]);

// SAFETY: plain old data, the layout of the CUDA `struct TMaps` (MAX_PATTERNS opaque
// 128-byte, 128-aligned tensor maps; unused entries zero and never read).
unsafe impl DeviceRepr for DqMaps {}

/// Whether every pattern's rows are boxes of [`dq_tensor_maps`]'s maps: its dilation
/// divides the sequence length and its (capped) segment, so segments start at multiples of
/// it. Otherwise the backward runs the two passes.
fn dq_rows_are_boxes(pr: &Prob) -> bool {
    let p = &pr.p;
    (0..pr.npat).all(|i| p.n % p.r[i] == 0 && p.w[i] % p.r[i] == 0)
}

/// The Hopper backward kernels, as [`hopper_backward`] picks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HopperBwd {
    /// `dq_wgr` + `dkdv_wg` (or their lockstep / deferred-wait variants).
    TwoPass,
    /// Fused, in lockstep.
    Wg,
    /// Fused, ping-pong turns, dQ by per-thread atomics.
    Wgp,
    /// Fused, dQ by bulk tensor reduce-adds from one staging buffer.
    Wgt,
    /// Fused, dQ by bulk tensor reduce-adds, a staging buffer per warpgroup, Q/dO tiles by
    /// cp.async (at D = 128 with query tiles of 80 rows, `bwd_wgt2w`, unless turned off; with
    /// a producer warpgroup loading them by box loads, `bwd_wgt2wp`, where they fit its maps).
    Wgt2,
    /// `Wgt2` with the Q/dO tiles by tensor-map box loads (opt-in: measured the same).
    Wgt3,
}

/// The device's backward settings that [`hopper_backward`] reads.
#[derive(Debug, Clone, Copy)]
struct BwdFlags {
    fused: bool,
    pingpong: bool,
    tma: bool,
    split: bool,
    loads: bool,
}

/// Which Hopper backward runs. Fused (the default, `bwd_wgt2`) only on whole plans: the
/// ring's launch problems (`whole_device` false) keep the two passes, on which the ring was
/// validated. The tensor-map kernels need the ping-pong turns and every pattern's rows to
/// be boxes of their maps (`boxes`, [`dq_rows_are_boxes`]); where they are asked for but
/// the rows are no boxes the two passes run, which measured faster than `bwd_wgp`
/// (CUDA.md, stop 18). The Q/dO box loads of `bwd_wgt3` also need the plan's patterns to
/// fit its parameter block and Q, dO to be 16-byte aligned (`loadable`, [`loads_fit`]);
/// otherwise `bwd_wgt2` loads them by cp.async.
fn hopper_backward(f: BwdFlags, whole_device: bool, boxes: bool, loadable: bool) -> HopperBwd {
    let tma = f.pingpong && f.tma;
    if !f.fused || !whole_device || (tma && !boxes) {
        return HopperBwd::TwoPass;
    }
    match (tma, f.split, f.pingpong) {
        (true, true, _) if f.loads && loadable => HopperBwd::Wgt3,
        (true, true, _) => HopperBwd::Wgt2,
        (true, false, _) => HopperBwd::Wgt,
        (false, _, true) => HopperBwd::Wgp,
        (false, _, false) => HopperBwd::Wg,
    }
}

/// One 5-d tiled tensor map over the device buffer at `ptr`: `dims` (innermost first), byte
/// `strides` of dims 1..5, `boxes`, 128-byte swizzle, out-of-bounds elements read as zero;
/// `what` names the buffer in the error.
fn encode_map(
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    ptr: u64,
    dims: [u64; 5],
    strides: [u64; 4],
    boxes: [u32; 5],
    what: &str,
) -> Result<cudarc::driver::sys::CUtensorMap> {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMapFloatOOBfill, CUtensorMapInterleave,
        CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    if !ptr.is_multiple_of(16) || strides.iter().any(|s| !s.is_multiple_of(16)) {
        return Err(Error::Device {
            msg: format!("tensor map of {what}: address or strides not 16-byte aligned"),
        });
    }
    // SAFETY: CUtensorMap is plain old data (an opaque array of u64); zero is a valid value.
    let mut map: cudarc::driver::sys::CUtensorMap = unsafe { std::mem::zeroed() };
    let elem = [1u32; 5];
    // SAFETY: every array has the rank's length (5, strides 4); `ptr` is a live, 16-byte
    // aligned device allocation spanning the dims and strides (the callers' buffers), strides
    // are multiples of 16 bytes (checked above); the call only encodes the map into `map`.
    let res = unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            5,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if res != CUresult::CUDA_SUCCESS {
        return Err(Error::Device {
            msg: format!("cuTensorMapEncodeTiled for {what} (dims {dims:?}): {res:?}"),
        });
    }
    Ok(map)
}

/// The map of pattern `i` over the f32 dQ buffer at `ptr` (`B·N·H·D` floats) for the
/// reduce-adds of `bwd_wgt*`: dims (D, H, r, N/r, B) with byte strides (4·D, 4·H·D, 4·r·H·D,
/// 4·N·H·D), so that a segment's rows a + o + r·j (a a multiple of r, o < r) are the box rows
/// (·, h, o, a/r + j, b); boxes of 32 columns × `rows` rows (the kernel's staging layout:
/// its query tile's rows, 64, or [`WG_BS_WIDE`] for `bwd_wgt2w`).
fn dq_map(pr: &Prob, i: usize, ptr: u64, rows: u32) -> Result<cudarc::driver::sys::CUtensorMap> {
    let g = dq_map_geometry(pr, i, rows);
    encode_map(
        cudarc::driver::sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        ptr,
        g.dims,
        g.strides,
        g.boxes,
        &format!("the dQ buffer of pattern {i}"),
    )
}

/// A 5-d tiled tensor map's shape: dims (innermost first), byte strides of dims 1..5, box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapGeometry {
    dims: [u64; 5],
    strides: [u64; 4],
    boxes: [u32; 5],
}

impl MapGeometry {
    /// Byte offset of the element at coordinates `c` (each checked against its dim).
    #[cfg(test)]
    fn offset(&self, c: [u64; 5], elem: u64) -> Option<u64> {
        if (0..5).any(|k| c[k] >= self.dims[k]) {
            return None;
        }
        Some(c[0] * elem + (0..4).map(|k| c[k + 1] * self.strides[k]).sum::<u64>())
    }
}

/// [`dq_map`]'s shape (f32 rows of `H` heads; boxes of `rows` rows).
fn dq_map_geometry(pr: &Prob, i: usize, rows: u32) -> MapGeometry {
    let p = &pr.p;
    let (n, h, d, b) = (p.n as u64, p.h as u64, p.d as u64, p.b as u64);
    let r = p.r[i] as u64;
    MapGeometry {
        dims: [d, h, r, n / r, b],
        strides: [4 * d, 4 * h * d, 4 * r * h * d, 4 * n * h * d],
        boxes: [32, 1, 1, rows, 1],
    }
}

/// One tensor map per pattern over the f32 dQ buffer at `ptr` ([`dq_map`]) for
/// `bwd_wgt_*` / `bwd_wgt2_*` (boxes of `rows` rows: the kernel's query tile). An error
/// where a pattern's rows are no box of such a map ([`dq_rows_are_boxes`], which
/// [`hopper_backward`] checks first).
fn dq_tensor_maps(pr: &Prob, ptr: u64, rows: u32) -> Result<DqMaps> {
    if !dq_rows_are_boxes(pr) {
        return Err(Error::Device {
            msg: "fused backward: a pattern's rows are no tensor-map box".into(),
        });
    }
    // SAFETY: CUtensorMap is plain old data (an opaque array of u64); zero is a valid value.
    let mut maps = DqMaps(unsafe { std::mem::zeroed() });
    for i in 0..pr.npat {
        maps.0[i] = dq_map(pr, i, ptr, rows)?;
    }
    Ok(maps)
}

/// Patterns at most whose maps `bwd_wgt3_*` takes (`MAXT` in hopper.cu: three maps of 128
/// bytes per pattern in the 4 KiB of kernel parameters).
const MAX_LOAD_PATTERNS: usize = 8;

/// The tensor maps of `bwd_wgt3_*` (`struct LMaps` in hopper.cu): per pattern the dQ
/// buffer's ([`dq_map`]), then Q's and dO's ([`load_map`]).
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct LoadMaps {
    dq: [cudarc::driver::sys::CUtensorMap; MAX_LOAD_PATTERNS],
    q: [cudarc::driver::sys::CUtensorMap; MAX_LOAD_PATTERNS],
    o: [cudarc::driver::sys::CUtensorMap; MAX_LOAD_PATTERNS],
}

// SAFETY: plain old data, the layout of the CUDA `struct LMaps` (3 × MAX_LOAD_PATTERNS
// opaque 128-byte, 128-aligned tensor maps; unused entries zero and never read).
unsafe impl DeviceRepr for LoadMaps {}

/// Whether the box-load kernels take two of the plan's 16-bit row tensors (device
/// addresses `x`, `y`: Q and dO for `bwd_wgt3`, K and V for the forward): at most
/// [`MAX_LOAD_PATTERNS`] patterns, both 16-byte aligned, a 16-bit element type.
fn loads_fit(pr: &Prob, elem_bytes: usize, x: u64, y: u64) -> bool {
    pr.npat <= MAX_LOAD_PATTERNS && elem_bytes == 2 && x.is_multiple_of(16) && y.is_multiple_of(16)
}

/// The map of pattern `i` over the 16-bit rows `(B, N, H, D)` at `ptr` (Q or dO) for the
/// box loads of `bwd_wgt3_*`: dims (D, H, r, w/r, B·N/w) with byte strides (2·D, 2·H·D,
/// 2·r·H·D, 2·w·H·D), so that a segment's rows a + o + r·j are the box rows
/// (·, h, o, j, b·N/w + a/w) and rows past the segment's end (j ≥ w/r) lie outside the map
/// and load as zeros; boxes of 64 columns × `rows` rows (the wgmma layout's column blocks;
/// 64 for `bwd_wgt3`, [`WG_BS_WIDE`] for `bwd_wgt2wp`). Needs r | w (and w | N, which every
/// plan has: [`dq_rows_are_boxes`]). `kv`: over K or V (`Hkv` heads: the forward's key
/// tiles) instead.
fn load_map(
    pr: &Prob,
    i: usize,
    dtype: cudarc::driver::sys::CUtensorMapDataType,
    ptr: u64,
    kv: bool,
    rows: u32,
    what: &str,
) -> Result<cudarc::driver::sys::CUtensorMap> {
    let g = load_map_geometry(pr, i, kv, rows).ok_or_else(|| Error::Device {
        msg: format!(
            "tensor map of {what}: pattern {i}'s rows (w {}, r {}) are no box",
            pr.p.w[i], pr.p.r[i]
        ),
    })?;
    encode_map(
        dtype,
        ptr,
        g.dims,
        g.strides,
        g.boxes,
        &format!("{what}, pattern {i}"),
    )
}

/// [`load_map`]'s shape (16-bit rows), `None` where the dilation does not divide the
/// segment.
fn load_map_geometry(pr: &Prob, i: usize, kv: bool, rows: u32) -> Option<MapGeometry> {
    let p = &pr.p;
    let (n, d, b) = (p.n as u64, p.d as u64, p.b as u64);
    let h = if kv { p.hkv } else { p.h } as u64;
    let (w, r) = (p.w[i] as u64, p.r[i] as u64);
    if r == 0 || !w.is_multiple_of(r) || !n.is_multiple_of(w) {
        return None;
    }
    Some(MapGeometry {
        dims: [d, h, r, w / r, b * (n / w)],
        strides: [2 * d, 2 * h * d, 2 * r * h * d, 2 * w * h * d],
        boxes: [64, 1, 1, rows, 1],
    })
}

/// The maps of `bwd_wgt3_*` over dQ (f32, `dq`), Q (`q`) and dO (`dout`), element type
/// `name` (`bf16` or `f16`).
fn load_tensor_maps(
    pr: &Prob,
    name: &str,
    dq: u64,
    q: u64,
    dout: u64,
    rows: u32,
) -> Result<LoadMaps> {
    let dtype = map_dtype(pr, name, "bwd_wgt3")?;
    // SAFETY: CUtensorMap is plain old data (an opaque array of u64); zero is a valid value.
    let mut maps: LoadMaps = unsafe { std::mem::zeroed() };
    for i in 0..pr.npat {
        maps.dq[i] = dq_map(pr, i, dq, rows)?;
        maps.q[i] = load_map(pr, i, dtype, q, false, rows, "Q")?;
        maps.o[i] = load_map(pr, i, dtype, dout, false, rows, "dO")?;
    }
    Ok(maps)
}

/// The 16-bit map data type of element type `name` for `kernel`'s row maps, checking that
/// the plan's patterns are boxes and fit its parameter block.
fn map_dtype(
    pr: &Prob,
    name: &str,
    kernel: &str,
) -> Result<cudarc::driver::sys::CUtensorMapDataType> {
    use cudarc::driver::sys::CUtensorMapDataType as Dt;
    if !dq_rows_are_boxes(pr) || pr.npat > MAX_LOAD_PATTERNS {
        return Err(Error::Device {
            msg: format!(
                "{kernel}: {} patterns (at most {MAX_LOAD_PATTERNS}) or rows that are no box",
                pr.npat
            ),
        });
    }
    match name {
        "bf16" => Ok(Dt::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16),
        "f16" => Ok(Dt::CU_TENSOR_MAP_DATA_TYPE_FLOAT16),
        _ => Err(Error::Device {
            msg: format!("{kernel} box loads: no {name} kernel"),
        }),
    }
}

/// The tensor maps of `fwd_wspt_*` / `fwd_wsot_*` (`struct KMaps` in hopper.cu): per
/// pattern K's, then V's ([`load_map`] with 128-row boxes).
#[repr(C, align(128))]
#[derive(Clone, Copy)]
struct KvMaps {
    k: [cudarc::driver::sys::CUtensorMap; MAX_LOAD_PATTERNS],
    v: [cudarc::driver::sys::CUtensorMap; MAX_LOAD_PATTERNS],
}

// SAFETY: plain old data, the layout of the CUDA `struct KMaps` (2 × MAX_LOAD_PATTERNS
// opaque 128-byte, 128-aligned tensor maps; unused entries zero and never read).
unsafe impl DeviceRepr for KvMaps {}

/// The key-tile rows of the forward kernels that take K/V tensor maps (`fwd_wspt_*`,
/// `fwd_wsot_*`: 128; the wide `fwd_wspwt_*`, `fwd_wsowt_*`: 176), `None` for the others.
fn kv_box_rows(kernel: &str) -> Option<u32> {
    let kind = kernel.strip_prefix("fwd_")?.split('_').next()?;
    match kind {
        "wspt" | "wsot" | "wsptn" | "wspx" | "wsps" | "wspq" | "wspi" => Some(128),
        "wspwt" | "wsowt" => Some(176),
        _ => None,
    }
}

/// The maps of the forward's box-load kernels over K (`k`) and V (`v`), element type
/// `name`, boxes of `rows` key rows ([`kv_box_rows`]).
fn kv_tensor_maps(pr: &Prob, name: &str, k: u64, v: u64, rows: u32) -> Result<KvMaps> {
    let dtype = map_dtype(pr, name, "fwd_wspt / fwd_wsot")?;
    // SAFETY: CUtensorMap is plain old data (an opaque array of u64); zero is a valid value.
    let mut maps: KvMaps = unsafe { std::mem::zeroed() };
    for i in 0..pr.npat {
        maps.k[i] = load_map(pr, i, dtype, k, true, rows, "K")?;
        maps.v[i] = load_map(pr, i, dtype, v, true, rows, "V")?;
    }
    Ok(maps)
}

fn grid_t(pr: &Prob, rows: usize, heads: usize, threads: u32) -> Result<LaunchConfig> {
    let x = pr.tiles(rows);
    let x = u32::try_from(x).map_err(|_| Error::Device {
        msg: format!("{x} tiles exceed the grid"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (x.max(1), heads as u32, pr.dims.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Forward on the GPU: `out` `(B,N,H,D)` and `L` `(B,N,H)` (f32). `mask` is the key
/// padding mask `(B,N)` as bytes, nonzero = attend. Shapes are checked; a missing or
/// failing device is an `Err`.
pub fn try_forward<E: CudaElement>(
    dev: &Cuda,
    plan: &Plan,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
) -> Result<CudaForward<E>> {
    check_inputs(plan, q, k, v, mask)?;
    let pr = Prob::of_plan(plan, 0, mask.is_some())?;
    forward_launch(dev, &pr, q, k, v, mask)
}

/// The forward kernels of one problem (buffer lengths already checked against `pr.dims`).
pub(crate) fn forward_launch<E: CudaElement>(
    dev: &Cuda,
    pr: &Prob,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
) -> Result<CudaForward<E>> {
    let dm = pr.dims;
    let p = pr.p;
    let mut out = dev.output::<E>(dm.q_len())?;
    let mut lse = dev.output::<f32>(dm.lse_len())?;
    let dummy = dev.zeros::<u8>(1)?;
    let mask = mask.unwrap_or(&dummy);
    let persist = may_persist(dev, p.causal != 0, pr.whole_device);
    let (kp, _sk) = k.device_ptr(dev.stream());
    let (vp, _sv) = v.device_ptr(dev.stream());
    let tma = fwd_tma_fits(dev, pr, std::mem::size_of::<E>(), kp, vp);
    if let Some(l) = fwd_kernel::<E>(dev, dm.head_dim, persist, p.causal != 0, tma) {
        let kmaps = match kv_box_rows(&l.name) {
            Some(rows) => Some(kv_tensor_maps(pr, E::NAME, kp, vp, rows)?),
            None => None,
        };
        let (f, mut cfg) = kernel(dev, &l.name, pr, (l.rows, dm.heads, l.threads), l.smem)?;
        let mut p = p;
        if l.persistent {
            // One CTA per SM over every (tile, head, batch) item; the kernel decodes them in
            // the order of the grid it replaces.
            let (x, y, z) = cfg.grid_dim;
            p.tiles = x as i32;
            let items = u64::from(x) * u64::from(y) * u64::from(z);
            let items = i32::try_from(items).map_err(|_| Error::Device {
                msg: format!("{items} work items exceed the persistent forward's 32-bit index"),
            })?;
            cfg.grid_dim = ((items as u32).min(dev.sm_count()).max(1), 1, 1);
            // Only the persistent 128-key box-load kernels read it (hopper.cu's KF); the
            // others keep the grid's order whatever it holds.
            if dev.fwd_keyed_first() {
                p.keyed = keyed_items(&p, l.rows)
                    .filter(|&k| keyed_first_pays(k, cfg.grid_dim.0))
                    .unwrap_or(0);
            }
        }
        let mut b = dev.stream().launch_builder(&f);
        if let Some(m) = kmaps.as_ref() {
            b.arg(m);
        }
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(&mut out)
            .arg(&mut lse);
        // SAFETY: argument order and types match `fwd_tc*_*` in dilated.cu and `fwd_wg_*` /
        // `fwd_ws*_*` in hopper.cu (Params, q, k, v, mask, out, lse; `fwd_wspt_*` /
        // `fwd_wsot_*` take the tensor maps first, encoded over k and v, which stay alive
        // and are passed too); q/out hold
        // B·N·H·D elements, k/v B·N·Hkv·D, lse B·N·H, mask B·N bytes when has_mask (checked
        // above); the Hopper kernels are chosen only where the module was compiled for
        // sm_90a (`is_hopper`); the grid (or, persistent, the item loop over `p.tiles` ×
        // heads × batches) covers every tile of every (head, batch) and each tile writes its
        // own rows only.
        unsafe { b.launch(cfg) }.map_err(dev_err(&l.name))?;
    } else {
        let name = format!("fwd_generic_{}", E::NAME);
        let (f, cfg) = kernel(dev, &name, pr, (GENERIC_ROWS, dm.heads, THREADS), None)?;
        let mut dummy_f = dev.zeros::<f32>(1)?;
        let zero = 0i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(&mut out)
            .arg(&mut lse)
            .arg(q)
            .arg(&mut dummy_f)
            .arg(&zero);
        // SAFETY: argument order and types match `fwd_generic_*` (Params, q, k, v, mask,
        // out, lse, dout, delta, delta_mode); with delta_mode = 0 dout/delta are not
        // touched. Buffer lengths as checked above; each tile writes its own rows.
        unsafe { b.launch(cfg) }.map_err(dev_err(&name))?;
    }
    Ok(CudaForward { out, lse })
}

/// Backward on the GPU from the saved `out` and `L` of [`try_forward`]: `dq`, `dk`, `dv`.
#[allow(clippy::too_many_arguments)]
pub fn try_backward<E: CudaElement>(
    dev: &Cuda,
    plan: &Plan,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
    out: &CudaSlice<E>,
    lse: &CudaSlice<f32>,
    grad_out: &CudaSlice<E>,
) -> Result<CudaGrads<E>> {
    check_inputs(plan, q, k, v, mask)?;
    let dm = *plan.dims();
    check_len("out", dm.q_len(), out.len())?;
    check_len("lse", dm.lse_len(), lse.len())?;
    check_len("grad_out", dm.q_len(), grad_out.len())?;
    let detach = plan.options().detach_weights && plan.options().combine == Combine::Lse;
    let stride = if detach { dm.lse_len() } else { 0 };
    let pr = Prob::of_plan(plan, stride, mask.is_some())?;
    backward_launch(dev, &pr, detach, q, k, v, mask, out, lse, grad_out)
}

/// The backward kernels of one problem (buffer lengths already checked against
/// `pr.dims`). `detach`: per-pattern Δ (`detach_weights`, `pr` built with its stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_launch<E: CudaElement>(
    dev: &Cuda,
    pr: &Prob,
    detach: bool,
    q: &CudaSlice<E>,
    k: &CudaSlice<E>,
    v: &CudaSlice<E>,
    mask: Option<&CudaSlice<u8>>,
    out: &CudaSlice<E>,
    lse: &CudaSlice<f32>,
    grad_out: &CudaSlice<E>,
) -> Result<CudaGrads<E>> {
    let dm = pr.dims;
    let p = pr.p;
    let nd = if detach {
        dm.lse_len() * pr.npat
    } else {
        dm.lse_len()
    };
    let dummy = dev.zeros::<u8>(1)?;
    let mask = mask.unwrap_or(&dummy);
    let mut delta = dev
        .stream()
        .alloc_zeros::<f32>(nd)
        .map_err(dev_err("device allocation"))?;
    if detach {
        // Δ_i = dO · out_i per pattern: the forward kernel in delta mode.
        let name = format!("fwd_generic_{}", E::NAME);
        let (f, cfg) = kernel(dev, &name, pr, (GENERIC_ROWS, dm.heads, THREADS), None)?;
        let mut dummy_o = dev.output::<E>(1)?;
        let mut dummy_l = dev.zeros::<f32>(1)?;
        let one = 1i32;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(&mut dummy_o)
            .arg(&mut dummy_l)
            .arg(grad_out)
            .arg(&mut delta)
            .arg(&one);
        // SAFETY: order and types match `fwd_generic_*`; with delta_mode = 1 out/lse are
        // not touched and delta (G·B·N·H floats, stride B·N·H) gets one entry per
        // (pattern, participating row) of this tile.
        unsafe { b.launch(cfg) }.map_err(dev_err(&name))?;
    } else {
        let name = format!("delta_dot_{}", E::NAME);
        let f = function(dev, &name)?;
        let rows = dm.lse_len();
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p).arg(out).arg(grad_out).arg(&mut delta);
        // SAFETY: order and types match `delta_dot_*` (Params, out, dout, delta); one warp
        // per (b, p, h) row, rows = B·N·H = delta.len(), out/dout hold rows·D elements.
        unsafe { b.launch(cfg) }.map_err(dev_err(&name))?;
    }
    let mut dq = dev.output::<E>(dm.q_len())?;
    let mut dk = dev.output::<E>(dm.kv_len())?;
    let mut dv = dev.output::<E>(dm.kv_len())?;
    let d = dm.head_dim;
    let e = E::NAME;
    let wg = wgmma::<E>(dev, d);
    // Hopper, fused (hopper_backward says which kernel): dK/dV and dQ (into an f32 buffer)
    // in one pass, then dq = scale·acc.
    // Q and dO fit the box-load maps (bwd_wgt3, bwd_wgt2wp).
    let loadable = loads_fit(
        pr,
        std::mem::size_of::<E>(),
        q.device_ptr(dev.stream()).0,
        grad_out.device_ptr(dev.stream()).0,
    );
    let choice = if wg {
        hopper_backward(
            BwdFlags {
                fused: dev.fused_dq(),
                pingpong: dev.bwd_pingpong(),
                tma: dev.fused_dq_tma(),
                split: dev.fused_dq_tma_split(),
                loads: dev.fused_tma_loads(),
            },
            pr.whole_device,
            dq_rows_are_boxes(pr),
            loadable,
        )
    } else {
        HopperBwd::TwoPass
    };
    if choice != HopperBwd::TwoPass {
        let mut dqacc = dev
            .stream()
            .alloc_zeros::<f32>(dm.q_len())
            .map_err(dev_err("device allocation"))?;
        // bwd_wgt2 with 80-row query tiles (D = 128: bwd_wgt2w), with a producer warpgroup
        // where set (the default since stop 33) and Q, dO fit its maps (bwd_wgt2wp; since stop
        // 34 with its metadata split into arrays: bwd_wgt2ws, non-causal bwd_wgt2wsn).
        let wide = choice == HopperBwd::Wgt2 && d == 128 && dev.bwd_wide_tiles();
        let producer = wide && dev.bwd_producer() && loadable;
        let maps = if matches!(choice, HopperBwd::Wgt | HopperBwd::Wgt2) && !producer {
            let (ptr, _sync) = dqacc.device_ptr(dev.stream());
            let rows = if wide { WG_BS_WIDE } else { WG_BS };
            Some(dq_tensor_maps(pr, ptr, rows as u32)?)
        } else {
            None
        };
        let lmaps = if choice == HopperBwd::Wgt3 || producer {
            let (ptr, _sync) = dqacc.device_ptr(dev.stream());
            let (qp, _sq) = q.device_ptr(dev.stream());
            let (op, _so) = grad_out.device_ptr(dev.stream());
            let rows = if producer { WG_BS_WIDE } else { WG_BS };
            Some(load_tensor_maps(pr, E::NAME, ptr, qp, op, rows as u32)?)
        } else {
            None
        };
        let (kind, smem) = match choice {
            HopperBwd::Wgt3 => ("wgt3", wg_fused_tma2_smem(d)),
            HopperBwd::Wgt2 if producer && dev.bwd_split_meta() => {
                let nc = p.causal == 0 && dev.bwd_noncausal_kernel();
                (if nc { "wgt2wsn" } else { "wgt2ws" }, wg_fused_wide_smem())
            }
            HopperBwd::Wgt2 if producer => ("wgt2wp", wg_fused_wide_smem()),
            HopperBwd::Wgt2 if wide => ("wgt2w", wg_fused_wide_smem()),
            HopperBwd::Wgt2 => ("wgt2", wg_fused_tma2_smem(d)),
            HopperBwd::Wgt => ("wgt", wg_fused_tma_smem(d)),
            HopperBwd::Wgp => ("wgp", wg_fused_pp_smem(d)),
            _ => ("wg", wg_fused_smem(d)),
        };
        let name = format!("bwd_{kind}_{}_{d}", E::NAME);
        let threads = if producer { 384 } else { 256 };
        let (f, cfg) = kernel(dev, &name, pr, (128, dm.kv_heads, threads), Some(smem))?;
        let mut b = dev.stream().launch_builder(&f);
        if let Some(m) = maps.as_ref() {
            b.arg(m);
        }
        if let Some(m) = lmaps.as_ref() {
            b.arg(m);
        }
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(lse)
            .arg(grad_out)
            .arg(&delta)
            .arg(&mut dk)
            .arg(&mut dv)
            .arg(&mut dqacc);
        // SAFETY: order and types match `bwd_wg_*` / `bwd_wgp_*` (as `dkdv_wg_*`, plus
        // dqacc: B·N·H·D f32, zeroed) and `bwd_wgt_*` / `bwd_wgt2_*` / `bwd_wgt3_*` /
        // `bwd_wgt2wp_*` / `bwd_wgt2ws_*` / `bwd_wgt2wsn_*` (the tensor maps first, encoded over dqacc and, for bwd_wgt3 and
        // bwd_wgt2wp, over q and grad_out with boxes of their query tile's rows, all
        // of which stay alive and are passed too); each tile writes its own dk/dv rows;
        // dqacc only receives atomic adds (reduce-adds through the maps).
        unsafe { b.launch(cfg) }.map_err(dev_err(&name))?;
        dev.note_fused_backward(&name);
        let name = format!("dq_convert_{}", E::NAME);
        let f = function(dev, &name)?;
        let n = dm.q_len() as i64;
        let cfg = LaunchConfig {
            grid_dim: ((n as u64).div_ceil(512).clamp(1, 8192) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p).arg(&dqacc).arg(&mut dq).arg(&n);
        // SAFETY: order and types match `dq_convert_*` (Params, acc, dq, n); acc and dq hold
        // n = B·N·H·D elements (n even: D is 64 or 128); grid-stride loop.
        unsafe { b.launch(cfg) }.map_err(dev_err(&name))?;
        return Ok(CudaGrads { dq, dk, dv });
    }
    // This backward is not fused: the dQ and dK/dV kernels, Hopper (`wgmma`; one CTA barrier
    // per tile, or ping-pong between the warpgroups), mma.sync (variants chosen on the
    // device), or generic.
    dev.note_fused_backward("");
    let tc = tensor_cores::<E>(dev, d);
    // mma.sync streamed tiles of BS rows (64 for D = 64, 32 for D = 128); shared memory =
    // owner tiles + 3 stages x 2 streamed tiles, rows padded by 8 elements, + per-row
    // metadata (up to 4 words x 3 stages).
    let bs = if d == 64 { 64 } else { 32 };
    let (dq_l, kv_l) = if wg {
        let ping = dev.bwd_pingpong();
        let pp = if ping { "wg" } else { "wgs" };
        let l = |name: String| Launch {
            name,
            rows: 128,
            threads: 256,
            smem: Some(wg_bwd_smem(d)),
            persistent: false,
        };
        // Ping-pong: the dQ pass with register A operands (dq_wgr) unless turned off, both
        // passes with deferred MMA waits (dq_wgrd, dkdv_wgd) when asked for.
        let defer = ping && dev.bwd_deferred_waits();
        let dq = match (ping && dev.bwd_reg_operands(), defer) {
            (true, true) => "wgrd",
            (true, false) => "wgr",
            (false, _) => pp,
        };
        let kv = if defer { "wgd" } else { pp };
        (
            l(format!("dq_{dq}_{e}_{d}")),
            l(format!("dkdv_{kv}_{e}_{d}")),
        )
    } else if tc {
        let qwarps = dev.dq_warps() as usize;
        let dq_l = Launch {
            name: if qwarps == 8 {
                format!("dq_tc8_{e}_{d}")
            } else {
                format!("dq_tc_{e}_{d}")
            },
            rows: 16 * qwarps,
            threads: 32 * qwarps as u32,
            smem: Some(bwd_tc_smem(16 * qwarps, bs, d)),
            persistent: false,
        };
        // (name prefix, owner rows, warps, streamed rows).
        let (prefix, krows, warps, kbs) = match dev.bwd_variant() {
            1 => ("dkdv_tc64", TC_ROWS, 4, 64),
            2 => ("dkdv_tc8", 2 * TC_ROWS, 8, bs),
            _ => ("dkdv_tc", TC_ROWS, 4, bs),
        };
        let kv_l = Launch {
            name: format!("{prefix}_{e}_{d}"),
            rows: krows,
            threads: 32 * warps,
            smem: Some(bwd_tc_smem(krows, kbs, d)),
            persistent: false,
        };
        (dq_l, kv_l)
    } else {
        let l = |name: String| Launch {
            name,
            rows: GENERIC_ROWS,
            threads: THREADS,
            smem: None,
            persistent: false,
        };
        (l(format!("dq_generic_{e}")), l(format!("dkdv_generic_{e}")))
    };
    {
        let (f, cfg) = kernel(
            dev,
            &dq_l.name,
            pr,
            (dq_l.rows, dm.heads, dq_l.threads),
            dq_l.smem,
        )?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(lse)
            .arg(grad_out)
            .arg(&delta)
            .arg(&mut dq);
        // SAFETY: order and types match every `dq_*` kernel (Params, q, k, v, mask, lse,
        // dout, delta, dq); lengths checked above; the Hopper kernels are chosen only where
        // the module was compiled for sm_90a; the grid covers every query tile and each tile
        // writes its own dq rows only; dynamic shared memory as computed.
        unsafe { b.launch(cfg) }.map_err(dev_err(&dq_l.name))?;
    }
    {
        let (f, cfg) = kernel(
            dev,
            &kv_l.name,
            pr,
            (kv_l.rows, dm.kv_heads, kv_l.threads),
            kv_l.smem,
        )?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&p)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(mask)
            .arg(lse)
            .arg(grad_out)
            .arg(&delta)
            .arg(&mut dk)
            .arg(&mut dv);
        // SAFETY: order and types match every `dkdv_*` kernel (Params, q, k, v, mask, lse,
        // dout, delta, dk, dv); the grid is (tiles, Hkv, B) and each tile writes the dk/dv
        // rows of its own key positions only.
        unsafe { b.launch(cfg) }.map_err(dev_err(&kv_l.name))?;
    }
    Ok(CudaGrads { dq, dk, dv })
}

impl crate::ops::dilated::DilatedKernel<f32> for Cuda {
    fn forward(
        &self,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[bool]>,
        out: &mut [f32],
        lse: &mut [f32],
    ) -> Result<()> {
        plan.check_inputs(q.len(), k.len(), v.len(), mask.map(<[bool]>::len))?;
        check_len("out", plan.dims().q_len(), out.len())?;
        check_len("lse", plan.dims().lse_len(), lse.len())?;
        let (qd, kd, vd) = (self.htod(q)?, self.htod(k)?, self.htod(v)?);
        let md = mask_to_device(self, mask)?;
        let f = try_forward(self, plan, &qd, &kd, &vd, md.as_ref())?;
        out.copy_from_slice(&self.dtoh(&f.out)?);
        lse.copy_from_slice(&self.dtoh(&f.lse)?);
        Ok(())
    }

    fn backward(
        &self,
        plan: &Plan,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<&[bool]>,
        out: &[f32],
        lse: &[f32],
        grad_out: &[f32],
        grads: &mut crate::ops::dilated::Grads<f32>,
    ) -> Result<()> {
        let dm = plan.dims();
        check_len("dq", dm.q_len(), grads.dq.len())?;
        check_len("dk", dm.kv_len(), grads.dk.len())?;
        check_len("dv", dm.kv_len(), grads.dv.len())?;
        let (qd, kd, vd) = (self.htod(q)?, self.htod(k)?, self.htod(v)?);
        let (od, ld, gd) = (self.htod(out)?, self.htod(lse)?, self.htod(grad_out)?);
        let md = mask_to_device(self, mask)?;
        let g = try_backward(self, plan, &qd, &kd, &vd, md.as_ref(), &od, &ld, &gd)?;
        grads.dq.copy_from_slice(&self.dtoh(&g.dq)?);
        grads.dk.copy_from_slice(&self.dtoh(&g.dk)?);
        grads.dv.copy_from_slice(&self.dtoh(&g.dv)?);
        Ok(())
    }
}

/// Copy a host key padding mask `(B, N)` to the device as bytes.
pub fn mask_to_device(dev: &Cuda, mask: Option<&[bool]>) -> Result<Option<CudaSlice<u8>>> {
    mask.map(|m| dev.htod(&m.iter().map(|&x| u8::from(x)).collect::<Vec<_>>()))
        .transpose()
}

/// Dynamic shared memory of the tensor-core backward kernels (dQ and dK/dV share the
/// layout, see `dilated.cu`): two owned tiles of `owned_rows` and two triple-buffered
/// streamed tiles of `streamed_rows` 16-bit rows of `d + 8` elements, plus four
/// triple-buffered 4-byte vectors per streamed row (`L`, `Δ`, positions, mask).
fn bwd_tc_smem(owned_rows: usize, streamed_rows: usize, d: usize) -> u32 {
    (((2 * owned_rows + 6 * streamed_rows) * (d + 8)) * 2 + 12 * streamed_rows * 4) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cache_key() {
        // No parts: the offset basis. FNV-1a 64 of "a" is the published 0xaf63dc4c8601ec8c;
        // with our zero separator after it one more round: 0x089be207b544f1e4.
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0x089b_e207_b544_f1e4);
        assert_ne!(
            fnv1a(&[b"ab", b""]),
            fnv1a(&[b"a", b"b"]),
            "parts are separated"
        );
        let src = kernel_source();
        let n = cache_name(&src, "sm_90a", (13, 0));
        assert!(n.starts_with("sm_90a-") && n.ends_with(".cubin"), "{n}");
        assert_eq!(n, cache_name(&src, "sm_90a", (13, 0)), "deterministic");
        assert_ne!(n, cache_name(&src, "sm_80", (13, 0)), "target in the key");
        assert_ne!(
            n,
            cache_name(&src, "sm_90a", (13, 1)),
            "NVRTC version in the key"
        );
        let edited = format!("{src}\n// an edit\n");
        assert_ne!(
            n,
            cache_name(&edited, "sm_90a", (13, 0)),
            "source in the key"
        );
        assert_eq!(target_arch(9, 0), "sm_90a");
        assert_eq!(target_arch(8, 9), "sm_89");
    }

    #[test]
    fn cache_file_written_whole() {
        let top = std::env::temp_dir().join(format!("dilated-kc-{}", std::process::id()));
        let dir = top.join("kernels"); // not there yet: write_atomic creates it
        let path = dir.join("sm_90a-0000000000000000.cubin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap(); // replaces, never appends
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file left behind: {left:?}");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn kernels_include_no_header() {
        // The include paths are left out of the cache key because no header is read.
        assert!(
            !kernel_source().contains("#include"),
            "a kernel source includes a header: put the include paths into cache_name"
        );
    }

    /// Opt-in dynamic shared memory per block on compute capability 9.0 (227 KiB).
    const SM90_SMEM: u32 = 232_448;
    /// ... and on 8.0 (163 KiB), where the mma.sync kernels run.
    const SM80_SMEM: u32 = 166_912;

    #[test]
    fn hopper_kernels_fit_in_shared_memory() {
        for d in [64, 128] {
            for (name, bytes) in [
                ("fwd_wg", wg_smem(d)),
                ("fwd_ws/fwd_wso/fwd_wsp", ws_smem(d, false, false)),
                ("fwd_wsow/fwd_wspw", ws_smem(d, true, false)),
                ("fwd_wspq", ws_smem(d, false, true)),
                ("fwd_wspi", wspi_smem(d)),
                ("dq_wg/dkdv_wg", wg_bwd_smem(d)),
                ("bwd_wg", wg_fused_smem(d)),
                ("bwd_wgp", wg_fused_pp_smem(d)),
                ("bwd_wgt", wg_fused_tma_smem(d)),
                ("bwd_wgt2", wg_fused_tma2_smem(d)),
            ] {
                assert!(bytes <= SM90_SMEM, "{name} D={d}: {bytes} B");
            }
        }
        // fwd_wspi (D = 128): 224 KiB of tiles, 1 KiB of key metadata (two K stages), 14
        // mbarriers.
        assert_eq!(wspi_smem(128), 1024 + 229_376 + 1_024 + 112);
        // bwd_wgt2w (D = 128): 416 bytes to spare, hence no alignment slack (hopper.cu).
        assert_eq!(wg_fused_wide_smem(), 232_032);
        assert!(wg_fused_wide_smem() <= SM90_SMEM);
        // The warp-specialised forward at D = 128 is the tightest: three stages of 64 KiB
        // plus the Q tile leave under 1 KiB.
        assert!(SM90_SMEM - ws_smem(128, false, false) < 1024);
        // Two Q tiles and two stages: 32 KiB less than three stages and one Q tile.
        assert_eq!(
            ws_smem(128, false, false) - ws_smem(128, false, true),
            32 * 1024 + 128 * 4
        );
    }

    /// The whole-plan launch problem of `dims` and the (segment, dilation) pairs `pats`.
    fn prob_of(dims: Dims, pats: &[(usize, usize)]) -> Prob {
        let schedule: Vec<crate::shape::Pattern> = pats
            .iter()
            .map(|&(w, r)| crate::shape::Pattern::new(w, r))
            .collect();
        let plan = Plan::new(dims, &schedule, crate::shape::Options::default()).unwrap();
        Prob::of_plan(&plan, 0, false).unwrap()
    }

    #[test]
    fn tma_dq_only_where_dilated_rows_are_boxes() {
        let prob = |seq: usize, pats: &[(usize, usize)]| prob_of(Dims::mha(1, seq, 4, 64), pats);
        assert!(dq_rows_are_boxes(&prob(96, &[(32, 1), (96, 3)])));
        assert!(dq_rows_are_boxes(&prob(1024, &[(64, 1), (512, 8)])));
        // A dilation that divides neither the length nor its segment: the two passes instead.
        assert!(!dq_rows_are_boxes(&prob(100, &[(50, 1), (100, 3)])));
    }

    #[test]
    fn fused_backward_by_default_on_whole_plans_only() {
        let on = BwdFlags {
            fused: true,
            pingpong: true,
            tma: true,
            split: true,
            loads: true,
        };
        // With the box loads asked for: bwd_wgt3 on a whole plan whose rows are boxes and
        // whose Q, dO its maps take; bwd_wgt2 where they do not (too many patterns,
        // misaligned).
        assert_eq!(hopper_backward(on, true, true, true), HopperBwd::Wgt3);
        assert_eq!(hopper_backward(on, true, true, false), HopperBwd::Wgt2);
        // The ring's launch problems, rows that are no boxes, fused off: the two passes.
        assert_eq!(hopper_backward(on, false, true, true), HopperBwd::TwoPass);
        assert_eq!(hopper_backward(on, true, false, true), HopperBwd::TwoPass);
        let off = BwdFlags { fused: false, ..on };
        assert_eq!(hopper_backward(off, true, true, true), HopperBwd::TwoPass);
        // The defaults (loads off): bwd_wgt2. The opt-in fused kernels.
        let cp = BwdFlags { loads: false, ..on };
        assert_eq!(hopper_backward(cp, true, true, true), HopperBwd::Wgt2);
        let one = BwdFlags { split: false, ..on };
        assert_eq!(hopper_backward(one, true, true, true), HopperBwd::Wgt);
        let atomics = BwdFlags { tma: false, ..on };
        assert_eq!(hopper_backward(atomics, true, false, false), HopperBwd::Wgp);
        let lockstep = BwdFlags {
            pingpong: false,
            ..on
        };
        assert_eq!(hopper_backward(lockstep, true, false, false), HopperBwd::Wg);
    }

    /// Every dilated row of every segment, offset, head and batch is where the kernels'
    /// box coordinates say: the load maps' (·, h, o, j, b·N/w + a/w) and the dQ map's
    /// (·, h, o, a/r + j, b) address row a + o + r·j of the (B, N, H, D) tensor; one past a
    /// segment's last row is outside the load maps (zero-filled).
    /// `keyed_items` against a count from SPEC §1's rows: under the head-group combine a
    /// query row at position `p` of a head in pattern i's group takes part iff
    /// `(p mod w) mod r == off` (w the capped segment); a tile (decode_tile's rows) has keys
    /// iff its rows do, and they must agree. Where the numbering does not hold: `None`.
    #[test]
    fn keyed_items_count_the_tiles_with_keys() {
        let hg = crate::shape::Options::default().combine(Combine::HeadGroups);
        let case = |b, n, h, pats: &[(usize, usize)], opts: crate::shape::Options| {
            let schedule: Vec<crate::shape::Pattern> = pats
                .iter()
                .map(|&(w, r)| crate::shape::Pattern::new(w, r))
                .collect();
            let dims = Dims {
                batch: b,
                seq: n,
                heads: h,
                kv_heads: h,
                head_dim: 64,
            };
            let plan = Plan::new(dims, &schedule, opts).unwrap();
            let mut pr = Prob::of_plan(&plan, 0, false).unwrap();
            pr.p.tiles = pr.tiles(128) as i32;
            (plan, pr)
        };
        let longnet = [(2048, 1), (4096, 2), (8192, 4), (16384, 8)];
        for (b, n, h, pats) in [
            (1, 16384, 16, &longnet[..]),
            (1, 65536, 16, &longnet[..]),
            (2, 4096, 4, &[(512, 1), (1024, 2), (2048, 4)][..]),
            (3, 4096, 5, &[(512, 1), (1024, 2), (2048, 4)][..]),
            (1, 1024, 3, &[(256, 2), (1024, 4)][..]),
        ] {
            let (plan, pr) = case(b, n, h, pats, hg);
            let p = &pr.p;
            let (blk, step) = (p.blk as usize, p.step as usize);
            let tpc = blk.div_ceil(step).div_ceil(128);
            let mut want = 0;
            for hh in 0..h {
                let i = (0..plan.num_patterns())
                    .find(|&i| plan.head_group(i).contains(&hh))
                    .unwrap();
                let (w, r) = (plan.patterns()[i].segment, plan.patterns()[i].dilation);
                let off = i % r;
                for x in 0..p.tiles as usize {
                    let (tic, c, bi) = (x % tpc, (x / tpc) % step, x / (tpc * step));
                    let rows: Vec<bool> = (tic * 128..((tic + 1) * 128).min(blk / step))
                        .map(|j| (bi * blk + c + j * step) % w % r == off)
                        .collect();
                    assert!(rows.iter().all(|&t| t == rows[0]), "a tile's rows agree");
                    want += usize::from(rows[0]) * b;
                }
            }
            assert_eq!(keyed_items(p, 128), Some(want as i32), "b={b} n={n} h={h}");
        }
        // 16K: 960 keyed tiles of 2048 (the figure in hopper.cu's comment), dealt keyed
        // first on 132 SMs; 64K's 3840 are not.
        assert!(keyed_first_pays(960, 132) && !keyed_first_pays(3840, 132));
        assert!(!keyed_first_pays(0, 132));
        assert_eq!(
            keyed_items(&case(1, 16384, 16, &longnet, hg).1.p, 128),
            Some(960)
        );
        // Not numbered: causal, the LSE combine, a dilation not dividing the class step.
        assert_eq!(
            keyed_items(&case(1, 16384, 16, &longnet, hg.causal(true)).1.p, 128),
            None
        );
        let lse = crate::shape::Options::default();
        assert_eq!(
            keyed_items(&case(1, 16384, 16, &longnet, lse).1.p, 128),
            None
        );
        assert_eq!(
            keyed_items(&case(1, 96, 2, &[(32, 1), (96, 3)], hg).1.p, 128),
            None
        );
    }

    #[test]
    fn tensor_map_boxes_address_the_dilated_rows() {
        let (bsz, n, h, hkv, d) = (2usize, 96usize, 4usize, 2usize, 64usize);
        let schedule: Vec<crate::shape::Pattern> = [(32, 1), (96, 3), (48, 4), (96, 96)]
            .iter()
            .map(|&(w, r)| crate::shape::Pattern::new(w, r))
            .collect();
        let plan = Plan::new(
            Dims {
                batch: bsz,
                seq: n,
                heads: h,
                kv_heads: hkv,
                head_dim: d,
            },
            &schedule,
            crate::shape::Options::default(),
        )
        .unwrap();
        let pr = Prob::of_plan(&plan, 0, false).unwrap();
        assert!(dq_rows_are_boxes(&pr));
        for (i, pat) in plan.patterns().iter().enumerate() {
            let (w, r) = (pat.segment, pat.dilation);
            let dq = dq_map_geometry(&pr, i, 64);
            for (kv, rows, heads) in [(false, 64, h), (false, 80, h), (true, 128, hkv)] {
                let g = load_map_geometry(&pr, i, kv, rows).unwrap();
                assert_eq!(g.boxes[3], rows);
                for b in 0..bsz {
                    for a in (0..n).step_by(w) {
                        for o in 0..r {
                            let seg = (b * (n / w) + a / w) as u64;
                            for j in 0..w / r {
                                let row = (b * n + a + o + j * r) as u64;
                                for hh in 0..heads {
                                    let want = (row * heads as u64 + hh as u64) * d as u64;
                                    let c = [0, hh as u64, o as u64, j as u64, seg];
                                    assert_eq!(g.offset(c, 2), Some(2 * want), "pattern {i}");
                                    if !kv {
                                        let c =
                                            [0, hh as u64, o as u64, (a / r + j) as u64, b as u64];
                                        assert_eq!(
                                            dq.offset(c, 4),
                                            Some(4 * want),
                                            "dQ, pattern {i}"
                                        );
                                    }
                                }
                            }
                            let past = [0, 0, o as u64, (w / r) as u64, seg];
                            assert_eq!(g.offset(past, 2), None, "past the segment, pattern {i}");
                        }
                    }
                }
            }
        }
        // A dilation that does not divide its segment: no load map.
        let pr = prob_of(Dims::mha(1, 100, 4, 64), &[(50, 1), (100, 3)]);
        assert!(load_map_geometry(&pr, 0, false, 64).is_some());
        assert!(load_map_geometry(&pr, 1, false, 64).is_none());
    }

    #[test]
    fn forward_box_loads_name_their_key_rows() {
        assert_eq!(kv_box_rows("fwd_wspt_bf16_128"), Some(128));
        assert_eq!(kv_box_rows("fwd_wsot_f16_64"), Some(128));
        assert_eq!(kv_box_rows("fwd_wsptn_bf16_128"), Some(128));
        assert_eq!(kv_box_rows("fwd_wspx_bf16_128"), Some(128));
        assert_eq!(kv_box_rows("fwd_wsps_f16_64"), Some(128));
        assert_eq!(kv_box_rows("fwd_wspq_bf16_128"), Some(128));
        assert_eq!(kv_box_rows("fwd_wspi_bf16_128"), Some(128));
        assert_eq!(kv_box_rows("fwd_wspwt_bf16_128"), Some(176));
        assert_eq!(kv_box_rows("fwd_wsowt_f16_128"), Some(176));
        for cp in [
            "fwd_wsp_bf16_128",
            "fwd_wso_bf16_128",
            "fwd_wspw_bf16_128",
            "fwd_wspr_bf16_64",
        ] {
            assert_eq!(kv_box_rows(cp), None, "{cp}");
        }
    }

    #[test]
    fn box_loads_take_aligned_16_bit_rows_of_few_patterns() {
        let prob = |pats: &[(usize, usize)]| prob_of(Dims::mha(1, 1024, 2, 64), pats);
        let few = prob(&[(64, 1), (512, 8)]);
        assert!(loads_fit(&few, 2, 256, 512));
        assert!(!loads_fit(&few, 4, 256, 512)); // f32: no wgmma kernel
        assert!(!loads_fit(&few, 2, 256 + 8, 512)); // misaligned Q
        let many: Vec<(usize, usize)> = (0..9).map(|i| (1024, 1 << (i % 4))).collect();
        assert!(!loads_fit(&prob(&many), 2, 256, 512));
    }

    #[test]
    fn persistent_forward_only_where_it_measured_faster() {
        assert!(persistent_pays(false));
        assert!(!persistent_pays(true));
    }

    #[test]
    fn ring_launch_problems_leave_sms_to_nccl() {
        let plan = Plan::new(
            Dims::mha(1, 256, 4, 64),
            &[
                crate::shape::Pattern::new(128, 1),
                crate::shape::Pattern::new(256, 2),
            ],
            crate::shape::Options::default(),
        )
        .unwrap();
        assert!(Prob::of_plan(&plan, 0, false).unwrap().whole_device);
        assert!(
            !Prob::patterns(&plan, 128, &[0], 1.0, false)
                .unwrap()
                .whole_device
        );
        let block = Prob::dense_block(&plan, Dims::mha(1, 64, 4, 64), true, 1.0, false);
        assert!(!block.unwrap().whole_device);
    }

    #[test]
    fn mma_sync_kernels_fit_in_sm80_shared_memory() {
        for (d, bs) in [(64, 64), (128, 32)] {
            assert!(bwd_tc_smem(2 * TC_ROWS, bs, d) <= SM80_SMEM, "D={d}");
        }
    }
}
