//! TLS on the API server, as vLLM's `--ssl-keyfile`, `--ssl-certfile`,
//! `--ssl-ca-certs` and `--ssl-cert-reqs` (Python's `ssl.CERT_NONE`,
//! `CERT_OPTIONAL`, `CERT_REQUIRED`: 0, 1, 2): rustls, the same stack the
//! orchestrator's etcd client uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The `--ssl-*` settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub keyfile: PathBuf,
    pub certfile: PathBuf,
    /// CA bundle that client certificates must chain to.
    pub ca_certs: Option<PathBuf>,
    /// 0: no client certificate asked; 1: verified when sent; 2: required.
    pub cert_reqs: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {message}")]
    File {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("--ssl-cert-reqs {0}: choose 0 (none), 1 (optional) or 2 (required)")]
    CertReqs(u8),
    #[error(
        "--ssl-cert-reqs {0} needs --ssl-ca-certs (the CAs client certificates must chain to)"
    )]
    NoCa(u8),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::File {
        flag,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// A TLS acceptor for `settings`; every problem names its flag and file.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let chain = certs("--ssl-certfile", &settings.certfile)?;
    let key = PrivateKeyDer::from_pem_file(&settings.keyfile).map_err(|e| TlsError::File {
        flag: "--ssl-keyfile",
        path: settings.keyfile.clone(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (settings.cert_reqs, &settings.ca_certs) {
        (0, _) => builder.with_no_client_auth(),
        (n @ (1 | 2), None) => return Err(TlsError::NoCa(n)),
        (n @ (1 | 2), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in certs("--ssl-ca-certs", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    flag: "--ssl-ca-certs",
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if n == 1 {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
        (n, _) => return Err(TlsError::CertReqs(n)),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::File {
            flag: "--ssl-keyfile",
            path: settings.keyfile.clone(),
            message: format!("does not match --ssl-certfile: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener whose connections are TLS. Handshakes run in their own
/// tasks (bounded by `HANDSHAKE_TIMEOUT`), so a slow or silent client never
/// holds up the others; a failed one (plain HTTP, no client certificate)
/// ends that connection only.
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // As axum's own listener: a full fd table is transient.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {addr} timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends with the process's runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
