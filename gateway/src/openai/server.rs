//! Router assembly, binding, startup log lines and graceful shutdown.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use super::middleware::{self, AuthConfig, CorsConfig, CorsError};
use super::openapi;
use super::state::SharedState;
use super::{chat, completions, embeddings, system, tokenize};

/// Chat requests with long histories exceed axum's 2 MB default.
const MAX_BODY_BYTES: usize = 32 << 20;
/// How long in-flight connections get to close after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    pub enable_request_id_headers: bool,
    pub cors: CorsConfig,
    /// `--root-path`: routes answer both with and without this prefix.
    pub root_path: String,
    /// `--ssl-keyfile` and friends: HTTPS instead of HTTP.
    pub tls: Option<super::tls::TlsSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--root-path must start with '/', got {root_path:?}")]
    InvalidRootPath { root_path: String },
    #[error(transparent)]
    Cors(#[from] CorsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

pub type Result<T> = std::result::Result<T, ServerError>;

fn normalized_root(root: &str) -> Result<String> {
    let trimmed = root.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if !trimmed.starts_with('/') {
        return Err(ServerError::InvalidRootPath {
            root_path: root.to_string(),
        });
    }
    Ok(trimmed.to_string())
}

fn routes(state: SharedState, root_path: &str, auth: bool) -> Router {
    let on = openapi::Optional::from_env();
    let served = openapi::Served {
        model_names: state.served_model_names.clone(),
        vocab_size: state.tokenizer.vocab_size(),
        max_model_len: state.max_model_len,
        pooling: state.pooling.is_some(),
        auth,
    };
    let doc = Arc::new(openapi::document(root_path, on, &served));
    let router = Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json((*doc).clone()) }
            }),
        )
        .route("/health", get(system::health))
        .route("/ping", get(system::health).post(system::health))
        .route("/version", get(system::version))
        .route("/metrics", get(system::metrics))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/models", get(system::list_models))
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/embeddings", post(embeddings::create_embedding));
    let router = if on.dev_mode {
        router.route("/reset_prefix_cache", post(system::reset_prefix_cache))
    } else {
        router
    };
    let router = if on.profiler {
        router
            .route("/start_profile", post(system::start_profile))
            .route("/stop_profile", post(system::stop_profile))
    } else {
        router
    };
    router
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::RouteNotFound {
                path: uri.path().to_string(),
            }
        })
        .with_state(state)
}

/// The whole app: routes (also under `--root-path`), auth, request ids, CORS.
pub fn router(state: SharedState, cfg: &ServerConfig) -> Result<Router> {
    let root = normalized_root(&cfg.root_path)?;
    let api_key = cfg.api_key.clone().filter(|k| !k.is_empty());
    let api = routes(state, &root, api_key.is_some());
    let mut app = if root.is_empty() {
        api
    } else {
        Router::new().merge(api.clone()).nest(&root, api)
    };
    app = app.layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    if let Some(key) = api_key {
        let auth = Arc::new(AuthConfig {
            api_key: key,
            root_path: root.clone(),
        });
        app = app.layer(axum::middleware::from_fn_with_state(
            auth,
            middleware::require_api_key,
        ));
    }
    if cfg.enable_request_id_headers {
        app = app.layer(axum::middleware::from_fn(middleware::request_id_header));
    }
    Ok(app.layer(cfg.cors.layer()?))
}

/// Binds the listening socket (port 0 picks a free port).
pub async fn bind(cfg: &ServerConfig) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|source| ServerError::Bind {
            addr: format!("{}:{}", cfg.host, cfg.port),
            source,
        })
}

/// Binds and serves; see [`serve_listener`]. A bind error stops the engine
/// too.
pub async fn serve(
    state: SharedState,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    serve_owning_engine(None, state, cfg, shutdown).await
}

/// Serves until `shutdown` is cancelled, then stops the engine (which ends
/// every in-flight stream with `abort`) and lets connections drain.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    state: SharedState,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    serve_owning_engine(Some(listener), state, cfg, shutdown).await
}

/// The one place the engine stops, whichever way serving ends: on
/// `shutdown` it stops before connections drain (so open streams end and
/// let them), on a start-up error or a failed listener once serving is
/// over. Callers hand the engine over with `state` and never stop it.
async fn serve_owning_engine(
    listener: Option<tokio::net::TcpListener>,
    state: SharedState,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let served = CancellationToken::new();
    let engine_down = CancellationToken::new();
    let stopper = {
        let (engine, shutdown, served, engine_down) = (
            state.engine.clone(),
            shutdown.clone(),
            served.clone(),
            engine_down.clone(),
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => tracing::info!(
                    "Shutting down: aborting in-flight requests and stopping the engine"
                ),
                _ = served.cancelled() => {}
            }
            engine.shutdown().await;
            engine_down.cancel();
        })
    };
    let result = match listener {
        Some(listener) => Ok(listener),
        None => bind(&cfg).await,
    };
    let result = match result {
        Ok(listener) => serve_until(listener, &state, cfg, &shutdown, &engine_down).await,
        Err(e) => Err(e),
    };
    served.cancel();
    if stopper.await.is_err() {
        tracing::error!("Stopping the engine panicked");
    }
    if result.is_ok() {
        tracing::info!("Server stopped.");
    }
    result
}

async fn serve_until(
    listener: tokio::net::TcpListener,
    state: &SharedState,
    cfg: ServerConfig,
    shutdown: &CancellationToken,
    engine_down: &CancellationToken,
) -> Result<()> {
    let app = router(state.clone(), &cfg)?;
    let local: SocketAddr = listener.local_addr().map_err(ServerError::Serve)?;
    // Checked before the banner: a bad certificate is a start-up error.
    let tls = cfg.tls.as_ref().map(super::tls::acceptor).transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let shown = format!("{scheme}://{}:{}", cfg.host, local.port());
    tracing::info!("Starting API server on {shown}");
    tracing::info!("Available routes are:");
    let on = openapi::Optional::from_env();
    if on.dev_mode {
        tracing::warn!(
            "SECURITY WARNING: development endpoints are enabled (VLLM_SERVER_DEV_MODE=1); do not use this in production"
        );
    }
    for r in openapi::served_routes(on) {
        tracing::info!("Route: {}, Methods: {}", r.path, r.methods.join(", "));
    }
    tracing::info!("Started server process [{}]", std::process::id());
    tracing::info!("Application startup complete.");
    tracing::info!("Serving on {shown} (Press CTRL+C to quit)");

    match tls {
        Some(acceptor) => {
            let listener =
                super::tls::TlsListener::new(listener, acceptor).map_err(ServerError::Serve)?;
            run_until_shutdown(listener, app, shutdown, engine_down).await
        }
        None => run_until_shutdown(listener, app, shutdown, engine_down).await,
    }
}

/// Serves `app` on `listener` (plain or TLS) until `shutdown`; once the
/// engine is down (its streams ended), connections drain.
async fn run_until_shutdown<L>(
    listener: L,
    app: Router,
    shutdown: &CancellationToken,
    engine_down: &CancellationToken,
) -> Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let signal = shutdown.clone();
    let engine_down = engine_down.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        signal.cancelled().await;
        engine_down.cancelled().await;
    });
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        r = server.into_future() => r.map_err(ServerError::Serve)?,
        _ = drain_deadline => tracing::warn!("Connections still open after {DRAIN_TIMEOUT:?}; closing them"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_paths() {
        assert_eq!(normalized_root("").unwrap(), "");
        assert_eq!(normalized_root("/").unwrap(), "");
        assert_eq!(normalized_root("/api/").unwrap(), "/api");
        assert!(normalized_root("api").is_err());
    }
}
