//! SmolLM2-135M-Instruct from its real GGUF file: greedy next token after
//! "The capital of France is" is " Paris". Token ids come from the GGUF token
//! list (byte-level BPE pieces), so no tokenizer is involved.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use candle_core::quantized::gguf_file;
use worker::{
    LoadFormat, ModelRunner, NewRequestData, ParallelConfig, SamplingParams, SchedulerOutput,
    WorkerConfig,
};

#[test]
fn greedy_capital_of_france_is_paris() {
    let Some(path) = fixtures::smollm2_gguf() else {
        return;
    };
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let tokens: Vec<String> = content.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    let id = |piece: &str| {
        tokens
            .iter()
            .position(|t| t == piece)
            .unwrap_or_else(|| panic!("no token {piece}")) as u32
    };
    let prompt: Vec<u32> = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
        .iter()
        .map(|p| id(p))
        .collect();

    // bf16/f16 round activations and KV (weights stay Q8_0/Q4_1): the
    // answer must not change.
    for dtype in ["auto", "bfloat16", "float16"] {
        let mut runner = ModelRunner::load(&WorkerConfig {
            device: worker::Device::Cpu,
            model: path.clone(),
            load_format: LoadFormat::Auto,
            dtype: dtype.into(),
            hf_overrides: serde_json::Value::Null,
            block_size: 16,
            parallel: ParallelConfig::default(),
            seed: 0,
            max_model_len: 2048,
            cpu_int8_activations: false,
            pooling: None,
        })
        .unwrap();
        let cfg = runner.model_config();
        assert_eq!(
            (
                cfg.architecture.as_str(),
                cfg.hidden_size,
                cfg.num_hidden_layers
            ),
            ("LlamaForCausalLM", 576, 30)
        );
        assert_eq!(cfg.vocab_size, tokens.len());
        runner.initialize_kv_cache(8).unwrap();
        let out = runner
            .execute_model(&SchedulerOutput {
                new_requests: vec![NewRequestData {
                    req_id: "paris".into(),
                    prompt_token_ids: prompt.clone(),
                    output_token_ids: vec![],
                    sampling_params: SamplingParams {
                        logprobs: Some(3),
                        ..SamplingParams::greedy()
                    },
                    block_ids: vec![0],
                    num_computed_tokens: 0,
                }],
                num_scheduled_tokens: vec![("paris".into(), prompt.len())],
                ..Default::default()
            })
            .unwrap();
        let got = out.sampled_token_ids[0].unwrap();
        let top: Vec<(&str, f32)> = out.logprobs[0]
            .as_ref()
            .unwrap()
            .top
            .iter()
            .map(|(t, lp)| (tokens[*t as usize].as_str(), *lp))
            .collect();
        eprintln!(
            "{dtype}: next token: {:?}, top: {top:?}",
            tokens[got as usize]
        );
        assert_eq!(
            got,
            id("ĠParis"),
            "{dtype}: greedy next token was {:?}",
            tokens[got as usize]
        );
    }
}
