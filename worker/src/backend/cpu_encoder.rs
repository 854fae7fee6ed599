//! The CPU's encoder kernels (BERT-family embeddings): LayerNorm, exact
//! GELU, bidirectional attention within each packed sequence, pooling.
//! Pure functions over row-major f32 slices; `cpu.rs` wraps them as ops.

use rayon::prelude::*;

use crate::attention::QkvHeads;
use crate::pooling::{self, PoolingType};

/// Below this many rows, the kernels stay on one thread.
const PAR_ROWS: usize = 4;

/// One row of LayerNorm in place (biased variance, as torch computes it).
#[inline]
fn layer_norm_row(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * w + b;
    }
}

/// LayerNorm over rows of `cols` values of `x + residual` (or `x`).
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    cols: usize,
    w: &[f32],
    b: &[f32],
    eps: f32,
) -> Vec<f32> {
    let mut out = match residual {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    let f = |row: &mut [f32]| layer_norm_row(row, w, b, eps);
    if out.len() / cols.max(1) >= PAR_ROWS {
        out.par_chunks_exact_mut(cols).for_each(f);
    } else {
        out.chunks_exact_mut(cols).for_each(f);
    }
    out
}

/// erf to within a few f32 ulps (Abramowitz & Stegun 7.1.26, 1.5e-7 in
/// exact arithmetic, under 6e-7 evaluated in f32): the f64 erf costs several
/// times more and took a sixth of an encoder step.
#[inline]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * (-a * a).exp();
    y.copysign(x)
}

/// `x * Φ(x)` with the exact normal CDF (HF's "gelu", not the tanh form).
#[inline]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

pub fn gelu(x: &mut [f32]) {
    if x.len() >= 4096 {
        x.par_chunks_mut(1024)
            .for_each(|c| c.iter_mut().for_each(|v| *v = gelu_erf(*v)));
    } else {
        x.iter_mut().for_each(|v| *v = gelu_erf(*v));
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators let the compiler vectorize without reassociation flags.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Bidirectional attention: every token attends to all tokens of its own
/// sequence (`query_start_loc` gives the sequences' row ranges). `qkv` rows
/// are `stride` wide with q heads, then k heads, then v heads; grouped kv
/// heads are shared as in GQA. Returns [rows, num_heads * head_dim].
pub fn encoder_attention(
    qkv: &[f32],
    stride: usize,
    heads: QkvHeads,
    query_start_loc: &[usize],
    scale: f32,
) -> Vec<f32> {
    let (nh, hd) = (heads.num_heads, heads.head_dim);
    let group = nh / heads.num_kv_heads.max(1);
    let (k_col, v_col) = (heads.q_width(), heads.q_width() + heads.kv_width());
    let rows = qkv.len() / stride.max(1);
    let width = heads.q_width();
    let mut out = vec![0f32; rows * width];
    // Each work item: one sequence and one head, its rows' outputs gathered
    // into a local buffer (the outputs of different heads interleave).
    let items: Vec<(usize, usize)> = (0..query_start_loc.len().saturating_sub(1))
        .flat_map(|s| (0..nh).map(move |h| (s, h)))
        .collect();
    let results: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(s, h)| {
            let (start, end) = (query_start_loc[s], query_start_loc[s + 1]);
            let len = end - start;
            let kvh = h / group;
            // K and V of this head, contiguous, so the inner loops stream.
            let mut k = Vec::with_capacity(len * hd);
            let mut v = Vec::with_capacity(len * hd);
            for r in start..end {
                let row = &qkv[r * stride..(r + 1) * stride];
                k.extend_from_slice(&row[k_col + kvh * hd..k_col + (kvh + 1) * hd]);
                v.extend_from_slice(&row[v_col + kvh * hd..v_col + (kvh + 1) * hd]);
            }
            let mut res = vec![0f32; len * hd];
            let mut scores = vec![0f32; len];
            for (i, o) in res.chunks_exact_mut(hd).enumerate() {
                let r = start + i;
                let q = &qkv[r * stride + h * hd..r * stride + (h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = dot(q, &k[j * hd..(j + 1) * hd]) * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = 1.0 / sum;
                for (j, &p) in scores.iter().enumerate() {
                    let w = p * inv;
                    for (o, x) in o.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
                        *o += w * x;
                    }
                }
            }
            res
        })
        .collect();
    for (&(s, h), res) in items.iter().zip(&results) {
        let start = query_start_loc[s];
        for (i, src) in res.chunks_exact(hd).enumerate() {
            let r = start + i;
            out[r * width + h * hd..r * width + (h + 1) * hd].copy_from_slice(src);
        }
    }
    out
}

/// One pooled row per sequence.
pub fn pool(x: &[f32], cols: usize, query_start_loc: &[usize], pooling: PoolingType) -> Vec<f32> {
    let mut out = Vec::with_capacity(query_start_loc.len().saturating_sub(1) * cols);
    for w in query_start_loc.windows(2) {
        out.extend(pooling::pool_rows(
            &x[w[0] * cols..w[1] * cols],
            cols,
            pooling,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_definition() {
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let r = [1.0f32, 0.0, -1.0, 0.0];
        let out = layer_norm(&x, Some(&r), 4, &[1.0; 4], &[0.5; 4], 0.0);
        // x + r = [2, 2, 2, 4]: mean 2.5, variance 0.75.
        let s = 0.75f32.sqrt();
        let want = [
            -0.5 / s + 0.5,
            -0.5 / s + 0.5,
            -0.5 / s + 0.5,
            1.5 / s + 0.5,
        ];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn erf_is_f32_accurate() {
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf_f32(x) as f64 - exact).abs());
        }
        assert!(worst < 1e-6, "max |error| {worst}");
    }

    #[test]
    fn gelu_is_the_erf_form() {
        // torch.nn.functional.gelu(torch.tensor([-1.0, 0.0, 0.5, 2.0])).
        let want = [-0.158_655_26f32, 0.0, 0.345_731_14, 1.954_499_7];
        let mut x = [-1.0f32, 0.0, 0.5, 2.0];
        gelu(&mut x);
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{x:?}");
        }
    }

    /// Attention computed one sequence at a time, straight from the
    /// definition, against the packed kernel.
    #[test]
    fn packed_attention_keeps_sequences_apart() {
        let heads = QkvHeads {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 3,
        };
        let stride = heads.qkv_width();
        let rows = 5;
        let qkv: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let qsl = [0, 2, 5];
        let out = encoder_attention(&qkv, stride, heads, &qsl, 0.5);
        for w in qsl.windows(2) {
            for i in w[0]..w[1] {
                for h in 0..2 {
                    let q = &qkv[i * stride + h * 3..i * stride + h * 3 + 3];
                    let s: Vec<f32> = (w[0]..w[1])
                        .map(|j| {
                            let k = &qkv[j * stride + 6..j * stride + 9];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * 0.5
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for d in 0..3 {
                        let want: f32 = (w[0]..w[1])
                            .zip(&e)
                            .map(|(j, p)| p / z * qkv[j * stride + 9 + d])
                            .sum();
                        let got = out[i * 6 + h * 3 + d];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {i} head {h}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pools_per_sequence() {
        let x = [1.0, 1.0, 3.0, 3.0, 5.0, 7.0];
        assert_eq!(
            pool(&x, 2, &[0, 2, 3], PoolingType::Mean),
            vec![2.0, 2.0, 5.0, 7.0]
        );
        assert_eq!(
            pool(&x, 2, &[0, 2, 3], PoolingType::Cls),
            vec![1.0, 1.0, 5.0, 7.0]
        );
    }
}
