//! Structured outputs on the real SmolLM2 tokenizer: the llguidance token
//! trie built from our vocabulary, matchers advancing over the tokens of
//! valid outputs, the grammar's end allowing only EOS, rejections and bad
//! grammars reported without a panic, and a step's bitmasks.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;
#[path = "../../tests/support/tiny_engine.rs"]
mod tiny_engine;

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
    // 0: rayon's global pool; 2: a pool of its own (VLLM_LOGITS_PROCESSOR_THREADS).
    for threads in [0, 2] {
        let mut m = StructuredOutputManager::with_threads(threads).unwrap();
        let expected = if threads == 0 {
            rayon::current_num_threads()
        } else {
            threads
        };
        assert_eq!(m.mask_threads(), expected);
        bitmask_rows_in_step_order(&tok, c, &mut m);
    }
}

fn bitmask_rows_in_step_order(
    tok: &Tokenizer,
    c: &GrammarCompiler,
    m: &mut StructuredOutputManager,
) {
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

/// The engine end to end (random weights, so whatever the model "wants" is
/// noise and only the masks make outputs valid), with and without
/// `--async-scheduling` (masks then computed while the previous step runs):
/// constrained requests follow their grammars to EOS, a plain request in
/// the same batch gives the tokens it gives alone, and a bad grammar is
/// refused before it reaches the batch.
#[test]
fn the_engine_enforces_grammars_without_disturbing_the_batch() {
    use gateway::engine::{EngineArgs, EngineError, EngineRequest, FinishReason, StopMatch};
    use gateway::llm::LLM;
    use worker::SamplingParams;

    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = tiny_engine::TinyModel::new("so-engine");
    let greedy = |so: Option<StructuredOutputRequest>| SamplingParams {
        max_tokens: Some(200),
        structured_outputs: so.map(|r| StructuredOutputs::new(r, "test")),
        ..SamplingParams::greedy()
    };
    let schema = json!({
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                       "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": false,
    });
    for async_scheduling in [false, true] {
        let args = EngineArgs {
            async_scheduling,
            ..tiny_engine::engine_args(&gguf, 256, 256)
        };
        let llm = LLM::new(&model.0, args).unwrap();
        let tok = llm.tokenizer().clone();
        let prompt = tok.encode("Tell me something:", true).unwrap();
        let plain = SamplingParams {
            max_tokens: Some(12),
            ignore_eos: true,
            ..SamplingParams::greedy()
        };
        let alone = llm
            .generate_token_ids(vec![prompt.clone()], &plain)
            .unwrap()[0]
            .outputs[0]
            .token_ids
            .clone();

        let requests = vec![
            ("plain", plain.clone()),
            (
                "choice",
                greedy(Some(StructuredOutputRequest::Choice(vec![
                    "alpha".into(),
                    "beta".into(),
                ]))),
            ),
            (
                "regex",
                greedy(Some(StructuredOutputRequest::Regex("[0-9]{3,6}".into()))),
            ),
            (
                "json",
                greedy(Some(StructuredOutputRequest::JsonSchema(schema.clone()))),
            ),
            (
                "json-sampled",
                SamplingParams {
                    temperature: 1.0,
                    seed: Some(5),
                    ..greedy(Some(StructuredOutputRequest::JsonSchema(schema.clone())))
                },
            ),
        ];
        let rt = tokio::runtime::Runtime::new().unwrap();
        let outs = rt.block_on(async {
            use futures::StreamExt;
            let client = llm.engine().clone();
            let bad = EngineRequest {
                request_id: format!("bad-{async_scheduling}"),
                prompt_token_ids: prompt.clone(),
                sampling_params: greedy(Some(StructuredOutputRequest::Regex("([".into()))),
                priority: 0,
                arrival_time: std::time::Instant::now(),
            };
            assert!(matches!(
                client.add_request(bad).await,
                Err(EngineError::StructuredOutput(_))
            ));
            let mut streams = Vec::new();
            for (name, p) in &requests {
                let req = EngineRequest {
                    request_id: format!("{name}-{async_scheduling}"),
                    prompt_token_ids: prompt.clone(),
                    sampling_params: p.clone(),
                    priority: 0,
                    arrival_time: std::time::Instant::now(),
                };
                streams.push(client.add_request(req).await.unwrap());
            }
            let mut outs = Vec::new();
            for mut s in streams {
                let (mut ids, mut finished) = (Vec::new(), None);
                while let Some(o) = s.next().await {
                    assert!(o.error.is_none(), "{:?}", o.error);
                    ids.extend(o.new_token_ids);
                    finished = o.finished.or(finished);
                }
                outs.push((ids, finished.unwrap()));
            }
            outs
        });
        let text = |ids: &[u32]| tok.decode(ids, true).unwrap();
        assert_eq!(outs[0].0, alone, "async={async_scheduling}");
        for (i, (name, _)) in requests.iter().enumerate().skip(1) {
            let (ids, finish) = &outs[i];
            assert_eq!(
                *finish,
                FinishReason::Stop(StopMatch::Eos),
                "{name} async={async_scheduling}: {:?}",
                text(ids)
            );
            let t = text(ids);
            match *name {
                "choice" => assert!(t == "alpha" || t == "beta", "{t:?}"),
                "regex" => assert!(
                    (3..=6).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()),
                    "{t:?}"
                ),
                _ => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert!(v["a"].as_i64().is_some_and(|a| (0..=9).contains(&a)), "{t}");
                    assert!(v["b"] == "x" || v["b"] == "y", "{t}");
                    assert_eq!(v.as_object().unwrap().len(), 2, "{t}");
                }
            }
        }
    }
}
