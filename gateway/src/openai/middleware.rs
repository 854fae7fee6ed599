//! Per-request layers: API-key auth on /v1, X-Request-Id, and CORS.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

use super::error::ApiError;

/// The key clients must send, and where it applies.
#[derive(Clone)]
pub struct AuthConfig {
    pub api_key: String,
    /// `--root-path`, so `/root/v1/...` is guarded as well.
    pub root_path: String,
}

/// True when the request must carry the key: /v1 routes, except preflights.
pub fn needs_auth(method: &Method, path: &str, root_path: &str) -> bool {
    if method == Method::OPTIONS {
        return false;
    }
    let path = path
        .strip_prefix(root_path)
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    path == "/v1" || path.starts_with("/v1/")
}

/// Whether `Authorization: Bearer <key>` matches, compared in constant time.
pub fn bearer_matches(header: Option<&str>, key: &str) -> bool {
    let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (token.trim().as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn require_api_key(
    State(cfg): State<Arc<AuthConfig>>,
    req: Request,
    next: Next,
) -> Response {
    if needs_auth(req.method(), req.uri().path(), &cfg.root_path) {
        let header = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !bearer_matches(header, &cfg.api_key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `--enable-request-id-headers`: echo the client's X-Request-Id, or make one.
/// The id is also put on the request so handlers name engine requests by it.
pub async fn request_id_header(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .unwrap_or(HeaderValue::from_static("unknown"))
        });
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(X_REQUEST_ID, id);
    resp
}

/// `--allowed-origins` etc. (JSON lists, `["*"]` by default, as vLLM).
#[derive(Debug, Clone)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub allow_credentials: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} entry {value:?}: {reason}")]
pub struct CorsError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl CorsConfig {
    /// The layer. A wildcard with credentials is not allowed by the CORS
    /// spec, so it becomes "mirror the request" (what Starlette does).
    pub fn layer(&self) -> Result<CorsLayer, CorsError> {
        let wild = |v: &[String]| v.iter().any(|s| s == "*");
        let creds = self.allow_credentials;
        let origins = if wild(&self.allowed_origins) {
            if creds {
                AllowOrigin::mirror_request()
            } else {
                AllowOrigin::any()
            }
        } else {
            let list = self
                .allowed_origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o).map_err(|e| CorsError {
                        flag: "--allowed-origins",
                        value: o.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(list)
        };
        let methods = if wild(&self.allowed_methods) {
            if creds {
                AllowMethods::mirror_request()
            } else {
                AllowMethods::any()
            }
        } else {
            let list = self
                .allowed_methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|e| CorsError {
                        flag: "--allowed-methods",
                        value: m.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowMethods::list(list)
        };
        let headers = if wild(&self.allowed_headers) {
            if creds {
                AllowHeaders::mirror_request()
            } else {
                AllowHeaders::any()
            }
        } else {
            let list = self
                .allowed_headers
                .iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes()).map_err(|e| CorsError {
                        flag: "--allowed-headers",
                        value: h.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowHeaders::list(list)
        };
        Ok(CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(methods)
            .allow_headers(headers)
            .allow_credentials(creds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_applies_to_v1_only() {
        assert!(needs_auth(&Method::POST, "/v1/completions", ""));
        assert!(needs_auth(&Method::GET, "/api/v1/models", "/api"));
        assert!(!needs_auth(&Method::OPTIONS, "/v1/models", ""));
        assert!(!needs_auth(&Method::GET, "/health", ""));
        assert!(!needs_auth(&Method::GET, "/metrics", ""));
        assert!(!needs_auth(&Method::GET, "/v1x", ""));
    }

    #[test]
    fn bearer() {
        assert!(bearer_matches(Some("Bearer k1"), "k1"));
        assert!(!bearer_matches(Some("Bearer k2"), "k1"));
        assert!(!bearer_matches(Some("k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
    }

    #[test]
    fn cors_configs_build() {
        let star = vec!["*".to_string()];
        let c = CorsConfig {
            allowed_origins: star.clone(),
            allowed_methods: star.clone(),
            allowed_headers: star.clone(),
            allow_credentials: true,
        };
        // Must not panic on use (tower-http checks wildcard + credentials when layering).
        let _ = tower::Layer::layer(
            &c.layer().unwrap(),
            tower::service_fn(|_: axum::http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(())
            }),
        );
        let bad = CorsConfig {
            allowed_origins: vec!["http://a\n".into()],
            ..c
        };
        assert!(bad.layer().is_err());
    }
}
