//! The CPU reference of `kernels/sampling.cu`: the same rule, step for step (ban, repetition penalty, logit
//! offsets, then greedy argmax or temperature softmax with top-k and top-p cuts found on the order-preserving key
//! of each logit, and an inverse CDF in index order). Sums run left to right here and in tiles on the GPU, and the
//! GPU's `__expf` is a few ulp from `exp`, so the two can differ only when a draw (or a top-p cut) falls within
//! rounding of a boundary between two tokens. Log-probabilities are computed here for both backends
//! ([`token_logprobs`]).

use crate::backend::{RowSampling, Sampled, TokenLogprobs};

/// The next token of `logits` (modified in place by the ban, the penalty and the offsets), with its
/// log-probabilities when the rule asks, or `None` when nothing can be sampled (every logit -inf or NaN, or an
/// empty row).
pub fn sample_row(logits: &mut [f32], rule: &RowSampling) -> Option<Sampled> {
    adjust_row(logits, rule);
    let token = choose(logits, rule)?;
    let logprobs = rule.logprobs.map(|top| token_logprobs(logits, token, top));
    Some(Sampled { token, logprobs })
}

/// What the rule does to the logits before choosing: the ban, the repetition penalty, the offsets.
pub fn adjust_row(logits: &mut [f32], rule: &RowSampling) {
    ban(logits, rule.banned);
    if rule.repetition_penalty != 1.0 {
        penalize(logits, rule.seen, rule.repetition_penalty);
    }
    offset(logits, rule.logit_offsets);
}

/// The token of the adjusted `logits`: greedy, or drawn at the rule's temperature within its cuts.
fn choose(logits: &[f32], rule: &RowSampling) -> Option<u32> {
    let t = rule.temperature;
    if t.is_nan() || t <= 0.0 || t == f32::INFINITY {
        return argmax(logits);
    }
    sample_filtered(logits, t, rule)
}

/// `token`'s log-probability under the softmax of `logits` and the `top` most likely tokens' (highest first,
/// lower id first among equals, -inf and NaN left out). The log-sum-exp is accumulated in f64.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let finite = |l: &f32| !l.is_nan() && *l != f32::NEG_INFINITY;
    let mx = logits.iter().filter(|l| finite(l)).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits
        .iter()
        .filter(|l| finite(l))
        .map(|&l| ((l - mx) as f64).exp())
        .sum();
    let lse = mx as f64 + sum.ln();
    let logprob = |l: f32| (l as f64 - lse) as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| finite(&logits[i as usize]))
        .collect();
    let by_rank = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top < best.len() && top > 0 {
        best.select_nth_unstable_by(top - 1, by_rank);
    }
    best.truncate(top);
    best.sort_unstable_by(by_rank);
    let at = |i: u32| logits.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs {
        token,
        logprob: logprob(at(token)),
        top: best.into_iter().map(|i| (i, logprob(at(i)))).collect(),
    }
}

fn ban(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// HF's repetition penalty: positive logits divided by it, the others multiplied.
fn penalize(logits: &mut [f32], seen: &[u32], penalty: f32) {
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI's additive adjustments, one per id.
fn offset(logits: &mut [f32], offsets: &[(u32, f32)]) {
    for &(id, add) in offsets {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += add;
        }
    }
}

/// Index of the largest logit, NaN counting as the largest and the lowest index winning ties (torch.argmax);
/// `None` when there is nothing to pick (an empty row, or every logit -inf).
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let better = |a: f32, b: f32| match (a.is_nan(), b.is_nan()) {
        (an, bn) if an != bn => an,
        _ => a > b,
    };
    let mut best: Option<usize> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|b| better(l, logits[b])) {
            best = Some(i);
        }
    }
    best.filter(|&i| logits[i] != f32::NEG_INFINITY)
        .map(|i| i as u32)
}

/// Order-preserving map of a float to u32: `a < b` iff `key(a) < key(b)` (non-NaN).
fn order_key(x: f32) -> u32 {
    let u = x.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

fn sample_filtered(logits: &[f32], t: f32, rule: &RowSampling) -> Option<u32> {
    let inv_t = 1.0 / t;
    let x: Vec<f32> = logits
        .iter()
        .map(|&l| {
            let v = l * inv_t;
            if v.is_nan() {
                f32::NEG_INFINITY
            } else {
                v
            }
        })
        .collect();
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if mx == f32::NEG_INFINITY {
        return None;
    }
    let e = |v: f32| (v - mx).exp();
    let tau_k = top_k_threshold(&x, rule.top_k);
    let tau = if rule.top_p > 0.0 && rule.top_p < 1.0 {
        top_p_threshold(&x, tau_k, rule.top_p, e)
    } else {
        tau_k
    };
    let kept = |i: usize| order_key(x[i]) >= tau && x[i] != f32::NEG_INFINITY;
    let total: f32 = (0..x.len()).filter(|&i| kept(i)).map(|i| e(x[i])).sum();
    let target = rule.uniform.clamp(0.0, 0.999_999_94) * total;
    let mut acc = 0.0;
    let mut last = None;
    for i in (0..x.len()).filter(|&i| kept(i)) {
        acc += e(x[i]);
        last = Some(i as u32);
        if acc > target {
            return last;
        }
    }
    last
}

/// The k-th largest key (0 keeps everything: no cut when k is 0 or at least the row length).
fn top_k_threshold(x: &[f32], k: usize) -> u32 {
    if k == 0 || k >= x.len() {
        return 0;
    }
    let mut keys: Vec<u32> = x.iter().map(|&v| order_key(v)).collect();
    *keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1
}

/// HF's nucleus over the tokens at or above `tau_k`: the smallest key whose cumulative mass, summing key groups
/// in ascending order, exceeds `(1 - p)` of their total; every token below it is dropped.
fn top_p_threshold(x: &[f32], tau_k: u32, p: f32, e: impl Fn(f32) -> f32) -> u32 {
    let mut kept: Vec<(u32, f32)> = x
        .iter()
        .map(|&v| (order_key(v), e(v)))
        .filter(|&(k, _)| k >= tau_k)
        .collect();
    let z: f32 = kept.iter().map(|&(_, m)| m).sum();
    let limit = (1.0 - p) * z;
    kept.sort_unstable_by_key(|&(k, _)| k);
    let mut mass = 0.0;
    let mut i = 0;
    while i < kept.len() {
        let key = kept[i].0;
        while i < kept.len() && kept[i].0 == key {
            mass += kept[i].1;
            i += 1;
        }
        if mass > limit {
            return key;
        }
    }
    kept.last().map_or(tau_k, |&(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(temperature: f32) -> RowSampling<'static> {
        RowSampling {
            temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            banned: &[],
            seen: &[],
            logit_offsets: &[],
            uniform: 0.5,
            logprobs: None,
        }
    }

    fn token_of(logits: &mut [f32], rule: &RowSampling) -> Option<u32> {
        sample_row(logits, rule).map(|s| s.token)
    }

    #[test]
    fn offsets_add_after_the_penalty_and_move_the_choice() {
        let r = RowSampling {
            repetition_penalty: 2.0,
            seen: &[0],
            logit_offsets: &[(0, 1.0), (2, -5.0), (9, 3.0)],
            ..rule(0.0)
        };
        let mut logits = [3.0, 2.0, 4.0];
        // 3 / 2 + 1 = 2.5 beats 2; 4 - 5 = -1; id 9 is outside the row and ignored.
        assert_eq!(token_of(&mut logits, &r), Some(0));
        assert_eq!(logits, [2.5, 2.0, -1.0]);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_adjusted_row() {
        let r = RowSampling {
            banned: &[1],
            logit_offsets: &[(3, 0.5)],
            logprobs: Some(2),
            ..rule(0.0)
        };
        let s = sample_row(&mut [1.0, 7.0, 2.0, 1.5], &r).unwrap();
        // Adjusted: [1, -inf, 2, 2]; softmax over e^1 + 2 e^2.
        let lse = (1f64.exp() + 2.0 * 2f64.exp()).ln();
        let lp = s.logprobs.unwrap();
        assert_eq!((s.token, lp.token), (2, 2));
        assert!((lp.logprob as f64 - (2.0 - lse)).abs() < 1e-6);
        // Ties at 2.0: the lower id first; the banned token is never listed.
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 3]);
        let all = token_logprobs(&[1.0, f32::NEG_INFINITY, 2.0], 0, 5);
        assert_eq!(all.top.len(), 2);
        let total: f64 = all.top.iter().map(|t| (t.1 as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(sample_row(&mut [1.0, 2.0], &rule(0.0)).unwrap().logprobs.is_none());
    }

    #[test]
    fn greedy_skips_banned_and_breaks_ties_low() {
        let r = RowSampling {
            banned: &[3],
            ..rule(0.0)
        };
        assert_eq!(token_of(&mut [0.0, 2.0, 2.0, 9.0], &r), Some(1));
        assert_eq!(argmax(&[1.0, f32::NAN, 5.0]), Some(1), "NaN is the largest");
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        let r = RowSampling {
            repetition_penalty: 2.0,
            seen: &[0, 2],
            ..rule(0.0)
        };
        let mut logits = [3.0, 2.0, -1.0];
        // token 0 seen: 3 -> 1.5 < 2, so 1 wins; token 2 seen: -1 -> -2.
        assert_eq!(token_of(&mut logits, &r), Some(1));
        assert_eq!(logits, [1.5, 2.0, -2.0]);
    }

    #[test]
    fn inverse_cdf_walks_index_order() {
        // Equal logits: each token owns a quarter of [0, 1).
        for (u, want) in [
            (0.0, 0),
            (0.24, 0),
            (0.26, 1),
            (0.6, 2),
            (0.99, 3),
            (1.5, 3),
        ] {
            let r = RowSampling {
                uniform: u,
                ..rule(1.0)
            };
            assert_eq!(token_of(&mut [1.0; 4], &r), Some(want), "u = {u}");
        }
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_nucleus() {
        let draws = |r: RowSampling, logits: &[f32]| -> Vec<u32> {
            (0..100)
                .map(|i| {
                    let r = RowSampling {
                        uniform: i as f32 / 100.0,
                        ..r
                    };
                    token_of(&mut logits.to_vec(), &r).unwrap()
                })
                .collect()
        };
        let k2 = draws(
            RowSampling {
                top_k: 2,
                ..rule(1.0)
            },
            &[1.0, 0.5, 0.9, -3.0, 0.9],
        );
        // The second-largest value, 0.9, is tied: both copies stay.
        assert!(k2.iter().all(|&t| [0, 2, 4].contains(&t)), "{k2:?}");
        assert!([0, 2, 4].iter().all(|t| k2.contains(t)));
        let nucleus = draws(
            RowSampling {
                top_p: 0.5,
                ..rule(1.0)
            },
            &[0.0, 5.0, 0.0],
        );
        assert!(nucleus.iter().all(|&t| t == 1), "{nucleus:?}");
        // 1 - top_p rounds to 1: the top token still survives.
        let tiny = draws(
            RowSampling {
                top_p: 1e-8,
                ..rule(1.0)
            },
            &[0.0, 5.0, 4.9],
        );
        assert!(tiny.iter().all(|&t| t == 1), "{tiny:?}");
        // Top-k then top-p: p = 0.6 of {3.0, 2.9} needs both (each has about half the mass).
        let both = draws(
            RowSampling {
                top_k: 2,
                top_p: 0.6,
                ..rule(1.0)
            },
            &[3.0, -1.0, 2.9, 0.0],
        );
        assert!(both.contains(&0) && both.contains(&2) && both.iter().all(|&t| t == 0 || t == 2));
    }

    #[test]
    fn nothing_to_sample_is_none() {
        let r = RowSampling {
            banned: &[0, 1],
            ..rule(0.7)
        };
        assert_eq!(token_of(&mut [1.0, 2.0], &r), None);
        let greedy = RowSampling {
            banned: &[0, 1],
            ..rule(0.0)
        };
        assert_eq!(token_of(&mut [1.0, 2.0], &greedy), None);
        assert_eq!(token_of(&mut [f32::NAN, f32::NAN], &rule(0.7)), None);
    }
}
