//! Paged KV cache tensors. Per layer, K and V each have layout
//! [num_blocks, num_kv_heads, block_size, head_dim]: one head's keys within a
//! block are contiguous, which is what the attention inner loop reads.
//! Blocks are allocated by the engine; the worker only writes slots.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    /// KV heads on this rank.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype_bytes: usize,
}

impl KvCacheSpec {
    /// Elements of K (or V) for one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Bytes of one block over all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_elems() * self.dtype_bytes
    }

    /// Offset of `(slot, kv_head)` in one layer's K or V.
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, off) = (slot / self.block_size, slot % self.block_size);
        ((block * self.num_kv_heads + kv_head) * self.block_size + off) * self.head_dim
    }
}

/// Host-memory KV cache (CPU backend).
pub struct CpuKvCache {
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    pub fn new(spec: KvCacheSpec, num_blocks: usize) -> Result<Self> {
        let n = num_blocks
            .checked_mul(spec.block_elems())
            .ok_or_else(|| Error::config(format!("{num_blocks} KV blocks overflow memory")))?;
        let layer = || vec![0f32; n];
        Ok(Self {
            spec,
            num_blocks,
            k: (0..spec.num_layers).map(|_| layer()).collect(),
            v: (0..spec.num_layers).map(|_| layer()).collect(),
        })
    }

    /// Writes token rows of K and V (each `num_kv_heads * head_dim` wide,
    /// starting at `k_col`/`v_col` of rows `stride` apart in `src`) to their slots.
    pub fn write(
        &mut self,
        layer: usize,
        src: &[f32],
        stride: usize,
        k_col: usize,
        v_col: usize,
        slots: &[usize],
    ) -> Result<()> {
        let spec = self.spec;
        let capacity = self.num_blocks * spec.block_size;
        let hd = spec.head_dim;
        let (k, v) = (&mut self.k[layer], &mut self.v[layer]);
        for (t, &slot) in slots.iter().enumerate() {
            if slot >= capacity {
                return Err(Error::BlockOutOfRange {
                    block_id: (slot / spec.block_size) as u32,
                    num_blocks: self.num_blocks,
                });
            }
            let row = &src[t * stride..(t + 1) * stride];
            for h in 0..spec.num_kv_heads {
                let dst = spec.offset(slot, h);
                k[dst..dst + hd].copy_from_slice(&row[k_col + h * hd..k_col + (h + 1) * hd]);
                v[dst..dst + hd].copy_from_slice(&row[v_col + h * hd..v_col + (h + 1) * hd]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_in_their_slots() {
        let spec = KvCacheSpec {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 2,
            block_size: 4,
            dtype_bytes: 4,
        };
        assert_eq!(spec.bytes_per_block(), 2 * 16 * 4);
        let mut c = CpuKvCache::new(spec, 3).unwrap();
        // One token row: q (ignored) | k heads | v heads.
        let row = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        c.write(0, &row, 10, 2, 6, &[9]).unwrap();
        let o = spec.offset(9, 1);
        assert_eq!(&c.k[0][o..o + 2], &[3.0, 4.0]);
        assert_eq!(&c.v[0][o..o + 2], &[7.0, 8.0]);
        assert!(c.write(0, &row, 10, 2, 6, &[12]).is_err());
    }
}
