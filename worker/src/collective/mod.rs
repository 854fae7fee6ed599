//! Collectives between the ranks of a tensor-parallel group. The CPU backend
//! runs them through a `HostGroup` (between worker processes); the CUDA
//! backend through NCCL. A backend owns its group, so model code only says
//! "all-reduce this" and a group of one costs nothing.

use crate::error::Result;

/// A tensor-parallel group of processes exchanging host `f32` buffers.
pub trait HostGroup: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum over the group, in place. Every rank must end with
    /// the same bits (the sum is taken in one order), so that ranks never
    /// diverge in what they sample.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `local`, in rank order; lengths may differ between ranks
    /// (the last vocab shard can be short).
    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>>;
}

pub mod pipeline;
pub mod tcp;

pub use pipeline::{StageLink, TcpStageLink};
pub use tcp::TcpGroup;
