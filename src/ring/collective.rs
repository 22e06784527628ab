//! A ring all-reduce (sum) over any [`RingComm`], built from the same point-to-point
//! exchanges as the attention driver.
//!
//! Sequence-parallel training splits the *tokens* over the ranks, not the parameters:
//! every rank holds the whole model and its parameter gradients are partial sums over its
//! own rows. [`try_all_reduce_sum`] adds them up so that every rank holds the gradient of
//! the whole sequence (what one device would compute), bit-identical on every rank.
//!
//! The algorithm is the bandwidth-optimal ring: the buffer is cut into `W` chunks;
//! `W - 1` **reduce-scatter** steps (rank `r` sends chunk `r - s`, receives chunk
//! `r - s - 1` and adds its own values into it) leave rank `r` with the full sum of chunk
//! `r + 1`; `W - 1` **all-gather** steps pass the finished chunks on. Each rank sends
//! `2 (W - 1) / W` of the buffer, to `rank + 1` only.
//!
//! ```text
//! W = 3, chunks a b c              after reduce-scatter      after all-gather
//! r0: a0 b0 c0                     r0: .  Σb .               r0: Σa Σb Σc
//! r1: a1 b1 c1                     r1: .  .  Σc              r1: Σa Σb Σc
//! r2: a2 b2 c2                     r2: Σa .  .               r2: Σa Σb Σc
//! ```

use std::time::Instant;

use super::comm::{CommFault, Packet, RingComm, RingStats, Tag};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Tag kind of all-reduce messages (see [`Tag`]).
pub(crate) const KIND_REDUCE: u8 = 4;

/// Sum `data` over all ranks of `comm`, in place: afterwards every rank holds the same
/// element-wise sum (bit for bit). Every rank must call it with a buffer of the same
/// length. Returns this call's statistics. On a fault every rank returns
/// [`Error::Comm`] (the failing rank tells its peers through [`RingComm::abort`]); `data`
/// then holds a partial result.
///
/// ```
/// use dilated_attention::ring::{collective::try_all_reduce_sum, loopback, CommConfig};
/// let sums = loopback::run(3, CommConfig::default(), |comm| {
///     use dilated_attention::ring::RingComm;
///     let r = comm.rank() as f64;
///     let mut x = vec![r, 10.0 * r, 1.0, 2.0, 3.0];
///     try_all_reduce_sum(&comm, &mut x)?;
///     Ok(x)
/// })?;
/// for s in sums {
///     assert_eq!(s?, vec![3.0, 30.0, 3.0, 6.0, 9.0]);
/// }
/// # Ok::<(), dilated_attention::Error>(())
/// ```
pub fn try_all_reduce_sum<T: Element, C: RingComm>(comm: &C, data: &mut [T]) -> Result<RingStats> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut stats = RingStats::new(rank, world);
    if world <= 1 {
        return Ok(stats);
    }
    let len = data.len();
    let bounds = |c: usize| (c * len / world, (c + 1) * len / world);
    let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
    let mut step = 0usize;
    let r = (|| {
        for phase in 0..2u32 {
            for s in 0..world - 1 {
                // Reduce-scatter sends chunk r - s; all-gather sends chunk r + 1 - s.
                let send_c = (rank + world + phase as usize - s) % world;
                let recv_c = (send_c + world - 1) % world;
                let (a, b) = bounds(send_c);
                let packet = Packet {
                    data: data[a..b].to_vec(),
                    bits: Vec::new(),
                };
                let tag = Tag {
                    pattern: u32::MAX,
                    group: phase,
                    step: s as u32,
                    kind: KIND_REDUCE,
                };
                let fail = |f: CommFault, step: usize| Error::Comm {
                    rank,
                    step,
                    msg: format!(
                        "all-reduce {} step {s}: {f}",
                        if phase == 0 {
                            "reduce-scatter"
                        } else {
                            "all-gather"
                        }
                    ),
                };
                let ticket = comm
                    .post(tag, Some(next), Some(&packet), Some(prev))
                    .map_err(|f| fail(f, step))?;
                stats.steps += 1;
                stats.bytes_sent += packet.bytes();
                let t0 = Instant::now();
                let got = comm.wait::<T>(ticket).map_err(|f| fail(f, step))?;
                stats.wait += t0.elapsed();
                step += 1;
                let (a, b) = bounds(recv_c);
                let got = match got {
                    Some(p) if p.data.len() == b - a => p,
                    other => {
                        return Err(Error::Comm {
                            rank,
                            step,
                            msg: format!(
                                "all-reduce: rank {prev} sent {} elements for chunk {recv_c}, expected {} (buffers of different lengths?)",
                                other.map_or(0, |p| p.data.len()),
                                b - a
                            ),
                        })
                    }
                };
                stats.bytes_recv += got.bytes();
                stats.max_remote_blocks = stats.max_remote_blocks.max(1);
                stats.peak_remote_bytes = stats.peak_remote_bytes.max(got.bytes());
                let dst = &mut data[a..b];
                if phase == 0 {
                    dst.iter_mut().zip(&got.data).for_each(|(d, g)| *d += *g);
                } else {
                    dst.copy_from_slice(&got.data);
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = &r {
        comm.abort(step, &e.to_string());
    }
    r.map(|()| stats)
}
