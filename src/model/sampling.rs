//! A request's sampling parameters and state. The rule that turns a row of logits into a token (banned ids,
//! repetition penalty, then greedy or temperature / top-k / top-p with a uniform draw) runs in the backend, on
//! the device for the whole batch: see [`RowSampling`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backend::RowSampling;

/// Temperatures below this are greedy: dividing logits by a smaller one can overflow to infinity (1/1e-45 does),
/// and the distribution it gives is greedy's to within rounding anyway.
pub const MIN_TEMPERATURE: f32 = 1e-3;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy, and so does anything below [`MIN_TEMPERATURE`].
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

/// One request's sampling state: its rule, its own seeded generator (so a seeded request draws the same numbers
/// whatever else shares its batch), its banned ids and the distinct ids it has seen (for the repetition penalty).
/// The backend applies the rule ([`Backend::sample`](crate::backend::Backend::sample)); this only feeds it.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    banned: Vec<u32>,
    /// Sorted, distinct; kept only when there is a penalty to apply.
    seen: Vec<u32>,
}

impl Sampler {
    /// `banned` ids are never produced (IDEFICS: `<image>` and `<fake_token_around_image>`); `prompt` is what the
    /// request has seen before its first new token.
    pub fn new(params: SamplingParams, banned: Vec<u32>, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut s = Sampler {
            params,
            rng,
            banned,
            seen: Vec::new(),
        };
        prompt.iter().for_each(|&t| s.observe(t));
        s
    }

    /// Records a token the request has seen.
    pub fn observe(&mut self, token: u32) {
        if self.params.repetition_penalty != 1.0 {
            if let Err(at) = self.seen.binary_search(&token) {
                self.seen.insert(at, token);
            }
        }
    }

    /// The uniform number in `[0, 1)` for the next token: the generator's next draw when sampling (a greedy
    /// request's generator never advances).
    pub fn draw(&mut self) -> f32 {
        if self.params.temperature > 0.0 {
            self.rng.random::<f32>()
        } else {
            0.0
        }
    }

    /// The rule for the next token, with `uniform` from [`Sampler::draw`].
    pub fn rule(&self, uniform: f32) -> RowSampling<'_> {
        let t = self.params.temperature;
        RowSampling {
            temperature: if t < MIN_TEMPERATURE { 0.0 } else { t },
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            repetition_penalty: self.params.repetition_penalty,
            banned: &self.banned,
            seen: &self.seen,
            uniform,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_below_the_floor_are_greedy() {
        for (t, rule_t) in [(1e-45, 0.0), (5e-4, 0.0), (1e-3, 1e-3), (0.7, 0.7)] {
            let params = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            assert_eq!(
                Sampler::new(params, vec![], &[]).rule(0.5).temperature,
                rule_t,
                "{t}"
            );
        }
    }

    #[test]
    fn seeded_draws_repeat_and_greedy_draws_nothing() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draws = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), vec![], &[]);
            (0..16).map(|_| s.draw()).collect::<Vec<_>>()
        };
        let a = draws(&p);
        assert_eq!(a, draws(&p));
        assert!(a.iter().all(|u| (0.0..1.0).contains(u)));
        assert_ne!(a[0], a[1]);
        assert_ne!(
            a,
            draws(&SamplingParams {
                seed: 8,
                ..p.clone()
            })
        );
        assert!(draws(&SamplingParams::default()).iter().all(|&u| u == 0.0));
    }

    #[test]
    fn seen_ids_are_distinct_and_kept_only_with_a_penalty() {
        let p = SamplingParams {
            repetition_penalty: 1.3,
            ..Default::default()
        };
        let mut s = Sampler::new(p, vec![4], &[9, 2, 9]);
        s.observe(5);
        s.observe(2);
        let rule = s.rule(0.0);
        assert_eq!(rule.seen, &[2, 5, 9]);
        assert_eq!(rule.banned, &[4]);
        let plain = Sampler::new(SamplingParams::default(), vec![], &[1, 2]);
        assert!(plain.rule(0.0).seen.is_empty());
    }
}
