//! Flotilla's orchestrator: a Ray-style cluster manager whose state lives in
//! etcd — head, node agents, placement groups, actors, `status`.

pub mod adopt;
pub mod agent;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod commands;
pub mod detach;
pub mod detect;
pub mod docker;
pub mod error;
pub mod etcd_proc;
pub mod events;
pub mod head_agent;
pub mod head_service;
pub mod health;
pub mod identity;
pub mod leader;
pub mod lease;
pub mod liveness;
pub mod members;
pub mod paths;
pub mod placement;
pub mod reconcile;
pub mod resources;
pub mod state;
pub mod status;
pub mod store;
pub mod witness;

pub use error::{Error, Result};
