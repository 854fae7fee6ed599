//! The worker's one error type: every failure of loading, configuration or a
//! step is an `Err` with the facts needed to act on it, never a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid model config: {msg}")]
    Config { msg: String },
    #[error("unsupported {what}: {value} (supported: {supported})")]
    Unsupported {
        what: &'static str,
        value: String,
        supported: String,
    },
    #[error("not implemented yet: {feature}")]
    NotImplemented { feature: String },
    #[error("weight {name}: {msg}")]
    Weight { name: String, msg: String },
    #[error("weight {name} has shape {got:?}, expected {expected:?}")]
    WeightShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor parallel: cannot split {what} of size {size} into {parts} parts{detail}")]
    Shard {
        what: String,
        size: usize,
        parts: usize,
        detail: String,
    },
    #[error("unknown request id {req_id}")]
    UnknownRequest { req_id: String },
    #[error("request {req_id} is already in the batch")]
    DuplicateRequest { req_id: String },
    #[error("request {req_id}: scheduler says {expected} computed tokens, worker has {actual}")]
    ComputedTokensMismatch {
        req_id: String,
        expected: usize,
        actual: usize,
    },
    #[error("request {req_id}: {msg}")]
    BadStep { req_id: String, msg: String },
    #[error("block id {block_id} out of range (the KV cache has {num_blocks} blocks)")]
    BlockOutOfRange { block_id: u32, num_blocks: usize },
    #[error("the KV cache is not initialized: call initialize_kv_cache first")]
    KvCacheNotInitialized,
    #[error("position {position} is beyond the model's maximum length {max_len}")]
    PositionOutOfRange { position: usize, max_len: usize },
    #[error("token id {token_id} is out of the vocabulary (size {vocab_size})")]
    TokenOutOfRange { token_id: u32, vocab_size: usize },
    /// A collective between tensor-parallel ranks failed: a peer is gone or
    /// timed out. The group cannot be used again.
    #[error("collective {op} failed{peer}: {msg}")]
    Collective {
        op: &'static str,
        /// ", peer rank N" when one peer is at fault.
        peer: String,
        msg: String,
    },
    #[error("cannot decode the {what} received from the wire: {msg}")]
    Wire { what: &'static str, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A CUDA driver, NVRTC, cuBLAS or NCCL call failed.
    #[error("CUDA {op} failed: {msg}")]
    Cuda { op: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    #[allow(dead_code)] // used by the CUDA backend
    pub(crate) fn cuda(op: &str, e: impl std::fmt::Debug) -> Self {
        Error::Cuda {
            op: op.to_string(),
            msg: format!("{e:?}"),
        }
    }

    /// True when the process cannot go on serving steps (its group is
    /// broken); false when only the step's requests are at fault.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Collective { .. })
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config { msg: msg.into() }
    }

    pub(crate) fn weight(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Weight {
            name: name.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn bad_step(req_id: &str, msg: impl Into<String>) -> Self {
        Error::BadStep {
            req_id: req_id.to_string(),
            msg: msg.into(),
        }
    }
}
