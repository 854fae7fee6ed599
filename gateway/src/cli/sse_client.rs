//! A small client side for the server's API: SSE parsing over reqwest.

use futures::StreamExt;
use serde_json::Value;

use super::error::{CliError, Result};

/// Splits complete SSE events off the front of `buf`, returning their `data:`
/// payloads; a partial event stays in `buf` for the next read.
pub fn drain_events(buf: &mut String) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let normalized_end = buf
            .find("\n\n")
            .map(|i| (i, 2))
            .or_else(|| buf.find("\r\n\r\n").map(|i| (i, 4)));
        let Some((end, sep)) = normalized_end else {
            return out;
        };
        let event: String = buf.drain(..end + sep).collect();
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if !data.is_empty() {
            out.push(data.join("\n"));
        }
    }
}

/// A client for one server base URL (`.../v1`).
#[derive(Clone)]
pub struct ApiClient {
    pub http: reqwest::Client,
    pub base: String,
    pub api_key: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str, api_key: Option<String>) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_string(),
            api_key,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = format!("{}{}", self.base, path);
        let mut rb = self.http.request(method, &url);
        if let Some(k) = &self.api_key {
            rb = rb.bearer_auth(k);
        }
        (url, rb)
    }

    async fn check(url: &str, resp: reqwest::Response) -> Result<reqwest::Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or(text);
        Err(CliError::Api {
            url: url.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let (url, rb) = self.request(reqwest::Method::GET, path);
        let resp = rb.send().await.map_err(|source| CliError::Http {
            url: url.clone(),
            source,
        })?;
        let resp = Self::check(&url, resp).await?;
        resp.json()
            .await
            .map_err(|source| CliError::Http { url, source })
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let (url, rb) = self.request(reqwest::Method::POST, path);
        let resp = rb
            .json(body)
            .send()
            .await
            .map_err(|source| CliError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = Self::check(&url, resp).await?;
        resp.json()
            .await
            .map_err(|source| CliError::Http { url, source })
    }

    /// Posts a streaming request and calls `on_chunk` for every JSON chunk
    /// until `[DONE]`.
    pub async fn post_stream(
        &self,
        path: &str,
        body: &Value,
        mut on_chunk: impl FnMut(Value),
    ) -> Result<()> {
        let (url, rb) = self.request(reqwest::Method::POST, path);
        let resp = rb
            .json(body)
            .send()
            .await
            .map_err(|source| CliError::Http {
                url: url.clone(),
                source,
            })?;
        let resp = Self::check(&url, resp).await?;
        let mut bytes = resp.bytes_stream();
        let mut buf = String::new();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk.map_err(|source| CliError::Http {
                url: url.clone(),
                source,
            })?;
            pending.extend_from_slice(&chunk);
            // Keep an incomplete UTF-8 sequence for the next read.
            let valid = match std::str::from_utf8(&pending) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            buf.push_str(&String::from_utf8_lossy(&pending[..valid]));
            pending.drain(..valid);
            for data in drain_events(&mut buf) {
                if data == "[DONE]" {
                    return Ok(());
                }
                let value: Value = serde_json::from_str(&data).map_err(|e| CliError::Api {
                    url: url.clone(),
                    status: 200,
                    message: format!("bad stream chunk {data:?}: {e}"),
                })?;
                if let Some(msg) = value.pointer("/error/message").and_then(|m| m.as_str()) {
                    return Err(CliError::Api {
                        url: url.clone(),
                        status: 200,
                        message: msg.to_string(),
                    });
                }
                on_chunk(value);
            }
        }
        Ok(())
    }

    /// The first served model's id.
    pub async fn first_model(&self) -> Result<String> {
        let models = self.get_json("/models").await?;
        models
            .pointer("/data/0/id")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| CliError::Api {
                url: format!("{}/models", self.base),
                status: 200,
                message: "the server lists no models".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads() {
        let mut buf = String::from("data: {\"a\":1}\n\ndata: [DO");
        assert_eq!(drain_events(&mut buf), vec!["{\"a\":1}"]);
        assert_eq!(buf, "data: [DO");
        buf.push_str("NE]\n\n: comment\n\n");
        assert_eq!(drain_events(&mut buf), vec!["[DONE]"]);
        assert!(buf.is_empty());
    }
}
