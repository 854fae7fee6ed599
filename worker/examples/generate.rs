//! Greedy generation for several prompts in one batch, printed as JSON: the
//! tokens, each one's logprob and the top 5, for comparison against a
//! reference implementation (scripts/gpu/hf_compare.py runs HF transformers
//! on the same weights).
//!
//!   cargo run --release -p flotilla-worker --example generate -- \
//!       MODEL PROMPTS.json STEPS [--device cuda|cpu] [--dtype bfloat16] [--enforce-eager]
//!
//! On a GPU, decode steps replay CUDA graphs unless `--enforce-eager`.
//!
//! PROMPTS.json is a list of token-id lists.

use std::path::PathBuf;

use serde_json::json;
use worker::{
    CachedRequestData, LoadFormat, ModelRunner, NewRequestData, ParallelConfig, SamplingParams,
    SchedulerOutput, WorkerConfig,
};

const BLOCK: usize = 16;

fn main() {
    if let Err(e) = run() {
        eprintln!("generate: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: generate MODEL PROMPTS.json STEPS [--device D] [--dtype D]".into());
    }
    let flag = |name: &str, default: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    };
    let prompts: Vec<Vec<u32>> = serde_json::from_slice(&std::fs::read(&args[1])?)?;
    let steps: usize = args[2].parse()?;
    let mut r = ModelRunner::load(&WorkerConfig {
        device: flag("--device", "auto").parse()?,
        model: PathBuf::from(&args[0]),
        load_format: LoadFormat::Auto,
        dtype: flag("--dtype", "auto"),
        hf_overrides: serde_json::Value::Null,
        block_size: BLOCK,
        parallel: ParallelConfig::default(),
        seed: 0,
        max_model_len: 0,
        cpu_int8_activations: false,
        pooling: None,
    })?;
    let per: Vec<usize> = prompts
        .iter()
        .map(|p| (p.len() + steps).div_ceil(BLOCK))
        .collect();
    r.initialize_kv_cache(per.iter().sum::<usize>().max(1))?;
    if !args.iter().any(|a| a == "--enforce-eager") {
        r.capture_graphs(prompts.len())?;
    }
    let ids: Vec<String> = (0..prompts.len()).map(|i| format!("p{i}")).collect();
    let mut next_block = 0u32;
    let new: Vec<NewRequestData> = prompts
        .iter()
        .zip(&per)
        .zip(&ids)
        .map(|((p, &n), id)| {
            let blocks = (next_block..next_block + n as u32).collect();
            next_block += n as u32;
            NewRequestData {
                req_id: id.clone(),
                prompt_token_ids: p.clone(),
                output_token_ids: vec![],
                sampling_params: SamplingParams {
                    logprobs: Some(5),
                    ignore_eos: true,
                    ..SamplingParams::greedy()
                },
                block_ids: blocks,
                num_computed_tokens: 0,
            }
        })
        .collect();
    let mut results: Vec<Vec<serde_json::Value>> = vec![Vec::new(); prompts.len()];
    let mut computed: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut step = SchedulerOutput {
        num_scheduled_tokens: prompts
            .iter()
            .zip(&ids)
            .map(|(p, id)| (id.clone(), p.len()))
            .collect(),
        new_requests: new,
        ..Default::default()
    };
    for s in 0..steps {
        let out = r.execute_model(&step)?;
        for (i, lp) in out.logprobs.iter().enumerate() {
            let lp = lp.as_ref().ok_or("no logprobs returned")?;
            results[i].push(json!({"token": lp.token_id, "logprob": lp.logprob, "top": lp.top}));
        }
        if s > 0 {
            for c in computed.iter_mut() {
                *c += 1;
            }
        }
        step = SchedulerOutput {
            cached_requests: ids
                .iter()
                .zip(&computed)
                .map(|(id, &c)| CachedRequestData {
                    new_token_ids: Vec::new(),
                    req_id: id.clone(),
                    new_block_ids: vec![],
                    num_computed_tokens: c,
                })
                .collect(),
            num_scheduled_tokens: ids.iter().map(|id| (id.clone(), 1)).collect(),
            ..Default::default()
        };
    }
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}
