//! Weight loading: safetensors (single or sharded, mmapped), GGUF (linear
//! weights stay quantized) and dummy random weights, with tensor-parallel
//! slicing applied as each weight is read.

mod dummy;
mod gguf;
mod safetensors;
pub mod shard;

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::Shard;

pub use crate::load_format::LoadFormat;
pub use dummy::DummyMatrix;

/// A weight matrix [out, in] as loaded, before the backend takes it.
#[derive(Clone, Debug)]
pub enum HostMatrix {
    /// f32, contiguous.
    Dense(Tensor),
    /// GGML-quantized rows, used as is by quantized matmul kernels.
    Quantized(Arc<QTensor>),
    /// `--load-format dummy` values not made yet: the backend makes them
    /// where the weight will live (on the GPU: in device memory).
    Dummy(DummyMatrix),
}

impl HostMatrix {
    pub fn dims(&self) -> (usize, usize) {
        let d = match self {
            Self::Dense(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::Dummy(d) => return d.dims(),
        };
        (d[0], d[1])
    }

    /// Dense f32 copy (for embedding lookup tables).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized(q) => Ok(q.dequantize(&candle_core::Device::Cpu)?),
            Self::Dummy(d) => d.materialize(),
        }
    }
}

/// A linear layer's weight and optional bias.
#[derive(Clone, Debug)]
pub struct HostLinear {
    pub weight: HostMatrix,
    pub bias: Option<Vec<f32>>,
}

/// Where the model's weights come from. Names are HF names; each source
/// maps them to its own and slices the requested shard.
pub trait WeightSource {
    /// `full` is the unsharded [out, in] shape, checked against the file.
    fn matrix(&mut self, name: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix>;
    /// A 1-D tensor (norm weight, bias); `shard` is a range of it or `Full`.
    fn vector(&mut self, name: &str, len: usize, shard: &Shard) -> Result<Vec<f32>>;
    fn contains(&self, name: &str) -> bool;
}

/// Opens the weight source for `model` in `format`.
pub fn open(
    model: &Path,
    format: LoadFormat,
    cfg: &ModelConfig,
    seed: u64,
) -> Result<Box<dyn WeightSource>> {
    Ok(match format.resolve(model)? {
        LoadFormat::Safetensors => Box::new(safetensors::SafetensorsSource::open(model)?),
        LoadFormat::Gguf => Box::new(gguf::GgufSource::open(model, cfg)?),
        LoadFormat::Dummy => Box::new(dummy::DummySource::new(seed)),
        LoadFormat::Auto => return Err(Error::config("load format auto was not resolved")),
    })
}

pub(crate) fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return Err(Error::WeightShape {
            name: name.to_string(),
            got: got.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_format_parses() {
        assert_eq!("gguf".parse::<LoadFormat>().unwrap(), LoadFormat::Gguf);
        assert_eq!("dummy".parse::<LoadFormat>().unwrap(), LoadFormat::Dummy);
        let e = "pt".parse::<LoadFormat>().unwrap_err().to_string();
        assert!(e.contains("safetensors"), "{e}");
    }
}
