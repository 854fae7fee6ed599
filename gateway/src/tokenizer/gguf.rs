//! The GGUF tokenizer rebuild: the tokenizer llama.cpp would use, made from
//! a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE with the
//! pre-tokenizer its `pre` names, or SentencePiece as a BPE from scores).

use std::collections::HashMap;
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

use super::{EdgeToken, PieceEncoding, Result, Tokenizer, TokenizerError};

impl Tokenizer {
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
}

pub(super) fn is_gguf(path: &Path) -> bool {
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

pub(super) fn single_gguf_in(dir: &Path) -> Option<PathBuf> {
    let mut found = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"));
    let first = found.next()?;
    found.next().is_none().then_some(first)
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
}
