//! The server owns the engine it is handed: whichever way serving ends, the
//! engine is stopped once `serve` returns, so no caller stops it again.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use clap::Parser;
use gateway::cli::{serve::prepare, Cli, Command};
use gateway::openai::{serve, ServerError};
use tokio_util::sync::CancellationToken;

/// A start-up error (the port is taken) returns without a shutdown signal
/// and still stops the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_error_stops_the_engine() {
    let Some(model) = fixtures::smollm2_gguf() else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let cli = Cli::try_parse_from([
        "gateway",
        "serve",
        model.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--max-model-len",
        "512",
        "--num-gpu-blocks-override",
        "64",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let (state, cfg) = tokio::task::block_in_place(|| prepare(&args)).expect("engine loads");
    let engine = state.engine.clone();
    assert!(engine.is_alive());
    let err = serve(state, cfg, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::Bind { .. }), "{err}");
    assert!(
        !engine.is_alive(),
        "the engine still runs after serve failed"
    );
}
