//! `gateway serve MODEL`: load the engine and run the OpenAI server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::error::{CliError, Result};
use crate::chat_template::ChatTemplate;
use crate::engine::args::EngineArgs;
use crate::envs;
use crate::openai::middleware::CorsConfig;
use crate::openai::reasoning::{self, ReasoningParser};
use crate::openai::sampling::SamplingDefaults;
use crate::openai::state::{unix_now, AppState, PoolingModel, SharedState};
use crate::openai::tls::TlsSettings;
use crate::openai::tool_parsers::{self, ToolCallParser};
use crate::openai::{serve, ServerConfig};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model: an HF directory (config.json, safetensors, tokenizer) or a GGUF file.
    // Conflicting with --model makes the command line's MODEL win over a
    // config file's `model:` (see runtime::config_file).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<String>,
    /// Same as the positional MODEL.
    #[arg(long)]
    pub model: Option<String>,
    /// YAML file of flag settings, as vLLM's (`port: 8000`,
    /// `tensor-parallel-size: 1`, `model: ...`); flags given on the command
    /// line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// vLLM's API server flags.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on (all interfaces by default, as vLLM).
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// PEM private key: serve HTTPS (with --ssl-certfile).
    #[arg(long, requires = "ssl_certfile")]
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (with --ssl-keyfile).
    #[arg(long, requires = "ssl_keyfile")]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM CA bundle that client certificates must chain to.
    #[arg(long, requires = "ssl_keyfile")]
    pub ssl_ca_certs: Option<PathBuf>,
    /// Client certificates, as Python's ssl module numbers them: 0 none,
    /// 1 optional (verified when sent), 2 required.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub ssl_cert_reqs: u8,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` on /v1 routes (also VLLM_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Names the model answers to; the first is the one reported. Default: MODEL.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Chat template file or inline Jinja; default: the model's own.
    #[arg(long)]
    pub chat_template: Option<String>,
    #[arg(long, default_value = "auto", value_parser = ["auto", "string", "openai"])]
    pub chat_template_content_format: String,
    /// Role of the generated message when add_generation_prompt is true.
    #[arg(long, default_value = "assistant")]
    pub response_role: String,
    /// Return the text inside <think>…</think> of chat replies as `reasoning`
    /// (and `reasoning_content`) instead of `content`.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(reasoning::NAMES))]
    pub reasoning_parser: Option<String>,
    /// Enable auto tool choice for supported models. Use `--tool-call-parser`
    /// to specify which parser to use.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// Select the tool call parser depending on the model that you're using.
    /// This is used to parse the model-generated tool call into OpenAI API
    /// format. Required for `--enable-auto-tool-choice`.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(tool_parsers::NAMES))]
    pub tool_call_parser: Option<String>,
    /// If specified, exclude tool definitions in prompts when
    /// tool_choice='none'.
    #[arg(long)]
    pub exclude_tools_when_tool_choice_none: bool,
    /// Echo (or generate) X-Request-Id on every response.
    #[arg(long)]
    pub enable_request_id_headers: bool,
    /// JSON list of allowed CORS origins.
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_origins: String,
    /// JSON list of allowed CORS methods.
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_methods: String,
    /// JSON list of allowed CORS headers.
    #[arg(long, default_value = r#"["*"]"#)]
    pub allowed_headers: String,
    #[arg(long)]
    pub allow_credentials: bool,
    /// Path prefix when behind a path-based proxy; routes answer with and without it.
    #[arg(long, default_value = "")]
    pub root_path: String,
    /// Do not log each received request.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// Do not log the periodic engine stats line.
    #[arg(long)]
    pub disable_log_stats: bool,
    /// Accepted so vLLM command lines run unchanged; Flotilla's HTTP layer
    /// has no log of its own (set VLLM_LOGGING_LEVEL instead).
    #[arg(long, default_value = "info",
          value_parser = ["critical", "error", "warning", "info", "debug", "trace"])]
    pub uvicorn_log_level: String,
}

impl ServeArgs {
    pub fn model_path(&self) -> Result<&str> {
        match (&self.model_tag, &self.model) {
            (Some(a), Some(b)) if a != b => Err(CliError::InvalidArg {
                flag: "--model",
                message: format!("MODEL {a:?} and --model {b:?} disagree; give one"),
            }),
            (Some(m), _) | (None, Some(m)) => Ok(m),
            (None, None) => Err(CliError::InvalidArg {
                flag: "MODEL",
                message: "give the model to serve: `gateway serve MODEL` (HF directory or \
                          .gguf file), or `model: ...` in the --config file"
                    .into(),
            }),
        }
    }
}

fn json_list(flag: &'static str, raw: &str) -> Result<Vec<String>> {
    serde_json::from_str(raw).map_err(|e| CliError::InvalidArg {
        flag,
        message: format!("expected a JSON list of strings such as [\"*\"], got {raw:?}: {e}"),
    })
}

impl ServerArgs {
    fn server_config(&self) -> Result<ServerConfig> {
        let api_key = self
            .api_key
            .clone()
            .or_else(|| envs::raw(envs::VLLM_API_KEY));
        Ok(ServerConfig {
            host: self.host.clone(),
            port: self.port,
            api_key,
            enable_request_id_headers: self.enable_request_id_headers,
            cors: CorsConfig {
                allowed_origins: json_list("--allowed-origins", &self.allowed_origins)?,
                allowed_methods: json_list("--allowed-methods", &self.allowed_methods)?,
                allowed_headers: json_list("--allowed-headers", &self.allowed_headers)?,
                allow_credentials: self.allow_credentials,
            },
            root_path: self.root_path.clone(),
            tls: match (&self.ssl_keyfile, &self.ssl_certfile) {
                (Some(keyfile), Some(certfile)) => Some(TlsSettings {
                    keyfile: keyfile.clone(),
                    certfile: certfile.clone(),
                    ca_certs: self.ssl_ca_certs.clone(),
                    cert_reqs: self.ssl_cert_reqs,
                }),
                _ => None,
            },
        })
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {},
                        _ = term.recv() => {},
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl+C stops the server");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        token.cancel();
    });
}

/// Loads the engine and builds the server's state and settings (blocking:
/// weights load here).
pub fn prepare(args: &ServeArgs) -> Result<(SharedState, ServerConfig)> {
    let model = args.model_path()?.to_string();
    tracing::info!("Flotilla API server version {}", env!("CARGO_PKG_VERSION"));
    let mut shown = args.server.clone();
    shown.api_key = shown.api_key.map(|_| "(set)".into());
    tracing::info!("args: model={model:?}, {shown:?}, {:?}", args.engine);
    if args.server.uvicorn_log_level != "info" {
        tracing::warn!(
            "--uvicorn-log-level {} has no effect: the HTTP layer logs through the main \
             logger; set VLLM_LOGGING_LEVEL instead",
            args.server.uvicorn_log_level
        );
    }
    // Fail on bad server flags before spending time loading weights.
    let config = args.server.server_config()?;
    let reasoning_parser = match args.server.reasoning_parser.as_deref() {
        None => None,
        Some(name) => {
            Some(
                ReasoningParser::from_name(name).ok_or_else(|| CliError::InvalidArg {
                    flag: "--reasoning-parser",
                    message: format!("{name:?} is not one of {:?}", reasoning::NAMES),
                })?,
            )
        }
    };
    let tool_parser = match args.server.tool_call_parser.as_deref() {
        None => None,
        Some(name) => {
            Some(
                ToolCallParser::from_name(name).ok_or_else(|| CliError::InvalidArg {
                    flag: "--tool-call-parser",
                    message: format!(
                        "invalid tool call parser: {name} (chose from {{ {} }})",
                        tool_parsers::NAMES.join(",")
                    ),
                })?,
            )
        }
    };
    if args.server.enable_auto_tool_choice && tool_parser.is_none() {
        return Err(CliError::InvalidArg {
            flag: "--enable-auto-tool-choice",
            message: "--enable-auto-tool-choice requires --tool-call-parser".into(),
        });
    }
    let loaded = args.engine.build(Path::new(&model))?;
    let names = if args.server.served_model_name.is_empty() {
        vec![model.clone()]
    } else {
        args.server.served_model_name.clone()
    };
    loaded.client.set_model_name(&names[0]);
    loaded.client.set_log_stats(!args.server.disable_log_stats);

    let chat_template =
        ChatTemplate::resolve(args.server.chat_template.as_deref(), &loaded.tokenizer)?;
    match &chat_template {
        Some(t) => {
            t.content_format(&args.server.chat_template_content_format);
        }
        None if loaded.pooler.is_some() => {}
        None => tracing::warn!(
            "The model has no chat template and --chat-template was not given: /v1/chat/completions will answer 400"
        ),
    }
    let defaults = loaded
        .generation_defaults
        .as_ref()
        .map(SamplingDefaults::from_generation_config)
        .unwrap_or_default();
    if !defaults.is_empty() {
        tracing::warn!(
            "Default sampling parameters have been overridden by the model's generation config: {defaults:?}. \
             If this is not intended, relaunch with `--generation-config vllm`."
        );
    }
    let state = Arc::new(AppState {
        engine: loaded.client.clone(),
        tokenizer: loaded.tokenizer.clone(),
        chat_template,
        content_format: args.server.chat_template_content_format.clone(),
        served_model_names: names,
        model_root: model,
        max_model_len: loaded.max_model_len,
        response_role: args.server.response_role.clone(),
        reasoning_parser,
        enable_auto_tool_choice: args.server.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none: args.server.exclude_tools_when_tool_choice_none,
        tool_parser,
        defaults,
        log_requests: !args.server.disable_log_requests,
        created: unix_now(),
        pooling: loaded.pooler.clone().map(|pooler| PoolingModel {
            pooler,
            hidden_size: loaded.model_config.hidden_size,
        }),
    });
    Ok((state, config))
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let (state, config) = tokio::task::block_in_place(|| prepare(&args))?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    // `serve` owns the engine from here and stops it however serving ends.
    serve(state, config, shutdown).await.map_err(CliError::from)
}
