//! The KV cache block pool: a free queue, per-request block tables and the
//! prefix cache.
//!
//! A full block is identified by a hash chain (the parent block's hash and
//! the block's own token ids), so a block only matches when the whole prefix
//! before it matches too. Freed blocks that carry a hash stay reusable in
//! the free queue until they are evicted, least recently freed first.

use std::collections::{BTreeMap, HashMap};

/// 128-bit so that accidental collisions are out of the question; the
/// stored tokens are compared as well, so a crafted collision only costs a
/// cache miss.
pub type BlockHash = u128;

const FNV128_OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
const FNV128_PRIME: u128 = 0x0000000001000000000000000000013B;

/// FNV-1a over the parent hash and the tokens; stable across runs.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = FNV128_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u128;
            h = h.wrapping_mul(FNV128_PRIME);
        }
    };
    match parent {
        Some(p) => {
            feed(&[1]);
            feed(&p.to_le_bytes());
        }
        None => feed(&[0]),
    }
    for t in tokens {
        feed(&t.to_le_bytes());
    }
    h
}

#[derive(Clone, Debug, Default)]
struct Block {
    ref_cnt: u32,
    hash: Option<BlockHash>,
    /// Position in the free queue while free.
    free_key: Option<i64>,
}

#[derive(Clone, Debug)]
struct CachedBlock {
    block_id: u32,
    parent: Option<BlockHash>,
    tokens: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
struct RequestBlocks {
    blocks: Vec<u32>,
    /// Chain hashes of the leading full blocks already offered to the cache.
    hashes: Vec<BlockHash>,
}

#[derive(Clone, Debug)]
pub struct BlockManager {
    block_size: usize,
    enable_caching: bool,
    blocks: Vec<Block>,
    /// Free blocks ordered for eviction: the smallest key goes first.
    free_queue: BTreeMap<i64, u32>,
    next_back: i64,
    next_front: i64,
    cached: HashMap<BlockHash, CachedBlock>,
    requests: HashMap<String, RequestBlocks>,
    prefix_queries: u64,
    prefix_hits: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_caching: bool) -> Self {
        let mut m = Self {
            block_size,
            enable_caching,
            blocks: vec![Block::default(); num_blocks],
            free_queue: BTreeMap::new(),
            next_back: 0,
            next_front: -1,
            cached: HashMap::new(),
            requests: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        };
        for id in 0..num_blocks as u32 {
            m.push_free_back(id);
        }
        m
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Whether prefix caching is on.
    pub fn caching(&self) -> bool {
        self.enable_caching
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free_queue.len()
    }

    /// Fraction of blocks in use (freed cached blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.num_blocks() as f64
    }

    /// Prompt tokens looked up in the prefix cache and those found, since start.
    pub fn prefix_cache_counters(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    pub fn record_prefix_query(&mut self, num_tokens: usize, num_hit_tokens: usize) {
        if self.enable_caching {
            self.prefix_queries += num_tokens as u64;
            self.prefix_hits += num_hit_tokens as u64;
        }
    }

    pub fn block_ids(&self, request_id: &str) -> &[u32] {
        self.requests.get(request_id).map_or(&[], |r| &r.blocks)
    }

    /// Cached blocks holding a prefix of `tokens`, and how many tokens they
    /// cover. The last token is never served from the cache: the model must
    /// run at least one token to produce logits. Changes nothing.
    pub fn get_computed_blocks(&self, tokens: &[u32]) -> (Vec<u32>, usize) {
        if !self.enable_caching || tokens.is_empty() {
            return (Vec::new(), 0);
        }
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut found = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = hash_block(parent, chunk);
            match self.cached.get(&h) {
                Some(c) if c.parent == parent && c.tokens == chunk => found.push(c.block_id),
                _ => break,
            }
            parent = Some(h);
        }
        let n = found.len() * self.block_size;
        (found, n)
    }

    /// Makes room for `num_tokens` tokens in total for the request, first
    /// taking `new_computed_blocks` (prefix-cache hits from
    /// `get_computed_blocks`, only on the request's first allocation).
    /// Returns the freshly allocated block ids, or `None` (and changes
    /// nothing) when the pool is too small.
    pub fn allocate_slots(
        &mut self,
        request_id: &str,
        num_tokens: usize,
        new_computed_blocks: &[u32],
    ) -> Option<Vec<u32>> {
        let have = self.block_ids(request_id).len() + new_computed_blocks.len();
        let need = num_tokens.div_ceil(self.block_size).saturating_sub(have);
        let computed_now_free = new_computed_blocks
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count();
        if self.num_free_blocks() < need + computed_now_free {
            return None;
        }
        let mut hashes = Vec::with_capacity(new_computed_blocks.len());
        for &b in new_computed_blocks {
            self.touch(b);
            hashes.push(
                self.blocks[b as usize]
                    .hash
                    .expect("a prefix hit has a hash"),
            );
        }
        let fresh: Vec<u32> = (0..need).map(|_| self.pop_free()).collect();
        let entry = self.requests.entry(request_id.to_string()).or_default();
        entry.blocks.extend_from_slice(new_computed_blocks);
        entry.hashes.extend(hashes);
        entry.blocks.extend_from_slice(&fresh);
        Some(fresh)
    }

    /// Offers the request's full blocks whose KV is computed to the prefix
    /// cache. Blocks are cached only once computed so that no request reads a
    /// block that the same step is still writing.
    pub fn cache_blocks(&mut self, request_id: &str, tokens: &[u32], num_computed_tokens: usize) {
        if !self.enable_caching {
            return;
        }
        let Some(req) = self.requests.get_mut(request_id) else {
            return;
        };
        let full = (num_computed_tokens.min(tokens.len()) / self.block_size).min(req.blocks.len());
        for i in req.hashes.len()..full {
            let parent = i.checked_sub(1).map(|p| req.hashes[p]);
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = hash_block(parent, chunk);
            req.hashes.push(h);
            let block_id = req.blocks[i];
            let block = &mut self.blocks[block_id as usize];
            // A block computed twice by two requests is cached once; the copy
            // stays plain and is recycled first when freed.
            if block.hash.is_none() && !self.cached.contains_key(&h) {
                block.hash = Some(h);
                self.cached.insert(
                    h,
                    CachedBlock {
                        block_id,
                        parent,
                        tokens: chunk.to_vec(),
                    },
                );
            }
        }
    }

    /// Returns the request's blocks to the pool. Tail blocks go first in the
    /// eviction order so that shared prefixes survive longest.
    pub fn free(&mut self, request_id: &str) {
        let Some(req) = self.requests.remove(request_id) else {
            return;
        };
        for &b in req.blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            block.ref_cnt -= 1;
            if block.ref_cnt == 0 {
                if block.hash.is_some() {
                    self.push_free_back(b);
                } else {
                    self.push_free_front(b);
                }
            }
        }
    }

    fn touch(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if let Some(key) = block.free_key.take() {
            self.free_queue.remove(&key);
        }
        block.ref_cnt += 1;
    }

    /// Forgets every cached prefix (vLLM's `reset_prefix_cache`), so that
    /// later requests recompute them. Only while no request holds a block:
    /// false, and nothing changed, otherwise.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.blocks.iter().any(|b| b.ref_cnt > 0) {
            return false;
        }
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        true
    }

    fn pop_free(&mut self) -> u32 {
        let (_, b) = self
            .free_queue
            .pop_first()
            .expect("caller checked free count");
        let block = &mut self.blocks[b as usize];
        block.free_key = None;
        block.ref_cnt = 1;
        if let Some(h) = block.hash.take() {
            if self.cached.get(&h).is_some_and(|c| c.block_id == b) {
                self.cached.remove(&h);
            }
        }
        b
    }

    fn push_free_back(&mut self, b: u32) {
        let key = self.next_back;
        self.next_back += 1;
        self.free_queue.insert(key, b);
        self.blocks[b as usize].free_key = Some(key);
    }

    fn push_free_front(&mut self, b: u32) {
        let key = self.next_front;
        self.next_front -= 1;
        self.free_queue.insert(key, b);
        self.blocks[b as usize].free_key = Some(key);
    }

    #[cfg(test)]
    fn ref_cnt(&self, b: u32) -> u32 {
        self.blocks[b as usize].ref_cnt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, start: u32) -> Vec<u32> {
        (start..start + n as u32).collect()
    }

    /// Allocates and computes a whole sequence, as the scheduler would.
    fn run_seq(m: &mut BlockManager, id: &str, tokens: &[u32]) -> usize {
        let (hit, n) = m.get_computed_blocks(tokens);
        m.allocate_slots(id, tokens.len(), &hit).expect("room");
        m.cache_blocks(id, tokens, tokens.len());
        n
    }

    #[test]
    fn allocation_counts_blocks() {
        // (block size, tokens, blocks expected)
        for (bs, n, want) in [(4, 1, 1), (4, 4, 1), (4, 5, 2), (16, 33, 3), (8, 0, 0)] {
            let mut m = BlockManager::new(10, bs, true);
            let fresh = m.allocate_slots("a", n, &[]).unwrap();
            assert_eq!(fresh.len(), want, "bs={bs} n={n}");
            assert_eq!(m.num_free_blocks(), 10 - want);
            m.free("a");
            assert_eq!(m.num_free_blocks(), 10);
        }
    }

    #[test]
    fn growing_a_request_adds_only_missing_blocks() {
        let mut m = BlockManager::new(4, 4, true);
        assert_eq!(m.allocate_slots("a", 3, &[]).unwrap().len(), 1);
        assert_eq!(m.allocate_slots("a", 4, &[]).unwrap().len(), 0);
        assert_eq!(m.allocate_slots("a", 9, &[]).unwrap().len(), 2);
        assert_eq!(m.block_ids("a").len(), 3);
        // Not enough: nothing changes.
        assert!(m.allocate_slots("a", 100, &[]).is_none());
        assert_eq!(m.num_free_blocks(), 1);
    }

    #[test]
    fn hashes_chain_through_parents() {
        let a = hash_block(None, &[1, 2]);
        assert_eq!(a, hash_block(None, &[1, 2]));
        assert_ne!(a, hash_block(None, &[2, 1]));
        let b1 = hash_block(Some(a), &[3, 4]);
        let b2 = hash_block(Some(hash_block(None, &[9, 9])), &[3, 4]);
        assert_ne!(b1, b2, "same tokens under another prefix must differ");
        assert_ne!(hash_block(None, &[3, 4]), b1);
    }

    #[test]
    fn prefix_hit_reuses_blocks_and_counts_refs() {
        let mut m = BlockManager::new(10, 4, true);
        let prompt = toks(10, 100);
        assert_eq!(run_seq(&mut m, "a", &prompt), 0);
        let a_blocks = m.block_ids("a").to_vec();

        // Same 10 tokens: 2 full blocks hit (never the block with the last token).
        let (hit, n) = m.get_computed_blocks(&prompt);
        assert_eq!((hit.as_slice(), n), (&a_blocks[..2], 8));
        m.allocate_slots("b", prompt.len(), &hit).unwrap();
        assert_eq!(m.ref_cnt(a_blocks[0]), 2);
        assert_eq!(m.ref_cnt(a_blocks[2]), 1);

        // Exactly 8 tokens: only one block may hit, the last token must run.
        assert_eq!(m.get_computed_blocks(&prompt[..8]).1, 4);
        // A different first block breaks the chain.
        let mut other = prompt.clone();
        other[0] = 7;
        assert_eq!(m.get_computed_blocks(&other).1, 0);

        m.free("a");
        assert_eq!(m.ref_cnt(a_blocks[0]), 1);
        m.free("b");
        assert_eq!(m.num_free_blocks(), 10);
        // Freed cached blocks still hit.
        assert_eq!(m.get_computed_blocks(&prompt).1, 8);

        // Reset: refused while a request holds blocks, then nothing hits.
        m.allocate_slots("c", 4, &[]).unwrap();
        assert!(!m.reset_prefix_cache());
        assert_eq!(
            m.get_computed_blocks(&prompt).1,
            8,
            "a refused reset changes nothing"
        );
        m.free("c");
        assert!(m.reset_prefix_cache());
        assert_eq!(m.get_computed_blocks(&prompt).1, 0);
        assert_eq!(m.num_free_blocks(), 10);
    }

    #[test]
    fn hit_on_a_free_cached_block_takes_it_off_the_free_queue() {
        let mut m = BlockManager::new(3, 4, true);
        let prompt = toks(9, 0);
        run_seq(&mut m, "a", &prompt);
        m.free("a");
        let (hit, _) = m.get_computed_blocks(&prompt);
        assert_eq!(hit.len(), 2);
        // Needs 3 blocks: 2 hits + 1 fresh, exactly the pool.
        let fresh = m.allocate_slots("b", 9, &hit).unwrap();
        assert_eq!(fresh.len(), 1);
        assert_eq!(m.num_free_blocks(), 0);
        assert!(!hit.contains(&fresh[0]));
    }

    #[test]
    fn eviction_is_lru_and_tail_first() {
        let mut m = BlockManager::new(6, 2, true);
        // a and b each take 3 blocks (2 full, 1 partial); a is freed first.
        run_seq(&mut m, "a", &[1, 2, 3, 4, 5]);
        let a = m.block_ids("a").to_vec();
        m.free("a");
        run_seq(&mut m, "b", &[9, 8, 7, 6, 5]);
        let b = m.block_ids("b").to_vec();
        m.free("b");
        assert_eq!(m.num_free_blocks(), 6);
        let order: Vec<u32> = (0..4)
            .map(|i| m.allocate_slots(&format!("n{i}"), 1, &[]).unwrap()[0])
            .collect();
        // Uncached partial blocks go first, then the never-used block, then
        // a's cached blocks (freed earlier), tail before head.
        assert_eq!(order[0], b[2]);
        assert!(!a.contains(&order[1]) && !b.contains(&order[1]));
        assert_eq!(&order[2..], &[a[1], a[0]]);
        // a's prefix is evicted, b's survives.
        assert_eq!(m.get_computed_blocks(&[1, 2, 3, 4, 5]).1, 0);
        assert_eq!(m.get_computed_blocks(&[9, 8, 7, 6, 5]).1, 4);
    }

    #[test]
    fn usage_and_counters() {
        let mut m = BlockManager::new(8, 4, true);
        assert_eq!(m.usage(), 0.0);
        m.allocate_slots("a", 8, &[]).unwrap();
        assert!((m.usage() - 0.25).abs() < 1e-9);
        m.record_prefix_query(10, 4);
        m.record_prefix_query(6, 0);
        assert_eq!(m.prefix_cache_counters(), (16, 4));
        m.free("a");
        assert_eq!(m.usage(), 0.0);
    }

    #[test]
    fn caching_off_never_hits() {
        let mut m = BlockManager::new(8, 4, false);
        let prompt = toks(12, 0);
        run_seq(&mut m, "a", &prompt);
        assert_eq!(m.get_computed_blocks(&prompt).1, 0);
        m.record_prefix_query(12, 0);
        assert_eq!(m.prefix_cache_counters(), (0, 0));
    }

    #[test]
    fn duplicate_computation_is_cached_once() {
        let mut m = BlockManager::new(8, 4, true);
        let prompt = toks(5, 0);
        // Both admitted before either computed: no hits, two copies.
        m.allocate_slots("a", 5, &[]).unwrap();
        m.allocate_slots("b", 5, &[]).unwrap();
        m.cache_blocks("a", &prompt, 5);
        m.cache_blocks("b", &prompt, 5);
        let (hit, _) = m.get_computed_blocks(&prompt);
        assert_eq!(hit, vec![m.block_ids("a")[0]]);
        m.free("a");
        m.free("b");
        assert_eq!(m.num_free_blocks(), 8);
        assert_eq!(m.get_computed_blocks(&prompt).0, hit);
    }
}
