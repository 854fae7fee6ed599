//! `gateway chat` and `gateway complete`: clients of a running server, as
//! `vllm chat` / `vllm complete`.

use std::io::{BufRead, Write};

use clap::Args;
use serde_json::{json, Value};

use super::error::{CliError, Result};
use super::sse_client::ApiClient;
use crate::envs;

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's OpenAI base URL.
    #[arg(long, default_value = "http://localhost:8000/v1")]
    pub url: String,
    /// Model to ask for; default: the first one the server lists.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Bearer key (default: OPENAI_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Send one message, print the answer and exit.
    #[arg(short, long, value_name = "MESSAGE")]
    pub quick: Option<String>,
    /// Most tokens per answer.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// A system message put first in the conversation.
    #[arg(long)]
    pub system_prompt: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

async fn connect(args: &ClientArgs) -> Result<(ApiClient, String)> {
    let key = args
        .api_key
        .clone()
        .or_else(|| envs::raw(envs::OPENAI_API_KEY));
    let api = ApiClient::new(&args.url, key);
    let model = match &args.model_name {
        Some(m) => m.clone(),
        None => api.first_model().await?,
    };
    Ok((api, model))
}

fn stdout_write(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|source| CliError::Io {
            what: "write to stdout".into(),
            source,
        })
}

/// Lines typed by the user; `None` at end of input.
fn read_line(prompt: &str) -> Result<Option<String>> {
    stdout_write(prompt)?;
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|source| CliError::Io {
            what: "read stdin".into(),
            source,
        })?;
    Ok((n > 0).then(|| line.trim_end_matches(['\n', '\r']).to_string()))
}

/// Streams one answer to stdout and returns its text.
async fn stream_text(
    api: &ApiClient,
    path: &str,
    body: Value,
    pointer: &'static str,
) -> Result<String> {
    let mut text = String::new();
    let mut write_err = None;
    api.post_stream(path, &body, |chunk| {
        if let Some(t) = chunk.pointer(pointer).and_then(|t| t.as_str()) {
            text.push_str(t);
            if let Err(e) = stdout_write(t) {
                write_err.get_or_insert(e);
            }
        }
    })
    .await?;
    if let Some(e) = write_err {
        return Err(e);
    }
    stdout_write("\n")?;
    Ok(text)
}

pub async fn chat(args: ChatArgs) -> Result<()> {
    let (api, model) = connect(&args.client).await?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(s) = &args.system_prompt {
        messages.push(json!({"role": "system", "content": s}));
    }
    let quick = args.client.quick.clone();
    if quick.is_none() {
        println!("Using model: {model}. Type a message, Ctrl+D to quit.");
    }
    loop {
        let user = match &quick {
            Some(q) => q.clone(),
            None => match read_line("> ")? {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        messages.push(json!({"role": "user", "content": user}));
        let mut body = json!({"model": model, "messages": messages, "stream": true});
        if let Some(m) = args.client.max_tokens {
            body["max_tokens"] = m.into();
        }
        let answer =
            stream_text(&api, "/chat/completions", body, "/choices/0/delta/content").await?;
        messages.push(json!({"role": "assistant", "content": answer}));
        if quick.is_some() {
            return Ok(());
        }
    }
}

pub async fn complete(args: CompleteArgs) -> Result<()> {
    let (api, model) = connect(&args.client).await?;
    let quick = args.client.quick.clone();
    if quick.is_none() {
        println!("Using model: {model}. Type a prompt, Ctrl+D to quit.");
    }
    loop {
        let prompt = match &quick {
            Some(q) => q.clone(),
            None => match read_line("> ")? {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        let mut body = json!({"model": model, "prompt": prompt, "stream": true});
        if let Some(m) = args.client.max_tokens {
            body["max_tokens"] = m.into();
        }
        stream_text(&api, "/completions", body, "/choices/0/text").await?;
        if quick.is_some() {
            return Ok(());
        }
    }
}
