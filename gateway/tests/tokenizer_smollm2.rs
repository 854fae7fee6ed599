//! The SmolLM2 GGUF tokenizer, rebuilt from GGUF metadata, against
//! expectations reasoned from its vocabulary and against a naive reference
//! BPE written here independently of the `tokenizers` crate.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use gateway::detokenizer::IncrementalDetokenizer;
use gateway::tokenizer::{byte_level_table, Tokenizer};

fn load() -> Option<Arc<Tokenizer>> {
    static TOK: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fixtures::smollm2_gguf()?;
        Some(Arc::new(
            Tokenizer::load(&path, None).expect("load SmolLM2 tokenizer"),
        ))
    })
    .clone()
}

#[test]
fn capital_of_france_is_five_tokens() {
    let Some(tok) = load() else { return };
    let ids = tok.encode("The capital of France is", true).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
    for (id, piece) in ids.iter().zip(&pieces) {
        assert_eq!(tok.token_to_id(piece), Some(*id));
    }
    assert_eq!(tok.token_bytes(ids[3]), b" France");
    assert_eq!(tok.decode(&ids, true).unwrap(), "The capital of France is");
}

#[test]
fn special_tokens_are_single_ids() {
    let Some(tok) = load() else { return };
    let im_start = tok
        .token_to_id("<|im_start|>")
        .expect("<|im_start|> in vocab");
    let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|> in vocab");
    assert!(tok.is_special(im_start) && tok.is_special(im_end));
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>\n", false)
        .unwrap();
    assert_eq!(ids[0], im_start);
    assert!(ids.contains(&im_end));
    assert_eq!(ids.iter().filter(|&&i| tok.is_special(i)).count(), 2);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nHi\n");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n"
    );
    assert!(tok.eos_token().is_some() && tok.eos_token_id().is_some());
    assert!(tok.chat_template().is_some_and(|t| t.contains("im_start")));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn digits_are_split_one_by_one() {
    let Some(tok) = load() else { return };
    let ids = tok.encode("year 2024", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
    assert_eq!(pieces, ["year", "Ġ", "2", "0", "2", "4"]);
}

const SAMPLES: &[&str] = &[
    "Hello, world! It's a test; we'll see.",
    "0123456789 3.14159 -42 1e10",
    "emoji: 😀🎉👍🏽 and 🇫🇷 flag",
    "中文测试：你好，世界。日本語のテキスト",
    "tabs\tand\n\nnewlines   multiple    spaces \n\t  end  ",
    "  leading spaces and trailing  ",
    "Ünïcödé ñ café naïve",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "",
];

#[test]
fn round_trips() {
    let Some(tok) = load() else { return };
    for text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| tok.token_bytes(i)).collect();
        assert_eq!(bytes, text.as_bytes());
    }
}

#[test]
fn matches_reference_bpe() {
    let Some(tok) = load() else { return };
    let Some(path) = fixtures::smollm2_gguf() else {
        return;
    };
    let reference = ReferenceBpe::from_gguf(&path);
    for text in SAMPLES {
        let ours = tok.encode(text, false).unwrap();
        let theirs = reference.encode(text);
        assert_eq!(ours, theirs, "text {text:?}");
    }
}

#[test]
fn detokenizer_never_emits_broken_utf8() {
    let Some(tok) = load() else { return };
    let text = "Voilà 😀 中文 👍🏽!";
    let ids = tok.encode(text, false).unwrap();
    // Emoji and CJK here are split over several byte-level tokens.
    assert!(ids.len() > text.chars().count() / 2);
    let prompt = tok.encode("Say it:", false).unwrap();
    let mut detok =
        IncrementalDetokenizer::new(tok.clone(), &prompt, &worker::SamplingParams::default());
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        let step = detok.push(id);
        assert!(!step.text.contains('\u{FFFD}'), "{:?}", step.text);
        if step.text.is_empty() {
            held += 1;
        }
        out.push_str(&step.text);
    }
    out.push_str(&detok.flush());
    assert_eq!(out, text);
    assert_eq!(detok.output_text(), text);
    assert!(held > 0, "some token must have been held back");
}

#[test]
fn detokenizer_skip_special_tokens() {
    let Some(tok) = load() else { return };
    let ids = tok.encode("Hi<|im_end|>", false).unwrap();
    let run = |skip: bool, spaces: bool| {
        let params = worker::SamplingParams {
            skip_special_tokens: skip,
            spaces_between_special_tokens: spaces,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(tok.clone(), &[], &params);
        let mut s: String = ids.iter().map(|&i| d.push(i).text).collect();
        s.push_str(&d.flush());
        s
    };
    assert_eq!(run(true, true), "Hi");
    assert_eq!(run(false, false), "Hi<|im_end|>");
    assert_eq!(run(false, true), "Hi <|im_end|>");
}

/// A deliberately naive BPE: GPT-2 pre-tokenisation written by hand (with
/// SmolLM's single digits), then repeated lowest-rank pair merging.
struct ReferenceBpe {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
}

impl ReferenceBpe {
    fn from_gguf(path: &std::path::Path) -> Self {
        use candle_core::quantized::gguf_file;
        let mut f = std::fs::File::open(path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let strings = |key: &str| -> Vec<String> {
            c.metadata[key]
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_string().unwrap().clone())
                .collect()
        };
        let vocab = strings("tokenizer.ggml.tokens")
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let ranks = strings("tokenizer.ggml.merges")
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m.split_once(' ').unwrap();
                ((a.to_string(), b.to_string()), i)
            })
            .collect();
        ReferenceBpe { vocab, ranks }
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        let table = byte_level_table();
        let mut ids = Vec::new();
        for word in pre_tokenize(text) {
            let mut symbols: Vec<String> = word
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            loop {
                let best = (0..symbols.len().saturating_sub(1))
                    .filter_map(|i| {
                        self.ranks
                            .get(&(symbols[i].clone(), symbols[i + 1].clone()))
                            .map(|r| (*r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let merged = format!("{}{}", symbols[i], symbols[i + 1]);
                symbols.splice(i..i + 2, [merged]);
            }
            ids.extend(symbols.iter().map(|s| self.vocab[s]));
        }
        ids
    }
}

fn pre_tokenize(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    // Digits stand alone; the GPT-2 split runs on what lies between them.
    let mut chunk = String::new();
    for c in text.chars() {
        if c.is_numeric() {
            words.extend(gpt2_split(&chunk));
            chunk.clear();
            words.push(c.to_string());
        } else {
            chunk.push(c);
        }
    }
    words.extend(gpt2_split(&chunk));
    words
}

fn gpt2_split(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let letter = |c: char| c.is_alphabetic();
    let number = |c: char| c.is_numeric();
    let other = |c: char| !c.is_whitespace() && !letter(c) && !number(c);
    while i < chars.len() {
        let start = i;
        let rest: String = chars[i..].iter().take(3).collect();
        if let Some(c) = ["'re", "'ve", "'ll", "'s", "'t", "'m", "'d"]
            .iter()
            .find(|c| rest.starts_with(**c))
        {
            i += c.chars().count();
        } else {
            let body = if chars[i] == ' ' && i + 1 < chars.len() {
                i + 1
            } else {
                i
            };
            let class: Option<&dyn Fn(char) -> bool> = if letter(chars[body]) {
                Some(&letter)
            } else if number(chars[body]) {
                Some(&number)
            } else if other(chars[body]) {
                Some(&other)
            } else {
                None
            };
            if let Some(class) = class {
                i = body;
                while i < chars.len() && class(chars[i]) {
                    i += 1;
                }
            } else {
                // Whitespace: leave the last one to the next word if one follows.
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                if i < chars.len() && i - start > 1 {
                    i -= 1;
                }
            }
        }
        out.push(chars[start..i].iter().collect());
    }
    out
}

#[test]
fn out_of_vocab_ids_never_panic() {
    let Some(tok) = load() else { return };
    let bad = u32::MAX;
    assert_eq!(tok.id_to_token(bad), None);
    assert!(tok.token_bytes(bad).is_empty());
    assert!(!tok.is_special(bad));
    let _ = tok.decode(&[bad, 1, bad], false);
    let mut d =
        IncrementalDetokenizer::new(tok.clone(), &[bad], &worker::SamplingParams::default());
    let hello = tok.encode("Hello", false).unwrap();
    let mut out = d.push(bad).text;
    out.push_str(&d.push(hello[0]).text);
    out.push_str(&d.flush());
    assert_eq!(out, "Hello");
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<gateway::chat_template::ChatTemplate>();
    assert_send_sync::<IncrementalDetokenizer>();
}
