//! Choosing the next token from a row of logits: banned ids, repetition penalty, then greedy or
//! temperature / top-k / top-p sampling with a seeded generator (same seed, same tokens).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means no nucleus cut.
    pub top_p: f32,
    /// 1.0 means none; HF's rule: divide positive logits of seen tokens by it, multiply negative ones.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    banned: Vec<u32>,
}

impl Sampler {
    /// `banned` ids are never produced (IDEFICS: `<image>` and `<fake_token_around_image>`).
    pub fn new(params: SamplingParams, banned: Vec<u32>) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler {
            params,
            rng,
            banned,
        }
    }

    /// The next token; `history` is every token so far (prompt and generated), for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        for &id in &self.banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / self.params.repetition_penalty
                    } else {
                        *l * self.params.repetition_penalty
                    };
                }
            }
        }
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        self.sample_filtered(logits)
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(logits);
        }
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let max = logits[order[0] as usize] / t;
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| (logits[i as usize] / t - max).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Nucleus: the smallest prefix whose mass reaches top_p (at least one token).
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    mass += p;
                    mass >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &p) in probs.iter().enumerate() {
            if r < p {
                return order[i];
            }
            r -= p;
        }
        *order.last().expect("non-empty")
    }
}

/// Index of the largest logit, the lowest index on ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_skips_banned_and_breaks_ties_low() {
        let mut s = Sampler::new(SamplingParams::default(), vec![3]);
        let mut logits = vec![0.0, 2.0, 2.0, 9.0];
        assert_eq!(s.sample(&mut logits, &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, vec![]);
        let mut logits = vec![3.0, 2.0, -1.0];
        // token 0 seen: 3 -> 1.5 < 2, so 1 wins; token 2 seen: -1 -> -2.
        assert_eq!(s.sample(&mut logits, &[0, 2]), 1);
        assert_eq!(logits, vec![1.5, 2.0, -2.0]);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), vec![]);
            (0..64)
                .map(|_| s.sample(&mut vec![1.0, 0.5, 0.9, -3.0], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        assert!(a.iter().all(|&t| t == 0 || t == 2), "{a:?}");
        assert!(a.contains(&0) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p, vec![]);
        for _ in 0..32 {
            assert_eq!(s.sample(&mut vec![5.0, 0.0, 0.0], &[]), 0);
        }
    }
}
