//! Shared by the GPU benches (`gpu_bench`, `gpu_ring_bench`).

use cudarc::driver::CudaSlice;
use dilated_attention::tensor::cuda::Cuda;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// A device buffer of `len` random normal bf16 values (a random 16M-element block repeated;
/// the period is far larger than L2).
pub fn rand_buf(dev: &Cuda, len: usize, seed: u64) -> CudaSlice<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    let chunk: Vec<bf16> = (0..len.min(1 << 24))
        .map(|_| bf16::from_f32(rng.sample::<f32, _>(StandardNormal)))
        .collect();
    // SAFETY: every element is written by the copies below before any read.
    let mut buf = unsafe { dev.stream().alloc::<bf16>(len) }.unwrap();
    let mut off = 0;
    while off < len {
        let n = chunk.len().min(len - off);
        let mut view = buf.slice_mut(off..off + n);
        dev.stream().memcpy_htod(&chunk[..n], &mut view).unwrap();
        off += n;
    }
    buf
}
