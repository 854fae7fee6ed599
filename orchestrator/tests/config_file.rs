//! `orchestrator start --config FILE.yaml`: a head set up from a file, with
//! a command-line flag over the file's, against a real etcd.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_port, wait_until, Cluster, Proc};

#[test]
fn head_from_a_config_file() {
    let mut c = Cluster::new("config", 31700);
    let port = c.head_port;
    let file = c.root.0.join("head.yaml");
    std::fs::write(
        &file,
        format!(
            "# A head's settings, as a deployment would keep them.\n\
             head: true\n\
             block: true\n\
             port: {port}\n\
             node_ip_address: 127.0.0.1\n\
             etcd-endpoints: [{}]\n\
             num-gpus: 2\n\
             num-cpus: 3\n",
            c.endpoint()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(c.root.0.join("head.log")).unwrap();
    let child = Command::new(common::BIN)
        .args(["start", "--config"])
        .arg(&file)
        .args(["--num-cpus", "4"])
        .env("FLOTILLA_CACHE_ROOT", c.cache())
        .env_remove("FLOTILLA_CLUSTER_TOKEN")
        .env_remove("VLLM_HOST_IP")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    c.procs.push(Proc {
        child,
        name: "head".into(),
    });
    wait_port(port, Duration::from_secs(30));
    wait_until(Duration::from_secs(20), "the head's node", || {
        c.alive_nodes() == 1
    });
    let status = c.ok(&["status"]);
    assert!(status.contains(" 0.0/2.0 GPU\n"), "{status}");
    // --num-cpus 4 on the command line over the file's 3.
    assert!(status.contains(" 0.0/4.0 CPU\n"), "{status}");
}

#[test]
fn bad_config_file_is_refused_with_key_and_line() {
    let dir = common::TempDir::new("badconfig");
    let file = dir.0.join("bad.yaml");
    std::fs::write(&file, "head: true\nport: 6379\nnum-gpus: two\n").unwrap();
    let out = Command::new(common::BIN)
        .args(["start", "--config"])
        .arg(&file)
        .env("FLOTILLA_CACHE_ROOT", dir.0.join("cache"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "config file {}, line 3: 'num-gpus': expected a number, got \"two\"",
            file.display()
        )),
        "{err}"
    );
}
