//! The model's tokenizer, loaded from an HF directory (tokenizer.json +
//! tokenizer_config.json) or rebuilt from GGUF metadata (`gguf`), plus the
//! special tokens and chat template that come with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

mod gguf;

pub use gguf::{byte_level_pre_tokenizer, sentencepiece_merges, SUPPORTED_PRES};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer path {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("no tokenizer in {path}: expected tokenizer.json (HF directory) or a .gguf file")]
    NoTokenizer { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot load tokenizer from {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot read GGUF metadata from {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("GGUF file {path} lacks metadata key `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("GGUF file {path}: metadata key `{key}` is invalid: {message}")]
    BadKey {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("GGUF file {path}: tokenizer model `{model}` (tokenizer.ggml.model) is not supported; supported: gpt2, llama")]
    UnsupportedModel { path: PathBuf, model: String },
    #[error("GGUF file {path}: pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported; supported: {}", SUPPORTED_PRES.join(", "))]
    UnsupportedPre { path: PathBuf, pre: String },
    #[error("tokenization failed: {message}")]
    Encode { message: String },
    #[error("detokenization failed: {message}")]
    Decode { message: String },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// How a vocabulary piece maps to the bytes it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceEncoding {
    /// GPT-2 byte-level BPE: every byte is remapped to a printable char.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xAB>` a raw byte.
    SentencePiece,
    /// Anything else: the piece's decoded text.
    Other,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: PieceEncoding,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    /// What `encode` does about BOS/EOS beyond the tokenizer's own
    /// post-processor (GGUF has none; HF configs may disagree with it).
    bos_policy: EdgeToken,
    eos_policy: EdgeToken,
    special_ids: HashSet<u32>,
    vocab_size: usize,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pieces", &self.pieces)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// `model`: an HF model dir (tokenizer.json + tokenizer_config.json) or a .gguf file
    /// (tokenizer from GGUF metadata). `tokenizer`: the --tokenizer override (dir, tokenizer.json, or .gguf).
    pub fn load(model: &Path, tokenizer: Option<&Path>) -> Result<Tokenizer> {
        let path = tokenizer.unwrap_or(model);
        if !path.exists() {
            return Err(TokenizerError::NotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Self::from_hf_json(&json);
            }
            if let Some(gguf) = gguf::single_gguf_in(path) {
                return Self::from_gguf(&gguf);
            }
            return Err(TokenizerError::NoTokenizer {
                path: path.to_path_buf(),
            });
        }
        if gguf::is_gguf(path) {
            return Self::from_gguf(path);
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Self::from_hf_json(path);
        }
        Err(TokenizerError::NoTokenizer {
            path: path.to_path_buf(),
        })
    }

    /// Loads tokenizer.json; tokenizer_config.json and chat_template.jinja are
    /// read from the same directory when present.
    pub fn from_hf_json(json: &Path) -> Result<Tokenizer> {
        let mut inner =
            tokenizers::Tokenizer::from_file(json).map_err(|e| TokenizerError::Load {
                path: json.to_path_buf(),
                message: e.to_string(),
            })?;
        // A tokenizer.json may carry the padding and truncation it was
        // saved with (all-MiniLM-L6-v2's pads and cuts at 128); transformers
        // applies neither unless a call asks, and neither does the server.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: json.to_path_buf(),
                message: e.to_string(),
            })?;
        let dir = json.parent().unwrap_or(Path::new("."));
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = read_to_string(&config_path)?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                    path: config_path.clone(),
                    source,
                })?;
            HfTokenizerConfig::from_json(&value)
        } else {
            HfTokenizerConfig::default()
        };
        // Newer transformers save the template beside the config.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(read_to_string(&jinja)?)
        } else {
            config.chat_template
        };
        let pieces = detect_piece_encoding(&inner);
        let resolve = |tok: Option<String>| {
            tok.and_then(|t| {
                let id = inner.token_to_id(&t)?;
                Some((t, id))
            })
        };
        let bos = resolve(config.bos_token);
        let eos = resolve(config.eos_token);
        // transformers rewrites the post-processor from add_bos_token /
        // add_eos_token; do the same by correcting its output.
        let (post_bos, post_eos) =
            match (inner.encode_fast("a", true), inner.encode_fast("a", false)) {
                (Ok(with), Ok(without)) if with.len() > without.len() => (
                    bos.as_ref()
                        .is_some_and(|(_, id)| with.get_ids().first() == Some(id)),
                    eos.as_ref()
                        .is_some_and(|(_, id)| with.get_ids().last() == Some(id)),
                ),
                _ => (false, false),
            };
        let bos_policy = EdgeToken::reconcile(config.add_bos_token, post_bos);
        let eos_policy = EdgeToken::reconcile(config.add_eos_token, post_eos);
        Ok(Self::finish(
            inner,
            pieces,
            bos,
            eos,
            bos_policy,
            eos_policy,
            chat_template,
        ))
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        pieces: PieceEncoding,
        bos: Option<(String, u32)>,
        eos: Option<(String, u32)>,
        bos_policy: EdgeToken,
        eos_policy: EdgeToken,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let vocab_size = inner.get_vocab_size(true);
        Tokenizer {
            inner,
            pieces,
            bos,
            eos,
            bos_policy,
            eos_policy,
            special_ids,
            vocab_size,
            chat_template,
        }
    }

    /// add_special_tokens: BOS etc. as the model's config says (add_bos_token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode {
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if let Some((_, bos)) = &self.bos {
                match self.bos_policy {
                    EdgeToken::Add => ids.insert(0, *bos),
                    EdgeToken::Strip if ids.first() == Some(bos) => {
                        ids.remove(0);
                    }
                    _ => {}
                }
            }
            if let Some((_, eos)) = &self.eos {
                match self.eos_policy {
                    EdgeToken::Add => ids.push(*eos),
                    EdgeToken::Strip if ids.last() == Some(eos) => {
                        ids.pop();
                    }
                    _ => {}
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                message: e.to_string(),
            })
    }

    /// As `decode`, with vLLM's `spaces_between_special_tokens`: kept special
    /// tokens are separated from the surrounding text by one space.
    pub fn decode_with(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
    ) -> Result<String> {
        if skip_special_tokens
            || !spaces_between_special_tokens
            || !ids.iter().any(|id| self.special_ids.contains(id))
        {
            return self.decode(ids, skip_special_tokens);
        }
        let mut parts: Vec<String> = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for &id in ids {
            if self.special_ids.contains(&id) {
                if !run.is_empty() {
                    parts.push(self.decode(&run, false)?);
                    run.clear();
                }
                parts.push(self.id_to_token(id).unwrap_or_default());
            } else {
                run.push(id);
            }
        }
        if !run.is_empty() {
            parts.push(self.decode(&run, false)?);
        }
        Ok(parts.join(" "))
    }

    /// Raw vocab piece, e.g. "ĠParis".
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes one token stands for (OpenAI logprobs `bytes`; byte-level pieces unmapped).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.id_to_token(id) else {
            return Vec::new();
        };
        if self.special_ids.contains(&id) {
            return piece.into_bytes();
        }
        match self.pieces {
            PieceEncoding::ByteLevel => byte_level_piece_bytes(&piece),
            PieceEncoding::SentencePiece => sentencepiece_piece_bytes(&piece),
            PieceEncoding::Other => self
                .decode(&[id], false)
                .map(String::into_bytes)
                .unwrap_or_else(|_| piece.into_bytes()),
        }
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids of every special (control) token.
    pub fn special_token_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.special_ids.iter().copied()
    }

    pub fn piece_encoding(&self) -> PieceEncoding {
        self.pieces
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(t, _)| t.as_str())
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(t, _)| t.as_str())
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(_, id)| *id)
    }

    /// The template from tokenizer_config.json `chat_template` (string, or the "default"
    /// entry of a list of named templates) or GGUF `tokenizer.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying HF tokenizer, for callers that need its full API.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// BOS/EOS handling on top of the tokenizer's post-processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EdgeToken {
    /// The post-processor already does what the config asks.
    AsIs,
    Add,
    /// The post-processor adds it but the config says not to.
    Strip,
}

impl EdgeToken {
    fn from_flag(add: bool) -> Self {
        if add {
            EdgeToken::Add
        } else {
            EdgeToken::AsIs
        }
    }

    fn reconcile(config: Option<bool>, post_processor_adds: bool) -> Self {
        match (config, post_processor_adds) {
            (Some(true), false) => EdgeToken::Add,
            (Some(false), true) => EdgeToken::Strip,
            _ => EdgeToken::AsIs,
        }
    }
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The parts of tokenizer_config.json the gateway uses.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HfTokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

impl HfTokenizerConfig {
    pub fn from_json(v: &serde_json::Value) -> Self {
        // Special tokens are either a string or an AddedToken dict.
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(named)) => {
                let template_of = |e: &serde_json::Value| {
                    e.get("template")
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                };
                named
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(template_of)
            }
            _ => None,
        };
        HfTokenizerConfig {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
            add_bos_token: v.get("add_bos_token").and_then(serde_json::Value::as_bool),
            add_eos_token: v.get("add_eos_token").and_then(serde_json::Value::as_bool),
        }
    }
}

fn detect_piece_encoding(tok: &tokenizers::Tokenizer) -> PieceEncoding {
    let decoder = tok
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .unwrap_or_default();
    if decoder.contains("\"ByteLevel\"") {
        PieceEncoding::ByteLevel
    } else if decoder.contains("\"ByteFallback\"") || decoder.contains("\"Metaspace\"") {
        PieceEncoding::SentencePiece
    } else {
        PieceEncoding::Other
    }
}

/// GPT-2's reversible byte <-> printable char table: printable Latin-1 bytes
/// map to themselves, the rest to U+0100 onwards in byte order.
pub fn byte_level_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("below surrogates");
            next += 1;
            c
        };
    }
    table
}

fn byte_level_piece_bytes(piece: &str) -> Vec<u8> {
    static REVERSE: std::sync::LazyLock<HashMap<char, u8>> = std::sync::LazyLock::new(|| {
        byte_level_table()
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect()
    });
    let mut out = Vec::with_capacity(piece.len());
    for c in piece.chars() {
        match REVERSE.get(&c) {
            Some(b) => out.push(*b),
            // Not a byte-level char (an added token): keep its UTF-8.
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

fn sentencepiece_piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(b) = parse_byte_piece(piece) {
        return vec![b];
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// `<0xAB>` -> 0xAB.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_a_bijection() {
        let t = byte_level_table();
        let set: HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], '\u{120}'); // Ġ
        assert_eq!(t[b'\n' as usize], '\u{10A}'); // Ċ
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(byte_level_piece_bytes("\u{120}Paris"), b" Paris");
    }

    #[test]
    fn sentencepiece_bytes() {
        assert_eq!(sentencepiece_piece_bytes("<0x0A>"), b"\n");
        assert_eq!(sentencepiece_piece_bytes("\u{2581}Paris"), b" Paris");
        assert_eq!(parse_byte_piece("<0xZZ>"), None);
    }

    #[test]
    fn config_tokens_as_string_or_dict_and_named_templates() {
        let v = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D"}
            ]
        });
        let c = HfTokenizerConfig::from_json(&v);
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.chat_template.as_deref(), Some("D"));
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let e = Tokenizer::load(Path::new("/nonexistent/model"), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/model"), "{e}");
    }
}
