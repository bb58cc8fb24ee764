//! A request's sampling parameters and state. The rule that turns a row of logits into a token (banned ids,
//! repetition penalty, OpenAI's logit bias and presence / frequency penalties, then greedy or temperature / top-k /
//! top-p with a uniform draw) runs in the backend, on the device for the whole batch: see [`RowSampling`].

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
    /// OpenAI's: subtracted once from the logit of every token already generated (0: none).
    pub presence_penalty: f32,
    /// OpenAI's: subtracted once per time a token has been generated (0: none).
    pub frequency_penalty: f32,
    /// Added to the logits of these ids at every step (OpenAI's `logit_bias`), ids distinct.
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(n)`: report each new token's log-probability and the `n` most likely tokens' (OpenAI's `logprobs`
    /// with `top_logprobs = n`).
    pub logprobs: Option<usize>,
    pub seed: u64,
}

/// 64 fresh bits from the operating system's generator (the clock's nanoseconds where it has none): the seed of
/// a request that gives none, as OpenAI, vLLM and TGI draw fresh randomness then.
pub fn fresh_seed() -> u64 {
    use rand::TryRngCore;
    rand::rngs::OsRng.try_next_u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

/// The most `top_logprobs` a request may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
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
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!(
                    "logit_bias: the bias of token {id} must be in [-100, 100], got {bias}"
                ));
            }
        }
        let mut ids: Vec<u32> = self.logit_bias.iter().map(|b| b.0).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("logit_bias: a token id is given twice".into());
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {n}"
            ));
        }
        Ok(())
    }

    fn penalizes_presence(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// One request's sampling state: its rule, its own seeded generator (so a seeded request draws the same numbers
/// whatever else shares its batch), its banned ids, the distinct ids it has seen (for the repetition penalty) and
/// the additive offset of each id (logit bias, presence and frequency penalties of the tokens it has generated).
/// The backend applies the rule ([`Backend::sample`](crate::backend::Backend::sample)); this only feeds it.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    banned: Vec<u32>,
    /// Sorted, distinct; kept only when there is a penalty to apply.
    seen: Vec<u32>,
    /// Sorted by id, distinct: `(id, bias - frequency * count - presence)` for every biased or generated id.
    offsets: Vec<(u32, f32)>,
    /// Times each id of `offsets` was generated, entry for entry.
    generated: Vec<u32>,
}

impl Sampler {
    /// `banned` ids are never produced (IDEFICS: `<image>` and `<fake_token_around_image>`); `prompt` is what the
    /// request has seen before its first new token.
    pub fn new(params: SamplingParams, banned: Vec<u32>, prompt: &[u32]) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut offsets = params.logit_bias.clone();
        offsets.sort_unstable_by_key(|o| o.0);
        let mut s = Sampler {
            generated: vec![0; offsets.len()],
            offsets,
            params,
            rng,
            banned,
            seen: Vec::new(),
        };
        prompt.iter().for_each(|&t| s.see(t));
        s
    }

    /// Records a token the request has generated.
    pub fn observe(&mut self, token: u32) {
        self.see(token);
        if !self.params.penalizes_presence() {
            return;
        }
        let at = match self.offsets.binary_search_by_key(&token, |o| o.0) {
            Ok(at) => at,
            Err(at) => {
                self.offsets.insert(at, (token, 0.0));
                self.generated.insert(at, 0);
                at
            }
        };
        self.generated[at] += 1;
        let bias = self.params.logit_bias.iter().find(|b| b.0 == token).map_or(0.0, |b| b.1);
        let p = &self.params;
        self.offsets[at].1 =
            bias - p.frequency_penalty * self.generated[at] as f32 - p.presence_penalty;
    }

    /// Records a token for the repetition penalty (prompt and generated alike, as HF does).
    fn see(&mut self, token: u32) {
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
            logit_offsets: &self.offsets,
            uniform,
            logprobs: self.params.logprobs,
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
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logit_bias: vec![(9, 2.0), (3, -1.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(p, vec![], &[9, 9, 4]);
        assert_eq!(s.rule(0.0).logit_offsets, &[(3, -1.0), (9, 2.0)]);
        s.observe(9);
        s.observe(5);
        s.observe(9);
        // 9: bias 2 - 2 x 0.25 - 0.5; 5: -0.25 - 0.5; the prompt's 4 is not counted.
        assert_eq!(
            s.rule(0.0).logit_offsets,
            &[(3, -1.0), (5, -0.75), (9, 1.0)]
        );
        let plain = SamplingParams {
            logit_bias: vec![(1, 1.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(plain, vec![], &[]);
        s.observe(2);
        assert_eq!(s.rule(0.0).logit_offsets, &[(1, 1.0)]);
    }

    #[test]
    fn out_of_range_penalties_biases_and_top_logprobs_are_refused() {
        let bad = [
            SamplingParams { presence_penalty: 2.5, ..Default::default() },
            SamplingParams { frequency_penalty: -3.0, ..Default::default() },
            SamplingParams { logit_bias: vec![(1, 101.0)], ..Default::default() },
            SamplingParams { logit_bias: vec![(1, 1.0), (1, 2.0)], ..Default::default() },
            SamplingParams { logprobs: Some(21), ..Default::default() },
        ];
        for (p, field) in bad.iter().zip(["presence", "frequency", "logit_bias", "twice", "top_logprobs"]) {
            assert!(p.validate().unwrap_err().contains(field), "{p:?}");
        }
        assert!(SamplingParams { logprobs: Some(20), ..Default::default() }.validate().is_ok());
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
