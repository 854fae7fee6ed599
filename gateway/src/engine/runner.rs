//! vLLM's `--runner`, `--convert` and the older `--task`: whether the
//! engine generates text or pools (embeddings), decided from the flags and
//! the model's architecture as vLLM decides it.

use super::error::{EngineError, Result};

/// vLLM's `--runner`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerOption {
    /// From the architecture: encoder `*Model` classes pool, the rest generate.
    #[default]
    Auto,
    Generate,
    Pooling,
}

/// vLLM's `--convert`: adapt a model to a pooling task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertOption {
    #[default]
    Auto,
    None,
    Embed,
    Classify,
    Reward,
}

/// vLLM's deprecated `--task`, mapped onto runner and convert.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TaskOption {
    #[default]
    Auto,
    Generate,
    Embed,
    Embedding,
    Classify,
    Score,
    Reward,
    Transcription,
}

/// What the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnerKind {
    Generate,
    /// Embeddings (`/v1/embeddings`).
    Pooling,
}

/// The runner for `architecture` under the flags. Pooling is what
/// encoder architectures (`worker::pooling::POOLING_ARCHITECTURES`) do
/// natively; turning a generative model into an embedding model, or any
/// classify / reward conversion, is refused as not available yet.
pub fn resolve(
    runner: RunnerOption,
    convert: ConvertOption,
    task: TaskOption,
    architecture: &str,
) -> Result<RunnerKind> {
    let (mut runner, mut convert) = (runner, convert);
    if task != TaskOption::Auto {
        if runtime::envs::deprecation_warnings() {
            tracing::warn!(
                "--task is deprecated and will be removed in a future vLLM release; use --runner and --convert"
            );
        }
        let (r, c) = match task {
            TaskOption::Generate | TaskOption::Transcription => {
                (RunnerOption::Generate, ConvertOption::Auto)
            }
            TaskOption::Embed | TaskOption::Embedding => {
                (RunnerOption::Pooling, ConvertOption::Embed)
            }
            TaskOption::Classify | TaskOption::Score => {
                (RunnerOption::Pooling, ConvertOption::Classify)
            }
            TaskOption::Reward => (RunnerOption::Pooling, ConvertOption::Reward),
            TaskOption::Auto => (RunnerOption::Auto, ConvertOption::Auto),
        };
        if runner == RunnerOption::Auto {
            runner = r;
        }
        if convert == ConvertOption::Auto {
            convert = c;
        }
    }
    let native_pooling = worker::pooling::is_pooling_architecture(architecture);
    if matches!(convert, ConvertOption::Classify | ConvertOption::Reward) {
        return Err(EngineError::Unsupported {
            feature: "classification or reward conversion",
            message: format!(
                "--convert {}: Flotilla's pooling runner serves embeddings (--convert embed) only",
                if convert == ConvertOption::Classify {
                    "classify"
                } else {
                    "reward"
                }
            ),
        });
    }
    let kind = match runner {
        RunnerOption::Generate => RunnerKind::Generate,
        RunnerOption::Pooling => RunnerKind::Pooling,
        RunnerOption::Auto if native_pooling || convert == ConvertOption::Embed => {
            RunnerKind::Pooling
        }
        RunnerOption::Auto => RunnerKind::Generate,
    };
    match kind {
        RunnerKind::Generate if native_pooling => Err(EngineError::InvalidArgs {
            arg: "--runner",
            message: format!(
                "{architecture} is a pooling model and does not support --runner generate; use --runner pooling"
            ),
        }),
        RunnerKind::Generate if convert == ConvertOption::Embed => Err(EngineError::InvalidArgs {
            arg: "--convert",
            message: "--convert embed needs --runner pooling".into(),
        }),
        RunnerKind::Pooling if !native_pooling => Err(EngineError::Unsupported {
            feature: "embeddings from a generative model",
            message: format!(
                "--runner pooling / --convert embed on {architecture}; the pooling architectures are {}",
                worker::pooling::POOLING_ARCHITECTURES.join(", ")
            ),
        }),
        kind => Ok(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_resolution() {
        use ConvertOption as C;
        use RunnerOption as R;
        use TaskOption as T;
        let ok = |r, c, t, arch| resolve(r, c, t, arch).unwrap();
        // Auto-detected from the architecture, as vLLM does.
        assert_eq!(
            ok(R::Auto, C::Auto, T::Auto, "BertModel"),
            RunnerKind::Pooling
        );
        assert_eq!(
            ok(R::Auto, C::Auto, T::Auto, "LlamaForCausalLM"),
            RunnerKind::Generate
        );
        assert_eq!(
            ok(R::Pooling, C::Auto, T::Auto, "BertModel"),
            RunnerKind::Pooling
        );
        assert_eq!(
            ok(R::Auto, C::Embed, T::Auto, "BertModel"),
            RunnerKind::Pooling
        );
        assert_eq!(
            ok(R::Auto, C::Auto, T::Embed, "BertModel"),
            RunnerKind::Pooling
        );
        assert_eq!(
            ok(R::Auto, C::Auto, T::Embedding, "BertModel"),
            RunnerKind::Pooling
        );
        assert_eq!(
            ok(R::Auto, C::Auto, T::Generate, "LlamaForCausalLM"),
            RunnerKind::Generate
        );
        // Refused, each with its reason.
        for (r, c, t, arch, wanted) in [
            (
                R::Generate,
                C::Auto,
                T::Auto,
                "BertModel",
                "does not support --runner generate",
            ),
            (
                R::Auto,
                C::Auto,
                T::Generate,
                "BertModel",
                "does not support --runner generate",
            ),
            (
                R::Pooling,
                C::Auto,
                T::Auto,
                "LlamaForCausalLM",
                "not available yet",
            ),
            (
                R::Auto,
                C::Auto,
                T::Embed,
                "LlamaForCausalLM",
                "not available yet",
            ),
            (
                R::Pooling,
                C::Classify,
                T::Auto,
                "BertModel",
                "--convert classify",
            ),
            (R::Auto, C::Auto, T::Reward, "BertModel", "--convert reward"),
        ] {
            let e = resolve(r, c, t, arch).unwrap_err().to_string();
            assert!(e.contains(wanted), "{r:?} {c:?} {t:?} {arch}: {e}");
        }
    }
}
