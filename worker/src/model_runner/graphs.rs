//! Which decode steps run as captured graphs, and padded to what shape:
//! vLLM's capture sizes (1, 2, 4, then every 8) and, per step, the smallest
//! captured shape that holds it. Pure logic; the runner captures and
//! replays through the backend.

use crate::backend::GraphShape;

/// vLLM's largest capture size: bigger decode batches run eagerly, where
/// launch overhead no longer matters.
pub const MAX_CAPTURE_SIZE: usize = 512;

/// Context (tokens) the graphs captured at start cover; steps with longer
/// contexts capture graphs of wider block tables when they first come.
pub const START_CONTEXT: usize = 512;

/// The sizes vLLM captures for `max_num_seqs` sequences: 1, 2, 4, then
/// every multiple of 8 up to the first one that holds `max_num_seqs`
/// (at most `MAX_CAPTURE_SIZE`), so every decode batch the scheduler can
/// form has a size.
pub fn capture_sizes(max_num_seqs: usize) -> Vec<usize> {
    let max = max_num_seqs.clamp(1, MAX_CAPTURE_SIZE);
    let mut sizes: Vec<usize> = [1, 2, 4].into_iter().filter(|&s| s <= max).collect();
    if max > 4 {
        sizes.extend((8..=max.next_multiple_of(8).min(MAX_CAPTURE_SIZE)).step_by(8));
    }
    if sizes.last() < Some(&max) {
        sizes.push(max);
    }
    sizes
}

/// Block-table width of a graph for steps whose longest table has
/// `max_blocks` blocks: the next power of two, at least the start width.
pub fn table_width(max_blocks: usize, block_size: usize) -> usize {
    max_blocks
        .next_power_of_two()
        .max(start_table_width(block_size))
}

/// The table width of the graphs captured at start.
pub fn start_table_width(block_size: usize) -> usize {
    START_CONTEXT
        .div_ceil(block_size.max(1))
        .next_power_of_two()
}

/// The captured shapes' policy for one runner: its sizes and the widest
/// table a sequence of `max_model_len` tokens needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphPlan {
    pub sizes: Vec<usize>,
    pub block_size: usize,
    pub max_width: usize,
}

impl GraphPlan {
    pub fn new(max_num_seqs: usize, block_size: usize, max_model_len: usize) -> Self {
        let sizes = capture_sizes(max_num_seqs);
        Self {
            sizes,
            block_size,
            max_width: table_width(max_model_len.div_ceil(block_size.max(1)), block_size),
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// The shapes captured at start, largest first (as vLLM does: the
    /// largest graph's memory is then reused by the smaller ones).
    pub fn start_shapes(&self) -> impl Iterator<Item = GraphShape> + '_ {
        let w = start_table_width(self.block_size).min(self.max_width);
        self.sizes.iter().rev().map(move |&tokens| GraphShape {
            tokens,
            table_width: w,
        })
    }

    /// The shape a decode step of `num_seqs` one-token sequences, the
    /// longest with `max_blocks` blocks, runs as; `None`: it runs eagerly.
    pub fn shape_for(&self, num_seqs: usize, max_blocks: usize) -> Option<GraphShape> {
        let tokens = *self.sizes.iter().find(|&&s| s >= num_seqs)?;
        let table_width = table_width(max_blocks, self.block_size);
        (num_seqs > 0 && table_width <= self.max_width).then_some(GraphShape {
            tokens,
            table_width,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_sizes_are_vllms() {
        assert_eq!(capture_sizes(1), vec![1]);
        assert_eq!(capture_sizes(3), vec![1, 2, 3]);
        assert_eq!(capture_sizes(4), vec![1, 2, 4]);
        assert_eq!(capture_sizes(5), vec![1, 2, 4, 8]);
        let s = capture_sizes(256);
        assert_eq!(&s[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(s.last(), Some(&256));
        assert_eq!(s.len(), 3 + 32);
        assert_eq!(capture_sizes(100).last(), Some(&104));
        assert_eq!(capture_sizes(4096).last(), Some(&MAX_CAPTURE_SIZE));
    }

    #[test]
    fn steps_take_the_smallest_shape_that_holds_them() {
        let p = GraphPlan::new(256, 16, 4096);
        assert_eq!(p.max_width, 256);
        assert_eq!(p.max_tokens(), 256);
        let s = p.shape_for(3, 5).unwrap();
        assert_eq!((s.tokens, s.table_width), (4, 32));
        let s = p.shape_for(9, 33).unwrap();
        assert_eq!((s.tokens, s.table_width), (16, 64));
        assert_eq!(p.shape_for(200, 256).unwrap().table_width, 256);
        // Beyond the largest size, or no sequences: eager.
        assert_eq!(p.shape_for(257, 1), None);
        assert_eq!(p.shape_for(0, 1), None);
        let start: Vec<GraphShape> = p.start_shapes().collect();
        assert_eq!(start.len(), 35);
        assert_eq!(start[0].tokens, 256);
        assert!(start.iter().all(|s| s.table_width == 32));
        // A short model: the start width is its whole table.
        let p = GraphPlan::new(8, 32, 64);
        assert_eq!(p.max_width, 16);
        assert!(p.start_shapes().all(|s| s.table_width == 16));
    }
}
