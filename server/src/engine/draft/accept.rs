//! Verification of a block of drafts against the target's logits of the same positions:
//! greedy (longest matching prefix + the target's own next token) and probabilistic rejection
//! sampling (accept `d_i` with probability `min(1, p_i(d_i) / q_i(d_i))`, on the first
//! rejection emit a draw from the residual `max(0, p_i - q_i) / Z`, after `k` acceptances a
//! bonus draw from `p_k`), so that the emitted tokens follow the target's distribution exactly.
//!
//! Pure: plain slices in, tokens out. The scheduler calls [`verify`] with the `k + 1` logit rows
//! the target returned for `[anchor, d_1 .. d_k]`.

use super::sampling::{argmax, probabilities, RequestRng, SamplingParams};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AcceptError {
    #[error("{drafts} drafts need {want} target rows, got {got}")]
    TargetRows {
        drafts: usize,
        want: usize,
        got: usize,
    },
    #[error("{drafts} drafts but {got} draft distributions")]
    DraftRows { drafts: usize, got: usize },
    #[error("row {row} has {got} entries, the vocabulary has {want}")]
    Vocab { row: usize, got: usize, want: usize },
    #[error("draft token {token} outside the vocabulary of {vocab}")]
    Token { token: u32, vocab: usize },
}

/// What one verification step produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The accepted drafts followed by exactly one token chosen by the target (the correction
    /// after a rejection, or the bonus token after full acceptance): `num_accepted + 1` tokens.
    pub tokens: Vec<u32>,
    pub num_accepted: usize,
}

fn check_shapes(
    drafts: &[u32],
    target_rows: usize,
    q_rows: Option<usize>,
) -> Result<(), AcceptError> {
    if target_rows != drafts.len() + 1 {
        return Err(AcceptError::TargetRows {
            drafts: drafts.len(),
            want: drafts.len() + 1,
            got: target_rows,
        });
    }
    if let Some(q) = q_rows {
        if q != drafts.len() {
            return Err(AcceptError::DraftRows {
                drafts: drafts.len(),
                got: q,
            });
        }
    }
    Ok(())
}

/// Greedy acceptance from the target's argmax tokens `target_next` (`k + 1` of them: the
/// target's choice after the anchor and after each draft).
pub fn accept_greedy(drafts: &[u32], target_next: &[u32]) -> Result<Verdict, AcceptError> {
    check_shapes(drafts, target_next.len(), None)?;
    let num_accepted = drafts
        .iter()
        .zip(target_next)
        .take_while(|(d, t)| d == t)
        .count();
    let mut tokens = drafts[..num_accepted].to_vec();
    tokens.push(target_next[num_accepted]);
    Ok(Verdict {
        tokens,
        num_accepted,
    })
}

/// Rejection sampling with the target distributions `p` (`k + 1` rows) and the draft
/// distributions `q` (`k` rows) the drafts were sampled from, both already filtered by the
/// request's sampling params.
pub fn accept_sampled(
    drafts: &[u32],
    q: &[Vec<f32>],
    p: &[Vec<f32>],
    rng: &mut RequestRng,
) -> Result<Verdict, AcceptError> {
    check_shapes(drafts, p.len(), Some(q.len()))?;
    let vocab = p[0].len();
    for (row, r) in p.iter().chain(q).enumerate() {
        if r.len() != vocab {
            return Err(AcceptError::Vocab {
                row,
                got: r.len(),
                want: vocab,
            });
        }
    }
    let mut tokens = Vec::with_capacity(drafts.len() + 1);
    for (i, &d) in drafts.iter().enumerate() {
        let x = d as usize;
        if x >= vocab {
            return Err(AcceptError::Token { token: d, vocab });
        }
        let (pi, qi) = (p[i][x] as f64, q[i][x] as f64);
        // q(x) = 0 cannot happen for a draft drawn from q; treat it as a rejection so an
        // inconsistent q can only cost acceptance, never bias the output.
        let accept = qi > 0.0 && rng.uniform() < (pi / qi).min(1.0);
        if accept {
            tokens.push(d);
            continue;
        }
        let residual: Vec<f32> = p[i]
            .iter()
            .zip(&q[i])
            .map(|(&a, &b)| (a - b).max(0.0))
            .collect();
        // Z = 0 only when p == q up to rounding, where rejection has probability ~0: fall back
        // to p itself, which is then the residual's limit.
        let next = match rng.categorical(&residual) {
            Some(t) => t,
            None => rng.categorical(&p[i]).unwrap_or_else(|| argmax(&p[i])),
        };
        let num_accepted = tokens.len();
        tokens.push(next);
        return Ok(Verdict {
            tokens,
            num_accepted,
        });
    }
    let k = drafts.len();
    let bonus = rng.categorical(&p[k]).unwrap_or_else(|| argmax(&p[k]));
    tokens.push(bonus);
    Ok(Verdict {
        tokens,
        num_accepted: k,
    })
}

/// One request's verification: `target_logits` are the `k + 1` raw logit rows of
/// `[anchor, d_1 .. d_k]`; `draft_q` the draft's filtered distributions (None for greedy
/// requests, where only argmaxes matter).
pub fn verify(
    drafts: &[u32],
    draft_q: Option<&[Vec<f32>]>,
    target_logits: &[Vec<f32>],
    params: &SamplingParams,
    rng: &mut RequestRng,
) -> Result<Verdict, AcceptError> {
    if params.is_greedy() {
        let next: Vec<u32> = target_logits.iter().map(|l| argmax(l)).collect();
        return accept_greedy(drafts, &next);
    }
    check_shapes(drafts, target_logits.len(), draft_q.map(|q| q.len()))?;
    let p: Vec<Vec<f32>> = target_logits
        .iter()
        .map(|l| probabilities(l, params))
        .collect();
    match draft_q {
        Some(q) => accept_sampled(drafts, q, &p, rng),
        None => {
            // Drafts chosen greedily: q is the one-hot of each draft.
            let vocab = p[0].len();
            let mut q = Vec::with_capacity(drafts.len());
            for &d in drafts {
                if d as usize >= vocab {
                    return Err(AcceptError::Token { token: d, vocab });
                }
                let mut row = vec![0f32; vocab];
                row[d as usize] = 1.0;
                q.push(row);
            }
            accept_sampled(drafts, &q, &p, rng)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (drafts, target argmaxes, expected tokens, accepted)
    type GreedyCase<'a> = (&'a [u32], &'a [u32], &'a [u32], usize);

    #[test]
    fn greedy_table() {
        let cases: &[GreedyCase<'_>] = &[
            (&[5, 6, 7], &[5, 6, 7, 8], &[5, 6, 7, 8], 3),
            (&[5, 6, 7], &[5, 9, 7, 8], &[5, 9], 1),
            (&[5, 6, 7], &[4, 6, 7, 8], &[4], 0),
            (&[5, 6, 7], &[5, 6, 1, 8], &[5, 6, 1], 2),
            (&[5], &[5, 2], &[5, 2], 1),
            (&[], &[3], &[3], 0),
            // A match after a mismatch does not count.
            (&[1, 2, 3], &[1, 0, 3, 4], &[1, 0], 1),
        ];
        for (drafts, target, want, n) in cases {
            let v = accept_greedy(drafts, target).unwrap();
            assert_eq!(v.tokens, want.to_vec(), "{drafts:?} vs {target:?}");
            assert_eq!(v.num_accepted, *n);
        }
        assert_eq!(
            accept_greedy(&[1, 2], &[1, 2]),
            Err(AcceptError::TargetRows {
                drafts: 2,
                want: 3,
                got: 2
            })
        );
    }

    #[test]
    fn greedy_verify_uses_argmax_of_logits() {
        let logits = vec![
            vec![0.0, 2.0, 1.0],
            vec![3.0, 0.0, 1.0],
            vec![0.0, 0.0, 5.0],
        ];
        let mut rng = RequestRng::seeded(0);
        let v = verify(&[1, 0], None, &logits, &SamplingParams::GREEDY, &mut rng).unwrap();
        assert_eq!(v.tokens, vec![1, 0, 2]);
    }

    /// Chi-square statistic of `counts` against `probs` over cells with expected mass; a cell
    /// with zero expected mass must have zero count.
    fn chi_square(counts: &[u64], probs: &[f32], n: u64) -> f64 {
        let mut stat = 0.0;
        for (&c, &p) in counts.iter().zip(probs) {
            if p == 0.0 {
                assert_eq!(c, 0, "a token with zero target mass came out");
                continue;
            }
            let e = p as f64 * n as f64;
            stat += (c as f64 - e).powi(2) / e;
        }
        stat
    }

    /// Upper 0.1% points of chi-square with `df` degrees of freedom (df = 1..=7).
    fn chi_square_critical(df: usize) -> f64 {
        [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322][df - 1]
    }

    fn normalised(w: &[f32]) -> Vec<f32> {
        let s: f32 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    #[test]
    fn rejection_sampling_follows_the_target_distribution() {
        let pairs: Vec<(Vec<f32>, Vec<f32>)> = vec![
            // Mild disagreement.
            (
                normalised(&[0.3, 0.25, 0.2, 0.15, 0.1]),
                normalised(&[0.2, 0.2, 0.2, 0.2, 0.2]),
            ),
            // q has zero mass where p has mass (token 0 and 4 only reachable by the residual).
            (
                normalised(&[0.4, 0.1, 0.1, 0.1, 0.3]),
                normalised(&[0.0, 0.5, 0.3, 0.2, 0.0]),
            ),
            // q puts mass where p has none (token 3).
            (
                normalised(&[0.5, 0.3, 0.2, 0.0, 0.0]),
                normalised(&[0.1, 0.1, 0.1, 0.7, 0.0]),
            ),
            // Nearly disjoint.
            (
                normalised(&[0.05, 0.0, 0.0, 0.0, 0.95]),
                normalised(&[0.0, 0.9, 0.1, 0.0, 0.0]),
            ),
        ];
        let trials = 60_000u64;
        for (case, (p, q)) in pairs.iter().enumerate() {
            // Two positions with different targets: the first emitted token must follow p0;
            // given the first draft was accepted, the second emitted token must follow p1.
            let p1 = normalised(&[0.1, 0.2, 0.3, 0.25, 0.15]);
            let q1 = q.clone();
            let mut rng = RequestRng::seeded(1000 + case as u64);
            let mut first = vec![0u64; 5];
            let mut second = vec![0u64; 5];
            let mut second_n = 0u64;
            for _ in 0..trials {
                let d0 = rng.categorical(q).unwrap();
                let d1 = rng.categorical(&q1).unwrap();
                let v = accept_sampled(
                    &[d0, d1],
                    &[q.clone(), q1.clone()],
                    &[p.clone(), p1.clone(), p.clone()],
                    &mut rng,
                )
                .unwrap();
                assert_eq!(v.tokens.len(), v.num_accepted + 1);
                first[v.tokens[0] as usize] += 1;
                if v.num_accepted >= 1 {
                    second[v.tokens[1] as usize] += 1;
                    second_n += 1;
                }
            }
            let df = p.iter().filter(|&&x| x > 0.0).count() - 1;
            let s = chi_square(&first, p, trials);
            assert!(
                s < chi_square_critical(df),
                "case {case}: chi2 {s} ({first:?})"
            );
            if second_n > 1000 {
                let s = chi_square(&second, &p1, second_n);
                assert!(s < chi_square_critical(4), "case {case} pos 1: chi2 {s}");
            }
        }
    }

    #[test]
    fn identical_draft_and_target_accept_everything() {
        let logits: Vec<Vec<f32>> = (0..6)
            .map(|r| (0..8).map(|c| ((r * 3 + c * 5) % 7) as f32 * 0.4).collect())
            .collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 5,
        };
        let mut rng = RequestRng::seeded(3);
        for k in 1..=5usize {
            for _ in 0..200 {
                let q: Vec<Vec<f32>> = logits[..k]
                    .iter()
                    .map(|l| probabilities(l, &params))
                    .collect();
                let drafts: Vec<u32> = q.iter().map(|d| rng.categorical(d).unwrap()).collect();
                let v = verify(&drafts, Some(&q), &logits[..k + 1], &params, &mut rng).unwrap();
                assert_eq!(v.num_accepted, k);
                assert_eq!(v.tokens.len(), k + 1);
                assert_eq!(&v.tokens[..k], &drafts[..]);
            }
        }
    }

    #[test]
    fn filtering_applies_to_target_and_draft_alike() {
        // With top_k = 2 the target can never emit a token outside its top 2, whatever q is.
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        let target = vec![vec![2.0, 1.5, 1.4, 0.0], vec![0.0, 0.0, 3.0, 2.9]];
        let draft_logits = [0.0f32, 0.0, 0.0, 5.0];
        let q = vec![probabilities(&draft_logits, &params)];
        let mut rng = RequestRng::seeded(11);
        for _ in 0..2000 {
            let d = rng.categorical(&q[0]).unwrap();
            let v = verify(&[d], Some(&q), &target, &params, &mut rng).unwrap();
            assert!(v.tokens[0] <= 1, "{:?}", v.tokens);
        }
    }

    #[test]
    fn seeded_streams_reproduce() {
        let p = vec![normalised(&[0.3, 0.3, 0.4]); 3];
        let q = vec![normalised(&[0.6, 0.2, 0.2]); 2];
        let run = |seed| {
            let mut rng = RequestRng::seeded(seed);
            (0..50)
                .map(|_| accept_sampled(&[0, 0], &q, &p, &mut rng).unwrap().tokens)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut rng = RequestRng::seeded(0);
        let p = vec![vec![0.5, 0.5]; 2];
        assert!(matches!(
            accept_sampled(&[0], &[], &p, &mut rng),
            Err(AcceptError::DraftRows { .. })
        ));
        assert!(matches!(
            accept_sampled(&[7], &[vec![0.5, 0.5]], &p, &mut rng),
            Err(AcceptError::Token { .. })
        ));
        assert!(matches!(
            accept_sampled(&[0], &[vec![1.0]], &p, &mut rng),
            Err(AcceptError::Vocab { .. })
        ));
    }
}
