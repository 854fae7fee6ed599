//! `--load-format dummy` at SmolLM2-135M's real shapes (and a small BERT
//! encoder): loads, runs a step, and gives the same weights for the same seed.

use serde_json::json;
use worker::pooling::PoolingType;
use worker::{
    LoadFormat, ModelRunner, NewRequestData, ParallelConfig, SamplingParams, SchedulerOutput,
    WorkerConfig,
};

#[test]
fn dummy_weights_at_real_shapes_run_a_step() {
    let dir = std::env::temp_dir().join(format!("flotilla-dummy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = WorkerConfig {
        device: worker::Device::Cpu,
        model: dir.clone(),
        load_format: LoadFormat::Dummy,
        dtype: "float32".into(),
        hf_overrides: serde_json::Value::Null,
        block_size: 16,
        parallel: ParallelConfig::default(),
        seed: 3,
        max_model_len: 512,
        cpu_int8_activations: false,
        pooling: None,
    };
    let mut runner = ModelRunner::load(&cfg).unwrap();
    // 30 layers x (K + V) x 3 heads x 16 slots x 64 dims x 4 bytes.
    assert_eq!(runner.kv_cache_bytes_per_block(), 30 * 2 * 3 * 16 * 64 * 4);
    runner.initialize_kv_cache(4).unwrap();
    let step = |id: &str| SchedulerOutput {
        new_requests: vec![NewRequestData {
            req_id: id.into(),
            prompt_token_ids: vec![1, 100, 2000, 30000],
            output_token_ids: vec![],
            sampling_params: SamplingParams {
                logprobs: Some(1),
                ..SamplingParams::greedy()
            },
            block_ids: vec![0],
            num_computed_tokens: 0,
        }],
        num_scheduled_tokens: vec![(id.into(), 4)],
        ..Default::default()
    };
    let out = runner.execute_model(&step("a")).unwrap();
    let t = out.sampled_token_ids[0].unwrap();
    let lp = out.logprobs[0].as_ref().unwrap().logprob;
    assert!((t as usize) < 49152 && lp.is_finite() && lp <= 0.0);
    // Same seed, same weights, same answer.
    let mut again = ModelRunner::load(&cfg).unwrap();
    again.initialize_kv_cache(4).unwrap();
    let out2 = again.execute_model(&step("a")).unwrap();
    assert_eq!(out2.sampled_token_ids[0], Some(t));
    assert_eq!(out2.logprobs[0].as_ref().unwrap().logprob, lp);

    // Unknown architectures and dtypes are clear errors.
    let e = ModelRunner::load(&WorkerConfig {
        hf_overrides: json!({"architectures": ["GPT2LMHeadModel"]}),
        ..cfg.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("LlamaForCausalLM"),
        "{e}"
    );
    let e = ModelRunner::load(&WorkerConfig {
        dtype: "float8".into(),
        ..cfg.clone()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("float8") && e.contains("bfloat16"), "{e}");

    // 16-bit dtypes halve the KV cache and still run the step.
    let mut half = ModelRunner::load(&WorkerConfig {
        dtype: "float16".into(),
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(
        2 * half.kv_cache_bytes_per_block(),
        runner.kv_cache_bytes_per_block()
    );
    half.initialize_kv_cache(4).unwrap();
    assert!(half.execute_model(&step("a")).unwrap().sampled_token_ids[0].is_some());
    let e = ModelRunner::load(&WorkerConfig {
        parallel: ParallelConfig {
            tp_size: 2,
            ..Default::default()
        },
        ..cfg
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("tensor parallel size 2"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A BERT encoder with dummy weights (its word table reaches the backend
/// unmade, as a dummy matrix): loads, pools a finite vector, and pools the
/// same vector again from a second load with the same seed.
#[test]
fn dummy_bert_pools_the_same_vector_twice() {
    let dir = std::env::temp_dir().join(format!("flotilla-dummy-bert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = json!({
        "architectures": ["BertModel"], "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 128, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cfg = WorkerConfig {
        device: worker::Device::Cpu,
        model: dir.clone(),
        load_format: LoadFormat::Dummy,
        dtype: "float32".into(),
        hf_overrides: serde_json::Value::Null,
        block_size: 16,
        parallel: ParallelConfig::default(),
        seed: 5,
        max_model_len: 128,
        cpu_int8_activations: false,
        pooling: Some(PoolingType::Mean),
    };
    let step = SchedulerOutput {
        new_requests: vec![NewRequestData {
            req_id: "e".into(),
            prompt_token_ids: vec![1, 17, 400, 999],
            output_token_ids: vec![],
            sampling_params: SamplingParams::greedy(),
            block_ids: vec![0],
            num_computed_tokens: 0,
        }],
        num_scheduled_tokens: vec![("e".into(), 4)],
        ..Default::default()
    };
    let pooled = || {
        let mut r = ModelRunner::load(&cfg).unwrap();
        let out = r.execute_model(&step).unwrap();
        out.pooled[0].clone().expect("a pooled vector")
    };
    let v = pooled();
    assert_eq!(v.len(), 64);
    assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
    assert_eq!(pooled(), v);
    std::fs::remove_dir_all(&dir).ok();
}
