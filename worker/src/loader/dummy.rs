//! `--load-format dummy`: random weights at the config's (sharded) shapes, for
//! benchmarks without a checkpoint. Each tensor's values depend only on the
//! seed and its name, so shards and load order do not change them.

use std::hash::{DefaultHasher, Hash, Hasher};

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::{HostMatrix, WeightSource};
use crate::error::Result;
use crate::parallel::Shard;

/// Values per independently seeded chunk of a dummy matrix.
const CHUNK: usize = 1 << 20;

pub struct DummySource {
    seed: u64,
}

impl DummySource {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    fn rng(&self, name: &str) -> rand::rngs::StdRng {
        let mut h = DefaultHasher::new();
        (self.seed, name).hash(&mut h);
        rand::rngs::StdRng::seed_from_u64(h.finish())
    }
}

fn shard_len(full: usize, shard: &Shard) -> usize {
    match shard {
        Shard::Full => full,
        Shard::Rows(r) | Shard::Cols(r) => r.len(),
    }
}

impl WeightSource for DummySource {
    fn matrix(&mut self, name: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix> {
        let (rows, cols) = match shard {
            Shard::Rows(r) => (r.len(), full.1),
            Shard::Cols(c) => (full.0, c.len()),
            Shard::Full => full,
        };
        // Small values keep activations finite through many layers. Chunks
        // are seeded by (name, chunk) and filled in parallel: an 8B model's
        // weights take seconds, not minutes, and stay the same for a seed.
        let mut v = vec![0f32; rows * cols];
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
            let mut rng = self.rng(&format!("{name}#{i}"));
            for x in c {
                *x = (rng.random::<f32>() - 0.5) * 0.04;
            }
        });
        Ok(HostMatrix::Dense(Tensor::from_vec(
            v,
            (rows, cols),
            &Device::Cpu,
        )?))
    }

    fn vector(&mut self, name: &str, len: usize, shard: &Shard) -> Result<Vec<f32>> {
        let n = shard_len(len, shard);
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; n]);
        }
        let mut rng = self.rng(name);
        Ok((0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.04).collect())
    }

    fn contains(&self, _name: &str) -> bool {
        true
    }
}
