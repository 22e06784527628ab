// Dilated attention (SPEC §1) on CUDA, compiled at run time by NVRTC.
//
// No header is included: bf16/f16 conversions, tensor-core MMAs, ldmatrix and cp.async are
// written as inline PTX, so NVRTC needs no include path for these kernels.
//
// Work decomposition (see CUDA.md beside this file). Positions are cut into blocks of
// `blk` rows (`blk` divides every capped segment, so a block lies inside one segment of
// every pattern); inside a block, rows are split into `step` classes by residue; a class
// is cut into tiles of R rows. A tile is an arithmetic progression of positions
// `base + j*step`, j < cnt. A CTA owns one tile of one (batch, head) and loops over every
// pattern of the schedule: for pattern i the tile's rows that take part (a per-row flag;
// uniform for the whole tile when r_i divides `step`) all share one key progression
// `a + o + jj*r`, jj < m, gathered straight from the (B, N, Hkv, D) buffers. The online
// softmax simply continues across patterns, which *is* the LSE combine of SPEC §1a
// (softmax over the multiset union of key sets); under HeadGroups a head takes part in one
// pattern only and the output gets the factor 1/G.

typedef unsigned short u16;
typedef unsigned int u32;

struct bf16 { u16 x; };
struct f16 { u16 x; };

#define MAXP 16

// Mirrored by `Params` in cuda_kernel.rs (#[repr(C)]): keep the field order identical.
struct Params {
    long long delta_stride;  // 0, or B*N*H when Δ is per pattern (detach_weights)
    int B, N, H, Hkv, D;
    int G;                   // number of patterns
    int headgroups;          // Combine::HeadGroups
    int causal;
    int has_mask;
    int blk;                 // block length (divides every capped segment)
    int step;                // class step (divides blk)
    int tiles;               // query tiles per (head, batch): the persistent forward's items
    int keyed;               // head groups: items with keys, dealt first (0: grid order)
    float scale;             // softmax scale
    float fac;               // output factor: 1 (Lse) or 1/G (HeadGroups)
    int w[MAXP];             // capped segment lengths
    int r[MAXP];             // dilations
    int hg0[MAXP];           // head group [hg0, hg1) per pattern (HeadGroups)
    int hg1[MAXP];
    int off[MAXP];           // offset of every head of pattern i under HeadGroups
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float(((u32)x.x) << 16); }
__device__ __forceinline__ float to_f(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.x));
    return f;
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(x));
    return r;
}
template <> __device__ __forceinline__ f16 from_f<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(x));
    return r;
}

// A tile: positions base + j*step, j < cnt.
struct Tile {
    int base;
    int step;
    int cnt;
};

// Decode tile index x of tiles of R rows; false if the tile is empty.
__device__ __forceinline__ bool decode_tile(const Params& P, int x, int R, Tile& t) {
    int cls_rows = (P.blk + P.step - 1) / P.step;
    int tpc = (cls_rows + R - 1) / R;
    int tic = x % tpc;
    int c = (x / tpc) % P.step;
    int bi = x / (tpc * P.step);
    if (c >= P.blk || bi * P.blk >= P.N) return false;
    int cnt_c = (P.blk - c + P.step - 1) / P.step;
    int j0 = tic * R;
    if (j0 >= cnt_c) return false;
    t.base = bi * P.blk + c + j0 * P.step;
    t.step = P.step;
    t.cnt = min(R, cnt_c - j0);
    return true;
}

// Query-owner kernels under causal masking: later tiles have more keys, so launch them
// first (longest-first order shortens the tail of the grid).
__device__ __forceinline__ int heavy_first(const Params& P) {
    return P.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
}

// Offset of head h in pattern i, or -1 if the head does not take part.
__device__ __forceinline__ int pat_offset(const Params& P, int i, int h) {
    int w = P.w[i], r = P.r[i];
    int o;
    if (P.headgroups) {
        if (h < P.hg0[i] || h >= P.hg1[i]) return -1;
        o = P.off[i];
    } else {
        o = h % r;
    }
    return o < w ? o : -1;
}

__device__ __forceinline__ long long qidx(const Params& P, int b, int p, int h) {
    return ((long long)(b * (long long)P.N + p) * P.H + h) * P.D;
}
__device__ __forceinline__ long long kidx(const Params& P, int b, int p, int g) {
    return ((long long)(b * (long long)P.N + p) * P.Hkv + g) * P.D;
}
__device__ __forceinline__ long long lidx(const Params& P, int b, int p, int h) {
    return (long long)(b * (long long)P.N + p) * P.H + h;
}

// ---------------------------------------------------------------------------------------
// Generic kernels: any element type, any D <= 128, f32 arithmetic on CUDA cores.
// 128 threads; owner tile GR rows, streamed tile GC rows.
// ---------------------------------------------------------------------------------------

#define GT 128
#define GR 16
#define GDMAX 128
#define GACC (GR * GDMAX / GT)

// Forward. delta_mode = 0: writes out, lse. delta_mode = 1: for each pattern i writes
// Δ_i = dO · out_i into delta[i * delta_stride + (b, p, h)] (per-pattern softmax, used by
// detach_weights), out/lse untouched.
template <typename T, int GC>
__device__ void fwd_generic(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                            const T* __restrict__ v, const unsigned char* __restrict__ mask,
                            T* __restrict__ out, float* __restrict__ lse,
                            const T* __restrict__ dout, float* __restrict__ delta,
                            int delta_mode) {
    __shared__ float Qs[GR][GDMAX];
    __shared__ float Ks[GC][GDMAX + 1];
    __shared__ float Vs[GC][GDMAX];
    __shared__ float S[GR][GC + 1];
    __shared__ float rowm[GR], rowl[GR], alpha[GR], dsum[GR];
    __shared__ int qpos[GR], part[GR], kpos[GC], kok[GC];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, blockIdx.x, GR, t)) return;
    const int D = P.D, g = h / (P.H / P.Hkv);

    if (tid < GR) {
        qpos[tid] = tid < t.cnt ? t.base + tid * t.step : -1;
        rowm[tid] = neg_inf();
        rowl[tid] = 0.f;
    }
    for (int e = tid; e < GR * D; e += GT) {
        int rr = e / D, d = e % D;
        Qs[rr][d] = rr < t.cnt ? to_f(q[qidx(P, b, t.base + rr * t.step, h) + d]) * P.scale : 0.f;
    }
    float acc[GACC];
#pragma unroll
    for (int u = 0; u < GACC; ++u) acc[u] = 0.f;
    __syncthreads();

    for (int i = 0; i < P.G; ++i) {
        const int o = pat_offset(P, i, h);
        if (o < 0) continue;  // uniform
        const int w = P.w[i], r = P.r[i];
        const int a = (t.base / w) * w;
        const int m = (w - o + r - 1) / r;
        if (tid < GR) part[tid] = (tid < t.cnt) && (((qpos[tid] - a) % r) == o);
        if (delta_mode) {
            if (tid < GR) {
                rowm[tid] = neg_inf();
                rowl[tid] = 0.f;
            }
#pragma unroll
            for (int u = 0; u < GACC; ++u) acc[u] = 0.f;
        }
        __syncthreads();
        int any = 0, qmax = -1;
        for (int j = 0; j < GR; ++j)
            if (part[j]) {
                any = 1;
                qmax = max(qmax, qpos[j]);
            }
        if (any) {
            for (int k0 = 0; k0 < m; k0 += GC) {
                if (P.causal && a + o + k0 * r > qmax) break;  // uniform
                if (tid < GC) {
                    int jj = k0 + tid;
                    int kp = a + o + jj * r;
                    int ok = jj < m;
                    if (ok && P.has_mask) ok = mask[(long long)b * P.N + kp] != 0;
                    kpos[tid] = kp;
                    kok[tid] = ok;
                }
                for (int e = tid; e < GC * D; e += GT) {
                    int j = e / D, d = e % D;
                    int jj = k0 + j;
                    float kv = 0.f, vv = 0.f;
                    if (jj < m) {
                        long long ix = kidx(P, b, a + o + jj * r, g) + d;
                        kv = to_f(k[ix]);
                        vv = to_f(v[ix]);
                    }
                    Ks[j][d] = kv;
                    Vs[j][d] = vv;
                }
                __syncthreads();
                for (int e = tid; e < GR * GC; e += GT) {
                    int rr = e / GC, c = e % GC;
                    float s = 0.f;
                    for (int d = 0; d < D; ++d) s += Qs[rr][d] * Ks[c][d];
                    bool ok = part[rr] && kok[c] && (!P.causal || kpos[c] <= qpos[rr]);
                    S[rr][c] = ok ? s : neg_inf();
                }
                __syncthreads();
                // Online softmax: each warp takes GR/4 rows; lanes walk the columns.
                for (int rr = warp * (GR / 4); rr < (warp + 1) * (GR / 4); ++rr) {
                    float mx = neg_inf();
                    for (int c = lane; c < GC; c += 32) mx = fmaxf(mx, S[rr][c]);
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                    float mold = rowm[rr];
                    float mnew = fmaxf(mold, mx);
                    float muse = mnew == neg_inf() ? 0.f : mnew;
                    float sum = 0.f;
                    for (int c = lane; c < GC; c += 32) {
                        float p = __expf(S[rr][c] - muse);
                        S[rr][c] = p;
                        sum += p;
                    }
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                    __syncwarp();
                    if (lane == 0) {
                        float al = __expf(mold - muse);
                        rowl[rr] = rowl[rr] * al + sum;
                        rowm[rr] = mnew;
                        alpha[rr] = al;
                    }
                }
                __syncthreads();
#pragma unroll
                for (int u = 0; u < GACC; ++u) {
                    int e = tid + GT * u;
                    if (e < GR * D) {
                        int rr = e / D, d = e % D;
                        float x = acc[u] * alpha[rr];
                        for (int c = 0; c < GC; ++c) x += S[rr][c] * Vs[c][d];
                        acc[u] = x;
                    }
                }
                __syncthreads();
            }
            if (delta_mode) {
                if (tid < GR) dsum[tid] = 0.f;
                __syncthreads();
#pragma unroll
                for (int u = 0; u < GACC; ++u) {
                    int e = tid + GT * u;
                    if (e < GR * D) {
                        int rr = e / D, d = e % D;
                        if (part[rr]) atomicAdd(&dsum[rr], acc[u] * to_f(dout[qidx(P, b, qpos[rr], h) + d]));
                    }
                }
                __syncthreads();
                if (tid < GR && part[tid]) {
                    float l = rowl[tid];
                    delta[(long long)i * P.delta_stride + lidx(P, b, qpos[tid], h)] = l > 0.f ? dsum[tid] / l : 0.f;
                }
            }
        }
        __syncthreads();
    }
    if (!delta_mode) {
#pragma unroll
        for (int u = 0; u < GACC; ++u) {
            int e = tid + GT * u;
            if (e < GR * D) {
                int rr = e / D, d = e % D;
                if (rr < t.cnt) {
                    float l = rowl[rr];
                    float val = l > 0.f ? acc[u] / l * P.fac : 0.f;
                    out[qidx(P, b, qpos[rr], h) + d] = from_f<T>(val);
                }
            }
        }
        if (tid < t.cnt) {
            float l = rowl[tid];
            lse[lidx(P, b, qpos[tid], h)] = l > 0.f ? rowm[tid] + logf(l) : neg_inf();
        }
    }
}

// dQ: owner = query tile (GR rows), streamed = key tiles (GC rows).
// P = exp(s - L), dP = fac·dO·v, dS = P (dP - Δ_i), dQ = scale · Σ dS k.
template <typename T, int GC>
__device__ void dq_generic(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const unsigned char* __restrict__ mask,
                           const float* __restrict__ lse, const T* __restrict__ dout,
                           const float* __restrict__ delta, T* __restrict__ dq) {
    __shared__ float Qs[GR][GDMAX];
    __shared__ float Os[GR][GDMAX];
    __shared__ float Ks[GC][GDMAX + 1];
    __shared__ float Vs[GC][GDMAX + 1];
    __shared__ float S[GR][GC + 1];
    __shared__ float Lr[GR], Dr[GR];
    __shared__ int qpos[GR], part[GR], kpos[GC], kok[GC];

    const int tid = threadIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, blockIdx.x, GR, t)) return;
    const int D = P.D, g = h / (P.H / P.Hkv);
    if (tid < GR) {
        qpos[tid] = tid < t.cnt ? t.base + tid * t.step : -1;
        Lr[tid] = tid < t.cnt ? lse[lidx(P, b, qpos[tid], h)] : neg_inf();
    }
    for (int e = tid; e < GR * D; e += GT) {
        int rr = e / D, d = e % D;
        bool in = rr < t.cnt;
        long long ix = in ? qidx(P, b, t.base + rr * t.step, h) + d : 0;
        Qs[rr][d] = in ? to_f(q[ix]) * P.scale : 0.f;
        Os[rr][d] = in ? to_f(dout[ix]) * P.fac : 0.f;
    }
    float acc[GACC];
#pragma unroll
    for (int u = 0; u < GACC; ++u) acc[u] = 0.f;
    __syncthreads();

    for (int i = 0; i < P.G; ++i) {
        const int o = pat_offset(P, i, h);
        if (o < 0) continue;
        const int w = P.w[i], r = P.r[i];
        const int a = (t.base / w) * w;
        const int m = (w - o + r - 1) / r;
        if (tid < GR) {
            part[tid] = (tid < t.cnt) && (((qpos[tid] - a) % r) == o) && Lr[tid] != neg_inf();
            Dr[tid] = part[tid] ? delta[(long long)i * P.delta_stride + lidx(P, b, qpos[tid], h)] : 0.f;
        }
        __syncthreads();
        int any = 0, qmax = -1;
        for (int j = 0; j < GR; ++j)
            if (part[j]) {
                any = 1;
                qmax = max(qmax, qpos[j]);
            }
        if (any) {
            for (int k0 = 0; k0 < m; k0 += GC) {
                if (P.causal && a + o + k0 * r > qmax) break;
                if (tid < GC) {
                    int jj = k0 + tid;
                    int kp = a + o + jj * r;
                    int ok = jj < m;
                    if (ok && P.has_mask) ok = mask[(long long)b * P.N + kp] != 0;
                    kpos[tid] = kp;
                    kok[tid] = ok;
                }
                for (int e = tid; e < GC * D; e += GT) {
                    int j = e / D, d = e % D;
                    int jj = k0 + j;
                    float kv = 0.f, vv = 0.f;
                    if (jj < m) {
                        long long ix = kidx(P, b, a + o + jj * r, g) + d;
                        kv = to_f(k[ix]);
                        vv = to_f(v[ix]);
                    }
                    Ks[j][d] = kv;
                    Vs[j][d] = vv;
                }
                __syncthreads();
                for (int e = tid; e < GR * GC; e += GT) {
                    int rr = e / GC, c = e % GC;
                    float ds = 0.f;
                    if (part[rr] && kok[c] && (!P.causal || kpos[c] <= qpos[rr])) {
                        float s = 0.f, dp = 0.f;
                        for (int d = 0; d < D; ++d) {
                            s += Qs[rr][d] * Ks[c][d];
                            dp += Os[rr][d] * Vs[c][d];
                        }
                        float p = __expf(s - Lr[rr]);
                        ds = p * (dp - Dr[rr]);
                    }
                    S[rr][c] = ds;
                }
                __syncthreads();
#pragma unroll
                for (int u = 0; u < GACC; ++u) {
                    int e = tid + GT * u;
                    if (e < GR * D) {
                        int rr = e / D, d = e % D;
                        float x = acc[u];
                        for (int c = 0; c < GC; ++c) x += S[rr][c] * Ks[c][d];
                        acc[u] = x;
                    }
                }
                __syncthreads();
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < GACC; ++u) {
        int e = tid + GT * u;
        if (e < GR * D) {
            int rr = e / D, d = e % D;
            if (rr < t.cnt) dq[qidx(P, b, qpos[rr], h) + d] = from_f<T>(acc[u] * P.scale);
        }
    }
}

// dK, dV: owner = key tile (GR rows) of kv head g, streamed = query tiles (GC rows) of every
// query head of the group, every pattern. No atomics: a key row belongs to one tile.
template <typename T, int GC>
__device__ void dkdv_generic(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const unsigned char* __restrict__ mask,
                             const float* __restrict__ lse, const T* __restrict__ dout,
                             const float* __restrict__ delta, T* __restrict__ dk,
                             T* __restrict__ dv) {
    __shared__ float Kown[GR][GDMAX + 1];
    __shared__ float Vown[GR][GDMAX + 1];
    __shared__ float Qs[GC][GDMAX + 1];
    __shared__ float Os[GC][GDMAX + 1];
    __shared__ float Ps[GR][GC + 1];
    __shared__ float Ds[GR][GC + 1];
    __shared__ float Lq[GC], Dq[GC];
    __shared__ int kpos[GR], kpart[GR], kin[GR], qpos[GC], qok[GC];

    const int tid = threadIdx.x;
    const int g = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, blockIdx.x, GR, t)) return;
    const int D = P.D, grp = P.H / P.Hkv;
    if (tid < GR) {
        kpos[tid] = tid < t.cnt ? t.base + tid * t.step : -1;
        int ok = tid < t.cnt;
        if (ok && P.has_mask) ok = mask[(long long)b * P.N + kpos[tid]] != 0;
        kin[tid] = ok;
    }
    for (int e = tid; e < GR * D; e += GT) {
        int rr = e / D, d = e % D;
        bool in = rr < t.cnt;
        long long ix = in ? kidx(P, b, t.base + rr * t.step, g) + d : 0;
        Kown[rr][d] = in ? to_f(k[ix]) : 0.f;
        Vown[rr][d] = in ? to_f(v[ix]) : 0.f;
    }
    float adk[GACC], adv[GACC];
#pragma unroll
    for (int u = 0; u < GACC; ++u) {
        adk[u] = 0.f;
        adv[u] = 0.f;
    }
    __syncthreads();

    for (int hh = 0; hh < grp; ++hh) {
        const int h = g * grp + hh;
        for (int i = 0; i < P.G; ++i) {
            const int o = pat_offset(P, i, h);
            if (o < 0) continue;
            const int w = P.w[i], r = P.r[i];
            const int a = (t.base / w) * w;
            const int m = (w - o + r - 1) / r;
            if (tid < GR) kpart[tid] = kin[tid] && (((kpos[tid] - a) % r) == o);
            __syncthreads();
            int any = 0, kmin = 0x7fffffff;
            for (int j = 0; j < GR; ++j)
                if (kpart[j]) {
                    any = 1;
                    kmin = min(kmin, kpos[j]);
                }
            if (any) {
                int q0 = 0;
                if (P.causal) q0 = ((kmin - a - o) / r) / GC * GC;
                for (; q0 < m; q0 += GC) {
                    if (tid < GC) {
                        int jj = q0 + tid;
                        int qp = a + o + jj * r;
                        int ok = jj < m;
                        float L = ok ? lse[lidx(P, b, qp, h)] : neg_inf();
                        ok = ok && L != neg_inf();
                        qpos[tid] = qp;
                        qok[tid] = ok;
                        Lq[tid] = L;
                        Dq[tid] = ok ? delta[(long long)i * P.delta_stride + lidx(P, b, qp, h)] : 0.f;
                    }
                    for (int e = tid; e < GC * D; e += GT) {
                        int j = e / D, d = e % D;
                        int jj = q0 + j;
                        float qv = 0.f, ov = 0.f;
                        if (jj < m) {
                            long long ix = qidx(P, b, a + o + jj * r, h) + d;
                            qv = to_f(q[ix]) * P.scale;
                            ov = to_f(dout[ix]) * P.fac;
                        }
                        Qs[j][d] = qv;
                        Os[j][d] = ov;
                    }
                    __syncthreads();
                    for (int e = tid; e < GR * GC; e += GT) {
                        int kr = e / GC, c = e % GC;
                        float p = 0.f, ds = 0.f;
                        if (kpart[kr] && qok[c] && (!P.causal || kpos[kr] <= qpos[c])) {
                            float s = 0.f, dp = 0.f;
                            for (int d = 0; d < D; ++d) {
                                s += Kown[kr][d] * Qs[c][d];
                                dp += Vown[kr][d] * Os[c][d];
                            }
                            p = __expf(s - Lq[c]);
                            ds = p * (dp - Dq[c]);
                        }
                        Ps[kr][c] = p;
                        Ds[kr][c] = ds;
                    }
                    __syncthreads();
#pragma unroll
                    for (int u = 0; u < GACC; ++u) {
                        int e = tid + GT * u;
                        if (e < GR * D) {
                            int kr = e / D, d = e % D;
                            float xv = adv[u], xk = adk[u];
                            for (int c = 0; c < GC; ++c) {
                                xv += Ps[kr][c] * Os[c][d];
                                xk += Ds[kr][c] * Qs[c][d];
                            }
                            adv[u] = xv;
                            adk[u] = xk;
                        }
                    }
                    __syncthreads();
                }
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int u = 0; u < GACC; ++u) {
        int e = tid + GT * u;
        if (e < GR * D) {
            int kr = e / D, d = e % D;
            if (kr < t.cnt) {
                long long ix = kidx(P, b, kpos[kr], g) + d;
                dk[ix] = from_f<T>(adk[u]);
                dv[ix] = from_f<T>(adv[u]);
            }
        }
    }
}

// Δ = rowsum(dO ∘ O) per (b, p, h): one warp per row.
template <typename T>
__device__ void delta_dot(const Params& P, const T* __restrict__ out, const T* __restrict__ dout,
                          float* __restrict__ delta) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    long long rows = (long long)P.B * P.N * P.H;
    if (row >= rows) return;
    float s = 0.f;
    for (int d = lane; d < P.D; d += 32) s += to_f(out[row * P.D + d]) * to_f(dout[row * P.D + d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) delta[row] = s;
}

// ---------------------------------------------------------------------------------------
// Tensor-core forward (bf16 / f16, D = 64 or 128): FlashAttention-2 style on mma.sync
// m16n8k16 with f32 accumulation. 4 warps, 64 query rows (16 per warp), key tiles of 64
// rows double-buffered in shared memory through cp.async, gathered row by row from the
// dilated progression.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_u32(const void* p) {
    // The intrinsic (not inline PTX) lets the compiler fold constant offsets of unrolled
    // loops into the ldmatrix / cp.async immediates.
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// cp.async ROWS rows of D 16-bit elements from each of NS tensors (the same rows of each:
// row j < valid from src[s] + base + j*step elements, rows j >= valid zero-filled) into
// shared memory at byte address dst[s]. Layout: SW = false, rows of D + 8 elements (the
// mma.sync kernels' conflict-free padding); SW = true, the 128-byte-swizzled column blocks
// that wgmma reads (dst 1024-byte aligned; 16-byte chunk c of row r of a column block at
// r*128 + ((c ^ (r & 7)) << 4)). Each thread copies one chunk column of rows tid / CH,
// + NT / CH, ...: one 64-bit add per row for the address, shared by the NS tensors (the
// row offset is kept as a running sum, not recomputed as a product per row and tensor).
template <int D, int NT, int ROWS, bool SW, int NS>
__device__ __forceinline__ void load_rows_n(const u32 (&dst)[NS], const void* const (&src)[NS], int valid,
                                            long long base, long long step, int tid) {
    constexpr int LD = D + 8, CH = D / 8, RPI = NT / CH;
    static_assert(NT % CH == 0 && ROWS % RPI == 0, "tile shape");
    const int c = tid % CH, r0 = tid / CH;
    long long off = base + (long long)r0 * step + c * 8;
    const long long inc = (long long)RPI * step;
#pragma unroll
    for (int it = 0; it < ROWS / RPI; ++it) {
        const int rr = r0 + it * RPI;
        const bool in = rr < valid;
        // (rr & 7) == (r0 & 7) when RPI is a multiple of 8: then the swizzle is a constant.
        const u32 so = SW ? (c >> 3) * (ROWS * 128) + rr * 128 + (((c & 7) ^ (rr & 7)) << 4) : (rr * LD + c * 8) * 2;
        const long long o = in ? off : 0;
#pragma unroll
        for (int s = 0; s < NS; ++s) cp_async16(dst[s] + so, (const u16*)src[s] + o, in ? 16 : 0);
        off += inc;
    }
}

// One tensor's rows into the padded mma.sync layout (see load_rows_n).
template <int D, int NT, int ROWS>
__device__ __forceinline__ void load_rows(u32 dst, const void* src, int valid, long long base, long long step,
                                          int tid) {
    const u32 d[1] = {dst};
    const void* const s[1] = {src};
    load_rows_n<D, NT, ROWS, false, 1>(d, s, valid, base, step, tid);
}

// The same rows of two tensors (K and V, or Q and dO) into the padded layout.
template <int D, int NT, int ROWS>
__device__ __forceinline__ void load_rows2(u32 dst0, const void* src0, u32 dst1, const void* src1, int valid,
                                           long long base, long long step, int tid) {
    const u32 d[2] = {dst0, dst1};
    const void* const s[2] = {src0, src1};
    load_rows_n<D, NT, ROWS, false, 2>(d, s, valid, base, step, tid);
}

// 2^x as one MUFU.EX2 (flush-to-zero; exp2f would add a denormal fix-up around it).
// ex2(-inf) = 0.
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T> struct Mma;
template <> struct Mma<bf16> {
    __device__ __forceinline__ static void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Pack (lo, hi) into one register: lo in the low half.
    __device__ __forceinline__ static u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Mma<f16> {
    __device__ __forceinline__ static void run(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

#define TBQ 64
#define TBK 64

// Per-pattern state shared by every thread of the CTA (computed redundantly).
struct PatState {
    int i;     // pattern index (G when done)
    int k0;    // first key index of the current tile
    int o, a, m, r;
    int qmax;  // largest participating query position
    int qmin;  // smallest participating query position
    int all;   // every tile row takes part
};

// Set up pattern st.i; false if no row of the tile takes part.
__device__ __forceinline__ bool tc_setup(const Params& P, const Tile& t, int h, PatState& st, int rows) {
    int o = pat_offset(P, st.i, h);
    if (o < 0) return false;
    int w = P.w[st.i], r = P.r[st.i];
    int a = (t.base / w) * w;
    int qmax = -1, qmin = 0x7fffffff, cntp = 0;
    if (t.step % r == 0) {
        // Uniform participation.
        if (((t.base - a) % r) == o) {
            cntp = t.cnt;
            qmin = t.base;
            qmax = t.base + (t.cnt - 1) * t.step;
        }
    } else {
        for (int j = 0; j < t.cnt; ++j) {
            int p = t.base + j * t.step;
            if (((p - a) % r) == o) {
                ++cntp;
                qmax = p;
                qmin = min(qmin, p);
            }
        }
    }
    if (cntp == 0) return false;
    st.o = o;
    st.a = a;
    st.r = r;
    st.m = (w - o + r - 1) / r;
    st.qmax = qmax;
    st.qmin = qmin;
    st.all = cntp == rows;
    st.k0 = 0;
    return true;
}

// Advance to the next key tile of BK rows (possibly of a later pattern); false when done.
template <int BK = TBK>
__device__ __forceinline__ bool tc_next(const Params& P, const Tile& t, int h, PatState& st, int rows = TBQ) {
    st.k0 += BK;
    while (true) {
        if (st.i >= 0 && st.i < P.G && st.k0 < st.m && !(P.causal && st.a + st.o + st.k0 * st.r > st.qmax))
            return true;
        st.i++;
        if (st.i >= P.G) return false;
        if (!tc_setup(P, t, h, st, rows)) st.m = 0;  // no row: loop on to the next pattern
    }
}

// Metadata of row `tid` < ROWS of a streamed key tile (pattern state st, first key index
// st.k0), stored at kpos[tid] / kok[tid]: the key's position, and whether it exists and is
// not masked out.
template <int ROWS>
__device__ __forceinline__ void key_meta(const Params& P, const PatState& st, int b, const unsigned char* mask,
                                         int tid, int* kpos, int* kok) {
    if (tid < ROWS) {
        int jj = st.k0 + tid;
        int kp = st.a + st.o + jj * st.r;
        int ok = jj < st.m;
        if (ok && P.has_mask) ok = mask[(long long)b * P.N + kp] != 0;
        kpos[tid] = kp;
        kok[tid] = ok;
    }
}

template <typename T, int D, int WARPS, int MT>
__device__ void fwd_tc(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const unsigned char* __restrict__ mask,
                       T* __restrict__ out, float* __restrict__ lse) {
    constexpr int LD = D + 8;  // smem row stride (elements): 16-byte aligned, conflict-free
    constexpr int RQ = 16 * WARPS * MT, NT = 32 * WARPS;  // query rows, threads
    // Q fragments live in registers unless that would not fit (MT = 2 with D = 128: then
    // they are re-read from shared memory per key tile).
    constexpr bool QREG = MT * D <= 128;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* Qs = (u16*)smem_raw;
    u16* Ks = Qs + RQ * LD;
    u16* Vs = Ks + 2 * TBK * LD;
    int* kposS = (int*)(Vs + 2 * TBK * LD);
    int* kokS = kposS + 2 * TBK;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, heavy_first(P), RQ, t)) return;
    const int g = h / (P.H / P.Hkv);

    // Gather Q rows.
    load_rows<D, NT, RQ>(smem_u32(Qs), q, t.cnt, qidx(P, b, t.base, h), (long long)P.H * P.D * t.step, tid);
    cp_commit();

    auto load_kv = [&](const PatState& st, int stage) {
        const long long base = kidx(P, b, st.a + st.o + st.k0 * st.r, g);
        const long long step = (long long)st.r * P.Hkv * P.D;
        load_rows2<D, NT, TBK>(smem_u32(Ks + stage * TBK * LD), k, smem_u32(Vs + stage * TBK * LD), v,
                               st.m - st.k0, base, step, tid);
        key_meta<TBK>(P, st, b, mask, tid, kposS + stage * TBK, kokS + stage * TBK);
    };

    // This thread's rows: m-tile mt of warp w covers tile rows (mt*WARPS + w)*16 + [0, 16);
    // the thread holds rows lane/4 and lane/4 + 8 of it (index 2*mt and 2*mt + 1 below).
    int rp[2 * MT];
    bool rin[2 * MT], part[2 * MT];
#pragma unroll
    for (int x = 0; x < 2 * MT; ++x) {
        const int row = ((x / 2) * WARPS + warp) * 16 + (lane >> 2) + (x & 1) * 8;
        rp[x] = t.base + row * t.step;
        rin[x] = row < t.cnt;
        part[x] = false;
    }

    const float sl2 = P.scale * 1.4426950408889634f;  // scale · log2(e)
    float m[2 * MT], l[2 * MT];
    float oacc[MT][D / 8][4];
#pragma unroll
    for (int x = 0; x < 2 * MT; ++x) {
        m[x] = neg_inf();
        l[x] = 0.f;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) oacc[mt][n][0] = oacc[mt][n][1] = oacc[mt][n][2] = oacc[mt][n][3] = 0.f;

    PatState cur;
    cur.i = -1;
    cur.m = 0;
    cur.k0 = 0;
    bool have = tc_next<TBK>(P, t, h, cur, RQ);
    if (have) load_kv(cur, 0);
    cp_commit();

    cp_wait<1>();
    __syncthreads();
    u32 qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
    if (QREG) {
#pragma unroll
        for (int mt = 0; mt < (QREG ? MT : 1); ++mt)
#pragma unroll
            for (int kk = 0; kk < (QREG ? D / 16 : 1); ++kk)
                ldm_x4(smem_u32(Qs + ((mt * WARPS + warp) * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8),
                       qf[mt][kk][0], qf[mt][kk][1], qf[mt][kk][2], qf[mt][kk][3]);
    }

    int stage = 0, cur_i = -1;
    while (have) {
        PatState nx = cur;
        bool hn = tc_next<TBK>(P, t, h, nx, RQ);
        if (hn) load_kv(nx, stage ^ 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();

        if (cur.i != cur_i) {
            cur_i = cur.i;
#pragma unroll
            for (int x = 0; x < 2 * MT; ++x) part[x] = rin[x] && (((rp[x] - cur.a) % cur.r) == cur.o);
        }
        const u16* kb = Ks + stage * TBK * LD;
        const u16* vb = Vs + stage * TBK * LD;
        const int* kp = kposS + stage * TBK;
        const int* ko = kokS + stage * TBK;

        // S = Q Kᵀ (16·MT x 64 per warp): each K fragment feeds MT row tiles.
        float s[MT][TBK / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < TBK / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            u32 qa[MT][2][4];
            if (!QREG) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        ldm_x4(smem_u32(Qs + ((mt * WARPS + warp) * 16 + (lane & 15)) * LD + (kk + j) * 16 +
                                        (lane >> 4) * 8),
                               qa[mt][j][0], qa[mt][j][1], qa[mt][j][2], qa[mt][j][3]);
            }
#pragma unroll
            for (int n = 0; n < TBK / 8; ++n) {
                u32 b0, b1, b2, b3;
                ldm_x4(smem_u32(kb + (n * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const u32* a0 = QREG ? qf[QREG ? mt : 0][QREG ? kk : 0] : qa[mt][0];
                    const u32* a1 = QREG ? qf[QREG ? mt : 0][QREG ? kk + 1 : 0] : qa[mt][1];
                    Mma<T>::run(s[mt][n], a0, b0, b1);
                    Mma<T>::run(s[mt][n], a1, b2, b3);
                }
            }
        }
        // Mask (one uniform branch, branch-free inside), row max of the raw scores, then
        // p = exp2(s·scale·log2 e − m) as one FFMA + MUFU per element.
        const bool need_mask = !cur.all || P.has_mask || cur.k0 + TBK > cur.m ||
                               (P.causal && cur.a + cur.o + (cur.k0 + TBK - 1) * cur.r > cur.qmin);
        if (sl2 <= 0.f) {  // a non-positive scale: fold it in first so the max stays valid
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < TBK / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][n][e] *= sl2;
        }
        const float sm = sl2 > 0.f ? sl2 : 1.f;
        if (need_mask) {
#pragma unroll
            for (int n = 0; n < TBK / 8; ++n) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int col = n * 8 + (lane & 3) * 2 + j;
                    const int kok = ko[col], kpc = kp[col];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const bool c0 = part[2 * mt] & (kok != 0) & ((!P.causal) | (kpc <= rp[2 * mt]));
                        const bool c1 = part[2 * mt + 1] & (kok != 0) & ((!P.causal) | (kpc <= rp[2 * mt + 1]));
                        s[mt][n][j] = c0 ? s[mt][n][j] : neg_inf();
                        s[mt][n][2 + j] = c1 ? s[mt][n][2 + j] : neg_inf();
                    }
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
            for (int n = 0; n < TBK / 8; ++n) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m[2 * mt], mx0 * sm), mn1 = fmaxf(m[2 * mt + 1], mx1 * sm);
            const float mu0 = mn0 == neg_inf() ? 0.f : mn0, mu1 = mn1 == neg_inf() ? 0.f : mn1;
            const float al0 = ex2(m[2 * mt] - mu0), al1 = ex2(m[2 * mt + 1] - mu1);
            m[2 * mt] = mn0;
            m[2 * mt + 1] = mn1;
            float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
            for (int n = 0; n < TBK / 8; ++n) {
                s[mt][n][0] = ex2(fmaf(s[mt][n][0], sm, -mu0));
                s[mt][n][1] = ex2(fmaf(s[mt][n][1], sm, -mu0));
                s[mt][n][2] = ex2(fmaf(s[mt][n][2], sm, -mu1));
                s[mt][n][3] = ex2(fmaf(s[mt][n][3], sm, -mu1));
                rs0 += s[mt][n][0] + s[mt][n][1];
                rs1 += s[mt][n][2] + s[mt][n][3];
            }
            l[2 * mt] = l[2 * mt] * al0 + rs0;
            l[2 * mt + 1] = l[2 * mt + 1] * al1 + rs1;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                oacc[mt][n][0] *= al0;
                oacc[mt][n][1] *= al0;
                oacc[mt][n][2] *= al1;
                oacc[mt][n][3] *= al1;
            }
        }
        // O += P V: each V fragment feeds MT row tiles.
#pragma unroll
        for (int kc = 0; kc < TBK / 16; ++kc) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Mma<T>::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                a[mt][1] = Mma<T>::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                a[mt][2] = Mma<T>::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                a[mt][3] = Mma<T>::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                u32 b0, b1, b2, b3;
                ldm_x4_t(smem_u32(vb + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n * 8 + (lane >> 4) * 8),
                         b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(oacc[mt][n], a[mt], b0, b1);
                    Mma<T>::run(oacc[mt][n + 1], a[mt], b2, b3);
                }
            }
        }
        __syncthreads();
        cur = nx;
        have = hn;
        stage ^= 1;
    }
    cp_wait<0>();

    const float ln2 = 0.6931471805599453f;
#pragma unroll
    for (int x = 0; x < 2 * MT; ++x) {
        l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
        l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const float f0 = l[2 * mt] > 0.f ? P.fac / l[2 * mt] : 0.f;
        const float f1 = l[2 * mt + 1] > 0.f ? P.fac / l[2 * mt + 1] : 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int d = n * 8 + (lane & 3) * 2;
            if (rin[2 * mt])
                *(u32*)(out + qidx(P, b, rp[2 * mt], h) + d) =
                    Mma<T>::pack(oacc[mt][n][0] * f0, oacc[mt][n][1] * f0);
            if (rin[2 * mt + 1])
                *(u32*)(out + qidx(P, b, rp[2 * mt + 1], h) + d) =
                    Mma<T>::pack(oacc[mt][n][2] * f1, oacc[mt][n][3] * f1);
        }
    }
    if ((lane & 3) == 0) {
#pragma unroll
        for (int x = 0; x < 2 * MT; ++x)
            if (rin[x]) lse[lidx(P, b, rp[x], h)] = l[x] > 0.f ? m[x] * ln2 + logf(l[x]) : neg_inf();
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core backward (bf16 / f16, D = 64 or 128), FlashAttention-2 style, two kernels:
//   dq_tc:   owner = 64 query rows (16 per warp), streams key tiles of BS rows;
//   dkdv_tc: owner = 64 key rows of kv head g, streams query tiles of BS rows of every
//            query head of the group and every pattern.
// P = exp(s - L), dP = fac·dO·vᵀ, dS = P (dP - Δ_i); dV = Σ fac·P dO, dK = scale Σ dS q,
// dQ = scale Σ dS k. P and dS are rounded to the input type for the MMAs (as FlashAttention
// does); every accumulator is f32. No atomics: each kernel writes only its own rows.
// ---------------------------------------------------------------------------------------

// S[16 x BS] += A(16 x D, rows `arow` of `as`) · B(BS x D, rows of `bs`)ᵀ for one warp.
template <typename T, int D, int BS>
__device__ __forceinline__ void mma_abt(float (*s)[4], const u16* as, const u16* bs, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
        u32 a0[4], a1[4];
        ldm_x4(smem_u32(as + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8), a0[0], a0[1], a0[2], a0[3]);
        ldm_x4(smem_u32(as + (lane & 15) * LD + (kk + 1) * 16 + (lane >> 4) * 8), a1[0], a1[1], a1[2], a1[3]);
#pragma unroll
        for (int n = 0; n < BS / 8; ++n) {
            u32 b0, b1, b2, b3;
            ldm_x4(smem_u32(bs + (n * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8), b0, b1, b2, b3);
            Mma<T>::run(s[n], a0, b0, b1);
            Mma<T>::run(s[n], a1, b2, b3);
        }
    }
}

// As mma_abt with A already in registers (fragments of ldmatrix.x4 per 16 columns).
template <typename T, int D, int BS>
__device__ __forceinline__ void mma_rbt(float (*s)[4], const u32 (*af)[4], const u16* bs, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
#pragma unroll
        for (int n = 0; n < BS / 8; ++n) {
            u32 b0, b1, b2, b3;
            ldm_x4(smem_u32(bs + (n * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8), b0, b1, b2, b3);
            Mma<T>::run(s[n], af[kk], b0, b1);
            Mma<T>::run(s[n], af[kk + 1], b2, b3);
        }
    }
}

// acc[16 x D] += X(16 x BS, C-fragments in registers) · B(BS x D, rows of `bs`).
template <typename T, int D, int BS>
__device__ __forceinline__ void mma_xb(float (*acc)[4], const float (*x)[4], const u16* bs, int lane) {
    constexpr int LD = D + 8;
#pragma unroll
    for (int kc = 0; kc < BS / 16; ++kc) {
        u32 a[4];
        a[0] = Mma<T>::pack(x[2 * kc][0], x[2 * kc][1]);
        a[1] = Mma<T>::pack(x[2 * kc][2], x[2 * kc][3]);
        a[2] = Mma<T>::pack(x[2 * kc + 1][0], x[2 * kc + 1][1]);
        a[3] = Mma<T>::pack(x[2 * kc + 1][2], x[2 * kc + 1][3]);
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            u32 b0, b1, b2, b3;
            ldm_x4_t(smem_u32(bs + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n * 8 + (lane >> 4) * 8), b0, b1,
                     b2, b3);
            Mma<T>::run(acc[n], a, b0, b1);
            Mma<T>::run(acc[n + 1], a, b2, b3);
        }
    }
}

template <typename T, int D, int BS, int WARPS>
__device__ void dq_tc(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const unsigned char* __restrict__ mask,
                      const float* __restrict__ lse, const T* __restrict__ dout,
                      const float* __restrict__ delta, T* __restrict__ dq) {
    constexpr int LD = D + 8;
    constexpr int RQ = 16 * WARPS, NT = 32 * WARPS;  // owner query rows, threads
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* Qs = (u16*)smem_raw;        // RQ x LD
    u16* Os = Qs + RQ * LD;          // RQ x LD (dO)
    u16* Ks = Os + RQ * LD;          // 3 x BS x LD
    u16* Vs = Ks + 3 * BS * LD;      // 3 x BS x LD
    int* kposS = (int*)(Vs + 3 * BS * LD);
    int* kokS = kposS + 3 * BS;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, heavy_first(P), RQ, t)) return;
    const int g = h / (P.H / P.Hkv);
    const long long qrow = (long long)P.H * P.D * t.step;
    load_rows2<D, NT, RQ>(smem_u32(Qs), q, smem_u32(Os), dout,
                          t.cnt, qidx(P, b, t.base, h), qrow, tid);
    cp_commit();

    auto load_kv = [&](const PatState& st, int stage) {
        const long long base = kidx(P, b, st.a + st.o + st.k0 * st.r, g);
        const long long step = (long long)st.r * P.Hkv * P.D;
        load_rows2<D, NT, BS>(smem_u32(Ks + stage * BS * LD), k, smem_u32(Vs + stage * BS * LD), v,
                              st.m - st.k0, base, step, tid);
        key_meta<BS>(P, st, b, mask, tid, kposS + stage * BS, kokS + stage * BS);
    };

    const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
    const int p0 = t.base + r0 * t.step, p1 = t.base + r1 * t.step;
    const bool in0 = r0 < t.cnt, in1 = r1 < t.cnt;
    const float LOG2E = 1.4426950408889634f;
    const float sl2 = P.scale * LOG2E;
    const float L0 = in0 ? lse[lidx(P, b, p0, h)] * LOG2E : neg_inf();
    const float L1 = in1 ? lse[lidx(P, b, p1, h)] * LOG2E : neg_inf();

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    PatState cur;
    cur.i = -1;
    cur.m = 0;
    cur.k0 = 0;
    bool have = tc_next<BS>(P, t, h, cur, RQ);
    if (have) load_kv(cur, 0);
    cp_commit();

    // Q and dO fragments stay in registers for the whole kernel.
    cp_wait<1>();
    __syncthreads();
    u32 qf[D / 16][4], of[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int off = (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8;
        ldm_x4(smem_u32(Qs + off), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
        ldm_x4(smem_u32(Os + off), of[kk][0], of[kk][1], of[kk][2], of[kk][3]);
    }

    int stage = 0, cur_i = -1;
    bool part0 = false, part1 = false;
    float d0 = 0.f, d1 = 0.f;
    while (have) {
        PatState nx = cur;
        bool hn = tc_next<BS>(P, t, h, nx, RQ);
        if (hn) load_kv(nx, stage == 2 ? 0 : stage + 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        if (cur.i != cur_i) {
            cur_i = cur.i;
            part0 = in0 && L0 != neg_inf() && (((p0 - cur.a) % cur.r) == cur.o);
            part1 = in1 && L1 != neg_inf() && (((p1 - cur.a) % cur.r) == cur.o);
            d0 = part0 ? delta[(long long)cur.i * P.delta_stride + lidx(P, b, p0, h)] : 0.f;
            d1 = part1 ? delta[(long long)cur.i * P.delta_stride + lidx(P, b, p1, h)] : 0.f;
        }
        const u16* kb = Ks + stage * BS * LD;
        const u16* vb = Vs + stage * BS * LD;
        const int* kp = kposS + stage * BS;
        const int* ko = kokS + stage * BS;
        float s[BS / 8][4], dp[BS / 8][4];
#pragma unroll
        for (int n = 0; n < BS / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        mma_rbt<T, D, BS>(s, qf, kb, lane);
        mma_rbt<T, D, BS>(dp, of, vb, lane);
#pragma unroll
        for (int n = 0; n < BS / 8; ++n) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = n * 8 + (lane & 3) * 2 + j;
                const int kok = ko[col], kpc = kp[col];
                const bool c0 = part0 & (kok != 0) & ((!P.causal) | (kpc <= p0));
                const bool c1 = part1 & (kok != 0) & ((!P.causal) | (kpc <= p1));
                // Unselected values may be inf (L = -inf rows); selects do not propagate them.
                const float x0 = ex2(fmaf(s[n][j], sl2, -L0));
                const float x1 = ex2(fmaf(s[n][2 + j], sl2, -L1));
                const float pv0 = c0 ? x0 : 0.f, pv1 = c1 ? x1 : 0.f;
                s[n][j] = pv0 * (dp[n][j] * P.fac - d0);  // dS
                s[n][2 + j] = pv1 * (dp[n][2 + j] * P.fac - d1);
            }
        }
        mma_xb<T, D, BS>(acc, s, kb, lane);
        // Three stages, prefetch distance one: the next iteration's load targets the
        // stage read two iterations ago, which every warp has left (they all passed this
        // iteration's barrier), so no trailing barrier is needed.
        cur = nx;
        have = hn;
        stage = stage == 2 ? 0 : stage + 1;
    }
    cp_wait<0>();
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int d = n * 8 + (lane & 3) * 2;
        if (in0) *(u32*)(dq + qidx(P, b, p0, h) + d) = Mma<T>::pack(acc[n][0] * P.scale, acc[n][1] * P.scale);
        if (in1) *(u32*)(dq + qidx(P, b, p1, h) + d) = Mma<T>::pack(acc[n][2] * P.scale, acc[n][3] * P.scale);
    }
}

// Query-stream state of dkdv_tc: query head hh of the group, pattern i, first query q0.
struct KvState {
    int hh, i, q0;
    int h, o, a, m, r;
};

template <int BS>
__device__ __forceinline__ bool kv_setup(const Params& P, const Tile& t, int g, int grp, int b,
                                         const unsigned char* mask, KvState& st) {
    st.h = g * grp + st.hh;
    int o = pat_offset(P, st.i, st.h);
    if (o < 0) return false;
    int w = P.w[st.i], r = P.r[st.i];
    int a = (t.base / w) * w;
    // Rows a step apart that is a multiple of r share one residue: none takes part unless
    // the first does (the scan below would try all t.cnt rows for nothing; under head
    // groups that is most key tiles of the dilated heads).
    if (t.step % r == 0 && ((t.base - a) % r) != o) return false;
    int kmin = 0x7fffffff;
    for (int j = 0; j < t.cnt; ++j) {
        int kp = t.base + j * t.step;
        if (((kp - a) % r) == o && (!P.has_mask || mask[(long long)b * P.N + kp] != 0)) {
            kmin = kp;
            break;  // positions increase with j
        }
    }
    if (kmin == 0x7fffffff) return false;
    st.o = o;
    st.a = a;
    st.r = r;
    st.m = (w - o + r - 1) / r;
    st.q0 = P.causal ? ((kmin - a - o) / r) / BS * BS : 0;
    return true;
}

template <int BS>
__device__ __forceinline__ bool kv_next(const Params& P, const Tile& t, int g, int grp, int b,
                                        const unsigned char* mask, KvState& st) {
    st.q0 += BS;
    while (true) {
        if (st.q0 < st.m) return true;
        st.i++;
        if (st.i >= P.G) {
            st.i = 0;
            st.hh++;
            if (st.hh >= grp) return false;
        }
        if (!kv_setup<BS>(P, t, g, grp, b, mask, st)) {
            st.m = 0;
            st.q0 = 0;
        }
    }
}

// Metadata of row `tid` < ROWS of a streamed query tile (query-stream state st, first
// query index st.q0), stored at index tid: position, whether it exists and attends
// anything, its L·log2 e and its Δ (pattern st.i's under detach_weights).
template <int ROWS>
__device__ __forceinline__ void query_meta(const Params& P, const KvState& st, int b, const float* lse,
                                           const float* delta, int tid, int* qpos, int* qok, float* Lq,
                                           float* Dq) {
    const float LOG2E = 1.4426950408889634f;
    if (tid < ROWS) {
        int jj = st.q0 + tid;
        int qp = st.a + st.o + jj * st.r;
        bool ok = jj < st.m;
        float L = ok ? lse[lidx(P, b, qp, st.h)] : neg_inf();
        ok = ok && L != neg_inf();
        qpos[tid] = qp;
        qok[tid] = ok;
        Lq[tid] = L * LOG2E;
        Dq[tid] = ok ? delta[(long long)st.i * P.delta_stride + lidx(P, b, qp, st.h)] : 0.f;
    }
}

template <typename T, int D, int BS, int WARPS>
__device__ void dkdv_tc(const Params& P, const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const unsigned char* __restrict__ mask,
                        const float* __restrict__ lse, const T* __restrict__ dout,
                        const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
    constexpr int LD = D + 8;
    constexpr int RK = 16 * WARPS, NT = 32 * WARPS;  // owner key rows, threads
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* Ks = (u16*)smem_raw;        // 64 x LD (owner)
    u16* Vs = Ks + RK * LD;          // RK x LD (owner)
    u16* Qs = Vs + RK * LD;          // 3 x BS x LD
    u16* Os = Qs + 3 * BS * LD;      // 3 x BS x LD
    float* Lq = (float*)(Os + 3 * BS * LD);  // 3 x BS (L · log2 e)
    float* Dq = Lq + 3 * BS;                  // 3 x BS
    int* qposS = (int*)(Dq + 3 * BS);         // 3 x BS
    int* qokS = qposS + 3 * BS;               // 3 x BS

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = blockIdx.y, b = blockIdx.z;
    Tile t;
    if (!decode_tile(P, blockIdx.x, RK, t)) return;
    const int grp = P.H / P.Hkv;
    const long long krow = (long long)P.Hkv * P.D * t.step;
    load_rows2<D, NT, RK>(smem_u32(Ks), k, smem_u32(Vs), v,
                          t.cnt, kidx(P, b, t.base, g), krow, tid);
    cp_commit();
    const float LOG2E = 1.4426950408889634f;

    auto load_q = [&](const KvState& st, int stage) {
        const long long base = qidx(P, b, st.a + st.o + st.q0 * st.r, st.h);
        const long long step = (long long)st.r * P.H * P.D;
        load_rows2<D, NT, BS>(smem_u32(Qs + stage * BS * LD), q, smem_u32(Os + stage * BS * LD), dout,
                              st.m - st.q0, base, step, tid);
        query_meta<BS>(P, st, b, lse, delta, tid, qposS + stage * BS, qokS + stage * BS, Lq + stage * BS,
                       Dq + stage * BS);
    };

    const int r0 = warp * 16 + (lane >> 2), r1 = r0 + 8;
    const int k0p = t.base + r0 * t.step, k1p = t.base + r1 * t.step;
    const bool in0 = r0 < t.cnt && (!P.has_mask || mask[(long long)b * P.N + k0p] != 0);
    const bool in1 = r1 < t.cnt && (!P.has_mask || mask[(long long)b * P.N + k1p] != 0);
    const float sl2 = P.scale * LOG2E;

    float adk[D / 8][4], adv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) adk[n][e] = adv[n][e] = 0.f;

    KvState cur;
    cur.hh = 0;
    cur.i = -1;
    cur.m = 0;
    cur.q0 = 0;
    bool have = kv_next<BS>(P, t, g, grp, b, mask, cur);
    if (have) load_q(cur, 0);
    cp_commit();

    int stage = 0, cur_hi = -1;
    bool part0 = false, part1 = false;
    while (have) {
        KvState nx = cur;
        bool hn = kv_next<BS>(P, t, g, grp, b, mask, nx);
        if (hn) load_q(nx, stage == 2 ? 0 : stage + 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        int hi = cur.hh * MAXP + cur.i;
        if (hi != cur_hi) {
            cur_hi = hi;
            part0 = in0 && (((k0p - cur.a) % cur.r) == cur.o);
            part1 = in1 && (((k1p - cur.a) % cur.r) == cur.o);
        }
        const u16* qb = Qs + stage * BS * LD;
        const u16* ob = Os + stage * BS * LD;
        const int* qp = qposS + stage * BS;
        const int* qo = qokS + stage * BS;
        const float* lq = Lq + stage * BS;
        const float* dq_ = Dq + stage * BS;
        float s[BS / 8][4], dp[BS / 8][4];
#pragma unroll
        for (int n = 0; n < BS / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        mma_abt<T, D, BS>(s, Ks + warp * 16 * LD, qb, lane);   // Sᵀ = K Qᵀ
        mma_abt<T, D, BS>(dp, Vs + warp * 16 * LD, ob, lane);  // dPᵀ = V dOᵀ (without fac)
#pragma unroll
        for (int n = 0; n < BS / 8; ++n) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int col = n * 8 + (lane & 3) * 2 + j;
                const int qok = qo[col], qpc = qp[col];
                const float lqc = lq[col], dqc = dq_[col];
                const bool c0 = part0 & (qok != 0) & ((!P.causal) | (k0p <= qpc));
                const bool c1 = part1 & (qok != 0) & ((!P.causal) | (k1p <= qpc));
                const float x0 = ex2(fmaf(s[n][j], sl2, -lqc));
                const float x1 = ex2(fmaf(s[n][2 + j], sl2, -lqc));
                const float pv0 = c0 ? x0 : 0.f, pv1 = c1 ? x1 : 0.f;
                s[n][j] = pv0 * P.fac;  // fac·P for dV
                s[n][2 + j] = pv1 * P.fac;
                dp[n][j] = pv0 * (dp[n][j] * P.fac - dqc);  // dS
                dp[n][2 + j] = pv1 * (dp[n][2 + j] * P.fac - dqc);
            }
        }
        mma_xb<T, D, BS>(adv, s, ob, lane);
        mma_xb<T, D, BS>(adk, dp, qb, lane);
        // Three stages, prefetch distance one: no trailing barrier (see dq_tc).
        cur = nx;
        have = hn;
        stage = stage == 2 ? 0 : stage + 1;
    }
    cp_wait<0>();
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int d = n * 8 + (lane & 3) * 2;
        if (r0 < t.cnt) {
            long long ix = kidx(P, b, k0p, g) + d;
            *(u32*)(dk + ix) = Mma<T>::pack(adk[n][0] * P.scale, adk[n][1] * P.scale);
            *(u32*)(dv + ix) = Mma<T>::pack(adv[n][0], adv[n][1]);
        }
        if (r1 < t.cnt) {
            long long ix = kidx(P, b, k1p, g) + d;
            *(u32*)(dk + ix) = Mma<T>::pack(adk[n][2] * P.scale, adk[n][3] * P.scale);
            *(u32*)(dv + ix) = Mma<T>::pack(adv[n][2], adv[n][3]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Entry points (extern "C" names looked up by cuda_kernel.rs).
// ---------------------------------------------------------------------------------------

#define GEN(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(GT)                                              \
        fwd_generic_##NAME(const Params P, const T* q, const T* k, const T* v,                    \
                           const unsigned char* mask, T* out, float* lse, const T* dout,          \
                           float* delta, int delta_mode) {                                        \
        fwd_generic<T, 32>(P, q, k, v, mask, out, lse, dout, delta, delta_mode);                  \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(GT)                                              \
        dq_generic_##NAME(const Params P, const T* q, const T* k, const T* v,                     \
                          const unsigned char* mask, const float* lse, const T* dout,             \
                          const float* delta, T* dq) {                                            \
        dq_generic<T, 16>(P, q, k, v, mask, lse, dout, delta, dq);                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(GT)                                              \
        dkdv_generic_##NAME(const Params P, const T* q, const T* k, const T* v,                   \
                            const unsigned char* mask, const float* lse, const T* dout,           \
                            const float* delta, T* dk, T* dv) {                                   \
        dkdv_generic<T, 16>(P, q, k, v, mask, lse, dout, delta, dk, dv);                          \
    }                                                                                             \
    extern "C" __global__ void delta_dot_##NAME(const Params P, const T* out, const T* dout,      \
                                                float* delta) {                                   \
        delta_dot<T>(P, out, dout, delta);                                                        \
    }

GEN(float, f32)
GEN(bf16, bf16)
GEN(f16, f16)

#define TC(T, NAME, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        fwd_tc_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                   \
                            const unsigned char* mask, T* out, float* lse) {                      \
        fwd_tc<T, D, 4, 1>(P, q, k, v, mask, out, lse);                                              \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        fwd_tc8_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                  \
                             const unsigned char* mask, T* out, float* lse) {                     \
        fwd_tc<T, D, 8, 1>(P, q, k, v, mask, out, lse);                                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        fwd_tc2_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                  \
                             const unsigned char* mask, T* out, float* lse) {                     \
        fwd_tc<T, D, 4, 2>(P, q, k, v, mask, out, lse);                                           \
    }

#define TCB(T, NAME, D, BS)                                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        dq_tc_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                    \
                           const unsigned char* mask, const float* lse, const T* dout,            \
                           const float* delta, T* dq) {                                           \
        dq_tc<T, D, BS, 4>(P, q, k, v, mask, lse, dout, delta, dq);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        dq_tc8_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                   \
                            const unsigned char* mask, const float* lse, const T* dout,           \
                            const float* delta, T* dq) {                                          \
        dq_tc<T, D, BS, 8>(P, q, k, v, mask, lse, dout, delta, dq);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        dkdv_tc_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                  \
                             const unsigned char* mask, const float* lse, const T* dout,          \
                             const float* delta, T* dk, T* dv) {                                  \
        dkdv_tc<T, D, BS, 4>(P, q, k, v, mask, lse, dout, delta, dk, dv);                         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        dkdv_tc8_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                 \
                              const unsigned char* mask, const float* lse, const T* dout,         \
                              const float* delta, T* dk, T* dv) {                                 \
        dkdv_tc<T, D, BS, 8>(P, q, k, v, mask, lse, dout, delta, dk, dv);                         \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        dkdv_tc64_##NAME##_##D(const Params P, const T* q, const T* k, const T* v,                \
                               const unsigned char* mask, const float* lse, const T* dout,        \
                               const float* delta, T* dk, T* dv) {                                \
        dkdv_tc<T, D, 64, 4>(P, q, k, v, mask, lse, dout, delta, dk, dv);                         \
    }

TC(bf16, bf16, 64)
TC(bf16, bf16, 128)
TC(f16, f16, 64)
TC(f16, f16, 128)
TCB(bf16, bf16, 64, 64)
TCB(bf16, bf16, 128, 32)
TCB(f16, f16, 64, 64)
TCB(f16, f16, 128, 32)
