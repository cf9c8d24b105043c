//! Host-side decoding of the checkpoint's number formats, bit-exact with the kernels.
//! Used by the CPU references and by tests; independent of CUDA.

/// E2M1 nibble -> value (MODEL.md's table; element 2j is the LOW nibble of byte j).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// OCP FP8 E4M3 (the "fn" variant: no infinities, 0x7F/0xFF are NaN, max 448).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0xF);
    let man = f32::from(b & 0x7);
    if exp == 0xF && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// E8M0 scale byte -> 2^(s-127); 0xFF is NaN.
pub fn e8m0_to_f64(s: u8) -> f64 {
    if s == 0xFF {
        f64::NAN
    } else {
        2f64.powi(i32::from(s) - 127)
    }
}

/// Value of FP4 element `j` of a packed row.
pub fn e2m1_at(packed: &[u8], j: usize) -> f32 {
    let b = packed[j / 2];
    let nib = if j.is_multiple_of(2) { b & 0xF } else { b >> 4 };
    E2M1_VALUES[usize::from(nib)]
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Round to nearest even (as the kernels do); NaN stays NaN.
pub fn f32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    let r = u.wrapping_add(0x7fff + ((u >> 16) & 1));
    (r >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7F).is_nan());
        assert_eq!(e4m3_to_f32(0x80), 0.0);
    }

    #[test]
    fn e2m1_nibble_order_low_first() {
        // byte 0x72: low nibble 2 (1.0) is element 0, high nibble 7 (6.0) is element 1.
        let row = [0x72u8, 0xF9];
        assert_eq!(e2m1_at(&row, 0), 1.0);
        assert_eq!(e2m1_at(&row, 1), 6.0);
        assert_eq!(e2m1_at(&row, 2), -0.5);
        assert_eq!(e2m1_at(&row, 3), -6.0);
    }

    #[test]
    fn e8m0_scale() {
        assert_eq!(e8m0_to_f64(127), 1.0);
        assert_eq!(e8m0_to_f64(120), 2f64.powi(-7));
        assert!(e8m0_to_f64(255).is_nan());
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3F80);
        // Just above halfway rounds up.
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3F81);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    /// The kernel's FP4 decoder puts the three magnitude bits under the f16 exponent boundary and
    /// scales by 2^14 afterwards; check that trick against the table for all 16 codes.
    #[test]
    fn e2m1_f16_bit_trick_matches_table() {
        for nib in 0u32..16 {
            let h = ((nib & 0x7) << 9) | ((nib & 0x8) << 12);
            let v = f16_bits_to_f64(h as u16) * 16384.0;
            assert_eq!(v as f32, E2M1_VALUES[nib as usize], "nibble {nib}");
        }
    }

    fn f16_bits_to_f64(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1F);
        let man = f64::from(h & 0x3FF);
        if exp == 0 {
            sign * man / 1024.0 * 2f64.powi(-14)
        } else {
            sign * (1.0 + man / 1024.0) * 2f64.powi(exp - 15)
        }
    }
}
