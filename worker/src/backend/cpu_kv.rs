//! The CPU backend's KV cache: host memory in the compute dtype.

use half::{bf16, f16};

use super::elem::Elem;
use super::ComputeDtype;
use crate::error::{Error, Result};
use crate::kv_cache::KvCacheSpec;

/// One element type's K and V planes, one `Vec` per layer.
pub struct KvPlanes<E> {
    pub k: Vec<Vec<E>>,
    pub v: Vec<Vec<E>>,
}

/// KV is stored in the compute dtype, as vLLM's `kv_cache_dtype=auto` does:
/// 16-bit dtypes halve its memory, so twice the blocks fit.
pub enum KvStorage {
    F32(KvPlanes<f32>),
    Bf16(KvPlanes<bf16>),
    F16(KvPlanes<f16>),
}

/// Runs `$body` with `$p` bound to the storage's planes, whatever their
/// element type (each arm is a separate monomorphization).
macro_rules! with_planes {
    ($storage:expr, $p:ident => $body:expr) => {
        match $storage {
            $crate::backend::cpu_kv::KvStorage::F32($p) => $body,
            $crate::backend::cpu_kv::KvStorage::Bf16($p) => $body,
            $crate::backend::cpu_kv::KvStorage::F16($p) => $body,
        }
    };
}
pub(crate) use with_planes;

/// Host-memory KV cache (CPU backend).
pub struct CpuKvCache {
    pub spec: KvCacheSpec,
    pub num_blocks: usize,
    pub storage: KvStorage,
}

impl CpuKvCache {
    pub fn new(spec: KvCacheSpec, num_blocks: usize, dtype: ComputeDtype) -> Result<Self> {
        let n = num_blocks
            .checked_mul(spec.block_elems())
            .ok_or_else(|| Error::config(format!("{num_blocks} KV blocks overflow memory")))?;
        // Zeroed allocations: the OS hands out untouched pages lazily, so a
        // 4 GiB cache costs nothing until blocks are written.
        fn planes<E: Elem>(layers: usize, n: usize) -> KvPlanes<E> {
            KvPlanes {
                k: (0..layers).map(|_| bytemuck::zeroed_vec(n)).collect(),
                v: (0..layers).map(|_| bytemuck::zeroed_vec(n)).collect(),
            }
        }
        let l = spec.num_layers;
        let storage = match dtype {
            ComputeDtype::F32 => KvStorage::F32(planes(l, n)),
            ComputeDtype::Bf16 => KvStorage::Bf16(planes(l, n)),
            ComputeDtype::F16 => KvStorage::F16(planes(l, n)),
        };
        Ok(Self {
            spec,
            num_blocks,
            storage,
        })
    }

    /// Writes token rows of K and V (each `num_kv_heads * head_dim` wide,
    /// starting at `k_col`/`v_col` of rows `stride` apart in `src`) to their slots.
    pub fn write(
        &mut self,
        layer: usize,
        src: &[f32],
        stride: usize,
        k_col: usize,
        v_col: usize,
        slots: &[usize],
    ) -> Result<()> {
        let capacity = self.num_blocks * self.spec.block_size;
        if let Some(&slot) = slots.iter().find(|&&s| s >= capacity) {
            return Err(Error::BlockOutOfRange {
                block_id: (slot / self.spec.block_size) as u32,
                num_blocks: self.num_blocks,
            });
        }
        let cols = (stride, k_col, v_col);
        with_planes!(&mut self.storage, p => write_planes(p, &self.spec, layer, src, cols, slots));
        Ok(())
    }
}

fn write_planes<E: Elem>(
    p: &mut KvPlanes<E>,
    spec: &KvCacheSpec,
    layer: usize,
    src: &[f32],
    (stride, k_col, v_col): (usize, usize, usize),
    slots: &[usize],
) {
    let hd = spec.head_dim;
    let (k, v) = (&mut p.k[layer], &mut p.v[layer]);
    for (t, &slot) in slots.iter().enumerate() {
        let row = &src[t * stride..(t + 1) * stride];
        for h in 0..spec.num_kv_heads {
            let dst = spec.offset(slot, h);
            let (ks, vs) = (k_col + h * hd, v_col + h * hd);
            for (d, s) in k[dst..dst + hd].iter_mut().zip(&row[ks..ks + hd]) {
                *d = E::from_f32(*s);
            }
            for (d, s) in v[dst..dst + hd].iter_mut().zip(&row[vs..vs + hd]) {
                *d = E::from_f32(*s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_land_in_their_slots() {
        let spec = KvCacheSpec {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 2,
            block_size: 4,
            dtype_bytes: 4,
        };
        assert_eq!(spec.bytes_per_block(), 2 * 16 * 4);
        // One token row: q (ignored) | k heads | v heads.
        let row = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let o = spec.offset(9, 1);
        let mut c = CpuKvCache::new(spec, 3, ComputeDtype::F32).unwrap();
        c.write(0, &row, 10, 2, 6, &[9]).unwrap();
        let KvStorage::F32(p) = &c.storage else {
            panic!("f32 storage expected")
        };
        assert_eq!(&p.k[0][o..o + 2], &[3.0, 4.0]);
        assert_eq!(&p.v[0][o..o + 2], &[7.0, 8.0]);
        assert!(c.write(0, &row, 10, 2, 6, &[12]).is_err());

        let mut h = CpuKvCache::new(spec, 3, ComputeDtype::Bf16).unwrap();
        h.write(0, &row, 10, 2, 6, &[9]).unwrap();
        let KvStorage::Bf16(p) = &h.storage else {
            panic!("bf16 storage expected")
        };
        assert_eq!(p.v[0][o + 1].to_f32(), 8.0);
    }
}
