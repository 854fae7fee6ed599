//! The engine's one error type: bad requests, bad engine arguments, worker
//! failures and a stopped engine.

use worker::sampling_params::InvalidParam;

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("The decoder prompt cannot be empty.")]
    EmptyPrompt,

    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {requested} tokens ({prompt} in the messages, {completion} in the completion). Please \
         reduce the length of the messages or completion."
    )]
    ContextLength {
        max_model_len: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
    },

    /// No room left for even one generated token.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, your request \
         has {prompt} input tokens. Please reduce the length of the input messages."
    )]
    PromptTooLong { max_model_len: usize, prompt: usize },

    /// vLLM's wording for an embedding input past the model's length.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {prompt} tokens in the input for embedding generation. Please reduce the length of the \
         input."
    )]
    EmbeddingInputTooLong { max_model_len: usize, prompt: usize },

    #[error("token id {token_id} in the prompt is out of vocabulary (size {vocab_size}).")]
    TokenOutOfVocab { token_id: u32, vocab_size: usize },

    /// Keeps the parameter name so the server can fill OpenAI's `param`.
    #[error(transparent)]
    InvalidParam(#[from] InvalidParam),

    /// A schema, regex, choice list or grammar that cannot be compiled.
    #[error(transparent)]
    StructuredOutput(#[from] super::structured_output::StructuredOutputError),

    #[error("Request id {request_id} is already running.")]
    DuplicateRequest { request_id: String },

    /// `--max-concurrent-requests` reached: a 503 with Retry-After.
    #[error(
        "The server is overloaded: {limit} requests are already in progress \
         (--max-concurrent-requests); retry later."
    )]
    Overloaded { limit: usize },

    #[error("invalid value for {arg}: {message}")]
    InvalidArgs { arg: &'static str, message: String },

    #[error("{feature} is not available yet: {message}")]
    Unsupported {
        feature: &'static str,
        message: String,
    },

    #[error(transparent)]
    Env(#[from] crate::envs::EnvError),

    /// A vLLM setting in the environment Flotilla cannot honour.
    #[error(transparent)]
    Startup(#[from] runtime::envs::StartupError),

    /// `VLLM_CPU_OMP_THREADS_BIND` cannot be applied.
    #[error(transparent)]
    CpuThreads(#[from] worker::cpu_threads::CpuThreadsError),

    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    /// Reading the model's config or generation config.
    #[error(transparent)]
    Model(#[from] worker::Error),

    #[error(
        "To serve at least one request with the model's max seq len ({max_model_len}), \
         {needed_gib:.2} GiB KV cache is needed, which is larger than the available KV cache \
         memory ({available_gib:.2} GiB). Based on the available memory, the estimated maximum \
         model length is {estimated_max_len}. Try increasing VLLM_CPU_KVCACHE_SPACE or \
         decreasing `max_model_len` when initializing the engine."
    )]
    KvCacheTooSmall {
        max_model_len: usize,
        needed_gib: f64,
        available_gib: f64,
        estimated_max_len: usize,
    },

    #[error(transparent)]
    Executor(#[from] crate::executor::ExecutorError),

    #[error("the engine is not running ({reason})")]
    EngineDead { reason: String },
}

impl EngineError {
    /// The request parameter at fault, for OpenAI's error `param` field.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            EngineError::InvalidParam(p) => Some(p.param),
            EngineError::ContextLength { .. } => Some("max_tokens"),
            EngineError::EmptyPrompt | EngineError::PromptTooLong { .. } => Some("prompt"),
            _ => None,
        }
    }

    /// True when the caller sent something wrong (HTTP 400), false for
    /// server-side failures.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            EngineError::EmptyPrompt
                | EngineError::ContextLength { .. }
                | EngineError::PromptTooLong { .. }
                | EngineError::EmbeddingInputTooLong { .. }
                | EngineError::TokenOutOfVocab { .. }
                | EngineError::InvalidParam(_)
                | EngineError::DuplicateRequest { .. }
                | EngineError::StructuredOutput(_)
        )
    }
}
