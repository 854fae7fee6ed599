//! `--load-format dummy`: random weights at the config's (sharded) shapes, for
//! benchmarks without a checkpoint. Each tensor's values depend only on the
//! seed, its name and the element's index in the full tensor, so shards and
//! load order do not change them: a tensor-parallel rank holds exactly the
//! slice of what a single rank would hold.

use std::hash::{DefaultHasher, Hash, Hasher};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{HostMatrix, WeightSource};
use crate::error::Result;
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
fn value(base: u64, index: usize) -> f32 {
    let mut z = base.wrapping_add((index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
    // Small values keep activations finite through many layers.
    (unit - 0.5) * 0.04
}

impl WeightSource for DummySource {
    fn matrix(&mut self, name: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix> {
        let (row_range, col_range) = match shard {
            Shard::Rows(r) => (r.clone(), 0..full.1),
            Shard::Cols(c) => (0..full.0, c.clone()),
            Shard::Full => (0..full.0, 0..full.1),
        };
        // Filled in parallel (rows are independent): an 8B model's weights
        // take seconds, not minutes.
        let base = self.base(name);
        let cols = col_range.len();
        let mut v = vec![0f32; row_range.len() * cols];
        if cols > 0 {
            v.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
                let r = row_range.start + i;
                for (j, x) in row.iter_mut().enumerate() {
                    *x = value(base, r * full.1 + col_range.start + j);
                }
            });
        }
        Ok(HostMatrix::Dense(Tensor::from_vec(
            v,
            (row_range.len(), col_range.len()),
            &Device::Cpu,
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
        Ok(range.map(|i| value(base, i)).collect())
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
