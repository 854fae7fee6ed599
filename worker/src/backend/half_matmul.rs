//! Matmul y = x·Wᵀ with f32 activations and f32 accumulation, for weights
//! that can be widened to f32 a few rows at a time: bf16/f16/f32 here
//! (`DenseMatrix`), GGML blocks in `quant_matmul` (any `WeightRows`). Each output is one dot product over k
//! in a fixed order whatever the batch, so a row's result never depends on
//! which other rows share its step (the batch invariance the engine's
//! "32 concurrent == each alone" guarantee needs).

use std::cell::Cell;

use rayon::prelude::*;

use super::elem::Elem;
use super::simd_available;

/// Weight rows widened to f32 together and reused across the batch.
const TILE: usize = 4;
/// Weight rows per parallel task.
const CHUNK: usize = 32;

/// [n, k] row-major weights.
pub struct DenseMatrix<W> {
    w: Vec<W>,
    pub n: usize,
    pub k: usize,
}

/// Weights [n, k] that the kernel widens to f32 a tile of rows at a time
/// (then reuses for every activation row). The widened values must not
/// depend on the tile: row j's values are the same whichever call widens it.
pub trait WeightRows: Sync {
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// Writes rows `r0 .. r0 + dst.len() / k` as f32 into `dst`.
    fn widen(&self, r0: usize, dst: &mut [f32]);
}

impl<W: Elem> WeightRows for DenseMatrix<W> {
    fn n(&self) -> usize {
        self.n
    }

    fn k(&self) -> usize {
        self.k
    }

    #[inline(always)]
    fn widen(&self, r0: usize, dst: &mut [f32]) {
        for (s, v) in dst.iter_mut().zip(&self.w[r0 * self.k..]) {
            *s = v.to_f32();
        }
    }
}

impl<W: Elem> DenseMatrix<W> {
    pub fn new(w: Vec<W>, n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight length is not n*k");
        Self { w, n, k }
    }

    pub fn from_f32(v: &[f32], n: usize, k: usize) -> Self {
        Self::new(super::elem::convert(v), n, k)
    }
}

thread_local! {
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `x` is [m, k]; returns [m, n].
pub fn matmul<S: WeightRows>(x: &[f32], m: usize, w: &S) -> Vec<f32> {
    matmul_on(x, m, w, simd_available())
}

/// `matmul` on the AVX2 build (`simd`, which must be available) or the
/// portable one; tests compare the two.
pub(crate) fn matmul_on<S: WeightRows>(x: &[f32], m: usize, w: &S, simd: bool) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    debug_assert_eq!(x.len(), m * k);
    assert!(
        !simd || simd_available(),
        "AVX2 build asked for without AVX2"
    );
    let mut out_t = vec![0f32; n * m];
    let task = |(c, dst): (usize, &mut [f32])| {
        let r0 = c * CHUNK;
        let rows = dst.len() / m.max(1);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2/FMA were detected.
            return unsafe { rows_avx2(x, m, w, r0, rows, dst) };
        }
        let _ = simd;
        rows_portable(x, m, w, r0, rows, dst);
    };
    if m == 0 || n == 0 {
        return Vec::new();
    }
    if n * m * k < 1 << 16 {
        out_t.chunks_mut(CHUNK * m).enumerate().for_each(task);
    } else {
        out_t.par_chunks_mut(CHUNK * m).enumerate().for_each(task);
    }
    if m == 1 {
        return out_t;
    }
    transpose(&out_t, n, m)
}

/// [n, m] -> [m, n], in blocks of columns so that both sides stay in cache
/// (a plain loop writes with a stride of n: slow for the vocab-sized head).
pub(crate) fn transpose(t: &[f32], n: usize, m: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut out = vec![0f32; m * n];
    for j0 in (0..n).step_by(BLOCK) {
        let j1 = (j0 + BLOCK).min(n);
        for i in 0..m {
            let row = &mut out[i * n + j0..i * n + j1];
            for (o, j) in row.iter_mut().zip(j0..j1) {
                *o = t[j * m + i];
            }
        }
    }
    out
}

/// `rows` compiled for AVX2 so its loops use 8-wide vectors. Rust never
/// fuses a*b+c on its own, so the results equal the portable build's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<S: WeightRows>(
    x: &[f32],
    m: usize,
    w: &S,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    rows_impl::<S, true>(x, m, w, r0, rows, dst)
}

fn rows_portable<S: WeightRows>(
    x: &[f32],
    m: usize,
    w: &S,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    rows_impl::<S, false>(x, m, w, r0, rows, dst)
}

/// Weight rows `r0 .. r0 + rows` against every activation row; `dst` is
/// [rows, m] (transposed output). Widening is inlined here, so under AVX2 it
/// is compiled for AVX2 too (exact conversions: the same values either way).
/// `AVX2`: called from `rows_avx2`, so the paired-row kernel may be used.
#[inline(always)]
fn rows_impl<S: WeightRows, const AVX2: bool>(
    x: &[f32],
    m: usize,
    w: &S,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
) {
    let k = w.k();
    let mut scratch = SCRATCH.with(|c| c.take());
    scratch.resize(TILE * k, 0.0);
    let mut t = 0;
    while t < rows {
        let tr = TILE.min(rows - t);
        w.widen(r0 + t, &mut scratch[..tr * k]);
        let mut first = 0;
        #[cfg(target_arch = "x86_64")]
        if AVX2 && tr == TILE {
            // Two activation rows per pass share every weight load.
            while first + 2 <= m {
                // SAFETY: AVX2 is enabled in the caller (`rows_avx2`).
                let d = unsafe { dot4x2_avx2(&x[first * k..(first + 2) * k], &scratch, k) };
                for (r, pair) in d.into_iter().enumerate() {
                    dst[(t + r) * m + first] = pair[0];
                    dst[(t + r) * m + first + 1] = pair[1];
                }
                first += 2;
            }
        }
        for i in first..m {
            let xi = &x[i * k..(i + 1) * k];
            if tr == TILE {
                let d = dot4(xi, &scratch, k);
                for (r, v) in d.into_iter().enumerate() {
                    dst[(t + r) * m + i] = v;
                }
            } else {
                for r in 0..tr {
                    dst[(t + r) * m + i] = dot1(xi, &scratch[r * k..(r + 1) * k]);
                }
            }
        }
        t += tr;
    }
    SCRATCH.with(|c| c.replace(scratch));
}

/// Lane sums are combined in the same order by `dot1` and `dot4`, so a
/// weight row gives the same bits whichever of the two computes it.
#[inline(always)]
pub(crate) fn reduce(acc: &[f32; 8], tail: &[f32], xt: &[f32]) -> f32 {
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (a, b) in tail.iter().zip(xt) {
        s += a * b;
    }
    s
}

#[inline(always)]
fn dot1(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cx, cw) = (x.chunks_exact(8), w.chunks_exact(8));
    let (tx, tw) = (cx.remainder(), cw.remainder());
    for (a, b) in cx.zip(cw) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    reduce(&acc, tw, tx)
}

#[inline(always)]
fn dot4(x: &[f32], w: &[f32], k: usize) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let body = k / 8 * 8;
    let (w0, w1, w2, w3) = (&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..4 * k]);
    let mut j = 0;
    while j < body {
        let a = &x[j..j + 8];
        let (b0, b1, b2, b3) = (&w0[j..j + 8], &w1[j..j + 8], &w2[j..j + 8], &w3[j..j + 8]);
        for l in 0..8 {
            acc[0][l] += a[l] * b0[l];
            acc[1][l] += a[l] * b1[l];
            acc[2][l] += a[l] * b2[l];
            acc[3][l] += a[l] * b3[l];
        }
        j += 8;
    }
    let xt = &x[body..];
    [
        reduce(&acc[0], &w0[body..], xt),
        reduce(&acc[1], &w1[body..], xt),
        reduce(&acc[2], &w2[body..], xt),
        reduce(&acc[3], &w3[body..], xt),
    ]
}

/// `dot4` for two activation rows (`x` is [2, k]) with the same per-lane
/// multiply-then-add sequence and the same `reduce`, so pairing rows never
/// changes a result's bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4x2_avx2(x: &[f32], w: &[f32], k: usize) -> [[f32; 2]; 4] {
    use std::arch::x86_64::*;
    assert!(x.len() >= 2 * k && w.len() >= 4 * k);
    let body = k / 8 * 8;
    let (x0, x1, wp) = (x.as_ptr(), x.as_ptr().add(k), w.as_ptr());
    let mut acc0 = [_mm256_setzero_ps(); 4];
    let mut acc1 = [_mm256_setzero_ps(); 4];
    let mut j = 0;
    while j < body {
        let (a0, a1) = (_mm256_loadu_ps(x0.add(j)), _mm256_loadu_ps(x1.add(j)));
        for r in 0..4 {
            let b = _mm256_loadu_ps(wp.add(r * k + j));
            acc0[r] = _mm256_add_ps(acc0[r], _mm256_mul_ps(a0, b));
            acc1[r] = _mm256_add_ps(acc1[r], _mm256_mul_ps(a1, b));
        }
        j += 8;
    }
    let mut out = [[0f32; 2]; 4];
    for r in 0..4 {
        let (mut l0, mut l1) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l0.as_mut_ptr(), acc0[r]);
        _mm256_storeu_ps(l1.as_mut_ptr(), acc1[r]);
        let wt = &w[r * k + body..(r + 1) * k];
        out[r][0] = reduce(&l0, wt, &x[body..k]);
        out[r][1] = reduce(&l1, wt, &x[k + body..2 * k]);
    }
    out
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn reference<W: Elem>(x: &[f32], m: usize, w: &[W], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[j * k + t].to_f32() as f64;
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    fn check<W: Elem>(n: usize, k: usize) {
        let w = DenseMatrix::<W>::from_f32(&data(n * k, 7), n, k);
        let x = data(37 * k, 3);
        let full = matmul(&x, 37, &w);
        let want = reference(&x, 37, &w.w, n, k);
        for (g, e) in full.iter().zip(&want) {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
        }
        // Batch invariance: any prefix of the batch gives the same bits.
        for m in [1, 2, 5, 16] {
            let part = matmul(&x[..m * k], m, &w);
            assert_eq!(part[..], full[..m * n], "m={m}");
        }
    }

    #[test]
    fn matches_reference_and_is_batch_invariant() {
        check::<bf16>(70, 100);
        check::<f16>(33, 64);
        check::<f32>(130, 257);
        check::<bf16>(5, 7);
    }
}
