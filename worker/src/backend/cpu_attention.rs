//! The CPU's paged attention kernel: sequences x heads in parallel, each
//! reading its context through its block table.

use std::cell::Cell;

use rayon::prelude::*;

use super::{elem::Elem, simd_available};
use crate::attention::{AttentionMetadata, QkvHeads};
use crate::kv_cache::KvCacheSpec;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: every work item writes a disjoint (token, head) slice of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    // A method call makes closures capture the wrapper, not the bare pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static SCORES: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

#[inline(always)]
fn dot<E: Elem>(a: &[f32], b: &[E]) -> f32 {
    // Eight accumulators let the compiler vectorize without reassociation flags.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.to_f32();
    }
    s
}

#[inline(always)]
fn axpy<E: Elem>(out: &mut [f32], w: f32, x: &[E]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v.to_f32();
    }
}

/// Attention for every token of the batch. `qkv` rows are `stride` wide with
/// the query heads first; `out` is [num_tokens, num_heads * head_dim].
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_cpu<E: Elem>(
    qkv: &[f32],
    stride: usize,
    heads: QkvHeads,
    k_cache: &[E],
    v_cache: &[E],
    spec: &KvCacheSpec,
    meta: &AttentionMetadata,
    scale: f32,
    out: &mut [f32],
) {
    let nh = heads.num_heads;
    debug_assert_eq!(out.len(), meta.num_tokens() * nh * heads.head_dim);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let num_seqs = meta.num_seqs();
    let ctx = ItemCtx {
        qkv,
        stride,
        heads,
        k_cache,
        v_cache,
        spec,
        meta,
        scale,
        out: out_ptr,
    };
    let simd = simd_available();
    (0..num_seqs * nh).into_par_iter().for_each(|item| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2/FMA were detected.
            return unsafe { attend_avx2(&ctx, item) };
        }
        let _ = simd;
        attend(&ctx, item);
    });
}

/// Inputs shared by every (sequence, head) work item.
struct ItemCtx<'a, E> {
    qkv: &'a [f32],
    stride: usize,
    heads: QkvHeads,
    k_cache: &'a [E],
    v_cache: &'a [E],
    spec: &'a KvCacheSpec,
    meta: &'a AttentionMetadata,
    scale: f32,
    out: SendPtr,
}

/// `attend` compiled for AVX2 so its loops use 8-wide vectors; no fused
/// multiply-adds are formed, so the results equal the portable build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<E: Elem>(c: &ItemCtx<E>, item: usize) {
    attend(c, item)
}

/// One (sequence, head) item: every query token of the sequence for head `h`.
#[inline(always)]
fn attend<E: Elem>(c: &ItemCtx<E>, item: usize) {
    let ItemCtx {
        qkv,
        stride,
        heads,
        k_cache,
        v_cache,
        spec,
        meta,
        scale,
        out: ref out_ptr,
    } = *c;
    let (nh, hd) = (heads.num_heads, heads.head_dim);
    let group = nh / heads.num_kv_heads;
    let bs = spec.block_size;
    let out_w = nh * hd;
    let (s, h) = (item / nh, item % nh);
    let kvh = h / group;
    let (q0, q1) = (meta.query_start_loc[s], meta.query_start_loc[s + 1]);
    let seq_len = meta.seq_lens[s];
    let table = &meta.block_tables[s * meta.max_blocks_per_seq..(s + 1) * meta.max_blocks_per_seq];
    // Taken out of the thread-local rather than used in a closure, so the
    // loops stay inside this function's target features.
    let mut scores = SCORES.with(|cell| cell.take());
    if scores.len() < seq_len {
        scores.resize(seq_len, 0.0);
    }
    {
        for t in q0..q1 {
            // Causal: token t sees keys up to its own position.
            let n_keys = seq_len - (q1 - t) + 1;
            let q = &qkv[t * stride + h * hd..t * stride + (h + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (b, &block) in table.iter().enumerate().take(n_keys.div_ceil(bs)) {
                let base = (block as usize * spec.num_kv_heads + kvh) * bs * hd;
                let n = bs.min(n_keys - b * bs);
                for j in 0..n {
                    let sc = dot(q, &k_cache[base + j * hd..base + (j + 1) * hd]) * scale;
                    scores[b * bs + j] = sc;
                    max = max.max(sc);
                }
            }
            let mut sum = 0f32;
            for x in scores[..n_keys].iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            // SAFETY: (t, h) is written by this item only; the slice is in bounds.
            let o = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(t * out_w + h * hd), hd)
            };
            o.fill(0.0);
            for (b, &block) in table.iter().enumerate().take(n_keys.div_ceil(bs)) {
                let base = (block as usize * spec.num_kv_heads + kvh) * bs * hd;
                let n = bs.min(n_keys - b * bs);
                for j in 0..n {
                    axpy(
                        o,
                        scores[b * bs + j],
                        &v_cache[base + j * hd..base + (j + 1) * hd],
                    );
                }
            }
            let inv = 1.0 / sum;
            for x in o.iter_mut() {
                *x *= inv;
            }
        }
    }
    SCORES.with(|cell| cell.replace(scores));
}
