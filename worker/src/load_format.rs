//! `--load-format`: how a model's files are read. Its own module because
//! both the config reader and the weight loader need it.

use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadFormat {
    /// A `.gguf` file loads as GGUF, a directory as safetensors.
    #[default]
    Auto,
    Safetensors,
    Gguf,
    /// Random weights at the config's shapes (seeded).
    Dummy,
}

impl FromStr for LoadFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "safetensors" => Ok(Self::Safetensors),
            "gguf" => Ok(Self::Gguf),
            "dummy" => Ok(Self::Dummy),
            other => Err(Error::Unsupported {
                what: "load format",
                value: other.to_string(),
                supported: Self::NAMES.join(", "),
            }),
        }
    }
}

impl LoadFormat {
    /// Every `--load-format` spelling `from_str` accepts.
    pub const NAMES: &'static [&'static str] = &["auto", "safetensors", "gguf", "dummy"];

    /// The `--load-format` spelling (what `from_str` parses).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
            Self::Dummy => "dummy",
        }
    }

    /// Resolves `Auto` from what `model` is on disk.
    pub fn resolve(self, model: &Path) -> Result<LoadFormat> {
        if !model.exists() {
            return Err(Error::Io {
                path: model.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        Ok(match self {
            Self::Auto if model.is_dir() => Self::Safetensors,
            Self::Auto
                if model
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf")) =>
            {
                Self::Gguf
            }
            Self::Auto => {
                return Err(Error::config(format!(
                    "{}: expected an HF model directory or a .gguf file",
                    model.display()
                )))
            }
            other => other,
        })
    }
}
