//! `gateway bench throughput`: offline generation throughput through the
//! `LLM` API (engine in this process, no HTTP), as vLLM's benchmark_throughput.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use worker::SamplingParams;

use super::stats::{render_throughput, throughput_result};
use super::write_json;
use crate::cli::error::{CliError, Result};
use crate::engine::args::EngineArgs;
use crate::llm::LLM;

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    /// The model: an HF directory or a GGUF file.
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub num_prompts: usize,
    /// Prompt length in tokens (random tokens of the vocabulary).
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    /// Tokens generated per prompt (EOS ignored so every request runs to the end).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    #[arg(long, default_value_t = 0)]
    pub bench_seed: u64,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub output_json: Option<String>,
    /// YAML file of flag settings (engine flags such as `max-num-seqs: 64`,
    /// and `model: ...`); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn run(args: ThroughputArgs) -> Result<()> {
    if args.num_prompts == 0 || args.input_len == 0 || args.output_len == 0 {
        return Err(CliError::InvalidArg {
            flag: "--num-prompts/--input-len/--output-len",
            message: "must be at least 1".into(),
        });
    }
    // The offline API drives its own runtime, so it runs off this one.
    tokio::task::spawn_blocking(move || run_offline(&args))
        .await
        .map_err(|e| CliError::Io {
            what: "run the offline benchmark".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

fn run_offline(args: &ThroughputArgs) -> Result<()> {
    let llm = LLM::new(&args.model, args.engine.clone())?;
    let vocab = llm.tokenizer().vocab_size() as u32;
    let special: Vec<u32> = llm.tokenizer().special_token_ids().collect();
    let mut rng = StdRng::seed_from_u64(args.bench_seed);
    let mut random_token = || loop {
        let t = rng.random_range(0..vocab);
        if !special.contains(&t) {
            return t;
        }
    };
    let prompts: Vec<Vec<u32>> = (0..args.num_prompts)
        .map(|_| (0..args.input_len).map(|_| random_token()).collect())
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: Some(args.output_len),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    println!(
        "Running {} prompts ({} in / {} out tokens) offline",
        args.num_prompts, args.input_len, args.output_len
    );
    let start = Instant::now();
    let results = llm.generate_token_ids(prompts, &params)?;
    let elapsed = start.elapsed().as_secs_f64();
    let prompt_tokens: usize = results.iter().map(|c| c.prompt_token_ids.len()).sum();
    let output_tokens: usize = results
        .iter()
        .flat_map(|c| c.outputs.iter().map(|o| o.token_ids.len()))
        .sum();
    let result = throughput_result(elapsed, args.num_prompts, prompt_tokens, output_tokens);
    print!("{}", render_throughput(&result));
    if let Some(path) = &args.output_json {
        write_json(path, &result)?;
    }
    Ok(())
}
