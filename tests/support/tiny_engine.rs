//! The engine tests' tiny model: a random-weight Llama with SmolLM2's
//! vocabulary (`--load-format dummy`, SmolLM2's GGUF as tokenizer), small
//! enough to run whole batches on the CPU in a test. Gateway test crates
//! include it with `#[path]`, beside `fixtures.rs`.
#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

use gateway::engine::EngineArgs;

/// A directory holding the tiny model's config.json, removed on drop.
pub struct TinyModel(pub PathBuf);

impl TinyModel {
    /// `name` keeps the directories of one test binary apart.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("flotilla-tiny-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32"
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        Self(dir)
    }
}

impl Drop for TinyModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Engine arguments for the tiny model: dummy weights in float32, the
/// tokenizer from `tokenizer`, and a fixed KV cache of `num_gpu_blocks`.
pub fn engine_args(tokenizer: &Path, max_model_len: usize, num_gpu_blocks: usize) -> EngineArgs {
    EngineArgs {
        tokenizer: Some(tokenizer.to_path_buf()),
        load_format: "dummy".into(),
        dtype: "float32".into(),
        max_model_len: Some(max_model_len),
        num_gpu_blocks_override: Some(num_gpu_blocks),
        ..Default::default()
    }
}
