// Flotilla's CUDA kernels, compiled at start by NVRTC for the device's
// architecture (see nvrtc.rs) and cached on disk. No CUDA headers are
// included, so the source compiles the same with any toolkit: the 16-bit
// types are stored as raw `unsigned short` and converted here.
//
// Every kernel computes in f32 and rounds its output to the storage type
// once, as the CPU backend does, so the two backends agree to rounding.
// Kernels come in three instantiations named `<name>_bf16`, `<name>_f16`
// and `<name>_f32`.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF __int_as_float(0xff800000)

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) {
    return __uint_as_float(((u32)x.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    // Round to nearest even, NaN kept quiet (what `half::bf16::from_f32` does).
    u32 u = __float_as_uint(x);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x40);
    } else {
        r.bits = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_f32(from_f32<T>(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over a block of up to 1024 threads; every thread gets it.
template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        float s = lane < nw ? partial[lane] : (MAX ? NEG_INF : 0.f);
        s = MAX ? warp_max(s) : warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}
__device__ float block_sum(float v) { return block_reduce<false>(v); }
__device__ float block_max(float v) { return block_reduce<true>(v); }

// (value, index) order of the sampler: larger value first, then lower index.
__device__ __forceinline__ bool before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

// For each (row, token) pair: the token's logit and how many logits of its
// row are larger (its rank, less one), so prompt logprobs need neither the
// row nor a host pass over it. grid: pairs; block: 1024.
// out: [pairs values][pairs counts].
template <typename T>
__device__ void token_ranks(const T* logits, int vocab, const int* rows, const int* tokens,
                            float* out) {
    const int p = blockIdx.x;
    const T* row = logits + (i64)rows[p] * vocab;
    const float v = to_f32(row[tokens[p]]);
    float c = 0.f;  // exact: a count below 2^24
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += to_f32(row[i]) > v ? 1.f : 0.f;
    c = block_sum(c);
    if (threadIdx.x == 0) {
        out[p] = v;
        out[gridDim.x + p] = c;
    }
}

// Per row of logits: the k largest (in the sampler's order) and the
// log-sum-exp, so greedy sampling and logprobs need only these on the host.
// k passes over the row, each taking the best entry after the previous one.
// grid: rows; block: 1024. out: [rows * k values][rows * k ids as int bits][rows lse].
template <typename T>
__device__ void top_logits(const T* logits, int vocab, int k, float* out) {
    const int r = blockIdx.x;
    const T* row = logits + (i64)r * vocab;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_f32(row[i]));
    m = block_max(m);
    float s = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_f32(row[i]) - m);
    s = block_sum(s);
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    float pv = __int_as_float(0x7f800000);  // +inf: everything comes after it
    int pi = -1;
    for (int j = 0; j < k; j++) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = to_f32(row[i]);
            bool after = v < pv || (v == pv && i > pi);
            if (after && before(v, i, bv, bi)) { bv = v; bi = i; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        __syncthreads();  // the previous pass has read sv/si
        if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
        __syncthreads();
        if (warp == 0) {
            bv = lane < nw ? sv[lane] : NEG_INF;
            bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
            }
            if (lane == 0) { sv[0] = bv; si[0] = bi; }
        }
        __syncthreads();
        pv = sv[0];
        pi = si[0];
        if (threadIdx.x == 0) {
            out[(i64)r * k + j] = pv;
            out[(i64)gridDim.x * k + (i64)r * k + j] = __int_as_float(pi);
        }
    }
    if (threadIdx.x == 0) out[(i64)gridDim.x * 2 * k + r] = m + logf(s);
}

// out[t, :] = table[ids[t] - vocab_start, :], zeros outside this rank's rows.
// grid: tokens; block: any.
template <typename T>
__device__ void embed(const int* ids, const T* table, int vocab_start, int rows, int hidden,
                      T* out) {
    int t = blockIdx.x;
    int local = ids[t] - vocab_start;
    T* o = out + (i64)t * hidden;
    if (local < 0 || local >= rows) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = from_f32<T>(0.f);
        return;
    }
    const T* r = table + (i64)local * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = r[i];
}

// out = x * rsqrt(mean(x^2) + eps) * w, per row; with `residual`, first
// residual += x (rounded) and the norm is taken of the new residual.
// grid: rows; block: up to 1024.
template <typename T>
__device__ void add_rms_norm(T* residual, const T* x, const T* w, T* out, int cols, float eps) {
    i64 base = (i64)blockIdx.x * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = to_f32(x[base + i]);
        if (residual) {
            v = round_to<T>(to_f32(residual[base + i]) + v);
            residual[base + i] = from_f32<T>(v);
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)cols + eps);
    const T* src = residual ? residual : x;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        out[base + i] = from_f32<T>(to_f32(src[base + i]) * inv * to_f32(w[i]));
    }
}

// [rows, 2n] gate|up -> [rows, n] silu(gate) * up. grid-stride over rows * n.
template <typename T>
__device__ void silu_mul(const T* gu, T* out, int rows, int n) {
    i64 total = (i64)rows * n;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / n, c = i % n;
        float g = to_f32(gu[r * 2 * n + c]);
        float u = to_f32(gu[r * 2 * n + n + c]);
        out[i] = from_f32<T>(g / (1.f + __expf(-g)) * u);
    }
}

// y[r, c] += bias[c]. grid-stride.
template <typename T>
__device__ void add_bias(T* y, const T* bias, int rows, int cols) {
    i64 total = (i64)rows * cols;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (i64)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(to_f32(y[i]) + to_f32(bias[i % cols]));
    }
}

// Rotate-half rotary embedding of the first `heads` heads of each row, in
// place. grid: tokens; block: any.
template <typename T>
__device__ void rotary(T* qkv, const int* positions, const float* cos_t, const float* sin_t,
                       int stride, int heads, int head_dim) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    const float* c = cos_t + (i64)positions[t] * half;
    const float* s = sin_t + (i64)positions[t] * half;
    T* row = qkv + (i64)t * stride;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        T* x = row + h * head_dim;
        float x1 = to_f32(x[j]), x2 = to_f32(x[j + half]);
        x[j] = from_f32<T>(x1 * c[j] - x2 * s[j]);
        x[j + half] = from_f32<T>(x2 * c[j] + x1 * s[j]);
    }
}

// K/V heads of each token row to its cache slot. Cache layout per layer:
// [num_blocks, num_kv_heads, block_size, head_dim]. grid: tokens.
template <typename T>
__device__ void write_kv(const T* qkv, const int* slots, T* k_cache, T* v_cache, int stride,
                         int k_col, int v_col, int num_kv_heads, int head_dim, int block_size) {
    int t = blockIdx.x;
    i64 slot = slots[t];
    if (slot < 0) return;  // a graph's pad row: nothing to store
    i64 blk = slot / block_size, off = slot % block_size;
    const T* row = qkv + (i64)t * stride;
    for (int i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x) {
        int h = i / head_dim, d = i % head_dim;
        i64 dst = ((blk * num_kv_heads + h) * block_size + off) * head_dim + d;
        k_cache[dst] = row[k_col + i];
        v_cache[dst] = row[v_col + i];
    }
}

// out[i, :] = x[rows[i], :]. grid: output rows.
template <typename T>
__device__ void gather_rows(const T* x, const int* rows, T* out, int cols) {
    const T* src = x + (i64)rows[blockIdx.x] * cols;
    T* dst = out + (i64)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

template <typename T>
__device__ void to_float(const T* x, float* out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x) {
        out[i] = to_f32(x[i]);
    }
}

template <typename T>
__device__ void from_float(const float* x, T* out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (i64)gridDim.x * blockDim.x) {
        out[i] = from_f32<T>(x[i]);
    }
}

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float* f) {
    // N consecutive elements with one load of N * sizeof(T) bytes (4 to 32).
    constexpr int BYTES = N * (int)sizeof(T);
    if constexpr (BYTES == 32) {
        const uint4* w = reinterpret_cast<const uint4*>(p);
        uint4 a = w[0], b = w[1];
        const T* e0 = reinterpret_cast<const T*>(&a);
        const T* e1 = reinterpret_cast<const T*>(&b);
#pragma unroll
        for (int i = 0; i < N / 2; i++) {
            f[i] = to_f32(e0[i]);
            f[N / 2 + i] = to_f32(e1[i]);
        }
    } else if constexpr (BYTES == 16) {
        uint4 a = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&a);
#pragma unroll
        for (int i = 0; i < N; i++) f[i] = to_f32(e[i]);
    } else if constexpr (BYTES == 8) {
        uint2 a = *reinterpret_cast<const uint2*>(p);
        const T* e = reinterpret_cast<const T*>(&a);
#pragma unroll
        for (int i = 0; i < N; i++) f[i] = to_f32(e[i]);
    } else {
        static_assert(BYTES == 4, "4 to 32 bytes");
        u32 a = *reinterpret_cast<const u32*>(p);
        const T* e = reinterpret_cast<const T*>(&a);
#pragma unroll
        for (int i = 0; i < N; i++) f[i] = to_f32(e[i]);
    }
}

// y[r, n] = Σ_k x[r, k] w[n, k] for decode-sized batches (rows <= GEMV_ROWS):
// the weights stream through once at close to copy bandwidth, where a GEMM
// library's small-batch path leaves a third of it unused. Each warp takes
// GEMV_OUTS adjacent outputs and its lanes stride over k with 16-byte loads,
// GEMV_UNROLL of them in flight per output; an x chunk is loaded once for
// the warp's outputs. Each output's sum runs in a fixed order (lane partial
// sums, then a butterfly), whatever the number of rows.
// grid: ceil(out / (GEMV_OUTS * warps per block)); block: warps * 32.
// Needs in * sizeof(T) % 16 == 0.
#define GEMV_ROWS 8
#define GEMV_OUTS 2
#define GEMV_UNROLL 4
template <typename T>
__device__ void gemv_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                          int rows, int in, int out) {
    constexpr int VEC = 16 / (int)sizeof(T);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * (blockDim.x >> 5) + warp) * GEMV_OUTS;
    if (n0 >= out) return;
    const int chunks = in / VEC;
    float acc[GEMV_ROWS][GEMV_OUTS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int o = 0; o < GEMV_OUTS; o++) acc[r][o] = 0.f;
    const uint4* wr[GEMV_OUTS];
#pragma unroll
    for (int o = 0; o < GEMV_OUTS; o++) {
        // An output past the end re-reads the last row; it is never stored.
        wr[o] = reinterpret_cast<const uint4*>(w + (i64)min(n0 + o, out - 1) * in);
    }
    for (int c0 = lane; c0 < chunks; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL][GEMV_OUTS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
#pragma unroll
            for (int o = 0; o < GEMV_OUTS; o++) {
                if (c < chunks) {
                    wv[u][o] = wr[o][c];
                } else {
                    wv[u][o].x = wv[u][o].y = wv[u][o].z = wv[u][o].w = 0u;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            const int c = c0 + 32 * u;
            if (c >= chunks) break;
            float wf[GEMV_OUTS][VEC];
#pragma unroll
            for (int o = 0; o < GEMV_OUTS; o++) {
                const T* e = reinterpret_cast<const T*>(&wv[u][o]);
#pragma unroll
                for (int i = 0; i < VEC; i++) wf[o][i] = to_f32(e[i]);
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r < rows) {
                    float xf[VEC];
                    load_floats<T, VEC>(x + (i64)r * in + (i64)c * VEC, xf);
#pragma unroll
                    for (int o = 0; o < GEMV_OUTS; o++)
#pragma unroll
                        for (int i = 0; i < VEC; i++) acc[r][o] += xf[i] * wf[o][i];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        if (r < rows) {
#pragma unroll
            for (int o = 0; o < GEMV_OUTS; o++) {
                const float v = warp_sum(acc[r][o]);
                if (lane == 0 && n0 + o < out) y[(i64)r * out + n0 + o] = from_f32<T>(v);
            }
        }
    }
}

// Paged attention for one (query token, kv head): the `group` query heads
// that share the kv head run as one warp each, over key tiles of 32 loaded
// once into shared memory for the whole group (so GQA reads each K/V once
// per token). Online softmax in f32. Causal: token t of a sequence sees the
// keys up to its own position (`tok_nkeys[t]` of them).
//
// Tiles are read with 16-byte loads, the cache addresses of a tile's keys
// worked out once per tile (not per element), so a tile's loads are all in
// flight together. Warps beyond `group` (the block has at least 4) only
// help load.
//
// Decode tokens split their context over `tok_splits[t]` blocks (grid z) of
// `split_keys` keys each, so a small batch still fills the GPU; each split
// writes its running max, sum and unnormalized output to `part_ml` /
// `part_acc`, and attention_reduce combines them. Whether a token splits
// depends only on its own sequence (decode or not, context length), never
// on the batch around it, so results stay batch-invariant.
//
// grid: (tokens, num_kv_heads, max splits); block: max(group, 4) * 32 threads.
// Shared memory: q [group][D] + K tile [32][D+4 or D+1] + V tile [32][D] floats.
#define ATTN_TILE 32
template <typename T>
__device__ void paged_attention(const T* __restrict__ qkv, int stride,
                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const int* __restrict__ block_tables, int max_blocks,
                                const int* __restrict__ tok_seq, const int* __restrict__ tok_nkeys,
                                const int* __restrict__ tok_splits, int split_keys,
                                int num_kv_heads, int group, int head_dim, int block_size,
                                float scale,
                                float* __restrict__ part_ml, float* __restrict__ part_acc,
                                T* __restrict__ out) {
    extern __shared__ __align__(16) float smem[];
    __shared__ i64 key_base[ATTN_TILE];
    const int D = head_dim;
    // K rows are padded to KS floats: D + 4 keeps them 16-byte aligned for
    // float4 reads when D % 4 == 0 (lanes 8 apart then share no bank group
    // within a quarter-warp phase), else D + 1 (conflict-free scalar reads).
    const int KS = (head_dim % 4 == 0) ? head_dim + 4 : head_dim + 1;
    float* q_s = smem;                          // [group][D]
    float* k_s = q_s + group * D;               // [TILE][KS]
    float* v_s = k_s + ATTN_TILE * KS;          // [TILE][D]
    const int t = blockIdx.x, kvh = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nthreads = blockDim.x;
    const int seq = tok_seq[t];
    const int nsplit = tok_splits[t], split = blockIdx.z;
    if (split >= nsplit) return;  // the whole block: no barrier is skipped
    const int k_begin = nsplit == 1 ? 0 : split * split_keys;
    const int n_keys = nsplit == 1 ? tok_nkeys[t] : min(tok_nkeys[t], k_begin + split_keys);
    const int* table = block_tables + (i64)seq * max_blocks;
    const bool computes = warp < group;
    const int h = kvh * group + warp;  // this warp's query head
    // Elements per 16-byte load; rows of D elements split into D / VEC chunks.
    const int VEC = 16 / sizeof(T);
    const bool vec_ok = (D % VEC) == 0;
    const int chunks = D / VEC;

    for (int i = threadIdx.x; i < group * D; i += nthreads) {
        int g = i / D, d = i % D;
        q_s[i] = to_f32(qkv[(i64)t * stride + (kvh * group + g) * D + d]) * scale;
    }
    // Each lane owns output dims lane, lane + 32, ... (D <= 256; any D).
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.f;
    float m = NEG_INF, l = 0.f;

    for (int k0 = k_begin; k0 < n_keys; k0 += ATTN_TILE) {
        const int nk = min(ATTN_TILE, n_keys - k0);
        __syncthreads();  // the previous tile is consumed (and q is loaded)
        if (threadIdx.x < nk) {
            int key = k0 + threadIdx.x;
            i64 blk = table[key / block_size];
            key_base[threadIdx.x] = ((blk * num_kv_heads + kvh) * block_size + key % block_size) * D;
        }
        __syncthreads();
        if (vec_ok) {
#pragma unroll 4
            for (int i = threadIdx.x; i < nk * chunks; i += nthreads) {
                int j = i / chunks, c = i % chunks;
                i64 src = key_base[j] + c * VEC;
                uint4 kv = *reinterpret_cast<const uint4*>(k_cache + src);
                uint4 vv = *reinterpret_cast<const uint4*>(v_cache + src);
                const T* ke = reinterpret_cast<const T*>(&kv);
                const T* ve = reinterpret_cast<const T*>(&vv);
                float* kd = k_s + j * KS + c * VEC;
                float* vd = v_s + j * D + c * VEC;
#pragma unroll
                for (int e = 0; e < 16 / (int)sizeof(T); e++) {
                    kd[e] = to_f32(ke[e]);
                    vd[e] = to_f32(ve[e]);
                }
            }
        } else {
            for (int i = threadIdx.x; i < nk * D; i += nthreads) {
                int j = i / D, d = i % D;
                k_s[j * KS + d] = to_f32(k_cache[key_base[j] + d]);
                v_s[j * D + d] = to_f32(v_cache[key_base[j] + d]);
            }
        }
        __syncthreads();
        if (!computes) continue;
        // Lane j scores key k0 + j.
        float sc = NEG_INF;
        if (lane < nk) {
            const float* q = q_s + warp * D;
            const float* k = k_s + lane * KS;
            float s = 0.f;
            if (KS == D + 4) {
                // 16-byte reads: a quarter of the shared-memory instructions.
                const float4* q4 = reinterpret_cast<const float4*>(q);
                const float4* k4 = reinterpret_cast<const float4*>(k);
                for (int d = 0; d < D / 4; d++) {
                    const float4 a = q4[d], b = k4[d];
                    s += a.x * b.x;
                    s += a.y * b.y;
                    s += a.z * b.z;
                    s += a.w * b.w;
                }
            } else {
                for (int d = 0; d < D; d++) s += q[d] * k[d];
            }
            sc = s;
        }
        float tile_max = warp_max(sc);
        float m_new = fmaxf(m, tile_max);
        float p = lane < nk ? __expf(sc - m_new) : 0.f;
        float alpha = __expf(m - m_new);  // 0 on the first tile (m = -inf)
        l = l * alpha + warp_sum(p);
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= alpha;
        for (int j = 0; j < nk; j++) {
            float pj = __shfl_sync(0xffffffffu, p, j);
            const float* v = v_s + j * D;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int d = lane + 32 * i;
                if (d < D) acc[i] += pj * v[d];
            }
        }
        m = m_new;
    }
    if (!computes) return;
    if (nsplit > 1) {
        i64 idx = ((i64)t * (num_kv_heads * group) + h) * gridDim.z + split;
        if (lane == 0) {
            part_ml[2 * idx] = m;
            part_ml[2 * idx + 1] = l;
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (d < D) part_acc[idx * D + d] = acc[i];
        }
        return;
    }
    float inv = l > 0.f ? 1.f / l : 0.f;
    T* o = out + (i64)t * (num_kv_heads * group * D) + (i64)h * D;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        if (d < D) o[d] = from_f32<T>(acc[i] * inv);
    }
}

// Paged attention with one lane per key, for the common head sizes (32 * DPL
// = 64, 128, 256) and up to ATTN_GMAX query heads per kv head. Same grid,
// splits and partial layout as `paged_attention` (which stays for other
// shapes), but nothing goes through a block-wide barrier while keys stream:
// each warp takes every ATTN_WARPS-th chunk of 32 keys of its block's range,
// and
// - scores: lane j reads key k0 + j straight from the cache (16-byte loads,
//   eight in flight) and dots it with the group's query heads, broadcast from
//   shared memory, so the K row is read once for the whole group;
// - softmax: one warp max per head and chunk; the running sum stays per lane
//   until the end;
// - values: every lane owns DPL output dims of each head and reads that slice
//   of each key's V row (a 32-lane coalesced row read), weighted by the key's
//   probability from shared memory.
// The warps' (max, sum, output) are combined at the end in a fixed order.
// Which keys a warp takes depends only on the token's own key range, so the
// result stays batch-invariant.
//
// grid: (tokens, num_kv_heads, max splits); block: ATTN_WARPS * 32 threads.
// Dynamic shared memory: q [group][D] + acc [ATTN_WARPS][group][D] +
// p [ATTN_WARPS][group][32] floats.
#define ATTN_WARPS 4
#define ATTN_GMAX 8
template <typename T, int DPL>
__device__ void paged_attention_lanes(const T* __restrict__ qkv, int stride,
                                      const T* __restrict__ k_cache,
                                      const T* __restrict__ v_cache,
                                      const int* __restrict__ block_tables, int max_blocks,
                                      const int* __restrict__ tok_seq,
                                      const int* __restrict__ tok_nkeys,
                                      const int* __restrict__ tok_splits, int split_keys,
                                      int num_kv_heads, int group, int block_size, float scale,
                                      float* __restrict__ part_ml, float* __restrict__ part_acc,
                                      T* __restrict__ out) {
    constexpr int D = 32 * DPL;
    constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte load
    constexpr int CHUNKS = D / VEC;           // 16-byte loads per key row
    constexpr int BATCH = CHUNKS < 8 ? CHUNKS : 8;
    extern __shared__ __align__(16) float smem[];
    __shared__ i64 v_base[ATTN_WARPS][32];
    __shared__ float warp_ml[ATTN_WARPS][ATTN_GMAX][2];
    float* q_s = smem;                               // [group][D]
    float* acc_s = q_s + group * D;                  // [ATTN_WARPS][group][D]
    float* p_all = acc_s + ATTN_WARPS * group * D;   // [ATTN_WARPS][group][32]
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nsplit = tok_splits[t];
    if (split >= nsplit) return;  // the whole block: no barrier is skipped
    const int k_begin = nsplit == 1 ? 0 : split * split_keys;
    const int k_end = nsplit == 1 ? tok_nkeys[t] : min(tok_nkeys[t], k_begin + split_keys);
    const int* table = block_tables + (i64)tok_seq[t] * max_blocks;
    float* p_s = p_all + warp * group * 32;

    for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
        q_s[i] = to_f32(qkv[(i64)t * stride + kvh * group * D + i]) * scale;
    }
    __syncthreads();

    float m[ATTN_GMAX], l[ATTN_GMAX], acc[ATTN_GMAX][DPL];
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[g][i] = 0.f;
    }

    for (int k0 = k_begin + warp * 32; k0 < k_end; k0 += ATTN_WARPS * 32) {
        const int nk = min(32, k_end - k0);
        float s[ATTN_GMAX];
#pragma unroll
        for (int g = 0; g < ATTN_GMAX; g++) s[g] = 0.f;
        i64 base = 0;
        if (lane < nk) {
            const int key = k0 + lane;
            const i64 blk = table[key / block_size];
            base = ((blk * num_kv_heads + kvh) * block_size + key % block_size) * D;
            const uint4* kp = reinterpret_cast<const uint4*>(k_cache + base);
#pragma unroll
            for (int c0 = 0; c0 < CHUNKS; c0 += BATCH) {
                uint4 raw[BATCH];
#pragma unroll
                for (int c = 0; c < BATCH; c++) raw[c] = kp[c0 + c];
#pragma unroll
                for (int c = 0; c < BATCH; c++) {
                    const T* e = reinterpret_cast<const T*>(&raw[c]);
                    float kf[VEC];
#pragma unroll
                    for (int i = 0; i < VEC; i++) kf[i] = to_f32(e[i]);
#pragma unroll
                    for (int g = 0; g < ATTN_GMAX; g++) {
                        if (g < group) {
                            const float4* q4 =
                                reinterpret_cast<const float4*>(q_s + g * D + (c0 + c) * VEC);
#pragma unroll
                            for (int i = 0; i < VEC / 4; i++) {
                                const float4 qv = q4[i];
                                s[g] += qv.x * kf[4 * i];
                                s[g] += qv.y * kf[4 * i + 1];
                                s[g] += qv.z * kf[4 * i + 2];
                                s[g] += qv.w * kf[4 * i + 3];
                            }
                        }
                    }
                }
            }
        }
        v_base[warp][lane] = base;
#pragma unroll
        for (int g = 0; g < ATTN_GMAX; g++) {
            if (g < group) {
                const float sc = lane < nk ? s[g] : NEG_INF;
                const float m_new = fmaxf(m[g], warp_max(sc));
                const float p = lane < nk ? __expf(sc - m_new) : 0.f;
                const float alpha = __expf(m[g] - m_new);  // 0 on the first chunk
                l[g] = l[g] * alpha + p;
                m[g] = m_new;
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] *= alpha;
                p_s[g * 32 + lane] = p;
            }
        }
        __syncwarp();
#pragma unroll 4
        for (int j = 0; j < nk; j++) {
            float vf[DPL];
            load_floats<T, DPL>(v_cache + v_base[warp][j] + lane * DPL, vf);
#pragma unroll
            for (int g = 0; g < ATTN_GMAX; g++) {
                if (g < group) {
                    const float pj = p_s[g * 32 + j];
#pragma unroll
                    for (int i = 0; i < DPL; i++) acc[g][i] += pj * vf[i];
                }
            }
        }
        __syncwarp();  // p_s and v_base are read before the next chunk writes them
    }

    // Combine the warps: out = Σ_w acc_w e^(m_w − M) / Σ_w l_w e^(m_w − M).
#pragma unroll
    for (int g = 0; g < ATTN_GMAX; g++) {
        if (g < group) {
            const float lw = warp_sum(l[g]);
            if (lane == 0) {
                warp_ml[warp][g][0] = m[g];
                warp_ml[warp][g][1] = lw;
            }
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                acc_s[(warp * group + g) * D + lane * DPL + i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    const int heads = num_kv_heads * group;
    for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
        const int g = idx / D, d = idx % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) M = fmaxf(M, warp_ml[w][g][0]);
        float L = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; w++) {
            // A warp that had no keys has m = -inf and l = 0: its weight is 0.
            const float e = warp_ml[w][g][1] > 0.f ? __expf(warp_ml[w][g][0] - M) : 0.f;
            L += warp_ml[w][g][1] * e;
            o += acc_s[(w * group + g) * D + d] * e;
        }
        const int h = kvh * group + g;
        if (nsplit > 1) {
            const i64 pidx = ((i64)t * heads + h) * gridDim.z + split;
            if (d == 0) {
                part_ml[2 * pidx] = M;
                part_ml[2 * pidx + 1] = L;
            }
            part_acc[pidx * D + d] = o;
        } else {
            out[(i64)t * heads * D + (i64)h * D + d] = from_f32<T>(L > 0.f ? o / L : 0.f);
        }
    }
}

// Combines the splits of each split token: out = Σ acc_s e^(m_s − M) / Σ l_s e^(m_s − M).
// grid: (tokens, num_heads); block: 128. Partials are laid out with stride
// `max_splits` per (token, head).
template <typename T>
__device__ void attention_reduce(const int* __restrict__ tok_splits,
                                 const float* __restrict__ part_ml,
                                 const float* __restrict__ part_acc, int max_splits, int head_dim,
                                 T* __restrict__ out) {
    const int t = blockIdx.x, h = blockIdx.y, heads = gridDim.y;
    const int nsplit = tok_splits[t];
    if (nsplit <= 1) return;
    const i64 base = ((i64)t * heads + h) * max_splits;
    float M = NEG_INF;
    for (int s = 0; s < nsplit; s++) M = fmaxf(M, part_ml[2 * (base + s)]);
    float L = 0.f;
    for (int s = 0; s < nsplit; s++) L += part_ml[2 * (base + s) + 1] * __expf(part_ml[2 * (base + s)] - M);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < nsplit; s++) {
            o += part_acc[(base + s) * head_dim + d] * __expf(part_ml[2 * (base + s)] - M);
        }
        out[((i64)t * heads + h) * head_dim + d] = from_f32<T>(o / L);
    }
}

// ---------------------------------------------------------------------------
// Sampling on the device (`Backend::sample`): the sampler's semantics
// (worker/src/sampler.rs) for one row per block, so only the chosen ids and
// the requested logprobs cross to the host.
//
// Probabilities are summed as 2^-40 fixed point in 64-bit integers: sums do
// not depend on thread order, so a row samples the same token whatever the
// batch around it and however often it runs. The sorted-order steps (top-k,
// top-p, and the draw among the kept tokens) find their boundary element by
// a three-pass radix select over the probabilities' bits (positive floats
// order as their bit patterns), then a scan in id order among equal values:
// the sampler's order (larger first, then lower id).

typedef unsigned long long u64;

struct SampleRow {
    int greedy;
    int allowlist;
    int edit_start;
    int edit_count;
    float inv_temp;
    float min_p;
    float top_p;
    int top_k;
    double u;
    int logits_row;
    int want_logprobs;
    int mask_start;  // first word in `masks`, -1: no bitmask
    int mask_words;
};

#define EDIT_ALLOWED 1
#define EDIT_BANNED 2
struct LogitEdit {
    int token;
    int flags;
    float bias;
    float rep;
    float sub;
};

// The boundary that keeps every positive probability (the smallest key).
#define KEEP_ALL_KEY 1u

__device__ __forceinline__ u64 fixed_of(float p) { return (u64)(p * 1099511627776.0f); }

// Exclusive prefix sum over a block of exactly 1024 threads; every thread
// must call it and gets the block's total in `*total`.
__device__ u64 block_excl_scan(u64 v, u64* total) {
    __shared__ u64 warp_sums[32];
    __shared__ u64 block_total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();  // an earlier call has finished reading warp_sums
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        u64 w = warp_sums[lane], wi = w;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u64 t = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += t;
        }
        warp_sums[lane] = wi - w;
        if (lane == 31) block_total = wi;
    }
    __syncthreads();
    *total = block_total;
    return warp_sums[warp] + incl - v;
}

__device__ u64 block_sum_u64(u64 v) {
    u64 total;
    block_excl_scan(v, &total);
    return total;
}

// Kept by the current boundary (bkey, bid): the sampler's order puts it at
// or before the boundary element. Only positive probabilities count.
__device__ __forceinline__ bool kept(u32 key, int i, u32 bkey, int bid) {
    return key != 0u && (key > bkey || (key == bkey && i <= bid));
}

struct Boundary {
    u32 key;
    int id;
    u64 before;  // quantity of the kept elements before it in sorted order
    int found;
};

// The first kept element, in the sampler's order, at which the running sum
// of `quantity` (1 per element, or its fixed-point probability) reaches
// `target` (`strict`: exceeds it). `p` is the row's probabilities.
__device__ Boundary select_boundary(const float* p, int vocab, u32 bkey, int bid, bool by_mass,
                                    u64 target, bool strict) {
    __shared__ u64 hist[2048];
    __shared__ u32 s_prefix;
    __shared__ u64 s_above;
    __shared__ int s_found;
    __shared__ int s_id;
    __shared__ u64 s_before;
    const int tid = threadIdx.x;
    u32 prefix = 0, prefix_mask = 0;
    u64 above = 0;
    const int shifts[3] = {21, 10, 0};
    const int widths[3] = {11, 11, 10};
    for (int pass = 0; pass < 3; pass++) {
        const int shift = shifts[pass], nbins = 1 << widths[pass];
        const u32 bin_mask = (u32)(nbins - 1);
        for (int b = tid; b < 2048; b += blockDim.x) hist[b] = 0;
        if (tid == 0) s_found = 0;
        __syncthreads();
        // Whole warps iterate together so that lanes adding to the same bin
        // combine first: most probabilities share a few exponents, and
        // uncombined adds to one bin would serialize.
        const int padded = (vocab + blockDim.x - 1) / blockDim.x * blockDim.x;
        for (int i = tid; i < padded; i += blockDim.x) {
            const float v = i < vocab ? p[i] : 0.f;
            const u32 key = __float_as_uint(v);
            const bool in = i < vocab && kept(key, i, bkey, bid) && (key & prefix_mask) == prefix;
            const u32 bin = in ? (key >> shift) & bin_mask : 0xffffffffu;
            const u64 q = in ? (by_mass ? fixed_of(v) : 1ull) : 0ull;
#if __CUDA_ARCH__ >= 800
            const unsigned peers = __match_any_sync(0xffffffffu, bin);
            // q < 2^41: halves of 21 and 20 bits sum over 32 lanes without overflow.
            const unsigned hi = __reduce_add_sync(peers, (unsigned)(q >> 20));
            const unsigned lo = __reduce_add_sync(peers, (unsigned)(q & 0xfffffu));
            if (in && (tid & 31) == __ffs(peers) - 1) {
                atomicAdd(&hist[bin], ((u64)hi << 20) + lo);
            }
#else
            if (in) atomicAdd(&hist[bin], q);
#endif
        }
        __syncthreads();
        // Bins from the largest down: thread t holds bins nbins-1-2t and nbins-2-2t.
        const int b0 = nbins - 1 - 2 * tid, b1 = b0 - 1;
        const u64 h0 = b0 >= 0 ? hist[b0] : 0, h1 = b1 >= 0 ? hist[b1] : 0;
        u64 total;
        const u64 ex = above + block_excl_scan(h0 + h1, &total);
        auto reach = [&](u64 c) { return strict ? c > target : c >= target; };
        if (b0 >= 0 && !reach(ex) && reach(ex + h0)) {
            s_prefix = (u32)b0;
            s_above = ex;
            s_found = 1;
        } else if (b1 >= 0 && !reach(ex + h0) && reach(ex + h0 + h1)) {
            s_prefix = (u32)b1;
            s_above = ex + h0;
            s_found = 1;
        }
        __syncthreads();
        if (!s_found) {
            Boundary none = {0u, -1, 0ull, 0};
            return none;
        }
        prefix |= s_prefix << shift;
        prefix_mask |= bin_mask << shift;
        above = s_above;
        __syncthreads();
    }
    // Among the kept elements equal to `prefix`, in id order: contiguous
    // chunks per thread, so a scan over the threads gives the running sum.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = min(vocab, tid * chunk), hi = min(vocab, lo + chunk);
    u64 local = 0;
    for (int i = lo; i < hi; i++) {
        const float v = p[i];
        const u32 key = __float_as_uint(v);
        if (key == prefix && kept(key, i, bkey, bid)) local += by_mass ? fixed_of(v) : 1ull;
    }
    u64 total;
    u64 c = above + block_excl_scan(local, &total);
    if (tid == 0) s_found = 0;
    __syncthreads();
    auto reach = [&](u64 x) { return strict ? x > target : x >= target; };
    if (!reach(c) && reach(c + local)) {
        for (int i = lo; i < hi; i++) {
            const float v = p[i];
            const u32 key = __float_as_uint(v);
            if (key == prefix && kept(key, i, bkey, bid)) {
                const u64 q = by_mass ? fixed_of(v) : 1ull;
                if (reach(c + q)) {
                    s_id = i;
                    s_before = c;
                    s_found = 1;
                    break;
                }
                c += q;
            }
        }
    }
    __syncthreads();
    Boundary b = {prefix, s_id, s_before, s_found};
    __syncthreads();
    return b;
}

// Sum of the fixed-point probabilities kept by (bkey, bid).
__device__ u64 kept_mass(const float* p, int vocab, u32 bkey, int bid) {
    u64 s = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = p[i];
        if (kept(__float_as_uint(v), i, bkey, bid)) s += fixed_of(v);
    }
    return block_sum_u64(s);
}

// grid: rows; block: 1024. masks: the rows' bitmask words. scratch: [rows, vocab] f32. out: per row
// [token (int bits), raw logit of the token, rank (int bits), raw log-sum-exp].
template <typename T>
__device__ void sample_rows(const T* __restrict__ logits, int vocab,
                            const SampleRow* __restrict__ rows,
                            const LogitEdit* __restrict__ edits, const u32* __restrict__ masks,
                            float* __restrict__ scratch, float* __restrict__ out) {
    __shared__ float s_val[32];
    __shared__ int s_idx[32];
    __shared__ int s_token;
    const int r = blockIdx.x, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const SampleRow P = rows[r];
    const T* raw_row = logits + (i64)P.logits_row * vocab;
    float* x = scratch + (i64)r * vocab;
    // The row's logits under its structured-output bitmask, if any: what
    // every later step (logprobs included) reads as the raw logits.
    auto raw = [&](int i) {
        if (P.mask_start >= 0) {
            const int w = i >> 5;
            if (w >= P.mask_words || !((masks[P.mask_start + w] >> (i & 31)) & 1u)) return NEG_INF;
        }
        return to_f32(raw_row[i]);
    };

    // The processed logits: allowed ids, min-tokens stops, bias, penalties.
    for (int i = tid; i < vocab; i += blockDim.x) x[i] = P.allowlist ? NEG_INF : raw(i);
    __syncthreads();
    for (int e = tid; e < P.edit_count; e += blockDim.x) {
        const LogitEdit E = edits[P.edit_start + e];
        float v = (!P.allowlist || (E.flags & EDIT_ALLOWED)) ? raw(E.token) : NEG_INF;
        if (E.flags & EDIT_BANNED) v = NEG_INF;
        v += E.bias;
        // As the CPU sampler: a tiny penalty must not make +inf (NaN softmax).
        if (E.rep != 1.f) v = v > 0.f ? fminf(v / E.rep, 3.402823466e+38f) : v * E.rep;
        v -= E.sub;
        x[E.token] = v;
    }
    __syncthreads();

    // Max, and its lowest id (greedy's argmax).
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (before(v, i, bv, bi)) { bv = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { s_val[warp] = bv; s_idx[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        bv = s_val[lane];
        bi = s_idx[lane];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { s_val[0] = bv; s_idx[0] = bi; }
    }
    __syncthreads();
    const float m = s_val[0];
    int token;
    if (P.greedy || m == NEG_INF) {
        // Everything masked: the sampler answers token 0.
        token = m == NEG_INF ? 0 : s_idx[0];
    } else {
        // Probabilities relative to the largest (which is 1), below min_p dropped.
        for (int i = tid; i < vocab; i += blockDim.x) {
            float q = expf((x[i] - m) * P.inv_temp);
            if (P.min_p > 0.f && q < P.min_p) q = 0.f;
            x[i] = q;
        }
        __syncthreads();
        u32 bkey = KEEP_ALL_KEY;
        int bid = 0x7fffffff;
        const bool sorted = (P.top_k > 0 && P.top_k < vocab) || P.top_p < 1.f;
        if (sorted) {
            if (P.top_k > 0 && P.top_k < vocab) {
                const Boundary b = select_boundary(x, vocab, bkey, bid, false, (u64)P.top_k, false);
                if (b.found) { bkey = b.key; bid = b.id; }
            }
            if (P.top_p < 1.f) {
                const u64 total = kept_mass(x, vocab, bkey, bid);
                u64 target = (u64)ceil((double)P.top_p * (double)total);
                if (target > total) target = total;
                const Boundary b = select_boundary(x, vocab, bkey, bid, true, target, false);
                if (b.found) { bkey = b.key; bid = b.id; }
            }
            const u64 total = kept_mass(x, vocab, bkey, bid);
            u64 target = (u64)(P.u * (double)total);
            if (total > 0 && target >= total) target = total - 1;
            const Boundary b = select_boundary(x, vocab, bkey, bid, true, target, true);
            token = b.found ? b.id : s_idx[0];
        } else {
            // The token at cumulative probability u in id order.
            const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
            const int lo = min(vocab, tid * chunk), hi = min(vocab, lo + chunk);
            u64 local = 0;
            for (int i = lo; i < hi; i++) local += fixed_of(x[i]);
            u64 total;
            u64 c = block_excl_scan(local, &total);
            u64 target = (u64)(P.u * (double)total);
            if (total > 0 && target >= total) target = total - 1;
            if (tid == 0) s_token = s_idx[0];
            __syncthreads();
            if (c <= target && c + local > target) {
                for (int i = lo; i < hi; i++) {
                    c += fixed_of(x[i]);
                    if (c > target) { s_token = i; break; }
                }
            }
            __syncthreads();
            token = s_token;
        }
    }
    if (tid == 0) out[4 * r] = __int_as_float(token);
    if (!P.want_logprobs) return;

    // The chosen token under the raw logits: its logit, rank and the log-sum-exp.
    const float chosen = raw(token);
    float mx = NEG_INF;
    for (int i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, raw(i));
    mx = block_max(mx);
    float s = 0.f, greater = 0.f;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = raw(i);
        s += expf(v - mx);
        greater += v > chosen ? 1.f : 0.f;
    }
    s = block_sum(s);
    greater = block_sum(greater);
    if (tid == 0) {
        out[4 * r + 1] = chosen;
        out[4 * r + 2] = __int_as_float(1 + (int)greater);
        out[4 * r + 3] = mx + logf(s);
    }
}

// out[r, c] = x[r, c] for c < cols, 0 up to `pad` (a vocab shard widened to
// the group's widest before NCCL's all-gather). Grid-stride over rows * pad.
template <typename T>
__device__ void pad_cols(const T* x, int cols, int pad, T* out, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(i / pad), c = (int)(i % pad);
        out[i] = c < cols ? x[(i64)r * cols + c] : from_f32<T>(0.f);
    }
}

// The gathered shards [size][rows][pad] side by side: out[r, j] is column
// j - offsets[k] of rank k's shard, where offsets[k] <= j < offsets[k + 1].
template <typename T>
__device__ void concat_shards(const T* recv, const int* offsets, int size, int rows, int pad,
                              T* out, int total, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int r = (int)(i / total), j = (int)(i % total);
        int k = 0;
        while (k + 1 < size && offsets[k + 1] <= j) k++;
        out[i] = recv[((i64)k * rows + r) * pad + (j - offsets[k])];
    }
}

// `--load-format dummy` weights made in place: out[r * cols + c] is element
// (row0 + r, col0 + c) of a tensor of full_cols columns, bit-identical to
// `value` in loader/dummy.rs (which says why the values are counter-based).
// The integer steps are exact on both sides; the float ones are pinned to
// single IEEE operations (`__f*_rn` are never contracted into an FMA), as
// Rust computes them, then rounded to T as `upload_f32` rounds host values.
template <typename T>
__device__ void dummy_fill(unsigned long long base, i64 full_cols, i64 row0, i64 col0, i64 cols,
                           T* out, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / cols, c = i % cols;
        const unsigned long long index = (unsigned long long)((row0 + r) * full_cols + col0 + c);
        unsigned long long z = base + index * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        // 24 bits: exact in f32, and so is scaling by 2^-24 (Rust divides
        // by 2^24: the same exact result).
        const float unit = __fmul_rn(__uint2float_rn((u32)(z >> 40)), 1.f / 16777216.f);
        out[i] = from_f32<T>(__fmul_rn(__fsub_rn(unit, 0.5f), 0.04f));
    }
}

#define ATTN_LANES(SUFFIX, T, D, DPL)                                                            \
    extern "C" __global__ void paged_attention_d##D##_##SUFFIX(                                 \
        const T* qkv, int stride, const T* k_cache, const T* v_cache, const int* block_tables,  \
        int max_blocks, const int* tok_seq, const int* tok_nkeys, const int* tok_splits,        \
        int split_keys, int num_kv_heads, int group, int block_size, float scale,               \
        float* part_ml, float* part_acc, T* out) {                                              \
        paged_attention_lanes<T, DPL>(qkv, stride, k_cache, v_cache, block_tables, max_blocks,   \
                                      tok_seq, tok_nkeys, tok_splits, split_keys, num_kv_heads,  \
                                      group, block_size, scale, part_ml, part_acc, out);         \
    }

#define INSTANTIATE(SUFFIX, T)                                                                   \
    extern "C" __global__ void embed_##SUFFIX(const int* ids, const T* table, int vocab_start,  \
                                              int rows, int hidden, T* out) {                   \
        embed<T>(ids, table, vocab_start, rows, hidden, out);                                    \
    }                                                                                            \
    extern "C" __global__ void add_rms_norm_##SUFFIX(T* residual, const T* x, const T* w,       \
                                                     T* out, int cols, float eps) {             \
        add_rms_norm<T>(residual, x, w, out, cols, eps);                                        \
    }                                                                                            \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gu, T* out, int rows, int n) {        \
        silu_mul<T>(gu, out, rows, n);                                                           \
    }                                                                                            \
    extern "C" __global__ void add_bias_##SUFFIX(T* y, const T* bias, int rows, int cols) {     \
        add_bias<T>(y, bias, rows, cols);                                                        \
    }                                                                                            \
    extern "C" __global__ void rotary_##SUFFIX(T* qkv, const int* positions,                    \
                                               const float* cos_t, const float* sin_t,          \
                                               int stride, int heads, int head_dim) {           \
        rotary<T>(qkv, positions, cos_t, sin_t, stride, heads, head_dim);                        \
    }                                                                                            \
    extern "C" __global__ void write_kv_##SUFFIX(const T* qkv, const int* slots, T* k_cache,    \
                                                 T* v_cache, int stride, int k_col, int v_col,  \
                                                 int num_kv_heads, int head_dim,                \
                                                 int block_size) {                              \
        write_kv<T>(qkv, slots, k_cache, v_cache, stride, k_col, v_col, num_kv_heads, head_dim,  \
                    block_size);                                                                 \
    }                                                                                            \
    extern "C" __global__ void gather_rows_##SUFFIX(const T* x, const int* rows, T* out,        \
                                                    int cols) {                                 \
        gather_rows<T>(x, rows, out, cols);                                                      \
    }                                                                                            \
    extern "C" __global__ void to_float_##SUFFIX(const T* x, float* out, i64 n) {               \
        to_float<T>(x, out, n);                                                                  \
    }                                                                                            \
    extern "C" __global__ void from_float_##SUFFIX(const float* x, T* out, i64 n) {             \
        from_float<T>(x, out, n);                                                                \
    }                                                                                            \
    extern "C" __global__ void sample_rows_##SUFFIX(const T* logits, int vocab,                 \
                                                    const SampleRow* rows,                      \
                                                    const LogitEdit* edits, const u32* masks,   \
                                                    float* scratch, float* out) {               \
        sample_rows<T>(logits, vocab, rows, edits, masks, scratch, out);                         \
    }                                                                                            \
    extern "C" __global__ void pad_cols_##SUFFIX(const T* x, int cols, int pad, T* out, i64 n) { \
        pad_cols<T>(x, cols, pad, out, n);                                                       \
    }                                                                                            \
    extern "C" __global__ void concat_shards_##SUFFIX(const T* recv, const int* offsets,        \
                                                      int size, int rows, int pad, T* out,      \
                                                      int total, i64 n) {                       \
        concat_shards<T>(recv, offsets, size, rows, pad, out, total, n);                         \
    }                                                                                            \
    extern "C" __global__ void dummy_fill_##SUFFIX(unsigned long long base, i64 full_cols,      \
                                                   i64 row0, i64 col0, i64 cols, T* out,        \
                                                   i64 n) {                                     \
        dummy_fill<T>(base, full_cols, row0, col0, cols, out, n);                                \
    }                                                                                            \
    extern "C" __global__ void token_ranks_##SUFFIX(const T* logits, int vocab, const int* rows, \
                                                    const int* tokens, float* out) {            \
        token_ranks<T>(logits, vocab, rows, tokens, out);                                        \
    }                                                                                            \
    extern "C" __global__ void top_logits_##SUFFIX(const T* logits, int vocab, int k,           \
                                                   float* out) {                                \
        top_logits<T>(logits, vocab, k, out);                                                    \
    }                                                                                            \
    extern "C" __global__ void paged_attention_##SUFFIX(                                        \
        const T* qkv, int stride, const T* k_cache, const T* v_cache, const int* block_tables,  \
        int max_blocks, const int* tok_seq, const int* tok_nkeys, const int* tok_splits,        \
        int split_keys, int num_kv_heads, int group, int head_dim, int block_size, float scale, \
        float* part_ml, float* part_acc, T* out) {                                              \
        paged_attention<T>(qkv, stride, k_cache, v_cache, block_tables, max_blocks, tok_seq,     \
                           tok_nkeys, tok_splits, split_keys, num_kv_heads, group, head_dim,     \
                           block_size, scale, part_ml, part_acc, out);                           \
    }                                                                                            \
    ATTN_LANES(SUFFIX, T, 64, 2)                                                                 \
    ATTN_LANES(SUFFIX, T, 128, 4)                                                                \
    ATTN_LANES(SUFFIX, T, 256, 8)                                                                \
    extern "C" __global__ void gemv_rows_##SUFFIX(const T* x, const T* w, T* y, int rows,       \
                                                  int in, int out) {                            \
        gemv_rows<T>(x, w, y, rows, in, out);                                                    \
    }                                                                                            \
    extern "C" __global__ void attention_reduce_##SUFFIX(const int* tok_splits,                 \
                                                         const float* part_ml,                  \
                                                         const float* part_acc, int max_splits, \
                                                         int head_dim, T* out) {                \
        attention_reduce<T>(tok_splits, part_ml, part_acc, max_splits, head_dim, out);          \
    }

// The backend appends `INSTANTIATE(suffix, type)` for the one dtype it
// computes in (`kernel_source` in mod.rs): compiling all three took NVRTC
// three times as long at every start without a kernel cache.
