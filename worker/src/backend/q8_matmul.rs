//! Q8_0-weight matmul for the CPU backend. Activations are quantized to Q8_0
//! per 32-value block, like GGML's kernels. Weights are repacked at load so
//! that one 32-byte load holds 4 values of each of 8 output rows: an int8
//! multiply-add against 4 broadcast activation bytes then leaves one output
//! per i32 lane, with no horizontal sums. A tile shares each weight load
//! between several activation rows.
//!
//! Every output element is computed by the same arithmetic whatever the batch
//! size or its place in a tile (exact integer block sums, then one fused
//! multiply-add per block in block order), so a request's logits do not
//! depend on what it is batched with, and the portable path gives the same
//! bits as the AVX2 one.

use std::cell::RefCell;

use half::f16;
use rayon::prelude::*;

use super::simd_available;

const QK: usize = 32;
/// f16 scale + 32 signed bytes, as GGML stores Q8_0.
const BLOCK_BYTES: usize = 34;
/// Output rows interleaved in one packed group (one i32 lane each).
const GROUP: usize = 8;
/// Bytes of one row per interleaved step (one i32 lane).
const STEP: usize = 4;
/// Per group and block: 8 f32 scales, then 8 steps x 8 rows x 4 bytes.
const PACKED_BLOCK: usize = GROUP * 4 + GROUP * QK;
/// Activation rows sharing one weight load.
const TILE_ROWS: usize = 4;
/// Below this many multiply-adds a matmul stays on the calling thread.
const PAR_MIN_MACS: usize = 1 << 16;

/// A Q8_0 matrix [n, k], repacked for the kernel.
pub struct Q8Matrix {
    packed: Vec<u8>,
    pub n: usize,
    pub k: usize,
}

impl Q8Matrix {
    /// Takes GGML's Q8_0 block bytes. `None` where another kernel is the
    /// better choice (not x86_64: candle has NEON kernels) or when `k` is not
    /// a multiple of 32 or the byte count does not match.
    pub fn new(bytes: Vec<u8>, n: usize, k: usize) -> Option<Self> {
        if !cfg!(target_arch = "x86_64")
            || !k.is_multiple_of(QK)
            || bytes.len() != n * k / QK * BLOCK_BYTES
        {
            return None;
        }
        Some(Self {
            packed: pack(&bytes, n, k),
            n,
            k,
        })
    }

    fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    fn blocks(&self) -> usize {
        self.k / QK
    }
}

/// GGML block rows -> groups of 8 rows, block by block. Missing rows of the
/// last group are zeros. -128 becomes -127: the kernel negates weights with
/// `sign`, which cannot represent +128 (GGML itself never writes -128).
fn pack(bytes: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nb = k / QK;
    let groups = n.div_ceil(GROUP);
    let mut out = vec![0u8; groups * nb * PACKED_BLOCK];
    for j in 0..n {
        let (g, r) = (j / GROUP, j % GROUP);
        for b in 0..nb {
            let src = &bytes[(j * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
            let d = f16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32();
            let dst = &mut out[(g * nb + b) * PACKED_BLOCK..][..PACKED_BLOCK];
            dst[r * 4..r * 4 + 4].copy_from_slice(&d.to_le_bytes());
            for s in 0..QK / STEP {
                for t in 0..STEP {
                    let q = (src[2 + s * STEP + t] as i8).max(-127);
                    dst[GROUP * 4 + (s * GROUP + r) * STEP + t] = q as u8;
                }
            }
        }
    }
    out
}

/// Quantized activations: int8 values, their absolute values, and one scale
/// per 32-block. Reused between matmuls.
#[derive(Default)]
struct QRows {
    qs: Vec<i8>,
    abs: Vec<u8>,
    d: Vec<f32>,
}

impl QRows {
    fn quantize(&mut self, x: &[f32], path: Path) {
        self.qs.resize(x.len(), 0);
        self.abs.resize(x.len(), 0);
        self.d.resize(x.len() / QK, 0.0);
        #[cfg(target_arch = "x86_64")]
        if path == Path::Simd {
            // SAFETY: AVX2/FMA were detected.
            return unsafe { self.quantize_avx2(x) };
        }
        self.quantize_blocks(x);
    }

    /// `quantize_blocks` in AVX2, step for step (same bits: exact max, the
    /// same scalar scale, then elementwise IEEE multiply and round).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let sign = _mm256_set1_ps(-0.0);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        // packs interleave 128-bit lanes; this puts the dwords back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (bi, xb) in x.chunks_exact(QK).enumerate() {
            let p = xb.as_ptr();
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
            let mut m = _mm256_setzero_ps();
            for vi in v {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, vi));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let amax = lanes.iter().fold(0f32, |a, v| a.max(*v));
            let scale = f16::from_f32(amax / 127.0).to_f32();
            let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let q = v.map(|vi| {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(vi, inv),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            let w16a = _mm256_packs_epi32(q[0], q[1]);
            let w16b = _mm256_packs_epi32(q[2], q[3]);
            let b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b), order);
            let dst = bi * QK;
            _mm256_storeu_si256(self.qs.as_mut_ptr().add(dst) as *mut __m256i, b8);
            _mm256_storeu_si256(
                self.abs.as_mut_ptr().add(dst) as *mut __m256i,
                _mm256_abs_epi8(b8),
            );
            *self.d.get_unchecked_mut(bi) = scale;
        }
    }

    fn quantize_blocks(&mut self, x: &[f32]) {
        for (((xb, qb), ab), db) in x
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .zip(self.abs.chunks_exact_mut(QK))
            .zip(self.d.iter_mut())
        {
            // Lane-wise maxima vectorize; max is exact, so the order is free.
            let mut lanes = [0f32; 8];
            for c in xb.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l = l.max(v.abs());
                }
            }
            let amax = lanes.iter().fold(0f32, |a, v| a.max(*v));
            // Same rounding of the scale to f16 as GGML's Q8_0.
            let scale = f16::from_f32(amax / 127.0).to_f32();
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for ((q, a), v) in qb.iter_mut().zip(ab.iter_mut()).zip(xb) {
                // Ties to even: one instruction with SSE4.1/AVX, unlike round().
                let v = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                *q = v;
                *a = v.unsigned_abs();
            }
            *db = scale;
        }
    }
}

thread_local! {
    static QBUF: RefCell<QRows> = RefCell::new(QRows::default());
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

/// Which kernel runs; tests force the portable one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Simd,
    Portable,
}

/// y[m, n] = x[m, k] · w[n, k]^T.
pub fn matmul(x: &[f32], m: usize, w: &Q8Matrix) -> Vec<f32> {
    let path = if simd_available() {
        Path::Simd
    } else {
        Path::Portable
    };
    matmul_with(x, m, w, path)
}

fn matmul_with(x: &[f32], m: usize, w: &Q8Matrix, path: Path) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * w.k);
    let mut out = vec![0f32; m * w.n];
    QBUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut xq) => run_tasks(&mut xq, x, m, w, path, &mut out),
        // A rayon worker that steals another matmul while waiting in this
        // one's join: that one gets its own buffer.
        Err(_) => run_tasks(&mut QRows::default(), x, m, w, path, &mut out),
    });
    out
}

fn run_tasks(xq: &mut QRows, x: &[f32], m: usize, w: &Q8Matrix, path: Path, out: &mut [f32]) {
    xq.quantize(x, path);
    let xq = &*xq;
    let ptr = OutPtr(out.as_mut_ptr());
    let groups = w.groups();
    let macs = m * w.n * w.k;
    // Enough tasks to balance two cores, each big enough to amortise
    // scheduling; a task's weights stay in L2 while all rows pass.
    let per_task = if macs >= PAR_MIN_MACS {
        groups.div_ceil(8 * rayon::current_num_threads()).max(2)
    } else {
        groups
    };
    let tasks = groups.div_ceil(per_task);
    let run = |t: usize| {
        let (g0, g1) = (t * per_task, ((t + 1) * per_task).min(groups));
        match path {
            // SAFETY: AVX2/FMA were detected; groups g0..g1 own their columns.
            #[cfg(target_arch = "x86_64")]
            Path::Simd => unsafe { avx2::task(xq, m, w, g0, g1, ptr.get()) },
            // SAFETY: groups g0..g1 own their output columns.
            _ => unsafe { portable_task(xq, m, w, g0, g1, ptr.get()) },
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Writes the valid columns of group `g` for row `i`.
///
/// # Safety
/// `out` holds [m, n] and row `i`, group `g` belong to the caller.
#[inline(always)]
unsafe fn store_group(out: *mut f32, n: usize, i: usize, g: usize, v: &[f32; GROUP]) {
    let j0 = g * GROUP;
    let cols = GROUP.min(n - j0);
    std::ptr::copy_nonoverlapping(v.as_ptr(), out.add(i * n + j0), cols);
}

/// Reference path: the same sums in the same order as the AVX2 kernel.
///
/// # Safety
/// Groups g0..g1 of `out` ([m, n]) belong to the caller.
unsafe fn portable_task(xq: &QRows, m: usize, w: &Q8Matrix, g0: usize, g1: usize, out: *mut f32) {
    let (k, nb) = (w.k, w.blocks());
    for i in 0..m {
        for g in g0..g1 {
            let mut acc = [0f32; GROUP];
            for b in 0..nb {
                let blk = &w.packed[(g * nb + b) * PACKED_BLOCK..][..PACKED_BLOCK];
                let xd = xq.d[i * nb + b];
                let xs = &xq.qs[i * k + b * QK..][..QK];
                for (r, a) in acc.iter_mut().enumerate() {
                    let wd = f32::from_le_bytes(blk[r * 4..r * 4 + 4].try_into().unwrap());
                    let mut isum = 0i32;
                    for s in 0..QK / STEP {
                        let wq = &blk[GROUP * 4 + (s * GROUP + r) * STEP..][..STEP];
                        for t in 0..STEP {
                            isum += wq[t] as i8 as i32 * xs[s * STEP + t] as i32;
                        }
                    }
                    *a = (isum as f32).mul_add(wd * xd, *a);
                }
            }
            store_group(out, w.n, i, g, &acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA are available; groups g0..g1 of `out` belong to the caller.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task(
        xq: &QRows,
        m: usize,
        w: &Q8Matrix,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        let mut i = 0;
        while i + TILE_ROWS <= m {
            groups::<TILE_ROWS>(xq, i, w, g0, g1, out);
            i += TILE_ROWS;
        }
        while i < m {
            groups::<1>(xq, i, w, g0, g1, out);
            i += 1;
        }
    }

    /// Groups g0..g1 times activation rows `i .. i + R`, two groups at a time
    /// so that each activation broadcast serves 16 output rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn groups<const R: usize>(
        xq: &QRows,
        i: usize,
        w: &Q8Matrix,
        g0: usize,
        g1: usize,
        out: *mut f32,
    ) {
        let mut g = g0;
        while g + 2 <= g1 {
            tile::<R, 2>(xq, i, w, g, out);
            g += 2;
        }
        if g < g1 {
            tile::<R, 1>(xq, i, w, g, out);
        }
    }

    /// Groups `g .. g + G` (8 output rows each) times activation rows `i .. i + R`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, const G: usize>(
        xq: &QRows,
        i: usize,
        w: &Q8Matrix,
        g: usize,
        out: *mut f32,
    ) {
        let (k, nb) = (w.k, w.blocks());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); G]; R];
        let gstride = nb * PACKED_BLOCK;
        let wbase = w.packed.as_ptr().add(g * gstride);
        for b in 0..nb {
            let blk = wbase.add(b * PACKED_BLOCK);
            let mut isum = [[_mm256_setzero_si256(); G]; R];
            for s in 0..QK / STEP {
                let mut wv = [_mm256_setzero_si256(); G];
                for (gi, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(
                        blk.add(gi * gstride + GROUP * 4 + s * GROUP * STEP) as *const __m256i
                    );
                }
                for (r, is) in isum.iter_mut().enumerate() {
                    let off = (i + r) * k + b * QK + s * STEP;
                    let xa = _mm256_set1_epi32(
                        (xq.abs.as_ptr().add(off) as *const i32).read_unaligned(),
                    );
                    let xs =
                        _mm256_set1_epi32((xq.qs.as_ptr().add(off) as *const i32).read_unaligned());
                    for (v, isg) in wv.iter().zip(is.iter_mut()) {
                        // maddubs needs an unsigned operand: |x| times w carrying x's sign.
                        let p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(*v, xs));
                        *isg = _mm256_add_epi32(*isg, _mm256_madd_epi16(p, ones));
                    }
                }
            }
            for (r, (ar, is)) in acc.iter_mut().zip(isum).enumerate() {
                let xd = _mm256_set1_ps(*xq.d.get_unchecked((i + r) * nb + b));
                for (gi, (a, isg)) in ar.iter_mut().zip(is).enumerate() {
                    let wd = _mm256_loadu_ps(blk.add(gi * gstride) as *const f32);
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isg), _mm256_mul_ps(wd, xd), *a);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (gi, a) in ar.iter().enumerate() {
                let mut v = [0f32; GROUP];
                _mm256_storeu_ps(v.as_mut_ptr(), *a);
                store_group(out, w.n, i + r, g + gi, &v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn q8(n: usize, k: usize) -> (Q8Matrix, Vec<f32>) {
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 506.0) - 1.0)
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
        (
            Q8Matrix::new(q.data().unwrap().into_owned(), n, k).unwrap(),
            wd,
        )
    }

    fn acts(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| ((i * 104729 % 997) as f32 / 498.0) - 1.0)
            .collect()
    }

    #[test]
    fn matches_dequantized_product_and_is_batch_invariant() {
        // n not a multiple of 8 and m not a multiple of the tile: edges too.
        let (n, k, m) = (70, 96, 7);
        let (w, wd) = q8(n, k);
        let xv = acts(m, k);
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

    #[test]
    fn parallel_split_and_portable_path_give_the_same_bits() {
        // Big enough to be split over tasks.
        let (n, k, m) = (264, 128, 9);
        let (w, _) = q8(n, k);
        let xv = acts(m, k);
        let y = matmul(&xv, m, &w);
        let portable = matmul_with(&xv, m, &w, Path::Portable);
        assert_eq!(y, portable);
        for r in [0, 4, 8] {
            let alone = matmul(&xv[r * k..(r + 1) * k], 1, &w);
            assert_eq!(&alone[..], &y[r * n..(r + 1) * n]);
        }
    }

    #[test]
    fn simd_and_portable_quantization_agree() {
        if !simd_available() {
            eprintln!("SKIP: no AVX2");
            return;
        }
        // Ties (x.5 after scaling), zeros, a zero block and both signs.
        let mut x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) * 0.37).collect();
        x[..32].iter_mut().for_each(|v| *v = 0.0);
        x[40] = 127.0;
        x[41] = 0.5;
        x[42] = -1.5;
        x[43] = 2.5;
        let (mut a, mut b) = (QRows::default(), QRows::default());
        a.quantize(&x, Path::Simd);
        b.quantize(&x, Path::Portable);
        assert_eq!(a.qs, b.qs);
        assert_eq!(a.abs, b.abs);
        assert_eq!(a.d, b.d);
        assert_eq!(a.qs[41], 0);
        assert_eq!(a.qs[42], -2);
        assert_eq!(a.qs[43], 2);
    }

    #[test]
    fn nested_calls_from_rayon_workers_agree() {
        // Workers may steal one matmul while waiting inside another.
        let (n, k, m) = (264, 128, 5);
        let (w, _) = q8(n, k);
        let xv = acts(m, k);
        let want = matmul(&xv, m, &w);
        let all: Vec<Vec<f32>> = (0..16)
            .into_par_iter()
            .map(|_| matmul(&xv, m, &w))
            .collect();
        assert!(all.iter().all(|y| *y == want));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Q8Matrix::new(vec![0; 34], 1, 33).is_none());
        assert!(Q8Matrix::new(vec![0; 33], 1, 32).is_none());
    }
}
