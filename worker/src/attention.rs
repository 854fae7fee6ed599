//! What paged attention needs to know about a step, whatever the backend:
//! the flat step batch's metadata (each sequence's new tokens attend
//! causally to themselves and to its cached context, read through its block
//! table) and the head layout. The kernels live with their backends.

/// The flat inputs of one step (ARCHITECTURE.md's step format).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionMetadata {
    /// Per token.
    pub positions: Vec<u32>,
    /// Per token: cache slot (block_id * block_size + offset) its K/V go to.
    pub slot_mapping: Vec<usize>,
    /// Per sequence + 1: where each sequence's tokens start in the batch.
    pub query_start_loc: Vec<usize>,
    /// Per sequence: context length including this step's tokens.
    pub seq_lens: Vec<usize>,
    /// [num_seqs, max_blocks_per_seq], row-major, padded with 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
}

impl AttentionMetadata {
    pub fn num_seqs(&self) -> usize {
        self.seq_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Clears for reuse without freeing capacity.
    pub fn clear(&mut self) {
        self.positions.clear();
        self.slot_mapping.clear();
        self.query_start_loc.clear();
        self.seq_lens.clear();
        self.block_tables.clear();
        self.max_blocks_per_seq = 0;
    }
}

/// Head counts on this rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvHeads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvHeads {
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Row width of the fused q|k|v projection output.
    pub fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}
