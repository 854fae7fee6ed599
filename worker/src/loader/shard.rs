//! Tensor-parallel slicing of weights at load time, dense and quantized.
//! GGML rows are independent runs of blocks, so row slices are byte ranges and
//! column slices are block-aligned byte ranges within each row.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::HostMatrix;
use crate::error::{Error, Result};
use crate::parallel::Shard;

/// Slices a dense [out, in] matrix.
pub fn shard_dense(name: &str, t: &Tensor, shard: &Shard) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    Ok(match shard {
        Shard::Full => t.clone(),
        Shard::Rows(r) => {
            check_range(name, r, rows)?;
            t.narrow(0, r.start, r.len())?.contiguous()?
        }
        Shard::Cols(c) => {
            check_range(name, c, cols)?;
            t.narrow(1, c.start, c.len())?.contiguous()?
        }
    })
}

fn check_range(name: &str, r: &std::ops::Range<usize>, size: usize) -> Result<()> {
    if r.end > size || r.is_empty() {
        return Err(Error::weight(
            name,
            format!("shard {r:?} outside 0..{size}"),
        ));
    }
    Ok(())
}

/// Bytes of one quantized row of `cols` values.
pub fn row_bytes(name: &str, dtype: GgmlDType, cols: usize) -> Result<usize> {
    let bs = dtype.block_size();
    if !cols.is_multiple_of(bs) {
        return Err(Error::weight(
            name,
            format!("{cols} columns are not a multiple of the {dtype:?} block size {bs}"),
        ));
    }
    Ok(cols / bs * dtype.type_size())
}

/// Picks rows (in the given order) out of row-major quantized bytes.
pub fn gather_rows(data: &[u8], row_bytes: usize, rows: impl Iterator<Item = usize>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    out
}

/// Keeps byte range `[start, end)` of every row.
pub fn slice_row_bytes(data: &[u8], row_bytes: usize, start: usize, end: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / row_bytes * (end - start));
    for row in data.chunks_exact(row_bytes) {
        out.extend_from_slice(&row[start..end]);
    }
    out
}

pub fn qtensor_from_bytes(
    name: &str,
    bytes: Vec<u8>,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
) -> Result<Arc<QTensor>> {
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)
        .map_err(|e| Error::weight(name, e.to_string()))?;
    Ok(Arc::new(QTensor::new(storage, (rows, cols))?))
}

/// Slices a quantized [out, in] matrix; column slices must be block aligned.
pub fn shard_quantized(name: &str, q: &Arc<QTensor>, shard: &Shard) -> Result<Arc<QTensor>> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let rb = row_bytes(name, dtype, cols)?;
    match shard {
        Shard::Full => Ok(q.clone()),
        Shard::Rows(r) => {
            check_range(name, r, rows)?;
            let data = q.data()?;
            let bytes = data[r.start * rb..r.end * rb].to_vec();
            qtensor_from_bytes(name, bytes, dtype, r.len(), cols)
        }
        Shard::Cols(c) => {
            check_range(name, c, cols)?;
            let bs = dtype.block_size();
            if c.start % bs != 0 || c.end % bs != 0 {
                return Err(Error::Shard {
                    what: name.to_string(),
                    size: cols,
                    parts: cols / c.len(),
                    detail: format!(
                        " along columns: {c:?} is not aligned to the {dtype:?} block size {bs}"
                    ),
                });
            }
            let data = q.data()?;
            let ts = dtype.type_size();
            let bytes = slice_row_bytes(&data, rb, c.start / bs * ts, c.end / bs * ts);
            qtensor_from_bytes(name, bytes, dtype, rows, c.len())
        }
    }
}

pub fn shard_matrix(name: &str, m: HostMatrix, shard: &Shard) -> Result<HostMatrix> {
    Ok(match m {
        HostMatrix::Dense(t) => HostMatrix::Dense(shard_dense(name, &t, shard)?),
        HostMatrix::Quantized(q) => HostMatrix::Quantized(shard_quantized(name, &q, shard)?),
        HostMatrix::Dummy(d) => HostMatrix::Dummy(d.shard(name, shard)?),
    })
}

pub fn shard_vector(name: &str, v: Vec<f32>, shard: &Shard) -> Result<Vec<f32>> {
    match shard {
        Shard::Full => Ok(v),
        Shard::Rows(r) | Shard::Cols(r) => {
            check_range(name, r, v.len())?;
            Ok(v[r.clone()].to_vec())
        }
    }
}

/// Row order that undoes llama.cpp's Q/K permutation: GGUF row `2i + j` of a
/// head holds HF row `j * head_dim/2 + i` (interleaved vs. rotate-half RoPE).
pub fn unpermute_qk_rows(num_heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(num_heads * head_dim);
    for h in 0..num_heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * head_dim + 2 * i + j);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn dense_rows_and_cols() {
        let t = matrix(4, 6);
        let r = shard_dense("w", &t, &Shard::Rows(2..4)).unwrap();
        assert_eq!(
            r.to_vec2::<f32>().unwrap(),
            t.to_vec2::<f32>().unwrap()[2..4].to_vec()
        );
        let c = shard_dense("w", &t, &Shard::Cols(3..6)).unwrap();
        let full = t.to_vec2::<f32>().unwrap();
        let want: Vec<Vec<f32>> = full.iter().map(|row| row[3..6].to_vec()).collect();
        assert_eq!(c.to_vec2::<f32>().unwrap(), want);
        assert!(shard_dense("w", &t, &Shard::Rows(3..5)).is_err());
    }

    #[test]
    fn quantized_slices_match_dense_slices() {
        let t = matrix(4, 128);
        let q = Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap());
        let deq = q.dequantize(&Device::Cpu).unwrap();
        for shard in [Shard::Rows(1..3), Shard::Cols(32..96), Shard::Cols(64..128)] {
            let qs = shard_quantized("w", &q, &shard)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let ds = shard_dense("w", &deq, &shard).unwrap();
            assert_eq!(qs.dims(), ds.dims());
            assert!(max_diff(&qs, &ds) == 0.0, "{shard:?}");
        }
        let e = shard_quantized("w", &q, &Shard::Cols(0..48))
            .unwrap_err()
            .to_string();
        assert!(e.contains("block size"), "{e}");
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(h, 2, hd/2, ..).swapaxes(1, 2): GGUF row h*hd + 2i + j = HF row h*hd + j*hd/2 + i.
        let (heads, hd) = (2, 8);
        let hf: Vec<usize> = (0..heads * hd).collect();
        let mut gguf = vec![0; heads * hd];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    gguf[h * hd + 2 * i + j] = hf[h * hd + j * hd / 2 + i];
                }
            }
        }
        let back: Vec<usize> = unpermute_qk_rows(heads, hd)
            .into_iter()
            .map(|r| gguf[r])
            .collect();
        assert_eq!(back, hf);
    }
}
