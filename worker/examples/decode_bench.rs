//! Decode throughput of the model runner on a model file (SmolLM2 GGUF by
//! default): batch 1, then N concurrent requests, 64 new tokens each.
//!
//!   cargo run --release -p flotilla-worker --example decode_bench -- [MODEL] [CONCURRENCY]

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;
use std::time::Instant;

use worker::{
    CachedRequestData, LoadFormat, ModelRunner, NewRequestData, ParallelConfig, SamplingParams,
    SchedulerOutput, WorkerConfig,
};

const NEW_TOKENS: usize = 64;
const BLOCK: usize = 16;

/// Runs `n` requests of `prompt_len` tokens to NEW_TOKENS outputs; returns
/// (prefill seconds, decode seconds).
fn run(runner: &mut ModelRunner, n: usize, prompt_len: usize) -> worker::Result<(f64, f64)> {
    let blocks_per = (prompt_len + NEW_TOKENS).div_ceil(BLOCK);
    let vocab = runner.model_config().vocab_size as u32;
    let new: Vec<NewRequestData> = (0..n)
        .map(|i| NewRequestData {
            req_id: format!("r{i}"),
            prompt_token_ids: (0..prompt_len as u32)
                .map(|t| (t * 131 + i as u32 * 7 + 17) % vocab)
                .collect(),
            output_token_ids: vec![],
            sampling_params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
            block_ids: (0..blocks_per)
                .map(|b| (i * blocks_per + b) as u32)
                .collect(),
            num_computed_tokens: 0,
        })
        .collect();
    let t0 = Instant::now();
    runner.execute_model(&SchedulerOutput {
        num_scheduled_tokens: new.iter().map(|r| (r.req_id.clone(), prompt_len)).collect(),
        new_requests: new,
        ..Default::default()
    })?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for k in 0..NEW_TOKENS - 1 {
        let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
        runner.execute_model(&SchedulerOutput {
            cached_requests: ids
                .iter()
                .map(|id| CachedRequestData {
                    new_token_ids: Vec::new(),
                    req_id: id.clone(),
                    new_block_ids: vec![],
                    num_computed_tokens: prompt_len + k,
                })
                .collect(),
            num_scheduled_tokens: ids.iter().map(|id| (id.clone(), 1)).collect(),
            ..Default::default()
        })?;
    }
    let decode = t1.elapsed().as_secs_f64();
    runner.execute_model(&SchedulerOutput {
        finished_req_ids: (0..n).map(|i| format!("r{i}")).collect(),
        ..Default::default()
    })?;
    Ok((prefill, decode))
}

fn main() {
    if let Err(e) = run_bench() {
        eprintln!("decode_bench: {e}");
        std::process::exit(1);
    }
}

fn run_bench() -> worker::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = match args
        .next()
        .map(PathBuf::from)
        .or_else(fixtures::find_smollm2_gguf)
    {
        Some(m) => m,
        None => {
            return Err(worker::Error::Config {
                msg: "no model given and SmolLM2 not found (run scripts/setup.sh)".into(),
            })
        }
    };
    let conc: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32);
    let prompt_len = 16;
    let mut runner = ModelRunner::load(&WorkerConfig {
        device: worker::Device::Cpu,
        model,
        load_format: LoadFormat::Auto,
        dtype: "auto".into(),
        hf_overrides: serde_json::Value::Null,
        block_size: BLOCK,
        parallel: ParallelConfig::default(),
        seed: 0,
        max_model_len: 2048,
        cpu_int8_activations: false,
        pooling: None,
    })?;
    let blocks_per = (prompt_len + NEW_TOKENS).div_ceil(BLOCK);
    runner.initialize_kv_cache(blocks_per * conc.max(1))?;
    run(&mut runner, 1, prompt_len)?; // warm-up (weight repacking, caches)
    for n in [1, conc] {
        let (p, d) = run(&mut runner, n, prompt_len)?;
        let out = (n * NEW_TOKENS) as f64;
        println!(
            "batch {n:>3}: prefill {:.3}s, decode {:.1} tok/s ({:.1} ms/step), output incl. prefill {:.1} tok/s",
            p,
            (n * (NEW_TOKENS - 1)) as f64 / d,
            d * 1000.0 / (NEW_TOKENS - 1) as f64,
            out / (p + d)
        );
    }
    Ok(())
}
