//! Log lines in vLLM's shape: `{VLLM_LOGGING_PREFIX}INFO 11-22 14:03:05 [file.rs:123] msg`.
//!
//! Configured from `VLLM_CONFIGURE_LOGGING`, `VLLM_LOGGING_LEVEL` and
//! `VLLM_LOGGING_CONFIG_PATH` (a JSON file in Python's `dictConfig` shape, as
//! vLLM takes; its level and its formatter's `format`/`datefmt` are honoured).
//! Nothing here ever sends logs anywhere but stdout/stderr.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use crate::envs;

/// vLLM's default line format and date format.
pub const DEFAULT_FORMAT: &str = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s";
pub const DEFAULT_DATEFMT: &str = "%m-%d %H:%M:%S";
/// Python's `asctime` when no `datefmt` is given.
const PYTHON_DEFAULT_DATEFMT: &str = "%Y-%m-%d %H:%M:%S,%3f";

/// Crates whose events are shown at the configured level; dependencies
/// (hyper, h2, reqwest...) only from WARNING up, as vLLM leaves them alone.
const OWN_TARGETS: &[&str] = &[
    "gateway",
    "worker",
    "flotilla_gateway",
    "flotilla_worker",
    "orchestrator",
];

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(transparent)]
    Env(#[from] envs::EnvError),
    #[error("VLLM_CONFIGURE_LOGGING evaluated to false, but VLLM_LOGGING_CONFIG_PATH was given ({path})")]
    ConfigWithoutConfigure { path: String },
    #[error("could not read the logging config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid logging config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("unknown log level {level:?} (expected DEBUG, INFO, WARNING, ERROR or CRITICAL)")]
    UnknownLevel { level: String },
    #[error("invalid log format {format:?}: {reason}")]
    InvalidFormat { format: String, reason: String },
    #[error("invalid date format {datefmt:?}")]
    InvalidDateFormat { datefmt: String },
    #[error("a global logger is already installed: {reason}")]
    AlreadyInstalled { reason: String },
}

pub type Result<T> = std::result::Result<T, LoggingError>;

/// Parses a Python logging level name.
pub fn parse_level(level: &str) -> Result<LevelFilter> {
    match level.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Ok(LevelFilter::TRACE),
        "DEBUG" => Ok(LevelFilter::DEBUG),
        "INFO" => Ok(LevelFilter::INFO),
        "WARNING" | "WARN" => Ok(LevelFilter::WARN),
        "ERROR" | "CRITICAL" | "FATAL" => Ok(LevelFilter::ERROR),
        "OFF" => Ok(LevelFilter::OFF),
        _ => Err(LoggingError::UnknownLevel {
            level: level.to_string(),
        }),
    }
}

/// Python's name for a level (`WARNING`, not `WARN`).
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARNING",
        Level::ERROR => "ERROR",
    }
}

/// One piece of a Python `%`-style log format.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Field {
        field: Field,
        width: Option<(bool, usize)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    LevelName,
    AscTime,
    FileName,
    PathName,
    LineNo,
    Message,
    /// Logger name: the tracing target (module path).
    Name,
    Module,
    Process,
    Thread,
}

/// A parsed line format with its date format.
#[derive(Debug, Clone)]
pub struct LineFormat {
    prefix: String,
    pieces: Vec<Piece>,
    datefmt: String,
}

impl LineFormat {
    /// `format` in Python's `%(name)s` syntax; `datefmt` in strftime syntax.
    pub fn new(prefix: &str, format: &str, datefmt: Option<&str>) -> Result<Self> {
        let datefmt = datefmt.unwrap_or(PYTHON_DEFAULT_DATEFMT).to_string();
        let valid = chrono::format::StrftimeItems::new(&datefmt).parse().is_ok();
        if !valid {
            return Err(LoggingError::InvalidDateFormat { datefmt });
        }
        Ok(Self {
            prefix: prefix.to_string(),
            pieces: parse_format(format)?,
            datefmt,
        })
    }

    /// vLLM's default shape with the given prefix.
    pub fn vllm_default(prefix: &str) -> Self {
        Self::new(prefix, DEFAULT_FORMAT, Some(DEFAULT_DATEFMT))
            .expect("the built-in format parses")
    }

    /// Renders one line. Continuation lines of a multi-line message repeat
    /// the header (as vLLM's NewLineFormatter) so every line greps alike.
    fn render(&self, rec: &Record<'_>) -> String {
        let mut header = self.prefix.clone();
        let mut tail = String::new();
        let mut seen_message = false;
        for piece in &self.pieces {
            let out = if seen_message { &mut tail } else { &mut header };
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Field {
                    field: Field::Message,
                    ..
                } => seen_message = true,
                Piece::Field { field, width } => {
                    let value = self.field_value(*field, rec);
                    match width {
                        Some((true, w)) => {
                            let _ = write!(out, "{value:<w$}");
                        }
                        Some((false, w)) => {
                            let _ = write!(out, "{value:>w$}");
                        }
                        None => out.push_str(&value),
                    }
                }
            }
        }
        if !seen_message {
            return header;
        }
        let mut line = header.clone();
        let mut first = true;
        for part in rec.message.split('\n') {
            if !first {
                line.push('\n');
                line.push_str(&header);
            }
            first = false;
            line.push_str(part);
        }
        line.push_str(&tail);
        line
    }

    fn field_value(&self, field: Field, rec: &Record<'_>) -> String {
        match field {
            Field::LevelName => rec.level.to_string(),
            Field::AscTime => {
                let mut s = String::new();
                let _ = write!(s, "{}", rec.time.format(&self.datefmt));
                s
            }
            Field::FileName => rec
                .file
                .map(|f| {
                    Path::new(f)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| f.to_string())
                })
                .unwrap_or_else(|| "?".into()),
            Field::PathName => rec.file.unwrap_or("?").to_string(),
            Field::LineNo => rec
                .line
                .map(|l| l.to_string())
                .unwrap_or_else(|| "0".into()),
            Field::Name => rec.target.to_string(),
            Field::Module => rec
                .target
                .rsplit("::")
                .next()
                .unwrap_or(rec.target)
                .to_string(),
            Field::Process => std::process::id().to_string(),
            Field::Thread => std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_string(),
            Field::Message => rec.message.to_string(),
        }
    }
}

/// The parts of an event a line is made of (separate from tracing's types
/// so rendering is tested without a subscriber).
struct Record<'a> {
    level: &'static str,
    time: chrono::DateTime<chrono::Local>,
    file: Option<&'a str>,
    line: Option<u32>,
    target: &'a str,
    message: &'a str,
}

fn parse_format(format: &str) -> Result<Vec<Piece>> {
    let bad = |reason: &str| LoggingError::InvalidFormat {
        format: format.to_string(),
        reason: reason.to_string(),
    };
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(pos) = rest.find('%') {
        literal.push_str(&rest[..pos]);
        rest = &rest[pos + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            literal.push('%');
            rest = r;
            continue;
        }
        let Some(r) = rest.strip_prefix('(') else {
            return Err(bad("expected %(name)s or %%"));
        };
        let close = r.find(')').ok_or_else(|| bad("unclosed %("))?;
        let name = &r[..close];
        rest = &r[close + 1..];
        // Flags and width, then the conversion character.
        let spec_end = rest
            .find(|c: char| c.is_ascii_alphabetic())
            .ok_or_else(|| bad("missing conversion character"))?;
        let spec = &rest[..spec_end];
        rest = &rest[spec_end + 1..];
        let left = spec.starts_with('-');
        let digits: String = spec
            .trim_start_matches(['-', '+', ' ', '0', '#'])
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let width = digits.parse::<usize>().ok().map(|w| (left, w));
        let field = match name {
            "levelname" => Field::LevelName,
            "asctime" => Field::AscTime,
            "filename" => Field::FileName,
            "pathname" => Field::PathName,
            "lineno" => Field::LineNo,
            "message" => Field::Message,
            "name" => Field::Name,
            "module" | "funcName" => Field::Module,
            "process" => Field::Process,
            "threadName" => Field::Thread,
            other => return Err(bad(&format!("unsupported field %({other})"))),
        };
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        pieces.push(Piece::Field { field, width });
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(pieces)
}

/// What the logging setup resolved to.
#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub level: LevelFilter,
    pub format: LineFormat,
}

/// The level and formatter from a `dictConfig` JSON document: the `vllm`
/// logger's level (else the root's), and the formatter its first handler
/// uses (else the first formatter declared).
pub fn parse_config_file(
    path: &Path,
    text: &str,
    prefix: &str,
    default_level: LevelFilter,
) -> Result<LoggingConfig> {
    let invalid = |reason: String| LoggingError::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if !doc.is_object() {
        return Err(invalid("expected a JSON object".into()));
    }
    let logger = doc.pointer("/loggers/vllm").or_else(|| doc.get("root"));
    let level = match logger.and_then(|l| l.get("level")) {
        Some(serde_json::Value::String(s)) => parse_level(s)?,
        Some(other) => return Err(invalid(format!("level must be a string, got {other}"))),
        None => default_level,
    };
    let handler_formatter = logger
        .and_then(|l| l.get("handlers"))
        .and_then(|h| h.get(0))
        .and_then(|h| h.as_str())
        .and_then(|name| doc.pointer(&format!("/handlers/{name}/formatter")))
        .and_then(|f| f.as_str());
    let formatters = doc.get("formatters").and_then(|f| f.as_object());
    let formatter = match (handler_formatter, formatters) {
        (Some(name), Some(all)) => all.get(name),
        (None, Some(all)) => all.values().next(),
        _ => None,
    };
    let format = match formatter {
        Some(f) => {
            let fmt = f
                .get("format")
                .and_then(|v| v.as_str())
                .unwrap_or("%(message)s");
            let datefmt = f.get("datefmt").and_then(|v| v.as_str());
            LineFormat::new(prefix, fmt, datefmt)?
        }
        None => LineFormat::vllm_default(prefix),
    };
    Ok(LoggingConfig { level, format })
}

/// Resolves the configuration from the environment; `None` when
/// `VLLM_CONFIGURE_LOGGING=0` asks us to leave logging alone.
pub fn config_from_env() -> Result<Option<LoggingConfig>> {
    let configure = envs::flag(envs::VLLM_CONFIGURE_LOGGING);
    let config_path = envs::raw(envs::VLLM_LOGGING_CONFIG_PATH);
    if !configure {
        return match config_path {
            Some(path) => Err(LoggingError::ConfigWithoutConfigure { path }),
            None => Ok(None),
        };
    }
    let prefix = envs::raw(envs::VLLM_LOGGING_PREFIX).unwrap_or_default();
    let level = parse_level(&envs::raw(envs::VLLM_LOGGING_LEVEL).unwrap_or_else(|| "INFO".into()))?;
    match config_path {
        Some(path) => {
            let path = PathBuf::from(path);
            let text =
                std::fs::read_to_string(&path).map_err(|source| LoggingError::ReadConfig {
                    path: path.clone(),
                    source,
                })?;
            parse_config_file(&path, &text, &prefix, level).map(Some)
        }
        None => Ok(Some(LoggingConfig {
            level,
            format: LineFormat::vllm_default(&prefix),
        })),
    }
}

/// The tracing formatter for [`LineFormat`].
pub struct VllmFormatter {
    format: LineFormat,
}

impl<S, N> FormatEvent<S, N> for VllmFormatter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut message = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut message), event)?;
        let rec = Record {
            level: level_name(meta.level()),
            time: chrono::Local::now(),
            file: meta.file(),
            line: meta.line(),
            target: meta.target(),
            message: &message,
        };
        writeln!(writer, "{}", self.format.render(&rec))
    }
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutput {
    /// As vLLM's server logs.
    Stdout,
    /// For CLIs whose stdout is their answer (`orchestrator status`).
    Stderr,
}

/// Installs the global subscriber as the environment asks, logging to
/// stdout. Call once, first thing in `run()`.
pub fn init() -> Result<()> {
    init_to(LogOutput::Stdout)
}

pub fn init_to(output: LogOutput) -> Result<()> {
    let Some(config) = config_from_env()? else {
        return Ok(());
    };
    install(config, output)
}

pub fn install(config: LoggingConfig, output: LogOutput) -> Result<()> {
    let mut targets = Targets::new().with_default(LevelFilter::WARN.min(config.level));
    for t in OWN_TARGETS {
        targets = targets.with_target(*t, config.level);
    }
    let formatter = VllmFormatter {
        format: config.format,
    };
    let layer = tracing_subscriber::fmt::layer().event_format(formatter);
    let installed = match output {
        LogOutput::Stdout => tracing_subscriber::registry()
            .with(layer.with_writer(std::io::stdout).with_filter(targets))
            .try_init(),
        LogOutput::Stderr => tracing_subscriber::registry()
            .with(layer.with_writer(std::io::stderr).with_filter(targets))
            .try_init(),
    };
    installed.map_err(|e| LoggingError::AlreadyInstalled {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn record<'a>(message: &'a str) -> Record<'a> {
        Record {
            level: "INFO",
            time: chrono::Local
                .with_ymd_and_hms(2026, 11, 22, 14, 3, 5)
                .unwrap(),
            file: Some("gateway/src/openai/server.rs"),
            line: Some(123),
            target: "gateway::openai::server",
            message,
        }
    }

    #[test]
    fn default_shape_matches_vllm() {
        let f = LineFormat::vllm_default("");
        assert_eq!(
            f.render(&record("hello")),
            "INFO 11-22 14:03:05 [server.rs:123] hello"
        );
    }

    #[test]
    fn prefix_and_multiline() {
        let f = LineFormat::vllm_default("(node0) ");
        assert_eq!(
            f.render(&record("a\nb")),
            "(node0) INFO 11-22 14:03:05 [server.rs:123] a\n(node0) INFO 11-22 14:03:05 [server.rs:123] b"
        );
    }

    #[test]
    fn custom_format_with_width() {
        let f =
            LineFormat::new("", "%(levelname)-8s|%(name)s|%(message)s%%", Some("%H:%M")).unwrap();
        assert_eq!(
            f.render(&record("m")),
            "INFO    |gateway::openai::server|m%"
        );
    }

    #[test]
    fn bad_formats_are_errors() {
        assert!(LineFormat::new("", "%(nope)s", None).is_err());
        assert!(LineFormat::new("", "%(message", None).is_err());
        assert!(LineFormat::new("", "%d", None).is_err());
        assert!(parse_level("LOUD").is_err());
        assert_eq!(parse_level("warning").unwrap(), LevelFilter::WARN);
    }

    #[test]
    fn dict_config_level_and_formatter() {
        let json = r#"{
            "version": 1,
            "formatters": {"plain": {"format": "%(levelname)s %(message)s"},
                           "json": {"format": "%(asctime)s %(message)s", "datefmt": "%Y"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
            "loggers": {"vllm": {"handlers": ["console"], "level": "DEBUG"}}
        }"#;
        let c = parse_config_file(Path::new("x.json"), json, "", LevelFilter::INFO).unwrap();
        assert_eq!(c.level, LevelFilter::DEBUG);
        assert_eq!(c.format.render(&record("m")), "2026 m");
        let err = parse_config_file(Path::new("x.json"), "[", "", LevelFilter::INFO).unwrap_err();
        assert!(err.to_string().contains("x.json"));
    }
}
