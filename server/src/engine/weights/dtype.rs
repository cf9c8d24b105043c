//! Element types of checkpoint tensors and their conversion to f32.

use std::sync::OnceLock;

/// Element type of a stored tensor. FP4 weights are stored as `I8` (or `U8`) bytes holding two
/// e2m1 values each; [`super::WeightFormat`] says how to read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    F8E4M3,
    F8E8M0,
    I8,
    U8,
    I32,
    I64,
}

impl DType {
    /// Bytes per stored element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::F8E4M3 | DType::F8E8M0 | DType::I8 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E8M0
        )
    }

    pub fn is_integer(self) -> bool {
        matches!(self, DType::I8 | DType::U8 | DType::I32 | DType::I64)
    }

    /// The safetensors header spelling.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::I32 => "I32",
            DType::I64 => "I64",
        }
    }

    pub(crate) fn from_safetensors(dtype: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match dtype {
            S::F32 => DType::F32,
            S::BF16 => DType::BF16,
            S::F16 => DType::F16,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E8M0 => DType::F8E8M0,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// OCP e4m3 ("fn": no infinities; S.1111.111 is NaN), exponent bias 7.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
            let exp = ((b >> 3) & 0x0F) as i32;
            let man = (b & 0x07) as f32;
            *v = if b & 0x7F == 0x7F {
                f32::NAN
            } else if exp == 0 {
                sign * man / 8.0 * 2f32.powi(-6)
            } else {
                sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
        }
        t
    })[byte as usize]
}

/// E8M0 scale byte: 2^(byte - 127); 0xFF is NaN. Read as raw bits, never as a number.
pub fn e8m0_to_f32(byte: u8) -> f32 {
    match byte {
        0xFF => f32::NAN,
        // 2^-127 is an f32 subnormal.
        0 => f32::from_bits(0x0040_0000),
        b => f32::from_bits((b as u32) << 23),
    }
}

/// FP4 e2m1 nibble -> value (sign in bit 3).
pub const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Float value of element `index` of little-endian `bytes` stored as `dtype`.
/// Callers check `dtype.is_float()`; integer dtypes convert numerically.
pub(crate) fn element_f32(dtype: DType, bytes: &[u8], index: usize) -> f32 {
    let s = dtype.size();
    let b = &bytes[index * s..index * s + s];
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F8E4M3 => e4m3_to_f32(b[0]),
        DType::F8E8M0 => e8m0_to_f32(b[0]),
        DType::I8 => b[0] as i8 as f32,
        DType::U8 => b[0] as f32,
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
        DType::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
    }
}

/// Appends the values of a contiguous run of little-endian `dtype` elements (one dtype dispatch
/// per run, not per element).
pub(crate) fn extend_f32(dtype: DType, run: &[u8], out: &mut Vec<f32>) {
    match dtype {
        DType::F32 => out.extend(
            run.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        DType::BF16 => out.extend(
            run.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::F16 => out.extend(
            run.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::F8E4M3 => out.extend(run.iter().map(|&b| e4m3_to_f32(b))),
        DType::F8E8M0 => out.extend(run.iter().map(|&b| e8m0_to_f32(b))),
        other => {
            let n = run.len() / other.size();
            out.extend((0..n).map(|i| element_f32(other, run, i)));
        }
    }
}

/// Integer value of element `index`; callers check `dtype.is_integer()`.
pub(crate) fn element_i64(dtype: DType, bytes: &[u8], index: usize) -> i64 {
    let s = dtype.size();
    let b = &bytes[index * s..index * s + s];
    match dtype {
        DType::I8 => b[0] as i8 as i64,
        DType::U8 => b[0] as i64,
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
        DType::I64 => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        _ => element_f32(dtype, bytes, index) as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xB8), -1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn e8m0_known_values() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
    }
}
