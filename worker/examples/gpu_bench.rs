//! Decode speed of the CUDA backend on `--load-format dummy` weights at a
//! real model's shapes, against the bandwidth floor measured in the same run
//! (weight bytes ÷ device-to-device copy bandwidth). Through the model
//! runner, so sampling and the host round trip of each step are included.
//!
//!   cargo run --release -p flotilla-worker --features cuda --example gpu_bench -- \
//!       CONFIG_DIR [--batch 1,32,256] [--prompt-len 128] [--new-tokens 64] [--dtype bfloat16]
//!       [--enforce-eager]
//!
//! Decode steps replay CUDA graphs (captured after the KV cache, as `gateway
//! serve` does) unless `--enforce-eager`.

use std::path::PathBuf;
use std::time::Instant;

use worker::backend::cuda::{measure_copy_bandwidth, CudaBackend};
use worker::backend::ComputeDtype;
use worker::{
    CachedRequestData, Device, LoadFormat, ModelConfig, ModelRunner, NewRequestData,
    ParallelConfig, SamplingParams, SchedulerOutput, WorkerConfig,
};

const BLOCK: usize = 16;

struct Args {
    dir: PathBuf,
    batches: Vec<usize>,
    prompt_len: usize,
    new_tokens: usize,
    dtype: String,
    /// Also time each op at the model's shapes.
    ops: bool,
    /// Only time sampling on the device at the model's vocabulary (no model).
    sampling: bool,
    /// Only time paged attention at the model's shapes (no model).
    attention: bool,
    /// No CUDA graphs: every step runs eagerly.
    enforce_eager: bool,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        dir: PathBuf::new(),
        batches: vec![1, 32, 256],
        prompt_len: 128,
        new_tokens: 64,
        dtype: "bfloat16".into(),
        ops: false,
        sampling: false,
        attention: false,
        enforce_eager: false,
    };
    let mut dir = None;
    while let Some(x) = it.next() {
        let mut val = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match x.as_str() {
            "--batch" => {
                a.batches = val("--batch")?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--batch: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--prompt-len" => {
                a.prompt_len = val("--prompt-len")?
                    .parse()
                    .map_err(|e| format!("--prompt-len: {e}"))?
            }
            "--new-tokens" => {
                a.new_tokens = val("--new-tokens")?
                    .parse()
                    .map_err(|e| format!("--new-tokens: {e}"))?
            }
            "--dtype" => a.dtype = val("--dtype")?,
            "--ops" => a.ops = true,
            "--enforce-eager" => a.enforce_eager = true,
            "--sampling" => a.sampling = true,
            "--attention" => a.attention = true,
            other if dir.is_none() && !other.starts_with("--") => dir = Some(PathBuf::from(other)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.dir = dir.ok_or(
        "usage: gpu_bench CONFIG_DIR [--batch 1,32] [--prompt-len N] [--new-tokens N] [--dtype D]",
    )?;
    Ok(a)
}

/// Parameters of the model, as the bandwidth floor counts them (every
/// weight read once per decode step, the embedding table included).
fn num_params(c: &ModelConfig) -> usize {
    let h = c.hidden_size;
    let layer =
        h * (c.q_size() + 2 * c.kv_size()) + c.q_size() * h + 3 * h * c.intermediate_size + 2 * h;
    let head = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * h
    };
    c.vocab_size * h + c.num_hidden_layers * layer + h + head
}

/// Prefill + `new_tokens - 1` decode steps for `n` requests: (prefill s, decode s).
fn run(
    r: &mut ModelRunner,
    n: usize,
    prompt_len: usize,
    new_tokens: usize,
) -> worker::Result<(f64, f64)> {
    let per = (prompt_len + new_tokens).div_ceil(BLOCK);
    let vocab = r.model_config().vocab_size as u32;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let new: Vec<NewRequestData> = (0..n)
        .map(|i| NewRequestData {
            req_id: ids[i].clone(),
            prompt_token_ids: (0..prompt_len as u32)
                .map(|t| (t * 131 + i as u32 * 7 + 17) % vocab)
                .collect(),
            output_token_ids: vec![],
            sampling_params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy()
            },
            block_ids: (0..per).map(|b| (i * per + b) as u32).collect(),
            num_computed_tokens: 0,
        })
        .collect();
    let t0 = Instant::now();
    // Prefill in chunks of at most 8192 tokens, as the scheduler would.
    let per_step = (8192 / prompt_len).max(1);
    for chunk in new.chunks(per_step) {
        r.execute_model(&SchedulerOutput {
            num_scheduled_tokens: chunk
                .iter()
                .map(|q| (q.req_id.clone(), prompt_len))
                .collect(),
            new_requests: chunk.to_vec(),
            ..Default::default()
        })?;
    }
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for k in 0..new_tokens - 1 {
        r.execute_model(&SchedulerOutput {
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
    r.execute_model(&SchedulerOutput {
        finished_req_ids: ids,
        ..Default::default()
    })?;
    Ok((prefill, decode))
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = bench(&args) {
        eprintln!("gpu_bench: {e}");
        std::process::exit(1);
    }
}

/// Time of one call of `f` (median of 50 after 5 warm-ups), synchronized.
fn time_op(b: &CudaBackend, mut f: impl FnMut() -> worker::Result<()>) -> worker::Result<f64> {
    // Back-to-back calls between two synchronizations: the host's launch
    // and wake-up latency (tens of µs per synchronize) would otherwise be
    // counted into each op, which a model step never pays. The median of
    // 11 such batches.
    const CALLS: usize = 20;
    for _ in 0..3 {
        f()?;
    }
    let mut t = Vec::new();
    for _ in 0..11 {
        b.synchronize()?;
        let s = Instant::now();
        for _ in 0..CALLS {
            f()?;
        }
        b.synchronize()?;
        t.push(s.elapsed().as_secs_f64() / CALLS as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Per-op times at the model's shapes: each linear at 1 and 8 rows (GB/s of
/// weights read), and attention at batch 1, 32 and 256 over 300-token contexts.
fn op_breakdown(c: &ModelConfig, bw: f64) -> worker::Result<()> {
    use worker::backend::cuda::{KernelChoice, LinearKernel};
    use worker::backend::Backend;
    use worker::loader::{HostLinear, HostMatrix};
    let mut b = CudaBackend::new(0, ComputeDtype::Bf16)?;
    let h = c.hidden_size;
    let shapes = [
        ("qkv", c.q_size() + 2 * c.kv_size(), h),
        ("o", h, c.q_size()),
        ("gate_up", 2 * c.intermediate_size, h),
        ("down", h, c.intermediate_size),
        ("lm_head", c.vocab_size, h),
    ];
    println!("| linear | kernel | rows | µs | GB/s of weights |");
    println!("|---|---|---|---|---|");
    let dev = candle_core::Device::Cpu;
    for (name, out, inp) in shapes {
        let w = candle_core::Tensor::rand(-0.05f32, 0.05, (out, inp), &dev)?;
        let lin = b.upload_linear(vec![HostLinear {
            weight: HostMatrix::Dense(w),
            bias: None,
        }])?;
        for kernel in [LinearKernel::Blas, LinearKernel::Gemv] {
            b.set_kernels(KernelChoice {
                small_batch_linear: kernel,
                ..KernelChoice::default()
            });
            for rows in [1usize, 8] {
                let x = gpu_rows(&b, rows, inp)?;
                let t = time_op(&b, || b.linear(&x, &lin).map(|_| ()))?;
                let gb = (out * inp * 2) as f64 / 1e9;
                println!(
                    "| {name} {out}x{inp} | {kernel:?} | {rows} | {:.1} | {:.0} |",
                    t * 1e6,
                    gb / t
                );
            }
        }
    }
    attention_times(c, bw)
}

/// Paged attention at the model's head shapes, one layer, through both
/// kernels: decode rows (batch x cached context) and a prefill of whole
/// prompts (every token sees the keys up to its own).
fn attention_times(c: &ModelConfig, bw: f64) -> worker::Result<()> {
    use worker::backend::cuda::{AttentionKernel, KernelChoice};
    use worker::backend::{Backend, StepInputs};
    let heads = worker::attention::QkvHeads {
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let spec = worker::kv_cache::KvCacheSpec {
        num_layers: 1,
        num_kv_heads: heads.num_kv_heads,
        head_dim: heads.head_dim,
        block_size: BLOCK,
        dtype_bytes: 2,
    };
    // (sequences, cached tokens before the step, tokens in the step)
    let cases: [(usize, usize, usize); 6] = [
        (1, 299, 1),
        (32, 299, 1),
        (256, 299, 1),
        (256, 999, 1),
        (1, 3999, 1),
        (16, 0, 256),
    ];
    println!("| attention (1 layer) | kernel | µs | GB/s of KV | % of copy bandwidth |");
    println!("|---|---|---|---|---|");
    for kernel in [AttentionKernel::Tiled, AttentionKernel::Lanes] {
        let mut b = CudaBackend::new(0, ComputeDtype::Bf16)?;
        b.set_kernels(KernelChoice {
            attention: kernel,
            ..KernelChoice::default()
        });
        let rope = b.upload_rope(worker::rope::RopeTable::new(c, 4096))?;
        for (batch, cached, new) in cases {
            let ctx = cached + new;
            let per = ctx.div_ceil(BLOCK);
            let mut kv = b.alloc_kv_cache(spec, per * batch)?;
            let mut m = worker::attention::AttentionMetadata {
                max_blocks_per_seq: per,
                ..Default::default()
            };
            m.query_start_loc.push(0);
            for s in 0..batch {
                for pos in cached..ctx {
                    m.positions.push(pos as u32);
                    m.slot_mapping
                        .push((s * per + pos / BLOCK) * BLOCK + pos % BLOCK);
                }
                m.query_start_loc.push(m.positions.len());
                m.seq_lens.push(ctx);
                m.block_tables
                    .extend((0..per).map(|k| (s * per + k) as u32));
            }
            let ids = vec![0u32; m.positions.len()];
            let step = b.prepare_step(
                StepInputs {
                    input_ids: &ids,
                    meta: &m,
                    logits_rows: &[],
                },
                &rope,
            )?;
            let qkv = gpu_rows(&b, ids.len(), heads.qkv_width())?;
            b.write_kv(&mut kv, 0, &qkv, heads, &step)?;
            let t = time_op(&b, || {
                b.attention(&kv, 0, &qkv, heads, &step, 0.088).map(|_| ())
            })?;
            // KV bytes a decode row must read (a prefill's are re-read from cache).
            let bytes = (batch * ctx * 2 * heads.kv_width() * 2) as f64;
            let what = if new == 1 {
                format!("decode {batch} x {ctx} keys")
            } else {
                format!("prefill {batch} x {new} tokens")
            };
            println!(
                "| {what} | {kernel:?} | {:.1} | {:.0} | {:.0}% |",
                t * 1e6,
                bytes / t / 1e9,
                100.0 * bytes / t / bw
            );
        }
    }
    Ok(())
}

/// Random activation rows on the device.
fn gpu_rows(
    b: &CudaBackend,
    rows: usize,
    cols: usize,
) -> worker::Result<worker::backend::cuda::CudaTensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    b.upload_tensor(&v, rows, cols)
}

/// Time of `Backend::sample` per mode over `rows` rows of the model's
/// vocabulary, against `top_logits` (what greedy rows take).
fn sampling_times(vocab: usize) -> worker::Result<()> {
    use worker::backend::{Backend, SampleSpec};
    let b = CudaBackend::new(0, ComputeDtype::Bf16)?;
    let spec = |top_k: u32, top_p: f32| SampleSpec {
        logits_row: 0,
        greedy: false,
        allowlist: false,
        edits: Vec::new(),
        inv_temperature: 1.0 / 0.8,
        min_p: 0.0,
        top_k,
        top_p,
        u: 0.37,
        logprobs: false,
        bitmask: None,
    };
    let modes = [
        ("temperature 0.8", spec(0, 1.0)),
        ("top_k 50", spec(50, 1.0)),
        ("top_p 0.9", spec(0, 0.9)),
        ("top_k 50 + top_p 0.9", spec(50, 0.9)),
    ];
    println!("| sampling over {vocab} | rows | µs |");
    println!("|---|---|---|");
    for rows in [1usize, 32, 256] {
        let x = gpu_rows(&b, rows, vocab)?;
        let t = time_op(&b, || b.top_logits(&x, 1).map(|_| ()))?;
        println!("| greedy (top_logits k=1) | {rows} | {:.1} |", t * 1e6);
        for (name, s) in &modes {
            let specs: Vec<SampleSpec> = (0..rows)
                .map(|r| SampleSpec {
                    logits_row: r,
                    ..s.clone()
                })
                .collect();
            let t = time_op(&b, || b.sample(&x, &specs).map(|_| ()))?;
            println!("| {name} | {rows} | {:.1} |", t * 1e6);
        }
    }
    Ok(())
}

fn bench(a: &Args) -> worker::Result<()> {
    if a.sampling || a.attention {
        let c = worker::ModelConfig::load(&a.dir, LoadFormat::Dummy, &serde_json::Value::Null)?;
        if a.sampling {
            sampling_times(c.vocab_size)?;
        }
        if a.attention {
            let probe = CudaBackend::new(0, ComputeDtype::Bf16)?;
            let bw = measure_copy_bandwidth(&probe, 2 << 30)?;
            println!("copy bandwidth (D2D, read+write): {:.2} TB/s", bw / 1e12);
            attention_times(&c, bw)?;
        }
        return Ok(());
    }
    let t = Instant::now();
    let probe = CudaBackend::new(0, ComputeDtype::Bf16)?;
    println!(
        "backend start (context, kernels, cuBLAS): {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let bw = measure_copy_bandwidth(&probe, 2 << 30)?;
    drop(probe);
    let t = Instant::now();
    let mut r = ModelRunner::load(&WorkerConfig {
        device: Device::Cuda,
        model: a.dir.clone(),
        load_format: LoadFormat::Dummy,
        dtype: a.dtype.clone(),
        hf_overrides: serde_json::Value::Null,
        block_size: BLOCK,
        parallel: ParallelConfig::default(),
        seed: 0,
        max_model_len: a.prompt_len + a.new_tokens,
        cpu_int8_activations: false,
        pooling: None,
    })?;
    let load_s = t.elapsed().as_secs_f64();
    let weight_bytes = num_params(r.model_config()) * r.dtype().bytes();
    if a.ops {
        op_breakdown(r.model_config(), bw)?;
    }
    let floor_ms = weight_bytes as f64 / bw * 1e3;
    let max_batch = *a.batches.iter().max().unwrap_or(&1);
    let per = (a.prompt_len + a.new_tokens).div_ceil(BLOCK);
    r.initialize_kv_cache(per * max_batch)?;
    if a.enforce_eager {
        println!("CUDA graphs: off (--enforce-eager)");
    } else {
        let t = Instant::now();
        let n = r.capture_graphs(max_batch)?;
        println!(
            "CUDA graphs: {n} captured at start in {:.2} s",
            t.elapsed().as_secs_f64()
        );
    }
    run(&mut r, 1, 16, 4)?; // warm-up: cuBLAS handles and kernel loads
    println!("copy bandwidth (D2D, read+write): {:.2} TB/s", bw / 1e12);
    println!(
        "weights: {:.2} GB ({}), load {load_s:.1} s",
        weight_bytes as f64 / 1e9,
        r.dtype().name()
    );
    println!("batch-1 floor: {floor_ms:.2} ms/token");
    println!("| batch | prefill s | decode ms/step | output tok/s | ms/step ÷ floor |");
    println!("|---|---|---|---|---|");
    for &n in &a.batches {
        let (p, d) = run(&mut r, n, a.prompt_len, a.new_tokens)?;
        let steps = (a.new_tokens - 1) as f64;
        let ms = d / steps * 1e3;
        println!(
            "| {n} | {p:.3} | {ms:.3} | {:.0} | {:.2} |",
            n as f64 * steps / d,
            ms / floor_ms
        );
    }
    Ok(())
}
