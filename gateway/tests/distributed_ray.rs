//! `--distributed-executor-backend ray` against a real cluster: etcd, an
//! orchestrator head with its node agent (real binaries, 127.0.0.1), and
//! worker actors placed in a placement group. A tiny random-weight Llama at
//! TP 2 must give what TP 1 gives in-process; the actors must be listed
//! while the engine runs and gone once it is dropped; bad
//! `VLLM_RAY_BUNDLE_INDICES` is vLLM's error. A second node (127.0.0.2, the
//! tighter fit) is there so that rank 0's bundle must be pinned to the
//! gateway's node to land there; a gateway killed with SIGKILL leaves no
//! placement group behind.

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
    node: Option<Child>,
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
        if let Some(n) = self.node.as_mut() {
            let _ = n.kill();
            let _ = n.wait();
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
    let mut cluster = Cluster {
        dir: dir.clone(),
        etcd,
        head,
        node: None,
    };
    wait_port(head_port);
    let token = cluster.dir.join("cache/cluster_token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token.exists() {
        assert!(Instant::now() < deadline, "no cluster token");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Two CPUs: the tightest fit, where PACK would put a two-bundle group
    // if bundle 0 did not ask for the gateway's node.
    let node = Command::new(orchestrator)
        .args(["start", "--address", &format!("127.0.0.1:{head_port}")])
        .args(["--block", "--node-ip-address", "127.0.0.2"])
        .args(["--num-gpus", "0", "--num-cpus", "2"])
        .env("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"))
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("VLLM_HOST_IP")
        .stdin(Stdio::null())
        .stdout(log("node2.log"))
        .stderr(log("node2.err"))
        .spawn()
        .unwrap();
    cluster.node = Some(node);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = list_json(orchestrator, &cluster, "nodes");
        if nodes.iter().filter(|n| n["alive"] == true).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "two nodes: {nodes:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
}

fn list_json(orchestrator: &Path, cluster: &Cluster, kind: &str) -> Vec<serde_json::Value> {
    let out = Command::new(orchestrator)
        .args(["list", kind, "--format", "json"])
        .env("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"))
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The gateway's live placement group (named after its pid), if any.
fn gateway_group(orchestrator: &Path, cluster: &Cluster, pid: u32) -> Option<serde_json::Value> {
    let prefix = format!("flotilla-gateway-{pid}-");
    list_json(orchestrator, cluster, "placement-groups")
        .into_iter()
        .find(|p| {
            p["state"] != "REMOVED" && p["name"].as_str().is_some_and(|n| n.starts_with(&prefix))
        })
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
    // The gateway must run on a cluster node: rank 0 runs beside it.
    std::env::set_var("VLLM_HOST_IP", "127.0.0.9");
    let e = LLM::new(&model, args(2, DistributedBackend::Ray))
        .err()
        .expect("a gateway off the cluster fails")
        .to_string();
    std::env::remove_var("VLLM_HOST_IP");
    for want in [
        "127.0.0.9 (from VLLM_HOST_IP) is not a node of the cluster",
        "must run on a cluster node",
    ] {
        assert!(e.contains(want), "{e}");
    }

    let llm = LLM::new(&model, args(2, DistributedBackend::Ray)).expect("TP 2 through ray");
    let listed = list_actors(&orchestrator, &cluster);
    for rank in 0..2 {
        assert!(
            listed
                .lines()
                .any(|l| l.contains(&format!("-rank{rank}\t")) && l.ends_with(&format!("\t{rank}"))),
            "the RANK column: {listed}"
        );
    }
    // Bundle 0 asked for the gateway's node and is there, although the
    // 127.0.0.2 node is the tighter fit; the gateway owns the group.
    let pg = gateway_group(&orchestrator, &cluster, std::process::id()).expect("the group");
    assert_eq!(pg["bundles"][0]["node:127.0.0.1"], 10, "{pg}");
    let node0 = pg["assignments"][0]["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    let ip0 = list_json(&orchestrator, &cluster, "nodes")
        .into_iter()
        .find(|n| n["id"] == node0.as_str())
        .map(|n| n["ip"].as_str().unwrap().to_string());
    assert_eq!(ip0.as_deref(), Some("127.0.0.1"), "{pg}");
    assert!(
        pg["owner"]
            .as_str()
            .is_some_and(|o| o.starts_with("owner_")),
        "{pg}"
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

    gateway_kill9_leaves_no_group(&orchestrator, &cluster, &model, &tokenizer);
}

/// `gateway serve` through ray, killed with SIGKILL once its workers run:
/// the orchestrator removes its placement group (and actors) within the
/// node TTL (3 s here), as Ray does with a dead driver's groups.
fn gateway_kill9_leaves_no_group(
    orchestrator: &Path,
    cluster: &Cluster,
    model: &Path,
    tokenizer: &Path,
) {
    let log = std::fs::File::create(cluster.dir.join("gateway.log")).unwrap();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["serve", model.to_str().unwrap()])
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(["--tokenizer", tokenizer.to_str().unwrap()])
        .args(["--load-format", "dummy", "--max-model-len", "128"])
        .args(["--num-gpu-blocks-override", "64"])
        .args(["--distributed-executor-backend", "ray"])
        .args(["--tensor-parallel-size", "2"])
        .env("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"))
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("FLOTILLA_ADDRESS")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = gw.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let pg = loop {
        if let Some(pg) = gateway_group(orchestrator, cluster, pid) {
            let alive = list_json(orchestrator, cluster, "actors")
                .iter()
                .filter(|a| a["spec"]["placement_group"] == pg["id"] && a["state"] == "ALIVE")
                .count();
            if alive == 2 {
                break pg;
            }
        }
        if let Ok(Some(st)) = gw.try_wait() {
            panic!(
                "the gateway exited with {st}:\n{}",
                std::fs::read_to_string(cluster.dir.join("gateway.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no placement group with two live workers"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = gw.kill();
    let _ = gw.wait();
    let killed = Instant::now();
    let id = pg["id"].as_str().unwrap().to_string();
    let removed = loop {
        let gone = list_json(orchestrator, cluster, "placement-groups")
            .iter()
            .any(|p| p["id"] == id.as_str() && p["state"] == "REMOVED");
        if gone {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the killed gateway's placement group {id} stays"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "placement group {id} removed {:.2} s after kill -9 of its gateway (node TTL 3 s)",
        removed.as_secs_f64()
    );
    assert!(removed < Duration::from_secs(5), "{removed:?}");
    wait_actors_gone(orchestrator, cluster);
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
