//! HF safetensors: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use super::shard::{shard_matrix, shard_vector};
use super::{check_shape, HostMatrix, WeightSource};
use crate::error::{Error, Result};
use crate::parallel::Shard;

pub struct SafetensorsSource {
    st: MmapedSafetensors,
    names: BTreeSet<String>,
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: index.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(format!("{} lacks weight_map", index.display())))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::config(format!(
            "{}: no *.safetensors files",
            dir.display()
        )));
    }
    Ok(files)
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self> {
        let files = shard_files(dir)?;
        for f in &files {
            if !f.is_file() {
                return Err(Error::Io {
                    path: f.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                });
            }
        }
        // SAFETY: the files are mapped read-only; a model directory changing
        // under a running server is outside what we guard against.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::config(format!("{}: {e}", dir.display())))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { st, names })
    }

    fn load_f32(&self, name: &str) -> Result<candle_core::Tensor> {
        if !self.names.contains(name) {
            return Err(Error::weight(name, "missing from the safetensors files"));
        }
        let t = self
            .st
            .load(name, &Device::Cpu)
            .map_err(|e| Error::weight(name, e.to_string()))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
            other => Err(Error::weight(name, format!("unsupported dtype {other:?}"))),
        }
    }
}

impl WeightSource for SafetensorsSource {
    fn matrix(&mut self, name: &str, full: (usize, usize), shard: &Shard) -> Result<HostMatrix> {
        let t = self.load_f32(name)?;
        check_shape(name, t.dims(), &[full.0, full.1])?;
        shard_matrix(name, HostMatrix::Dense(t), shard)
    }

    fn vector(&mut self, name: &str, len: usize, shard: &Shard) -> Result<Vec<f32>> {
        let t = self.load_f32(name)?;
        check_shape(name, t.dims(), &[len])?;
        shard_vector(name, t.to_vec1()?, shard)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}
