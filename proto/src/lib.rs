//! Generated gRPC code for Flotilla's services. Nothing else in the workspace
//! hand-writes wire types.

pub mod orchestrator {
    tonic::include_proto!("flotilla.orchestrator");
}

pub mod worker {
    tonic::include_proto!("flotilla.worker");
}
