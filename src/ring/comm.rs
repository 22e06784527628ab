//! The [`RingComm`] trait (SPEC §3), its configuration and per-call statistics.
//!
//! The ring driver talks to its peers only through this trait: point-to-point exchanges
//! (post a send and a receive, compute, then wait), plus a barrier and a small
//! all-reduce for health checks. A backend (loopback threads today, NCCL later) owns
//! the transport and the buffers in flight; the driver never learns which one it runs on.

use std::time::Duration;

use crate::dtype::Element;

/// What travels between ranks: element data plus optional key-mask bits.
///
/// The driver packs only the dilated `(row, kv head)` entries a peer can use; the layout
/// of `data` is documented in the ring README (`K` entries, then `V`, then optionally
/// the `dK`/`dV` accumulators). A backend moves packets; it never interprets them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Packet<T> {
    /// Element payload.
    pub data: Vec<T>,
    /// Key padding mask bits of the packed entries, `(batch, entries)`; empty = no mask.
    pub bits: Vec<bool>,
}

impl<T> Packet<T> {
    /// Bytes this packet moves over a link (one byte per mask bit).
    pub fn bytes(&self) -> u64 {
        (self.data.len() * std::mem::size_of::<T>() + self.bits.len()) as u64
    }
}

/// A failed communication as a backend reports it. The driver adds its rank and step
/// and turns it into [`crate::Error::Comm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommFault {
    /// The peer involved, where known.
    pub peer: Option<usize>,
    /// `true` if retrying may succeed (a full queue, a busy link); `false` for a dead
    /// or silent peer, which is never retried.
    pub transient: bool,
    /// What happened.
    pub msg: String,
}

impl CommFault {
    /// A fatal fault involving `peer`.
    pub fn fatal(peer: Option<usize>, msg: impl Into<String>) -> Self {
        CommFault {
            peer,
            transient: false,
            msg: msg.into(),
        }
    }
    /// A transient fault involving `peer`.
    pub fn transient(peer: Option<usize>, msg: impl Into<String>) -> Self {
        CommFault {
            peer,
            transient: true,
            msg: msg.into(),
        }
    }
}

impl std::fmt::Display for CommFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.transient { "transient" } else { "fatal" };
        match self.peer {
            Some(p) => write!(f, "{kind} fault with rank {p}: {}", self.msg),
            None => write!(f, "{kind} fault: {}", self.msg),
        }
    }
}

/// Timeouts and retries of a communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommConfig {
    /// How long a wait may last before the peer counts as stalled.
    pub timeout: Duration,
    /// How many times a transient fault is retried before it becomes an error.
    pub retries: u32,
    /// Pause between retries.
    pub retry_delay: Duration,
}

impl Default for CommConfig {
    /// 60 s timeout (generous: a peer may be computing a large block), 3 retries, 10 ms.
    fn default() -> Self {
        CommConfig {
            timeout: Duration::from_secs(60),
            retries: 3,
            retry_delay: Duration::from_millis(10),
        }
    }
}

impl CommConfig {
    /// With this timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// With this retry count and delay.
    pub fn retries(mut self, count: u32, delay: Duration) -> Self {
        self.retries = count;
        self.retry_delay = delay;
        self
    }
}

/// A message tag: identical on sender and receiver, so a protocol mismatch is detected
/// instead of silently mixing blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    /// Pattern index (or `u32::MAX` for collectives).
    pub pattern: u32,
    /// Exchange group within the pattern (its first segment).
    pub group: u32,
    /// Ring step.
    pub step: u32,
    /// What the message carries (0: K/V block, 1: dK/dV accumulator, 2: collective,
    /// 3: detached-weights forward, 4: all-reduce chunk).
    pub kind: u8,
}

impl Tag {
    /// Encoded as one integer for transports (fields truncated to 16, 24, 20 and 4 bits:
    /// a consistency check, not an identity).
    pub fn code(&self) -> u64 {
        ((self.pattern as u64 & 0xffff) << 48)
            | ((self.group as u64 & 0xff_ffff) << 24)
            | ((self.step as u64 & 0xf_ffff) << 4)
            | (self.kind as u64 & 0xf)
    }
}

/// Communication with the other ranks of a ring (SPEC §3).
///
/// Exchanges are split into [`post`](RingComm::post) (non-blocking: start the send, arm
/// the receive) and [`wait`](RingComm::wait) (block until the receive completes), so the
/// driver computes on the current block while the next one travels. Peers are given
/// explicitly: the driver rotates blocks around the **sub-ring** of ranks that share a
/// segment, which is the ring `rank ± 1` whenever segments span consecutive ranks.
///
/// Contract for implementors:
/// * messages between one ordered pair of ranks arrive in the order they were posted;
/// * `wait` returns within [`CommConfig::timeout`] — a dead peer or a silent one is a
///   fatal [`CommFault`] naming the peer, never a hang and never an empty packet;
/// * `post` does not keep a borrow of `send` (the packet stays with the caller, so a
///   failed exchange loses nothing);
/// * `abort` tells every peer, best effort, that this rank gave up, so that peers blocked
///   on a third rank fail fast instead of timing out one after another.
pub trait RingComm {
    /// A posted exchange, redeemed by [`wait`](RingComm::wait).
    type Ticket;

    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks `W`.
    fn world_size(&self) -> usize;
    /// Timeouts and retries.
    fn config(&self) -> CommConfig;

    /// Start sending `send` to rank `to` (if any) and arm a receive from rank `from` (if
    /// any). Non-blocking.
    fn post<T: Element>(
        &self,
        tag: Tag,
        to: Option<usize>,
        send: Option<&Packet<T>>,
        from: Option<usize>,
    ) -> Result<Self::Ticket, CommFault>;

    /// Complete a posted exchange: the packet received from `from` (`None` if no receive
    /// was armed).
    fn wait<T: Element>(&self, ticket: Self::Ticket) -> Result<Option<Packet<T>>, CommFault>;

    /// Every rank reaches this point, or `Err`.
    fn barrier(&self, tag: Tag) -> Result<(), CommFault> {
        self.all_reduce_max(tag, 0.0).map(|_| ())
    }

    /// Maximum of one scalar over all ranks (health checks, agreement checks).
    fn all_reduce_max(&self, tag: Tag, x: f64) -> Result<f64, CommFault>;

    /// Tell every peer that this rank stopped at `step` because of `msg` (best effort).
    fn abort(&self, step: usize, msg: &str);
}

/// Per-call statistics of one rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RingStats {
    /// This rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Exchanges posted (ring steps, over all patterns).
    pub steps: usize,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_recv: u64,
    /// Time spent computing.
    pub compute: Duration,
    /// Time spent blocked in `wait` (communication not hidden by compute).
    pub wait: Duration,
    /// (query run, key run) block pairs computed.
    pub blocks_computed: u64,
    /// Block pairs skipped because no query of the pair can see a key of it (causal).
    pub blocks_skipped: u64,
    /// Largest number of remote packets held at once (received or in flight to us).
    pub max_remote_blocks: usize,
    /// Largest number of payload bytes of remote packets held at once.
    pub peak_remote_bytes: u64,
    /// Transient faults that were retried.
    pub retries: u32,
}

impl RingStats {
    pub(crate) fn new(rank: usize, world: usize) -> Self {
        RingStats {
            rank,
            world,
            ..Default::default()
        }
    }
    /// Add another call's counters (e.g. forward + backward).
    pub fn merge(&mut self, o: &RingStats) {
        self.steps += o.steps;
        self.bytes_sent += o.bytes_sent;
        self.bytes_recv += o.bytes_recv;
        self.compute += o.compute;
        self.wait += o.wait;
        self.blocks_computed += o.blocks_computed;
        self.blocks_skipped += o.blocks_skipped;
        self.max_remote_blocks = self.max_remote_blocks.max(o.max_remote_blocks);
        self.peak_remote_bytes = self.peak_remote_bytes.max(o.peak_remote_bytes);
        self.retries += o.retries;
    }
}
