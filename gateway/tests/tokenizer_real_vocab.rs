//! GGUF tokenizers rebuilt from REAL vocabularies (llama.cpp's vocab-only
//! `ggml-vocab-*.gguf` files) against the token ids Hugging Face's tokenizers
//! produce for the same texts (`.gguf.inp` / `.gguf.out`, written by
//! llama.cpp's convert_hf_to_gguf_update.py with `add_special_tokens=False`).
//! Fixtures come from `scripts/fetch-vocab-fixtures.py`.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;
use std::sync::Arc;

use gateway::detokenizer::IncrementalDetokenizer;
use gateway::tokenizer::{PieceEncoding, Tokenizer, TokenizerError};
use worker::SamplingParams;

/// Separates the test texts in a `.gguf.inp` file (each text is followed by it).
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// The vocab's three files, or None after a loud SKIP (a failure under CI=true).
fn require_vocab(name: &str) -> Option<(PathBuf, String, String)> {
    let dir = fixtures::fixture_path("llama-vocab");
    let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = dir.join(format!("ggml-vocab-{name}.gguf.inp"));
    let out = dir.join(format!("ggml-vocab-{name}.gguf.out"));
    let found = (gguf.is_file() && inp.is_file() && out.is_file()).then(|| {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
        };
        (gguf.clone(), read(&inp), read(&out))
    });
    fixtures::require(
        found,
        &format!("vocab fixture {}", gguf.display()),
        "run python3 scripts/fetch-vocab-fixtures.py",
    )
}

/// (text, expected ids) pairs, parsed as llama.cpp's test-tokenizer-0 does.
fn parse_cases(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
    let mut texts = Vec::new();
    let mut rest = inp;
    while !rest.is_empty() {
        match rest.find(SEPARATOR) {
            Some(at) => {
                texts.push(rest[..at].to_string());
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => {
                texts.push(rest.to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|t| t.parse().unwrap_or_else(|e| panic!("bad id `{t}`: {e}")))
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "fixture has {} inputs but {} outputs",
        texts.len(),
        ids.len()
    );
    texts.into_iter().zip(ids).collect()
}

/// A text for a failure message: long fixture texts are cut.
fn shown(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}... ({} chars)", text.chars().count())
    }
}

/// The text that the incremental detokenizer emits for `ids`, one at a time.
fn stream_decode(tok: &Arc<Tokenizer>, ids: &[u32]) -> String {
    let mut d = IncrementalDetokenizer::new(tok.clone(), &[], &SamplingParams::default());
    let mut text: String = ids.iter().map(|&id| d.push(id).text).collect();
    text.push_str(&d.flush());
    text
}

/// Encodes every fixture text and compares with the HF ids. Every vocab here
/// is lossless on these texts, so decoding must give the text back, and so
/// must streaming the ids through the incremental detokenizer and adding up
/// the per-token bytes.
fn check_vocab(name: &str) {
    let Some((gguf, inp, out)) = require_vocab(name) else {
        return;
    };
    let tok = Arc::new(Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e}")));
    let cases = parse_cases(&inp, &out);
    assert!(!cases.is_empty(), "{name}: no test inputs");
    let mut failures = Vec::new();
    let mut matching = 0;
    let mut round_tripped = 0;
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        if &got == want {
            matching += 1;
        } else {
            failures.push(format!(
                "  encode {}\n    want {want:?}\n    got  {got:?}",
                shown(text)
            ));
        }
        let full = tok.decode(&got, false).unwrap();
        let streamed = stream_decode(&tok, &got);
        if streamed != full {
            failures.push(format!(
                "  streaming {} gave {} (full decode {})",
                shown(text),
                shown(&streamed),
                shown(&full)
            ));
        }
        // OpenAI logprobs `bytes`: per-token bytes add up to the text
        // (SentencePiece's added prefix space aside).
        let bytes: Vec<u8> = got.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        let mut want_bytes = Vec::new();
        if tok.piece_encoding() == PieceEncoding::SentencePiece && !text.is_empty() {
            want_bytes.push(b' ');
        }
        want_bytes.extend_from_slice(text.as_bytes());
        if bytes != want_bytes {
            failures.push(format!(
                "  token_bytes of {} give {}",
                shown(text),
                shown(&String::from_utf8_lossy(&bytes))
            ));
        }
        if &full == text {
            round_tripped += 1;
        } else {
            failures.push(format!(
                "  decode(encode({})) = {}",
                shown(text),
                shown(&full)
            ));
        }
    }
    eprintln!(
        "vocab {name}: {} inputs, {matching} matching, {round_tripped} round-tripping",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "vocab {name}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn parse_cases_keeps_empty_and_newline_texts() {
    let inp = "a\n__ggml_vocab_test__\n\n__ggml_vocab_test__\n\n\n__ggml_vocab_test__\n";
    let out = " 1 2\n\n 3\n";
    assert_eq!(
        parse_cases(inp, out),
        [
            ("a".to_string(), vec![1, 2]),
            (String::new(), vec![]),
            ("\n".to_string(), vec![3]),
        ]
    );
}

#[test]
fn llama_spm_matches_hf() {
    check_vocab("llama-spm");
}

#[test]
fn phi_3_matches_hf() {
    check_vocab("phi-3");
}

#[test]
fn llama_bpe_matches_hf() {
    check_vocab("llama-bpe");
}

#[test]
fn qwen2_matches_hf() {
    check_vocab("qwen2");
}

#[test]
fn gpt_2_matches_hf() {
    check_vocab("gpt-2");
}

#[test]
fn qwen35_matches_hf() {
    check_vocab("qwen35");
}

#[test]
fn mpt_matches_hf() {
    check_vocab("mpt");
}

#[test]
fn starcoder_matches_hf() {
    check_vocab("starcoder");
}

#[test]
fn refact_matches_hf() {
    check_vocab("refact");
}

#[test]
fn command_r_matches_hf() {
    check_vocab("command-r");
}

#[test]
fn deepseek_coder_matches_hf() {
    check_vocab("deepseek-coder");
}

#[test]
fn falcon_matches_hf() {
    check_vocab("falcon");
}

/// BOS follows llama.cpp: GGUF `add_bos_token` when present, otherwise on for
/// SentencePiece and Llama 3's BPE and off for other byte-level BPEs.
#[test]
fn bos_follows_llama_cpp_defaults() {
    // (vocab, BOS id that add_special_tokens=true puts first, if any)
    let cases: &[(&str, Option<u32>)] = &[
        ("llama-spm", Some(1)),
        // No add_bos_token key: Llama 3's own default applies.
        ("llama-bpe", Some(128000)),
        // add_bos_token = true in the file.
        ("command-r", Some(5)),
        ("deepseek-coder", Some(32013)),
        ("gpt-2", None),
        ("qwen2", None),
    ];
    for (name, bos) in cases {
        let Some((gguf, _, _)) = require_vocab(name) else {
            return;
        };
        let tok = Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let plain = tok.encode("Hello world", false).unwrap();
        let with = tok.encode("Hello world", true).unwrap();
        match bos {
            Some(id) => {
                assert_eq!(with[0], *id, "{name}: {with:?}");
                assert_eq!(&with[1..], &plain[..], "{name}");
            }
            None => assert_eq!(with, plain, "{name}"),
        }
    }
}

/// A byte-level vocab whose pre-tokenizer we do not implement is refused
/// with an error that names it, never tokenized with a wrong regex.
#[test]
fn unsupported_pre_tokenizer_is_refused() {
    let Some((gguf, _, _)) = require_vocab("deepseek-llm") else {
        return;
    };
    let err = Tokenizer::from_gguf(&gguf).unwrap_err();
    match &err {
        TokenizerError::UnsupportedPre { pre, .. } => assert_eq!(pre, "deepseek-llm"),
        other => panic!("expected UnsupportedPre, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("deepseek-llm") && msg.contains("llama-bpe"),
        "{msg}"
    );
}
