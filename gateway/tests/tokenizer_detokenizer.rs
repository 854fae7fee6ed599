//! Incremental detokenization and stop strings on the real SmolLM2 tokenizer.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::sync::{Arc, OnceLock};

use gateway::detokenizer::{DetokenizerStep, IncrementalDetokenizer};
use gateway::tokenizer::Tokenizer;
use worker::SamplingParams;

const OUTPUT: &str = "Hello world. Stop here. Hello again.";

fn tokenizer() -> Option<Arc<Tokenizer>> {
    static TOK: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = fixtures::smollm2_gguf()?;
        Some(Arc::new(Tokenizer::load(&path, None).unwrap()))
    })
    .clone()
}

/// Feeds OUTPUT's tokens until a stop; returns the steps and the text
/// emitted in total (flush included when no stop matched).
fn run(tok: &Arc<Tokenizer>, params: &SamplingParams) -> (Vec<DetokenizerStep>, String) {
    let prompt = tok.encode("Say something:", false).unwrap();
    let ids = tok.encode(OUTPUT, false).unwrap();
    let mut d = IncrementalDetokenizer::new(tok.clone(), &prompt, params);
    let mut steps = Vec::new();
    let mut text = String::new();
    for id in ids {
        let step = d.push(id);
        text.push_str(&step.text);
        let stopped = step.stop.is_some();
        steps.push(step);
        if stopped {
            assert_eq!(d.flush(), "", "nothing is left after a stop");
            assert_eq!(d.output_text(), text);
            return (steps, text);
        }
    }
    text.push_str(&d.flush());
    assert_eq!(d.output_text(), text);
    (steps, text)
}

fn stop(strings: &[&str]) -> SamplingParams {
    SamplingParams {
        stop: strings.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn stopped_with(steps: &[DetokenizerStep]) -> Option<String> {
    steps.last().and_then(|s| s.stop.clone())
}

#[test]
fn no_stop_emits_everything() {
    let Some(tok) = tokenizer() else { return };
    let (steps, text) = run(&tok, &SamplingParams::default());
    assert_eq!(text, OUTPUT);
    assert!(steps.iter().all(|s| s.stop.is_none()));
}

#[test]
fn stop_string_spanning_two_tokens() {
    let Some(tok) = tokenizer() else { return };
    let ids = tok.encode(OUTPUT, false).unwrap();
    assert!(
        ids.iter()
            .all(|&i| !String::from_utf8_lossy(&tok.token_bytes(i)).contains("Stop here")),
        "the stop string must span tokens"
    );
    let (steps, text) = run(&tok, &stop(&["Stop here"]));
    assert_eq!(text, "Hello world. ");
    assert_eq!(stopped_with(&steps).as_deref(), Some("Stop here"));
    // "Stop" was held back while " here" could still complete the match.
    assert!(steps.iter().all(|s| !s.text.contains("Stop")));
}

#[test]
fn stop_string_inside_a_token_and_across_three() {
    let Some(tok) = tokenizer() else { return };
    let (_, text) = run(&tok, &stop(&["ere"]));
    assert_eq!(text, "Hello world. Stop h");
    let (steps, text) = run(&tok, &stop(&["ld. St"]));
    assert_eq!(text, "Hello wor");
    assert_eq!(stopped_with(&steps).as_deref(), Some("ld. St"));
}

#[test]
fn stop_string_at_start() {
    let Some(tok) = tokenizer() else { return };
    let (steps, text) = run(&tok, &stop(&["Hello"]));
    assert_eq!(text, "");
    assert_eq!(steps.len(), 1);
    assert_eq!(stopped_with(&steps).as_deref(), Some("Hello"));
}

#[test]
fn include_stop_str_in_output() {
    let Some(tok) = tokenizer() else { return };
    let params = SamplingParams {
        include_stop_str_in_output: true,
        ..stop(&["Stop here"])
    };
    let (steps, text) = run(&tok, &params);
    assert_eq!(text, "Hello world. Stop here");
    assert_eq!(stopped_with(&steps).as_deref(), Some("Stop here"));
}

#[test]
fn min_tokens_delays_stop_strings() {
    let Some(tok) = tokenizer() else { return };
    let params = SamplingParams {
        min_tokens: 3,
        ..stop(&["Hello"])
    };
    let (steps, text) = run(&tok, &params);
    // The first "Hello" is the first token: too early to stop on.
    assert_eq!(text, "Hello world. Stop here. ");
    assert_eq!(stopped_with(&steps).as_deref(), Some("Hello"));
}

#[test]
fn held_text_is_flushed_when_the_request_ends_otherwise() {
    let Some(tok) = tokenizer() else { return };
    // "again" is never completed: ". Hello ag" stays held until flush.
    let (steps, text) = run(&tok, &stop(&[". Hello again!"]));
    assert_eq!(text, OUTPUT);
    assert!(steps.iter().all(|s| s.stop.is_none()));
    let streamed: String = steps.iter().map(|s| s.text.as_str()).collect();
    assert!(OUTPUT.starts_with(&streamed) && streamed.len() < OUTPUT.len());
}

#[test]
fn first_listed_stop_wins_and_pushes_after_stop_are_empty() {
    let Some(tok) = tokenizer() else { return };
    let ids = tok.encode(OUTPUT, false).unwrap();
    let mut d = IncrementalDetokenizer::new(tok.clone(), &[], &stop(&["world", "Hello world"]));
    let mut stop_seen = None;
    for &id in &ids {
        let s = d.push(id);
        if stop_seen.is_some() {
            assert_eq!(s, DetokenizerStep::default());
        }
        if s.stop.is_some() {
            stop_seen = s.stop;
        }
    }
    assert_eq!(stop_seen.as_deref(), Some("world"));
    assert_eq!(d.output_text(), "Hello ");
}
