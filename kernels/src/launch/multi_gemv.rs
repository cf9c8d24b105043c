//! Several one-row GEMVs that read the same activation row, in one launch: a decode token's
//! projections of one normed input (q LoRA and latent KV; the compressors' and the indexer's
//! rows; the shared expert's gate and up) were a launch each, 4 to 6 us apiece at batch 1 for a
//! few megabytes of weights. Every segment keeps the block split its own launch would have
//! (`fp8_ksplit` / `bf16_ksplit` of its shape), so each output is bit-identical to the
//! single-matrix GEMV's; only the launches are merged.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, LaunchConfig};

use super::dense_gemv::{bf16_ksplit, gemv_blocks};
use super::submit::{KernelArg, SubmitKernel};
use super::{
    aligned16, fp8_gemv_blocks, fp8_split_for, fp8_takes_one_chunk, i32_arg, nonnull, u32_grid,
    Kernels,
};
use crate::error::KernelError;

/// Most matrices one launch takes (`DSK_GEMV_SEGMENTS` in common.cuh).
pub const GEMV_MAX_SEGMENTS: usize = 8;

/// One matrix of a merged GEMV: `out[r] = sum_k x[k] * W[r, k]` for its `rows` rows.
#[derive(Clone, Copy, Debug)]
pub struct GemvSegment {
    /// FP8: e4m3 `[rows, k]`; bf16: `[rows, k]` bf16 bits.
    pub weight: CUdeviceptr,
    /// FP8: the E8M0 tiles `[ceil(rows / 128), ceil(k / 128)]`; bf16: unused (0).
    pub scale: CUdeviceptr,
    /// f32 `[rows]`.
    pub out: CUdeviceptr,
    pub rows: usize,
}

/// Which weights every segment of a launch holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentWeights {
    Fp8,
    Bf16,
}

/// The kernel's `DskGemvSegments`, byte for byte (repr(C): three u64 arrays, three i32 arrays,
/// a count, padded to 8 like the C struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SegmentTable {
    w: [u64; GEMV_MAX_SEGMENTS],
    s: [u64; GEMV_MAX_SEGMENTS],
    out: [u64; GEMV_MAX_SEGMENTS],
    n: [i32; GEMV_MAX_SEGMENTS],
    ksplit: [i32; GEMV_MAX_SEGMENTS],
    block_end: [i32; GEMV_MAX_SEGMENTS],
    count: i32,
}

impl KernelArg for SegmentTable {}

/// The table and grid of a merged launch, checked: `k` a multiple of 16 (FP8) or 8 (bf16), every
/// segment non-empty with 16-byte aligned weights, at most [`GEMV_MAX_SEGMENTS`] of them. FP8
/// segments split as their own launches would, with the one-chunk kernels `fp8_one_chunk` or not.
fn segment_table(
    kind: SegmentWeights,
    segs: &[GemvSegment],
    x: CUdeviceptr,
    k: usize,
    sms: usize,
    fp8_one_chunk: bool,
) -> Result<(SegmentTable, usize), KernelError> {
    const K: &str = "gemv_multi";
    let chunk = match kind {
        SegmentWeights::Fp8 => 16,
        SegmentWeights::Bf16 => 8,
    };
    if segs.is_empty() || segs.len() > GEMV_MAX_SEGMENTS || k == 0 || !k.is_multiple_of(chunk) {
        return Err(KernelError::invalid(
            K,
            format!(
                "{} segments, k = {k}: need 1..={GEMV_MAX_SEGMENTS} segments and k a positive \
                 multiple of {chunk}",
                segs.len()
            ),
        ));
    }
    i32_arg(K, "k", k)?;
    nonnull(K, &[("x", x)])?;
    aligned16(K, &[("x", x)])?;
    let mut t = SegmentTable::default();
    let mut blocks = 0usize;
    for (i, g) in segs.iter().enumerate() {
        if g.rows == 0 {
            return Err(KernelError::invalid(K, format!("segment {i} has no rows")));
        }
        nonnull(K, &[("weight", g.weight), ("out", g.out)])?;
        aligned16(K, &[("weight", g.weight)])?;
        let (ks, b) = match kind {
            SegmentWeights::Fp8 => {
                nonnull(K, &[("scale", g.scale)])?;
                let ks = fp8_split_for(fp8_one_chunk, 1, g.rows, k, sms);
                let one = fp8_takes_one_chunk(fp8_one_chunk, 1, k, ks);
                (ks, fp8_gemv_blocks(g.rows, ks, one))
            }
            SegmentWeights::Bf16 => {
                let ks = bf16_ksplit(g.rows, k, sms);
                (ks, gemv_blocks(g.rows, ks))
            }
        };
        blocks += b;
        t.w[i] = g.weight;
        t.s[i] = g.scale;
        t.out[i] = g.out;
        t.n[i] = i32_arg(K, "rows", g.rows)?;
        t.ksplit[i] = i32_arg(K, "ksplit", ks)?;
        t.block_end[i] = i32_arg(K, "blocks", blocks)?;
    }
    t.count = i32_arg(K, "segments", segs.len())?;
    Ok((t, blocks))
}

impl Kernels {
    /// One f32 activation row `x` (`k` values) through every segment in one launch: FP8
    /// (block-scaled e4m3) or bf16 weights as `kind` says, each output exactly what
    /// [`Kernels::fp8_gemv`] / [`Kernels::bf16_gemv`] with `m = 1` writes for that matrix.
    ///
    /// # Safety
    /// Every pointer must address device memory of this context holding the shapes given; no
    /// output may overlap `x` or another segment's output.
    /// The weights (and scales) are read before the kernel waits for the previous kernel of the
    /// stream (PDL): no kernel still running before this launch may write them.
    pub unsafe fn gemv_multi(
        &self,
        stream: &CudaStream,
        kind: SegmentWeights,
        segs: &[GemvSegment],
        x: CUdeviceptr,
        k: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "gemv_multi";
        let (table, blocks) = segment_table(kind, segs, x, k, self.sms, self.fp8_one_chunk)?;
        let cfg = LaunchConfig {
            grid_dim: (u32_grid(K, blocks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // Every FP8 segment shares k, so the first segment's split says whether the table is the
        // one-chunk kernels' (segment_table chose it).
        let one_chunk = fp8_takes_one_chunk(
            self.fp8_one_chunk,
            1,
            k,
            usize::try_from(table.ksplit[0]).unwrap_or(0),
        );
        let func = match kind {
            SegmentWeights::Fp8 if one_chunk => &self.fp8_m1c[2],
            SegmentWeights::Fp8 => &self.fp8_gemv_multi,
            SegmentWeights::Bf16 => &self.dense_gemv.gemv_multi,
        };
        let k = i32_arg(K, "k", k)?;
        stream
            .kernel(func)
            .arg(&table)
            .arg(&x)
            .arg(&k)
            .launch(cfg)
            .map_err(KernelError::driver("launch gemv_multi"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fp8_ksplit;
    use super::*;

    /// The table of `segs` at k = 4096 on 132 SMs.
    fn table(
        kind: SegmentWeights,
        segs: &[GemvSegment],
        fp8_one_chunk: bool,
    ) -> Result<(SegmentTable, usize), KernelError> {
        segment_table(kind, segs, 4096, 4096, 132, fp8_one_chunk)
    }

    fn seg(rows: usize) -> GemvSegment {
        GemvSegment {
            weight: 256,
            scale: 512,
            out: 1024,
            rows,
        }
    }

    #[test]
    fn table_matches_the_c_layout_and_single_launch_splits() {
        // Three u64 arrays, three i32 arrays and the count, padded to 8 bytes as in C.
        assert_eq!(std::mem::size_of::<SegmentTable>(), 8 * 24 + 4 * 24 + 8);
        let (t, blocks) = table(SegmentWeights::Fp8, &[seg(1024), seg(512)], false).unwrap();
        assert_eq!(t.count, 2);
        // Each segment's split and block count are those of its own launch.
        let ks0 = fp8_ksplit(1024, 4096, 132);
        let b0 = fp8_gemv_blocks(1024, ks0, false);
        let ks1 = fp8_ksplit(512, 4096, 132);
        let b1 = fp8_gemv_blocks(512, ks1, false);
        assert_eq!((t.ksplit[0], t.ksplit[1]), (ks0 as i32, ks1 as i32));
        assert_eq!(
            (t.block_end[0], t.block_end[1]),
            (b0 as i32, (b0 + b1) as i32)
        );
        assert_eq!(blocks, b0 + b1);
        let (t, _) = table(SegmentWeights::Bf16, &[seg(64), seg(8192)], false).unwrap();
        assert_eq!(t.ksplit[1], bf16_ksplit(8192, 4096, 132) as i32);
        // With the one-chunk kernels on: the split of k alone, four rows a warp.
        let (t, blocks) = table(SegmentWeights::Fp8, &[seg(1024), seg(512)], true).unwrap();
        assert_eq!((t.ksplit[0], t.ksplit[1]), (8, 8));
        assert_eq!((t.block_end[0], t.block_end[1]), (256, 384));
        assert_eq!(blocks, 384);
        // k = 8192 is past the one-chunk kernels: each segment keeps its two-row split.
        let (t, _) =
            segment_table(SegmentWeights::Fp8, &[seg(512)], 4096, 8192, 132, true).unwrap();
        assert_eq!(t.ksplit[0], fp8_ksplit(512, 8192, 132) as i32);
    }

    #[test]
    fn bad_tables_are_refused() {
        let ok = [seg(128)];
        assert!(table(SegmentWeights::Fp8, &[], false).is_err());
        assert!(table(SegmentWeights::Fp8, &[seg(1); 9], false).is_err());
        assert!(segment_table(SegmentWeights::Fp8, &ok, 4096, 4104, 132, false).is_err());
        assert!(segment_table(SegmentWeights::Bf16, &ok, 4096, 4100, 132, false).is_err());
        assert!(table(SegmentWeights::Fp8, &[seg(0)], false).is_err());
        assert!(segment_table(SegmentWeights::Fp8, &ok, 0, 4096, 132, false).is_err());
        let unscaled = GemvSegment { scale: 0, ..seg(8) };
        assert!(table(SegmentWeights::Fp8, &[unscaled], false).is_err());
        assert!(table(SegmentWeights::Bf16, &[unscaled], false).is_ok());
        let misaligned = GemvSegment {
            weight: 8,
            ..seg(8)
        };
        assert!(table(SegmentWeights::Bf16, &[misaligned], false).is_err());
    }
}
