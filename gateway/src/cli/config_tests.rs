//! `gateway serve --config` and `gateway bench throughput --config` against
//! the real command definitions (the file format itself is tested in
//! runtime::config_file).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser};

use super::{bench::BenchCommand, serve::ServeArgs, Cli, Command};

struct File(PathBuf);

impl File {
    fn new(text: &str) -> File {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "flotilla-gateway-config-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        File(p)
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `gateway ARGS` with "FILE" standing for a file holding `yaml`.
fn parse(yaml: &str, args: &[&str]) -> Result<Cli, String> {
    let f = File::new(yaml);
    let argv: Vec<OsString> = std::iter::once("gateway".to_string())
        .chain(
            args.iter()
                .map(|a| a.replace("FILE", f.0.to_str().unwrap())),
        )
        .map(OsString::from)
        .collect();
    let argv =
        runtime::config_file::expand_args(&Cli::command(), argv).map_err(|e| e.to_string())?;
    Cli::try_parse_from(argv).map_err(|e| e.to_string())
}

fn serve(yaml: &str, args: &[&str]) -> ServeArgs {
    match parse(yaml, args).unwrap().command {
        Command::Serve(a) => *a,
        other => panic!("{other:?}"),
    }
}

const SERVE_FILE: &str = "\
model: /models/SmolLM2
port: 9000
served-model-name: [smol, smol-alias]
max_model_len: 4k
gpu-memory-utilization: 0.75
enable-prefix-caching: false
enable-request-id-headers: true
scheduling-policy: priority
allowed-origins: [\"https://a.example\"]
hf-overrides:
  rope_theta: 20000.0
";

#[test]
fn serve_reads_every_kind_of_flag_from_the_file() {
    let a = serve(SERVE_FILE, &["serve", "--config", "FILE"]);
    assert_eq!(a.model_path().unwrap(), "/models/SmolLM2");
    assert_eq!(a.server.port, 9000);
    assert_eq!(a.server.served_model_name, ["smol", "smol-alias"]);
    assert_eq!(a.engine.max_model_len, Some(4000));
    assert_eq!(a.engine.gpu_memory_utilization, 0.75);
    assert!(!a.engine.prefix_caching());
    assert!(a.server.enable_request_id_headers);
    assert_eq!(
        a.engine.scheduling_policy,
        crate::engine::scheduler::SchedulingPolicy::Priority
    );
    assert_eq!(a.server.allowed_origins, r#"["https://a.example"]"#);
    assert_eq!(
        a.engine.hf_overrides_json().unwrap(),
        serde_json::json!({"rope_theta": 20000.0})
    );
    a.engine.validate().unwrap();
}

#[test]
fn serve_command_line_wins_over_the_file() {
    let a = serve(
        SERVE_FILE,
        &[
            "serve",
            "/cli/model",
            "--config",
            "FILE",
            "--port",
            "7000",
            "--enable-prefix-caching",
            "--served-model-name",
            "cli-name",
        ],
    );
    assert_eq!(a.model_path().unwrap(), "/cli/model");
    assert_eq!(a.server.port, 7000);
    assert!(a.engine.prefix_caching());
    assert_eq!(a.server.served_model_name, ["cli-name"]);
    // From the file, untouched by the command line; the rest are defaults.
    assert_eq!(a.engine.max_model_len, Some(4000));
    assert_eq!(a.engine.max_num_seqs, 256);
    assert_eq!(a.server.host, "0.0.0.0");
}

#[test]
fn serve_file_errors_name_key_line_and_type() {
    let e = parse(
        "port: 1\nmax-num-seqs: lots\n",
        &["serve", "m", "--config", "FILE"],
    )
    .unwrap_err();
    assert!(
        e.contains(", line 2: 'max-num-seqs': expected a whole number (0 or more), got \"lots\""),
        "{e}"
    );
    let e = parse("tensor_paralel_size: 2\n", &["serve", "--config", "FILE"]).unwrap_err();
    assert!(
        e.contains(
            "line 1: unknown key 'tensor_paralel_size': `gateway serve` has no \
             --tensor-paralel-size flag; did you mean 'tensor-parallel-size'?"
        ),
        "{e}"
    );
    let e = parse(
        "dtype: float16\nmax-model-len: 4x\n",
        &["serve", "--config", "FILE"],
    )
    .unwrap_err();
    assert!(
        e.contains("line 2: 'max-model-len': expected a whole number (0 or more), got \"4x\" (expected an integer like 2048, 4k or 4K"),
        "{e}"
    );
    let e = parse("port: 1\n  dtype: half\n", &["serve", "--config", "FILE"]).unwrap_err();
    assert!(e.contains("invalid YAML") && e.contains("line 2"), "{e}");
    let e = parse("uvicorn-log-level: loud\n", &["serve", "--config", "FILE"]).unwrap_err();
    assert!(
        e.contains("'uvicorn-log-level': expected one of critical, error, warning, info, debug, trace, got \"loud\""),
        "{e}"
    );
}

/// Every flag `serve` has (including those added later) can come from the
/// file: each is set alone to a value of its kind and must parse.
#[test]
fn every_serve_flag_can_come_from_the_file() {
    let mut cmd = Cli::command();
    cmd.build();
    let serve_cmd = cmd.find_subcommand("serve").unwrap();
    let mut checked = 0;
    for arg in serve_cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(arg.get_action(), ArgAction::Help | ArgAction::Version) || long == "config" {
            continue;
        }
        let value = if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            "true".to_string()
        } else if let Some(v) = arg.get_possible_values().first() {
            format!("'{}'", v.get_name())
        } else if let Some(d) = arg.get_default_values().first() {
            format!("'{}'", d.to_string_lossy())
        } else {
            // Options without a default: numbers take "1", paths and text too.
            "'1'".to_string()
        };
        let yaml = format!("{}: {value}\n", long.replace('-', "_"));
        let f = File::new(&yaml);
        let argv = ["gateway", "serve", "--config", f.0.to_str().unwrap()].map(OsString::from);
        let argv = runtime::config_file::expand_args(&cmd, argv.to_vec())
            .unwrap_or_else(|e| panic!("{yaml}: {e}"));
        // A flag that needs another one (`requires`) may still refuse to
        // stand alone; its value must not be what is refused.
        if let Err(e) = Cli::try_parse_from(argv) {
            use clap::error::ErrorKind::*;
            assert!(
                matches!(e.kind(), MissingRequiredArgument | ArgumentConflict),
                "{yaml}: {e}"
            );
        }
        checked += 1;
    }
    assert!(checked > 30, "only {checked} flags");
}

#[test]
fn bench_throughput_takes_model_and_engine_flags_from_the_file() {
    let cli = parse(
        "model: /m\nmax-num-seqs: 8\nnum-prompts: 4\nenable-prefix-caching: false\n",
        &[
            "bench",
            "throughput",
            "--config",
            "FILE",
            "--num-prompts",
            "2",
        ],
    )
    .unwrap();
    let Command::Bench(BenchCommand::Throughput(a)) = cli.command else {
        panic!("not bench throughput")
    };
    assert_eq!(a.model, PathBuf::from("/m"));
    assert_eq!((a.num_prompts, a.engine.max_num_seqs), (2, 8));
    assert!(!a.engine.prefix_caching());
    let e = parse(
        "port: 1\n",
        &["bench", "throughput", "m", "--config", "FILE"],
    )
    .unwrap_err();
    assert!(
        e.contains("unknown key 'port': `gateway bench throughput` has no --port flag"),
        "{e}"
    );
}

/// The YAML block of the README that starts with `first_line`.
fn readme_yaml(first_line: &str) -> String {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find(&format!("```yaml\n{first_line}"))
        .unwrap_or_else(|| panic!("README has no yaml block starting {first_line:?}"));
    let body = &readme[start + "```yaml\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

#[test]
fn readme_example_parses() {
    let a = serve(&readme_yaml("# serve.yaml"), &["serve", "--config", "FILE"]);
    assert_eq!(a.model_path().unwrap(), "/models/SmolLM2-135M-Instruct");
    assert_eq!(a.engine.max_model_len, Some(4000));
    a.engine.validate().unwrap();
}

#[test]
fn serve_reads_tool_calling_flags_from_the_file() {
    let a = serve(
        "enable-auto-tool-choice: true\ntool_call_parser: llama3_json\n",
        &["serve", "m", "--config", "FILE"],
    );
    assert!(a.server.enable_auto_tool_choice);
    assert_eq!(a.server.tool_call_parser.as_deref(), Some("llama3_json"));
    let e = parse(
        "tool-call-parser: nope\n",
        &["serve", "m", "--config", "FILE"],
    )
    .unwrap_err();
    assert!(e.contains("tool-call-parser"), "{e}");
}
