//! Per-request draft state: for every stage, a ring of `sliding_window` latent KV rows built
//! from the target features of committed positions, row of position `pos` at slot
//! `pos % window`. Keyed by request id, never by batch row, so batching, reshuffling and
//! preemption cannot mix requests.
//!
//! Rows are written only by [`DraftRings::commit`], and only for positions the target has
//! accepted: a ring slot overwritten by a speculative row could not be restored (it held the
//! row `window` positions earlier), so rejected positions must never reach the ring.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("request {req}: commit starts at position {got}, the draft state continues at {want}")]
    Gap { req: u64, got: usize, want: usize },
    #[error("request {req}: {got} values for {rows} rows of {stages} stages x {dim}")]
    Shape {
        req: u64,
        got: usize,
        rows: usize,
        stages: usize,
        dim: usize,
    },
    #[error("request {req} has no committed target features")]
    Empty { req: u64 },
}

/// One request's rings.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftRing {
    /// First committed position: 0, or where a request resumed without the features of its
    /// earlier positions (a prefix-cache hit); positions before it are never attended to.
    start_pos: usize,
    /// First position not yet committed.
    next_pos: usize,
    /// `[stages, window, dim]`.
    rows: Vec<f32>,
}

impl DraftRing {
    pub fn next_pos(&self) -> usize {
        self.next_pos
    }

    /// The whole storage `[stages, window, dim]`, never-written slots included (tests use it to
    /// show that rejected positions left no trace).
    pub fn storage(&self) -> &[f32] {
        &self.rows
    }
}

/// The rings of every live request.
#[derive(Debug, Clone)]
pub struct DraftRings {
    stages: usize,
    window: usize,
    dim: usize,
    by_req: HashMap<u64, DraftRing>,
}

impl DraftRings {
    pub fn new(stages: usize, window: usize, dim: usize) -> Self {
        Self {
            stages,
            window: window.max(1),
            dim,
            by_req: HashMap::new(),
        }
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// How many of `rows` newly committed positions need KV rows (the last ones).
    pub fn kept_rows(&self, rows: usize) -> usize {
        rows.min(self.window)
    }

    pub fn get(&self, req: u64) -> Option<&DraftRing> {
        self.by_req.get(&req)
    }

    /// Positions committed for `req` (0 for an unknown request).
    pub fn next_pos(&self, req: u64) -> usize {
        self.by_req.get(&req).map_or(0, |r| r.next_pos)
    }

    /// Commits positions `first_pos .. first_pos + rows`. Only the last `window` of them can
    /// ever be attended to, so `stage_rows[s]` holds the KV rows of just those: `[kept, dim]`
    /// for stage `s` with `kept = min(rows, window)` (see [`DraftRings::kept_rows`]). A fresh
    /// request starts at any position (usually 0; later when the target skipped computing its
    /// prefix, e.g. a prefix-cache hit); otherwise `first_pos` must be exactly the next
    /// uncommitted position.
    pub fn commit(
        &mut self,
        req: u64,
        first_pos: usize,
        rows: usize,
        stage_rows: &[Vec<f32>],
    ) -> Result<(), RingError> {
        let (stages, window, dim) = (self.stages, self.window, self.dim);
        let kept = self.kept_rows(rows);
        if stage_rows.len() != stages || stage_rows.iter().any(|r| r.len() != kept * dim) {
            return Err(RingError::Shape {
                req,
                got: stage_rows.iter().map(Vec::len).sum(),
                rows,
                stages,
                dim,
            });
        }
        if let Some(want) = self.by_req.get(&req).map(|r| r.next_pos) {
            if first_pos != want {
                return Err(RingError::Gap {
                    req,
                    got: first_pos,
                    want,
                });
            }
        }
        let ring = self.by_req.entry(req).or_insert_with(|| DraftRing {
            start_pos: first_pos,
            next_pos: first_pos,
            rows: vec![0f32; stages * window * dim],
        });
        let skip = rows - kept;
        for (s, src) in stage_rows.iter().enumerate() {
            for i in 0..kept {
                let slot = (first_pos + skip + i) % window;
                let at = (s * window + slot) * dim;
                ring.rows[at..at + dim].copy_from_slice(&src[i * dim..(i + 1) * dim]);
            }
        }
        ring.next_pos = first_pos + rows;
        Ok(())
    }

    /// The valid rows of `stage` in position order: the last `min(window, next_pos)`
    /// committed positions.
    pub fn visible(&self, req: u64, stage: usize) -> Result<Vec<&[f32]>, RingError> {
        let ring = self
            .by_req
            .get(&req)
            .filter(|r| r.next_pos > r.start_pos)
            .ok_or(RingError::Empty { req })?;
        let (window, dim) = (self.window, self.dim);
        let lo = ring.next_pos.saturating_sub(window).max(ring.start_pos);
        Ok((lo..ring.next_pos)
            .map(|p| {
                let at = (stage * window + p % window) * dim;
                &ring.rows[at..at + dim]
            })
            .collect())
    }

    /// Drops the request's state (finished, aborted or preempted: a resumed request re-commits
    /// from its recomputed prefill).
    pub fn release(&mut self, req: u64) {
        self.by_req.remove(&req);
    }

    pub fn len(&self) -> usize {
        self.by_req.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_req.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_for(positions: std::ops::Range<usize>, stages: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..stages)
            .map(|s| {
                positions
                    .clone()
                    .flat_map(|p| (0..dim).map(move |c| (s * 10_000 + p * 10 + c) as f32))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn ring_keeps_the_last_window_in_order() {
        let mut r = DraftRings::new(2, 4, 3);
        r.commit(7, 0, 3, &rows_for(0..3, 2, 3)).unwrap();
        assert_eq!(r.visible(7, 1).unwrap().len(), 3);
        // 6 new positions, window 4: only the last 4 rows are passed.
        r.commit(7, 3, 6, &rows_for(5..9, 2, 3)).unwrap();
        let v = r.visible(7, 1).unwrap();
        let firsts: Vec<f32> = v.iter().map(|row| row[0]).collect();
        assert_eq!(firsts, vec![10_050.0, 10_060.0, 10_070.0, 10_080.0]);
        // A chunk longer than the window keeps only its tail.
        let mut big = DraftRings::new(2, 4, 3);
        big.commit(1, 0, 9, &rows_for(5..9, 2, 3)).unwrap();
        assert_eq!(big.next_pos(1), 9);
        assert_eq!(big.visible(1, 0).unwrap(), r.visible(7, 0).unwrap());
    }

    #[test]
    fn commits_must_be_contiguous_and_per_request() {
        let mut r = DraftRings::new(1, 4, 2);
        r.commit(1, 0, 2, &rows_for(0..2, 1, 2)).unwrap();
        assert_eq!(
            r.commit(1, 3, 1, &rows_for(3..4, 1, 2)),
            Err(RingError::Gap {
                req: 1,
                got: 3,
                want: 2
            })
        );
        // A fresh request may start mid-sequence (prefix-cache hit): earlier positions are
        // never visible.
        r.commit(2, 5, 1, &rows_for(5..6, 1, 2)).unwrap();
        assert_eq!(r.visible(2, 0).unwrap().len(), 1);
        assert!(matches!(
            r.commit(2, 7, 1, &rows_for(7..8, 1, 2)),
            Err(RingError::Gap { .. })
        ));
        assert!(matches!(
            r.commit(1, 2, 2, &rows_for(2..3, 1, 2)),
            Err(RingError::Shape { .. })
        ));
        assert_eq!(r.visible(9, 0), Err(RingError::Empty { req: 9 }));
        r.release(1);
        assert_eq!(r.next_pos(1), 0);
        r.commit(1, 0, 1, &rows_for(0..1, 1, 2)).unwrap();
    }
}
