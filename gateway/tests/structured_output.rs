//! Structured outputs on the real SmolLM2 tokenizer: the llguidance token
//! trie built from our vocabulary, matchers advancing over the tokens of
//! valid outputs, the grammar's end allowing only EOS, rejections and bad
//! grammars reported without a panic, and a step's bitmasks.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::sync::{Arc, OnceLock};

use gateway::engine::structured_output::{
    vocab_words, GrammarCompiler, StructuredOutputError, StructuredOutputManager,
};
use gateway::tokenizer::Tokenizer;
use serde_json::json;
use worker::sampling_params::{StructuredOutputRequest, StructuredOutputs};

fn tokenizer() -> Option<Arc<Tokenizer>> {
    static TOK: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fixtures::smollm2_gguf()?;
        Some(Arc::new(Tokenizer::load(&path, None).unwrap()))
    })
    .clone()
}

/// The EOS ids the engine would use: the tokenizer's and `<|endoftext|>`.
fn eos_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids = vec![tok.eos_token_id().unwrap()];
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    if !ids.contains(&eot) {
        ids.push(eot);
    }
    ids
}

fn compiler() -> Option<(Arc<Tokenizer>, &'static GrammarCompiler)> {
    static C: OnceLock<Option<GrammarCompiler>> = OnceLock::new();
    let tok = tokenizer()?;
    let c = C
        .get_or_init(|| Some(GrammarCompiler::new(tok.clone(), eos_ids(&tok))))
        .as_ref()?;
    Some((tok, c))
}

fn allowed(row: &[u32], t: u32) -> bool {
    row.get(t as usize / 32)
        .is_some_and(|w| w & (1 << (t % 32)) != 0)
}

fn so(r: StructuredOutputRequest) -> StructuredOutputs {
    StructuredOutputs::new(r, "guided_test")
}

/// Walks `text`'s tokens through a fresh matcher for `r`: every token must
/// be allowed by the mask before it, and at the end only EOS.
fn walk(r: StructuredOutputRequest, text: &str) {
    let Some((tok, c)) = compiler() else { return };
    let mut g = c.compile(&so(r.clone())).unwrap();
    for t in tok.encode(text, false).unwrap() {
        let row = g.bitmask().unwrap();
        assert!(allowed(&row, t), "{r:?}: token {t} of {text:?} masked");
        g.accept(t).unwrap();
    }
    let row = g.bitmask().unwrap();
    for e in eos_ids(&tok) {
        assert!(
            allowed(&row, e),
            "{r:?}: EOS {e} not allowed after {text:?}"
        );
        assert!(g.clone().accept(e).is_ok());
    }
    if g.is_terminated() {
        // A finished grammar allows nothing but EOS.
        let n: u32 = row.iter().map(|w| w.count_ones()).sum();
        assert_eq!(n as usize, eos_ids(&tok).len(), "{r:?}");
    }
}

#[test]
fn trie_words_are_the_tokens_bytes() {
    let Some(tok) = tokenizer() else { return };
    let words = vocab_words(&tok);
    assert_eq!(words.len(), tok.vocab_size());
    let text = "Hello {\"a\": [1, 2.5e3]} — ünïcode\n\ttabs";
    let ids = tok.encode(text, false).unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| words[i as usize].clone())
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
    // Special tokens sit behind llguidance's marker byte.
    let eos = tok.eos_token_id().unwrap() as usize;
    assert_eq!(words[eos][0], 0xFF);
}

#[test]
fn matchers_follow_valid_outputs_to_eos() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
        },
        "required": ["name", "age"],
    });
    walk(
        StructuredOutputRequest::JsonSchema(schema),
        r#"{"name": "Bob", "age": 42, "tags": ["a", "b"]}"#,
    );
    walk(
        StructuredOutputRequest::JsonObject,
        r#"{"x": {"y": [true, null]}}"#,
    );
    walk(
        StructuredOutputRequest::Regex(r"\d{3}-[a-z]+".into()),
        "123-abc",
    );
    walk(
        StructuredOutputRequest::Choice(vec!["Paris".into(), "London".into()]),
        "London",
    );
    walk(
        StructuredOutputRequest::Grammar(
            "start: greeting \" \" name\ngreeting: \"hi\" | \"hello\"\nname: /[A-Z][a-z]+/".into(),
        ),
        "hello World",
    );
}

#[test]
fn rejected_tokens_and_bad_grammars_are_errors_not_panics() {
    let Some((tok, c)) = compiler() else { return };
    let mut g = c
        .compile(&so(StructuredOutputRequest::Choice(vec!["yes".into()])))
        .unwrap();
    let no = tok.encode("no", false).unwrap()[0];
    assert!(g.accept(no).is_err());

    let bad = [
        StructuredOutputRequest::JsonSchema(json!({"type": "frobnicate"})),
        StructuredOutputRequest::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        StructuredOutputRequest::Regex("(unclosed".into()),
        StructuredOutputRequest::Grammar("start: missing_rule".into()),
        StructuredOutputRequest::Grammar("root ::= \"a\"".into()),
        StructuredOutputRequest::Choice(vec![]),
    ];
    for r in bad {
        let e = c.compile(&so(r.clone())).unwrap_err();
        assert_eq!(e.param(), Some("guided_test"), "{r:?}");
        assert!(
            matches!(
                e,
                StructuredOutputError::Invalid { .. } | StructuredOutputError::Gbnf { .. }
            ),
            "{r:?}: {e}"
        );
    }
}

#[test]
fn a_steps_bitmask_has_a_row_per_sampling_grammar_in_step_order() {
    let Some((tok, c)) = compiler() else { return };
    let mut m = StructuredOutputManager::default();
    let digits = c
        .compile(&so(StructuredOutputRequest::Regex("[0-9]+".into())))
        .unwrap();
    let words = c
        .compile(&so(StructuredOutputRequest::Regex("[a-z]+".into())))
        .unwrap();
    m.add("d".into(), digits);
    m.add("w".into(), words);
    let (mask, failed) = m.grammar_bitmask(&["w", "plain", "d"]);
    assert!(failed.is_empty());
    let mask = mask.unwrap();
    assert_eq!(mask.req_ids, vec!["w".to_string(), "d".to_string()]);
    assert_eq!(mask.words_per_row, tok.vocab_size().div_ceil(32));
    assert!(mask.is_well_formed());
    let seven = tok.encode("7", false).unwrap()[0];
    let abc = tok.encode("abc", false).unwrap()[0];
    assert!(allowed(mask.row(1), seven) && !allowed(mask.row(1), abc));
    assert!(allowed(mask.row(0), abc) && !allowed(mask.row(0), seven));
    assert!(m.accept("d", abc).is_err());
    assert!(
        m.accept("plain", abc).is_ok(),
        "no grammar: nothing to check"
    );
    m.retain(|id| id != "w");
    assert!(!m.contains("w") && m.contains("d"));
    assert!(m.grammar_bitmask(&["plain"]).0.is_none());
}
