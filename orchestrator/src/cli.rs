//! The command line, as users and the test harness rely on it.

use clap::{Args, Parser, Subcommand};
use runtime::envs;

#[derive(Debug, Parser)]
#[command(
    name = "orchestrator",
    about = "Flotilla's cluster manager (what `ray start` / `ray status` are to vLLM)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Head address HEAD_IP:PORT (comma-separated for several heads);
    /// defaults to the head started on this machine.
    #[arg(long)]
    pub address: Option<String>,
    /// Cluster token; defaults to the token file the head wrote on this machine.
    #[arg(long, env = envs::FLOTILLA_CLUSTER_TOKEN.name, hide_env_values = true)]
    pub token: Option<String>,
}

/// TLS and auth for etcd; every process that talks to etcd takes them.
#[derive(Debug, Args, Clone, Default)]
pub struct EtcdArgs {
    #[arg(long, env = envs::FLOTILLA_ETCD_USER.name)]
    pub etcd_user: Option<String>,
    #[arg(long, env = envs::FLOTILLA_ETCD_PASSWORD.name, hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long)]
    pub etcd_cacert: Option<String>,
    /// Client certificate (PEM), for an etcd with --client-cert-auth.
    #[arg(long)]
    pub etcd_cert: Option<String>,
    /// The client certificate's private key (PEM).
    #[arg(long)]
    pub etcd_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Start a head (--head) or a node agent (--address) on this machine.
    Start(StartArgs),
    /// Cluster status in `ray status` layout.
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(short, long)]
        verbose: bool,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// List nodes, placement-groups or actors.
    List {
        kind: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Create or remove placement groups.
    #[command(name = "placement-group")]
    PlacementGroup {
        #[command(subcommand)]
        cmd: PgCmd,
    },
    /// Create, kill and read the logs of actors.
    Actor {
        #[command(subcommand)]
        cmd: ActorCmd,
    },
    /// Stop this machine's orchestrator processes and their actors.
    Stop {
        #[command(flatten)]
        conn: Conn,
    },
    /// A head and workers as containers on one Docker engine (one machine).
    Docker {
        #[command(subcommand)]
        cmd: DockerCmd,
    },
    /// Benchmarks (see the report in BENCHMARKS.md).
    #[command(hide = true)]
    Bench(BenchArgs),
}

#[derive(Debug, Args, Clone)]
pub struct StartArgs {
    /// Start a head (which is also a node).
    #[arg(long)]
    pub head: bool,
    /// Head to join as a node agent, HEAD_IP:PORT.
    #[arg(long)]
    pub address: Option<String>,
    /// Internal: this agent is the head's own node, started by `start --head`
    /// as a process of its own so actors outlive a crashed head.
    #[arg(long, hide = true, requires = "address")]
    pub head_node: bool,
    /// The head's gRPC port.
    #[arg(long, default_value_t = 6379)]
    pub port: u16,
    /// etcd to use; without it the head starts its own etcd from PATH.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Cluster name: its keys live under /flotilla/NAME/ in etcd.
    #[arg(long, default_value = "default")]
    pub cluster_name: String,
    #[arg(long)]
    pub node_ip_address: Option<String>,
    /// GPUs this node offers (overrides NVML detection).
    #[arg(long, allow_negative_numbers = true)]
    pub num_gpus: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub num_cpus: Option<f64>,
    /// Custom resources, JSON: '{"special": 2}'.
    #[arg(long)]
    pub resources: Option<String>,
    /// Stay in the foreground.
    #[arg(long)]
    pub block: bool,
    /// Seconds without keep-alive before a node is declared dead.
    #[arg(long, env = "FLOTILLA_NODE_TTL_S", default_value_t = 3)]
    pub node_ttl_s: u64,
    #[arg(long, env = envs::FLOTILLA_CLUSTER_TOKEN.name, hide_env_values = true)]
    pub token: Option<String>,
    /// YAML file of these settings, as vLLM's `--config` (`port: 6379`,
    /// `num-gpus: 2`, `etcd-endpoints: [...]`); flags given on the command
    /// line override it, and it overrides environment variables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum PgCmd {
    Create {
        #[command(flatten)]
        conn: Conn,
        /// JSON list of bundles: '[{"GPU": 1}, {"GPU": 1}]'.
        #[arg(long)]
        bundles: String,
        #[arg(long, default_value = "PACK")]
        strategy: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Seconds to wait for CREATED when the cluster is busy.
        #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
        timeout: f64,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Own the group and keep running: it lives as long as this
        /// command (Ray's non-detached lifetime). Ctrl-C or SIGTERM removes
        /// it; if the command dies (kill -9, its machine) the head removes
        /// it within the node TTL.
        #[arg(long)]
        hold: bool,
    },
    Remove {
        name_or_id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum ActorCmd {
    Create {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        command: String,
        #[arg(long = "arg", allow_hyphen_values = true)]
        args: Vec<String>,
        /// K=V, repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        #[arg(long, default_value = "")]
        resources: String,
        #[arg(long, default_value = "")]
        placement_group: String,
        #[arg(long, allow_negative_numbers = true)]
        bundle_index: Option<i64>,
        /// -1: restart forever.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        max_restarts: i64,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    Kill {
        name_or_id: String,
        #[command(flatten)]
        conn: Conn,
    },
    Logs {
        name_or_id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Which Docker engine `orchestrator docker` talks to.
#[derive(Debug, Args, Clone)]
pub struct Engine {
    /// unix:///PATH, tcp://HOST:PORT or http://HOST:PORT; default
    /// unix:///var/run/docker.sock.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DockerCmd {
    /// Start a head and N workers (own bridge network, containers
    /// NAME-head, NAME-worker-1..), wait until all joined, print the status.
    Up {
        #[command(flatten)]
        engine: Engine,
        /// Image with the orchestrator and etcd (docker/build.sh makes it).
        #[arg(long, default_value = "flotilla:latest")]
        image: String,
        /// Worker nodes besides the head.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Cluster name: container and network prefix and the value of the
        /// flotilla.cluster label.
        #[arg(long, default_value = "flotilla")]
        name: String,
        /// CPUs each node offers (default: detected in the container).
        #[arg(long)]
        num_cpus: Option<f64>,
        /// GPUs each node offers (default: detected; the containers get no
        /// GPU devices, so 0 without an NVIDIA runtime).
        #[arg(long)]
        num_gpus: Option<f64>,
        /// Seconds to wait for every node to join.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Remove the containers and network labelled flotilla.cluster=NAME.
    Down {
        #[command(flatten)]
        engine: Engine,
        #[arg(long, default_value = "flotilla")]
        name: String,
    },
    /// The cluster's containers and, when the head answers, its status.
    Status {
        #[command(flatten)]
        engine: Engine,
        #[arg(long, default_value = "flotilla")]
        name: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Placement groups to create and remove.
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Simulated nodes for the placement-at-scale measurement.
    #[arg(long, default_value_t = 1000)]
    pub sim_nodes: usize,
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::{CommandFactory, Parser};

    use super::*;

    /// `orchestrator ARGS` with "FILE" standing for a file holding `yaml`.
    fn parse(yaml: &str, args: &[&str]) -> Result<Cli, String> {
        let path = std::env::temp_dir().join(format!(
            "flotilla-orch-config-{}-{}.yaml",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, yaml).unwrap();
        let argv: Vec<OsString> = std::iter::once("orchestrator".to_string())
            .chain(
                args.iter()
                    .map(|a| a.replace("FILE", path.to_str().unwrap())),
            )
            .map(OsString::from)
            .collect();
        let out = runtime::config_file::expand_args(&Cli::command(), argv)
            .map_err(|e| e.to_string())
            .and_then(|argv| Cli::try_parse_from(argv).map_err(|e| e.to_string()));
        let _ = std::fs::remove_file(&path);
        out
    }

    fn start(yaml: &str, args: &[&str]) -> StartArgs {
        match parse(yaml, args).unwrap().cmd {
            Cmd::Start(a) => a,
            other => panic!("{other:?}"),
        }
    }

    const HEAD: &str = "\
head: true
port: 7000
num-gpus: 2
num_cpus: 8.5
etcd-endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379]
etcd-cacert: /etc/flotilla/ca.pem
etcd-cert: /etc/flotilla/client.pem
etcd-key: /etc/flotilla/client.key
resources: {special: 2}
cluster-name: prod
block: true
";

    #[test]
    fn start_reads_head_settings_from_the_file() {
        let a = start(HEAD, &["start", "--config", "FILE"]);
        assert!(a.head && a.block);
        assert_eq!(
            (a.port, a.num_gpus, a.num_cpus),
            (7000, Some(2.0), Some(8.5))
        );
        assert_eq!(
            a.etcd_endpoints,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(a.etcd.etcd_cacert.as_deref(), Some("/etc/flotilla/ca.pem"));
        assert_eq!(a.etcd.etcd_key.as_deref(), Some("/etc/flotilla/client.key"));
        assert_eq!(a.resources.as_deref(), Some(r#"{"special":2}"#));
        assert_eq!(a.cluster_name, "prod");
        // Defaults stay for what neither sets.
        assert_eq!(a.node_ttl_s, 3);
    }

    #[test]
    fn start_command_line_wins_over_the_file() {
        let a = start(
            HEAD,
            &[
                "start",
                "--num-gpus",
                "0",
                "--config",
                "FILE",
                "--etcd-endpoints",
                "http://127.0.0.1:2379",
            ],
        );
        assert_eq!(a.num_gpus, Some(0.0));
        assert_eq!(a.etcd_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(a.port, 7000);
        // An agent's file: negative numbers pass as values.
        let a = start(
            "address: 10.0.0.1:6379\nnum-gpus: -1\n",
            &["start", "--config", "FILE"],
        );
        assert_eq!(a.address.as_deref(), Some("10.0.0.1:6379"));
        assert_eq!(a.num_gpus, Some(-1.0));
    }

    #[test]
    fn readme_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```yaml\n# head.yaml")
            .expect("README's head.yaml");
        let body = &readme[start + "```yaml\n".len()..];
        let a = self::start(
            &body[..body.find("```").unwrap()],
            &["start", "--config", "FILE"],
        );
        assert!(a.head);
        assert_eq!((a.port, a.num_gpus), (6379, Some(8.0)));
        assert_eq!(a.etcd_endpoints.len(), 3);
    }

    #[test]
    fn start_file_errors_name_key_and_line() {
        let e = parse("head: true\nnum_gpu: 2\n", &["start", "--config", "FILE"]).unwrap_err();
        assert!(
            e.contains(
                "line 2: unknown key 'num_gpu': `orchestrator start` has no --num-gpu flag; \
                 did you mean 'num-gpus'?"
            ),
            "{e}"
        );
        let e = parse("port: [1]\n", &["start", "--config", "FILE"]).unwrap_err();
        assert!(
            e.contains("line 1: 'port': expected a whole number from 0 to 65535, got a list [1]"),
            "{e}"
        );
        let e = parse("head: 'yes'\n", &["start", "--config", "FILE"]).unwrap_err();
        assert!(
            e.contains("line 1: 'head': expected true or false, got \"yes\""),
            "{e}"
        );
        // Only `start` takes a file.
        assert!(parse("verbose: true\n", &["status", "--config", "FILE"]).is_err());
    }
}
