//! Tensor/pipeline parallel layout of one worker and the shard arithmetic
//! the loader slices weights with.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelConfig {
    pub tp_rank: usize,
    pub tp_size: usize,
    pub pp_rank: usize,
    pub pp_size: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tp_rank: 0,
            tp_size: 1,
            pp_rank: 0,
            pp_size: 1,
        }
    }
}

impl ParallelConfig {
    pub fn validate(&self) -> Result<()> {
        if self.tp_size == 0
            || self.pp_size == 0
            || self.tp_rank >= self.tp_size
            || self.pp_rank >= self.pp_size
        {
            return Err(Error::config(format!("invalid parallel config {self:?}")));
        }
        Ok(())
    }

    /// This rank's part of `size` items split evenly (heads, FFN columns).
    pub fn even_shard(&self, what: &str, size: usize) -> Result<Range<usize>> {
        if !size.is_multiple_of(self.tp_size) {
            return Err(Error::Shard {
                what: what.to_string(),
                size,
                parts: self.tp_size,
                detail: String::new(),
            });
        }
        let per = size / self.tp_size;
        Ok(self.tp_rank * per..(self.tp_rank + 1) * per)
    }

    /// KV heads: split when there are at least `tp_size` of them, otherwise each
    /// head is replicated on `tp_size / n` ranks (as vLLM does).
    pub fn kv_head_shard(&self, num_kv_heads: usize) -> Result<Range<usize>> {
        if num_kv_heads >= self.tp_size {
            return self.even_shard("key/value heads", num_kv_heads);
        }
        if !self.tp_size.is_multiple_of(num_kv_heads) {
            return Err(Error::Shard {
                what: "key/value heads".into(),
                size: num_kv_heads,
                parts: self.tp_size,
                detail: " (tp size must be a multiple of the kv head count to replicate them)"
                    .into(),
            });
        }
        let h = self.tp_rank / (self.tp_size / num_kv_heads);
        Ok(h..h + 1)
    }

    /// Vocab-parallel rows: contiguous ranges of ceil(vocab / tp); the last may be short.
    pub fn vocab_shard(&self, vocab: usize) -> Range<usize> {
        let per = vocab.div_ceil(self.tp_size);
        let start = (self.tp_rank * per).min(vocab);
        start..((self.tp_rank + 1) * per).min(vocab)
    }

    /// Transformer layers this pipeline stage runs: `VLLM_PP_LAYER_PARTITION`
    /// when set, else as even as possible (see `pp_partition`).
    pub fn layer_range(&self, num_layers: usize) -> Result<Range<usize>> {
        if self.pp_size == 1 {
            return Ok(0..num_layers);
        }
        let spec = runtime::envs::raw(runtime::envs::VLLM_PP_LAYER_PARTITION);
        let parts = pp_partition(num_layers, self.pp_size, spec.as_deref())?;
        let start: usize = parts[..self.pp_rank].iter().sum();
        Ok(start..start + parts[self.pp_rank])
    }

    pub fn is_first_stage(&self) -> bool {
        self.pp_rank == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.pp_rank + 1 == self.pp_size
    }
}

/// Layers per pipeline stage, as vLLM splits them: `spec` (the value of
/// `VLLM_PP_LAYER_PARTITION`, e.g. "16,14") with vLLM's checks and messages,
/// else `num_layers / pp_size` each with the remainder added one by one to
/// the stages before the last, from the second-to-last backwards (the last
/// stage also holds the final norm and the LM head).
pub fn pp_partition(num_layers: usize, pp_size: usize, spec: Option<&str>) -> Result<Vec<usize>> {
    let invalid = |detail: String| Error::config(format!("VLLM_PP_LAYER_PARTITION: {detail}"));
    let parts = match spec {
        Some(spec) => {
            let parts = spec
                .split(',')
                .map(|p| p.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| invalid(format!("Invalid partition string: {spec}")))?;
            if parts.len() != pp_size {
                return Err(invalid(format!(
                    "len(partitions)={} does not match pp_size={pp_size}.",
                    parts.len()
                )));
            }
            let sum: usize = parts.iter().sum();
            if sum != num_layers {
                return Err(invalid(format!(
                    "sum(partitions)={sum} does not match num_hidden_layers={num_layers}."
                )));
            }
            if parts.contains(&0) {
                return Err(invalid(format!(
                    "every pipeline stage needs at least one layer, got {spec}"
                )));
            }
            parts
        }
        None => {
            if num_layers < pp_size {
                return Err(Error::config(format!(
                    "pipeline_parallel_size {pp_size} is larger than the model's {num_layers} layers"
                )));
            }
            let mut parts = vec![num_layers / pp_size; pp_size];
            let remaining = num_layers % pp_size;
            for i in 2..remaining + 2 {
                parts[pp_size - i] += 1;
            }
            parts
        }
    };
    Ok(parts)
}

/// Which part of a weight matrix [out, in] a rank keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shard {
    Full,
    /// Column-parallel linear / vocab-parallel embedding: output rows.
    Rows(Range<usize>),
    /// Row-parallel linear: input columns.
    Cols(Range<usize>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(rank: usize, size: usize) -> ParallelConfig {
        ParallelConfig {
            tp_rank: rank,
            tp_size: size,
            ..Default::default()
        }
    }

    #[test]
    fn even_and_kv_shards() {
        assert_eq!(tp(1, 4).even_shard("heads", 8).unwrap(), 2..4);
        assert!(tp(0, 3).even_shard("heads", 8).is_err());
        assert_eq!(tp(3, 4).kv_head_shard(8).unwrap(), 6..8);
        // 2 kv heads over 4 ranks: ranks 0,1 hold head 0; ranks 2,3 hold head 1.
        assert_eq!(tp(1, 4).kv_head_shard(2).unwrap(), 0..1);
        assert_eq!(tp(2, 4).kv_head_shard(2).unwrap(), 1..2);
        assert!(tp(0, 4).kv_head_shard(3).is_err());
    }

    #[test]
    fn vocab_and_layer_shards() {
        assert_eq!(tp(0, 2).vocab_shard(101), 0..51);
        assert_eq!(tp(1, 2).vocab_shard(101), 51..101);
        let pp = ParallelConfig {
            pp_rank: 1,
            pp_size: 2,
            ..Default::default()
        };
        assert_eq!(pp.layer_range(5).unwrap(), 3..5);
        assert!(pp.is_last_stage() && !pp.is_first_stage());
    }

    #[test]
    fn pipeline_partitions_as_vllm() {
        let even = |n, pp| pp_partition(n, pp, None).unwrap();
        assert_eq!(even(20, 4), vec![5, 5, 5, 5]);
        assert_eq!(even(30, 2), vec![15, 15]);
        // The remainder goes to the stages before the last, backwards.
        assert_eq!(even(5, 2), vec![3, 2]);
        assert_eq!(even(22, 4), vec![5, 6, 6, 5]);
        assert_eq!(even(23, 4), vec![6, 6, 6, 5]);
        assert!(pp_partition(2, 3, None).is_err());
        let custom = |spec| pp_partition(20, 4, Some(spec));
        assert_eq!(custom("4,6,6,4").unwrap(), vec![4, 6, 6, 4]);
        assert_eq!(custom(" 5, 5,5,5").unwrap(), vec![5, 5, 5, 5]);
        let err = |spec| custom(spec).unwrap_err().to_string();
        assert!(err("4,six,6,4").contains("Invalid partition string: 4,six,6,4"));
        assert!(err("-1,7,7,7").contains("Invalid partition string"));
        assert!(err("10,10").contains("len(partitions)=2 does not match pp_size=4."));
        assert!(err("5,5,5,6").contains("sum(partitions)=21 does not match num_hidden_layers=20."));
        assert!(err("0,10,5,5").contains("at least one layer"));
    }
}
