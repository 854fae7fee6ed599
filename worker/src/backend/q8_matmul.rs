//! Q8_0-weight matmul for x86 AVX2 (CPU backend). Activations are quantized
//! to Q8_0 per 32-value block, like GGML's kernels, but each weight block is
//! loaded once for four activation rows, so batches reuse it. Every output
//! element is computed by the same instruction sequence whatever the batch
//! size, so a request's logits do not depend on what it is batched with.

use half::f16;
use rayon::prelude::*;

const QK: usize = 32;
/// f16 scale + 32 signed bytes, as GGML stores Q8_0.
const BLOCK_BYTES: usize = 34;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// A Q8_0 matrix [n, k] in GGML's block layout.
pub struct Q8Matrix {
    bytes: Vec<u8>,
    pub n: usize,
    pub k: usize,
}

impl Q8Matrix {
    /// `None` when the CPU lacks AVX2/FMA or `k` is not a multiple of 32.
    pub fn new(bytes: Vec<u8>, n: usize, k: usize) -> Option<Self> {
        if !available() || !k.is_multiple_of(QK) || bytes.len() != n * k / QK * BLOCK_BYTES {
            return None;
        }
        Some(Self { bytes, n, k })
    }
}

pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Quantized activations: int8 values [m, k] and one scale per 32-block.
struct QRows {
    qs: Vec<i8>,
    d: Vec<f32>,
}

fn quantize_rows(x: &[f32], k: usize) -> QRows {
    let mut qs = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / QK];
    for ((xb, qb), db) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Same rounding of the scale to f16 as GGML's Q8_0.
        let scale = f16::from_f32(amax / 127.0).to_f32();
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round() as i8;
        }
        *db = scale;
    }
    debug_assert_eq!(qs.len() % k, 0);
    QRows { qs, d }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint output columns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// y[m, n] = x[m, k] · w[n, k]^T.
pub fn matmul(x: &[f32], m: usize, w: &Q8Matrix) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let xq = quantize_rows(x, k);
    let mut out = vec![0f32; m * n];
    let ptr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let run = |t: usize| {
        let (j0, j1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(n));
        // SAFETY: AVX2/FMA were checked in Q8Matrix::new; columns j0..j1 are this task's.
        unsafe { kernel(&xq, m, w, j0, j1, ptr.get()) }
    };
    if m * n * k >= 1 << 16 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(xq: &QRows, m: usize, w: &Q8Matrix, j0: usize, j1: usize, out: *mut f32) {
    let nb = w.k / QK;
    let mut i = 0;
    while i + 4 <= m {
        for j in j0..j1 {
            let s = rows::<4>(xq, i, w, j, nb);
            for (r, v) in s.iter().enumerate() {
                *out.add((i + r) * w.n + j) = *v;
            }
        }
        i += 4;
    }
    while i < m {
        for j in j0..j1 {
            *out.add(i * w.n + j) = rows::<1>(xq, i, w, j, nb)[0];
        }
        i += 1;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &QRows, _: usize, _: &Q8Matrix, _: usize, _: usize, _: *mut f32) {
    unreachable!("Q8Matrix::new refuses to build without AVX2")
}

/// Dot products of weight row `j` with activation rows `i .. i + R`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn rows<const R: usize>(
    xq: &QRows,
    i: usize,
    w: &Q8Matrix,
    j: usize,
    nb: usize,
) -> [f32; R] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let wrow = w.bytes.as_ptr().add(j * nb * BLOCK_BYTES);
    for b in 0..nb {
        let blk = wrow.add(b * BLOCK_BYTES);
        let wd = f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32();
        let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        // maddubs needs an unsigned operand: |w| times x carrying w's sign.
        let aw = _mm256_sign_epi8(wq, wq);
        for (r, a) in acc.iter_mut().enumerate() {
            let row = i + r;
            let xp = xq.qs.as_ptr().add(row * w.k + b * QK) as *const __m256i;
            let sx = _mm256_sign_epi8(_mm256_loadu_si256(xp), wq);
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            let scale = _mm256_set1_ps(wd * *xq.d.get_unchecked(row * nb + b));
            *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *a);
        }
    }
    let mut res = [0f32; R];
    for (out, a) in res.iter_mut().zip(acc) {
        let hi = _mm256_extractf128_ps(a, 1);
        let s = _mm_add_ps(hi, _mm256_castps256_ps128(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        *out = _mm_cvtss_f32(s);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_dequantized_product_and_is_batch_invariant() {
        if !available() {
            eprintln!("SKIP: no AVX2");
            return;
        }
        let (n, k, m) = (70, 96, 7);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 506.0) - 1.0)
            .collect();
        let xv: Vec<f32> = (0..m * k)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0)
            .collect();
        let q = QTensor::quantize(
            &Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w = Q8Matrix::new(q.data().unwrap().into_owned(), n, k).unwrap();
        let y = matmul(&xv, m, &w);
        for r in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| xv[r * k + c] * wd[j * k + c]).sum();
                assert!(
                    (y[r * n + j] - want).abs() < 0.05 * (1.0 + want.abs()),
                    "{r},{j}: {} vs {want}",
                    y[r * n + j]
                );
            }
            // One row alone gives bit-identical results.
            let alone = matmul(&xv[r * k..(r + 1) * k], 1, &w);
            assert_eq!(&alone[..], &y[r * n..(r + 1) * n]);
        }
    }
}
