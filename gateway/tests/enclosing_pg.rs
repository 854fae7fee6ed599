//! A gateway that runs as an actor inside a placement group uses that group
//! (vLLM's "Using the existing placement group"), against a real cluster:
//! etcd, an orchestrator head with its node agent (real binaries), a group
//! held by `orchestrator placement-group create --hold`, and `gateway serve`
//! started in its bundle 0 with `orchestrator actor create`. Without
//! `--distributed-executor-backend` it picks ray (it is inside a group), its
//! TP 2 workers take the group's bundles and serve what TP 1 serves
//! in-process; frozen (SIGSTOP) and then killed, it takes its workers
//! along (they are owned by its owner lease) but leaves the group to its
//! holder. A gateway that exits cleanly stops its workers
//! at once. vLLM's two checks of such a group are errors with its wording.

#[path = "../../tests/support/fixtures.rs"]
mod fixtures;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gateway::engine::EngineArgs;
use gateway::executor::DistributedBackend;
use gateway::llm::LLM;
use worker::SamplingParams;

/// etcd, the head, its (detached) node agent and the group holder; all
/// killed on drop.
struct Cluster {
    dir: PathBuf,
    orchestrator: PathBuf,
    children: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The head's node agent runs detached: kill every orchestrator
        // process the cache root lists (the agent's actors die with their
        // sessions below), then the processes started here.
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
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn cli(&self) -> Command {
        let mut c = Command::new(&self.orchestrator);
        c.env("FLOTILLA_CACHE_ROOT", self.dir.join("cache"))
            .env_remove("FLOTILLA_CLUSTER_TOKEN")
            .env_remove("FLOTILLA_PLACEMENT_GROUP_ID");
        c
    }

    /// Runs the CLI; its stdout, or a panic with its stderr.
    fn run(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "orchestrator {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn list(&self, kind: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.run(&["list", kind, "--format", "json"])).unwrap_or_default()
    }

    fn actor(&self, name: &str) -> Option<serde_json::Value> {
        self.list("actors")
            .into_iter()
            .filter(|a| a["name"] == name)
            .max_by(|a, b| {
                a["created_at"]
                    .as_f64()
                    .partial_cmp(&b["created_at"].as_f64())
                    .unwrap()
            })
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One node (127.0.0.1) with 4 CPUs and 2 declared GPUs.
fn start_cluster(orchestrator: &Path, base: u16) -> Cluster {
    let dir = std::env::temp_dir().join(format!("flotilla-enclosing-{}", std::process::id()));
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
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("t={peer}")])
        .stdin(Stdio::null())
        .stdout(log("etcd.log"))
        .stderr(log("etcd.err"))
        .spawn()
        .expect("etcd on PATH (scripts/setup.sh installs it)");
    let mut cluster = Cluster {
        dir: dir.clone(),
        orchestrator: orchestrator.to_path_buf(),
        children: vec![etcd],
    };
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
        .args(["--num-gpus", "2", "--num-cpus", "4"])
        .env("FLOTILLA_CACHE_ROOT", dir.join("cache"))
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("VLLM_HOST_IP")
        .env_remove("FLOTILLA_PLACEMENT_GROUP_ID")
        .stdin(Stdio::null())
        .stdout(log("head.log"))
        .stderr(log("head.err"))
        .spawn()
        .unwrap();
    cluster.children.push(head);
    wait_port(head_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if dir.join("cache/cluster_token").exists()
            && cluster.list("nodes").iter().any(|n| n["alive"] == true)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the head's node did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The gateway's worker actors (named `...-rank<N>`) in group `pg`.
fn workers_in(cluster: &Cluster, pg: &str) -> Vec<serde_json::Value> {
    cluster
        .list("actors")
        .into_iter()
        .filter(|a| {
            a["spec"]["placement_group"] == pg
                && a["name"].as_str().is_some_and(|n| n.contains("-rank"))
        })
        .collect()
}

/// Waits until every worker in `pg` is dead and its process gone; returns
/// their death causes.
fn wait_workers_gone(cluster: &Cluster, pg: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let workers = workers_in(cluster, pg);
        let live = workers
            .iter()
            .filter(|a| a["state"] != "DEAD" || a["pid"].as_u64().is_some_and(pid_alive))
            .count();
        if live == 0 {
            return workers
                .iter()
                .map(|a| a["death_cause"].as_str().unwrap_or_default().to_string())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "workers outlived their gateway: {workers:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn group_state(cluster: &Cluster, pg: &str) -> String {
    cluster
        .list("placement-groups")
        .iter()
        .find(|p| p["id"] == pg)
        .map(|p| p["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn a_gateway_inside_a_placement_group_runs_its_workers_there() {
    let Some(tokenizer) = fixtures::smollm2_gguf() else {
        return;
    };
    if Command::new("etcd").arg("--version").output().is_err() {
        let _ = fixtures::require(None::<()>, "etcd", "run scripts/setup.sh");
        return;
    }
    let _ = gateway::logging::init();
    fixtures::build_worker_binary();
    let orchestrator = fixtures::build_binary("flotilla-orchestrator", "orchestrator");
    let mut cluster = start_cluster(&orchestrator, 24640);
    // The in-process gateways below find the head as the CLI does. (One
    // test in this binary: nothing else reads the environment meanwhile.)
    std::env::set_var("FLOTILLA_CACHE_ROOT", cluster.dir.join("cache"));
    for v in [
        "FLOTILLA_CLUSTER_TOKEN",
        "FLOTILLA_ADDRESS",
        "VLLM_HOST_IP",
        "FLOTILLA_PLACEMENT_GROUP_ID",
        "VLLM_RAY_BUNDLE_INDICES",
    ] {
        std::env::remove_var(v);
    }

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
    // No backend given: the default decides (ray inside a group).
    let args = |tp: usize, backend: Option<DistributedBackend>, device: &str| EngineArgs {
        load_format: "dummy".into(),
        tokenizer: Some(tokenizer.clone()),
        seed: 5,
        tensor_parallel_size: tp,
        distributed_executor_backend: backend,
        device: device.into(),
        max_model_len: Some(128),
        num_gpu_blocks_override: Some(64),
        ..EngineArgs::default()
    };
    let prompt: Vec<u32> = (0..9u32).map(|j| (131 + j * 17) % 1000).collect();
    let params = SamplingParams {
        max_tokens: Some(8),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let want = LLM::new(&model, args(1, Some(DistributedBackend::Uni), "cpu"))
        .unwrap()
        .generate_token_ids(vec![prompt.clone()], &params)
        .unwrap()[0]
        .outputs[0]
        .clone();

    // The group, held (and owned) by a CLI process as a user would hold it.
    let mut holder = cluster
        .cli()
        .args(["placement-group", "create", "--hold", "--name", "enclosing"])
        .args(["--bundles", r#"[{"CPU": 1}, {"CPU": 1}]"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    cluster.children.push(holder);
    let pg = line.trim().to_string();
    assert!(pg.starts_with("pg_"), "{line:?}");

    // vLLM's checks of the group, in-process with the variable the agent
    // sets: three ranks in two bundles; a bundle of two GPUs.
    std::env::set_var("FLOTILLA_PLACEMENT_GROUP_ID", &pg);
    let e = LLM::new(&model, args(3, None, "cpu"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "The number of required CPUs exceeds the total number of available CPUs in the \
             placement group. Required number of devices: 3. Total number of devices: 2."
        ),
        "{e}"
    );
    let gpu_pg = cluster.run(&["placement-group", "create", "--bundles", r#"[{"GPU": 2}]"#]);
    std::env::set_var("FLOTILLA_PLACEMENT_GROUP_ID", gpu_pg.trim());
    let e = LLM::new(&model, args(2, None, "cuda"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("Placement group bundle cannot have more than 1 GPU."),
        "{e}"
    );
    cluster.run(&["placement-group", "remove", gpu_pg.trim()]);

    // A gateway that exits cleanly stops its workers at once; the group stays.
    std::env::set_var("FLOTILLA_PLACEMENT_GROUP_ID", &pg);
    let llm = LLM::new(&model, args(2, None, "cpu")).expect("TP 2 in the enclosing group");
    let got = llm
        .generate_token_ids(vec![prompt.clone()], &params)
        .unwrap()[0]
        .outputs[0]
        .clone();
    assert_eq!(got.token_ids, want.token_ids);
    let mut bundles: Vec<u64> = workers_in(&cluster, &pg)
        .iter()
        .filter(|a| a["state"] != "DEAD")
        .map(|a| a["spec"]["bundle_index"].as_u64().unwrap())
        .collect();
    bundles.sort();
    assert_eq!(bundles, [0, 1]);
    drop(llm);
    let causes = wait_workers_gone(&cluster, &pg, Duration::from_secs(5));
    assert!(
        causes
            .iter()
            .all(|c| c.contains("its gateway") && c.contains("stopped")),
        "{causes:?}"
    );
    assert_eq!(group_state(&cluster, &pg), "CREATED");
    std::env::remove_var("FLOTILLA_PLACEMENT_GROUP_ID");

    // `gateway serve` as an actor in bundle 0, with no backend given.
    let port = free_port();
    let gw = env!("CARGO_BIN_EXE_gateway");
    let mut create: Vec<String> = ["actor", "create", "--command", gw, "--name", "gw"]
        .map(String::from)
        .to_vec();
    create.extend(["--placement-group", &pg, "--bundle-index", "0"].map(String::from));
    let serve = [
        "serve",
        model.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--served-model-name",
        "tiny",
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--load-format",
        "dummy",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--max-model-len",
        "128",
        "--num-gpu-blocks-override",
        "64",
        "--tensor-parallel-size",
        "2",
    ];
    for a in serve {
        create.push(format!("--arg={a}"));
    }
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    cluster.run(&create);
    let logs = || {
        let out = cluster
            .cli()
            .args(["actor", "logs", "gw"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let gw = cluster.actor("gw");
        assert!(
            gw.as_ref().is_none_or(|a| a["state"] != "DEAD"),
            "the gateway actor died: {gw:?}\n{}",
            logs()
        );
        assert!(
            Instant::now() < deadline,
            "the gateway did not listen:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = logs();
    assert!(
        log.contains(&format!("Using the existing placement group {pg}")),
        "{log}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/v1/completions"))
            .json(&serde_json::json!({
                "model": "tiny", "prompt": prompt, "max_tokens": 8,
                "temperature": 0, "ignore_eos": true
            }))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(body["choices"][0]["text"], want.text.as_str(), "{body}");

    // `list actors` shows the workers in the group's bundles, by rank.
    let listed = cluster.run(&["list", "actors"]);
    for rank in 0..2 {
        assert!(
            listed.lines().any(|l| {
                l.contains(&format!("-rank{rank}\t"))
                    && l.contains("ALIVE")
                    && l.ends_with(&format!("\t{pg}\t{rank}\t{rank}"))
            }),
            "rank {rank} in bundle {rank} of {pg}:\n{listed}"
        );
    }
    let workers = workers_in(&cluster, &pg);
    let live: Vec<&serde_json::Value> = workers.iter().filter(|a| a["state"] != "DEAD").collect();
    assert_eq!(live.len(), 2, "{workers:#?}");
    assert!(
        live.iter()
            .all(|a| a["owner"].as_str().is_some_and(|o| o.starts_with("owner_"))),
        "the gateway owns its workers: {live:#?}"
    );

    // A gateway that stops answering (SIGSTOP: its streams stay open, so
    // the workers do not notice) loses its workers once its owner lease
    // lapses (node TTL 3 s); the group stays. (Killed outright, the workers
    // would also see their streams close and exit by themselves.)
    let gw_pid = cluster.actor("gw").unwrap()["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) on the gateway this test started through its agent.
    assert_eq!(unsafe { libc::kill(gw_pid, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let causes = wait_workers_gone(&cluster, &pg, Duration::from_secs(20));
    eprintln!(
        "the frozen gateway's workers were gone {:.2} s after SIGSTOP (node TTL 3 s)",
        stopped.elapsed().as_secs_f64()
    );
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(gw_pid, libc::SIGKILL) }, 0);
    let owner_gone = causes
        .iter()
        .filter(|c| c.as_str() == "its owner is gone")
        .count();
    assert_eq!(owner_gone, 2, "{causes:?}");
    assert_eq!(group_state(&cluster, &pg), "CREATED");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.actor("gw").unwrap()["state"] != "DEAD" {
        assert!(
            Instant::now() < deadline,
            "the killed gateway actor lives on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(group_state(&cluster, &pg), "CREATED");
}
