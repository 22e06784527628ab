//! NCCL backend of [`RingComm`] (feature `nccl`): one NCCL communicator per rank, one
//! GPU per rank, packets staged through device buffers and moved with
//! `ncclSend`/`ncclRecv` inside NCCL groups on the rank's own communication stream.
//!
//! Two ways to start:
//! * [`NcclComm::from_devices`]: one process, one thread per GPU — returns `n`
//!   communicators (rank `i` on GPU `i`) to move into `n` threads;
//! * [`NcclComm::from_env`]: one process per GPU, torchrun style — `RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK` (the GPU), `MASTER_ADDR`, `MASTER_PORT`; rank 0's NCCL unique id
//!   reaches the others over [`rendezvous`](super::rendezvous::exchange).
//!
//! CUDA and NCCL are loaded at run time (cudarc's `dynamic-loading`): on a machine
//! without them, construction returns [`Error::Device`], never a panic.
//!
//! Protocol of one exchange (`post`): a 32-byte header `(tag, elements, element size,
//! mask bits)` is swapped with both neighbours first (the receiver learns the size and
//! checks the tag), then the payload (element bytes, then one byte per mask bit) travels
//! in a second group. `post` returns once the headers have crossed (both neighbours have
//! reached the same exchange) with the payload enqueued; `wait` polls the payload's event.
//! Every wait on the GPU is a poll bounded by [`CommConfig::timeout`] that also watches
//! `ncclCommGetAsyncError`; on a timeout or an NCCL error the communicator is aborted
//! (`ncclCommAbort`) and the call returns a fatal [`CommFault`] naming this rank, the peer
//! and the ring step. The communicator is non-blocking (`ncclConfig_t::blocking = 0`), so
//! no NCCL call can block the host past that deadline. Design notes: `src/ring/README.md`,
//! section "NCCL backend".

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys as nsys;

use super::comm::{CommConfig, CommFault, Packet, RingComm, Tag};
use super::rendezvous::{self, RendezvousEnv};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Words of the exchange header: tag code, element count, element size, mask bits.
const HEADER: usize = 4;

/// One point-to-point operation of an NCCL group: a device pointer and a byte count.
#[derive(Debug, Clone, Copy)]
struct P2p {
    send: bool,
    peer: usize,
    ptr: u64,
    bytes: usize,
}

/// One rank of an NCCL ring: an NCCL communicator on one GPU with its own communication
/// stream and a staging stream for host/device copies.
///
/// A communicator belongs to one thread at a time (it is `Send`, not `Sync`). Dropping it
/// aborts the NCCL communicator (`ncclCommAbort`): drop it only after the last exchange.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    cfg: CommConfig,
    comm: nsys::ncclComm_t,
    ctx: Arc<CudaContext>,
    /// NCCL operations only.
    stream: Arc<CudaStream>,
    /// Host/device staging copies only (never waits on `stream`'s NCCL work).
    copy: Arc<CudaStream>,
    /// Why this communicator was aborted, if it was.
    aborted: RefCell<Option<String>>,
    wire: Cell<WireStats>,
}

// SAFETY: the NCCL communicator handle is used by one thread at a time: `NcclComm` is not
// `Sync` (it holds `Cell`/`RefCell`), so moving it to another thread moves every use with
// it. NCCL allows a communicator to be used from any thread as long as calls on it are not
// concurrent; every call binds the CUDA context to the calling thread first.
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .field("cfg", &self.cfg)
            .field("aborted", &self.aborted.borrow().is_some())
            .finish()
    }
}

/// What one communicator moved over NCCL, headers included (for comparing with the
/// payload bytes of [`RingStats`](super::RingStats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Exchanges posted.
    pub exchanges: u64,
    /// Bytes sent, headers included.
    pub bytes_sent: u64,
    /// Bytes received, headers included.
    pub bytes_recv: u64,
    /// Of those, header bytes sent (32 per exchange with a send).
    pub header_bytes_sent: u64,
    /// All-reduces run (health checks, barriers).
    pub all_reduces: u64,
}

/// A posted NCCL exchange: the payload's completion event and its staging buffers.
#[derive(Debug)]
pub struct NcclTicket {
    tag: Tag,
    from: Option<usize>,
    to: Option<usize>,
    /// Completion of the payload group (`None`: nothing to move).
    event: Option<CudaEvent>,
    /// Incoming payload: device buffer (absent for an empty packet), element count,
    /// element size, mask bits.
    recv: Option<(Option<CudaSlice<u8>>, usize, usize, usize)>,
    /// Outgoing payload, kept alive until the transfer completes.
    send: Option<CudaSlice<u8>>,
}

fn dev_err(msg: impl Into<String>) -> Error {
    Error::Device { msg: msg.into() }
}

fn panic_text(e: &(dyn Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".into()
    }
}

/// Run `f`, turning a panic inside cudarc (a library or symbol that cannot be loaded)
/// into `Error::Device`.
fn no_panic<R>(what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(e) => Err(dev_err(format!("{what}: {}", panic_text(&*e)))),
    }
}

/// NCCL symbols this backend calls; all are checked at construction so that a missing
/// one is an `Err` there rather than a panic later.
const SYMBOLS: &[&[u8]] = &[
    b"ncclGetVersion\0",
    b"ncclGetUniqueId\0",
    b"ncclCommInitRankConfig\0",
    b"ncclCommGetAsyncError\0",
    b"ncclCommAbort\0",
    b"ncclGroupStart\0",
    b"ncclGroupEnd\0",
    b"ncclSend\0",
    b"ncclRecv\0",
    b"ncclAllReduce\0",
    b"ncclGetErrorString\0",
    b"ncclGetLastError\0",
];

/// `Ok(version)` if the CUDA driver and NCCL can be loaded and NCCL is 2.18 or newer.
fn probe() -> Result<i32> {
    no_panic("loading CUDA/NCCL", || {
        // SAFETY: `is_culib_present` only tries to open the shared library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(dev_err(
                "the CUDA driver library (libcuda.so) cannot be loaded: no GPU driver on this machine",
            ));
        }
        // SAFETY: as above, for libnccl.so.
        if !unsafe { nsys::is_culib_present() } {
            return Err(dev_err(
                "the NCCL library (libnccl.so) cannot be loaded; put its folder on LD_LIBRARY_PATH (a pip-installed NCCL needs a libnccl.so symlink)",
            ));
        }
        // SAFETY: the library is present (checked above), so `culib` returns it; `get`
        // only looks a symbol up, it calls nothing.
        let lib = unsafe { nsys::culib() };
        for s in SYMBOLS {
            // SAFETY: symbol lookup only; the pointer type is never called through.
            if unsafe { lib.get::<unsafe extern "C" fn()>(*s) }.is_err() {
                let name = String::from_utf8_lossy(&s[..s.len() - 1]).into_owned();
                return Err(dev_err(format!("libnccl.so has no symbol {name}")));
            }
        }
        let mut v: std::ffi::c_int = 0;
        // SAFETY: `v` is a valid out-pointer.
        let r = unsafe { nsys::ncclGetVersion(&mut v) };
        if r != nsys::ncclResult_t::ncclSuccess {
            return Err(dev_err(format!("ncclGetVersion failed: {r:?}")));
        }
        if v < 21800 {
            return Err(dev_err(format!(
                "NCCL {v} is too old: the NCCL backend needs 2.18 or newer"
            )));
        }
        Ok(v)
    })
}

fn nccl_text(r: nsys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result.
    let p = unsafe { nsys::ncclGetErrorString(r) };
    if p.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated, static (NCCL's own table).
    let s = unsafe { std::ffi::CStr::from_ptr(p) };
    format!("{r:?} ({})", s.to_string_lossy())
}

/// A non-blocking communicator configuration (NCCL_CONFIG_INITIALIZER with
/// `blocking = 0`).
fn config() -> nsys::ncclConfig_t {
    const UNDEF: std::ffi::c_int = std::ffi::c_int::MIN;
    nsys::ncclConfig_t {
        size: std::mem::size_of::<nsys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22800,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

/// Sleep a little longer the longer a poll lasts (spin first: exchanges are short).
fn backoff(i: u32) {
    if i < 64 {
        std::hint::spin_loop();
    } else if i < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(if i < 2048 { 20 } else { 200 }));
    }
}

/// Element bytes of a packet (`f32`/`f64`, native order) followed by one byte per bit.
fn encode<T: Element>(p: &Packet<T>) -> std::result::Result<Vec<u8>, String> {
    let es = std::mem::size_of::<T>();
    let mut out = Vec::with_capacity(p.data.len() * es + p.bits.len());
    match es {
        4 => p
            .data
            .iter()
            .for_each(|x| out.extend_from_slice(&(x.f64() as f32).to_ne_bytes())),
        8 => p
            .data
            .iter()
            .for_each(|x| out.extend_from_slice(&x.f64().to_ne_bytes())),
        _ => return Err(format!("element type {} is not f32 or f64", T::NAME)),
    }
    out.extend(p.bits.iter().map(|&b| b as u8));
    Ok(out)
}

fn decode<T: Element>(bytes: &[u8], elems: usize, bits: usize) -> Packet<T> {
    let es = std::mem::size_of::<T>();
    let (d, m) = bytes.split_at(elems * es);
    let data = match es {
        4 => d
            .chunks_exact(4)
            .map(|c| T::of(f32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as f64))
            .collect(),
        _ => d
            .chunks_exact(8)
            .map(|c| {
                T::of(f64::from_ne_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]))
            })
            .collect(),
    };
    debug_assert_eq!(m.len(), bits);
    Packet {
        data,
        bits: m.iter().map(|&b| b != 0).collect(),
    }
}

impl NcclComm {
    /// The NCCL version the loaded library reports (e.g. `22803` for 2.28.3), or `Err`
    /// if CUDA or NCCL cannot be loaded.
    pub fn nccl_version() -> Result<i32> {
        probe()
    }

    /// Number of visible GPUs, or `Err` if the CUDA driver cannot be loaded.
    pub fn device_count() -> Result<usize> {
        no_panic("counting GPUs", || {
            // SAFETY: opening the library by name only.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(dev_err(
                    "the CUDA driver library (libcuda.so) cannot be loaded",
                ));
            }
            CudaContext::device_count()
                .map(|n| n.max(0) as usize)
                .map_err(|e| dev_err(format!("cuDeviceGetCount: {e:?}")))
        })
    }

    /// One process, one thread per GPU: `n` communicators, rank `i` on GPU `i`, to be
    /// moved into `n` threads. `Err` if CUDA/NCCL is missing, fewer than `n` GPUs are
    /// visible, or initialisation does not finish within `cfg.timeout`.
    pub fn from_devices(n: usize, cfg: CommConfig) -> Result<Vec<NcclComm>> {
        if n == 0 {
            return Err(Error::Ring {
                msg: "NCCL world size must be >= 1".into(),
            });
        }
        probe()?;
        let have = Self::device_count()?;
        if have < n {
            return Err(dev_err(format!("{n} GPUs asked for, {have} visible")));
        }
        let id = no_panic("ncclGetUniqueId", nccl_unique_id)?;
        let res: Vec<Result<NcclComm>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| s.spawn(move || NcclComm::init(r, n, r, id, cfg)))
                .collect();
            hs.into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join().unwrap_or_else(|e| {
                        Err(dev_err(format!(
                            "rank {r} init panicked: {}",
                            panic_text(&*e)
                        )))
                    })
                })
                .collect()
        });
        res.into_iter().collect()
    }

    /// One process per GPU, from the torchrun-style environment (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): the GPU is `LOCAL_RANK`; rank 0's
    /// NCCL id reaches the other ranks over TCP. Rendezvous and initialisation each
    /// finish within `cfg.timeout` or return `Err`.
    pub fn from_env(cfg: CommConfig) -> Result<NcclComm> {
        let env = RendezvousEnv::from_env()?;
        Self::from_rendezvous(&env, cfg)
    }

    /// As [`from_env`](Self::from_env), from an explicit environment.
    pub fn from_rendezvous(env: &RendezvousEnv, cfg: CommConfig) -> Result<NcclComm> {
        probe()?;
        let have = Self::device_count()?;
        if env.local_rank >= have {
            return Err(dev_err(format!(
                "rank {}: LOCAL_RANK={} but only {have} GPUs are visible",
                env.rank, env.local_rank
            )));
        }
        let blob = if env.rank == 0 {
            let id = no_panic("ncclGetUniqueId", nccl_unique_id)?;
            Some(id.internal.iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        let got = rendezvous::exchange(env, blob.as_deref(), cfg.timeout)?;
        if got.len() != 128 {
            return Err(dev_err(format!(
                "rank {}: the NCCL id from rank 0 has {} bytes, expected 128",
                env.rank,
                got.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&got) {
            *d = *s as std::ffi::c_char;
        }
        let id = nsys::ncclUniqueId { internal };
        Self::init(env.rank, env.world_size, env.local_rank, id, cfg)
    }

    fn init(
        rank: usize,
        world: usize,
        device: usize,
        id: nsys::ncclUniqueId,
        cfg: CommConfig,
    ) -> Result<NcclComm> {
        no_panic("NCCL communicator init", || {
            let ctx = CudaContext::new(device)
                .map_err(|e| dev_err(format!("rank {rank}: GPU {device}: {e:?}")))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| dev_err(format!("rank {rank}: new stream: {e:?}")))?;
            let copy = ctx
                .new_stream()
                .map_err(|e| dev_err(format!("rank {rank}: new stream: {e:?}")))?;
            ctx.bind_to_thread()
                .map_err(|e| dev_err(format!("rank {rank}: bind context: {e:?}")))?;
            let mut conf = config();
            let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` and `conf` are valid for the call; `id` came from
            // ncclGetUniqueId on rank 0; rank < world (checked by the callers).
            let r = unsafe {
                nsys::ncclCommInitRankConfig(
                    &mut comm,
                    world as std::ffi::c_int,
                    id,
                    rank as std::ffi::c_int,
                    &mut conf,
                )
            };
            if r != nsys::ncclResult_t::ncclSuccess && r != nsys::ncclResult_t::ncclInProgress {
                return Err(dev_err(format!(
                    "rank {rank}: ncclCommInitRankConfig: {}",
                    nccl_text(r)
                )));
            }
            let me = NcclComm {
                rank,
                world,
                device,
                cfg,
                comm,
                ctx,
                stream,
                copy,
                aborted: RefCell::new(None),
                wire: Cell::new(WireStats::default()),
            };
            me.settle(None, "communicator initialisation")
                .map_err(|f| dev_err(format!("rank {rank}: {}", f.msg)))?;
            Ok(me)
        })
    }

    /// The GPU this rank runs on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// What this communicator has moved so far.
    pub fn wire_stats(&self) -> WireStats {
        self.wire.get()
    }

    fn add_wire(&self, f: impl FnOnce(&mut WireStats)) {
        let mut w = self.wire.get();
        f(&mut w);
        self.wire.set(w);
    }

    fn alive(&self, peer: Option<usize>) -> std::result::Result<(), CommFault> {
        match &*self.aborted.borrow() {
            Some(why) => Err(CommFault::fatal(
                peer,
                format!(
                    "rank {}: the NCCL communicator was aborted earlier ({why})",
                    self.rank
                ),
            )),
            None => Ok(()),
        }
    }

    /// `ncclCommAbort` once; later calls fail fast with `why`.
    fn kill(&self, why: &str) {
        if self.aborted.borrow().is_some() {
            return;
        }
        *self.aborted.borrow_mut() = Some(why.to_string());
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `self.comm` is a live communicator (not yet aborted: checked above).
        // After this call it is never used again (every path checks `aborted`).
        let _ = unsafe { nsys::ncclCommAbort(self.comm) };
    }

    /// Abort and build the fault.
    fn fail(&self, peer: Option<usize>, msg: String) -> CommFault {
        self.kill(&msg);
        CommFault::fatal(peer, format!("{msg}; NCCL communicator aborted"))
    }

    /// `Ok(true)` while NCCL work issued on a non-blocking communicator is still being
    /// set up, `Ok(false)` when done, `Err` on an asynchronous NCCL error.
    fn async_state(&self) -> std::result::Result<bool, String> {
        let mut st = nsys::ncclResult_t::ncclSuccess;
        // SAFETY: live communicator (callers check `alive`), valid out-pointer.
        let r = unsafe { nsys::ncclCommGetAsyncError(self.comm, &mut st) };
        if r != nsys::ncclResult_t::ncclSuccess {
            return Err(format!("ncclCommGetAsyncError: {}", nccl_text(r)));
        }
        match st {
            nsys::ncclResult_t::ncclSuccess => Ok(false),
            nsys::ncclResult_t::ncclInProgress => Ok(true),
            e => {
                // SAFETY: live communicator; the returned string is NCCL's, valid until
                // the next NCCL call on this thread; copied at once.
                let last = unsafe { nsys::ncclGetLastError(self.comm) };
                let last = if last.is_null() {
                    String::new()
                } else {
                    // SAFETY: non-null, NUL-terminated.
                    unsafe { std::ffi::CStr::from_ptr(last) }
                        .to_string_lossy()
                        .into_owned()
                };
                Err(format!("NCCL asynchronous error {}: {last}", nccl_text(e)))
            }
        }
    }

    /// Poll until `done()` within the timeout, watching NCCL's asynchronous error.
    fn poll(
        &self,
        peer: Option<usize>,
        what: &str,
        mut done: impl FnMut() -> std::result::Result<bool, String>,
    ) -> std::result::Result<(), CommFault> {
        let t0 = Instant::now();
        let mut i = 0u32;
        loop {
            if let Err(e) = self.async_state() {
                return Err(self.fail(peer, format!("rank {}: {what}: {e}", self.rank)));
            }
            match done() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(peer, format!("rank {}: {what}: {e}", self.rank))),
            }
            if t0.elapsed() >= self.cfg.timeout {
                let who = match peer {
                    Some(p) => format!("rank {p} stalled or dead"),
                    None => "a peer stalled or dead".into(),
                };
                return Err(self.fail(
                    peer,
                    format!(
                        "rank {}: {what} did not finish within {:?} ({who})",
                        self.rank, self.cfg.timeout
                    ),
                ));
            }
            backoff(i);
            i = i.saturating_add(1);
        }
    }

    /// Wait until a non-blocking NCCL call has finished its host-side work.
    /// (A non-blocking communicator accepts no new call until its state is
    /// `ncclSuccess` again.)
    fn settle(&self, peer: Option<usize>, what: &str) -> std::result::Result<(), CommFault> {
        self.poll(peer, what, || self.async_state().map(|busy| !busy))
    }

    /// Check an NCCL return code; `ncclInProgress` is settled within the timeout.
    fn check(
        &self,
        r: nsys::ncclResult_t,
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<(), CommFault> {
        match r {
            nsys::ncclResult_t::ncclSuccess => Ok(()),
            nsys::ncclResult_t::ncclInProgress => self.settle(peer, what),
            e => Err(self.fail(
                peer,
                format!("rank {}: {what}: {}", self.rank, nccl_text(e)),
            )),
        }
    }

    fn cuda<R>(
        &self,
        r: std::result::Result<R, cudarc::driver::DriverError>,
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<R, CommFault> {
        r.map_err(|e| self.fail(peer, format!("rank {}: CUDA {what}: {e:?}", self.rank)))
    }

    /// A device buffer holding `bytes`, written and made visible before return.
    fn upload(
        &self,
        bytes: &[u8],
        peer: Option<usize>,
    ) -> std::result::Result<CudaSlice<u8>, CommFault> {
        let d = self.cuda(self.copy.clone_htod(bytes), peer, "host-to-device copy")?;
        self.cuda(self.copy.synchronize(), peer, "staging copy")?;
        Ok(d)
    }

    /// A zeroed device buffer of `n` bytes, allocated before return.
    fn buffer(
        &self,
        n: usize,
        peer: Option<usize>,
    ) -> std::result::Result<CudaSlice<u8>, CommFault> {
        let d = self.cuda(self.copy.alloc_zeros::<u8>(n), peer, "allocation")?;
        self.cuda(self.copy.synchronize(), peer, "staging copy")?;
        Ok(d)
    }

    /// Copy a device buffer whose producer has completed back to the host.
    fn download(
        &self,
        d: &CudaSlice<u8>,
        peer: Option<usize>,
    ) -> std::result::Result<Vec<u8>, CommFault> {
        let mut h = vec![0u8; d.len()];
        self.cuda(
            self.copy.memcpy_dtoh(d, &mut h),
            peer,
            "device-to-host copy",
        )?;
        self.cuda(self.copy.synchronize(), peer, "staging copy")?;
        Ok(h)
    }

    /// One NCCL group: send `send` to `to`, receive into `recv` from `from`, on the
    /// communication stream; returns the completion event.
    fn group(
        &self,
        to: Option<(usize, &CudaSlice<u8>)>,
        from: Option<(usize, &mut CudaSlice<u8>)>,
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<CudaEvent, CommFault> {
        let mut ops = Vec::new();
        let mut guards = Vec::new();
        if let Some((to, buf)) = to {
            let (ptr, g) = buf.device_ptr(&self.stream);
            guards.push(g);
            ops.push(P2p {
                send: true,
                peer: to,
                ptr,
                bytes: buf.len(),
            });
        }
        if let Some((from, buf)) = from {
            let n = buf.len();
            let (ptr, g) = buf.device_ptr_mut(&self.stream);
            guards.push(g);
            ops.push(P2p {
                send: false,
                peer: from,
                ptr,
                bytes: n,
            });
        }
        // SAFETY: the pointers cover the callers' buffers, which they keep alive (and, for
        // the receive, untouched) until the returned event completes.
        let ev = unsafe { self.issue(&ops, peer, what) };
        drop(guards);
        ev
    }

    /// `ncclGroupStart`, one `ncclSend`/`ncclRecv` per op, `ncclGroupEnd`, on the
    /// communication stream; returns the group's completion event.
    ///
    /// # Safety
    /// Every op's pointer addresses `bytes` bytes of device memory of this rank's GPU that
    /// stay allocated (and, for receives, unused by anyone else) until the event completes.
    unsafe fn issue(
        &self,
        ops: &[P2p],
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<CudaEvent, CommFault> {
        let cu = self.stream.cu_stream() as nsys::cudaStream_t;
        // SAFETY: group start has no preconditions.
        self.check(unsafe { nsys::ncclGroupStart() }, peer, what)?;
        for op in ops.iter().filter(|op| op.bytes > 0) {
            // SAFETY: the caller guarantees `ptr` addresses `bytes` live bytes on this
            // GPU until the group completes; stream and communicator are this rank's.
            let r = unsafe {
                if op.send {
                    nsys::ncclSend(
                        op.ptr as *const std::ffi::c_void,
                        op.bytes,
                        nsys::ncclDataType_t::ncclUint8,
                        op.peer as std::ffi::c_int,
                        self.comm,
                        cu,
                    )
                } else {
                    nsys::ncclRecv(
                        op.ptr as *mut std::ffi::c_void,
                        op.bytes,
                        nsys::ncclDataType_t::ncclUint8,
                        op.peer as std::ffi::c_int,
                        self.comm,
                        cu,
                    )
                }
            };
            if r != nsys::ncclResult_t::ncclSuccess && r != nsys::ncclResult_t::ncclInProgress {
                // SAFETY: closes the group opened above.
                let _ = unsafe { nsys::ncclGroupEnd() };
                let name = if op.send { "ncclSend" } else { "ncclRecv" };
                return Err(self.fail(
                    Some(op.peer),
                    format!("rank {}: {what}: {name}: {}", self.rank, nccl_text(r)),
                ));
            }
        }
        // SAFETY: closes the group opened above.
        self.check(unsafe { nsys::ncclGroupEnd() }, peer, what)?;
        self.cuda(self.stream.record_event(None), peer, "event record")
    }

    fn wait_event(
        &self,
        ev: &CudaEvent,
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<(), CommFault> {
        self.poll(peer, what, || {
            ev.try_is_complete()
                .map_err(|e| format!("CUDA event: {e:?}"))
        })
    }

    /// Bind for an exchange with `to`/`from`, both ranks of this ring; returns the peer
    /// that errors name.
    fn bind_peers(
        &self,
        to: Option<usize>,
        from: Option<usize>,
    ) -> std::result::Result<Option<usize>, CommFault> {
        let peer = from.or(to);
        self.bind(peer)?;
        for p in [to, from].into_iter().flatten() {
            if p >= self.world {
                return Err(CommFault::fatal(
                    Some(p),
                    format!("rank {p} is not in this ring of {}", self.world),
                ));
            }
        }
        Ok(peer)
    }

    fn bind(&self, peer: Option<usize>) -> std::result::Result<(), CommFault> {
        self.alive(peer)?;
        self.cuda(self.ctx.bind_to_thread(), peer, "bind context")
    }
}

/// Device-buffer exchanges for the GPU-resident ring (`super::gpu`): no staging, no
/// header (both sides derive every size from the same plan), ordered after compute-stream
/// work through an event.
impl NcclComm {
    /// Enqueue on the communication stream, after `after` (an event recorded on the
    /// compute stream, so the data to send is written and the receive buffers are free):
    /// one NCCL group sending every `(pointer, bytes)` of `sends` to `to` and receiving
    /// every one of `recvs` from `from`, in order. Returns the group's completion event,
    /// to be waited for with [`wait_device`](Self::wait_device).
    ///
    /// # Safety
    /// Every pointer must address the given number of bytes of device memory of this
    /// rank's GPU that stays allocated, and (for `recvs`) unread and unwritten by anyone
    /// else, until the returned event has completed — or, if this rank gives up first,
    /// forever (the caller leaks the buffers).
    pub(crate) unsafe fn exchange_raw(
        &self,
        after: &CudaEvent,
        to: Option<usize>,
        sends: &[(u64, usize)],
        from: Option<usize>,
        recvs: &[(u64, usize)],
        what: &str,
    ) -> std::result::Result<CudaEvent, CommFault> {
        let peer = self.bind_peers(to, from)?;
        self.cuda(self.stream.wait(after), peer, "stream wait")?;
        let mut ops: Vec<P2p> = Vec::new();
        if let Some(t) = to {
            ops.extend(sends.iter().map(|&(ptr, bytes)| P2p {
                send: true,
                peer: t,
                ptr,
                bytes,
            }));
        }
        if let Some(f) = from {
            ops.extend(recvs.iter().map(|&(ptr, bytes)| P2p {
                send: false,
                peer: f,
                ptr,
                bytes,
            }));
        }
        // SAFETY: forwarded from this function's contract.
        let ev = unsafe { self.issue(&ops, peer, what) }?;
        let sent: usize = if to.is_some() {
            sends.iter().map(|x| x.1).sum()
        } else {
            0
        };
        let got: usize = if from.is_some() {
            recvs.iter().map(|x| x.1).sum()
        } else {
            0
        };
        self.add_wire(|w| {
            w.exchanges += 1;
            w.bytes_sent += sent as u64;
            w.bytes_recv += got as u64;
        });
        Ok(ev)
    }

    /// Wait (polling, within the timeout, watching NCCL's asynchronous errors) until an
    /// exchange of [`exchange_raw`](Self::exchange_raw) has completed. On a timeout or
    /// an NCCL error the communicator is aborted and the fault names this rank and `peer`.
    pub(crate) fn wait_device(
        &self,
        ev: &CudaEvent,
        peer: Option<usize>,
        what: &str,
    ) -> std::result::Result<(), CommFault> {
        self.bind(peer)?;
        self.wait_event(ev, peer, what)
    }
}

/// `ncclGetUniqueId` as a `Result`.
fn nccl_unique_id() -> Result<nsys::ncclUniqueId> {
    let mut id = nsys::ncclUniqueId { internal: [0; 128] };
    // SAFETY: valid out-pointer.
    let r = unsafe { nsys::ncclGetUniqueId(&mut id) };
    if r != nsys::ncclResult_t::ncclSuccess {
        return Err(dev_err(format!("ncclGetUniqueId: {}", nccl_text(r))));
    }
    Ok(id)
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.aborted.borrow().is_none() {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: live communicator, used by no one after this.
            let _ = unsafe { nsys::ncclCommAbort(self.comm) };
        }
    }
}

impl RingComm for NcclComm {
    type Ticket = NcclTicket;

    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn config(&self) -> CommConfig {
        self.cfg
    }

    fn post<T: Element>(
        &self,
        tag: Tag,
        to: Option<usize>,
        send: Option<&Packet<T>>,
        from: Option<usize>,
    ) -> std::result::Result<NcclTicket, CommFault> {
        let peer = self.bind_peers(to, from)?;
        let es = std::mem::size_of::<T>();
        let to = to.filter(|_| send.is_some());
        let payload = match (to, send) {
            (Some(_), Some(p)) => Some((
                encode(p).map_err(|m| CommFault::fatal(to, m))?,
                p.data.len(),
                p.bits.len(),
            )),
            _ => None,
        };
        let at = format!(
            "pattern {} step {} kind {}",
            tag.pattern, tag.step, tag.kind
        );
        // Phase 1: headers, so the receiver can allocate and check the tag.
        let hdr_send = match &payload {
            Some((_, elems, bits)) => {
                let h: [u64; HEADER] = [tag.code(), *elems as u64, es as u64, *bits as u64];
                let bytes: Vec<u8> = h.iter().flat_map(|w| w.to_ne_bytes()).collect();
                Some(self.upload(&bytes, to)?)
            }
            None => None,
        };
        let mut hdr_recv = match from {
            Some(_) => Some(self.buffer(HEADER * 8, from)?),
            None => None,
        };
        let what = format!("header exchange ({at}) with ranks {to:?} -> me -> {from:?}");
        let ev = self.group(
            to.zip(hdr_send.as_ref()),
            from.zip(hdr_recv.as_mut()),
            peer,
            &what,
        )?;
        self.wait_event(&ev, peer, &what)?;
        let incoming = match (&hdr_recv, from) {
            (Some(buf), Some(f)) => {
                let raw = self.download(buf, Some(f))?;
                let w: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                if w[0] != tag.code() {
                    return Err(self.fail(
                        Some(f),
                        format!(
                            "rank {}: protocol mismatch with rank {f} ({at}): expected tag {:#x}, got {:#x}",
                            self.rank,
                            tag.code(),
                            w[0]
                        ),
                    ));
                }
                if w[2] as usize != es {
                    return Err(self.fail(
                        Some(f),
                        format!(
                            "rank {}: rank {f} sent {}-byte elements, this rank expects {es} ({at})",
                            self.rank, w[2]
                        ),
                    ));
                }
                Some((w[1] as usize, w[3] as usize))
            }
            _ => None,
        };
        // Phase 2: the payload, left in flight.
        let send_buf = match &payload {
            Some((bytes, _, _)) if !bytes.is_empty() => Some(self.upload(bytes, to)?),
            _ => None,
        };
        let mut recv_buf = match incoming {
            Some((elems, bits)) if elems * es + bits > 0 => {
                Some(self.buffer(elems * es + bits, from)?)
            }
            _ => None,
        };
        let what = format!("payload exchange ({at})");
        let event = if send_buf.is_some() || recv_buf.is_some() {
            Some(self.group(
                to.zip(send_buf.as_ref()),
                from.zip(recv_buf.as_mut()),
                peer,
                &what,
            )?)
        } else {
            None
        };
        let sent = payload.as_ref().map_or(0, |(b, _, _)| b.len() as u64);
        let got = incoming.map_or(0, |(e, b)| (e * es + b) as u64);
        self.add_wire(|w| {
            w.exchanges += 1;
            if to.is_some() {
                w.bytes_sent += sent + (HEADER * 8) as u64;
                w.header_bytes_sent += (HEADER * 8) as u64;
            }
            if from.is_some() {
                w.bytes_recv += got + (HEADER * 8) as u64;
            }
        });
        Ok(NcclTicket {
            tag,
            from,
            to,
            event,
            recv: incoming.map(|(e, b)| (recv_buf, e, es, b)),
            send: send_buf,
        })
    }

    fn wait<T: Element>(
        &self,
        ticket: NcclTicket,
    ) -> std::result::Result<Option<Packet<T>>, CommFault> {
        let peer = ticket.from.or(ticket.to);
        if let Err(f) = self.bind(peer) {
            // The buffers may still be in use by an aborted transfer: leak them.
            std::mem::forget(ticket);
            return Err(f);
        }
        if let Some(ev) = &ticket.event {
            let what = format!(
                "receive from rank {:?} / send to rank {:?} (pattern {} step {} kind {})",
                ticket.from, ticket.to, ticket.tag.pattern, ticket.tag.step, ticket.tag.kind
            );
            if let Err(f) = self.wait_event(ev, peer, &what) {
                std::mem::forget(ticket);
                return Err(f);
            }
        }
        let NcclTicket {
            recv, send, from, ..
        } = ticket;
        drop(send);
        let Some((buf, elems, es, bits)) = recv else {
            return Ok(None);
        };
        if es != std::mem::size_of::<T>() {
            return Err(CommFault::fatal(
                from,
                format!("rank {:?} sent a packet of another element type", from),
            ));
        }
        let bytes = match &buf {
            Some(b) => self.download(b, from)?,
            None => Vec::new(),
        };
        Ok(Some(decode(&bytes, elems, bits)))
    }

    fn all_reduce_max(&self, tag: Tag, x: f64) -> std::result::Result<f64, CommFault> {
        self.bind(None)?;
        let what = format!(
            "all-reduce (pattern {} step {} kind {})",
            tag.pattern, tag.step, tag.kind
        );
        let mut buf = self.upload(&x.to_ne_bytes(), None)?;
        let cu = self.stream.cu_stream() as nsys::cudaStream_t;
        let ev = {
            let (ptr, g) = buf.device_ptr_mut(&self.stream);
            // SAFETY: in-place all-reduce of one f64 in an 8-byte buffer that lives until
            // the event below completes; stream and communicator are this rank's.
            let r = unsafe {
                nsys::ncclAllReduce(
                    ptr as *const std::ffi::c_void,
                    ptr as *mut std::ffi::c_void,
                    1,
                    nsys::ncclDataType_t::ncclFloat64,
                    nsys::ncclRedOp_t::ncclMax,
                    self.comm,
                    cu,
                )
            };
            drop(g);
            self.check(r, None, &what)?;
            self.cuda(self.stream.record_event(None), None, "event record")?
        };
        if let Err(f) = self.wait_event(&ev, None, &what) {
            std::mem::forget(buf);
            return Err(f);
        }
        let h = self.download(&buf, None)?;
        self.add_wire(|w| w.all_reduces += 1);
        Ok(f64::from_ne_bytes(h[..8].try_into().unwrap_or([0; 8])))
    }

    /// Aborts the NCCL communicator. Peers are not told directly (NCCL has no message
    /// for it): their own waits on this rank time out and abort in turn.
    fn abort(&self, step: usize, msg: &str) {
        self.kill(&format!("rank {} gave up at step {step}: {msg}", self.rank));
    }
}

/// Run `f` on every communicator of [`NcclComm::from_devices`], one thread each; results
/// in rank order. A rank that panics yields `Err` with the panic message (its
/// communicator is dropped, i.e. aborted, so its peers time out and return `Err` too).
pub fn run<R, F>(comms: Vec<NcclComm>, f: F) -> Vec<Result<R>>
where
    R: Send,
    F: Fn(NcclComm) -> Result<R> + Sync,
{
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let rank = c.rank;
                (rank, s.spawn(move || f(c)))
            })
            .collect();
        hs.into_iter()
            .map(|(rank, h)| match h.join() {
                Ok(r) => r,
                Err(e) => Err(Error::Comm {
                    rank,
                    step: 0,
                    msg: format!("rank {rank} panicked: {}", panic_text(&*e)),
                }),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let p = Packet {
            data: vec![1.5f32, -2.25, f32::INFINITY],
            bits: vec![true, false, true],
        };
        let b = encode(&p).unwrap();
        assert_eq!(b.len(), 3 * 4 + 3);
        let q: Packet<f32> = decode(&b, 3, 3);
        assert_eq!(p, q);
        let p = Packet {
            data: vec![1.0f64 / 3.0, -0.0],
            bits: vec![],
        };
        let q: Packet<f64> = decode(&encode(&p).unwrap(), 2, 0);
        assert_eq!(p.data[0].to_bits(), q.data[0].to_bits());
        assert_eq!(p.data[1].to_bits(), q.data[1].to_bits());
    }
}
