//! The orchestrator's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: String, reason: String },

    #[error("No available node types can fulfill resource request {shape}")]
    Infeasible { shape: String },

    #[error("not enough free resources for {shape} right now")]
    Busy { shape: String },

    #[error("{kind} '{name}' not found")]
    NotFound { kind: &'static str, name: String },

    #[error("{what} already exists: {name}")]
    AlreadyExists { what: &'static str, name: String },

    #[error("timed out after {seconds:.1}s: {what}")]
    Timeout { what: String, seconds: f64 },

    #[error("not implemented yet: {0}")]
    NotImplemented(String),

    #[error("unauthenticated: {0}")]
    Unauthenticated(String),

    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),

    #[error("cannot reach etcd at {endpoints} ({transport}): {reason}")]
    EtcdConnect {
        endpoints: String,
        transport: String,
        reason: String,
    },

    #[error("etcd unreachable since {since} ({seconds:.1} s): {reason}")]
    EtcdUnreachable {
        since: String,
        seconds: f64,
        reason: String,
    },

    #[error("etcd membership: {0}")]
    EtcdMembership(String),

    #[error("the lease keep-alive thread stopped: {0}")]
    KeeperStopped(String),

    #[error("etcd transaction kept conflicting after {attempts} attempts")]
    Contention { attempts: u32 },

    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot reach the head at {address}: {reason}")]
    Connect { address: String, reason: String },

    #[error("{0}")]
    Rpc(String),

    #[error(transparent)]
    ConfigFile(#[from] Box<runtime::config_file::ConfigFileError>),

    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidInput { .. } => tonic::Status::invalid_argument(msg),
            Error::Infeasible { .. } => tonic::Status::failed_precondition(msg),
            Error::Busy { .. } => tonic::Status::resource_exhausted(msg),
            Error::NotFound { .. } => tonic::Status::not_found(msg),
            Error::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            Error::Timeout { .. } => tonic::Status::deadline_exceeded(msg),
            Error::NotImplemented(_) => tonic::Status::unimplemented(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::Etcd(_)
            | Error::EtcdConnect { .. }
            | Error::EtcdUnreachable { .. }
            | Error::Contention { .. } => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc(s.message().to_string())
    }
}
