//! SmolLM2-135M-Instruct as a real HF model directory (bf16 safetensors in
//! two shards, config.json, transformers-written tokenizer files), built from
//! the GGUF by scripts/make-hf-smollm2.py, checked end to end and against the
//! GGUF itself: generation, chat template, tokenizer ids and logprobs.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use gateway::chat_template::{ChatTemplate, ContentFormat, RenderOptions};
use gateway::engine::EngineArgs;
use gateway::llm::{ChatOptions, Completion, LLM};
use gateway::tokenizer::Tokenizer;
use serde_json::json;
use worker::sampling_params::MAX_LOGPROBS;
use worker::SamplingParams;

const PROMPT: &str = "The capital of France is";

struct Fixture {
    hf: PathBuf,
    gguf: PathBuf,
}

/// Both models, or `None` after a loud SKIP (a failure under CI=true).
fn fixture() -> Option<Fixture> {
    let hf = fixtures::fixture_path("smollm2-hf");
    // The script writes its stamp last and renames the directory into place.
    let found = (hf.join(".flotilla-fixture.json").is_file())
        .then_some(hf)
        .zip(fixtures::find_smollm2_gguf())
        .map(|(hf, gguf)| Fixture { hf, gguf });
    fixtures::require(
        found,
        "SmolLM2 HF fixture or its GGUF",
        "run scripts/setup.sh (it runs scripts/make-hf-smollm2.py)",
    )
}

fn engine_args(dtype: &str) -> EngineArgs {
    EngineArgs {
        dtype: dtype.into(),
        max_model_len: Some(512),
        // 1024 tokens of KV: plenty for these prompts, small in memory.
        num_gpu_blocks_override: Some(64),
        ..Default::default()
    }
}

/// The HF directory in float32, loaded once for the tests that generate.
fn hf_llm(f: &Fixture) -> MutexGuard<'static, LLM> {
    static LLM_F32: OnceLock<Mutex<LLM>> = OnceLock::new();
    LLM_F32
        .get_or_init(|| {
            Mutex::new(LLM::new(&f.hf, engine_args("float32")).expect("load the HF directory"))
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

#[test]
fn hf_dir_loads_and_continues_with_paris() {
    let Some(f) = fixture() else { return };
    let llm = hf_llm(&f);
    assert_eq!(llm.max_model_len(), 512);
    let out = llm
        .generate(vec![PROMPT.into()], &greedy(8))
        .expect("generate");
    let text = &out[0].outputs[0].text;
    eprintln!("HF dir, float32: {PROMPT:?} -> {text:?}");
    assert!(
        text.starts_with(" Paris"),
        "expected \" Paris\" first, got {text:?}"
    );
}

#[test]
fn hf_dir_chat_answers_paris() {
    let Some(f) = fixture() else { return };
    let llm = hf_llm(&f);
    let conversation = vec![json!({"role": "user", "content": "What is the capital of France?"})];
    let out = llm
        .chat(vec![conversation], &greedy(32), &ChatOptions::default())
        .expect("chat");
    let prompt = out[0].prompt.as_deref().unwrap();
    assert!(
        prompt.ends_with("<|im_start|>assistant\n"),
        "prompt {prompt:?}"
    );
    let text = &out[0].outputs[0].text;
    eprintln!("HF dir chat, float32: {text:?}");
    assert!(text.contains("Paris"), "expected Paris in {text:?}");
}

fn tokenizers(f: &Fixture) -> (Tokenizer, Tokenizer) {
    let hf = Tokenizer::load(&f.hf, None).expect("HF tokenizer.json");
    let gguf = Tokenizer::load(&f.gguf, None).expect("GGUF tokenizer");
    (hf, gguf)
}

#[test]
fn chat_template_renders_as_the_gguf_one() {
    let Some(f) = fixture() else { return };
    let (hf_tok, gguf_tok) = tokenizers(&f);
    let hf = ChatTemplate::resolve(None, &hf_tok)
        .unwrap()
        .expect("tokenizer_config.json has a chat template");
    let gguf = ChatTemplate::resolve(None, &gguf_tok)
        .unwrap()
        .expect("GGUF has a chat template");
    let conversations = [
        (
            vec![
                json!({"role": "system", "content": "You are a geography tutor."}),
                json!({"role": "user", "content": "What is the capital of France?"}),
            ],
            true,
        ),
        (
            vec![
                json!({"role": "user", "content": "Hi!"}),
                json!({"role": "assistant", "content": "Hello! How can I help?"}),
            ],
            false,
        ),
    ];
    let mut rendered = Vec::new();
    for (messages, add_generation_prompt) in conversations {
        let opts = RenderOptions {
            add_generation_prompt,
            ..Default::default()
        };
        let a = hf.render(&messages, ContentFormat::String, &opts).unwrap();
        let b = gguf
            .render(&messages, ContentFormat::String, &opts)
            .unwrap();
        assert_eq!(a, b, "HF and GGUF templates differ on {messages:?}");
        assert_eq!(
            hf_tok.encode(&a, false).unwrap(),
            gguf_tok.encode(&b, false).unwrap()
        );
        rendered.push(a);
    }
    assert_eq!(
        rendered[0],
        "<|im_start|>system\nYou are a geography tutor.<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system message SmolLM2's template writes its own.
    assert!(
        rendered[1].starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{:?}",
        rendered[1]
    );
}

const TEXTS: &[&str] = &[
    "",
    " ",
    "The capital of France is",
    "Hello, world! It's a test; we'll see, they're sure, I'd say.",
    "year 2024, 3.14159, -42, 1e10, 0x1F, 1,000,000.00",
    "phone: +1 (555) 123-4567 v1.2.3-rc4",
    "Arabic-Indic ٣٤٥, fullwidth ２０２４, roman ⅷ, superscript x²",
    "emoji: 😀🎉👍🏽 and 🇫🇷 flag, family 👨‍👩‍👧",
    "中文测试：你好，世界。日本語のテキスト",
    "한국어 문장, русский текст, ελληνικά, עברית, हिन्दी",
    "Ünïcödé ñ café naïve; combining: e\u{301} a\u{308}",
    "zero\u{200b}width and non\u{a0}breaking",
    "tabs\tand\n\nnewlines   multiple    spaces \n\t  end  ",
    "  leading spaces and trailing  ",
    "\r\nwindows\r\nline endings\r\n",
    "                                        ",
    "\n\n\n\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com, @mention, #hashtag",
    "I'M SHOUTING. i'm whispering. He'LL go.",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::---___***",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more text<|endoftext|>",
    "<repo_name>flotilla<file_sep>main.rs<filename>x<gh_stars>10",
    "<|im_start|system (not quite special) <|im_end",
    "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "Ça va? Déjà vu. Straße. İstanbul. ǅ",
    "mixed123numbers456and789letters",
    "\u{fffd} replacement and \u{7f} delete and \u{1} control",
];

#[test]
fn tokenizer_json_matches_gguf_tokenizer() {
    let Some(f) = fixture() else { return };
    let (hf, gguf) = tokenizers(&f);
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    for id in 0..gguf.vocab_size() as u32 {
        assert_eq!(hf.id_to_token(id), gguf.id_to_token(id), "token {id}");
        assert_eq!(hf.is_special(id), gguf.is_special(id), "token {id}");
    }
    assert_eq!(hf.bos_token(), gguf.bos_token());
    assert_eq!(hf.eos_token(), gguf.eos_token());
    assert_eq!(hf.eos_token_id(), gguf.eos_token_id());
    let mut total = 0;
    for text in TEXTS {
        for add_special in [false, true] {
            let a = hf.encode(text, add_special).unwrap();
            let b = gguf.encode(text, add_special).unwrap();
            assert_eq!(
                a, b,
                "{text:?} (add_special_tokens={add_special}): HF {a:?} vs GGUF {b:?}"
            );
            total += a.len();
        }
        let ids = gguf.encode(text, false).unwrap();
        for skip in [false, true] {
            assert_eq!(
                hf.decode(&ids, skip).unwrap(),
                gguf.decode(&ids, skip).unwrap(),
                "decode {text:?} skip_special_tokens={skip}"
            );
        }
        assert_eq!(hf.decode(&ids, false).unwrap(), *text, "round trip");
    }
    eprintln!(
        "tokenizer parity: {} texts, {total} ids identical",
        TEXTS.len()
    );
}

/// The top-20 next-token logprobs (vLLM's cap on logprobs per request) at
/// each prompt position and at the first generated token.
fn top_logprobs(llm: &LLM, prompt: &str) -> (Completion, Vec<Vec<(u32, f32)>>) {
    let params = SamplingParams {
        logprobs: Some(MAX_LOGPROBS),
        prompt_logprobs: Some(MAX_LOGPROBS),
        ..greedy(1)
    };
    let out = llm
        .generate(vec![prompt.into()], &params)
        .expect("generate")
        .remove(0);
    // Prompt logprobs at position i score token i given tokens before it;
    // the first position has none.
    let mut rows: Vec<Vec<(u32, f32)>> = out
        .prompt_logprobs
        .as_ref()
        .expect("prompt logprobs")
        .iter()
        .flatten()
        .map(|l| l.top.clone())
        .collect();
    rows.push(out.outputs[0].logprobs.as_ref().unwrap()[0].top.clone());
    for row in &rows {
        assert_eq!(row.len(), MAX_LOGPROBS);
    }
    (out, rows)
}

/// Logprob gap between the two most likely tokens.
fn margin(row: &[(u32, f32)]) -> f32 {
    row[0].1 - row[1].1
}

/// The GGUF on its default (exact) path: the README's chat question gets the
/// answer HF transformers gives on the same weights in f32. This prompt's
/// first token is a near-tie ("The" -1.883 vs "L" -1.965 in HF f32), which
/// the int8-activation path flips.
#[test]
fn gguf_chat_answers_as_hf_does() {
    let Some(f) = fixture() else { return };
    let gguf = LLM::new(&f.gguf, engine_args("auto")).expect("load the GGUF");
    let conversation = vec![json!({"role": "user", "content": "What is the capital of France?"})];
    let out = gguf
        .chat(vec![conversation], &greedy(32), &ChatOptions::default())
        .expect("chat");
    let text = &out[0].outputs[0].text;
    eprintln!("GGUF chat, auto dtype: {text:?}");
    assert_eq!(text, "The capital of France is Paris.");
}

/// The HF directory's bf16 weights in float32 against the GGUF they came
/// from: the same next token, and logprobs that differ only by rounding.
///
/// By default the GGUF path computes with the exact dequantized Q4_1 values
/// and f32 activations, so the gap is the HF directory's rounding of those
/// values to bf16 (8 mantissa bits). Measured over 56 positions (top-1
/// agrees at all 56): at most 0.051 nats on tokens above -3 nats, 0.118
/// anywhere in the shared top 20; the tolerances leave ~3x.
///
/// The HF path in float32 matched an independent float64 numpy forward of
/// the bf16 weights to 3e-4 nats. A wrong weight layout (q/k rows left in
/// llama.cpp's order, a transposed matrix) moves logprobs by nats.
#[test]
fn logprobs_agree_with_gguf() {
    logprobs_agree(false, 0.15, 0.35);
}

/// `--cpu-int8-activations` (llama.cpp's numerics: Q4_1 requantized to Q8_0,
/// activations quantized to 8 bits per 32 values) adds its own rounding:
/// measured at most 0.44 nats above -3 nats, 0.87 anywhere in the shared
/// top 20; the tolerances leave ~1.7x.
#[test]
fn logprobs_agree_with_gguf_int8_activations() {
    logprobs_agree(true, 0.75, 1.5);
}

fn logprobs_agree(int8_activations: bool, tol_likely: f32, tol_top20: f32) {
    const LIKELY: f32 = -3.0;
    let Some(f) = fixture() else { return };
    let prompts = [
        PROMPT,
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    ];
    let hf_rows: Vec<_> = {
        let llm = hf_llm(&f);
        prompts.iter().map(|p| top_logprobs(&llm, p)).collect()
    };
    let args = EngineArgs {
        cpu_int8_activations: int8_activations,
        ..engine_args("auto")
    };
    let gguf = LLM::new(&f.gguf, args).expect("load the GGUF");
    let (mut worst_likely, mut worst, mut sum, mut compared) = (0f32, 0f32, 0f64, 0usize);
    let (mut positions, mut top1_same) = (0, 0);
    for (prompt, (hf_out, hf_rows)) in prompts.iter().zip(&hf_rows) {
        let (g_out, g_rows) = top_logprobs(&gguf, prompt);
        assert_eq!(hf_out.prompt_token_ids, g_out.prompt_token_ids);
        assert_eq!(hf_rows.len(), g_rows.len());
        for (pos, (h, g)) in hf_rows.iter().zip(&g_rows).enumerate() {
            positions += 1;
            top1_same += usize::from(h[0].0 == g[0].0);
            // Within tol_likely per logprob, only a near-tie can flip.
            assert!(
                h[0].0 == g[0].0 || margin(h).min(margin(g)) < 2.0 * tol_likely,
                "{prompt:?} position {pos}: top-1 HF {:?} vs GGUF {:?}",
                h[0],
                g[0]
            );
            let hf_of: std::collections::HashMap<u32, f32> = h.iter().copied().collect();
            for (rank, &(id, lg)) in g.iter().enumerate() {
                let Some(&lh) = hf_of.get(&id) else {
                    // Only the tail of one top 20 may fall out of the other's.
                    assert!(
                        lg < LIKELY,
                        "{prompt:?} position {pos}: GGUF's #{} token {id} ({lg}) is not in HF's top 20",
                        rank + 1
                    );
                    continue;
                };
                let d = (lh - lg).abs();
                let tol = if lg > LIKELY { tol_likely } else { tol_top20 };
                assert!(
                    d <= tol,
                    "{prompt:?} position {pos}: token {id} logprob HF {lh} vs GGUF {lg}"
                );
                if lg > LIKELY {
                    worst_likely = worst_likely.max(d);
                }
                worst = worst.max(d);
                sum += d as f64;
                compared += 1;
            }
        }
    }
    eprintln!(
        "HF f32 vs GGUF (int8 activations: {int8_activations}): {positions} positions, top-1 agrees at {top1_same}; {compared} shared \
         top-20 logprobs: max |diff| {worst_likely:.4} above {LIKELY} nats, {worst:.4} overall, \
         mean {:.4}",
        sum / compared as f64
    );
    // The greedy continuation the other tests rely on is not a near-tie.
    let first = &hf_rows[0];
    let (g_first, _) = top_logprobs(&gguf, PROMPT);
    assert_eq!(first.0.outputs[0].token_ids, g_first.outputs[0].token_ids);
    assert_eq!(first.0.outputs[0].text, " Paris");
}

/// `--dtype auto` on a bf16 checkpoint computes in bf16 (weights, KV and
/// every activation rounded to bf16), as vLLM does: it still answers, and its
/// logprobs stay within bf16 rounding of the float32 run of the same weights.
#[test]
fn auto_dtype_runs_the_bf16_checkpoint_in_bf16() {
    const TOL: f32 = 0.5;
    let Some(f) = fixture() else { return };
    let bf16 = LLM::new(&f.hf, engine_args("auto")).expect("load the HF directory in bf16");
    let out = bf16
        .generate(vec![PROMPT.into()], &greedy(8))
        .expect("generate");
    let text = &out[0].outputs[0].text;
    eprintln!("HF dir, bfloat16: {PROMPT:?} -> {text:?}");
    assert!(text.starts_with(" Paris"), "got {text:?}");
    let conversation = vec![json!({"role": "user", "content": "What is the capital of France?"})];
    let chat = bf16
        .chat(vec![conversation], &greedy(32), &ChatOptions::default())
        .expect("chat");
    assert!(
        chat[0].outputs[0].text.contains("Paris"),
        "{:?}",
        chat[0].outputs[0].text
    );

    let prompts = [
        PROMPT,
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ];
    let (mut worst, mut differs) = (0f32, false);
    for prompt in prompts {
        let (_, b_rows) = top_logprobs(&bf16, prompt);
        let (_, f_rows) = {
            let llm = hf_llm(&f);
            top_logprobs(&llm, prompt)
        };
        for (pos, (b, h)) in b_rows.iter().zip(&f_rows).enumerate() {
            assert!(
                b[0].0 == h[0].0 || margin(h) < 2.0 * TOL,
                "{prompt:?} position {pos}: top-1 bf16 {:?} vs f32 {:?}",
                b[0],
                h[0]
            );
            let f32_of: std::collections::HashMap<u32, f32> = h.iter().copied().collect();
            for &(id, lb) in b.iter().filter(|(_, lb)| *lb > -3.0) {
                if let Some(&lf) = f32_of.get(&id) {
                    let d = (lb - lf).abs();
                    differs |= d > 0.0;
                    worst = worst.max(d);
                    assert!(
                        d <= TOL,
                        "{prompt:?} position {pos}: token {id}: bf16 {lb} vs f32 {lf}"
                    );
                }
            }
        }
    }
    eprintln!("HF dir bf16 vs f32: max |logprob diff| {worst:.4} on tokens above -3 nats");
    assert!(
        differs,
        "auto must not have run the bf16 checkpoint in float32"
    );
}
