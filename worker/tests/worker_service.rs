//! The `worker` binary on its own, driven over gRPC as an executor drives
//! it: set-up calls out of order or with a bad layout are clear errors, then
//! a tiny random-weight Llama runs a step on the Execute stream; the end of
//! that stream (its executor gone) or Shutdown ends the process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::worker as pb;
use proto::worker::worker_client::WorkerClient;
use serde_json::json;
use worker::{NewRequestData, SamplingParams, SchedulerOutput};

fn init(rank: u32, world: u32, tp: u32, pp: u32) -> pb::InitRequest {
    pb::InitRequest {
        rank,
        world_size: world,
        tp_size: tp,
        pp_size: pp,
        tp_rank: rank % tp,
        pp_rank: rank / tp,
        ..Default::default()
    }
}

/// Starts the worker binary; returns it and the address it printed.
fn spawn_worker() -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("worker prints its address").unwrap();
        if let Some(a) = line.strip_prefix("FLOTILLA_WORKER_LISTENING ") {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// Waits up to 5 s for `child` to exit; true when it exited with success.
async fn exits_successfully(mut child: Child) -> bool {
    tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(s) = child.try_wait().unwrap() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn worker_binary_serves_the_worker_service() {
    let dir = std::env::temp_dir().join(format!("flotilla-worker-svc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let (child, addr) = spawn_worker();
    let mut c = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // Out of order, or a layout that does not add up: clear errors.
    let e = c
        .kv_cache_info(pb::KvCacheInfoRequest { profile: None })
        .await
        .unwrap_err();
    assert!(e.message().contains("LoadModel first"), "{e:?}");
    let e = c.init(init(3, 2, 2, 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // A first pipeline stage must be told where the next stage listens.
    let e = c.init(init(0, 2, 1, 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("next-stage address"), "{e:?}");
    let mut bad_ranks = init(1, 2, 2, 1);
    bad_ranks.tp_rank = 0;
    assert!(c.init(bad_ranks).await.is_err());

    c.init(init(0, 1, 1, 1)).await.unwrap();
    assert!(c.init(init(0, 1, 1, 1)).await.is_err(), "initialized twice");
    let load = pb::LoadModelRequest {
        model: dir.to_string_lossy().into_owned(),
        device: "cpu".into(),
        load_format: "dummy".into(),
        dtype: "float32".into(),
        hf_overrides_json: String::new(),
        block_size: 16,
        seed: 1,
        max_model_len: 128,
        cpu_int8_activations: false,
        pooling_type: String::new(),
    };
    let e = c
        .load_model(pb::LoadModelRequest {
            load_format: "pt".into(),
            ..load.clone()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("load format"), "{e:?}");
    let reply = c.load_model(load).await.unwrap().into_inner();
    assert_eq!(
        (reply.device.as_str(), reply.dtype.as_str()),
        ("cpu", "float32")
    );
    let info = c
        .kv_cache_info(pb::KvCacheInfoRequest { profile: None })
        .await
        .unwrap()
        .into_inner();
    // 2 layers x (K + V) x 2 KV heads x 16 slots x 8 dims x 4 bytes.
    assert_eq!(info.bytes_per_block, 2 * 2 * 2 * 16 * 8 * 4);
    // On the CPU the KV cache gets VLLM_CPU_KVCACHE_SPACE (4 GiB by default).
    assert!(info.available_bytes > 0 && info.device == "cpu");
    c.initialize_kv_cache(pb::InitializeKvCacheRequest { num_blocks: 8 })
        .await
        .unwrap();

    // Two steps on one stream: a prefill, then a step the worker rejects
    // (an unknown request) without losing the stream.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut out = c
        .execute(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let step = SchedulerOutput {
        new_requests: vec![NewRequestData {
            req_id: "a".into(),
            prompt_token_ids: vec![1, 5, 9],
            output_token_ids: vec![],
            sampling_params: SamplingParams {
                logprobs: Some(2),
                ..SamplingParams::greedy()
            },
            block_ids: vec![0],
            num_computed_tokens: 0,
        }],
        num_scheduled_tokens: vec![("a".into(), 3)],
        ..Default::default()
    };
    tx.send(pb::ExecuteRequest {
        step_id: 1,
        scheduler_output: worker::wire::encode_step(&step),
    })
    .unwrap();
    let r = out.message().await.unwrap().unwrap();
    assert_eq!(r.step_id, 1);
    let Some(pb::execute_response::Result::Output(o)) = r.result else {
        panic!("{r:?}")
    };
    let o: worker::ModelRunnerOutput = o.into();
    assert_eq!(o.req_ids, ["a"]);
    assert!(o.sampled_token_ids[0].is_some_and(|t| t < 256));
    assert_eq!(o.logprobs[0].as_ref().unwrap().top.len(), 2);

    let unknown = SchedulerOutput {
        num_scheduled_tokens: vec![("nope".into(), 1)],
        ..Default::default()
    };
    tx.send(pb::ExecuteRequest {
        step_id: 2,
        scheduler_output: worker::wire::encode_step(&unknown),
    })
    .unwrap();
    let r = out.message().await.unwrap().unwrap();
    let Some(pb::execute_response::Result::Error(e)) = r.result else {
        panic!("{r:?}")
    };
    assert!(e.message.contains("nope") && !e.fatal, "{e:?}");
    let h = c.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.num_requests, 1);

    // The executor going away (its stream closed) ends the worker.
    drop(tx);
    drop(out);
    assert!(exits_successfully(child).await);

    // So does Shutdown, before any stream.
    let (child, addr) = spawn_worker();
    let mut c = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.shutdown(pb::ShutdownRequest {}).await.unwrap();
    assert!(exits_successfully(child).await);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// VLLM_NCCL_SO_PATH: a worker given a path runs with a folder holding
/// `libnccl.so` -> that file first on LD_LIBRARY_PATH (NCCL is opened by that
/// name); a path that does not exist is refused, naming the variable.
#[test]
fn nccl_so_path_is_put_first_on_the_library_path() {
    let cache = std::env::temp_dir().join(format!("flotilla-nccl-{}", std::process::id()));
    let lib = cache.join("my-nccl.so.2");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(&lib, b"not loaded until a tensor-parallel group starts").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("VLLM_NCCL_SO_PATH", cache.join("missing.so"))
        .env("FLOTILLA_CACHE_ROOT", &cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VLLM_NCCL_SO_PATH=") && err.contains("cannot open it"),
        "{err}"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--listen", "127.0.0.1:0"])
        .env("VLLM_NCCL_SO_PATH", &lib)
        .env("FLOTILLA_CACHE_ROOT", &cache)
        .env("LD_LIBRARY_PATH", "/opt/elsewhere")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("the worker starts").unwrap();
    assert!(line.starts_with("FLOTILLA_WORKER_LISTENING "), "{line}");
    // The same process (exec keeps the pid), now with the folder first.
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    let path = environ
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("LD_LIBRARY_PATH="))
        .expect("LD_LIBRARY_PATH set")
        .to_string();
    let (first, rest) = path.split_once(':').unwrap();
    assert_eq!(rest, "/opt/elsewhere");
    let link = std::path::Path::new(first).join("libnccl.so");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        lib.canonicalize().unwrap()
    );
    assert!(first.starts_with(cache.to_str().unwrap()));
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&cache).unwrap();
}
