//! How the KV pool stores a row (`--kv-cache-dtype`): the host codec, bit-exact with the
//! kernels' (`common.cuh`, `dsk_kv_*`). The pool is an array of 4-byte slots; a row of `dim`
//! values takes [`KvRowFormat::slots`] of them, little-endian bytes as the GPU lays them out.
//!
//! - `F32`: `dim` f32 (exact).
//! - `Bf16`: `dim` bf16, round to nearest even.
//! - `Fp8Latent { rope }`: the DeepSeek-V4 FP8 record of a latent (or compressed) KV row: the
//!   `dim - rope` "nope" values as e4m3 with one power-of-two (UE8M0) scale per 64 values, the
//!   `rope` rotated values as bf16 (RoPE dims lose too much as e4m3), then the scale bytes,
//!   padded to 4 bytes. V4-Flash: 448 + 128 + 7 + 1 = 584 bytes.
//! - `Fp8Indexer`: an indexer key row: `dim` e4m3 with one power-of-two scale for the row,
//!   stored as f32 after the values. V4-Flash: 128 + 4 = 132 bytes.
//!
//! A scale is the smallest power of two 2^e with amax / 2^e <= 448 (the e4m3 maximum), so no
//! value saturates and the scaling multiplies are exact; e is clamped to [-126, 126] so both
//! 2^e and 2^-e are normal f32. Values round to e4m3 to nearest even (the hardware
//! `cvt.rn.satfinite.e4m3x2.f32`).

use crate::formats::{bf16_to_f32, e4m3_to_f32, f32_to_bf16};

/// Values per UE8M0 scale in the latent record.
pub const FP8_GROUP: usize = 64;
/// Largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// How one KV row is stored in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvRowFormat {
    F32,
    Bf16,
    /// Latent/compressed KV row; `rope` trailing dims kept in bf16.
    Fp8Latent {
        rope: usize,
    },
    /// Lightning Indexer key row.
    Fp8Indexer,
}

/// Why a row shape cannot be stored in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV row format {format:?} cannot store rows of {dim} values: {why}")]
pub struct KvFormatError {
    pub format: KvRowFormat,
    pub dim: usize,
    pub why: &'static str,
}

impl KvRowFormat {
    /// The id the kernels take (`DSK_KV_*` in common.cuh).
    pub fn code(self) -> i32 {
        match self {
            KvRowFormat::F32 => 0,
            KvRowFormat::Bf16 => 1,
            KvRowFormat::Fp8Latent { .. } => 2,
            KvRowFormat::Fp8Indexer => 3,
        }
    }

    /// Trailing bf16 dims of the latent record (0 for every other format).
    pub fn rope(self) -> usize {
        match self {
            KvRowFormat::Fp8Latent { rope } => rope,
            _ => 0,
        }
    }

    /// Whether rows of `dim` values fit this format's alignment rules.
    pub fn check(self, dim: usize) -> Result<(), KvFormatError> {
        let fail = |why| {
            Err(KvFormatError {
                format: self,
                dim,
                why,
            })
        };
        match self {
            KvRowFormat::F32 => Ok(()),
            KvRowFormat::Bf16 if !dim.is_multiple_of(2) => fail("bf16 rows need an even width"),
            KvRowFormat::Bf16 => Ok(()),
            KvRowFormat::Fp8Latent { rope } if rope > dim => fail("more rope dims than dims"),
            // The bf16 part starts right after the e4m3 bytes: keep it 2-byte aligned.
            KvRowFormat::Fp8Latent { rope } if !(dim - rope).is_multiple_of(2) => {
                fail("the e4m3 part needs an even width")
            }
            KvRowFormat::Fp8Latent { .. } => Ok(()),
            // The f32 scale follows the values: keep it 4-byte aligned.
            KvRowFormat::Fp8Indexer if !dim.is_multiple_of(4) => {
                fail("indexer rows need a width divisible by 4")
            }
            KvRowFormat::Fp8Indexer => Ok(()),
        }
    }

    /// Bytes of one row of `dim` values (a multiple of 4).
    pub fn bytes(self, dim: usize) -> usize {
        match self {
            KvRowFormat::F32 => 4 * dim,
            KvRowFormat::Bf16 => (2 * dim).next_multiple_of(4),
            KvRowFormat::Fp8Latent { rope } => {
                let nope = dim.saturating_sub(rope);
                (nope + 2 * rope + nope.div_ceil(FP8_GROUP)).next_multiple_of(4)
            }
            KvRowFormat::Fp8Indexer => dim + 4,
        }
    }

    /// 4-byte pool slots of one row of `dim` values.
    pub fn slots(self, dim: usize) -> usize {
        self.bytes(dim) / 4
    }

    /// Stores `row` (`dim` values) into `out` (`slots(dim)` slots, as f32 bit patterns).
    pub fn encode(self, row: &[f32], out: &mut [f32]) {
        let dim = row.len();
        if self == KvRowFormat::F32 {
            out[..dim].copy_from_slice(row);
            return;
        }
        let mut bytes = vec![0u8; self.bytes(dim)];
        match self {
            KvRowFormat::F32 => return, // copied above
            KvRowFormat::Bf16 => {
                for (b, &v) in bytes.chunks_exact_mut(2).zip(row) {
                    b.copy_from_slice(&f32_to_bf16(v).to_le_bytes());
                }
            }
            KvRowFormat::Fp8Latent { rope } => {
                let nope = dim - rope;
                let scales_at = nope + 2 * rope;
                for (g, group) in row[..nope].chunks(FP8_GROUP).enumerate() {
                    let e = fp8_scale_exponent(amax(group));
                    bytes[scales_at + g] = (e + 127) as u8;
                    let inv = pow2(-e);
                    for (i, &v) in group.iter().enumerate() {
                        bytes[g * FP8_GROUP + i] = f32_to_e4m3(v * inv);
                    }
                }
                for (i, &v) in row[nope..].iter().enumerate() {
                    let at = nope + 2 * i;
                    bytes[at..at + 2].copy_from_slice(&f32_to_bf16(v).to_le_bytes());
                }
            }
            KvRowFormat::Fp8Indexer => {
                let e = fp8_scale_exponent(amax(row));
                let inv = pow2(-e);
                for (b, &v) in bytes.iter_mut().zip(row) {
                    *b = f32_to_e4m3(v * inv);
                }
                bytes[dim..dim + 4].copy_from_slice(&pow2(e).to_le_bytes());
            }
        }
        for (slot, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *slot = f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
    }

    /// Reads a row of `out.len()` values back from its slots.
    pub fn decode(self, slots: &[f32], out: &mut [f32]) {
        let dim = out.len();
        let bytes: Vec<u8> = slots
            .iter()
            .flat_map(|s| s.to_bits().to_le_bytes())
            .collect();
        let bf16_at = |at: usize| bf16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
        match self {
            KvRowFormat::F32 => out.copy_from_slice(&slots[..dim]),
            KvRowFormat::Bf16 => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = bf16_at(2 * i);
                }
            }
            KvRowFormat::Fp8Latent { rope } => {
                let nope = dim - rope;
                let scales_at = nope + 2 * rope;
                for (i, o) in out.iter_mut().enumerate() {
                    *o = if i < nope {
                        let e = i32::from(bytes[scales_at + i / FP8_GROUP]) - 127;
                        e4m3_to_f32(bytes[i]) * pow2(e)
                    } else {
                        bf16_at(nope + 2 * (i - nope))
                    };
                }
            }
            KvRowFormat::Fp8Indexer => {
                let scale = f32::from_le_bytes([
                    bytes[dim],
                    bytes[dim + 1],
                    bytes[dim + 2],
                    bytes[dim + 3],
                ]);
                for (o, &b) in out.iter_mut().zip(&bytes) {
                    *o = e4m3_to_f32(b) * scale;
                }
            }
        }
    }

    /// `rows` (each `dim` values, back to back) as stored: borrowed unchanged for f32 (the
    /// default pool's write path copies nothing), else encoded, `slots(dim)` slots per row.
    pub fn stored_rows(self, rows: &[f32], dim: usize) -> std::borrow::Cow<'_, [f32]> {
        match self {
            KvRowFormat::F32 => std::borrow::Cow::Borrowed(rows),
            _ => std::borrow::Cow::Owned(self.encode_rows(rows, dim)),
        }
    }

    /// `rows` (each `dim` values, back to back) encoded, `slots(dim)` slots per row.
    pub fn encode_rows(self, rows: &[f32], dim: usize) -> Vec<f32> {
        let slots = self.slots(dim);
        let n = rows.len().checked_div(dim).unwrap_or(0);
        let mut out = vec![0f32; n * slots];
        for (row, o) in rows
            .chunks_exact(dim.max(1))
            .zip(out.chunks_exact_mut(slots.max(1)))
        {
            self.encode(row, o);
        }
        out
    }
}

/// Largest |v| of a group (NaN ignored, as the kernels' fmaxf).
fn amax(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// 2^e for e in [-126, 127], built from its bits (exact).
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// The exponent of the scale for a group whose largest magnitude is `amax`: the smallest e with
/// amax <= 448 * 2^e, clamped to [-126, 126]. 448 = 1.75 * 2^8, so for amax = m * 2^E
/// (m in [1, 2)) that is E - 8, or E - 7 when m > 1.75. Zero and NaN groups get 0.
pub fn fp8_scale_exponent(amax: f32) -> i32 {
    if amax.is_nan() || amax <= 0.0 {
        return 0;
    }
    if amax.is_infinite() {
        return 126;
    }
    let bits = amax.to_bits();
    let field = ((bits >> 23) & 0xff) as i32;
    if field == 0 {
        return -126; // subnormal: far below any scale we can express
    }
    let e = field - 127 - 8 + i32::from(bits & 0x7f_ffff > 0x60_0000);
    e.clamp(-126, 126)
}

/// f32 -> OCP e4m3 ("fn": no infinities), round to nearest even, saturating to +-448; NaN
/// gives 0x7F. The same as the hardware's `cvt.rn.satfinite.e4m3x2.f32`.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    // Every value at or above the midpoint between 448 and the (absent) 480 saturates, and so
    // does anything above 448 under satfinite.
    if a > E4M3_MAX {
        return sign | 0x7e;
    }
    let min_normal = 2f32.powi(-6);
    let code = if a < min_normal {
        // Subnormals: m * 2^-9, m in 0..=7; m = 8 rounds up into the smallest normal (code 8).
        (a * 512.0).round_ties_even() as u8
    } else {
        let exp = ((a.to_bits() >> 23) & 0xff) as i32 - 127; // -6..=8
        let mant = a / 2f32.powi(exp); // [1, 2), exact
        let q = ((mant - 1.0) * 8.0).round_ties_even() as i32; // 0..=8
        let (exp, q) = if q == 8 { (exp + 1, 0) } else { (exp, q) };
        (((exp + 7) << 3) | q).min(0x7e) as u8
    };
    sign | code
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nearest e4m3 value to `x` by search over every finite code, ties to the even code.
    fn nearest_e4m3(x: f32) -> u8 {
        let mut best = (f64::INFINITY, 0u8);
        for c in 0u8..=0xff {
            let v = e4m3_to_f32(c);
            if v.is_nan() {
                continue;
            }
            let d = (f64::from(v) - f64::from(x)).abs();
            let better = d < best.0 || (d == best.0 && c & 1 == 0 && best.1 & 1 == 1);
            // -0 and +0 tie at distance |x|: keep the one with x's sign.
            let zero_sign = d == best.0 && v == 0.0 && (c & 0x80 != 0) == x.is_sign_negative();
            if better || zero_sign {
                best = (d, c);
            }
        }
        best.1
    }

    #[test]
    fn e4m3_encoding_is_the_nearest_value_ties_to_even() {
        // Every e4m3 value, every midpoint between neighbours, and points around them.
        let mut xs = Vec::new();
        for c in 0u8..=0x7e {
            let v = e4m3_to_f32(c);
            xs.extend([v, v * 1.0001, v * 0.9999]);
            if c < 0x7e {
                xs.push((v + e4m3_to_f32(c + 1)) / 2.0);
            }
        }
        xs.extend([
            1e-9,
            2f32.powi(-10),
            3.0 * 2f32.powi(-11),
            300.7,
            447.9,
            448.0,
        ]);
        let neg: Vec<f32> = xs.iter().map(|x| -x).collect();
        xs.extend(neg);
        for x in xs {
            assert_eq!(f32_to_e4m3(x), nearest_e4m3(x), "x = {x:e}");
        }
        assert_eq!(f32_to_e4m3(500.0), 0x7e);
        assert_eq!(f32_to_e4m3(-1e30), 0xfe);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
    }

    #[test]
    fn scales_are_the_smallest_power_of_two_that_fits() {
        for amax in [
            1e-30f32, 1e-3, 0.5, 1.0, 1.75, 1.7500001, 447.0, 448.0, 449.0, 1e20,
        ] {
            let e = fp8_scale_exponent(amax);
            assert!(amax / pow2(e) <= E4M3_MAX, "{amax}");
            if e > -126 {
                assert!(
                    amax / pow2(e - 1) > E4M3_MAX,
                    "{amax}: 2^{} fits too",
                    e - 1
                );
            }
        }
        assert_eq!(fp8_scale_exponent(0.0), 0);
        assert_eq!(fp8_scale_exponent(448.0), 0);
        assert_eq!(fp8_scale_exponent(449.0), 1);
    }

    #[test]
    fn v4_flash_records_have_the_documented_sizes() {
        assert_eq!(KvRowFormat::Fp8Latent { rope: 64 }.bytes(512), 584);
        assert_eq!(KvRowFormat::Fp8Indexer.bytes(128), 132);
        assert_eq!(KvRowFormat::Bf16.bytes(512), 1024);
        assert_eq!(KvRowFormat::F32.slots(512), 512);
        // The tiny test model: 48 e4m3 + 16 bf16 + 1 scale, padded.
        assert_eq!(KvRowFormat::Fp8Latent { rope: 16 }.bytes(64), 84);
        assert!(KvRowFormat::Fp8Indexer.check(30).is_err());
        assert!(KvRowFormat::Fp8Latent { rope: 15 }.check(64).is_err());
        assert!(KvRowFormat::Bf16.check(7).is_err());
    }

    #[test]
    fn records_round_trip_within_their_precision() {
        let dim = 512;
        let row: Vec<f32> = (0..dim)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0 + if i < 64 { 30.0 } else { 0.0 })
            .collect();
        for (format, rel) in [
            (KvRowFormat::F32, 0.0),
            (KvRowFormat::Bf16, 2f32.powi(-8)),
            // e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value.
            (KvRowFormat::Fp8Latent { rope: 64 }, 2f32.powi(-4)),
            (KvRowFormat::Fp8Indexer, 2f32.powi(-4)),
        ] {
            let slots = format.encode_rows(&row, dim);
            assert_eq!(slots.len(), format.slots(dim));
            let mut back = vec![0f32; dim];
            format.decode(&slots, &mut back);
            for (i, (&a, &b)) in row.iter().zip(&back).enumerate() {
                // Values far below the group's scale go subnormal: bound by the scale's step too.
                let step = match format {
                    KvRowFormat::Fp8Latent { .. } if i < 448 => {
                        let g = &row[i / 64 * 64..(i / 64 * 64 + 64).min(448)];
                        pow2(fp8_scale_exponent(amax(g))) * 2f32.powi(-10)
                    }
                    KvRowFormat::Fp8Indexer => {
                        pow2(fp8_scale_exponent(amax(&row))) * 2f32.powi(-10)
                    }
                    _ => 0.0,
                };
                let tol = if matches!(format, KvRowFormat::Fp8Latent { .. }) && i >= 448 {
                    2f32.powi(-8) * a.abs()
                } else {
                    rel * a.abs() + step
                };
                assert!((a - b).abs() <= tol, "{format:?} [{i}]: {a} -> {b}");
            }
        }
    }
}
