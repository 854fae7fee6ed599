//! A real K-quant GGUF, end to end. SmolLM2-135M-Instruct's Q4_1 GGUF is
//! dequantized and requantized with llama.cpp's Q4_K_M type choices, written
//! as a new GGUF (same metadata: tokenizer, chat template), and served:
//! greedy "The capital of France is" -> " Paris"; a sequence's logprobs over
//! the whole vocab are bit-identical alone and in a mixed batch, for the
//! prefill and the decodes after it; and it stays close to the Q4_1 model.
//!
//! SmolLM2's hidden size (576) is not a multiple of the K-quant super-block
//! (256), so as in llama.cpp most tensors fall back to a legacy type; only
//! ffn_down (rows of 1536) ends up Q4_K or Q6_K. That is what a real
//! Q4_K_M of this model holds.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use worker::{
    CachedRequestData, LoadFormat, ModelRunner, ModelRunnerOutput, NewRequestData, ParallelConfig,
    SamplingParams, SchedulerOutput, WorkerConfig,
};

const BLOCK_SIZE: usize = 16;
/// llama.cpp's K-quant super-block: K-quant rows must be a multiple of it.
const QK_K: usize = 256;

/// llama.cpp's layer rule for the tensors Q4_K_M gives more bits to: the
/// first and last eighth of the layers and every third one in between.
fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2
}

/// The type llama.cpp's Q4_K_M recipe gives a quantized tensor (tied
/// embeddings count as the output tensor). A K-quant whose rows are not a
/// multiple of 256 falls back to the legacy type llama.cpp uses instead.
fn q4_k_m_type(name: &str, row_len: usize, n_layers: usize) -> GgmlDType {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, _)| l.parse::<usize>().ok());
    let wanted = match (name, layer) {
        ("token_embd.weight" | "output.weight", _) => GgmlDType::Q6K,
        (n, Some(l))
            if (n.ends_with(".attn_v.weight") || n.ends_with(".ffn_down.weight"))
                && use_more_bits(l, n_layers) =>
        {
            GgmlDType::Q6K
        }
        _ => GgmlDType::Q4K,
    };
    if row_len.is_multiple_of(QK_K) {
        return wanted;
    }
    match wanted {
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::Q5_0,
    }
}

/// Removes the temporary directory even when building the model panics.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the Q4_K_M version of the GGUF at `src` to `dst`; returns the
/// number of tensors of each type written.
fn write_q4_k_m(src: &Path, dst: &Path) -> BTreeMap<String, usize> {
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let n_layers = content.metadata["llama.block_count"].to_u32().unwrap() as usize;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors: Vec<(&str, QTensor)> = Vec::with_capacity(names.len());
    let mut counts = BTreeMap::new();
    for name in names {
        let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        let q = if q.shape().rank() < 2 {
            q // norms stay F32
        } else {
            let row_len = *q.shape().dims().last().unwrap();
            let dtype = q4_k_m_type(name, row_len, n_layers);
            let t = q.dequantize(&Device::Cpu).unwrap();
            QTensor::quantize(&t, dtype)
                .unwrap_or_else(|e| panic!("quantizing {name} to {dtype:?}: {e}"))
        };
        *counts.entry(format!("{:?}", q.dtype())).or_insert(0) += 1;
        tensors.push((name, q));
    }
    let mut metadata: Vec<(&str, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in metadata.iter_mut() {
        if *k == "general.file_type" {
            *v = gguf_file::Value::U32(15); // LLAMA_FTYPE_MOSTLY_Q4_K_M
        }
    }
    let meta_refs: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (*n, q)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(dst).unwrap());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    counts
}

fn load_runner(path: PathBuf) -> ModelRunner {
    ModelRunner::load(&WorkerConfig {
        device: worker::Device::Cpu,
        model: path,
        load_format: LoadFormat::Auto,
        dtype: "auto".into(),
        hf_overrides: serde_json::Value::Null,
        block_size: BLOCK_SIZE,
        parallel: ParallelConfig::default(),
        seed: 0,
        max_model_len: 2048,
        cpu_int8_activations: false,
        pooling: None,
    })
    .unwrap()
}

struct Fixture {
    original: PathBuf,
    /// GGUF token pieces, by id.
    tokens: Vec<String>,
    /// The Q4_K_M model; its file is gone once it is loaded.
    kquant: Mutex<ModelRunner>,
}

impl Fixture {
    fn id(&self, piece: &str) -> u32 {
        self.tokens
            .iter()
            .position(|t| t == piece)
            .unwrap_or_else(|| panic!("no token {piece:?}")) as u32
    }

    fn ids(&self, pieces: &[&str]) -> Vec<u32> {
        pieces.iter().map(|p| self.id(p)).collect()
    }

    /// The K-quant runner with an empty KV cache and no requests.
    fn runner(&self, num_blocks: usize) -> MutexGuard<'_, ModelRunner> {
        // A test that panicked while holding the runner leaves nothing behind
        // that a fresh KV cache does not reset.
        let mut r = self.kquant.lock().unwrap_or_else(|e| e.into_inner());
        r.initialize_kv_cache(num_blocks).unwrap();
        r
    }
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let original = fixtures::smollm2_gguf()?;
            let started = Instant::now();
            let dir = TempDir(std::env::temp_dir().join(format!(
                "flotilla-kquant-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            )));
            std::fs::create_dir_all(&dir.0).unwrap();
            let path = dir.0.join("SmolLM2-135M-Instruct.Q4_K_M.gguf");
            let counts = write_q4_k_m(&original, &path);
            eprintln!(
                "wrote {} ({:.1} MB) in {:.1}s, tensor types: {counts:?}",
                path.display(),
                std::fs::metadata(&path).unwrap().len() as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
            // 30 layers: ffn_down is Q6_K on 14 (use_more_bits), Q4_K on 16.
            assert_eq!(counts.get("Q6K"), Some(&14), "{counts:?}");
            assert_eq!(counts.get("Q4K"), Some(&16), "{counts:?}");

            let mut f = std::fs::File::open(&path).unwrap();
            let content = gguf_file::Content::read(&mut f).unwrap();
            let tokens: Vec<String> = content.metadata["tokenizer.ggml.tokens"]
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_string().unwrap().clone())
                .collect();
            assert!(content.metadata.contains_key("tokenizer.chat_template"));

            let loaded = Instant::now();
            let runner = load_runner(path);
            eprintln!(
                "loaded the Q4_K_M model in {:.1}s",
                loaded.elapsed().as_secs_f64()
            );
            assert_eq!(runner.model_config().vocab_size, tokens.len());
            drop(dir);
            Some(Fixture {
                original,
                tokens,
                kquant: Mutex::new(runner),
            })
        })
        .as_ref()
}

/// Logprobs over the whole vocab, indexed by token id.
fn dense_logprobs(out: &ModelRunnerOutput, i: usize, vocab: usize) -> Vec<f32> {
    let lps = out.logprobs[i].as_ref().expect("logprobs were asked for");
    assert_eq!(lps.top.len(), vocab);
    let mut v = vec![f32::NAN; vocab];
    for &(t, lp) in &lps.top {
        v[t as usize] = lp;
    }
    v
}

/// One sequence driven through steps: `chunk` prompt tokens a step until
/// the prompt is done, then one decode a step.
struct Seq {
    id: String,
    prompt: Vec<u32>,
    blocks: Vec<u32>,
    chunk: usize,
    /// Whole-vocab logprobs for the tokens it samples.
    full_logprobs: bool,
    computed: usize,
    known: usize,
    started: bool,
}

impl Seq {
    fn new(id: &str, prompt: Vec<u32>, first_block: u32, decodes: usize) -> Seq {
        let n_blocks = (prompt.len() + decodes).div_ceil(BLOCK_SIZE) as u32;
        Seq {
            id: id.into(),
            known: prompt.len(),
            chunk: prompt.len(),
            blocks: (first_block..first_block + n_blocks).collect(),
            prompt,
            full_logprobs: false,
            computed: 0,
            started: false,
        }
    }
}

/// Runs one step of all `seqs`; returns what each sampled, with its
/// whole-vocab logprobs where asked.
fn step(runner: &mut ModelRunner, seqs: &mut [Seq]) -> Vec<Option<(u32, Option<Vec<f32>>)>> {
    let vocab = runner.model_config().vocab_size;
    let mut s = SchedulerOutput::default();
    for q in seqs.iter() {
        let n = q.chunk.min(q.known - q.computed);
        if q.started {
            s.cached_requests.push(CachedRequestData {
                new_token_ids: Vec::new(),
                req_id: q.id.clone(),
                new_block_ids: vec![],
                num_computed_tokens: q.computed,
            });
        } else {
            s.new_requests.push(NewRequestData {
                req_id: q.id.clone(),
                prompt_token_ids: q.prompt.clone(),
                output_token_ids: vec![],
                sampling_params: SamplingParams {
                    logprobs: q.full_logprobs.then_some(vocab),
                    ..SamplingParams::greedy()
                },
                block_ids: q.blocks.clone(),
                num_computed_tokens: 0,
            });
        }
        s.num_scheduled_tokens.push((q.id.clone(), n));
    }
    let out = runner.execute_model(&s).unwrap();
    seqs.iter_mut()
        .enumerate()
        .map(|(i, q)| {
            assert_eq!(out.req_ids[i], q.id);
            q.computed += s.num_scheduled_tokens[i].1;
            q.started = true;
            let t = out.sampled_token_ids[i]?;
            q.known += 1;
            Some((t, q.full_logprobs.then(|| dense_logprobs(&out, i, vocab))))
        })
        .collect()
}

/// Deterministic token ids for the sequences batched around the probe.
fn filler(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[test]
fn q4_k_m_greedy_capital_of_france_is_paris() {
    let Some(fx) = fixture() else { return };
    let mut runner = fx.runner(8);
    let prompt = fx.ids(&["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
    let mut seqs = [Seq::new("paris", prompt, 0, 1)];
    let got = step(&mut runner, &mut seqs)[0].as_ref().unwrap().0;
    eprintln!("next token: {:?}", fx.tokens[got as usize]);
    assert_eq!(
        got,
        fx.id("ĠParis"),
        "greedy next token was {:?}",
        fx.tokens[got as usize]
    );
}

/// The probe's logprobs over the whole vocab, bit for bit, alone and in a
/// batch of 8 whose other sequences have other lengths, two of them
/// prefilling in chunks while the probe decodes.
#[test]
fn q4_k_m_logits_do_not_depend_on_the_batch() {
    const DECODES: usize = 3;
    let Some(fx) = fixture() else { return };
    let vocab = fx.tokens.len();
    let probe_prompt = fx.ids(&[
        "The",
        "Ġcapital",
        "Ġof",
        "ĠFrance",
        "Ġis",
        "ĠParis",
        ".",
        "ĠThe",
        "Ġcapital",
        "Ġof",
        "ĠGermany",
        "Ġis",
    ]);
    let probe = |first_block: u32| {
        let mut s = Seq::new("probe", probe_prompt.clone(), first_block, DECODES);
        s.full_logprobs = true;
        s
    };
    let mut runner = fx.runner(64);

    let started = Instant::now();
    let mut alone = [probe(0)];
    let mut want = Vec::new();
    for _ in 0..=DECODES {
        want.push(step(&mut runner, &mut alone).remove(0).unwrap());
    }
    let alone_s = started.elapsed().as_secs_f64();

    runner.initialize_kv_cache(64).unwrap();
    let mut seqs = Vec::new();
    let mut next_block = 0;
    for (i, &(len, chunk)) in [
        (3, 3),
        (9, 9),
        (17, 17),
        (40, 40),
        (57, 32),
        (1, 1),
        (71, 24),
    ]
    .iter()
    .enumerate()
    {
        if i == 3 {
            // The probe sits mid-batch, on other blocks than when alone.
            let p = probe(next_block);
            next_block += p.blocks.len() as u32;
            seqs.push(p);
        }
        let mut s = Seq::new(
            &format!("other-{i}"),
            filler(len, i as u64 + 1, vocab),
            next_block,
            DECODES + 3,
        );
        s.chunk = chunk;
        next_block += s.blocks.len() as u32;
        seqs.push(s);
    }
    let started = Instant::now();
    for (k, want) in want.iter().enumerate() {
        let rows: usize = seqs.iter().map(|q| q.chunk.min(q.known - q.computed)).sum();
        let got = step(&mut runner, &mut seqs).remove(3).unwrap();
        let (want_tok, want_lp) = (want.0, want.1.as_ref().unwrap());
        let (got_tok, got_lp) = (got.0, got.1.as_ref().unwrap());
        let differing = want_lp
            .iter()
            .zip(got_lp)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let max_diff = want_lp
            .iter()
            .zip(got_lp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "step {k} ({} for the probe, {rows} rows in the batch): token {:?}, {differing} of {vocab} logprobs differ (max {max_diff:e})",
            if k == 0 { "prefill" } else { "decode" },
            fx.tokens[got_tok as usize],
        );
        assert_eq!(got_tok, want_tok, "step {k}: sampled token");
        assert_eq!(
            differing, 0,
            "step {k}: {differing} logprobs differ from the probe's alone (max {max_diff:e})"
        );
    }
    eprintln!(
        "probe alone: {alone_s:.2}s for {} steps; batched: {:.2}s",
        DECODES + 1,
        started.elapsed().as_secs_f64()
    );
}

/// Greedy next token of several prompts matches the Q4_1 model's, and the
/// logprobs stay close.
#[test]
fn q4_k_m_is_close_to_the_q4_1_model() {
    let Some(fx) = fixture() else { return };
    let vocab = fx.tokens.len();
    let prompts: Vec<Vec<u32>> = [
        &["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"][..],
        &["One", ",", "Ġtwo", ",", "Ġthree", ",", "Ġfour", ","],
        &["The", "Ġopposite", "Ġof", "Ġhot", "Ġis"],
        &["Monday", ",", "ĠTuesday", ",", "ĠWednesday", ","],
        &["The", "Ġsun", "Ġrises", "Ġin", "Ġthe"],
    ]
    .iter()
    .map(|p| fx.ids(p))
    .collect();
    let run = |runner: &mut ModelRunner| {
        let mut first_block = 0;
        let mut seqs: Vec<Seq> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s = Seq::new(&format!("p{i}"), p.clone(), first_block, 1);
                s.full_logprobs = true;
                first_block += s.blocks.len() as u32;
                s
            })
            .collect();
        step(runner, &mut seqs)
            .into_iter()
            .map(|o| {
                let (t, lp) = o.unwrap();
                (t, lp.unwrap())
            })
            .collect::<Vec<_>>()
    };
    let kquant = run(&mut fx.runner(16));
    let mut original_runner = load_runner(fx.original.clone());
    original_runner.initialize_kv_cache(16).unwrap();
    let original = run(&mut original_runner);

    let (mut max_all, mut max_top) = (0f32, 0f32);
    for (i, ((tk, lk), (to, lo))) in kquant.iter().zip(&original).enumerate() {
        let diff_all = lk
            .iter()
            .zip(lo)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Over the Q4_1 model's 10 likeliest tokens, the ones that matter.
        let mut top: Vec<usize> = (0..vocab).collect();
        top.sort_by(|&a, &b| lo[b].total_cmp(&lo[a]));
        let diff_top = top[..10]
            .iter()
            .map(|&t| (lk[t] - lo[t]).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "prompt {i}: Q4_K_M {:?} ({:.3}), Q4_1 {:?} ({:.3}); max |dlogprob| top-10 {diff_top:.3}, whole vocab {diff_all:.3}",
            fx.tokens[*tk as usize],
            lk[*tk as usize],
            fx.tokens[*to as usize],
            lo[*to as usize],
        );
        max_all = max_all.max(diff_all);
        max_top = max_top.max(diff_top);
    }
    eprintln!("max |dlogprob| over all prompts: top-10 {max_top:.3}, whole vocab {max_all:.3}");
    for (i, ((tk, _), (to, _))) in kquant.iter().zip(&original).enumerate() {
        assert_eq!(
            tk, to,
            "prompt {i}: Q4_K_M chose {:?}, Q4_1 {:?}",
            fx.tokens[*tk as usize], fx.tokens[*to as usize]
        );
    }
}
