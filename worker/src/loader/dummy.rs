//! `--load-format dummy`: random weights at the config's (sharded) shapes, for
//! benchmarks without a checkpoint. Each tensor's values depend only on the
//! seed, its name and the element's index in the full tensor, so shards and
//! load order do not change them: a tensor-parallel rank holds exactly the
//! slice of what a single rank would hold.
//!
//! Matrices leave the source as a `DummyMatrix` (what the values are made
//! from, not the values), so each backend makes them where they will live:
//! the CPU backend on the host, the CUDA backend in device memory
//! (`dummy_fill` in kernels.cu computes the same function), which spares an
//! 8B model a minute of host work and its copy over PCIe.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{HostMatrix, WeightSource};
use crate::error::{Error, Result};
use crate::parallel::Shard;

pub struct DummySource {
    seed: u64,
}

impl DummySource {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    fn base(&self, name: &str) -> u64 {
        let mut h = DefaultHasher::new();
        (self.seed, name).hash(&mut h);
        h.finish()
    }
}

/// Element `index` of the tensor whose stream starts at `base`: counter-based
/// (splitmix64), so any slice is computed without the elements before it.
/// `dummy_fill` in kernels.cu is the device copy of this function and must
/// stay bit-identical to it.
fn value(base: u64, index: u64) -> f32 {
    let mut z = base.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
    // Small values keep activations finite through many layers.
    (unit - 0.5) * 0.04
}

/// A block of a dummy weight matrix, not yet made: element (r, c) of the
/// block is `value(base, (rows.start + r) * full_cols + cols.start + c)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DummyMatrix {
    base: u64,
    full_cols: usize,
    rows: Range<usize>,
    cols: Range<usize>,
}

impl DummyMatrix {
    /// The block `rows` x `cols` of the `full` [out, in] tensor whose values
    /// start at `base`.
    pub fn new(
        name: &str,
        base: u64,
        full: (usize, usize),
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Self> {
        for (what, r, size) in [("rows", &rows, full.0), ("columns", &cols, full.1)] {
            if r.start > r.end || r.end > size {
                return Err(Error::weight(
                    name,
                    format!("dummy {what} {r:?} outside 0..{size}"),
                ));
            }
        }
        // The device kernel indexes in i64.
        if full
            .0
            .checked_mul(full.1)
            .is_none_or(|n| n > i64::MAX as usize)
        {
            return Err(Error::weight(
                name,
                format!("a [{}, {}] dummy tensor is too large", full.0, full.1),
            ));
        }
        Ok(Self {
            base,
            full_cols: full.1,
            rows,
            cols,
        })
    }

    /// (rows, cols) of this block.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows.len(), self.cols.len())
    }

    /// Start of the tensor's stream (seed and name hashed).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Columns of the full tensor: the row stride of element indices.
    pub fn full_cols(&self) -> usize {
        self.full_cols
    }

    /// First (row, column) of this block in the full tensor.
    pub fn origin(&self) -> (usize, usize) {
        (self.rows.start, self.cols.start)
    }

    /// The sub-block `shard` selects, its ranges relative to this block.
    pub fn shard(&self, name: &str, shard: &Shard) -> Result<Self> {
        let (n, k) = self.dims();
        let sub = |r: &Range<usize>, size: usize, at: usize| {
            if r.end > size || r.is_empty() {
                return Err(Error::weight(
                    name,
                    format!("shard {r:?} outside 0..{size}"),
                ));
            }
            Ok(at + r.start..at + r.end)
        };
        let (rows, cols) = match shard {
            Shard::Full => (self.rows.clone(), self.cols.clone()),
            Shard::Rows(r) => (sub(r, n, self.rows.start)?, self.cols.clone()),
            Shard::Cols(c) => (self.rows.clone(), sub(c, k, self.cols.start)?),
        };
        Ok(Self {
            rows,
            cols,
            ..self.clone()
        })
    }

    /// The values, row-major. Rows are independent, so they are made in
    /// parallel.
    pub fn values(&self) -> Vec<f32> {
        let (n, k) = self.dims();
        let mut v = vec![0f32; n * k];
        if k > 0 {
            v.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
                let first = (self.rows.start + i) * self.full_cols + self.cols.start;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = value(self.base, (first + j) as u64);
                }
            });
        }
        v
    }

    /// The values as an f32 [rows, cols] tensor.
    pub fn materialize(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.values(), self.dims(), &Device::Cpu)?)
    }
}

impl WeightSource for DummySource {
    fn matrix(&mut self, name: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix> {
        let (rows, cols) = match shard {
            Shard::Rows(r) => (r.clone(), 0..full.1),
            Shard::Cols(c) => (0..full.0, c.clone()),
            Shard::Full => (0..full.0, 0..full.1),
        };
        Ok(HostMatrix::Dummy(DummyMatrix::new(
            name,
            self.base(name),
            full,
            rows,
            cols,
        )?))
    }

    fn vector(&mut self, name: &str, len: usize, shard: &Shard) -> Result<Vec<f32>> {
        let range = match shard {
            Shard::Full => 0..len,
            Shard::Rows(r) | Shard::Cols(r) => r.clone(),
        };
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; range.len()]);
        }
        let base = self.base(name);
        Ok(range.map(|i| value(base, i as u64)).collect())
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::shard::shard_matrix;

    /// The values as the source made them before they became lazy: a
    /// dense fill of the shard, element by element.
    fn eager(base: u64, full: (usize, usize), rows: Range<usize>, cols: Range<usize>) -> Vec<f32> {
        let mut v = Vec::new();
        for r in rows {
            for c in cols.clone() {
                v.push(value(base, (r * full.1 + c) as u64));
            }
        }
        v
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn host(m: &HostMatrix) -> Vec<f32> {
        m.to_dense()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The generator is part of the model's identity (a CPU and a GPU
    /// dummy model must be the same model, and `dummy_fill` in kernels.cu
    /// copies it): these bits were computed independently of this code.
    #[test]
    fn values_are_pinned() {
        for (base, index, want) in [
            (0u64, 0u64, 0xbca3_d70au32),
            (0, 1, 0x3c7b_34e1),
            (0x0123_4567_89AB_CDEF, 7, 0x3c11_e230),
            (u64::MAX, 123_456_789_012, 0xbc03_5661),
        ] {
            assert_eq!(
                value(base, index).to_bits(),
                want,
                "value({base:#x}, {index})"
            );
        }
    }

    #[test]
    fn lazy_matrices_materialize_the_eager_values() {
        let mut src = DummySource::new(7);
        let full = (37, 53);
        let name = "model.layers.0.mlp.down_proj.weight";
        let base = src.base(name);
        let cases = [
            (Shard::Full, 0..37, 0..53),
            (Shard::Rows(5..21), 5..21, 0..53),
            (Shard::Cols(13..40), 0..37, 13..40),
            (Shard::Rows(36..37), 36..37, 0..53),
        ];
        for (shard, rows, cols) in cases {
            let m = src.matrix(name, full, &shard).unwrap();
            assert!(
                matches!(m, HostMatrix::Dummy(_)),
                "{shard:?} was made eagerly"
            );
            assert_eq!(m.dims(), (rows.len(), cols.len()), "{shard:?}");
            let want = eager(base, full, rows, cols);
            assert_eq!(bits(&host(&m)), bits(&want), "{shard:?}");
        }
    }

    /// Slicing a lazy matrix (as `shard_matrix` does for every source)
    /// gives the values of slicing the dense one.
    #[test]
    fn sharding_a_lazy_matrix_matches_sharding_the_dense_one() {
        let mut src = DummySource::new(3);
        let name = "model.embed_tokens.weight";
        let lazy = src.matrix(name, (40, 24), &Shard::Rows(8..32)).unwrap();
        let dense = HostMatrix::Dense(lazy.to_dense().unwrap());
        for shard in [Shard::Full, Shard::Rows(3..17), Shard::Cols(5..19)] {
            let a = shard_matrix(name, lazy.clone(), &shard).unwrap();
            let b = shard_matrix(name, dense.clone(), &shard).unwrap();
            assert!(matches!(a, HostMatrix::Dummy(_)));
            assert_eq!(a.dims(), b.dims(), "{shard:?}");
            assert_eq!(bits(&host(&a)), bits(&host(&b)), "{shard:?}");
        }
        let e = shard_matrix(name, lazy, &Shard::Cols(20..30)).unwrap_err();
        assert!(e.to_string().contains("outside 0..24"), "{e}");
    }

    #[test]
    fn shards_outside_the_tensor_are_refused() {
        let mut src = DummySource::new(0);
        let e = src
            .matrix("w", (8, 4), &Shard::Rows(4..9))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rows 4..9 outside 0..8"), "{e}");
        let e = src
            .matrix("w", (8, 4), &Shard::Cols(0..5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("columns 0..5 outside 0..4"), "{e}");
    }

    #[test]
    fn vectors_keep_their_values() {
        let mut src = DummySource::new(11);
        let base = src.base("model.layers.0.self_attn.q_proj.bias");
        let v = src
            .vector(
                "model.layers.0.self_attn.q_proj.bias",
                10,
                &Shard::Rows(4..10),
            )
            .unwrap();
        let want: Vec<f32> = (4..10).map(|i| value(base, i)).collect();
        assert_eq!(bits(&v), bits(&want));
        let norm = src.vector("model.norm.weight", 5, &Shard::Full).unwrap();
        assert_eq!(norm, vec![1.0; 5]);
    }
}
