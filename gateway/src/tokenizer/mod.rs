//! The model's tokenizer, loaded from an HF directory (tokenizer.json +
//! tokenizer_config.json) or rebuilt from GGUF metadata, plus the special
//! tokens and chat template that come with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

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
            if let Some(gguf) = single_gguf_in(path) {
                return Self::from_gguf(&gguf);
            }
            return Err(TokenizerError::NoTokenizer {
                path: path.to_path_buf(),
            });
        }
        if is_gguf(path) {
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

    /// Rebuilds the tokenizer that llama.cpp would use from GGUF metadata.
    pub fn from_gguf(path: &Path) -> Result<Tokenizer> {
        let file = std::fs::File::open(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // Metadata is ~100k small strings: buffer the reads.
        let mut file = std::io::BufReader::with_capacity(1 << 20, file);
        let content = gguf_file::Content::read(&mut file).map_err(|e| TokenizerError::Gguf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let meta = GgufMeta {
            path,
            map: &content.metadata,
        };
        let model = meta.string("tokenizer.ggml.model")?;
        let tokens = meta.string_array("tokenizer.ggml.tokens")?;
        let token_types = meta.opt_i32_array("tokenizer.ggml.token_type")?;
        let pre = meta
            .opt_string("tokenizer.ggml.pre")?
            .unwrap_or_else(|| "default".to_string());
        let built = match model.as_str() {
            "gpt2" => {
                let merges = meta.string_array("tokenizer.ggml.merges")?;
                build_byte_level_bpe(path, &tokens, &merges, &pre)?
            }
            "llama" => {
                let scores = meta.opt_f32_array("tokenizer.ggml.scores")?;
                let unk = meta.opt_u32("tokenizer.ggml.unknown_token_id")?;
                let add_space_prefix = meta
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                build_sentencepiece_bpe(
                    path,
                    &tokens,
                    scores.as_deref(),
                    token_types.as_deref(),
                    unk,
                    add_space_prefix,
                )?
            }
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    path: path.to_path_buf(),
                    model: other.to_string(),
                })
            }
        };
        let (mut inner, pieces) = built;
        // Control and user-defined tokens must never be split by the model.
        let mut added = Vec::new();
        if let Some(types) = &token_types {
            for (i, ty) in types.iter().enumerate() {
                let Some(tok) = tokens.get(i) else { break };
                match GgufTokenType::from_i32(*ty) {
                    GgufTokenType::Control | GgufTokenType::Unknown => {
                        added.push(AddedToken::from(tok.clone(), true));
                    }
                    GgufTokenType::UserDefined => {
                        added.push(AddedToken::from(tok.clone(), false).normalized(false));
                    }
                    _ => {}
                }
            }
        }
        let (specials, normals): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        let add_err = |e: tokenizers::Error| TokenizerError::Load {
            path: path.to_path_buf(),
            message: format!("adding control tokens: {e}"),
        };
        inner.add_special_tokens(specials).map_err(add_err)?;
        inner.add_tokens(normals).map_err(add_err)?;

        let token_at = |key: &str| -> Result<Option<(String, u32)>> {
            Ok(meta
                .opt_u32(key)?
                .and_then(|id| tokens.get(id as usize).map(|t| (t.clone(), id))))
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        // llama.cpp's defaults: SentencePiece and Llama 3's BPE add BOS, other
        // byte-level BPEs do not.
        let add_bos = meta
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(model == "llama" || (model == "gpt2" && is_llama3_pre(&pre)));
        let add_eos = meta
            .opt_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        let chat_template = meta.opt_string("tokenizer.chat_template")?;
        Ok(Self::finish(
            inner,
            pieces,
            bos,
            eos,
            EdgeToken::from_flag(add_bos),
            EdgeToken::from_flag(add_eos),
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

fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

fn single_gguf_in(dir: &Path) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"));
    let first = found.next()?;
    found.next().is_none().then_some(first)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GgufTokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl GgufTokenType {
    fn from_i32(v: i32) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Typed access to GGUF metadata with errors naming the file and key.
struct GgufMeta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, gguf_file::Value>,
}

impl GgufMeta<'_> {
    fn bad(&self, key: &str, message: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::BadKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.map.get(key).ok_or_else(|| TokenizerError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        })
    }

    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.bad(key, e))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        self.map
            .get(key)
            .map(|v| v.to_string().cloned().map_err(|e| self.bad(key, e)))
            .transpose()
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        use gguf_file::Value as V;
        self.map
            .get(key)
            .map(|v| match v {
                V::U8(x) => Ok(*x as u32),
                V::U16(x) => Ok(*x as u32),
                V::U32(x) => Ok(*x),
                V::I32(x) if *x >= 0 => Ok(*x as u32),
                V::U64(x) => u32::try_from(*x).map_err(|e| self.bad(key, e)),
                V::I64(x) => u32::try_from(*x).map_err(|e| self.bad(key, e)),
                other => Err(self.bad(key, format!("expected a token id, got {other:?}"))),
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.map
            .get(key)
            .map(|v| v.to_bool().map_err(|e| self.bad(key, e)))
            .transpose()
    }

    fn array(&self, key: &str) -> Result<&Vec<gguf_file::Value>> {
        self.get(key)?.to_vec().map_err(|e| self.bad(key, e))
    }

    fn string_array(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| self.bad(key, e)))
            .collect()
    }

    fn opt_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        if !self.map.contains_key(key) {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .map(|v| v.to_i32().map_err(|e| self.bad(key, e)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        if !self.map.contains_key(key) {
            return Ok(None);
        }
        self.array(key)?
            .iter()
            .map(|v| v.to_f32().map_err(|e| self.bad(key, e)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

// Pre-tokenizer regexes as llama.cpp names them by `tokenizer.ggml.pre`.
const GPT2_WORDS: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_WORDS: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_WORDS: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Qwen3.5 keeps combining marks (\p{M}) inside words.
const QWEN35_WORDS: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// DeepSeek Coder isolates CJK and Hangul runs before byte-level BPE.
const DEEPSEEK_CJK: &str = "[\u{4E00}-\u{9FA5}\u{0800}-\u{4E00}\u{AC00}-\u{D7FF}]+";

/// Every `tokenizer.ggml.pre` that `byte_level_pre_tokenizer` knows.
pub const SUPPORTED_PRES: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "mpt",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "qwen35",
    "deepseek-coder",
    "falcon",
];

/// Llama 3's family of pre-tokenizer names (llama.cpp's LLAMA3 type).
fn is_llama3_pre(pre: &str) -> bool {
    matches!(pre, "llama-bpe" | "llama3" | "llama-v3")
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name, or None when unknown.
pub fn byte_level_pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    let split = |pattern: &str| -> PreTokenizerWrapper {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .expect("pre-tokenizer regex compiles")
        .into()
    };
    let byte_level =
        |use_regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let seq = |parts: Vec<PreTokenizerWrapper>| Some(PreTokenizerSequence::new(parts).into());
    match pre {
        // SmolLM: each digit on its own, then GPT-2's byte-level regex.
        // StarCoder, Refact and Command-R split digits the same way.
        "smollm" | "starcoder" | "refact" | "command-r" => {
            seq(vec![Digits::new(true).into(), byte_level(true)])
        }
        "default" | "gpt2" | "mpt" => Some(byte_level(true)),
        p if is_llama3_pre(p) => seq(vec![split(LLAMA3_WORDS), byte_level(false)]),
        "qwen2" => seq(vec![split(QWEN2_WORDS), byte_level(false)]),
        "qwen35" => seq(vec![split(QWEN35_WORDS), byte_level(false)]),
        "gpt-2" => seq(vec![split(GPT2_WORDS), byte_level(false)]),
        "deepseek-coder" => seq(vec![
            split(r"[\r\n]"),
            split(r"\s?\p{L}+"),
            split(r"\s?\p{P}+"),
            split(DEEPSEEK_CJK),
            Digits::new(true).into(),
            byte_level(false),
        ]),
        // Falcon: punctuation runs, GPT-2 words, then digits in threes.
        "falcon" => seq(vec![
            Punctuation::new(SplitDelimiterBehavior::Contiguous).into(),
            byte_level(true),
            split("[0-9][0-9][0-9]"),
        ]),
        _ => None,
    }
}

fn build_byte_level_bpe(
    path: &Path,
    tokens: &[String],
    merges: &[String],
    pre: &str,
) -> Result<(tokenizers::Tokenizer, PieceEncoding)> {
    let pre_tokenizer =
        byte_level_pre_tokenizer(pre).ok_or_else(|| TokenizerError::UnsupportedPre {
            path: path.to_path_buf(),
            pre: pre.to_string(),
        })?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::BadKey {
                    path: path.to_path_buf(),
                    key: "tokenizer.ggml.merges".into(),
                    message: format!("merge `{m}` is not two space-separated pieces"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    // Llama 3's tokenizer.json sets ignore_merges: a pre-token that is itself
    // in the vocab is one token even when no merge path reaches it.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(is_llama3_pre(pre))
        .build()
        .map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    if pre == "qwen2" {
        // Qwen2's HF tokenizer NFC-normalises before splitting (Qwen3.5's
        // does not: its words keep combining marks instead).
        tok.with_normalizer(Some(tokenizers::normalizers::NFC))
            .map_err(|e| TokenizerError::Load {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
    }
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok((tok, PieceEncoding::ByteLevel))
}

/// SentencePiece as a BPE: merges are every split of a vocab piece into two
/// vocab pieces, ranked by the merged piece's score (llama.cpp's SPM merges
/// the highest-scoring pair first, which is BPE's lowest rank).
pub fn sentencepiece_merges(
    tokens: &[String],
    scores: Option<&[f32]>,
    token_types: Option<&[i32]>,
) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let score = |i: usize| {
        scores
            .and_then(|s| s.get(i).copied())
            .unwrap_or(-(i as f32))
    };
    let mergeable = |i: usize| {
        token_types
            .and_then(|t| t.get(i))
            .map(|t| {
                matches!(
                    GgufTokenType::from_i32(*t),
                    GgufTokenType::Normal | GgufTokenType::UserDefined
                )
            })
            .unwrap_or(true)
    };
    let mut ranked: Vec<(f32, usize, usize, String, String)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !mergeable(i) || piece.chars().count() < 2 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(split);
            let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) else {
                continue;
            };
            if !mergeable(ia) || !mergeable(ib) {
                continue;
            }
            ranked.push((score(i), ia, ib, a.to_string(), b.to_string()));
        }
    }
    // Highest score first; ties by the pieces' own ids for determinism.
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect()
}

fn build_sentencepiece_bpe(
    path: &Path,
    tokens: &[String],
    scores: Option<&[f32]>,
    token_types: Option<&[i32]>,
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<(tokenizers::Tokenizer, PieceEncoding)> {
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = sentencepiece_merges(tokens, scores, token_types);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk.and_then(|id| tokens.get(id as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let load_err = |e: tokenizers::Error| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new("\u{2581}".into()).into());
    }
    norm.push(Replace::new(" ", "\u{2581}").map_err(load_err)?.into());
    tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norm)))
        .map_err(load_err)?;
    let mut dec: Vec<DecoderWrapper> = vec![
        tokenizers::normalizers::Replace::new("\u{2581}", " ")
            .map_err(load_err)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(dec)));
    Ok((tok, PieceEncoding::SentencePiece))
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

    fn split(pre: &str, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let p = byte_level_pre_tokenizer(pre).unwrap();
        let mut pts = PreTokenizedString::from(text);
        p.pre_tokenize(&mut pts).unwrap();
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_as_named() {
        // Ġ is the byte-level space.
        assert_eq!(split("smollm", "ab 123"), ["ab", "Ġ", "1", "2", "3"]);
        assert_eq!(split("llama-bpe", "ab 12345"), ["ab", "Ġ", "123", "45"]);
        assert_eq!(split("qwen2", "ab 123"), ["ab", "Ġ", "1", "2", "3"]);
        assert_eq!(split("gpt2", "ab 123 I'M"), ["ab", "Ġ123", "ĠI", "'", "M"]);
        assert_eq!(split("llama3", "I'M\n\nx"), ["I", "'M", "ĊĊ", "x"]);
        assert_eq!(split("falcon", "a+=1234"), ["a", "+=", "123", "4"]);
        assert_eq!(
            split("deepseek-coder", "ab 12\n"),
            ["ab", "Ġ", "1", "2", "Ċ"]
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_none() {
        assert!(byte_level_pre_tokenizer("smollm").is_some());
        assert!(byte_level_pre_tokenizer("llama-bpe").is_some());
        assert!(byte_level_pre_tokenizer("qwen2").is_some());
        assert!(byte_level_pre_tokenizer("no-such-pre").is_none());
        for pre in SUPPORTED_PRES {
            assert!(byte_level_pre_tokenizer(pre).is_some(), "{pre}");
        }
    }

    #[test]
    fn sentencepiece_merges_follow_scores() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, -10.0, -10.0, -10.0, -2.0, -1.0, -0.5];
        let types = [2, 1, 1, 1, 1, 1, 1];
        let m = sentencepiece_merges(&tokens, Some(&scores), Some(&types));
        // abc (best score) first via both splits, then bc, then ab.
        assert_eq!(m[0], ("a".into(), "bc".into()));
        assert_eq!(m[1], ("ab".into(), "c".into()));
        assert_eq!(m[2], ("b".into(), "c".into()));
        assert_eq!(m[3], ("a".into(), "b".into()));
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let e = Tokenizer::load(Path::new("/nonexistent/model"), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/model"), "{e}");
    }
}
