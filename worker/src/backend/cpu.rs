//! CPU backend: quantized matmuls through candle's GGML kernels, dense ones
//! through candle's gemm, and the rest as rayon loops over f32 rows.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Tensor};
use rayon::prelude::*;

use super::q8_matmul::{self, Q8Matrix};
use super::{Backend, ComputeDtype};
use crate::attention::{paged_attention_cpu, AttentionMetadata, QkvHeads};
use crate::error::{Error, Result};
use crate::kv_cache::{CpuKvCache, KvCacheSpec};
use crate::loader::shard::qtensor_from_bytes;
use crate::loader::{HostLinear, HostMatrix};
use crate::parallel::ParallelConfig;
use crate::rope::RopeTable;

/// Below this many rows, elementwise ops stay on one thread.
const PAR_ROWS: usize = 4;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// CPU kernels compute in f32; "auto" picks it.
    pub fn new(dtype: &str) -> Result<Self> {
        match ComputeDtype::parse(dtype)? {
            None => {
                tracing::info!("dtype auto: computing in float32 on CPU");
                Ok(Self)
            }
            Some(ComputeDtype::F32) => Ok(Self),
            Some(other) => Err(Error::Unsupported {
                what: "dtype on the CPU backend",
                value: format!("{other:?}").to_lowercase(),
                supported: "auto, float32".into(),
            }),
        }
    }
}

/// An f32 activation [rows, cols]. Held as candle CPU storage so quantized
/// matmuls read it without a copy.
pub struct CpuTensor {
    storage: CpuStorage,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Self {
            storage: CpuStorage::F32(data),
            rows,
            cols,
        }
    }

    pub fn data(&self) -> &[f32] {
        match &self.storage {
            CpuStorage::F32(v) => v,
            _ => unreachable!("CpuTensor is always f32"),
        }
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        match &mut self.storage {
            CpuStorage::F32(v) => v,
            _ => unreachable!("CpuTensor is always f32"),
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            CpuStorage::F32(v) => v,
            _ => unreachable!("CpuTensor is always f32"),
        }
    }
}

enum Matrix {
    /// Q8_0 run by our AVX2 kernel.
    Q8(Q8Matrix),
    Quantized(Arc<QTensor>),
    /// [out, in] f32.
    Dense(Tensor),
}

struct Part {
    w: Matrix,
    bias: Option<Vec<f32>>,
    out: usize,
}

pub struct CpuLinear {
    parts: Vec<Part>,
    out: usize,
}

/// Fuses neighbouring parts that one kernel call can run (same quantized
/// type, or both dense) by stacking their rows.
fn fuse(parts: Vec<HostLinear>) -> Result<Vec<HostLinear>> {
    let mut out: Vec<HostLinear> = Vec::new();
    for p in parts {
        let merged = match (out.last(), &p.weight) {
            (Some(prev), w) => match (&prev.weight, w) {
                (HostMatrix::Quantized(a), HostMatrix::Quantized(b))
                    if a.dtype() == b.dtype() && a.shape().dims()[1] == b.shape().dims()[1] =>
                {
                    let (ra, cols) = a.shape().dims2()?;
                    let rb = b.shape().dims()[0];
                    let mut bytes = a.data()?.into_owned();
                    bytes.extend_from_slice(&b.data()?);
                    Some(HostMatrix::Quantized(qtensor_from_bytes(
                        "fused linear",
                        bytes,
                        a.dtype(),
                        ra + rb,
                        cols,
                    )?))
                }
                (HostMatrix::Dense(a), HostMatrix::Dense(b)) if a.dims()[1] == b.dims()[1] => {
                    Some(HostMatrix::Dense(Tensor::cat(&[a, b], 0)?.contiguous()?))
                }
                _ => None,
            },
            (None, _) => None,
        };
        match merged {
            Some(w) => {
                let prev = out.pop().expect("checked above");
                let bias = match (prev.bias, p.bias) {
                    (None, None) => None,
                    (a, b) => {
                        let mut v = a.unwrap_or_else(|| vec![0.0; prev.weight.dims().0]);
                        v.extend(b.unwrap_or_else(|| vec![0.0; p.weight.dims().0]));
                        Some(v)
                    }
                };
                out.push(HostLinear { weight: w, bias });
            }
            None => out.push(p),
        }
    }
    Ok(out)
}

/// candle has no SIMD x86 kernel for these GGML types (only a scalar
/// fallback, ~20x slower), so on x86 they are requantized to Q8_0 at load:
/// 8-bit steps are far finer than the 4/5-bit ones, so the values barely move.
fn to_fast_type(p: HostLinear) -> Result<HostLinear> {
    use candle_core::quantized::GgmlDType as G;
    let HostMatrix::Quantized(q) = &p.weight else {
        return Ok(p);
    };
    if !cfg!(target_arch = "x86_64") || !matches!(q.dtype(), G::Q4_1 | G::Q5_0 | G::Q5_1) {
        return Ok(p);
    }
    let q8 = QTensor::quantize(&q.dequantize(&Device::Cpu)?, G::Q8_0)?;
    Ok(HostLinear {
        weight: HostMatrix::Quantized(Arc::new(q8)),
        bias: p.bias,
    })
}

/// From this many rows on, a quantized matmul dequantizes the weight and runs
/// a dense GEMM: the GGML kernels do one dot product per (row, output) with
/// no reuse across rows, so a batch costs as much per row as a single token.
const GEMM_MIN_ROWS: usize = 6;

fn dense_matmul(x: &CpuTensor, w: &Tensor) -> Result<Vec<f32>> {
    let xt = Tensor::from_slice(x.data(), (x.rows, x.cols), &Device::Cpu)?;
    Ok(xt.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?)
}

fn matmul_part(x: &CpuTensor, p: &Part) -> Result<Vec<f32>> {
    let mut y = match &p.w {
        Matrix::Q8(w) => q8_matmul::matmul(x.data(), x.rows, w),
        Matrix::Quantized(q) if x.rows >= GEMM_MIN_ROWS => {
            dense_matmul(x, &q.dequantize(&Device::Cpu)?)?
        }
        Matrix::Quantized(q) => {
            let layout = Layout::contiguous((x.rows, x.cols));
            match q.cpu_fwd(&x.storage, &layout)?.0 {
                CpuStorage::F32(v) => v,
                _ => return Err(Error::config("quantized matmul returned a non-f32 result")),
            }
        }
        Matrix::Dense(w) => dense_matmul(x, w)?,
    };
    if let Some(b) = &p.bias {
        for row in y.chunks_exact_mut(p.out) {
            for (o, bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
    Ok(y)
}

pub struct CpuEmbedding {
    /// [rows, hidden] f32.
    table: Vec<f32>,
    rows: usize,
    hidden: usize,
    vocab_start: usize,
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type Embedding = CpuEmbedding;
    type KvCache = CpuKvCache;

    fn upload_linear(&self, parts: Vec<HostLinear>) -> Result<CpuLinear> {
        let parts = parts
            .into_iter()
            .map(to_fast_type)
            .collect::<Result<Vec<_>>>()?;
        let parts: Vec<Part> = fuse(parts)?
            .into_iter()
            .map(|p| {
                let out = p.weight.dims().0;
                let w = match p.weight {
                    HostMatrix::Quantized(q) if q.dtype() == GgmlDType::Q8_0 => {
                        let (n, k) = q.shape().dims2()?;
                        match Q8Matrix::new(q.data()?.into_owned(), n, k) {
                            Some(m) => Matrix::Q8(m),
                            None => Matrix::Quantized(q),
                        }
                    }
                    HostMatrix::Quantized(q) => Matrix::Quantized(q),
                    HostMatrix::Dense(t) => Matrix::Dense(t.contiguous()?),
                };
                Ok(Part {
                    w,
                    bias: p.bias,
                    out,
                })
            })
            .collect::<Result<_>>()?;
        let out = parts.iter().map(|p| p.out).sum();
        Ok(CpuLinear { parts, out })
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn upload_embedding(&self, table: &HostMatrix, vocab_start: usize) -> Result<CpuEmbedding> {
        let t = table.to_dense()?;
        let (rows, hidden) = t.dims2()?;
        Ok(CpuEmbedding {
            table: t.flatten_all()?.to_vec1()?,
            rows,
            hidden,
            vocab_start,
        })
    }

    fn alloc_kv_cache(&self, spec: KvCacheSpec, num_blocks: usize) -> Result<CpuKvCache> {
        CpuKvCache::new(spec, num_blocks)
    }

    fn embed(&self, e: &CpuEmbedding, ids: &[u32]) -> Result<CpuTensor> {
        let h = e.hidden;
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            let local = (id as usize).wrapping_sub(e.vocab_start);
            if local < e.rows {
                row.copy_from_slice(&e.table[local * h..(local + 1) * h]);
            }
        }
        Ok(CpuTensor::new(out, ids.len(), h))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> Result<CpuTensor> {
        if let [p] = w.parts.as_slice() {
            return Ok(CpuTensor::new(matmul_part(x, p)?, x.rows, w.out));
        }
        let mut out = vec![0f32; x.rows * w.out];
        let mut col = 0;
        for p in &w.parts {
            let y = matmul_part(x, p)?;
            for (dst, src) in out.chunks_exact_mut(w.out).zip(y.chunks_exact(p.out)) {
                dst[col..col + p.out].copy_from_slice(src);
            }
            col += p.out;
        }
        Ok(CpuTensor::new(out, x.rows, w.out))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> Result<CpuTensor> {
        let mut out = vec![0f32; x.rows * x.cols];
        let f = |(o, r): (&mut [f32], &[f32])| rms_row(o, r, w, eps);
        if x.rows >= PAR_ROWS {
            out.par_chunks_exact_mut(x.cols)
                .zip(x.data().par_chunks_exact(x.cols))
                .for_each(f);
        } else {
            out.chunks_exact_mut(x.cols)
                .zip(x.data().chunks_exact(x.cols))
                .for_each(f);
        }
        Ok(CpuTensor::new(out, x.rows, x.cols))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &Vec<f32>,
        eps: f32,
    ) -> Result<CpuTensor> {
        for (r, v) in residual.data_mut().iter_mut().zip(x.data()) {
            *r += v;
        }
        self.rms_norm(residual, w, eps)
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        let n = gate_up.cols / 2;
        let mut out = vec![0f32; gate_up.rows * n];
        let f = |(o, r): (&mut [f32], &[f32])| {
            let (g, u) = r.split_at(n);
            for i in 0..n {
                o[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            }
        };
        if gate_up.rows >= PAR_ROWS {
            out.par_chunks_exact_mut(n)
                .zip(gate_up.data().par_chunks_exact(gate_up.cols))
                .for_each(f);
        } else {
            out.chunks_exact_mut(n)
                .zip(gate_up.data().chunks_exact(gate_up.cols))
                .for_each(f);
        }
        Ok(CpuTensor::new(out, gate_up.rows, n))
    }

    fn rotary(
        &self,
        qkv: &mut CpuTensor,
        heads: QkvHeads,
        positions: &[u32],
        rope: &RopeTable,
    ) -> Result<()> {
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= rope.max_positions)
        {
            return Err(Error::PositionOutOfRange {
                position: p as usize,
                max_len: rope.max_positions,
            });
        }
        let hd = heads.head_dim;
        let rotated = heads.num_heads + heads.num_kv_heads;
        let cols = qkv.cols;
        let f = |(row, &pos): (&mut [f32], &u32)| {
            for h in 0..rotated {
                rope.rotate(&mut row[h * hd..(h + 1) * hd], pos as usize);
            }
        };
        if qkv.rows >= PAR_ROWS {
            qkv.data_mut()
                .par_chunks_exact_mut(cols)
                .zip(positions.par_iter())
                .for_each(f);
        } else {
            qkv.data_mut()
                .chunks_exact_mut(cols)
                .zip(positions.iter())
                .for_each(f);
        }
        Ok(())
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        qkv: &CpuTensor,
        heads: QkvHeads,
        meta: &AttentionMetadata,
    ) -> Result<()> {
        let k_col = heads.q_width();
        cache.write(
            layer,
            qkv.data(),
            qkv.cols,
            k_col,
            k_col + heads.kv_width(),
            &meta.slot_mapping,
        )
    }

    fn attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        qkv: &CpuTensor,
        heads: QkvHeads,
        meta: &AttentionMetadata,
        scale: f32,
    ) -> Result<CpuTensor> {
        let mut out = vec![0f32; qkv.rows * heads.q_width()];
        paged_attention_cpu(
            qkv.data(),
            qkv.cols,
            heads,
            &cache.k[layer],
            &cache.v[layer],
            &cache.spec,
            meta,
            scale,
            &mut out,
        );
        Ok(CpuTensor::new(out, qkv.rows, heads.q_width()))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            out.extend_from_slice(&x.data()[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor::new(out, rows.len(), x.cols))
    }

    fn all_reduce(&self, _x: &mut CpuTensor, parallel: &ParallelConfig) -> Result<()> {
        if parallel.tp_size == 1 {
            return Ok(());
        }
        Err(Error::NotImplemented {
            feature: "CPU all-reduce for tensor parallel size > 1".into(),
        })
    }

    fn all_gather_cols(&self, x: CpuTensor, parallel: &ParallelConfig) -> Result<CpuTensor> {
        if parallel.tp_size == 1 {
            return Ok(x);
        }
        Err(Error::NotImplemented {
            feature: "CPU all-gather for tensor parallel size > 1".into(),
        })
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data().to_vec())
    }
}

#[inline]
fn rms_row(o: &mut [f32], r: &[f32], w: &[f32], eps: f32) {
    let ss: f32 = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), wv) in o.iter_mut().zip(r).zip(w) {
        *o = v * inv * wv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_parts_match_separate_ones() {
        let b = CpuBackend;
        let mk = |rows: usize, seed: usize| {
            let v: Vec<f32> = (0..rows * 64)
                .map(|i| (((i + seed) * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap()
        };
        let q = |t: &Tensor| {
            HostMatrix::Quantized(Arc::new(QTensor::quantize(t, GgmlDType::Q8_0).unwrap()))
        };
        let (a, c) = (mk(3, 1), mk(5, 2));
        let x = CpuTensor::new((0..128).map(|i| i as f32 / 100.0).collect(), 2, 64);
        let parts = vec![
            HostLinear {
                weight: q(&a),
                bias: Some(vec![1.0; 3]),
            },
            HostLinear {
                weight: q(&c),
                bias: None,
            },
        ];
        let fused = b.upload_linear(parts.clone()).unwrap();
        assert_eq!(fused.parts.len(), 1);
        let y = b.linear(&x, &fused).unwrap();
        let ya = b
            .linear(&x, &b.upload_linear(vec![parts[0].clone()]).unwrap())
            .unwrap();
        let yc = b
            .linear(&x, &b.upload_linear(vec![parts[1].clone()]).unwrap())
            .unwrap();
        for r in 0..2 {
            assert_eq!(&y.data()[r * 8..r * 8 + 3], &ya.data()[r * 3..r * 3 + 3]);
            assert_eq!(
                &y.data()[r * 8 + 3..r * 8 + 8],
                &yc.data()[r * 5..r * 5 + 5]
            );
        }
        // Mixed kinds stay separate parts with the same side-by-side output.
        let mixed = b
            .upload_linear(vec![
                parts[0].clone(),
                HostLinear {
                    weight: HostMatrix::Dense(c.clone()),
                    bias: None,
                },
            ])
            .unwrap();
        assert_eq!(mixed.parts.len(), 2);
        let ym = b.linear(&x, &mixed).unwrap();
        assert_eq!(&ym.data()[0..3], &ya.data()[0..3]);
    }

    #[test]
    fn bf16_is_a_clear_error_on_cpu() {
        assert!(CpuBackend::new("auto").is_ok());
        let e = CpuBackend::new("bfloat16").err().unwrap().to_string();
        assert!(e.contains("bf16") && e.contains("float32"), "{e}");
        assert!(CpuBackend::new("int3").is_err());
    }
}
