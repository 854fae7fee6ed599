//! Harness for tests that run the real `orchestrator` binary against a real
//! etcd on 127.0.0.0/8. Everything started is killed on drop, also on panic.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// Held for the whole of each cluster test: every test runs etcd, heads
/// and agents whose timing is what it checks (detection within 6 s,
/// convergence within 10 s), so they run one at a time rather than a dozen
/// clusters at once competing for two cores.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// SIGKILLs every orchestrator process a cache root lists: the head's node
/// agent runs detached from the head, so killing the head leaves it.
pub fn kill_listed(cache: &Path) {
    let Ok(rd) = std::fs::read_dir(cache.join("pids")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("orchestrator") {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// SIGKILLs the actor processes agents of this cache root started: actors
/// outlive a killed agent by design, so a test must end them itself. They
/// carry the agent's environment, hence its FLOTILLA_CACHE_ROOT.
pub fn kill_actors(cache: &Path) {
    let want = format!("FLOTILLA_CACHE_ROOT={}", cache.display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        if vars.contains(&want.as_bytes())
            && vars.iter().any(|x| x.starts_with(b"FLOTILLA_ACTOR_ID="))
        {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Calls [`kill_listed`] on drop, also on panic.
pub struct KillListed(pub PathBuf);

impl Drop for KillListed {
    fn drop(&mut self) {
        kill_listed(&self.0);
        kill_actors(&self.0);
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "flotilla-orch-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    #[allow(clippy::disallowed_methods)] // a test-harness switch, not Flotilla's
    fn drop(&mut self) {
        // FLOTILLA_KEEP_TEST_DIRS=1 keeps logs for a post-mortem.
        if std::env::var_os("FLOTILLA_KEEP_TEST_DIRS").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn wait_port(port: u16, timeout: Duration) {
    wait_port_on("127.0.0.1", port, timeout)
}

pub fn wait_port_on(ip: &str, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect((ip, port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} after {timeout:?}");
}

pub fn start_etcd(dir: &Path, client: u16, peer: u16) -> Proc {
    start_etcd_with(dir, client, peer, None)
}

/// Files of a throwaway PKI made with the `openssl` CLI: a CA, a server
/// certificate for 127.0.0.1 (IP SAN) and a client certificate.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI on PATH");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "1",
            "-subj",
            "/CN=flotilla-test-ca",
        ];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &ca);
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "flotilla-head", "extendedKeyUsage=clientAuth\n"),
        ] {
            let subj = format!("/CN={cn}");
            let (key, csr, crt, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let mut req = vec!["req", "-subj", subj.as_str()];
            req.extend(ec);
            req.extend(["-keyout", key.as_str(), "-out", csr.as_str()]);
            openssl(dir, &req);
            std::fs::write(dir.join(&extf), ext).unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-days",
                    "1",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-extfile",
                    &extf,
                ],
            );
        }
        Pki {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }
}

/// etcd on 127.0.0.1:`client`; with `pki`, clients must speak TLS and show a
/// certificate the CA signed (--client-cert-auth).
pub fn start_etcd_with(dir: &Path, client: u16, peer: u16, pki: Option<&Pki>) -> Proc {
    start_etcd_on(dir, "127.0.0.1", client, peer, pki)
}

/// etcd serving clients on 127.0.0.1 and `ip` (when another address).
pub fn start_etcd_on(dir: &Path, ip: &str, client: u16, peer: u16, pki: Option<&Pki>) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .unwrap();
    let scheme = if pki.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{ip}:{client}");
    let listen = if ip == "127.0.0.1" {
        url.clone()
    } else {
        format!("{url},{scheme}://127.0.0.1:{client}")
    };
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args([
            "--listen-client-urls",
            &listen,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .args(pki.map_or_else(Vec::new, |p| {
            vec![
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                p.ca.clone().into_os_string(),
                "--cert-file".into(),
                p.server_cert.clone().into_os_string(),
                "--key-file".into(),
                p.server_key.clone().into_os_string(),
            ]
        }))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("etcd on PATH (bash scripts/setup.sh installs it)");
    wait_port(client, Duration::from_secs(20));
    Proc {
        child,
        name: "etcd".into(),
    }
}

/// One test's cluster: its own cache root, etcd and processes. Base ports
/// stay below 32768, where Linux hands out ephemeral ports.
pub struct Cluster {
    pub procs: Vec<Proc>,
    pub etcd: Option<Proc>,
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub root: TempDir,
    pub head_port: u16,
    /// Where the head and etcd are reached (127.0.0.1 unless a test puts
    /// nodes in network namespaces).
    pub head_ip: String,
    /// "http" or "https" for the etcd endpoint.
    pub scheme: &'static str,
    /// etcd TLS/auth flags added to every head and node agent started.
    pub etcd_args: Vec<String>,
}

impl Cluster {
    pub fn new(tag: &str, base_port: u16) -> Self {
        Self::new_on(tag, base_port, "127.0.0.1")
    }

    /// A cluster whose etcd and heads are reached at `ip`.
    pub fn new_on(tag: &str, base_port: u16, ip: &str) -> Self {
        let root = TempDir::new(tag);
        let etcd = start_etcd_on(&root.0, ip, base_port, base_port + 1, None);
        Cluster {
            procs: Vec::new(),
            etcd: Some(etcd),
            etcd_client: base_port,
            etcd_peer: base_port + 1,
            root,
            head_port: base_port + 2,
            head_ip: ip.into(),
            scheme: "http",
            etcd_args: Vec::new(),
        }
    }

    /// A cluster without a test etcd: its heads run the etcd members.
    pub fn bare(tag: &str, base_port: u16) -> Self {
        Cluster {
            procs: Vec::new(),
            etcd: None,
            etcd_client: base_port,
            etcd_peer: base_port + 1,
            root: TempDir::new(tag),
            head_port: base_port + 2,
            head_ip: "127.0.0.1".into(),
            scheme: "http",
            etcd_args: Vec::new(),
        }
    }

    /// A cluster whose etcd requires TLS with client certificates; heads
    /// and agents get the client certificate flags.
    pub fn new_tls(tag: &str, base_port: u16) -> (Self, Pki) {
        let root = TempDir::new(tag);
        let pki_dir = root.0.join("pki");
        std::fs::create_dir_all(&pki_dir).unwrap();
        let pki = Pki::generate(&pki_dir);
        let etcd = start_etcd_with(&root.0, base_port, base_port + 1, Some(&pki));
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let c = Cluster {
            procs: Vec::new(),
            etcd: Some(etcd),
            etcd_client: base_port,
            etcd_peer: base_port + 1,
            root,
            head_port: base_port + 2,
            head_ip: "127.0.0.1".into(),
            scheme: "https",
            etcd_args: vec![
                "--etcd-cacert".into(),
                path(&pki.ca),
                "--etcd-cert".into(),
                path(&pki.client_cert),
                "--etcd-key".into(),
                path(&pki.client_key),
            ],
        };
        (c, pki)
    }

    pub fn cache(&self) -> PathBuf {
        self.root.0.join("cache")
    }

    pub fn endpoint(&self) -> String {
        format!("{}://{}:{}", self.scheme, self.head_ip, self.etcd_client)
    }

    pub fn head_addr(&self) -> String {
        format!("{}:{}", self.head_ip, self.head_port)
    }

    fn spawn(&mut self, name: &str, args: &[&str]) -> usize {
        self.spawn_in(None, name, args)
    }

    /// Runs the binary, inside network namespace `netns` when given.
    fn spawn_in(&mut self, netns: Option<&str>, name: &str, args: &[&str]) -> usize {
        let log = std::fs::File::create(self.root.0.join(format!("{name}.log"))).unwrap();
        let mut cmd = match netns {
            // `ip netns exec` execs the binary: the child's pid is the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(args)
            .args(&self.etcd_args)
            .env("FLOTILLA_CACHE_ROOT", self.cache())
            .env_remove("FLOTILLA_CLUSTER_TOKEN")
            .env_remove("VLLM_HOST_IP")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push(Proc {
            child,
            name: name.into(),
        });
        self.procs.len() - 1
    }

    /// Runs a client command that keeps running (`placement-group create
    /// --hold`) against the head, logging to `NAME.log`; killed on drop.
    pub fn spawn_cli(&mut self, name: &str, args: &[&str]) -> usize {
        let addr = self.head_addr();
        let mut a = args.to_vec();
        a.extend(["--address", &addr]);
        self.spawn(name, &a)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.0.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts a head on 127.0.0.1:`port` against this cluster's etcd.
    pub fn start_head(&mut self, name: &str, port: u16, gpus: u32) -> usize {
        self.start_head_with(name, port, gpus, &[])
    }

    pub fn start_head_with(&mut self, name: &str, port: u16, gpus: u32, extra: &[&str]) -> usize {
        let ep = self.endpoint();
        let gpus = gpus.to_string();
        let port_s = port.to_string();
        let head_ip = self.head_ip.clone();
        let mut args = vec![
            "start",
            "--head",
            "--block",
            "--port",
            &port_s,
            "--node-ip-address",
            &head_ip,
            "--etcd-endpoints",
            &ep,
            "--num-gpus",
            &gpus,
            "--num-cpus",
            "4",
        ];
        args.extend(extra);
        let i = self.spawn(name, &args);
        wait_port_on(&self.head_ip.clone(), port, Duration::from_secs(30));
        self.wait_file(&self.cache().join("cluster_token"));
        i
    }

    /// A head at `ip:port` that runs an etcd member: a new etcd cluster, or
    /// (with `join`, a head's address) a member added to that head's.
    pub fn start_member_head(
        &mut self,
        name: &str,
        ip: &str,
        port: u16,
        join: Option<&str>,
    ) -> usize {
        let port_s = port.to_string();
        let mut args = vec![
            "start",
            "--head",
            "--block",
            "--port",
            &port_s,
            "--node-ip-address",
            ip,
            "--num-gpus",
            "0",
            "--num-cpus",
            "4",
        ];
        if let Some(j) = join {
            args.extend(["--address", j]);
        }
        let i = self.spawn(name, &args);
        let log = self.root.0.join(format!("{name}.log"));
        wait_until(Duration::from_secs(40), "the head and its node up", || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("head listening on"))
        });
        i
    }

    pub fn start_node(&mut self, name: &str, ip: &str, gpus: u32) -> usize {
        self.start_node_in(None, name, ip, gpus)
    }

    pub fn start_node_in(&mut self, netns: Option<&str>, name: &str, ip: &str, gpus: u32) -> usize {
        let addr = self.head_addr();
        self.spawn_in(
            netns,
            name,
            &[
                "start",
                "--address",
                &addr,
                "--block",
                "--node-ip-address",
                ip,
                "--num-gpus",
                &gpus.to_string(),
                "--num-cpus",
                "4",
            ],
        )
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) this cluster's etcd.
    pub fn pause_etcd(&self, stop: bool) {
        let pid = self.etcd.as_ref().expect("etcd runs").pid() as i32;
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        unsafe { libc::kill(pid, sig) };
    }

    /// kill -9 of etcd, then a new etcd on the same data directory.
    pub fn kill_etcd(&mut self) {
        if let Some(mut e) = self.etcd.take() {
            e.kill9();
        }
    }

    pub fn restart_etcd(&mut self) {
        self.etcd = Some(start_etcd_on(
            &self.root.0,
            &self.head_ip.clone(),
            self.etcd_client,
            self.etcd_peer,
            None,
        ));
    }

    fn wait_file(&self, p: &Path) {
        wait_until(Duration::from_secs(20), "file", || p.exists());
    }

    /// Runs a client command with `--address` of the head.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        a.push("--address".into());
        a.push(self.head_addr());
        self.cli_raw(&a)
    }

    pub fn cli_raw<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let out = Command::new(BIN)
            .args(args)
            .env("FLOTILLA_CACHE_ROOT", self.cache())
            .env_remove("FLOTILLA_CLUSTER_TOKEN")
            .output()
            .unwrap();
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "{args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn pgs(&self) -> Vec<serde_json::Value> {
        self.json(&["list", "placement-groups"])
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn actors(&self) -> Vec<serde_json::Value> {
        self.json(&["list", "actors"]).as_array().unwrap().clone()
    }

    pub fn nodes(&self) -> Vec<serde_json::Value> {
        self.json(&["list", "nodes"]).as_array().unwrap().clone()
    }

    pub fn alive_nodes(&self) -> usize {
        self.nodes().iter().filter(|n| n["alive"] == true).count()
    }

    pub fn actor(&self, id: &str) -> serde_json::Value {
        self.actors().into_iter().find(|a| a["id"] == id).unwrap()
    }

    pub fn pg(&self, id: &str) -> serde_json::Value {
        self.pgs().into_iter().find(|p| p["id"] == id).unwrap()
    }

    pub fn node_ip(&self, node_id: &str) -> String {
        let n = self
            .nodes()
            .into_iter()
            .find(|n| n["id"] == node_id)
            .unwrap();
        n["ip"].as_str().unwrap().to_string()
    }

    pub fn dump_logs(&self) {
        for p in &self.procs {
            let s = std::fs::read_to_string(self.root.0.join(format!("{}.log", p.name)))
                .unwrap_or_default();
            eprintln!("----- {} -----\n{s}", p.name);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_listed(&self.cache());
        kill_actors(&self.cache());
    }
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn pid_alive(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
}

/// A network namespace joined to the root namespace by a veth pair:
/// `host_ip` on the root side, `ns_ip` inside. Cutting the link inside
/// partitions whatever runs in the namespace from etcd and the heads while
/// both stay healthy. Deleted on drop (with its end of the pair).
pub struct NetNs {
    pub name: String,
    pub ns_if: String,
    pub host_if: String,
}

fn ip_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetNs {
    /// Err when namespaces cannot be made here (not root, no `ip`).
    pub fn create(tag: &str, host_ip: &str, ns_ip: &str) -> Result<NetNs, String> {
        let ns = NetNs {
            name: format!("flt-{tag}"),
            ns_if: format!("vf{tag}b"),
            host_if: format!("vf{tag}a"),
        };
        let _ = ip_cmd(&["netns", "del", &ns.name]);
        let _ = ip_cmd(&["link", "del", &ns.host_if]);
        ip_cmd(&["netns", "add", &ns.name])?;
        ip_cmd(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip_cmd(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip_cmd(&["addr", "add", &format!("{host_ip}/24"), "dev", &ns.host_if])?;
        ip_cmd(&["link", "set", &ns.host_if, "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns.ns_if,
        ])?;
        ns.exec(&["ip", "link", "set", &ns.ns_if, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend(args);
        ip_cmd(&a)
    }

    /// Link down (`false`) or up inside the namespace.
    pub fn link(&self, up: bool) {
        self.exec(&[
            "ip",
            "link",
            "set",
            &self.ns_if,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip_cmd(&["netns", "del", &self.name]);
        let _ = ip_cmd(&["link", "del", &self.host_if]);
    }
}
