//! `--distributed-executor-backend ray` against a real cluster: etcd, an
//! orchestrator head with its node agent (real binaries, 127.0.0.1), and
//! worker actors placed in a placement group. A tiny random-weight Llama at
//! TP 2 must give what TP 1 gives in-process; the actors must be listed
//! while the engine runs and gone once it is dropped; bad
//! `VLLM_RAY_BUNDLE_INDICES` is vLLM's error.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::engine::EngineArgs;
use gateway::executor::DistributedBackend;
use gateway::llm::LLM;
use worker::SamplingParams;

/// etcd, the head and (detached) its node agent; all killed on drop.
struct Cluster {
    dir: PathBuf,
    etcd: Child,
    head: Child,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The head's node agent runs detached: kill every orchestrator
        // process the cache root lists, then the head and etcd.
        if let Ok(rd) = std::fs::read_dir(self.dir.join("cache/pids")) {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("orchestrator") {
                    // SAFETY: kill(2) on a process this test's cluster started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for c in [&mut self.head, &mut self.etcd] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_cluster(orchestrator: &Path, base: u16) -> Cluster {
    let dir = std::env::temp_dir().join(format!("flotilla-ray-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let url = format!("http://127.0.0.1:{base}");
    let peer = format!("http://127.0.0.1:{}", base + 1);
    let etcd = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("t={peer}")])
        .stdin(Stdio::null())
        .stdout(log("etcd.log"))
        .stderr(log("etcd.err"))
        .spawn()
        .expect("etcd on PATH (scripts/setup.sh installs it)");
    wait_port(base);
    let head_port = base + 2;
    let head = Command::new(orchestrator)
        .args([
            "start",
            "--head",
            "--block",
            "--port",
            &head_port.to_string(),
        ])
        .args(["--node-ip-address", "127.0.0.1", "--etcd-endpoints", &url])
        .args(["--num-gpus", "0", "--num-cpus", "4"])
        .env("FLOTILLA_CACHE_ROOT", dir.join("cache"))
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("VLLM_HOST_IP")
        .stdin(Stdio::null())
        .stdout(log("head.log"))
        .stderr(log("head.err"))
        .spawn()
        .unwrap();
    let cluster = Cluster { dir, etcd, head };
    wait_port(head_port);
    let token = cluster.dir.join("cache/cluster_token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token.exists() {
        assert!(Instant::now() < deadline, "no cluster token");
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster
}

fn list_actors(orchestrator: &Path, cluster: &Cluster) -> String {
    let out = Command::new(orchestrator)
        .args(["list", "actors"])
        .env("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ray_executor_places_worker_actors_and_matches_tp1() {
    let Some(tokenizer) = fixtures::smollm2_gguf() else {
        return;
    };
    if Command::new("etcd").arg("--version").output().is_err() {
        let _ = fixtures::require(None::<()>, "etcd", "run scripts/setup.sh");
        return;
    }
    // The executor's logs (placement, actors) help when this fails.
    let _ = gateway::logging::init();
    fixtures::build_worker_binary();
    let orchestrator = fixtures::build_binary("flotilla-orchestrator", "orchestrator");
    let cluster = start_cluster(&orchestrator, 24610);
    // The gateway finds the head and token under the cache root, as the
    // orchestrator CLI does on the head machine. (One test in this binary,
    // so nothing else reads the environment meanwhile.)
    std::env::set_var("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"));
    std::env::remove_var("FLOTILLA_CLUSTER_TOKEN");
    std::env::remove_var("FLOTILLA_ADDRESS");

    let model = cluster.dir.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let args = |tp: usize, backend| EngineArgs {
        load_format: "dummy".into(),
        tokenizer: Some(tokenizer.clone()),
        seed: 5,
        tensor_parallel_size: tp,
        distributed_executor_backend: Some(backend),
        max_model_len: Some(128),
        num_gpu_blocks_override: Some(64),
        ..EngineArgs::default()
    };
    let params = SamplingParams {
        max_tokens: Some(8),
        logprobs: Some(3),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|i| {
            (0..(4 + i * 3))
                .map(|j| (i * 131 + j * 17) % 1000)
                .collect()
        })
        .collect();

    let want = LLM::new(&model, args(1, DistributedBackend::Uni))
        .unwrap()
        .generate_token_ids(prompts.clone(), &params)
        .unwrap();
    let llm = LLM::new(&model, args(2, DistributedBackend::Ray)).expect("TP 2 through ray");
    let listed = list_actors(&orchestrator, &cluster);
    assert!(
        listed.contains("-rank0") && listed.contains("-rank1"),
        "{listed}"
    );
    let matches_tp1 = |llm: &LLM| {
        let got = llm.generate_token_ids(prompts.clone(), &params).unwrap();
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.outputs[0].token_ids, g.outputs[0].token_ids);
            for (a, b) in w.outputs[0]
                .logprobs
                .as_ref()
                .unwrap()
                .iter()
                .zip(g.outputs[0].logprobs.as_ref().unwrap())
            {
                assert!((a.logprob - b.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
            }
        }
    };
    matches_tp1(&llm);
    drop(llm);
    wait_actors_gone(&orchestrator, &cluster);

    // Two pipeline stages (one layer each) on two worker actors.
    let pp2 = EngineArgs {
        pipeline_parallel_size: 2,
        ..args(1, DistributedBackend::Ray)
    };
    let llm = LLM::new(&model, pp2).expect("PP 2 through ray");
    matches_tp1(&llm);
    drop(llm);
    wait_actors_gone(&orchestrator, &cluster);

    std::env::set_var("VLLM_RAY_BUNDLE_INDICES", "0,0");
    let e = LLM::new(&model, args(2, DistributedBackend::Ray))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("VLLM_RAY_BUNDLE_INDICES cannot have duplicate values"),
        "{e}"
    );
    std::env::remove_var("VLLM_RAY_BUNDLE_INDICES");
}

/// The placement group goes with the executor, and its actors with it.
fn wait_actors_gone(orchestrator: &Path, cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = list_actors(orchestrator, cluster);
        let alive = listed
            .lines()
            .filter(|l| l.contains("-rank") && !l.contains("DEAD"))
            .count();
        if alive == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "actors outlived the engine:\n{listed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
