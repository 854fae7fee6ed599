//! The CLI's error type: whatever a subcommand can fail with.

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Logging(#[from] crate::logging::LoggingError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Server(#[from] crate::openai::ServerError),
    #[error(transparent)]
    Llm(#[from] crate::llm::LlmError),
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat_template::ChatTemplateError),
    #[error(transparent)]
    ConfigFile(#[from] Box<runtime::config_file::ConfigFileError>),
    #[error("{flag}: {message}")]
    InvalidArg { flag: &'static str, message: String },
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {message}")]
    Api {
        url: String,
        status: u16,
        message: String,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, CliError>;
