//! Exact matmul y = x·Wᵀ for GGML-quantized weights and f32 activations: the
//! semantics of running the model on its dequantized weights (what HF
//! transformers computes when it loads a GGUF), with the weights kept in
//! their GGML blocks in memory.
//!
//! The kernel is `half_matmul`'s: a tile of weight rows is dequantized into an
//! f32 scratch once and then serves every activation row of the batch (in
//! register-blocked pairs under AVX2), each output being one dot product over
//! k in a fixed lane order. Dequantization is exact (`q * d (+ m)` on the
//! block's f16 scales, the same expression as GGML's and candle's
//! `to_float`), so every (row, output) gets the same bits whatever the batch
//! size, its place in a tile, or whether the AVX2 or portable build ran.
//!
//! The 4/5/8-bit legacy types are dequantized by inlined code here (so they
//! vectorize inside the AVX2 build); K-quants go through candle's per-block
//! `to_float`, which gives the same values, only slower.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::f16;

use super::half_matmul::{self, WeightRows};

/// Legacy GGML block: 32 values.
const QK: usize = 32;

/// A GGML-quantized matrix [n, k] in GGML's own block layout.
pub struct QuantMatrix {
    /// Block bytes, row after row; u64 storage keeps the blocks' f16 fields
    /// aligned for candle's block types.
    words: Vec<u64>,
    len: usize,
    dtype: GgmlDType,
    /// Bytes of one weight row.
    row_bytes: usize,
    pub n: usize,
    pub k: usize,
}

impl QuantMatrix {
    /// Takes GGML block bytes of an [n, k] matrix. `None` for types this
    /// kernel does not run (f16/bf16/f32 tensors, Q8_1) or a byte count
    /// that does not match.
    pub fn new(bytes: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Option<Self> {
        use GgmlDType as G;
        let supported = matches!(
            dtype,
            G::Q4_0
                | G::Q4_1
                | G::Q5_0
                | G::Q5_1
                | G::Q8_0
                | G::Q2K
                | G::Q3K
                | G::Q4K
                | G::Q5K
                | G::Q6K
                | G::Q8K
        );
        let bs = dtype.block_size();
        if !supported || !k.is_multiple_of(bs) {
            return None;
        }
        let row_bytes = k / bs * dtype.type_size();
        // Every block type's size is even, so each row (and block) starts
        // 2-aligned in the u64 storage.
        if bytes.len() != n * row_bytes || !row_bytes.is_multiple_of(2) {
            return None;
        }
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Some(Self {
            words,
            len: bytes.len(),
            dtype,
            row_bytes,
            n,
            k,
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }

    fn row(&self, j: usize) -> &[u8] {
        &self.bytes()[j * self.row_bytes..(j + 1) * self.row_bytes]
    }

    /// Row `j`'s exact f32 values.
    #[inline(always)]
    fn dequantize_row(&self, j: usize, dst: &mut [f32]) {
        use GgmlDType as G;
        let src = self.row(j);
        match self.dtype {
            G::Q4_0 => legacy(src, dst, q4_0_block),
            G::Q4_1 => legacy(src, dst, q4_1_block),
            G::Q5_0 => legacy(src, dst, q5_0_block),
            G::Q5_1 => legacy(src, dst, q5_1_block),
            G::Q8_0 => legacy(src, dst, q8_0_block),
            G::Q2K => k_quant::<BlockQ2K>(src, dst),
            G::Q3K => k_quant::<BlockQ3K>(src, dst),
            G::Q4K => k_quant::<BlockQ4K>(src, dst),
            G::Q5K => k_quant::<BlockQ5K>(src, dst),
            G::Q6K => k_quant::<BlockQ6K>(src, dst),
            G::Q8K => k_quant::<BlockQ8K>(src, dst),
            other => unreachable!("QuantMatrix::new rejects {other:?}"),
        }
    }
}

impl WeightRows for QuantMatrix {
    fn n(&self) -> usize {
        self.n
    }

    fn k(&self) -> usize {
        self.k
    }

    #[inline(always)]
    fn widen(&self, r0: usize, dst: &mut [f32]) {
        for (j, d) in dst.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(r0 + j, d);
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantizes a row of `B`-byte, 32-value legacy blocks with `block`.
/// The block functions are `#[inline(always)]` fn items, not closures: a
/// closure would not inherit the AVX2 build's target features.
#[inline(always)]
fn legacy<const B: usize>(src: &[u8], dst: &mut [f32], block: impl Fn(&[u8; B], &mut [f32; QK])) {
    for (b, y) in src.chunks_exact(B).zip(dst.chunks_exact_mut(QK)) {
        block(b.try_into().unwrap(), y.try_into().unwrap());
    }
}

#[inline(always)]
fn q4_0_block(b: &[u8; 18], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (i, &q) in b[2..18].iter().enumerate() {
        y[i] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[i + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

#[inline(always)]
fn q4_1_block(b: &[u8; 20], y: &mut [f32; QK]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (i, &q) in b[4..20].iter().enumerate() {
        y[i] = (q & 0x0F) as f32 * d + m;
        y[i + 16] = (q >> 4) as f32 * d + m;
    }
}

#[inline(always)]
fn q5_0_block(b: &[u8; 22], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (i, &q) in b[6..22].iter().enumerate() {
        let h0 = (((qh >> i) << 4) & 0x10) as u8;
        let h1 = ((qh >> (i + 12)) & 0x10) as u8;
        y[i] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[i + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
fn q5_1_block(b: &[u8; 24], y: &mut [f32; QK]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (i, &q) in b[8..24].iter().enumerate() {
        let h0 = (((qh >> i) << 4) & 0x10) as u8;
        let h1 = ((qh >> (i + 12)) & 0x10) as u8;
        y[i] = ((q & 0x0F) | h0) as f32 * d + m;
        y[i + 16] = ((q >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
fn q8_0_block(b: &[u8; 34], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = (q as i8) as f32 * d;
    }
}

/// A row of K-quant blocks through candle's `to_float`.
fn k_quant<T: GgmlType>(src: &[u8], dst: &mut [f32]) {
    let nb = dst.len() / T::BLCK_SIZE;
    debug_assert_eq!(src.len(), nb * std::mem::size_of::<T>());
    debug_assert!((src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()));
    // SAFETY: `src` holds `nb` GGML blocks of `T` (a repr(C) plain-data
    // struct of bytes and f16s, valid for any bit pattern), aligned as
    // checked in `QuantMatrix::new` (u64 storage, even row sizes).
    let blocks = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const T, nb) };
    T::to_float(blocks, dst);
}

/// Below this many activation rows, legacy types skip the f32 scratch: the
/// AVX2 kernel dequantizes each block in registers right where the dot
/// product needs it (a few rows cannot amortise writing and re-reading the
/// scratch). Same values, same per-lane order: the same bits.
const FUSED_MAX_ROWS: usize = 4;
/// Output rows per parallel task of the fused kernel.
const FUSED_CHUNK: usize = 32;

/// y[m, n] = x[m, k] · w[n, k]^T.
pub fn matmul(x: &[f32], m: usize, w: &QuantMatrix) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if m < FUSED_MAX_ROWS && fused::available() && fused::supports(w.dtype) {
        return fused::matmul(x, m, w);
    }
    half_matmul::matmul(x, m, w)
}

/// The fused AVX2 kernel for the legacy 32-value types. Each block becomes
/// 32 signed bytes in value order plus its f16 scale (and min), converted to
/// f32 and multiplied out (`q * d (+ m)`, no FMA) exactly as
/// `dequantize_row` does, then multiply-added into 8 lane sums in the order
/// `half_matmul`'s dot products use, and reduced by its `reduce`.
#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{QuantMatrix, FUSED_CHUNK, QK};
    use crate::backend::half_matmul::reduce;
    use crate::backend::simd_available;
    use candle_core::quantized::GgmlDType;

    pub(super) fn available() -> bool {
        simd_available() && is_x86_feature_detected!("f16c")
    }

    pub(super) fn supports(dtype: GgmlDType) -> bool {
        use GgmlDType as G;
        matches!(dtype, G::Q4_0 | G::Q4_1 | G::Q5_0 | G::Q5_1 | G::Q8_0)
    }

    pub(super) fn matmul(x: &[f32], m: usize, w: &QuantMatrix) -> Vec<f32> {
        let (n, k) = (w.n, w.k);
        let mut out_t = vec![0f32; n * m];
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let task = |(c, dst): (usize, &mut [f32])| {
            let j0 = c * FUSED_CHUNK;
            let rows = dst.len() / m;
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                // SAFETY: AVX2/FMA/F16C were detected (`available`).
                let y = unsafe { rows_avx2(xi, w, j0, rows) };
                for (r, v) in y[..rows].iter().enumerate() {
                    dst[r * m + i] = *v;
                }
            }
        };
        if n * m * k < 1 << 16 {
            out_t.chunks_mut(FUSED_CHUNK * m).enumerate().for_each(task);
        } else {
            out_t
                .par_chunks_mut(FUSED_CHUNK * m)
                .enumerate()
                .for_each(task);
        }
        if m == 1 {
            return out_t;
        }
        crate::backend::half_matmul::transpose(&out_t, n, m)
    }

    /// Outputs `j0 .. j0 + rows` (at most FUSED_CHUNK) for one activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_avx2(x: &[f32], w: &QuantMatrix, j0: usize, rows: usize) -> [f32; FUSED_CHUNK] {
        use GgmlDType as G;
        match w.dtype {
            G::Q4_0 => rows_of::<Q4_0>(x, w, j0, rows),
            G::Q4_1 => rows_of::<Q4_1>(x, w, j0, rows),
            G::Q5_0 => rows_of::<Q5_0>(x, w, j0, rows),
            G::Q5_1 => rows_of::<Q5_1>(x, w, j0, rows),
            G::Q8_0 => rows_of::<Q8_0>(x, w, j0, rows),
            other => unreachable!("fused kernel asked for {other:?}"),
        }
    }

    /// A legacy block type: its size and how its 32 quants decode.
    trait Legacy {
        const BYTES: usize;
        /// Whether values are `q * d + m` (else `q * d`).
        const HAS_MIN: bool;
        /// The 32 quants in value order, as signed bytes.
        unsafe fn quants(b: *const u8) -> __m256i;
    }

    /// Low nibbles then high nibbles of 16 bytes: GGML's 4-bit value order.
    #[inline(always)]
    unsafe fn nibbles(q: *const u8) -> __m256i {
        let v = _mm_loadu_si128(q as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// 5-bit quants: nibbles plus one high bit each from `qh` (scalar; Q5
    /// files are rare).
    #[inline(always)]
    unsafe fn five_bits(qh: *const u8, qs: *const u8, offset: i32) -> __m256i {
        let h = u32::from_le_bytes(std::ptr::read_unaligned(qh as *const [u8; 4]));
        let mut q = [0u8; QK];
        for i in 0..QK / 2 {
            let b = *qs.add(i);
            let h0 = (((h >> i) << 4) & 0x10) as u8;
            let h1 = ((h >> (i + 12)) & 0x10) as u8;
            q[i] = (((b & 0x0F) | h0) as i32 + offset) as u8;
            q[i + 16] = (((b >> 4) | h1) as i32 + offset) as u8;
        }
        _mm256_loadu_si256(q.as_ptr() as *const __m256i)
    }

    struct Q4_0;
    impl Legacy for Q4_0 {
        const BYTES: usize = 18;
        const HAS_MIN: bool = false;
        #[inline(always)]
        unsafe fn quants(b: *const u8) -> __m256i {
            _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8))
        }
    }

    struct Q4_1;
    impl Legacy for Q4_1 {
        const BYTES: usize = 20;
        const HAS_MIN: bool = true;
        #[inline(always)]
        unsafe fn quants(b: *const u8) -> __m256i {
            nibbles(b.add(4))
        }
    }

    struct Q5_0;
    impl Legacy for Q5_0 {
        const BYTES: usize = 22;
        const HAS_MIN: bool = false;
        #[inline(always)]
        unsafe fn quants(b: *const u8) -> __m256i {
            five_bits(b.add(2), b.add(6), -16)
        }
    }

    struct Q5_1;
    impl Legacy for Q5_1 {
        const BYTES: usize = 24;
        const HAS_MIN: bool = true;
        #[inline(always)]
        unsafe fn quants(b: *const u8) -> __m256i {
            five_bits(b.add(4), b.add(8), 0)
        }
    }

    struct Q8_0;
    impl Legacy for Q8_0 {
        const BYTES: usize = 34;
        const HAS_MIN: bool = false;
        #[inline(always)]
        unsafe fn quants(b: *const u8) -> __m256i {
            _mm256_loadu_si256(b.add(2) as *const __m256i)
        }
    }

    /// An f16 at `p` as f32 (exact, as `half`'s conversion).
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> __m256 {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))))
    }

    #[inline(always)]
    unsafe fn rows_of<T: Legacy>(
        x: &[f32],
        w: &QuantMatrix,
        j0: usize,
        rows: usize,
    ) -> [f32; FUSED_CHUNK] {
        let mut out = [0f32; FUSED_CHUNK];
        let mut r = 0;
        while r + 4 <= rows {
            let v = dot::<T, 4>(x, w, j0 + r);
            out[r..r + 4].copy_from_slice(&v);
            r += 4;
        }
        while r < rows {
            out[r] = dot::<T, 1>(x, w, j0 + r)[0];
            r += 1;
        }
        out
    }

    /// `G` weight rows from `j` against one activation row.
    #[inline(always)]
    unsafe fn dot<T: Legacy, const G: usize>(x: &[f32], w: &QuantMatrix, j: usize) -> [f32; G] {
        debug_assert!(x.len() == w.k && j + G <= w.n);
        let nb = w.k / QK;
        let base = w.bytes().as_ptr().add(j * w.row_bytes);
        let xp = x.as_ptr();
        // No closures in here: they would not inherit the target features,
        // and every intrinsic in them would become a call.
        let mut acc = [_mm256_setzero_ps(); G];
        for b in 0..nb {
            let xb = xp.add(b * QK);
            let xv = [
                _mm256_loadu_ps(xb),
                _mm256_loadu_ps(xb.add(8)),
                _mm256_loadu_ps(xb.add(16)),
                _mm256_loadu_ps(xb.add(24)),
            ];
            for (g, a) in acc.iter_mut().enumerate() {
                let blk = base.add(g * w.row_bytes + b * T::BYTES);
                let d = f16_at(blk);
                let m = if T::HAS_MIN {
                    f16_at(blk.add(2))
                } else {
                    _mm256_setzero_ps()
                };
                let q = T::quants(blk);
                let (lo, hi) = (_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                let chunks = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (c, qc) in chunks.into_iter().enumerate() {
                    let mut wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qc)), d);
                    if T::HAS_MIN {
                        wv = _mm256_add_ps(wv, m);
                    }
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(xv[c], wv));
                }
            }
        }
        let mut out = [0f32; G];
        for (o, a) in out.iter_mut().zip(acc) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            *o = reduce(&lanes, &[], &[]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    const TYPES: [GgmlDType; 9] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 2654435761usize) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// A quantized [n, k] matrix and candle's dequantization of it.
    fn quantized(dtype: GgmlDType, n: usize, k: usize) -> (QuantMatrix, Vec<f32>) {
        let t = Tensor::from_vec(data(n * k, 11), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let m = QuantMatrix::new(&q.data().unwrap(), dtype, n, k).unwrap();
        (m, wd)
    }

    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn dequantizes_to_candles_exact_values() {
        for dtype in TYPES {
            let (w, want) = quantized(dtype, 3, 512);
            let mut got = vec![0f32; 3 * 512];
            w.widen(0, &mut got);
            assert_eq!(got, want, "{dtype:?}");
        }
    }

    /// Against an f64 dequantize-then-dot reference, batch sizes 1..=64 with
    /// odd n (not a multiple of the 4-row tile or the 32-row task); every
    /// batch's rows are the bits of the full batch's.
    #[test]
    fn matches_dequantized_reference_and_is_batch_invariant() {
        for dtype in TYPES {
            let k = if dtype.block_size() == 256 { 512 } else { 96 };
            let n = 37;
            let (w, wd) = quantized(dtype, n, k);
            let x = data(64 * k, 5);
            let full = matmul(&x, 64, &w);
            let want = reference(&x, 64, &wd, n, k);
            // f32 accumulation over k terms: error well under 1e-5 relative
            // to the sum of |terms|.
            for i in 0..64 {
                for j in 0..n {
                    let mag: f64 = (0..k)
                        .map(|t| (x[i * k + t] as f64 * wd[j * k + t] as f64).abs())
                        .sum();
                    let (g, e) = (full[i * n + j] as f64, want[i * n + j]);
                    assert!(
                        (g - e).abs() <= 1e-5 * mag + 1e-6,
                        "{dtype:?} {i},{j}: {g} vs {e}"
                    );
                }
            }
            for m in 1..=64 {
                let part = matmul(&x[..m * k], m, &w);
                assert_eq!(part[..], full[..m * n], "{dtype:?} m={m}");
            }
            // A row alone equals the same row inside a batch, wherever it sits.
            for r in [0, 1, 30, 63] {
                let alone = matmul(&x[r * k..(r + 1) * k], 1, &w);
                assert_eq!(alone[..], full[r * n..(r + 1) * n], "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn parallel_split_gives_the_same_bits() {
        // Enough work to be split over rayon tasks, n past several 32-row chunks.
        let (n, k) = (200, 320);
        let (w, _) = quantized(GgmlDType::Q4_1, n, k);
        let x = data(9 * k, 3);
        let y = matmul(&x, 9, &w);
        for r in 0..9 {
            let alone = matmul(&x[r * k..(r + 1) * k], 1, &w);
            assert_eq!(alone[..], y[r * n..(r + 1) * n]);
        }
    }

    #[test]
    fn avx2_and_portable_builds_give_the_same_bits() {
        if !super::super::simd_available() {
            eprintln!("SKIP: no AVX2");
            return;
        }
        for dtype in TYPES {
            let k = if dtype.block_size() == 256 { 256 } else { 64 };
            let (w, _) = quantized(dtype, 45, k);
            let x = data(7 * k, 9);
            let simd = half_matmul::matmul_on(&x, 7, &w, true);
            let portable = half_matmul::matmul_on(&x, 7, &w, false);
            assert_eq!(simd, portable, "{dtype:?}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fused_kernel_gives_the_portable_bits() {
        if !fused::available() {
            eprintln!("SKIP: no AVX2/F16C");
            return;
        }
        for dtype in TYPES.into_iter().filter(|t| fused::supports(*t)) {
            let (w, _) = quantized(dtype, 70, 160);
            for m in 1..FUSED_MAX_ROWS {
                let x = data(m * 160, m);
                let want = half_matmul::matmul_on(&x, m, &w, false);
                assert_eq!(fused::matmul(&x, m, &w), want, "{dtype:?} m={m}");
            }
        }
    }

    #[test]
    fn rejects_unsupported_types_and_bad_shapes() {
        assert!(QuantMatrix::new(&[0; 64], GgmlDType::F16, 1, 32).is_none());
        assert!(QuantMatrix::new(&[0; 20], GgmlDType::Q4_1, 1, 33).is_none());
        assert!(QuantMatrix::new(&[0; 19], GgmlDType::Q4_1, 1, 32).is_none());
        assert!(QuantMatrix::new(&[0; 20], GgmlDType::Q4_1, 1, 32).is_some());
    }
}
