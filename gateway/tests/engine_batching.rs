//! The engine end to end on a tiny random Llama (real loader with
//! `--load-format dummy`, real SmolLM2 tokenizer): continuous batching gives
//! the same greedy outputs as running alone, also under preemption; abort
//! frees blocks at once; context length and stop strings are honoured.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;
#[path = "../../tests/support/tiny_engine.rs"]
mod tiny_engine;

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gateway::engine::{EngineArgs, EngineError, EngineRequest, FinishReason, StopMatch};
use gateway::llm::LLM;
use tiny_engine::TinyModel;
use worker::SamplingParams;

const MAX_MODEL_LEN: usize = 256;

fn args(tokenizer: &Path) -> EngineArgs {
    tiny_engine::engine_args(tokenizer, MAX_MODEL_LEN, 512)
}

fn prompts() -> Vec<String> {
    let topics = [
        "the sea",
        "a red fox",
        "prime numbers",
        "the moon",
        "Rust traits",
        "bread",
        "rain",
        "chess",
    ];
    (0..32)
        .map(|i| {
            // Some share long prefixes (prefix-cache hits), lengths vary.
            let topic = topics[i % topics.len()];
            let filler = "and then some more words ".repeat(i % 5);
            format!("Request {i}: please write a few lines about {topic} {filler}now.")
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..SamplingParams::greedy()
    }
}

#[test]
fn concurrent_greedy_matches_alone_also_with_preemption() {
    concurrent_matches_alone("float32");
}

/// bf16 weights, activations and KV: each row's bits must still not depend
/// on what else is in the step.
#[test]
fn concurrent_greedy_matches_alone_in_bfloat16() {
    concurrent_matches_alone("bfloat16");
}

fn concurrent_matches_alone(dtype: &str) {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new(&format!("batching-{dtype}"));
    let params = greedy(16);
    let prompts = prompts();
    let args = |gguf: &Path| EngineArgs {
        dtype: dtype.into(),
        ..args(gguf)
    };

    let llm = LLM::new(&model.0, args(&gguf)).unwrap();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let out = llm.generate(vec![p.clone()], &params).unwrap();
            out[0].outputs[0].token_ids.clone()
        })
        .collect();
    assert!(alone.iter().all(|t| t.len() == 16));
    let batched = llm.generate(prompts.clone(), &params).unwrap();
    for (i, c) in batched.iter().enumerate() {
        assert_eq!(
            c.prompt.as_deref(),
            Some(prompts[i].as_str()),
            "results in input order"
        );
        assert_eq!(
            c.outputs[0].token_ids, alone[i],
            "prompt {i} differs when batched"
        );
        assert_eq!(c.outputs[0].finish_reason, FinishReason::Length);
    }
    let stats = llm.engine().stats();
    assert_eq!(stats.num_free_blocks, stats.num_total_blocks);
    assert!(
        stats.prefix_cache_hits > 0,
        "repeated prompts hit the prefix cache"
    );
    drop(llm);

    // 16 blocks of 16 tokens: one request of max_model_len fits, 32 at once do not.
    let small = EngineArgs {
        num_gpu_blocks_override: Some(MAX_MODEL_LEN / 16),
        ..args(&gguf)
    };
    let llm = LLM::new(&model.0, small).unwrap();
    let batched = llm.generate(prompts.clone(), &params).unwrap();
    let stats = llm.engine().stats();
    assert!(
        stats.num_preemptions > 0,
        "the small cache must force preemption: {stats:?}"
    );
    for (i, c) in batched.iter().enumerate() {
        assert_eq!(
            c.outputs[0].token_ids, alone[i],
            "prompt {i} differs under preemption"
        );
    }
    assert_eq!(stats.num_free_blocks, stats.num_total_blocks);
    drop(llm);

    // --async-scheduling: two steps in flight on the runner's own thread,
    // each with half of the requests; also under preemption.
    for blocks in [512, MAX_MODEL_LEN / 16] {
        let overlapped = EngineArgs {
            async_scheduling: true,
            num_gpu_blocks_override: Some(blocks),
            ..args(&gguf)
        };
        let llm = LLM::new(&model.0, overlapped).unwrap();
        let batched = llm.generate(prompts.clone(), &params).unwrap();
        for (i, c) in batched.iter().enumerate() {
            assert_eq!(
                c.outputs[0].token_ids, alone[i],
                "prompt {i} differs with --async-scheduling ({blocks} blocks)"
            );
        }
        let stats = llm.engine().stats();
        assert_eq!(stats.num_free_blocks, stats.num_total_blocks);
    }
}

fn request(id: &str, prompt: Vec<u32>, params: SamplingParams) -> EngineRequest {
    EngineRequest {
        request_id: id.into(),
        prompt_token_ids: prompt,
        sampling_params: params,
        priority: 0,
        arrival_time: Instant::now(),
    }
}

/// Polls the engine stats until `cond` holds.
async fn wait_for(
    engine: &gateway::engine::EngineClient,
    cond: impl Fn(&gateway::engine::EngineStats) -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond(&engine.stats()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_disconnect_free_blocks_at_once() {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new("abort");
    let a = args(&gguf);
    let loaded = tokio::task::spawn_blocking(move || a.build(&model.0).map(|l| (l, model)))
        .await
        .unwrap()
        .unwrap();
    let (loaded, _model) = loaded;
    let engine = loaded.client.clone();
    let total = engine.stats().num_total_blocks;
    let prompt = loaded
        .tokenizer
        .encode("Tell me a long story about the sea.", true)
        .unwrap();
    let long = SamplingParams {
        max_tokens: Some(200),
        ..greedy(200)
    };

    // Explicit abort.
    let mut s = engine
        .add_request(request("a", prompt.clone(), long.clone()))
        .await
        .unwrap();
    let first = s.next().await.unwrap();
    assert!(first.finished.is_none());
    assert!(engine.stats().num_free_blocks < total);
    engine.abort("a");
    let mut last = None;
    while let Some(o) = s.next().await {
        last = Some(o);
    }
    let last = last.unwrap();
    assert_eq!(last.finished, Some(FinishReason::Abort));
    assert!(
        last.num_output_tokens < 200,
        "aborted before it could finish"
    );
    assert!(
        wait_for(&engine, |st| st.num_free_blocks == total
            && st.num_running == 0)
        .await
    );

    // A client that goes away: dropping the stream aborts the request.
    let mut s = engine
        .add_request(request("b", prompt.clone(), long.clone()))
        .await
        .unwrap();
    s.next().await.unwrap();
    drop(s);
    assert!(
        wait_for(&engine, |st| st.num_free_blocks == total
            && st.num_running == 0
            && st.num_waiting == 0)
        .await,
        "blocks not freed after the stream was dropped: {:?}",
        engine.stats()
    );
    // The id is free again.
    let s = engine
        .add_request(request("b", prompt, greedy(2)))
        .await
        .unwrap();
    let outs: Vec<_> = s.collect().await;
    assert_eq!(outs.last().unwrap().finished, Some(FinishReason::Length));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_with_clear_errors() {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new("reject");
    let a = args(&gguf);
    let (loaded, _model) =
        tokio::task::spawn_blocking(move || a.build(&model.0).map(|l| (l, model)))
            .await
            .unwrap()
            .unwrap();
    let engine = loaded.client.clone();
    assert_eq!(engine.max_model_len(), MAX_MODEL_LEN);

    let e = engine
        .add_request(request("long", vec![100; 250], greedy(10)))
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "This model's maximum context length is 256 tokens. However, you requested 260 tokens \
         (250 in the messages, 10 in the completion). Please reduce the length of the messages or \
         completion."
    );
    assert!(e.is_bad_request());
    let e = engine
        .add_request(request("empty", vec![], greedy(1)))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::EmptyPrompt));
    let bad = SamplingParams {
        temperature: -1.0,
        ..greedy(1)
    };
    let e = engine
        .add_request(request("t", vec![100], bad))
        .await
        .err()
        .unwrap();
    assert_eq!(e.param(), Some("temperature"));

    // Duplicate ids are refused while the first runs.
    let s = engine
        .add_request(request("dup", vec![100; 4], greedy(50)))
        .await
        .unwrap();
    let e = engine
        .add_request(request("dup", vec![100; 4], greedy(5)))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::DuplicateRequest { .. }), "{e}");
    drop(s);

    // max_tokens unset: generation runs up to the context length.
    let s = engine
        .add_request(request(
            "fill",
            vec![100; 240],
            SamplingParams {
                max_tokens: None,
                ..greedy(1)
            },
        ))
        .await
        .unwrap();
    let outs: Vec<_> = s.collect().await;
    let last = outs.last().unwrap();
    assert_eq!(last.finished, Some(FinishReason::Length));
    assert_eq!(last.num_output_tokens, MAX_MODEL_LEN - 240);

    engine.shutdown().await;
    let e = engine
        .add_request(request("late", vec![100], greedy(1)))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, EngineError::EngineDead { .. }), "{e}");
}

#[test]
fn stop_string_ends_generation() {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new("stop");
    let llm = LLM::new(&model.0, args(&gguf)).unwrap();
    let prompt = "Once upon a time".to_string();
    let full = llm.generate(vec![prompt.clone()], &greedy(32)).unwrap();
    let full = &full[0].outputs[0];
    let text: Vec<char> = full.text.chars().collect();
    assert!(
        text.len() >= 8,
        "random weights produced too little text: {:?}",
        full.text
    );
    // A piece from the middle of the output becomes the stop string.
    let mid = text.len() / 2;
    let stop: String = text[mid..mid + 3].iter().collect();
    let cut = full.text.find(&stop).unwrap();

    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(32)
    };
    let out = llm.generate(vec![prompt.clone()], &params).unwrap();
    let out = &out[0].outputs[0];
    assert_eq!(
        out.finish_reason,
        FinishReason::Stop(StopMatch::String(stop.clone()))
    );
    assert_eq!(out.text, full.text[..cut]);
    assert!(out.token_ids.len() < full.token_ids.len());
    assert_eq!(out.token_ids[..], full.token_ids[..out.token_ids.len()]);

    let params = SamplingParams {
        stop: vec![stop.clone()],
        include_stop_str_in_output: true,
        ..greedy(32)
    };
    let out = llm.generate(vec![prompt], &params).unwrap();
    assert_eq!(out[0].outputs[0].text, full.text[..cut + stop.len()]);
    let stats = llm.engine().stats();
    assert_eq!(stats.num_free_blocks, stats.num_total_blocks);
}

#[test]
fn prompt_logprobs_are_assembled_across_chunks() {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new("plp");
    let prompt = "A long prompt that the scheduler has to split into several chunks, \
                  because the token budget per step is small: "
        .repeat(3);
    let params = SamplingParams {
        prompt_logprobs: Some(2),
        logprobs: Some(1),
        ..greedy(4)
    };
    let whole = LLM::new(&model.0, args(&gguf)).unwrap();
    let expected = whole
        .generate(vec![prompt.clone()], &params)
        .unwrap()
        .remove(0);
    drop(whole);
    let chunked_args = EngineArgs {
        max_num_batched_tokens: 16,
        max_num_seqs: 16,
        ..args(&gguf)
    };
    let chunked = LLM::new(&model.0, chunked_args).unwrap();
    let got = chunked.generate(vec![prompt], &params).unwrap().remove(0);

    let n = got.prompt_token_ids.len();
    assert!(n > 48, "the prompt must span several 16-token chunks");
    for c in [&expected, &got] {
        let lps = c.prompt_logprobs.as_ref().expect("prompt logprobs");
        assert_eq!(lps.len(), n);
        assert!(lps[0].is_none());
        for (i, lp) in lps.iter().enumerate().skip(1) {
            let lp = lp.as_ref().unwrap();
            assert_eq!(
                lp.token_id, c.prompt_token_ids[i],
                "entry {i} is for prompt token {i}"
            );
            assert_eq!(lp.top.len(), 2);
        }
        assert_eq!(c.outputs[0].logprobs.as_ref().unwrap().len(), 4);
    }
    let (a, b) = (
        expected.prompt_logprobs.unwrap(),
        got.prompt_logprobs.unwrap(),
    );
    for (x, y) in a.iter().zip(&b).skip(1) {
        let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
        assert!((x.logprob - y.logprob).abs() < 1e-3, "{x:?} vs {y:?}");
    }
    assert_eq!(expected.outputs[0].token_ids, got.outputs[0].token_ids);
}

#[test]
fn chat_and_n_fan_out_with_seeds() {
    let Some(gguf) = fixtures::smollm2_gguf() else {
        return;
    };
    let model = TinyModel::new("chat");
    let llm = LLM::new(&model.0, args(&gguf)).unwrap();
    let conversation = vec![serde_json::json!({"role": "user", "content": "Hi there"})];
    let params = SamplingParams {
        n: 3,
        temperature: 1.0,
        seed: Some(7),
        max_tokens: Some(8),
        ignore_eos: true,
        ..Default::default()
    };
    let options = gateway::llm::ChatOptions::default();
    let out = llm
        .chat(vec![conversation.clone()], &params, &options)
        .unwrap()
        .remove(0);
    let rendered = out.prompt.as_deref().unwrap();
    assert!(
        rendered.contains("<|im_start|>user\nHi there<|im_end|>"),
        "{rendered}"
    );
    assert!(rendered.ends_with("<|im_start|>assistant\n"), "{rendered}");
    assert_eq!(out.outputs.len(), 3);
    assert!(out.outputs.iter().enumerate().all(|(i, o)| o.index == i));
    // Output i is seeded seed + i: the same as output 0 of a request seeded seed + i.
    let single = SamplingParams {
        n: 1,
        seed: Some(8),
        ..params.clone()
    };
    let again = llm.chat(vec![conversation], &single, &options).unwrap();
    assert_eq!(again[0].outputs[0].token_ids, out.outputs[1].token_ids);
    assert_ne!(out.outputs[0].token_ids, out.outputs[1].token_ids);
}
