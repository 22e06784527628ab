//! Layouts: which global positions each rank holds (SPEC §2), and helpers that split
//! global tensors into per-rank tensors and gather them back.
//!
//! A layout cuts the global sequence `N = W·n` into equal **chunks** and gives each rank
//! one or two of them:
//!
//! ```text
//! Contiguous, W = 4:   | r0 | r1 | r2 | r3 |            chunk = n
//! Zigzag,     W = 4:   |r0|r1|r2|r3|r3|r2|r1|r0|        chunk = n/2
//!                       local rows of r1 = [chunk 1, chunk 6]
//! ```
//!
//! Local row `j` of rank `r` sits at the global position given by [`Layout::position`].
//! Positions, not local rows, decide segments, offsets, causality and masks.

use crate::error::{Error, Result};

/// How global positions are distributed over the ranks of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Rank `r` holds positions `[r·n, (r+1)·n)`.
    #[default]
    Contiguous,
    /// `N` is cut into `2W` chunks of `n/2`; rank `r` holds chunks `r` and `2W-1-r`, in
    /// that order. Balances causal work; needs `n` even.
    Zigzag,
}

/// The chunk geometry of a layout for one world size and local length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// The layout.
    pub layout: Layout,
    /// World size `W`.
    pub world: usize,
    /// Local length `n`.
    pub local: usize,
}

impl Geometry {
    /// Validate `(layout, W, n)`: `W >= 1`, `n >= 1`, zigzag needs `n` even.
    pub fn new(layout: Layout, world: usize, local: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::Ring {
                msg: "world size must be >= 1".into(),
            });
        }
        if local == 0 {
            return Err(Error::Ring {
                msg: "local length must be >= 1".into(),
            });
        }
        if layout == Layout::Zigzag && !local.is_multiple_of(2) {
            return Err(Error::Ring {
                msg: format!("zigzag layout needs an even local length, got n = {local}"),
            });
        }
        Ok(Geometry {
            layout,
            world,
            local,
        })
    }

    /// Global length `N = W·n`.
    pub fn global(&self) -> usize {
        self.world * self.local
    }
    /// Rows per chunk.
    pub fn chunk_len(&self) -> usize {
        match self.layout {
            Layout::Contiguous => self.local,
            Layout::Zigzag => self.local / 2,
        }
    }
    /// Number of chunks of the global sequence.
    pub fn num_chunks(&self) -> usize {
        match self.layout {
            Layout::Contiguous => self.world,
            Layout::Zigzag => 2 * self.world,
        }
    }
    /// Rank holding chunk `c`.
    pub fn owner(&self, c: usize) -> usize {
        match self.layout {
            Layout::Contiguous => c,
            Layout::Zigzag => {
                if c < self.world {
                    c
                } else {
                    2 * self.world - 1 - c
                }
            }
        }
    }
    /// The chunks of rank `r` in local order, with the local row each starts at.
    pub fn chunks_of(&self, r: usize) -> Vec<(usize, usize)> {
        match self.layout {
            Layout::Contiguous => vec![(r, 0)],
            Layout::Zigzag => vec![(r, 0), (2 * self.world - 1 - r, self.local / 2)],
        }
    }
    /// Global position of local row `j` of rank `r`.
    pub fn position(&self, r: usize, j: usize) -> usize {
        let cl = self.chunk_len();
        let chunks = self.chunks_of(r);
        let (c, row0) = chunks[j / cl];
        c * cl + (j - row0)
    }
    /// Global positions of all local rows of rank `r`.
    pub fn positions(&self, r: usize) -> Vec<usize> {
        (0..self.local).map(|j| self.position(r, j)).collect()
    }
}

impl Layout {
    /// Split a global `(batch, N, inner...)` buffer (`inner` elements per position) into
    /// `W` local `(batch, n, inner...)` buffers.
    pub fn split<T: Clone>(
        &self,
        global: &[T],
        batch: usize,
        inner: usize,
        world: usize,
    ) -> Result<Vec<Vec<T>>> {
        let (geo, n) = self.geometry_for(global.len(), batch, inner, world)?;
        Ok((0..world)
            .map(|r| {
                let mut out = Vec::with_capacity(batch * n * inner);
                for b in 0..batch {
                    for j in 0..n {
                        let p = geo.position(r, j);
                        let src = (b * geo.global() + p) * inner;
                        out.extend_from_slice(&global[src..src + inner]);
                    }
                }
                out
            })
            .collect())
    }

    /// Inverse of [`split`](Self::split): gather `W` local buffers into one global buffer.
    pub fn gather<T: Clone>(
        &self,
        locals: &[Vec<T>],
        batch: usize,
        inner: usize,
    ) -> Result<Vec<T>> {
        let world = locals.len();
        let total: usize = locals.iter().map(Vec::len).sum();
        let (geo, n) = self.geometry_for(total, batch, inner, world)?;
        for (r, l) in locals.iter().enumerate() {
            if l.len() != batch * n * inner {
                return Err(Error::Ring {
                    msg: format!(
                        "gather: rank {r} holds {} elements, expected {}",
                        l.len(),
                        batch * n * inner
                    ),
                });
            }
        }
        let Some(first) = locals.first().and_then(|l| l.first()) else {
            return Ok(Vec::new());
        };
        let mut out = vec![first.clone(); total];
        for (r, l) in locals.iter().enumerate() {
            for b in 0..batch {
                for j in 0..n {
                    let p = geo.position(r, j);
                    let dst = (b * geo.global() + p) * inner;
                    let src = (b * n + j) * inner;
                    out[dst..dst + inner].clone_from_slice(&l[src..src + inner]);
                }
            }
        }
        Ok(out)
    }

    fn geometry_for(
        &self,
        len: usize,
        batch: usize,
        inner: usize,
        world: usize,
    ) -> Result<(Geometry, usize)> {
        let per = batch * inner * world;
        if per == 0 || !len.is_multiple_of(per) {
            return Err(Error::Ring {
                msg: format!(
                    "{len} elements do not split into batch {batch} x {world} ranks x {inner} per position"
                ),
            });
        }
        let n = len / per;
        Ok((Geometry::new(*self, world, n)?, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_positions() {
        let g = Geometry::new(Layout::Zigzag, 4, 4).unwrap();
        assert_eq!(g.positions(0), vec![0, 1, 14, 15]);
        assert_eq!(g.positions(1), vec![2, 3, 12, 13]);
        assert_eq!(g.positions(3), vec![6, 7, 8, 9]);
    }

    #[test]
    fn split_gather_roundtrip() {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let g: Vec<u32> = (0..2 * 16 * 3).collect();
            let parts = layout.split(&g, 2, 3, 4).unwrap();
            assert_eq!(parts.len(), 4);
            assert_eq!(layout.gather(&parts, 2, 3).unwrap(), g);
        }
        assert!(Layout::Zigzag.split(&[0u8; 12], 1, 1, 4).is_err()); // n = 3 is odd
    }
}
