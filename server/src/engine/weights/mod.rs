//! Checkpoint format layer: safetensors files (single or sharded), memory-mapped, exposed under
//! the OFFICIAL DeepSeek tensor names with their stored formats (bf16/f16/f32, FP8 e4m3 with
//! 128x128 block scales, FP4 e2m1 with one scale per 32 values), or a deterministic dummy.
//!
//! No model math lives here: callers ask for tensors by name and get f32 values (dequantized) or
//! the stored bytes. transformers-named checkpoints (our fixtures) are renamed on open, and the
//! merged routed experts are split back into per-expert `w1`/`w3`/`w2` views of the same bytes.

mod dtype;
mod dummy;
mod names;
mod progress;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use dtype::{e4m3_to_f32, e8m0_to_f32, DType, FP4_E2M1};
pub use progress::LoadProgress;

use names::Mapped;

/// Rows x cols covered by one FP8 scale.
pub const FP8_BLOCK: [usize; 2] = [128, 128];
/// Values along the last dim covered by one FP4 scale.
pub const FP4_GROUP: usize = 32;

/// A tensor's name, LOGICAL shape (FP4 unpacked: two values per stored byte) and stored dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// How the stored bytes of a tensor encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// The stored elements are the values.
    Plain,
    /// FP8 e4m3, value = e4m3 * scale of its `block` (rows x cols) tile; the scale sibling is
    /// `[ceil(rows / block[0]), ceil(cols / block[1])]`.
    Fp8Block { block: [usize; 2] },
    /// FP4 e2m1, two per byte (element 2j in the LOW nibble); one scale per `group` values
    /// along the last dim: scale sibling `[rows, cols / group]`.
    Fp4 { group: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("no checkpoint in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoCheckpoint { dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: bad safetensors header: {message}")]
    Header { path: PathBuf, message: String },
    #[error("{path}: bad shard index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("tensor {name} ({origin}) has unsupported dtype {dtype}")]
    UnsupportedDtype {
        name: String,
        origin: String,
        dtype: String,
    },
    #[error("tensor {name} appears twice: {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
    #[error("tensor {name} not found in the checkpoint")]
    MissingTensor { name: String },
    #[error("FP8 tensor {name} ({origin}) has no scale: expected a sibling tensor {expected}")]
    MissingScale {
        name: String,
        origin: String,
        expected: String,
    },
    #[error("scale {scale} of {name} has shape {found:?} (dtype {dtype}); expected {expected:?}")]
    BadScale {
        name: String,
        scale: String,
        found: Vec<usize>,
        dtype: DType,
        expected: Vec<usize>,
    },
    #[error("tensor {name} ({origin}): {message}")]
    BadLayout {
        name: String,
        origin: String,
        message: String,
    },
    #[error("tensor {name} has dtype {dtype}, which is not a float type")]
    NotFloat { name: String, dtype: DType },
    #[error("tensor {name} has dtype {dtype}, which is not an integer type")]
    NotInteger { name: String, dtype: DType },
    #[error("slice of {name}: dim {dim} range {start}..{end} does not fit shape {shape:?}")]
    BadSlice {
        name: String,
        dim: usize,
        start: usize,
        end: usize,
        shape: Vec<usize>,
    },
}

/// Bytes a checkpoint's tensors live in.
enum Blob {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Mapped(m) => m,
            Blob::Owned(v) => v,
        }
    }
}

/// One tensor under its official name: a contiguous byte range of a blob.
#[derive(Debug, Clone)]
struct Entry {
    spec: TensorSpec,
    blob: usize,
    offset: usize,
    len: usize,
    format: WeightFormat,
    /// Official name of the scale sibling (quantized formats).
    scale: Option<String>,
    /// File and stored name, for error messages.
    origin: String,
}

/// A loaded (memory-mapped or dummy) checkpoint, addressed by official tensor names.
pub struct Checkpoint {
    blobs: Vec<Blob>,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("blobs", &self.blobs.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// A tensor as found in a file, before renaming.
struct StoredTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    blob: usize,
    offset: usize,
    len: usize,
    origin: String,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint, WeightsError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.is_file() {
            let (files, weight_map) = read_index(&index)?;
            let ckpt = Checkpoint::open_files(&files)?;
            ckpt.check_index(&index, &weight_map)?;
            Ok(ckpt)
        } else if single.is_file() {
            Checkpoint::open_files(&[single])
        } else {
            Err(WeightsError::NoCheckpoint {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(files: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let started = Instant::now();
        let mut blobs = Vec::with_capacity(files.len());
        let mut stored = Vec::new();
        let mut total_bytes = 0u64;
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|source| WeightsError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the mapping is read-only and checkpoint files are not modified while the
            // server runs; a truncated file would fault, as reading a vanished file would.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightsError::Io {
                path: path.clone(),
                source,
            })?;
            let before = stored.len();
            parse_header(path, &mmap, blobs.len(), &mut stored)?;
            total_bytes += mmap.len() as u64;
            tracing::info!(
                shard = i + 1,
                shards = files.len(),
                file = %path.display(),
                bytes = mmap.len(),
                tensors = stored.len() - before,
                "mapped checkpoint shard"
            );
            blobs.push(Blob::Mapped(mmap));
        }
        let ckpt = Checkpoint::from_stored(blobs, stored)?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            files = files.len(),
            tensors = ckpt.entries.len(),
            bytes = total_bytes,
            seconds = secs,
            gb_per_s = total_bytes as f64 / 1e9 / secs.max(1e-9),
            "checkpoint opened (memory-mapped; pages are read on first use)"
        );
        Ok(ckpt)
    }

    /// Renames to official names, splits merged experts, and attaches quantization scales.
    fn from_stored(
        blobs: Vec<Blob>,
        stored: Vec<StoredTensor>,
    ) -> Result<Checkpoint, WeightsError> {
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut insert = |entry: Entry| -> Result<(), WeightsError> {
            if let Some(prev) = entries.get(&entry.spec.name) {
                return Err(WeightsError::Duplicate {
                    name: entry.spec.name.clone(),
                    first: prev.origin.clone(),
                    second: entry.origin,
                });
            }
            entries.insert(entry.spec.name.clone(), entry);
            Ok(())
        };
        for t in stored {
            let plain = |name: String, shape: Vec<usize>, offset: usize, len: usize| Entry {
                spec: TensorSpec {
                    name,
                    shape,
                    dtype: t.dtype,
                },
                blob: t.blob,
                offset,
                len,
                format: WeightFormat::Plain,
                scale: None,
                origin: t.origin.clone(),
            };
            match names::hf_to_official(&t.name) {
                None => insert(plain(t.name.clone(), t.shape.clone(), t.offset, t.len))?,
                Some(Mapped::One(name)) => insert(plain(name, t.shape.clone(), t.offset, t.len))?,
                Some(Mapped::GateUp { prefix }) => {
                    let [e, two_i, h] = three_dims(&t)?;
                    if !two_i.is_multiple_of(2) {
                        return Err(bad_layout(&t, "gate_up_proj has an odd row count"));
                    }
                    let i = two_i / 2;
                    let half_bytes = i * h * t.dtype.size();
                    for x in 0..e {
                        let base = t.offset + x * 2 * half_bytes;
                        let w1 = format!("{prefix}.{x}.w1.weight");
                        let w3 = format!("{prefix}.{x}.w3.weight");
                        insert(plain(w1, vec![i, h], base, half_bytes))?;
                        insert(plain(w3, vec![i, h], base + half_bytes, half_bytes))?;
                    }
                }
                Some(Mapped::Down { prefix }) => {
                    let [e, h, i] = three_dims(&t)?;
                    let bytes = h * i * t.dtype.size();
                    for x in 0..e {
                        let w2 = format!("{prefix}.{x}.w2.weight");
                        insert(plain(w2, vec![h, i], t.offset + x * bytes, bytes))?;
                    }
                }
            }
        }
        attach_scales(&mut entries)?;
        Ok(Checkpoint { blobs, entries })
    }

    /// Every official tensor name (scales included), sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Logical shape (FP4 unpacked) and stored dtype.
    pub fn spec(&self, name: &str) -> Option<&TensorSpec> {
        self.entries.get(name).map(|e| &e.spec)
    }

    /// How the stored bytes encode the values (for backends that read [`Checkpoint::raw`]).
    pub fn format(&self, name: &str) -> Option<WeightFormat> {
        self.entries.get(name).map(|e| e.format)
    }

    /// Official name of the scale sibling of a quantized tensor.
    pub fn scale_name(&self, name: &str) -> Option<&str> {
        self.entries.get(name).and_then(|e| e.scale.as_deref())
    }

    /// Total stored bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.len as u64).sum()
    }

    /// A progress logger for a loader that walks this checkpoint's tensors.
    pub fn progress(&self, what: &str) -> LoadProgress {
        LoadProgress::new(what, self.total_bytes(), self.entries.len())
    }

    /// The whole tensor as f32: float dtypes converted, FP8/FP4 dequantized with their scales.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor, WeightsError> {
        let entry = self.entry(name)?;
        let rows = entry.spec.shape.first().copied().unwrap_or(1);
        if entry.spec.shape.is_empty() {
            return self.read_f32(entry, None);
        }
        self.read_f32(entry, Some((0, 0..rows)))
    }

    /// Only `range` along `dim` (tensor-parallel shards). Any range works, quantized included;
    /// only the touched bytes are read.
    pub fn tensor_f32_slice(
        &self,
        name: &str,
        dim: usize,
        range: Range<usize>,
    ) -> Result<HostTensor, WeightsError> {
        let entry = self.entry(name)?;
        let shape = &entry.spec.shape;
        if dim >= shape.len() || range.start > range.end || range.end > shape[dim] {
            return Err(WeightsError::BadSlice {
                name: name.to_string(),
                dim,
                start: range.start,
                end: range.end,
                shape: shape.clone(),
            });
        }
        self.read_f32(entry, Some((dim, range)))
    }

    /// Integer tensor (e.g. `tid2eid`) widened to i64.
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), WeightsError> {
        let entry = self.entry(name)?;
        let dtype = entry.spec.dtype;
        if !dtype.is_integer() || entry.format != WeightFormat::Plain {
            return Err(WeightsError::NotInteger {
                name: name.to_string(),
                dtype,
            });
        }
        let bytes = self.bytes(entry);
        let values = (0..entry.spec.numel())
            .map(|i| dtype::element_i64(dtype, bytes, i))
            .collect();
        Ok((entry.spec.shape.clone(), values))
    }

    /// The stored bytes (FP4: packed; FP8: e4m3 bytes; scales are their own tensors).
    pub fn raw(&self, name: &str) -> Result<(&TensorSpec, &[u8]), WeightsError> {
        let entry = self.entry(name)?;
        Ok((&entry.spec, self.bytes(entry)))
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightsError> {
        self.entries
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor {
                name: name.to_string(),
            })
    }

    fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.blobs[entry.blob].bytes()[entry.offset..entry.offset + entry.len]
    }

    /// Values of `entry`, optionally restricted to `range` along `dim`.
    fn read_f32(
        &self,
        entry: &Entry,
        slice: Option<(usize, Range<usize>)>,
    ) -> Result<HostTensor, WeightsError> {
        let shape = entry.spec.shape.clone();
        let (dim, range) = slice.unwrap_or((0, 0..shape.first().copied().unwrap_or(1)));
        let mut out_shape = shape.clone();
        if !out_shape.is_empty() {
            out_shape[dim] = range.len();
        }
        let outer: usize = shape[..dim.min(shape.len())].iter().product();
        let inner: usize = shape.get(dim + 1..).map_or(1, |s| s.iter().product());
        let extent = shape.get(dim).copied().unwrap_or(1);
        let mut data = Vec::with_capacity(out_shape.iter().product());
        let bytes = self.bytes(entry);
        let name = &entry.spec.name;
        let dtype = entry.spec.dtype;
        match entry.format {
            WeightFormat::Plain => {
                if !dtype.is_float() {
                    return Err(WeightsError::NotFloat {
                        name: name.clone(),
                        dtype,
                    });
                }
                let size = dtype.size();
                for o in 0..outer {
                    let start = (o * extent + range.start) * inner;
                    let run = &bytes[start * size..(start + range.len() * inner) * size];
                    dtype::extend_f32(dtype, run, &mut data);
                }
            }
            WeightFormat::Fp8Block { block } => {
                let scale = self.scale_of(entry)?;
                let cols = shape[1];
                let scale_cols = scale.shape[1];
                for o in 0..outer {
                    let start = (o * extent + range.start) * inner;
                    let end = start + range.len() * inner;
                    for (f, &byte) in (start..end).zip(&bytes[start..end]) {
                        let (r, c) = (f / cols, f % cols);
                        let s = scale.data[(r / block[0]) * scale_cols + c / block[1]];
                        data.push(dtype::e4m3_to_f32(byte) * s);
                    }
                }
            }
            WeightFormat::Fp4 { group } => {
                let scale = self.scale_of(entry)?;
                let cols = shape[1];
                let scale_cols = scale.shape[1];
                for o in 0..outer {
                    let start = (o * extent + range.start) * inner;
                    for f in start..start + range.len() * inner {
                        let (r, c) = (f / cols, f % cols);
                        let byte = bytes[r * (cols / 2) + c / 2];
                        let nibble = if c % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                        let s = scale.data[r * scale_cols + c / group];
                        data.push(FP4_E2M1[nibble as usize] * s);
                    }
                }
            }
        }
        Ok(HostTensor {
            shape: out_shape,
            data,
        })
    }

    fn scale_of(&self, entry: &Entry) -> Result<HostTensor, WeightsError> {
        let scale_name = entry
            .scale
            .as_deref()
            .ok_or_else(|| WeightsError::MissingScale {
                name: entry.spec.name.clone(),
                origin: entry.origin.clone(),
                expected: scale_name_for(&entry.spec.name),
            })?;
        let scale = self.entry(scale_name)?;
        self.read_f32(scale, None)
    }

    /// Every name in the shard index must be in the file it names.
    fn check_index(
        &self,
        index: &Path,
        weight_map: &BTreeMap<String, String>,
    ) -> Result<(), WeightsError> {
        let mut origins: HashMap<&str, &str> = HashMap::new();
        for e in self.entries.values() {
            if let Some((file, stored)) = e.origin.split_once(": ") {
                origins.insert(stored, file);
            }
        }
        for (name, file) in weight_map {
            match origins.get(name.as_str()) {
                Some(found) if Path::new(found).file_name() == Path::new(file).file_name() => {}
                Some(found) => {
                    return Err(WeightsError::Index {
                        path: index.to_path_buf(),
                        message: format!("{name} is listed in {file} but found in {found}"),
                    })
                }
                None => {
                    return Err(WeightsError::Index {
                        path: index.to_path_buf(),
                        message: format!("{name} is listed in {file} but is not in that file"),
                    })
                }
            }
        }
        Ok(())
    }
}

fn bad_layout(t: &StoredTensor, message: &str) -> WeightsError {
    WeightsError::BadLayout {
        name: t.name.clone(),
        origin: t.origin.clone(),
        message: message.to_string(),
    }
}

fn three_dims(t: &StoredTensor) -> Result<[usize; 3], WeightsError> {
    match t.shape.as_slice() {
        &[a, b, c] => Ok([a, b, c]),
        _ => Err(bad_layout(
            t,
            "merged experts must be 3-D [experts, out, in]",
        )),
    }
}

/// `x.weight` -> `x.scale`; anything else -> `<name>.scale`.
fn scale_name_for(name: &str) -> String {
    match name.strip_suffix(".weight") {
        Some(base) => format!("{base}.scale"),
        None => format!("{name}.scale"),
    }
}

/// FP8 weights need a `[ceil(r/128), ceil(c/128)]` scale; I8/U8 weights with a `[r, 2c/32]`
/// scale are FP4 (their logical shape doubles the last dim).
fn attach_scales(entries: &mut BTreeMap<String, Entry>) -> Result<(), WeightsError> {
    let names: Vec<String> = entries.keys().cloned().collect();
    for name in names {
        let (dtype, shape, origin) = {
            let e = &entries[&name];
            (e.spec.dtype, e.spec.shape.clone(), e.origin.clone())
        };
        let scale_name = scale_name_for(&name);
        let is_weight = name.ends_with(".weight");
        match dtype {
            DType::F8E4M3 => {
                let Some(scale) = entries.get(&scale_name) else {
                    return Err(WeightsError::MissingScale {
                        name,
                        origin,
                        expected: scale_name,
                    });
                };
                let &[rows, cols] = shape.as_slice() else {
                    return Err(WeightsError::BadLayout {
                        name,
                        origin,
                        message: "FP8 block-quantized tensors must be 2-D".into(),
                    });
                };
                let expected = vec![rows.div_ceil(FP8_BLOCK[0]), cols.div_ceil(FP8_BLOCK[1])];
                check_scale(&name, &scale_name, scale, &expected)?;
                let e = entries.get_mut(&name).expect("name comes from the map");
                e.format = WeightFormat::Fp8Block { block: FP8_BLOCK };
                e.scale = Some(scale_name);
            }
            DType::I8 | DType::U8 if is_weight && entries.contains_key(&scale_name) => {
                let &[rows, packed] = shape.as_slice() else {
                    return Err(WeightsError::BadLayout {
                        name,
                        origin,
                        message: "FP4 packed tensors must be 2-D".into(),
                    });
                };
                let cols = packed * 2;
                let expected = vec![rows, cols / FP4_GROUP];
                if !cols.is_multiple_of(FP4_GROUP) {
                    return Err(WeightsError::BadLayout {
                        name,
                        origin,
                        message: format!(
                            "FP4 row of {cols} values is not a multiple of {FP4_GROUP}"
                        ),
                    });
                }
                check_scale(&name, &scale_name, &entries[&scale_name], &expected)?;
                let e = entries.get_mut(&name).expect("name comes from the map");
                e.format = WeightFormat::Fp4 { group: FP4_GROUP };
                e.spec.shape = vec![rows, cols];
                e.scale = Some(scale_name);
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_scale(
    name: &str,
    scale_name: &str,
    scale: &Entry,
    expected: &[usize],
) -> Result<(), WeightsError> {
    if scale.spec.shape != expected || !scale.spec.dtype.is_float() {
        return Err(WeightsError::BadScale {
            name: name.to_string(),
            scale: scale_name.to_string(),
            found: scale.spec.shape.clone(),
            dtype: scale.spec.dtype,
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// Parses one safetensors header, appending its tensors.
fn parse_header(
    path: &Path,
    bytes: &[u8],
    blob: usize,
    out: &mut Vec<StoredTensor>,
) -> Result<(), WeightsError> {
    let (header_len, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| WeightsError::Header {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let data_start = 8 + header_len;
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in tensors {
        let origin = format!("{file}: {name}");
        let dtype =
            DType::from_safetensors(info.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
                name: name.clone(),
                origin: origin.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
        let (begin, end) = info.data_offsets;
        out.push(StoredTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            blob,
            offset: data_start + begin,
            len: end - begin,
            origin,
        });
    }
    Ok(())
}

/// Shard files (in order of first appearance, deduplicated) and the name -> file map.
fn read_index(path: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, String>), WeightsError> {
    let text = std::fs::read_to_string(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text).map_err(|e| WeightsError::Index {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = index.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(WeightsError::Index {
            path: path.to_path_buf(),
            message: "weight_map is empty".into(),
        });
    }
    for f in &files {
        if Path::new(f).components().count() != 1 {
            return Err(WeightsError::Index {
                path: path.to_path_buf(),
                message: format!("shard name {f} must be a plain file name"),
            });
        }
    }
    Ok((
        files.iter().map(|f| dir.join(f)).collect(),
        index.weight_map,
    ))
}
