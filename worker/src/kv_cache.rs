//! The paged KV cache's shape, whatever the backend. Per layer, K and V
//! each have layout [num_blocks, num_kv_heads, block_size, head_dim]: one
//! head's keys within a block are contiguous, which is what the attention
//! inner loop reads. Blocks are allocated by the engine; the worker only
//! writes slots. The storage lives with each backend.

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

/// Tokens per KV block the kernels support (vLLM's `--block-size` choices).
pub const BLOCK_SIZES: &[usize] = &[8, 16, 32, 64, 128];
