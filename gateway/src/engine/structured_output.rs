//! Structured outputs (vLLM v1's `StructuredOutputManager`, llguidance
//! backend). Grammars are compiled once per request on the async side
//! (`GrammarCompiler`, so a bad one is a 400 before anything is queued);
//! their matchers live here in the engine core, one per request. Each step
//! carries the token bitmasks of its rows that sample (`GrammarBitmask`),
//! so workers apply masks without knowing any grammar; after the step the
//! sampled tokens advance the matchers.
//!
//! The token trie llguidance walks is built from our own tokenizer's
//! vocabulary bytes (`Tokenizer::token_bytes`), so HF-directory and
//! GGUF-derived tokenizers work alike.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use rayon::prelude::*;
use worker::sampling_params::{StructuredOutputRequest, StructuredOutputs};
use worker::GrammarBitmask;

use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StructuredOutputError {
    /// The schema, regex, choice list or grammar cannot be compiled.
    #[error("Invalid {kind} in {param}: {message}")]
    Invalid {
        kind: &'static str,
        param: String,
        message: String,
    },
    /// `guided_grammar` in a syntax llguidance does not read.
    #[error(
        "{param}: GBNF grammars (`::=` rules) are not supported; write the grammar in \
         llguidance's Lark syntax (rules `name: ...`, terminals /regex/ or \"literal\")."
    )]
    Gbnf { param: String },
    /// This model's tokenizer cannot back a token trie.
    #[error("Structured outputs are not available for this model: {message}")]
    Unavailable { message: String },
}

impl StructuredOutputError {
    /// The request field at fault.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } | Self::Gbnf { param } => Some(param),
            Self::Unavailable { .. } => None,
        }
    }
}

type Result<T> = std::result::Result<T, StructuredOutputError>;

/// Whitespace allowed between JSON tokens by default: any run of up to 32
/// spaces, tabs and newlines (room for any usual indentation).
pub const DEFAULT_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,32}";

fn kind(r: &StructuredOutputRequest) -> &'static str {
    match r {
        StructuredOutputRequest::JsonSchema(_) => "JSON schema",
        StructuredOutputRequest::JsonObject => "JSON object",
        StructuredOutputRequest::Regex(_) => "regex",
        StructuredOutputRequest::Choice(_) => "choice",
        StructuredOutputRequest::Grammar(_) => "grammar",
    }
}

/// The llguidance grammar for a request's constraint (pure: no tokenizer).
pub fn top_level_grammar(so: &StructuredOutputs) -> Result<TopLevelGrammar> {
    let invalid = |message: String| StructuredOutputError::Invalid {
        kind: kind(&so.request),
        param: so.param.clone(),
        message,
    };
    let json = |mut schema: serde_json::Value| {
        if let Some(obj) = schema.as_object_mut() {
            // vLLM's default is any whitespace between JSON tokens; each gap
            // is bounded here, so that a small model cannot spend the whole
            // of max_tokens on one run of newlines (which SmolLM2 does).
            let pattern = match (&so.whitespace_pattern, so.disable_any_whitespace) {
                (Some(p), _) => Some(p.as_str()),
                (None, true) => None,
                (None, false) => Some(DEFAULT_WHITESPACE),
            };
            let opts = match pattern {
                Some(p) => serde_json::json!({"whitespace_pattern": p}),
                None => serde_json::json!({"whitespace_flexible": false}),
            };
            obj.insert("x-guidance".into(), opts);
        }
        TopLevelGrammar::from_json_schema(schema)
    };
    match &so.request {
        StructuredOutputRequest::JsonSchema(schema) => {
            let schema = match schema {
                // guided_json may come as the schema's text.
                serde_json::Value::String(text) => serde_json::from_str(text)
                    .map_err(|e| invalid(format!("the schema is not valid JSON: {e}")))?,
                v if v.is_object() || v.is_boolean() => v.clone(),
                v => {
                    return Err(invalid(format!(
                        "a JSON schema must be an object or a boolean, got {v}"
                    )))
                }
            };
            Ok(json(schema))
        }
        StructuredOutputRequest::JsonObject => Ok(json(serde_json::json!({"type": "object"}))),
        StructuredOutputRequest::Regex(rx) => {
            // Checked here so that the error names the regex, not the
            // grammar llguidance would wrap it in.
            regex_syntax::Parser::new()
                .parse(rx)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(TopLevelGrammar::from_regex(rx))
        }
        StructuredOutputRequest::Choice(choices) => {
            if choices.is_empty() {
                return Err(invalid("the list of choices is empty".into()));
            }
            // Each choice as a Lark string literal (JSON string escapes).
            let alts: Vec<String> = choices
                .iter()
                .map(|c| serde_json::Value::String(c.clone()).to_string())
                .collect();
            Ok(TopLevelGrammar::from_lark(format!(
                "start: {}",
                alts.join(" | ")
            )))
        }
        StructuredOutputRequest::Grammar(g) => {
            if g.trim().is_empty() {
                return Err(invalid("the grammar is empty".into()));
            }
            if g.contains("::=") {
                return Err(StructuredOutputError::Gbnf {
                    param: so.param.clone(),
                });
            }
            Ok(TopLevelGrammar::from_lark(g.clone()))
        }
    }
}

/// Our tokenizer as llguidance's tokenizer environment.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => match self.tokenizer.encode(text, false) {
                Ok(ids) => ids,
                Err(_) => self.trie.greedy_tokenize(s),
            },
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        // Our encode may add a prefix space (SentencePiece) or normalize:
        // llguidance then does not rely on it for forced tokens.
        false
    }
}

/// Every token's bytes, special tokens behind llguidance's 0xFF marker so
/// that no grammar text can produce them.
pub fn vocab_words(tokenizer: &Tokenizer) -> Vec<Vec<u8>> {
    (0..tokenizer.vocab_size() as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id);
            if tokenizer.is_special(id) && !bytes.is_empty() {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(&bytes);
                w
            } else {
                bytes
            }
        })
        .collect()
}

fn build_factory(tokenizer: &Arc<Tokenizer>, eos_ids: &[u32]) -> Result<ParserFactory> {
    let unavailable = |message: String| StructuredOutputError::Unavailable { message };
    let eos = tokenizer
        .eos_token_id()
        .or_else(|| eos_ids.first().copied())
        .ok_or_else(|| unavailable("the tokenizer has no end-of-sequence token".into()))?;
    let words = vocab_words(tokenizer);
    if eos as usize >= words.len() {
        return Err(unavailable(format!(
            "EOS token {eos} is outside the tokenizer's {} tokens",
            words.len()
        )));
    }
    let info = TokRxInfo::new(words.len() as u32, eos);
    let env: TokEnv = Arc::new(VocabEnv {
        trie: TokTrie::from(&info, &words),
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| unavailable(e.to_string()))?;
    // Grammar warnings would go to stderr; errors come back as results.
    factory.quiet();
    Ok(factory)
}

/// Compiles requests' constraints into matchers. The token trie is built
/// on first use, so servers that never see a structured request pay
/// nothing for it.
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    eos_ids: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// `eos_ids`: every id that ends a request (model, generation config
    /// and tokenizer EOS); the grammar's end allows all of them.
    pub fn new(tokenizer: Arc<Tokenizer>, eos_ids: Vec<u32>) -> Self {
        Self {
            tokenizer,
            eos_ids,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>> {
        self.factory
            .get_or_init(|| {
                let started = Instant::now();
                let f = build_factory(&self.tokenizer, &self.eos_ids).map(Arc::new);
                tracing::info!(
                    "Structured outputs: llguidance token trie of {} tokens built in {:.0} ms",
                    self.tokenizer.vocab_size(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                f
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// A fresh matcher for `so`, or the 400 naming what is wrong with it.
    pub fn compile(&self, so: &StructuredOutputs) -> Result<RequestGrammar> {
        let grammar = top_level_grammar(so)?;
        let factory = self.factory()?;
        let invalid = |message: String| StructuredOutputError::Invalid {
            kind: kind(&so.request),
            param: so.param.clone(),
            message,
        };
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        let trie = factory.tok_env().tok_trie();
        Ok(RequestGrammar {
            matcher,
            tok_eos: trie.eos_token(),
            eos_ids: self.eos_ids.clone(),
            words_per_row: trie.vocab_size().div_ceil(32),
        })
    }
}

/// One request's grammar state.
#[derive(Clone)]
pub struct RequestGrammar {
    matcher: Matcher,
    /// The trie's EOS; the other EOS ids stand for it.
    tok_eos: u32,
    eos_ids: Vec<u32>,
    words_per_row: usize,
}

impl std::fmt::Debug for RequestGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGrammar")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl RequestGrammar {
    /// The tokens allowed next, as a bitmask row. Once the grammar is
    /// complete only EOS is allowed, which ends the request.
    pub fn bitmask(&mut self) -> std::result::Result<Vec<u32>, String> {
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let mut row = vob.as_slice().to_vec();
        row.resize(self.words_per_row, 0);
        if vob.is_allowed(self.tok_eos) {
            for &e in &self.eos_ids {
                if let Some(w) = row.get_mut(e as usize / 32) {
                    *w |= 1 << (e % 32);
                }
            }
        }
        Ok(row)
    }

    /// Advances past a sampled token; an error when the grammar rejects it.
    pub fn accept(&mut self, token: u32) -> std::result::Result<(), String> {
        let token = if self.eos_ids.contains(&token) {
            self.tok_eos
        } else {
            token
        };
        if self.matcher.is_stopped() && token == self.tok_eos {
            // The grammar already ended (e.g. `ignore_eos` keeps going):
            // EOS is all it allows and there is nothing to advance.
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete (only EOS may follow).
    pub fn is_terminated(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn words_per_row(&self) -> usize {
        self.words_per_row
    }
}

/// The matchers of the requests in the engine, and the bitmasks of a step.
#[derive(Default)]
pub struct StructuredOutputManager {
    grammars: HashMap<String, RequestGrammar>,
    /// `VLLM_LOGITS_PROCESSOR_THREADS` > 0: masks are computed on this pool
    /// of their own, so that they do not compete with (or wait behind) the
    /// CPU backend's model threads in rayon's global pool.
    pool: Option<rayon::ThreadPool>,
    /// Mask computation time, for the profiler and benchmarks.
    pub mask_time: Duration,
    pub masks_computed: u64,
}

impl StructuredOutputManager {
    /// A manager whose masks are computed on a dedicated pool of `threads`
    /// threads (vLLM's `VLLM_LOGITS_PROCESSOR_THREADS`); 0 uses rayon's
    /// global pool.
    pub fn with_threads(threads: usize) -> std::io::Result<Self> {
        let pool = match threads {
            0 => None,
            n => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("grammar-mask-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            ),
        };
        Ok(Self {
            pool,
            ..Self::default()
        })
    }

    /// From `VLLM_LOGITS_PROCESSOR_THREADS`.
    pub fn from_env() -> crate::engine::error::Result<Self> {
        let var = runtime::envs::VLLM_LOGITS_PROCESSOR_THREADS;
        let threads: usize = runtime::envs::get(var)?.unwrap_or(0);
        Self::with_threads(threads).map_err(|e| crate::engine::error::EngineError::EngineDead {
            reason: format!("cannot start the {threads} threads of {}: {e}", var.name),
        })
    }

    /// Threads the masks of one step are computed on.
    pub fn mask_threads(&self) -> usize {
        match &self.pool {
            Some(pool) => pool.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    pub fn add(&mut self, request_id: String, grammar: RequestGrammar) {
        self.grammars.insert(request_id, grammar);
    }

    pub fn remove(&mut self, request_id: &str) {
        self.grammars.remove(request_id);
    }

    pub fn is_empty(&self) -> bool {
        self.grammars.is_empty()
    }

    pub fn contains(&self, request_id: &str) -> bool {
        self.grammars.contains_key(request_id)
    }

    /// Drops the grammars of requests that are gone.
    pub fn retain(&mut self, mut live: impl FnMut(&str) -> bool) {
        self.grammars.retain(|id, _| live(id));
    }

    /// The bitmasks of `req_ids` (in that order; ids without a grammar are
    /// skipped), computed in parallel. Requests whose matcher failed come
    /// back in the error list, with an EOS-only row so that the step can
    /// still run.
    pub fn grammar_bitmask(
        &mut self,
        req_ids: &[&str],
    ) -> (Option<GrammarBitmask>, Vec<(String, String)>) {
        let started = Instant::now();
        let mut rows: Vec<(&str, &mut RequestGrammar)> = Vec::new();
        {
            // Disjoint &mut borrows, in step order.
            let mut by_id: HashMap<&str, &mut RequestGrammar> = self
                .grammars
                .iter_mut()
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            for id in req_ids {
                if let Some((k, g)) = by_id.remove_entry(id) {
                    rows.push((k, g));
                }
            }
        }
        if rows.is_empty() {
            return (None, Vec::new());
        }
        let words_per_row = rows[0].1.words_per_row;
        let compute = |(id, g): &mut (&str, &mut RequestGrammar)| {
            let r = g.bitmask();
            (id.to_string(), r, g.tok_eos)
        };
        let results: Vec<_> = if rows.len() > 1 {
            let pool = &self.pool;
            let mut run = || rows.par_iter_mut().map(compute).collect();
            match pool {
                Some(pool) => pool.install(run),
                None => run(),
            }
        } else {
            rows.iter_mut().map(compute).collect()
        };
        let mut bitmask = GrammarBitmask::new(words_per_row);
        let mut failed = Vec::new();
        for (id, r, eos) in results {
            match r {
                Ok(row) => bitmask.push(id, &row),
                Err(e) => {
                    let mut row = vec![0u32; words_per_row];
                    row[eos as usize / 32] |= 1 << (eos % 32);
                    bitmask.push(id.clone(), &row);
                    failed.push((id, e));
                }
            }
        }
        self.mask_time += started.elapsed();
        self.masks_computed += bitmask.req_ids.len() as u64;
        (Some(bitmask), failed)
    }

    /// Advances `request_id`'s matcher past `token`; the error says why
    /// the grammar rejected it.
    pub fn accept(&mut self, request_id: &str, token: u32) -> std::result::Result<(), String> {
        match self.grammars.get_mut(request_id) {
            Some(g) => g.accept(token),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn so(r: StructuredOutputRequest) -> StructuredOutputs {
        StructuredOutputs::new(r, "guided_test")
    }

    #[test]
    fn grammars_for_each_kind_and_their_errors() {
        assert!(top_level_grammar(&so(StructuredOutputRequest::JsonSchema(
            json!({"type": "object"})
        )))
        .is_ok());
        assert!(
            top_level_grammar(&so(StructuredOutputRequest::JsonSchema(json!(
                "{\"type\": \"string\"}"
            ))))
            .is_ok()
        );
        let e = top_level_grammar(&so(StructuredOutputRequest::JsonSchema(json!("{oops"))))
            .unwrap_err();
        assert_eq!(e.param(), Some("guided_test"));
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        assert!(top_level_grammar(&so(StructuredOutputRequest::JsonSchema(json!(3)))).is_err());
        let e = top_level_grammar(&so(StructuredOutputRequest::Regex("a(b".into()))).unwrap_err();
        assert!(
            e.to_string().starts_with("Invalid regex in guided_test"),
            "{e}"
        );
        assert!(top_level_grammar(&so(StructuredOutputRequest::Choice(vec![]))).is_err());
        let e = top_level_grammar(&so(StructuredOutputRequest::Grammar(
            "root ::= \"a\"".into(),
        )))
        .unwrap_err();
        assert!(matches!(e, StructuredOutputError::Gbnf { .. }));
        // Choices are escaped as literals: quotes and backslashes survive.
        let g = top_level_grammar(&so(StructuredOutputRequest::Choice(vec![
            "a\"b".into(),
            "c\\d".into(),
        ])))
        .unwrap();
        let lark = g.grammars[0].lark_grammar.clone().unwrap();
        assert_eq!(lark, r#"start: "a\"b" | "c\\d""#);
    }

    #[test]
    fn whitespace_pattern_goes_to_the_json_compiler() {
        let mut s = so(StructuredOutputRequest::JsonObject);
        s.whitespace_pattern = Some(r"[ ]?".into());
        let g = top_level_grammar(&s).unwrap();
        let schema = g.grammars[0].json_schema.clone().unwrap();
        assert_eq!(schema["x-guidance"]["whitespace_pattern"], "[ ]?");
        assert_eq!(schema["type"], "object");
        s.whitespace_pattern = None;
        let g = top_level_grammar(&s).unwrap();
        let schema = g.grammars[0].json_schema.clone().unwrap();
        assert_eq!(
            schema["x-guidance"]["whitespace_pattern"],
            DEFAULT_WHITESPACE
        );
        s.disable_any_whitespace = true;
        let g = top_level_grammar(&s).unwrap();
        let schema = g.grammars[0].json_schema.clone().unwrap();
        assert_eq!(schema["x-guidance"]["whitespace_flexible"], false);
    }
}
