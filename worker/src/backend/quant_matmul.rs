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
            G::Q4_0 => legacy::<18>(src, dst, |b, y| {
                let d = f16_at(b, 0);
                for (i, &q) in b[2..18].iter().enumerate() {
                    y[i] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[i + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }),
            G::Q4_1 => legacy::<20>(src, dst, |b, y| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (i, &q) in b[4..20].iter().enumerate() {
                    y[i] = (q & 0x0F) as f32 * d + m;
                    y[i + 16] = (q >> 4) as f32 * d + m;
                }
            }),
            G::Q5_0 => legacy::<22>(src, dst, |b, y| {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (i, &q) in b[6..22].iter().enumerate() {
                    let h0 = (((qh >> i) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (i + 12)) & 0x10) as u8;
                    y[i] = (((q & 0x0F) | h0) as i32 - 16) as f32 * d;
                    y[i + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
                }
            }),
            G::Q5_1 => legacy::<24>(src, dst, |b, y| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                for (i, &q) in b[8..24].iter().enumerate() {
                    let h0 = (((qh >> i) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (i + 12)) & 0x10) as u8;
                    y[i] = ((q & 0x0F) | h0) as f32 * d + m;
                    y[i + 16] = ((q >> 4) | h1) as f32 * d + m;
                }
            }),
            G::Q8_0 => legacy::<34>(src, dst, |b, y| {
                let d = f16_at(b, 0);
                for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                    *v = (q as i8) as f32 * d;
                }
            }),
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
#[inline(always)]
fn legacy<const B: usize>(src: &[u8], dst: &mut [f32], block: impl Fn(&[u8; B], &mut [f32; QK])) {
    for (b, y) in src.chunks_exact(B).zip(dst.chunks_exact_mut(QK)) {
        block(b.try_into().unwrap(), y.try_into().unwrap());
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

/// y[m, n] = x[m, k] · w[n, k]^T.
pub fn matmul(x: &[f32], m: usize, w: &QuantMatrix) -> Vec<f32> {
    half_matmul::matmul(x, m, w)
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
    fn rejects_unsupported_types_and_bad_shapes() {
        assert!(QuantMatrix::new(&[0; 64], GgmlDType::F16, 1, 32).is_none());
        assert!(QuantMatrix::new(&[0; 20], GgmlDType::Q4_1, 1, 33).is_none());
        assert!(QuantMatrix::new(&[0; 19], GgmlDType::Q4_1, 1, 32).is_none());
        assert!(QuantMatrix::new(&[0; 20], GgmlDType::Q4_1, 1, 32).is_some());
    }
}
