//! `gateway bench serve`: serving latency against a running server (TTFT,
//! ITL, E2E, output tok/s at a given concurrency), as vLLM's benchmark_serving.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::stats::{render_serving, serving_result, RequestTiming};
use super::write_json;
use crate::cli::error::{CliError, Result};
use crate::cli::sse_client::ApiClient;
use crate::envs;

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The server's OpenAI base URL.
    #[arg(long, default_value = "http://localhost:8000/v1")]
    pub url: String,
    /// Model name; default: the first one the server lists.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub max_concurrency: usize,
    /// Prompt length in tokens (random tokens from the model's vocabulary).
    #[arg(long, default_value_t = 32)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 64)]
    pub random_output_len: usize,
    /// Generate exactly --random-output-len tokens per request.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub result_file: Option<String>,
}

/// Text whose tokens seed the random prompts: real tokens of the model.
const SEED_TEXT: &str = "The quick brown fox jumps over the lazy dog while a river runs \
    through the quiet valley, and people in the city talk about science, music, history, \
    mathematics, cooking, travel and the weather of the coming week.";

async fn token_pool(api: &ApiClient) -> Result<Vec<u32>> {
    // /tokenize lives at the server root, not under /v1.
    let root = api.base.trim_end_matches("/v1").to_string();
    let root_api = ApiClient {
        base: root,
        ..api.clone()
    };
    let v = root_api
        .post_json(
            "/tokenize",
            &json!({"prompt": SEED_TEXT, "add_special_tokens": false}),
        )
        .await?;
    let pool: Vec<u32> = v
        .get("tokens")
        .and_then(|t| t.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    if pool.is_empty() {
        return Err(CliError::Api {
            url: format!("{}/tokenize", root_api.base),
            status: 200,
            message: "no tokens returned".into(),
        });
    }
    Ok(pool)
}

async fn one_request(api: ApiClient, body: Value, prompt_tokens: usize) -> RequestTiming {
    let start = Instant::now();
    let mut timing = RequestTiming {
        prompt_tokens,
        ..Default::default()
    };
    let mut last: Option<Instant> = None;
    let mut usage_tokens = None;
    let result = api
        .post_stream("/completions", &body, |chunk| {
            if let Some(u) = chunk
                .pointer("/usage/completion_tokens")
                .and_then(|u| u.as_u64())
            {
                usage_tokens = Some(u as usize);
            }
            let has_text = chunk
                .pointer("/choices/0/text")
                .and_then(|t| t.as_str())
                .is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                match last {
                    None => timing.ttft = (now - start).as_secs_f64(),
                    Some(prev) => timing.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
            }
        })
        .await;
    timing.e2e = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            timing.success = true;
            timing.output_tokens =
                usage_tokens.unwrap_or(timing.itl.len() + usize::from(last.is_some()));
        }
        Err(e) => timing.error = Some(e.to_string()),
    }
    timing
}

pub async fn run(args: ServeBenchArgs) -> Result<()> {
    if args.num_prompts == 0 || args.max_concurrency == 0 || args.random_input_len == 0 {
        return Err(CliError::InvalidArg {
            flag: "--num-prompts/--max-concurrency/--random-input-len",
            message: "must be at least 1".into(),
        });
    }
    let key = args
        .api_key
        .clone()
        .or_else(|| envs::raw(envs::OPENAI_API_KEY));
    let api = ApiClient::new(&args.url, key);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => api.first_model().await?,
    };
    let pool = token_pool(&api).await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let prompts: Vec<Vec<u32>> = (0..args.num_prompts)
        .map(|_| {
            (0..args.random_input_len)
                .map(|_| pool[rng.random_range(0..pool.len())])
                .collect()
        })
        .collect();
    println!(
        "Benchmarking {model} at {}: {} prompts, concurrency {}, input {} / output {} tokens",
        args.url,
        args.num_prompts,
        args.max_concurrency,
        args.random_input_len,
        args.random_output_len
    );
    let limit = Arc::new(Semaphore::new(args.max_concurrency));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let body = json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": args.random_output_len,
            "temperature": 0.0,
            "ignore_eos": args.ignore_eos,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let api = api.clone();
        let limit = limit.clone();
        let n = args.random_input_len;
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            one_request(api, body, n).await
        }));
    }
    let mut timings = Vec::with_capacity(tasks.len());
    for t in tasks {
        timings.push(t.await.unwrap_or_else(|e| RequestTiming {
            error: Some(format!("benchmark task failed: {e}")),
            ..Default::default()
        }));
    }
    let duration = start.elapsed().as_secs_f64();
    if let Some(err) = timings.iter().find_map(|t| t.error.as_ref()) {
        eprintln!("First failed request: {err}");
    }
    let result = serving_result(&timings, duration, args.max_concurrency);
    print!("{}", render_serving(&result));
    if let Some(path) = &args.result_file {
        write_json(path, &result)?;
    }
    Ok(())
}
