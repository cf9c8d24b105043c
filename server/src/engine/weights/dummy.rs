//! `--load-format dummy`: deterministic pseudo-random tensors of the right shapes and stored
//! dtypes (FP8 with block scales, FP4 packed with group scales, valid `tid2eid` expert ids), for
//! benchmarks without weights.
//!
//! A full-size checkpoint does not fit in host memory twice, so tensors above 64 KiB are windows
//! into one shared random pool per dtype (each tensor at its own name-derived offset); smaller
//! tensors get their own bytes. (The threshold sits below the 256 KiB scale of one V4-Flash FP4
//! expert matrix: 33k of those would otherwise take 8.6 GB.)

use std::collections::{BTreeMap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{
    scale_name_for, Blob, Checkpoint, DType, StoredTensor, TensorSpec, FP4_GROUP, FP8_BLOCK,
};

const POOLED_ABOVE: usize = 64 << 10;
/// Extra pool bytes beyond its largest tensor, so equally large tensors get different windows.
const POOL_HEADROOM: usize = 1 << 20;
/// Magnitude of pooled float values (large matrices, embeddings).
const POOL_AMPLITUDE: f32 = 1.0 / 32.0;

/// What one generated tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fill {
    /// Floats uniform in [-amp, amp] around `center`.
    Float {
        center_milli: i32,
        amp_micro: u32,
    },
    /// e4m3 values with magnitudes in [1/8, 4).
    Fp8,
    /// Random e2m1 nibbles.
    Fp4,
    /// E8M0 bytes near 2^(e - 127) (scales); f32 scales hold the same values.
    Scale {
        exponent: u8,
    },
    /// Expert ids: each row distinct values in 0..experts.
    ExpertIds {
        experts: usize,
    },
    Zeros,
}

struct Planned {
    name: String,
    dtype: DType,
    stored_shape: Vec<usize>,
    fill: Fill,
}

pub(super) fn build(manifest: &[TensorSpec], seed: u64) -> Checkpoint {
    let by_name: HashMap<&str, &TensorSpec> =
        manifest.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut planned: BTreeMap<String, Planned> = BTreeMap::new();
    for spec in manifest {
        for p in plan(spec, &by_name, manifest) {
            planned.insert(p.name.clone(), p);
        }
    }
    // Scales listed in the manifest are made with their weight (above); keep only one of each.
    let plans: Vec<Planned> = planned.into_values().collect();

    let mut small = Vec::new();
    let mut pool_len: HashMap<(DType, Fill), usize> = HashMap::new();
    for p in &plans {
        let len = p.stored_shape.iter().product::<usize>() * p.dtype.size();
        if pooled(p, len) {
            let key = (p.dtype, pool_fill(p.fill));
            let cur = pool_len.entry(key).or_insert(0);
            *cur = (*cur).max(len);
        }
    }
    let mut pool_keys: Vec<(DType, Fill)> = pool_len.keys().copied().collect();
    pool_keys.sort_by_key(|k| format!("{k:?}"));
    let mut blobs = vec![];
    let mut pool_blob: HashMap<(DType, Fill), usize> = HashMap::new();
    for key in pool_keys {
        // Headroom so that equally large tensors (embed, head) get different windows.
        let max = pool_len[&key];
        let len = max + (max / 4).max(POOL_HEADROOM) / key.0.size() * key.0.size();
        pool_len.insert(key, len);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&format!("pool {key:?}")));
        let mut bytes = Vec::with_capacity(len);
        let n = len / key.0.size();
        fill_bytes(&mut bytes, key.0, key.1, &[n], &mut rng);
        pool_blob.insert(key, blobs.len());
        blobs.push(Blob::Owned(bytes));
    }
    let small_blob = blobs.len();
    let mut stored = Vec::with_capacity(plans.len());
    for p in plans {
        let len = p.stored_shape.iter().product::<usize>() * p.dtype.size();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(&p.name));
        let (blob, offset) = if pooled(&p, len) {
            let key = (p.dtype, pool_fill(p.fill));
            let pool = pool_len[&key];
            let slots = (pool - len) / p.dtype.size() + 1;
            (pool_blob[&key], rng.random_range(0..slots) * p.dtype.size())
        } else {
            let offset = small.len();
            fill_bytes(&mut small, p.dtype, p.fill, &p.stored_shape, &mut rng);
            (small_blob, offset)
        };
        stored.push(StoredTensor {
            origin: format!("dummy: {}", p.name),
            name: p.name,
            dtype: p.dtype,
            shape: p.stored_shape,
            blob,
            offset,
            len,
        });
    }
    blobs.push(Blob::Owned(small));
    // The manifest is in official names and its layout is ours: a failure here is a bug in the
    // planner above, not bad input.
    match Checkpoint::from_stored(blobs, stored) {
        Ok(c) => c,
        Err(e) => panic!("dummy checkpoint planner produced an inconsistent layout: {e}"),
    }
}

/// Expert-id tables need their own per-row structure and norms their centre of 1, so they are
/// never windows of a pool.
fn pooled(p: &Planned, len: usize) -> bool {
    len > POOLED_ABOVE
        && !matches!(p.fill, Fill::ExpertIds { .. })
        && !matches!(p.fill, Fill::Float { center_milli, .. } if center_milli != 0)
}

/// Pools are shared by every large tensor of a dtype, whatever its own fill.
fn pool_fill(fill: Fill) -> Fill {
    match fill {
        Fill::Float { .. } => Fill::Float {
            center_milli: 0,
            amp_micro: (POOL_AMPLITUDE * 1e6) as u32,
        },
        Fill::Scale { .. } => Fill::Scale { exponent: 120 },
        other => other,
    }
}

fn plan(
    spec: &TensorSpec,
    by_name: &HashMap<&str, &TensorSpec>,
    all: &[TensorSpec],
) -> Vec<Planned> {
    let name = &spec.name;
    // A scale that belongs to a quantized weight is planned with that weight.
    if let Some(base) = name.strip_suffix(".scale") {
        if let Some(w) = by_name.get(format!("{base}.weight").as_str()) {
            if matches!(w.dtype, DType::F8E4M3 | DType::I8 | DType::U8) {
                return vec![];
            }
        }
    }
    let scale_dtype = |default: DType| {
        by_name
            .get(scale_name_for(name).as_str())
            .map(|s| s.dtype)
            .filter(|d| matches!(d, DType::F32 | DType::F8E8M0 | DType::BF16))
            .unwrap_or(default)
    };
    let plain = |fill: Fill| Planned {
        name: name.clone(),
        dtype: spec.dtype,
        stored_shape: spec.shape.clone(),
        fill,
    };
    let cols = spec.shape.last().copied().unwrap_or(1).max(1);
    // Scale exponent so that value * scale has magnitude ~ 1/sqrt(cols).
    let exponent = (127.0 - (cols as f64).sqrt().log2().round() - 1.0).clamp(1.0, 254.0) as u8;
    match spec.dtype {
        DType::F8E4M3 if spec.shape.len() == 2 => {
            let (r, c) = (spec.shape[0], spec.shape[1]);
            vec![
                plain(Fill::Fp8),
                Planned {
                    name: scale_name_for(name),
                    dtype: scale_dtype(DType::F8E8M0),
                    stored_shape: vec![r.div_ceil(FP8_BLOCK[0]), c.div_ceil(FP8_BLOCK[1])],
                    fill: Fill::Scale { exponent },
                },
            ]
        }
        DType::I8 | DType::U8
            if name.ends_with(".weight")
                && spec.shape.len() == 2
                && spec.shape[1].is_multiple_of(FP4_GROUP) =>
        {
            let (r, c) = (spec.shape[0], spec.shape[1]);
            vec![
                Planned {
                    name: name.clone(),
                    dtype: spec.dtype,
                    stored_shape: vec![r, c / 2],
                    fill: Fill::Fp4,
                },
                Planned {
                    name: scale_name_for(name),
                    dtype: scale_dtype(DType::F8E8M0),
                    stored_shape: vec![r, c / FP4_GROUP],
                    fill: Fill::Scale { exponent },
                },
            ]
        }
        DType::F8E8M0 => vec![plain(Fill::Scale { exponent: 127 })],
        DType::I64 | DType::I32 if name.ends_with("tid2eid") => {
            vec![plain(Fill::ExpertIds {
                experts: experts_for(name, by_name, all, spec),
            })]
        }
        d if d.is_integer() => vec![plain(Fill::Zeros)],
        _ => {
            let is_norm = spec.shape.len() == 1 && name.contains("norm");
            let amp = if spec.shape.len() >= 2 {
                1.0 / (cols as f32).sqrt()
            } else {
                0.1
            };
            vec![plain(Fill::Float {
                center_milli: if is_norm { 1000 } else { 0 },
                amp_micro: (amp * 1e6) as u32,
            })]
        }
    }
}

/// Routed experts of the layer a `tid2eid` belongs to: its gate's rows, else the largest
/// expert index in the manifest, else the table width (always valid).
fn experts_for(
    name: &str,
    by_name: &HashMap<&str, &TensorSpec>,
    all: &[TensorSpec],
    spec: &TensorSpec,
) -> usize {
    let prefix = name.trim_end_matches("tid2eid");
    if let Some(g) = by_name.get(format!("{prefix}weight").as_str()) {
        if let Some(&e) = g.shape.first() {
            return e;
        }
    }
    let experts_prefix = prefix.replace(".gate.", ".experts.");
    let max_idx = all
        .iter()
        .filter_map(|s| s.name.strip_prefix(experts_prefix.as_str()))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .max();
    max_idx
        .map(|m| m + 1)
        .unwrap_or_else(|| spec.shape.last().copied().unwrap_or(1))
}

fn fill_bytes(out: &mut Vec<u8>, dtype: DType, fill: Fill, shape: &[usize], rng: &mut ChaCha8Rng) {
    let n: usize = shape.iter().product();
    match fill {
        Fill::Float {
            center_milli,
            amp_micro,
        } => {
            let center = center_milli as f32 / 1e3;
            let amp = amp_micro as f32 / 1e6;
            for _ in 0..n {
                let v = center + amp * (rng.random::<f32>() * 2.0 - 1.0);
                push_float(out, dtype, v);
            }
        }
        Fill::Fp8 => {
            for _ in 0..n {
                // exponent field 4..=9: magnitudes 2^-3 .. <2^3, never the NaN pattern.
                let sign = (rng.random::<u8>() & 1) << 7;
                let exp = rng.random_range(4u8..=9) << 3;
                let man = rng.random::<u8>() & 0x07;
                out.push(sign | exp | man);
            }
        }
        Fill::Fp4 => out.extend((0..n).map(|_| rng.random::<u8>())),
        Fill::Scale { exponent } => {
            for _ in 0..n {
                let e = exponent.saturating_add(rng.random_range(0u8..2)).min(254);
                match dtype {
                    DType::F8E8M0 | DType::U8 | DType::I8 => out.push(e),
                    _ => push_float(out, dtype, super::e8m0_to_f32(e)),
                }
            }
        }
        Fill::ExpertIds { experts } => {
            let (rows, k) = match shape {
                [r, k] => (*r, *k),
                _ => (1, n),
            };
            let mut ids: Vec<usize> = (0..experts.max(1)).collect();
            for _ in 0..rows {
                for j in 0..k {
                    let pick = if j < ids.len() {
                        let s = rng.random_range(j..ids.len());
                        ids.swap(j, s);
                        ids[j]
                    } else {
                        j % ids.len()
                    };
                    push_int(out, dtype, pick as i64);
                }
            }
        }
        Fill::Zeros => out.extend(std::iter::repeat_n(0u8, n * dtype.size())),
    }
}

fn push_float(out: &mut Vec<u8>, dtype: DType, v: f32) {
    match dtype {
        DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        // Float fills never target byte types; keep the size right regardless.
        other => out.extend(std::iter::repeat_n(0u8, other.size())),
    }
}

fn push_int(out: &mut Vec<u8>, dtype: DType, v: i64) {
    match dtype {
        DType::I64 => out.extend_from_slice(&v.to_le_bytes()),
        DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
        other => out.extend(std::iter::repeat_n(v as u8, other.size())),
    }
}

/// Stable across builds and platforms (std's hasher is not guaranteed to be).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Checkpoint {
    /// Deterministic pseudo-random values of the manifest's shapes and dtypes. FP8 (`F8E4M3`)
    /// weights get `[ceil(r/128), ceil(c/128)]` E8M0 scales, `I8`/`U8` `*.weight` specs are FP4
    /// with LOGICAL shape `[r, c]` (packed `[r, c/2]`, scales `[r, c/32]`), and `*tid2eid` holds
    /// distinct valid expert ids per row. Scale specs in the manifest choose the scale dtype.
    pub fn dummy(manifest: &[TensorSpec], seed: u64) -> Checkpoint {
        build(manifest, seed)
    }
}
