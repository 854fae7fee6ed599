//! CPU backend: quantized matmuls through our exact dequantizing kernel
//! (`quant_matmul`: the dequantized weights times f32 activations), or, with
//! `int8_activations`, through our Q8_0 kernel / candle's GGML kernels
//! (llama.cpp's numerics); dense f32 ones through candle's gemm, bf16/f16
//! ones through our dense kernel, and the rest as rayon loops over f32 rows.
//!
//! `--dtype bfloat16|float16`: weights, embeddings and the KV cache are
//! stored in that type, and every op rounds its output to it, so activations
//! carry exactly the values a bf16/f16 tensor would; arithmetic inside an op
//! is f32 (as vLLM's CPU kernels accumulate in f32).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Tensor};
use rayon::prelude::*;

use half::{bf16, f16};

use super::cpu_attention::paged_attention_cpu;
use super::cpu_encoder;
use super::cpu_kv::{with_planes, CpuKvCache};
use super::elem::{self, Elem};
use super::half_matmul::{self, DenseMatrix};
use super::q8_matmul::{self, Q8Matrix};
use super::quant_matmul::{self, QuantMatrix};
use super::{Backend, ComputeDtype, RowTop, StepInputs};
use crate::attention::{AttentionMetadata, QkvHeads};
use crate::collective::HostGroup;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;
use crate::loader::shard::qtensor_from_bytes;
use crate::loader::{HostLinear, HostMatrix};
use crate::pooling::PoolingType;
use crate::rope::RopeTable;

/// Below this many rows, elementwise ops stay on one thread.
const PAR_ROWS: usize = 4;

#[derive(Clone)]
pub struct CpuBackend {
    dtype: ComputeDtype,
    /// The tensor-parallel group; `None` for a group of one.
    group: Option<Arc<dyn HostGroup>>,
    /// Quantized matmuls quantize activations to int8 and run sub-8-bit
    /// weights as Q8_0 (llama.cpp's numerics) instead of the exact kernel.
    int8_activations: bool,
}

impl CpuBackend {
    pub fn new(dtype: ComputeDtype) -> Self {
        Self {
            dtype,
            group: None,
            int8_activations: false,
        }
    }

    /// A backend whose collectives run over `group`.
    pub fn with_group(dtype: ComputeDtype, group: Arc<dyn HostGroup>) -> Self {
        let group = (group.size() > 1).then_some(group);
        Self {
            dtype,
            group,
            int8_activations: false,
        }
    }

    /// Opts into llama.cpp-equivalent numerics for GGUF weights: activations
    /// quantized to int8 per 32 values, sub-8-bit weights requantized to
    /// Q8_0. Faster, but not the model's own arithmetic (near-ties can flip).
    pub fn with_int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    pub fn dtype(&self) -> ComputeDtype {
        self.dtype
    }

    /// Rounds an op's output to the dtype's values.
    fn round(&self, v: &mut [f32]) {
        match self.dtype {
            ComputeDtype::F32 => {}
            ComputeDtype::Bf16 => elem::round_slice::<bf16>(v),
            ComputeDtype::F16 => elem::round_slice::<f16>(v),
        }
    }

    fn rounded(&self, mut t: CpuTensor) -> CpuTensor {
        self.round(t.data_mut());
        t
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
    /// GGML blocks times f32 activations, exactly (the default).
    Exact(QuantMatrix),
    /// Q8_0 run by our int8-activation AVX2 kernel (opt-in).
    Q8(Q8Matrix),
    /// candle's GGML kernels (int8 activations; opt-in, off x86).
    Quantized(Arc<QTensor>),
    /// [out, in] f32.
    Dense(Tensor),
    Bf16(DenseMatrix<bf16>),
    F16(DenseMatrix<f16>),
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
                (
                    a @ (HostMatrix::Dense(_) | HostMatrix::Dummy(_)),
                    b @ (HostMatrix::Dense(_) | HostMatrix::Dummy(_)),
                ) if a.dims().1 == b.dims().1 => Some(HostMatrix::Dense(
                    Tensor::cat(&[a.to_dense()?, b.to_dense()?], 0)?.contiguous()?,
                )),
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

/// With int8 activations on x86, every sub-8-bit GGML type is requantized to
/// Q8_0 at load, for two
/// reasons: candle's kernels for Q4_1/Q5_x are scalar there (~20x slower),
/// and its K-quant kernels do one dot per (row, output), so a batch would
/// need a different (dequantize + GEMM) path whose rounding depends on the
/// batch size. Our Q8_0 kernel is fast at every batch size and gives each
/// row the same bits whatever else is in the batch. 8-bit steps are several
/// times finer than the 4/5/6-bit ones, so the values barely move.
fn to_fast_type(p: HostLinear) -> Result<HostLinear> {
    use candle_core::quantized::GgmlDType as G;
    let HostMatrix::Quantized(q) = &p.weight else {
        return Ok(p);
    };
    let repack = matches!(
        q.dtype(),
        G::Q4_0 | G::Q4_1 | G::Q5_0 | G::Q5_1 | G::Q2K | G::Q3K | G::Q4K | G::Q5K | G::Q6K
    );
    if !cfg!(target_arch = "x86_64") || !repack || q.shape().dims()[1] % 32 != 0 {
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
        Matrix::Exact(w) => quant_matmul::matmul(x.data(), x.rows, w),
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
        Matrix::Bf16(w) => half_matmul::matmul(x.data(), x.rows, w),
        Matrix::F16(w) => half_matmul::matmul(x.data(), x.rows, w),
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

enum Table {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

fn copy_row<E: Elem>(dst: &mut [f32], src: &[E]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// One step's inputs, kept on the host for every layer.
pub struct CpuStep {
    input_ids: Vec<u32>,
    meta: AttentionMetadata,
    logits_rows: Vec<usize>,
}

pub struct CpuEmbedding {
    /// [rows, hidden] in the compute dtype.
    table: Table,
    rows: usize,
    hidden: usize,
    vocab_start: usize,
}

impl CpuBackend {
    /// A GGUF tensor for the exact path: GGML blocks stay as they are, and
    /// float tensors (f16/bf16/f32 in the file) become dense weights.
    fn exact(&self, q: Arc<QTensor>) -> Result<Matrix> {
        let (n, k) = q.shape().dims2()?;
        if let Some(m) = QuantMatrix::new(&q.data()?, q.dtype(), n, k) {
            return Ok(Matrix::Exact(m));
        }
        if q.dtype() == GgmlDType::F16 && self.dtype != ComputeDtype::Bf16 {
            // Kept as f16: the same values, half the memory of f32.
            let v: Vec<f16> = bytemuck::pod_collect_to_vec(&q.data()?);
            return Ok(Matrix::F16(DenseMatrix::new(v, n, k)));
        }
        self.dense(q.dequantize(&Device::Cpu)?)
    }

    /// A dense weight in the compute dtype.
    fn dense(&self, t: Tensor) -> Result<Matrix> {
        let (n, k) = t.dims2()?;
        let v = || -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        Ok(match self.dtype {
            ComputeDtype::F32 => Matrix::Dense(t.contiguous()?),
            ComputeDtype::Bf16 => Matrix::Bf16(DenseMatrix::from_f32(&v()?, n, k)),
            ComputeDtype::F16 => Matrix::F16(DenseMatrix::from_f32(&v()?, n, k)),
        })
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type Embedding = CpuEmbedding;
    type KvCache = CpuKvCache;
    type Rope = RopeTable;
    type Step = CpuStep;
    type Graphs = super::NoGraphs;

    fn upload_linear(&self, parts: Vec<HostLinear>) -> Result<CpuLinear> {
        let parts = if self.int8_activations {
            parts
                .into_iter()
                .map(to_fast_type)
                .collect::<Result<Vec<_>>>()?
        } else {
            parts
        };
        let parts: Vec<Part> = fuse(parts)?
            .into_iter()
            .map(|p| {
                let out = p.weight.dims().0;
                let w = match p.weight {
                    HostMatrix::Quantized(q) if !self.int8_activations => self.exact(q)?,
                    HostMatrix::Quantized(q) if q.dtype() == GgmlDType::Q8_0 => {
                        let (n, k) = q.shape().dims2()?;
                        match Q8Matrix::new(q.data()?.into_owned(), n, k) {
                            Some(m) => Matrix::Q8(m),
                            None => Matrix::Quantized(q),
                        }
                    }
                    HostMatrix::Quantized(q) => Matrix::Quantized(q),
                    HostMatrix::Dense(t) => self.dense(t)?,
                    HostMatrix::Dummy(d) => self.dense(d.materialize()?)?,
                };
                let mut bias = p.bias;
                if let Some(b) = &mut bias {
                    self.round(b);
                }
                Ok(Part { w, bias, out })
            })
            .collect::<Result<_>>()?;
        let out = parts.iter().map(|p| p.out).sum();
        Ok(CpuLinear { parts, out })
    }

    fn upload_vector(&self, mut v: Vec<f32>) -> Result<Vec<f32>> {
        self.round(&mut v);
        Ok(v)
    }

    fn upload_embedding(&self, table: &HostMatrix, vocab_start: usize) -> Result<CpuEmbedding> {
        let t = table.to_dense()?;
        let (rows, hidden) = t.dims2()?;
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let table = match self.dtype {
            ComputeDtype::F32 => Table::F32(v),
            ComputeDtype::Bf16 => Table::Bf16(elem::convert(&v)),
            ComputeDtype::F16 => Table::F16(elem::convert(&v)),
        };
        Ok(CpuEmbedding {
            table,
            rows,
            hidden,
            vocab_start,
        })
    }

    fn upload_rope(&self, table: RopeTable) -> Result<RopeTable> {
        Ok(table)
    }

    fn prepare_step(&self, inputs: StepInputs<'_>, rope: &RopeTable) -> Result<CpuStep> {
        check_positions(&inputs.meta.positions, rope.max_positions)?;
        Ok(CpuStep {
            input_ids: inputs.input_ids.to_vec(),
            meta: inputs.meta.clone(),
            logits_rows: inputs.logits_rows.to_vec(),
        })
    }

    fn kv_dtype_bytes(&self) -> usize {
        self.dtype.bytes()
    }

    fn alloc_kv_cache(&self, spec: KvCacheSpec, num_blocks: usize) -> Result<CpuKvCache> {
        CpuKvCache::new(spec, num_blocks, self.dtype)
    }

    fn embed(&self, e: &CpuEmbedding, step: &CpuStep) -> Result<CpuTensor> {
        let ids = &step.input_ids;
        let h = e.hidden;
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            let local = (id as usize).wrapping_sub(e.vocab_start);
            if local < e.rows {
                let r = local * h..(local + 1) * h;
                match &e.table {
                    Table::F32(t) => row.copy_from_slice(&t[r]),
                    Table::Bf16(t) => copy_row(row, &t[r]),
                    Table::F16(t) => copy_row(row, &t[r]),
                }
            }
        }
        Ok(CpuTensor::new(out, ids.len(), h))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> Result<CpuTensor> {
        if let [p] = w.parts.as_slice() {
            return Ok(self.rounded(CpuTensor::new(matmul_part(x, p)?, x.rows, w.out)));
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
        Ok(self.rounded(CpuTensor::new(out, x.rows, w.out)))
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
        Ok(self.rounded(CpuTensor::new(out, x.rows, x.cols)))
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
        self.round(residual.data_mut());
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
        Ok(self.rounded(CpuTensor::new(out, gate_up.rows, n)))
    }

    fn rotary(
        &self,
        qkv: &mut CpuTensor,
        heads: QkvHeads,
        step: &CpuStep,
        rope: &RopeTable,
    ) -> Result<()> {
        let positions = &step.meta.positions;
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
        self.round(qkv.data_mut());
        Ok(())
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        qkv: &CpuTensor,
        heads: QkvHeads,
        step: &CpuStep,
    ) -> Result<()> {
        let k_col = heads.q_width();
        cache.write(
            layer,
            qkv.data(),
            qkv.cols,
            k_col,
            k_col + heads.kv_width(),
            &step.meta.slot_mapping,
        )
    }

    fn attention(
        &self,
        cache: &CpuKvCache,
        layer: usize,
        qkv: &CpuTensor,
        heads: QkvHeads,
        step: &CpuStep,
        scale: f32,
    ) -> Result<CpuTensor> {
        let meta = &step.meta;
        let mut out = vec![0f32; qkv.rows * heads.q_width()];
        let (q, stride, spec) = (qkv.data(), qkv.cols, &cache.spec);
        with_planes!(&cache.storage, p => paged_attention_cpu(
            q, stride, heads, &p.k[layer], &p.v[layer], spec, meta, scale, &mut out,
        ));
        Ok(self.rounded(CpuTensor::new(out, qkv.rows, heads.q_width())))
    }

    fn gather_logits_rows(&self, x: &CpuTensor, step: &CpuStep) -> Result<CpuTensor> {
        let rows = &step.logits_rows;
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            out.extend_from_slice(&x.data()[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor::new(out, rows.len(), x.cols))
    }

    fn group_size(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.size())
    }

    fn all_reduce(&self, x: &mut CpuTensor) -> Result<()> {
        match &self.group {
            None => Ok(()),
            Some(g) => g.all_reduce_sum(x.data_mut()),
        }
    }

    fn all_gather_cols(&self, x: CpuTensor) -> Result<CpuTensor> {
        let Some(g) = &self.group else {
            return Ok(x);
        };
        let parts = g.all_gather(x.data())?;
        let rows = x.rows;
        let mut widths = Vec::with_capacity(parts.len());
        for (rank, p) in parts.iter().enumerate() {
            if rows == 0 || p.len() % rows != 0 {
                return Err(Error::config(format!(
                    "all-gather: rank {rank} sent {} values for {rows} rows",
                    p.len()
                )));
            }
            widths.push(p.len() / rows);
        }
        let cols: usize = widths.iter().sum();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for (p, w) in parts.iter().zip(&widths) {
                out.extend_from_slice(&p[r * w..(r + 1) * w]);
            }
        }
        Ok(CpuTensor::new(out, rows, cols))
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data().to_vec())
    }

    fn upload_activation(&self, v: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        if v.len() != rows * cols {
            return Err(Error::config(format!(
                "{} values for a [{rows}, {cols}] tensor",
                v.len()
            )));
        }
        // Values from another stage of the same dtype are already rounded.
        let mut t = CpuTensor::new(v.to_vec(), rows, cols);
        self.round(t.data_mut());
        Ok(t)
    }

    fn top_logits(&self, logits: &CpuTensor, k: usize) -> Result<Vec<RowTop>> {
        Ok(logits
            .data()
            .chunks_exact(logits.cols.max(1))
            .map(|row| crate::sampler::row_top(row, k))
            .collect())
    }

    fn prepare_encoder_step(
        &self,
        inputs: StepInputs<'_>,
        max_positions: usize,
    ) -> Result<CpuStep> {
        check_positions(&inputs.meta.positions, max_positions)?;
        Ok(CpuStep {
            input_ids: inputs.input_ids.to_vec(),
            meta: inputs.meta.clone(),
            logits_rows: inputs.logits_rows.to_vec(),
        })
    }

    fn add_position_embeddings(
        &self,
        x: &mut CpuTensor,
        table: &CpuEmbedding,
        step: &CpuStep,
    ) -> Result<()> {
        let h = table.hidden;
        if x.cols != h {
            return Err(Error::config(format!(
                "position embeddings of width {h} for activations of width {}",
                x.cols
            )));
        }
        check_positions(&step.meta.positions, table.rows)?;
        let mut row = vec![0f32; h];
        for (dst, &p) in x.data_mut().chunks_exact_mut(h).zip(&step.meta.positions) {
            let r = p as usize * h..(p as usize + 1) * h;
            match &table.table {
                Table::F32(t) => row.copy_from_slice(&t[r]),
                Table::Bf16(t) => copy_row(&mut row, &t[r]),
                Table::F16(t) => copy_row(&mut row, &t[r]),
            }
            for (d, v) in dst.iter_mut().zip(&row) {
                *d += v;
            }
        }
        self.round(x.data_mut());
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        eps: f32,
    ) -> Result<CpuTensor> {
        if let Some(r) = residual {
            if (r.rows, r.cols) != (x.rows, x.cols) {
                return Err(Error::config(format!(
                    "layer_norm: residual [{}, {}] for input [{}, {}]",
                    r.rows, r.cols, x.rows, x.cols
                )));
            }
        }
        let out = cpu_encoder::layer_norm(x.data(), residual.map(|r| r.data()), x.cols, w, b, eps);
        Ok(self.rounded(CpuTensor::new(out, x.rows, x.cols)))
    }

    fn gelu(&self, x: &mut CpuTensor) -> Result<()> {
        cpu_encoder::gelu(x.data_mut());
        self.round(x.data_mut());
        Ok(())
    }

    fn encoder_attention(
        &self,
        qkv: &CpuTensor,
        heads: QkvHeads,
        step: &CpuStep,
        scale: f32,
    ) -> Result<CpuTensor> {
        let qsl = &step.meta.query_start_loc;
        if qkv.cols != heads.qkv_width() || qsl.last().copied().unwrap_or(0) != qkv.rows {
            return Err(Error::config(format!(
                "encoder attention: qkv [{}, {}] does not match the step ({} rows, width {})",
                qkv.rows,
                qkv.cols,
                qsl.last().copied().unwrap_or(0),
                heads.qkv_width()
            )));
        }
        let out = cpu_encoder::encoder_attention(qkv.data(), qkv.cols, heads, qsl, scale);
        Ok(self.rounded(CpuTensor::new(out, qkv.rows, heads.q_width())))
    }

    fn pool(&self, x: &CpuTensor, step: &CpuStep, pooling: PoolingType) -> Result<CpuTensor> {
        let qsl = &step.meta.query_start_loc;
        let out = cpu_encoder::pool(x.data(), x.cols, qsl, pooling);
        Ok(self.rounded(CpuTensor::new(out, qsl.len().saturating_sub(1), x.cols)))
    }
}

/// Positions past the rotary table (the model's maximum length) are an
/// error of the step, not a panic in a kernel.
pub(crate) fn check_positions(positions: &[u32], max_positions: usize) -> Result<()> {
    match positions.iter().find(|&&p| p as usize >= max_positions) {
        Some(&p) => Err(Error::PositionOutOfRange {
            position: p as usize,
            max_len: max_positions,
        }),
        None => Ok(()),
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
        let b = CpuBackend::new(ComputeDtype::F32);
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

    /// Dummy weights arrive lazy: they fuse with their neighbours (dense
    /// or lazy) and compute exactly what their dense values do.
    #[test]
    fn dummy_parts_run_as_their_dense_values() {
        use crate::loader::DummyMatrix;
        let b = CpuBackend::new(ComputeDtype::Bf16);
        let d = |base, rows: usize| {
            HostMatrix::Dummy(
                DummyMatrix::new("w", base, (rows + 2, 64), 1..rows + 1, 0..64).unwrap(),
            )
        };
        let lazy = vec![
            HostLinear {
                weight: d(1, 3),
                bias: Some(vec![0.5; 3]),
            },
            HostLinear {
                weight: d(2, 5),
                bias: None,
            },
            HostLinear {
                weight: HostMatrix::Dense(d(3, 4).to_dense().unwrap()),
                bias: None,
            },
        ];
        let dense: Vec<HostLinear> = lazy
            .iter()
            .map(|p| HostLinear {
                weight: HostMatrix::Dense(p.weight.to_dense().unwrap()),
                bias: p.bias.clone(),
            })
            .collect();
        let x = CpuTensor::new((0..128).map(|i| (i as f32 * 0.3).sin()).collect(), 2, 64);
        let fused = b.upload_linear(lazy.clone()).unwrap();
        assert_eq!(fused.parts.len(), 1);
        let y = b.linear(&x, &fused).unwrap();
        let want = b
            .linear(&x, &b.upload_linear(dense.clone()).unwrap())
            .unwrap();
        assert_eq!(y.data(), want.data());
        // Alone, a lazy part is made by the backend too.
        let one = b.upload_linear(vec![lazy[1].clone()]).unwrap();
        let want = b.upload_linear(vec![dense[1].clone()]).unwrap();
        assert_eq!(
            b.linear(&x, &one).unwrap().data(),
            b.linear(&x, &want).unwrap().data()
        );
    }

    #[test]
    fn dtype_resolution() {
        let r = |a, c| ComputeDtype::resolve(a, c).unwrap();
        assert_eq!(r("auto", Some("bfloat16")), ComputeDtype::Bf16);
        assert_eq!(r("auto", Some("torch.float16")), ComputeDtype::F16);
        assert_eq!(r("auto", Some("float32")), ComputeDtype::F32);
        assert_eq!(r("auto", None), ComputeDtype::F32);
        assert_eq!(r("float32", Some("bfloat16")), ComputeDtype::F32);
        assert_eq!(r("half", None), ComputeDtype::F16);
        let e = ComputeDtype::resolve("int3", None).unwrap_err().to_string();
        assert!(e.contains("bfloat16"), "{e}");
    }

    #[test]
    fn bf16_ops_round_to_bf16_values() {
        let b = CpuBackend::new(ComputeDtype::Bf16);
        let w = Tensor::from_vec(
            (0..64 * 3)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<f32>>(),
            (3, 64),
            &Device::Cpu,
        )
        .unwrap();
        let lin = b
            .upload_linear(vec![HostLinear {
                weight: HostMatrix::Dense(w.clone()),
                bias: Some(vec![0.1, 0.2, 0.3]),
            }])
            .unwrap();
        assert!(matches!(lin.parts[0].w, Matrix::Bf16(_)));
        let x = CpuTensor::new((0..128).map(|i| (i as f32 * 0.11).cos()).collect(), 2, 64);
        let y = b.linear(&x, &lin).unwrap();
        let f = CpuBackend::new(ComputeDtype::F32);
        let yf = f
            .linear(
                &x,
                &f.upload_linear(vec![HostLinear {
                    weight: HostMatrix::Dense(w),
                    bias: Some(vec![0.1, 0.2, 0.3]),
                }])
                .unwrap(),
            )
            .unwrap();
        for (a, e) in y.data().iter().zip(yf.data()) {
            assert_eq!(*a, bf16::from_f32(*a).to_f32(), "{a} is not a bf16 value");
            assert!((a - e).abs() <= 0.02 * (1.0 + e.abs()), "{a} vs {e}");
        }
        let n = b.rms_norm(&x, &vec![1.0; 64], 1e-5).unwrap();
        assert!(n.data().iter().all(|v| *v == bf16::from_f32(*v).to_f32()));
        assert_eq!(b.kv_dtype_bytes(), 2);
        assert_eq!(f.kv_dtype_bytes(), 4);
    }
}
