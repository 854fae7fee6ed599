//! A SentencePiece ("llama") GGUF tokenizer built here with a hand-made
//! vocabulary: scores as merge priority, byte fallback, the ▁ metaspace and
//! leading spaces in incremental detokenization; then the same tokenizer as
//! an HF directory (tokenizer.json + tokenizer_config.json).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use gateway::detokenizer::IncrementalDetokenizer;
use gateway::tokenizer::{PieceEncoding, Tokenizer, TokenizerError};

/// Scored pieces: merges happen in order of the merged piece's score.
const PIECES: &[(&str, f32)] = &[
    ("\u{2581}", -1.0),
    ("H", -10.0),
    ("e", -10.0),
    ("l", -10.0),
    ("o", -10.0),
    ("w", -10.0),
    ("r", -10.0),
    ("d", -10.0),
    ("ll", -2.0),
    ("llo", -3.0),
    ("\u{2581}H", -4.0),
    ("\u{2581}He", -5.0),
    ("\u{2581}Hello", -6.0),
    ("or", -7.0),
    ("\u{2581}w", -8.0),
    ("\u{2581}wor", -9.0),
    ("ld", -9.5),
    ("\u{2581}world", -9.8),
];

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("flotilla-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn write_gguf(path: &Path, model: &str, pre: Option<&str>) {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    let mut scores = vec![0f32, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (p, s) in PIECES {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(*s);
    }
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String(model.into()),
        ),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}".into(),
            ),
        ),
    ];
    if let Some(pre) = pre {
        meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        meta.push(("tokenizer.ggml.merges".into(), strs(&["l l".to_string()])));
    }
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[]).unwrap();
}

fn pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect()
}

#[test]
fn gguf_sentencepiece_encodes_by_score_with_bos() {
    let dir = TempDir::new("spm");
    let path = dir.0.join("tiny.gguf");
    write_gguf(&path, "llama", None);
    let tok = Tokenizer::load(&path, None).unwrap();
    assert_eq!(tok.piece_encoding(), PieceEncoding::SentencePiece);
    assert_eq!(tok.bos_token(), Some("<s>"));
    assert_eq!(tok.eos_token_id(), Some(2));
    let ids = tok.encode("Hello world", true).unwrap();
    assert_eq!(pieces(&tok, &ids), ["<s>", "▁Hello", "▁world"]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<s> Hello world");
    assert!(tok.is_special(1) && !tok.is_special(ids[1]));
    assert_eq!(tok.token_bytes(ids[2]), b" world");
}

#[test]
fn gguf_sentencepiece_byte_fallback() {
    let dir = TempDir::new("spm-bytes");
    let path = dir.0.join("tiny.gguf");
    write_gguf(&path, "llama", None);
    let tok = Arc::new(Tokenizer::load(&path, None).unwrap());
    let ids = tok.encode("Hé", false).unwrap();
    assert_eq!(pieces(&tok, &ids), ["▁H", "<0xC3>", "<0xA9>"]);
    assert_eq!(tok.token_bytes(ids[1]), [0xC3]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hé");

    let mut d = IncrementalDetokenizer::new(tok.clone(), &[], &Default::default());
    assert_eq!(d.push(ids[0]).text, "H");
    assert_eq!(d.push(ids[1]).text, "", "half a character is held");
    assert_eq!(d.push(ids[2]).text, "é");
}

#[test]
fn sentencepiece_leading_spaces_in_incremental_decoding() {
    let dir = TempDir::new("spm-detok");
    let path = dir.0.join("tiny.gguf");
    write_gguf(&path, "llama", None);
    let tok = Arc::new(Tokenizer::load(&path, None).unwrap());
    let hello = tok.encode("Hello", true).unwrap();
    let world = tok.token_to_id("▁world").unwrap();
    // After a prompt the output's first word keeps its space...
    let mut d = IncrementalDetokenizer::new(tok.clone(), &hello, &Default::default());
    assert_eq!(d.push(world).text, " world");
    // ...and with no prompt text it is stripped, as a full decode does.
    let mut d = IncrementalDetokenizer::new(tok.clone(), &[], &Default::default());
    let hello_id = tok.token_to_id("▁Hello").unwrap();
    assert_eq!(d.push(hello_id).text, "Hello");
    assert_eq!(d.push(world).text, " world");
    assert_eq!(d.output_text(), "Hello world");
}

#[test]
fn hf_directory_with_config() {
    let dir = TempDir::new("hf-dir");
    let gguf = dir.0.join("tiny.gguf");
    write_gguf(&gguf, "llama", None);
    let from_gguf = Tokenizer::load(&gguf, None).unwrap();
    let hf = dir.0.join("model");
    std::fs::create_dir_all(&hf).unwrap();
    from_gguf
        .inner()
        .save(hf.join("tokenizer.json"), false)
        .unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": [
            {"name": "rag", "template": "RAG"},
            {"name": "default", "template": "{{ messages | length }}"}
        ]
    });
    std::fs::write(hf.join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::load(&hf, None).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token(), Some("</s>"));
    assert_eq!(tok.chat_template(), Some("{{ messages | length }}"));
    let ids = tok.encode("Hello world", false).unwrap();
    assert_eq!(pieces(&tok, &ids), ["▁Hello", "▁world"]);
    assert_eq!(tok.piece_encoding(), PieceEncoding::SentencePiece);
    // tokenizer.json has no post-processor; add_bos_token asks for BOS.
    let with_bos = tok.encode("Hello world", true).unwrap();
    assert_eq!(pieces(&tok, &with_bos), ["<s>", "▁Hello", "▁world"]);

    // A post-processor that adds BOS, overruled by add_bos_token: false.
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer.json")).unwrap()).unwrap();
    json["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    });
    let hf2 = dir.0.join("model2");
    std::fs::create_dir_all(&hf2).unwrap();
    std::fs::write(hf2.join("tokenizer.json"), json.to_string()).unwrap();
    let no_bos = serde_json::json!({"bos_token": "<s>", "add_bos_token": false});
    std::fs::write(hf2.join("tokenizer_config.json"), no_bos.to_string()).unwrap();
    let tok2 = Tokenizer::load(&hf2, None).unwrap();
    assert_eq!(
        pieces(&tok2, &tok2.encode("Hello world", true).unwrap()),
        ["▁Hello", "▁world"]
    );
    std::fs::write(hf2.join("tokenizer_config.json"), r#"{"bos_token": "<s>"}"#).unwrap();
    let tok3 = Tokenizer::load(&hf2, None).unwrap();
    assert_eq!(
        pieces(&tok3, &tok3.encode("Hello world", true).unwrap()),
        ["<s>", "▁Hello", "▁world"]
    );
    // --tokenizer pointing at the tokenizer.json overrides the model path.
    let over =
        Tokenizer::load(Path::new("/nonexistent"), Some(&hf.join("tokenizer.json"))).unwrap();
    assert_eq!(over.vocab_size(), tok.vocab_size());
}

#[test]
fn unknown_models_and_pre_tokenizers_are_named_in_errors() {
    let dir = TempDir::new("bad-gguf");
    let path = dir.0.join("bad.gguf");
    write_gguf(&path, "bert", None);
    let e = Tokenizer::load(&path, None).unwrap_err();
    assert!(matches!(e, TokenizerError::UnsupportedModel { .. }), "{e}");
    assert!(e.to_string().contains("bert"));
    write_gguf(&path, "gpt2", Some("martian"));
    let e = Tokenizer::load(&path, None).unwrap_err();
    assert!(e.to_string().contains("martian"), "{e}");
    std::fs::write(&path, b"GGUF garbage").unwrap();
    let e = Tokenizer::load(&path, None).unwrap_err();
    assert!(e.to_string().contains("bad.gguf"), "{e}");
}
