//! Element types the CPU backend stores weights and KV in: f32, and the two
//! 16-bit floats behind `--dtype bfloat16|float16`. Kernels are generic over
//! `Elem` and always compute in f32, widening as they load.

use half::{bf16, f16};

pub trait Elem: Copy + Default + Send + Sync + bytemuck::Zeroable + 'static {
    /// Exact widening. Written with plain integer/float ops (no per-call CPU
    /// feature checks) so loops over it vectorize.
    fn to_f32(self) -> f32;
    /// Round to nearest even, as PyTorch casts.
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        let h = self.to_bits() as u32;
        let sign = (h & 0x8000) << 16;
        let em = h & 0x7fff;
        // Shifting exponent+mantissa into f32 position and scaling by
        // 2^(127-15) rebiases normals and normalizes subnormals exactly;
        // Inf/NaN only need the exponent field filled.
        let v = if em >= 0x7c00 {
            f32::from_bits((em << 13) | 0x7f80_0000)
        } else {
            f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)
        };
        f32::from_bits(v.to_bits() | sign)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Rounds every value to the nearest one `E` can hold, so an f32 buffer
/// carries exactly what an `E` tensor would.
pub fn round_slice<E: Elem>(v: &mut [f32]) {
    for x in v {
        *x = E::from_f32(*x).to_f32();
    }
}

pub fn convert<E: Elem>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_f32(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_matches_half_on_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (ours, theirs) = (Elem::to_f32(h), h.to_f32());
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{bits:#06x}: {ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn bf16_widening_matches_half() {
        for bits in (0..=u16::MAX).step_by(7) {
            let h = bf16::from_bits(bits);
            let (ours, theirs) = (Elem::to_f32(h), h.to_f32());
            assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()));
        }
    }

    #[test]
    fn rounding_keeps_representable_values() {
        let mut v = vec![1.0f32, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 512.0, 70000.0];
        round_slice::<bf16>(&mut v);
        // 1 + 2^-8 is a bf16 tie and goes to even (1.0); 1 + 3*2^-9 rounds up.
        assert_eq!(v[..3], [1.0, 1.0, 1.0 + 1.0 / 128.0]);
        let mut h = vec![70000.0f32, 0.1];
        round_slice::<f16>(&mut h);
        assert!(h[0].is_infinite());
        assert_eq!(h[1], f16::from_f32(0.1).to_f32());
    }
}
