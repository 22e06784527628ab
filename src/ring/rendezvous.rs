//! A small TCP rendezvous that hands rank 0's opaque bootstrap blob (the NCCL unique id)
//! to every other rank, the way `torchrun` environments expect: `RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`.
//!
//! Protocol (one TCP connection per non-zero rank, all with a deadline):
//!
//! ```text
//! rank r > 0                         rank 0 (listens on MASTER_ADDR:MASTER_PORT)
//!   connect (retry until deadline) ─►  accept
//!   send  "DARV" r:u32 W:u32       ─►  check magic, rank range, world size, duplicates
//!                                  ◄─  send "DARV" len:u32 blob
//! ```
//!
//! Rank 0 waits until all `W - 1` peers have checked in (or the deadline passes: `Err`
//! naming the ranks that never came), then answers all of them. Every failure is an
//! [`Error::Ring`] naming the rank, the address and what went wrong.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"DARV";

/// Where and who: the torchrun-style environment of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousEnv {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// GPU index on this host (`LOCAL_RANK`, defaults to `rank`).
    pub local_rank: usize,
    /// Rank 0's host.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
}

impl RendezvousEnv {
    /// Read `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), from any lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let need = |k: &str| {
            get(k).ok_or_else(|| ring_err(format!("environment variable {k} is not set")))
        };
        let num = |k: &str, v: String| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| ring_err(format!("environment variable {k}={v:?} is not a number")))
        };
        let rank = num("RANK", need("RANK")?)?;
        let world_size = num("WORLD_SIZE", need("WORLD_SIZE")?)?;
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", v)?,
            None => rank,
        };
        let master_addr = need("MASTER_ADDR")?;
        let port = need("MASTER_PORT")?;
        let master_port = port.trim().parse::<u16>().map_err(|_| {
            ring_err(format!(
                "environment variable MASTER_PORT={port:?} is not a port"
            ))
        })?;
        if world_size == 0 || rank >= world_size {
            return Err(ring_err(format!(
                "RANK={rank} is not in 0..WORLD_SIZE={world_size}"
            )));
        }
        Ok(RendezvousEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }

    fn addr(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| {
                ring_err(format!(
                    "cannot resolve {}:{}: {e}",
                    self.master_addr, self.master_port
                ))
            })?
            .next()
            .ok_or_else(|| {
                ring_err(format!(
                    "{}:{} resolves to no address",
                    self.master_addr, self.master_port
                ))
            })
    }
}

fn ring_err(msg: String) -> Error {
    Error::Ring { msg }
}

/// Exchange: rank 0 passes `blob` (its id) and gets it back; other ranks pass `None`-like
/// empty input and receive rank 0's blob. Everything finishes within `timeout`.
pub fn exchange(env: &RendezvousEnv, blob: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let addr = env.addr()?;
    if env.rank == 0 {
        let blob = blob.ok_or_else(|| ring_err("rank 0 must provide the bootstrap id".into()))?;
        serve(env, addr, blob, deadline)?;
        Ok(blob.to_vec())
    } else {
        fetch(env, addr, deadline)
    }
}

fn left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn serve(env: &RendezvousEnv, addr: SocketAddr, blob: &[u8], deadline: Instant) -> Result<()> {
    let w = env.world_size;
    let listener = TcpListener::bind(addr)
        .map_err(|e| ring_err(format!("rank 0 cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ring_err(format!("rank 0: {e}")))?;
    let mut peers: Vec<Option<TcpStream>> = (0..w).map(|_| None).collect();
    let mut joined = 1;
    while joined < w {
        let Some(rest) = left(deadline) else {
            let missing: Vec<usize> = (1..w).filter(|&r| peers[r].is_none()).collect();
            return Err(ring_err(format!(
                "rendezvous on {addr} timed out: ranks {missing:?} never checked in"
            )));
        };
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)
                    .map_err(|e| ring_err(format!("rank 0: {e}")))?;
                s.set_read_timeout(Some(rest)).ok();
                s.set_write_timeout(Some(rest)).ok();
                let mut hello = [0u8; 12];
                s.read_exact(&mut hello)
                    .map_err(|e| ring_err(format!("rank 0: bad hello from {from}: {e}")))?;
                if &hello[..4] != MAGIC {
                    return Err(ring_err(format!(
                        "rank 0: {from} is not a dilated-attention rank"
                    )));
                }
                let r = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
                let pw = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                if pw != w {
                    return Err(ring_err(format!(
                        "rank {r} at {from} says WORLD_SIZE={pw}, rank 0 has {w}"
                    )));
                }
                if r == 0 || r >= w || peers[r].is_some() {
                    return Err(ring_err(format!(
                        "rank 0: invalid or duplicate rank {r} from {from}"
                    )));
                }
                peers[r] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(ring_err(format!("rank 0: accept on {addr}: {e}"))),
        }
    }
    for (r, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("all joined");
        let mut msg = Vec::with_capacity(8 + blob.len());
        msg.extend_from_slice(MAGIC);
        msg.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        msg.extend_from_slice(blob);
        s.write_all(&msg)
            .map_err(|e| ring_err(format!("rank 0: sending the id to rank {r}: {e}")))?;
    }
    Ok(())
}

fn fetch(env: &RendezvousEnv, addr: SocketAddr, deadline: Instant) -> Result<Vec<u8>> {
    let r = env.rank;
    let mut s = loop {
        let Some(rest) = left(deadline) else {
            return Err(ring_err(format!(
                "rank {r}: rank 0 at {addr} did not answer before the timeout"
            )));
        };
        match TcpStream::connect_timeout(&addr, rest.min(Duration::from_millis(500))) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let rest = left(deadline).unwrap_or(Duration::from_millis(1));
    s.set_read_timeout(Some(rest)).ok();
    s.set_write_timeout(Some(rest)).ok();
    let mut hello = Vec::with_capacity(12);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(r as u32).to_le_bytes());
    hello.extend_from_slice(&(env.world_size as u32).to_le_bytes());
    s.write_all(&hello)
        .map_err(|e| ring_err(format!("rank {r}: hello to {addr}: {e}")))?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head).map_err(|e| {
        ring_err(format!(
            "rank {r}: no id from rank 0 at {addr} (rank 0 failed or timed out): {e}"
        ))
    })?;
    if &head[..4] != MAGIC {
        return Err(ring_err(format!(
            "rank {r}: {addr} is not a dilated-attention rank 0"
        )));
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
    if len > 1 << 20 {
        return Err(ring_err(format!(
            "rank {r}: id of {len} bytes from {addr} is implausible"
        )));
    }
    let mut blob = vec![0u8; len];
    s.read_exact(&mut blob)
        .map_err(|e| ring_err(format!("rank {r}: reading the id from {addr}: {e}")))?;
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, w: usize, port: u16) -> RendezvousEnv {
        RendezvousEnv {
            rank,
            world_size: w,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn every_rank_gets_rank0_blob() {
        let port = free_port();
        let w = 4;
        let handles: Vec<_> = (0..w)
            .map(|r| {
                std::thread::spawn(move || {
                    let id = [7u8, 1, 2, 3, 250];
                    exchange(
                        &env(r, w, port),
                        (r == 0).then_some(&id[..]),
                        Duration::from_secs(10),
                    )
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().unwrap(), vec![7u8, 1, 2, 3, 250]);
        }
    }

    #[test]
    fn missing_rank_times_out_with_its_number() {
        let port = free_port();
        let h =
            std::thread::spawn(move || exchange(&env(1, 3, port), None, Duration::from_secs(5)));
        let e = exchange(&env(0, 3, port), Some(b"id"), Duration::from_millis(600)).unwrap_err();
        assert!(e.to_string().contains("ranks [2] never checked in"), "{e}");
        // Rank 1 connected but rank 0 gave up: it errors too, within its own timeout.
        let e1 = h.join().unwrap().unwrap_err();
        assert!(e1.to_string().contains("rank 1"), "{e1}");
    }

    #[test]
    fn absent_rank0_is_an_error_not_a_hang() {
        let port = free_port();
        let t = Instant::now();
        let e = exchange(&env(2, 3, port), None, Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("did not answer"), "{e}");
    }

    #[test]
    fn environment_is_validated() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let ok = RendezvousEnv::from_lookup(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "localhost"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            (ok.rank, ok.world_size, ok.local_rank, ok.master_port),
            (1, 2, 1, 29500)
        );
        let e = RendezvousEnv::from_lookup(vars(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("RANK=2"), "{e}");
        let e = RendezvousEnv::from_lookup(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
    }
}
