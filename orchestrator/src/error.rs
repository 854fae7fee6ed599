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

    /// A gRPC call failed; the peer's status code travels on, so a head
    /// that relays an agent's answer keeps its meaning.
    #[error("{message}")]
    Rpc { code: tonic::Code, message: String },

    #[error("bad {what} from the head: {source}")]
    BadReply {
        what: &'static str,
        source: serde_json::Error,
    },

    /// A process this one started (the background `start`, the head's node
    /// agent) ended before it said it was ready; `log` is what it wrote.
    #[error("{what} exited with {status}:\n{log}")]
    ExitedEarly {
        what: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },

    #[error("cannot start etcd from PATH: {source} (install etcd or pass --etcd-endpoints)")]
    EtcdMissing { source: std::io::Error },

    #[error("etcd exited with {status} at start; see {log}")]
    EtcdExited {
        status: std::process::ExitStatus,
        log: PathBuf,
    },

    #[error("placement group {id} was removed while {during}")]
    GroupRemoved { id: String, during: &'static str },

    #[error(
        "actor {id} is {state} and on no node now; its last log stays on the node that ran it"
    )]
    ActorOffNode { id: String, state: String },

    #[error("invalid address {address}: {reason}")]
    BadAddress { address: String, reason: String },

    /// The OS refused what this process needs to run: a thread, a runtime,
    /// a signal handler.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },

    #[error("{what}: {source}")]
    TaskFailed {
        what: &'static str,
        source: tokio::task::JoinError,
    },

    /// `orchestrator docker`: the message names the engine, image,
    /// container or network.
    #[error("{0}")]
    Docker(String),

    #[error(transparent)]
    ConfigFile(#[from] Box<runtime::config_file::ConfigFileError>),
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

    pub fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::Os { what, source }
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
            Error::Rpc { code, .. } => tonic::Status::new(code, msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_status_keeps_its_code_and_message() {
        let e = Error::from(tonic::Status::not_found("actor 'x' not found"));
        assert_eq!(e.to_string(), "actor 'x' not found");
        let back = tonic::Status::from(e);
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert_eq!(back.message(), "actor 'x' not found");
    }

    #[test]
    fn domain_errors_read_as_before() {
        let e = Error::GroupRemoved {
            id: "pg_1".into(),
            during: "pending",
        };
        assert_eq!(
            e.to_string(),
            "placement group pg_1 was removed while pending"
        );
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
        let e = Error::os("tokio runtime")(std::io::Error::other("no threads"));
        assert_eq!(e.to_string(), "tokio runtime: no threads");
        let e = Error::ActorOffNode {
            id: "actor_1".into(),
            state: "Dead".into(),
        };
        assert_eq!(
            e.to_string(),
            "actor actor_1 is Dead and on no node now; its last log stays on the node that ran it"
        );
    }
}
