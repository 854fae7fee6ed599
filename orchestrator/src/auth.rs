//! The cluster token: creating an actor runs a command on a node, so every
//! gRPC call must carry it.

use std::os::unix::fs::OpenOptionsExt;

use tonic::{Request, Status};

use crate::error::{Error, Result};
use crate::paths::{read_trimmed, CacheRoot};

pub const HEADER: &str = "authorization";

pub fn generate() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{a}{b}")
}

/// Token for a client or agent: explicit (flag or env) else the local file.
pub fn client_token(explicit: Option<&str>, root: &CacheRoot) -> Result<String> {
    if let Some(t) = explicit.filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    read_trimmed(&root.token_file()).ok_or_else(|| {
        Error::Unauthenticated(format!(
            "no cluster token: pass --token, set FLOTILLA_CLUSTER_TOKEN, or run on the head machine ({} is missing)",
            root.token_file().display()
        ))
    })
}

/// Stores the token readable by its owner only.
pub fn write_token_file(root: &CacheRoot, token: &str) -> Result<()> {
    root.ensure()?;
    let p = root.token_file();
    if read_trimmed(&p).as_deref() == Some(token) {
        return Ok(());
    }
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    std::io::Write::write_all(&mut f, token.as_bytes()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
}

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time, so the token cannot be guessed byte by byte.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: refuses (and logs) a call without the right bearer token.
#[derive(Clone)]
pub struct Checker {
    token: std::sync::Arc<String>,
    service: &'static str,
}

impl Checker {
    pub fn new(token: String, service: &'static str) -> Self {
        Checker {
            token: std::sync::Arc::new(token),
            service,
        }
    }
}

impl tonic::service::Interceptor for Checker {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if same(t.as_bytes(), self.token.as_bytes()) => Ok(req),
            other => {
                let peer = req
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "unknown peer".into());
                let why = if other.is_none() { "missing" } else { "wrong" };
                tracing::warn!(
                    "refused a {} call from {peer}: {why} cluster token",
                    self.service
                );
                Err(Status::unauthenticated(format!(
                    "{why} cluster token (pass --token or FLOTILLA_CLUSTER_TOKEN)"
                )))
            }
        }
    }
}

/// Client side: adds the bearer token to every call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self> {
        format!("Bearer {token}")
            .parse()
            .map(Bearer)
            .map_err(|_| Error::invalid("token", "must be printable ASCII"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        req.metadata_mut().insert(HEADER, self.0.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn checker_refuses_missing_and_wrong_tokens() {
        let mut c = Checker::new("secret".into(), "test");
        assert!(c.call(Request::new(())).is_err());
        let mut b = Bearer::new("nope").unwrap();
        assert!(c.call(b.call(Request::new(())).unwrap()).is_err());
        let mut b = Bearer::new("secret").unwrap();
        assert!(c.call(b.call(Request::new(())).unwrap()).is_ok());
    }

    #[test]
    fn token_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("flotilla-auth-{}", std::process::id()));
        let root = CacheRoot(dir.clone());
        write_token_file(&root, "abc").unwrap();
        let mode = std::fs::metadata(root.token_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(client_token(None, &root).unwrap(), "abc");
        assert_eq!(client_token(Some("x"), &root).unwrap(), "x");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
