// Helper kernels of the GPU-resident ring (src/ring/gpu.rs), compiled by NVRTC together
// with ops/dilated/dilated.cu (which supplies bf16/f16, to_f, from_f and neg_inf).
//
// A ring block is *compact*: for one local chunk and one pattern (w, r) it holds the rows
// of the chunk that take part, `(B, m, Hc, E)` with m = chunk/r. Compact row t of compact
// head j is local row `row0 + o(j) + t*r` of local head `(hb + j) / hdiv`, where the
// offset o(j) is `(ob + j) % r` (Lse: every head its own offset) or `fixed` (HeadGroups,
// or r = 1). `RowMap` carries that map; every kernel here is a loop over compact
// elements.

// Mirrored by `RowMap` in src/ring/gpu.rs (#[repr(C)]): keep the field order identical.
struct RowMap {
    int B;         // batch
    int n;         // rows of the local buffer
    int hs;        // heads of the local buffer
    int m;         // compact rows
    int hc;        // compact heads
    int E;         // elements per (row, head): head dim, or 1 for L
    int row0;      // first local row of the chunk
    int r;         // row step
    int hb;        // local head of compact head j: (hb + j) / hdiv
    int hdiv;
    int ob;        // offset of compact head j: per_head ? (ob + j) % r : fixed
    int per_head;
    int fixed;
    int atomic;    // scatter-add: several compact heads may share a local head (GQA)
};

// Local (row, head) index of compact (b, t, j), in units of E elements.
__device__ __forceinline__ long long map_local(const RowMap& M, int b, int t, int j) {
    int o = M.per_head ? (M.ob + j) % M.r : M.fixed;
    long long row = (long long)M.row0 + o + (long long)t * M.r;
    int h = (M.hb + j) / M.hdiv;
    return ((long long)b * M.n + row) * M.hs + h;
}

// Local (row, head) index of compact row x = (b*m + t)*hc + j.
__device__ __forceinline__ long long row_local(const RowMap& M, long long x) {
    int j = (int)(x % M.hc);
    long long y = x / M.hc;
    return map_local(M, (int)(y / M.m), (int)(y % M.m), j);
}

__device__ __forceinline__ long long compact_rows(const RowMap& M) {
    return (long long)M.B * M.m * M.hc;
}

#define GRID_LOOP(i, count) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (count); i += (long long)gridDim.x * blockDim.x)

// One warp per compact row: index arithmetic once per row, coalesced element access.
#define ROW_LOOP(x, rows)                                                             \
    const int lane = threadIdx.x & 31;                                                \
    const long long warp0 = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5; \
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;               \
    for (long long x = warp0; x < (rows); x += nwarps)

// dst (compact) = src (local) * s.
template <typename T>
__device__ void ring_gather(const RowMap M, const T* __restrict__ src, T* __restrict__ dst, float s) {
    ROW_LOOP(x, compact_rows(M)) {
        const T* a = src + row_local(M, x) * M.E;
        T* d = dst + x * M.E;
        for (int e = lane; e < M.E; e += 32) d[e] = s == 1.f ? a[e] : from_f<T>(to_f(a[e]) * s);
    }
}

// Key padding mask bytes of one chunk (E = 1, one head).
extern "C" __global__ void ring_gather_u8(const RowMap M, const unsigned char* __restrict__ src,
                                          unsigned char* __restrict__ dst) {
    ROW_LOOP(x, compact_rows(M)) {
        if (lane == 0) dst[x] = src[row_local(M, x)];
    }
}

// dst (local, f32) += src (compact). Atomic when several compact heads share a local
// head (GQA with expanded kv heads); otherwise every local element has one writer.
template <typename T>
__device__ void ring_scatter_add(const RowMap M, float* __restrict__ dst, const T* __restrict__ src) {
    ROW_LOOP(x, compact_rows(M)) {
        float* a = dst + row_local(M, x) * M.E;
        const T* d = src + x * M.E;
        if (M.atomic) {
            for (int e = lane; e < M.E; e += 32) atomicAdd(a + e, to_f(d[e]));
        } else {
            for (int e = lane; e < M.E; e += 32) a[e] += to_f(d[e]);
        }
    }
}

// Log-sum-exp merge of a compact partial (o, l) into the local f32 accumulator
// (acc_o, acc_l), SPEC §2: L = logaddexp(L1, L2), out = e^(L1-L) out1 + e^(L2-L) out2.
// Distinct compact rows map to distinct local (row, head) pairs (query side: hdiv = 1),
// so no two warps touch the same row.
template <typename T>
__device__ void ring_merge(const RowMap M, float* __restrict__ acc_o, float* __restrict__ acc_l,
                           const T* __restrict__ o, const float* __restrict__ l) {
    ROW_LOOP(x, compact_rows(M)) {
        long long li = row_local(M, x);
        float l2 = l[x];
        if (l2 == neg_inf()) continue;  // empty partial: nothing to add
        float l1 = acc_l[li];
        float mx = fmaxf(l1, l2);
        float L = mx + log1pf(__expf(-fabsf(l1 - l2)));
        float w1 = l1 == neg_inf() ? 0.f : __expf(l1 - L);
        float w2 = __expf(l2 - L);
        float* ao = acc_o + li * M.E;
        const T* bo = o + x * M.E;
        for (int d = lane; d < M.E; d += 32) ao[d] = w1 * ao[d] + w2 * to_f(bo[d]);
        __syncwarp();
        if (lane == 0) acc_l[li] = L;
    }
}

// acc += x, elementwise.
template <typename T>
__device__ void ring_add(long long count, float* __restrict__ acc, const T* __restrict__ x) {
    GRID_LOOP(i, count) acc[i] += to_f(x[i]);
}

// y = x * s, elementwise, f32 -> T.
template <typename T>
__device__ void ring_convert(long long count, const float* __restrict__ x, T* __restrict__ y, float s) {
    GRID_LOOP(i, count) y[i] = from_f<T>(x[i] * s);
}

#define RING(T, NAME)                                                                             \
    extern "C" __global__ void ring_gather_##NAME(const RowMap M, const T* src, T* dst, float s) { \
        ring_gather<T>(M, src, dst, s);                                                           \
    }                                                                                             \
    extern "C" __global__ void ring_scatter_add_##NAME(const RowMap M, float* dst, const T* src) { \
        ring_scatter_add<T>(M, dst, src);                                                         \
    }                                                                                             \
    extern "C" __global__ void ring_merge_##NAME(const RowMap M, float* acc_o, float* acc_l,      \
                                                 const T* o, const float* l) {                    \
        ring_merge<T>(M, acc_o, acc_l, o, l);                                                     \
    }                                                                                             \
    extern "C" __global__ void ring_add_##NAME(long long count, float* acc, const T* x) {         \
        ring_add<T>(count, acc, x);                                                               \
    }                                                                                             \
    extern "C" __global__ void ring_convert_##NAME(long long count, const float* x, T* y,        \
                                                   float s) {                                     \
        ring_convert<T>(count, x, y, s);                                                          \
    }

RING(float, f32)
RING(bf16, bf16)
RING(f16, f16)

extern "C" __global__ void ring_fill_f32(long long count, float* x, float v) {
    GRID_LOOP(i, count) x[i] = v;
}
