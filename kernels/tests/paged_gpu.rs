//! `paged.cu` against host references ported from the server's pool layout and compressor
//! (server/src/engine/model/kv.rs, forward.rs `compress_window`, ops.rs `gated_pool` /
//! `rms_norm_rows`, rope.rs `RopeTable::apply`), on small pools with scattered block tables.
//! Skips (passes with a SKIP line) where there is no CUDA driver or no device.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use dspark_kernels::launch::paged::{
    key_counts, key_starts, CompressParams, KeyMode, KeySelection, PoolSection, RowTable,
};
use dspark_kernels::reference::rel_err;
use dspark_kernels::KvRowFormat;

mod common;
use common::{gpu, Gpu, Rng};

/// One layer's parts of a block, laid out as `BlockGeometry::new` does: the persistent part
/// (compressed rows) in blocks of `fpb` floats, `layer_base` floats into each (other layers
/// around it); the recent part (window latent rows, then compressor inputs) in recent blocks of
/// `rfpb` floats, `recent_base` into each, after all `blocks` persistent blocks.
#[derive(Clone, Copy)]
struct Layout {
    bs: usize,
    ratio: usize,
    coff: usize,
    dim: usize,
    hd: usize,
    layer_base: usize,
    fpb: usize,
    recent_base: usize,
    rfpb: usize,
    /// Persistent blocks (ids below it); the recent blocks start after them.
    blocks: usize,
}

/// Recent blocks of every test pool.
const RECENT_BLOCKS: usize = 16;
const NO_RECENT: u32 = u32::MAX;

impl Layout {
    fn new(bs: usize, ratio: usize, coff: usize, dim: usize, hd: usize, layer_base: usize) -> Self {
        let len = bs / ratio * dim;
        let recent_len = bs * hd + bs * 2 * coff * dim;
        let recent_base = layer_base / 2 + 3;
        Self {
            bs,
            ratio,
            coff,
            dim,
            hd,
            layer_base,
            // Other layers after this one.
            fpb: layer_base + len + 13,
            recent_base,
            rfpb: recent_base + recent_len + 7,
            blocks: 16,
        }
    }
    fn width(&self) -> usize {
        self.coff * self.dim
    }
    fn recent_start(&self) -> usize {
        self.blocks * self.fpb
    }
    fn pool_len(&self) -> usize {
        self.recent_start() + RECENT_BLOCKS * self.rfpb
    }
    fn comp_in_off(&self) -> usize {
        self.bs * self.hd
    }
    // The host's KvPool addressing.
    fn region(&self, bt: &[u32], pos: usize) -> usize {
        bt[pos / self.bs] as usize * self.fpb + self.layer_base
    }
    fn recent_region(&self, rt: &[u32], pos: usize) -> usize {
        let r = rt[pos / self.bs];
        assert_ne!(
            r, NO_RECENT,
            "host read of a released recent block at {pos}"
        );
        self.recent_start() + r as usize * self.rfpb + self.recent_base
    }
    fn window_row(&self, rt: &[u32], pos: usize) -> usize {
        self.recent_region(rt, pos) + pos % self.bs * self.hd
    }
    fn comp_in_row(&self, rt: &[u32], pos: usize) -> usize {
        self.recent_region(rt, pos) + self.comp_in_off() + pos % self.bs * 2 * self.width()
    }
    fn comp_row(&self, bt: &[u32], w: usize) -> usize {
        let pos = w * self.ratio;
        self.region(bt, pos) + (pos % self.bs) / self.ratio * self.dim
    }
    fn window_section(&self) -> PoolSection {
        PoolSection {
            floats_per_block: self.rfpb,
            base: self.recent_start() + self.recent_base,
            stride: self.hd,
            ratio: 1,
            recent: true,
        }
    }
    fn comp_in_section(&self) -> PoolSection {
        PoolSection {
            floats_per_block: self.rfpb,
            base: self.recent_start() + self.recent_base + self.comp_in_off(),
            stride: 2 * self.width(),
            ratio: 1,
            recent: true,
        }
    }
    fn comp_rows_section(&self) -> PoolSection {
        PoolSection {
            floats_per_block: self.fpb,
            base: self.layer_base,
            stride: self.dim,
            ratio: self.ratio,
            recent: false,
        }
    }
}

// --- Host reference of the compressor (ops.rs, rope.rs, forward.rs) ---

fn gated_pool(slots: &[(&[f32], &[f32], &[f32])], dim: usize) -> Vec<f32> {
    let mut out = vec![0f32; dim];
    let mut logits = vec![0f32; slots.len()];
    for (c, o) in out.iter_mut().enumerate() {
        let mut max = f32::NEG_INFINITY;
        for (s, (_, gate, bias)) in slots.iter().enumerate() {
            logits[s] = gate[c] + bias[c];
            max = max.max(logits[s]);
        }
        let mut denom = 0f32;
        for l in logits.iter_mut() {
            *l = (*l - max).exp();
            denom += *l;
        }
        let mut acc = 0f32;
        for (s, (kv, _, _)) in slots.iter().enumerate() {
            acc += kv[c] * (logits[s] / denom);
        }
        *o = acc;
    }
    out
}

struct Compressor {
    ape: Vec<f32>,
    norm: Vec<f32>,
    inv_freq: Vec<f32>,
    attention_factor: f32,
    eps: f32,
}

fn compress_window<'a>(
    input: impl Fn(usize) -> &'a [f32],
    w: usize,
    lay: &Layout,
    c: &Compressor,
) -> Vec<f32> {
    let (dim, ratio, coff) = (lay.dim, lay.ratio, lay.coff);
    let width = coff * dim;
    let mut slots = Vec::new();
    if coff == 2 && w > 0 {
        for i in 0..ratio {
            let v = input((w - 1) * ratio + i);
            slots.push((
                &v[..dim],
                &v[width..width + dim],
                &c.ape[i * width..i * width + dim],
            ));
        }
    }
    let off = (coff - 1) * dim;
    for i in 0..ratio {
        let v = input(w * ratio + i);
        slots.push((
            &v[off..off + dim],
            &v[width + off..width + off + dim],
            &c.ape[i * width + off..i * width + off + dim],
        ));
    }
    let mut row = gated_pool(&slots, dim);
    let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
    let inv = 1.0 / (ms + c.eps).sqrt();
    row.iter_mut()
        .zip(&c.norm)
        .for_each(|(v, w)| *v = w * (*v * inv));
    let p = (w * ratio) as f32;
    let rd = c.inv_freq.len() * 2;
    let rope = &mut row[dim - rd..];
    for (j, &f) in c.inv_freq.iter().enumerate() {
        let a = (f * p) as f64;
        let (cs, sn) = (
            (a.cos() as f32) * c.attention_factor,
            (a.sin() as f32) * c.attention_factor,
        );
        let (x0, x1) = (rope[2 * j], rope[2 * j + 1]);
        rope[2 * j] = x0 * cs + (-x1) * sn;
        rope[2 * j + 1] = x1 * cs + x0 * sn;
    }
    row
}

// --- Device helpers ---

fn up<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).unwrap()
}

fn ptr<T>(s: &Arc<CudaStream>, b: &CudaSlice<T>) -> u64 {
    b.device_ptr(s).0
}

/// A step: block and recent tables per sequence, rows as (sequence, position; -1 = padding).
struct Step {
    tables: Vec<Vec<u32>>,
    recent: Vec<Vec<u32>>,
    rows: Vec<(usize, i32)>,
}

impl Step {
    /// Recent tables as the scheduler holds them: a recent block (numbered from the top, unlike
    /// the block ids) for every block from `reach` positions before a sequence's first row on,
    /// none before.
    fn new(tables: Vec<Vec<u32>>, rows: Vec<(usize, i32)>, bs: usize, reach: usize) -> Self {
        let mut next = RECENT_BLOCKS as u32;
        let recent = tables
            .iter()
            .enumerate()
            .map(|(seq, t)| {
                let first = rows
                    .iter()
                    .filter(|r| r.0 == seq && r.1 >= 0)
                    .map(|r| (r.1 as usize).saturating_sub(reach) / bs)
                    .min()
                    .unwrap_or(t.len());
                (0..t.len())
                    .map(|i| {
                        if i < first {
                            NO_RECENT
                        } else {
                            next -= 1;
                            next
                        }
                    })
                    .collect()
            })
            .collect();
        Step {
            tables,
            recent,
            rows,
        }
    }
}

struct StepBufs {
    positions: CudaSlice<i32>,
    starts: CudaSlice<i32>,
    lens: CudaSlice<i32>,
    tables: CudaSlice<u32>,
    rows: usize,
}

impl Step {
    fn upload(&self, s: &Arc<CudaStream>) -> StepBufs {
        let mut starts_of = Vec::new();
        let mut flat = Vec::new();
        for (t, r) in self.tables.iter().zip(&self.recent) {
            starts_of.push(flat.len() as i32);
            flat.extend_from_slice(t);
            flat.extend_from_slice(r);
        }
        StepBufs {
            positions: up(s, &self.rows.iter().map(|r| r.1).collect::<Vec<_>>()),
            starts: up(
                s,
                &self.rows.iter().map(|r| starts_of[r.0]).collect::<Vec<_>>(),
            ),
            lens: up(
                s,
                &self
                    .rows
                    .iter()
                    .map(|r| self.tables[r.0].len() as i32)
                    .collect::<Vec<_>>(),
            ),
            tables: up(s, &flat),
            rows: self.rows.len(),
        }
    }
}

impl StepBufs {
    fn table(&self, s: &Arc<CudaStream>) -> RowTable {
        RowTable {
            positions: ptr(s, &self.positions),
            bt_starts: ptr(s, &self.starts),
            bt_lens: ptr(s, &self.lens),
            block_tables: ptr(s, &self.tables),
            rows: self.rows,
        }
    }
}

/// Writes this step's latent rows and compressor inputs, compresses, and compares the whole pool
/// with the host: bit-exact outside the compressed rows, 1e-5 relative on them.
fn compress_case(g: &Gpu, name: &str, lay: Layout, rope_dim: usize, step: &Step, seed: u64) {
    let s = &g.s;
    let mut rng = Rng(seed);
    assert!(step
        .tables
        .iter()
        .flatten()
        .all(|&b| (b as usize) < lay.blocks));
    let mut pool = rng.signed_vec(lay.pool_len(), 1.0);
    let n = step.rows.len();
    let width = lay.width();
    let kv = rng.signed_vec(n * width, 1.0);
    let gate = rng.signed_vec(n * width, 2.0);
    let ld_lat = lay.hd + 8;
    let latent = rng.signed_vec(n * ld_lat, 1.0);
    let comp = Compressor {
        ape: rng.signed_vec(lay.ratio * width, 0.5),
        norm: rng
            .signed_vec(lay.dim, 1.0)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect(),
        inv_freq: (0..rope_dim / 2)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / rope_dim as f32))
            .collect(),
        attention_factor: 1.25,
        eps: 1e-6,
    };

    let pool_d = up(s, &pool);
    let kv_d = up(s, &kv);
    let gate_d = up(s, &gate);
    let lat_d = up(s, &latent);
    let ape_d = up(s, &comp.ape);
    let norm_d = up(s, &comp.norm);
    let inv_d = up(s, &comp.inv_freq);
    let bufs = step.upload(s);
    let rows = bufs.table(s);
    let pool_p = ptr(s, &pool_d);
    let params = CompressParams {
        ratio: lay.ratio,
        coff: lay.coff,
        dim: lay.dim,
        ape: ptr(s, &ape_d),
        norm: ptr(s, &norm_d),
        inv_freq: ptr(s, &inv_d),
        rope_dim,
        attention_factor: comp.attention_factor,
        eps: comp.eps,
        out_format: KvRowFormat::F32,
    };
    // SAFETY: every buffer above holds the shapes passed; block ids are below lay.blocks and
    // recent ids below RECENT_BLOCKS.
    unsafe {
        g.k.pool_write_rows(
            s,
            pool_p,
            &rows,
            lay.bs,
            &lay.window_section(),
            ptr(s, &lat_d),
            ld_lat,
            lay.hd,
            KvRowFormat::F32,
        )
        .unwrap();
        g.k.pool_write_kv_gate(
            s,
            pool_p,
            &rows,
            lay.bs,
            &lay.comp_in_section(),
            ptr(s, &kv_d),
            ptr(s, &gate_d),
            width,
        )
        .unwrap();
        g.k.compress_rows(
            s,
            pool_p,
            &rows,
            lay.bs,
            &lay.comp_in_section(),
            &lay.comp_rows_section(),
            &params,
        )
        .unwrap();
    }
    s.synchronize().unwrap();
    let got = s.clone_dtoh(&pool_d).unwrap();

    // Host: the same writes, then every closing window from the host pool.
    for (r, &(seq, pos)) in step.rows.iter().enumerate() {
        if pos < 0 {
            continue;
        }
        let rt = &step.recent[seq];
        let pos = pos as usize;
        let at = lay.window_row(rt, pos);
        pool[at..at + lay.hd].copy_from_slice(&latent[r * ld_lat..r * ld_lat + lay.hd]);
        let at = lay.comp_in_row(rt, pos);
        pool[at..at + width].copy_from_slice(&kv[r * width..(r + 1) * width]);
        pool[at + width..at + 2 * width].copy_from_slice(&gate[r * width..(r + 1) * width]);
    }
    let mut compressed = Vec::new();
    for &(seq, pos) in &step.rows {
        if pos < 0 || !(pos as usize + 1).is_multiple_of(lay.ratio) {
            continue;
        }
        let (bt, rt) = (&step.tables[seq], &step.recent[seq]);
        let w = (pos as usize + 1) / lay.ratio - 1;
        let host = &pool;
        let row = compress_window(
            |p| {
                let at = lay.comp_in_row(rt, p);
                &host[at..at + 2 * width]
            },
            w,
            &lay,
            &comp,
        );
        compressed.push((lay.comp_row(bt, w), row));
    }
    assert!(!compressed.is_empty(), "{name}: no window closes");
    let mut want = pool.clone();
    for (at, row) in &compressed {
        want[*at..*at + lay.dim].copy_from_slice(row);
    }
    for (at, row) in &compressed {
        let g64: Vec<f64> = got[*at..*at + lay.dim].iter().map(|&v| v as f64).collect();
        let r64: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let err = rel_err(&g64, &r64);
        assert!(err < 1e-5, "{name}: compressed row at {at}: rel err {err}");
    }
    let mut mask = vec![false; want.len()];
    for (at, _) in &compressed {
        mask[*at..*at + lay.dim].iter_mut().for_each(|m| *m = true);
    }
    let bad = (0..want.len()).find(|&i| !mask[i] && got[i].to_bits() != want[i].to_bits());
    assert!(
        bad.is_none(),
        "{name}: pool differs at {bad:?} (outside compressed rows)"
    );
    eprintln!(
        "{name}: {} compressed rows match, rest of the pool bit-exact",
        compressed.len()
    );
}

#[test]
fn compress_rows_csa_tiny_geometry() {
    let Some(g) = gpu("compress_rows_csa_tiny_geometry") else {
        return;
    };
    // block 16, ratio 4: A's rows 29..=31 (31 closes window 7), B's 19 closes window 4 whose
    // overlap window 3 (positions 12..15) sits in the previous block, C's 3 closes window 0 (no
    // overlap), C's 10 closes none, and a padding row.
    let step = Step::new(
        vec![vec![5, 2, 7, 0], vec![3, 6, 1], vec![4]],
        vec![(0, 29), (0, 30), (0, 31), (1, 19), (2, 3), (2, 10), (0, -1)],
        16,
        7,
    );
    let lay = Layout::new(16, 4, 2, 64, 64, 7);
    compress_case(&g, "csa bs16", lay, 16, &step, 1);
}

#[test]
fn compress_rows_flash_shapes() {
    let Some(g) = gpu("compress_rows_flash_shapes") else {
        return;
    };
    // CSA (ratio 4, head_dim 512; and the indexer's 128), block 128: window 32 closes at 131
    // with its overlap (124..127) in the previous block; two rows of one sequence close
    // windows 32 and 33 in the same step.
    let step = Step::new(
        vec![vec![6, 1, 4], vec![0, 3], vec![2]],
        vec![(0, 131), (0, 132), (0, 135), (1, 255), (2, 3), (2, 0)],
        128,
        127,
    );
    let lay = Layout::new(128, 4, 2, 512, 512, 5);
    compress_case(&g, "csa bs128 dim512", lay, 64, &step, 2);
    let lay = Layout::new(128, 4, 2, 128, 512, 3);
    compress_case(&g, "indexer bs128 dim128", lay, 64, &step, 3);

    // HCA (ratio 128) over a sequence of 10 blocks: windows 9 and 4 of one sequence, window 0 of
    // another, and a row closing none.
    let mut rng = Rng(9);
    let perm = rng.permutation(12);
    let step = Step::new(
        vec![perm[..10].to_vec(), vec![perm[10]]],
        vec![(0, 1278), (0, 1279), (0, 639), (1, 127), (1, 100)],
        128,
        127,
    );
    let lay = Layout::new(128, 128, 1, 512, 512, 11);
    compress_case(&g, "hca bs128", lay, 64, &step, 4);
}

/// The host's key list of a row: window rows `lo..=pos`, then the compressed rows.
fn host_keys(
    lay: &Layout,
    (bt, rt): (&[u32], &[u32]),
    pos: usize,
    window: usize,
    comp: &[usize],
) -> Vec<i64> {
    let lo = (pos + 1).saturating_sub(window);
    (lo..=pos)
        .map(|p| lay.window_row(rt, p) as i64)
        .chain(comp.iter().map(|&w| lay.comp_row(bt, w) as i64))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn run_keys(
    g: &Gpu,
    lay: &Layout,
    step: &Step,
    window: usize,
    mode: KeyMode,
    selected: Option<(&[i32], &[i32], usize)>,
    starts: &[i32],
) -> Vec<i64> {
    let s = &g.s;
    let bufs = step.upload(s);
    let rows = bufs.table(s);
    let starts_d = up(s, starts);
    let total = *starts.last().unwrap() as usize;
    let out_d = up(s, &vec![i64::MIN; total.max(1)]);
    let (sel_d, cnt_d, stride) = match selected {
        Some((sel, cnt, stride)) => (Some(up(s, sel)), Some(up(s, cnt)), stride),
        None => (None, None, 0),
    };
    let sel = KeySelection {
        mode,
        selected: sel_d.as_ref().map_or(0, |b| ptr(s, b)),
        selected_counts: cnt_d.as_ref().map_or(0, |b| ptr(s, b)),
        sel_stride: stride,
    };
    let max_keys = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as usize;
    // SAFETY: the buffers above hold the shapes passed.
    unsafe {
        g.k.build_key_offsets(
            s,
            &rows,
            lay.bs,
            window,
            &lay.window_section(),
            &lay.comp_rows_section(),
            &sel,
            ptr(s, &starts_d),
            ptr(s, &out_d),
            max_keys,
        )
        .unwrap();
    }
    s.synchronize().unwrap();
    let mut out = s.clone_dtoh(&out_d).unwrap();
    out.truncate(total);
    out
}

#[test]
fn key_offsets_match_host_lists() {
    let Some(g) = gpu("key_offsets_match_host_lists") else {
        return;
    };
    let mut rng = Rng(7);
    // Tiny geometry: block 16, ratio 4, window 8.
    let lay = Layout::new(16, 4, 2, 64, 64, 7);
    let window = 8;
    let step = Step::new(
        vec![vec![5, 2, 7, 0], vec![3, 6, 1], vec![4]],
        vec![(0, 29), (0, 31), (1, 19), (2, 3), (2, 2), (1, 40), (0, -1)],
        16,
        window - 1,
    );
    let real: Vec<usize> = step.rows.iter().map(|r| r.1.max(0) as usize).collect();
    let pad = |counts: Vec<usize>| -> Vec<usize> {
        counts
            .into_iter()
            .zip(&step.rows)
            .map(|(c, r)| if r.1 < 0 { 0 } else { c })
            .collect()
    };
    let topk = 3;
    for mode in [KeyMode::Window, KeyMode::AllCompressed, KeyMode::Selected] {
        let counts = pad(key_counts(&real, window, lay.ratio, mode, topk));
        let starts = key_starts(&counts).unwrap();
        // Selections as topk_select leaves them: min(topk, visible) distinct indices per row.
        let mut sel = vec![-7i32; step.rows.len() * topk];
        let mut cnt = vec![0i32; step.rows.len()];
        let mut comp: Vec<Vec<usize>> = Vec::new();
        for (r, &(_, pos)) in step.rows.iter().enumerate() {
            let visible = if pos < 0 {
                0
            } else {
                (pos as usize + 1) / lay.ratio
            };
            let c = match mode {
                KeyMode::Window => vec![],
                KeyMode::AllCompressed => (0..visible).collect(),
                KeyMode::Selected => {
                    let mut p: Vec<usize> = rng
                        .permutation(visible)
                        .into_iter()
                        .map(|v| v as usize)
                        .collect();
                    p.truncate(topk.min(visible));
                    for (j, &v) in p.iter().enumerate() {
                        sel[r * topk + j] = v as i32;
                    }
                    cnt[r] = p.len() as i32;
                    p
                }
            };
            comp.push(c);
        }
        let selected = (mode == KeyMode::Selected).then_some((&sel[..], &cnt[..], topk));
        let got = run_keys(&g, &lay, &step, window, mode, selected, &starts);
        let mut want = Vec::new();
        for (r, &(seq, pos)) in step.rows.iter().enumerate() {
            if pos >= 0 {
                want.extend(host_keys(
                    &lay,
                    (&step.tables[seq], &step.recent[seq]),
                    pos as usize,
                    window,
                    &comp[r],
                ));
            }
        }
        assert_eq!(got, want, "{mode:?}");
    }

    // Room past a row's keys, a selected index outside the visible windows and a block past the
    // row's table all give -1, and nothing is written past a row's room.
    let step = Step::new(
        vec![vec![5, 2], vec![3]],
        vec![(0, 11), (0, 5), (0, 7), (1, 40)],
        16,
        window - 1,
    );
    let sel = [2i32, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0];
    let cnt = [3i32, 1, 1, 0];
    // Row 0: 8 window + 3 selected keys in a room of 13; row 1: 6 window keys + selected row 9,
    // past its one visible window; row 2: a room of 3 for its 9 keys; row 3: position 40 is
    // past its one-block table.
    let starts = [0i32, 13, 20, 23, 25];
    let got = run_keys(
        &g,
        &lay,
        &step,
        window,
        KeyMode::Selected,
        Some((&sel, &cnt, 3)),
        &starts,
    );
    let bt = (&step.tables[0][..], &step.recent[0][..]);
    let mut want = host_keys(&lay, bt, 11, window, &[2, 0, 1]);
    want.extend([-1, -1]);
    want.extend(host_keys(&lay, bt, 5, window, &[]));
    want.push(-1);
    want.extend(host_keys(&lay, bt, 7, window, &[0])[..3].iter().copied());
    want.extend([-1, -1]);
    assert_eq!(got, want);
}

#[test]
fn key_offsets_at_one_million_tokens() {
    let Some(g) = gpu("key_offsets_at_one_million_tokens") else {
        return;
    };
    let mut rng = Rng(11);
    // V4-Flash: block 128, head_dim 512; 8,192 blocks of ~12.8M floats, so offsets of both
    // the compressed rows and the recent blocks after them pass 2^31.
    let blocks = 8192;
    let hca = Layout {
        fpb: 398_784 * 32,
        blocks,
        ..Layout::new(128, 128, 1, 512, 512, 5_000_000)
    };
    let csa = Layout {
        fpb: 398_784 * 32,
        blocks,
        ..Layout::new(128, 4, 2, 512, 512, 1_000_000)
    };
    let table = rng.permutation(blocks);
    let step = Step::new(
        vec![table.clone(), table[..4096].to_vec()],
        vec![(0, (1 << 20) - 1), (0, (1 << 20) - 200), (1, 300_000)],
        128,
        127,
    );
    let positions: Vec<usize> = step.rows.iter().map(|r| r.1 as usize).collect();
    let window = 128;

    let starts = key_starts(&key_counts(
        &positions,
        window,
        128,
        KeyMode::AllCompressed,
        0,
    ))
    .unwrap();
    let got = run_keys(
        &g,
        &hca,
        &step,
        window,
        KeyMode::AllCompressed,
        None,
        &starts,
    );
    let mut want = Vec::new();
    for &(seq, pos) in &step.rows {
        let pos = pos as usize;
        let comp: Vec<usize> = (0..(pos + 1) / 128).collect();
        let tables = (&step.tables[seq][..], &step.recent[seq][..]);
        want.extend(host_keys(&hca, tables, pos, window, &comp));
    }
    assert!(want.iter().any(|&o| o > i32::MAX as i64));
    assert_eq!(got, want);

    let topk = 512;
    let starts = key_starts(&key_counts(&positions, window, 4, KeyMode::Selected, topk)).unwrap();
    let mut sel = vec![0i32; step.rows.len() * topk];
    let mut comp = Vec::new();
    for (r, &pos) in positions.iter().enumerate() {
        let visible = (pos + 1) / 4;
        let mut picks: Vec<usize> = Vec::new();
        while picks.len() < topk {
            let v = rng.below(visible);
            if !picks.contains(&v) {
                picks.push(v);
            }
        }
        picks.sort_unstable();
        for (j, &v) in picks.iter().enumerate() {
            sel[r * topk + j] = v as i32;
        }
        comp.push(picks);
    }
    let cnt = vec![topk as i32; step.rows.len()];
    let got = run_keys(
        &g,
        &csa,
        &step,
        window,
        KeyMode::Selected,
        Some((&sel, &cnt, topk)),
        &starts,
    );
    let mut want = Vec::new();
    for (r, &(seq, pos)) in step.rows.iter().enumerate() {
        want.extend(host_keys(
            &csa,
            (&step.tables[seq], &step.recent[seq]),
            pos as usize,
            window,
            &comp[r],
        ));
    }
    assert_eq!(got, want);
}
