//! Choosing the next token from logits, as transformers' `generate`: the repetition penalty
//! (a logits processor, applied in greedy search too), then, when sampling, the temperature,
//! top-k and top-p warpers in that order, and a draw from the softmax with a seeded RNG.

use qlora_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen (transformers' `GenerationConfig` fields of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// `false`: greedy (argmax, first index on ties).
    pub do_sample: bool,
    pub temperature: f32,
    /// 1.0 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1.0 is none.
    pub repetition_penalty: f32,
}

impl SamplingParams {
    /// Greedy decoding without a penalty.
    pub const GREEDY: SamplingParams = SamplingParams {
        do_sample: false,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
    };

    /// YaYi's README settings: sampling at temperature 0.3 with a repetition penalty of 1.1, and
    /// transformers' default top-k 50.
    pub const YAYI: SamplingParams = SamplingParams {
        do_sample: true,
        temperature: 0.3,
        top_p: 1.0,
        top_k: 50,
        repetition_penalty: 1.1,
    };

    /// Rejects values transformers rejects (a non-positive temperature or penalty, top-p
    /// outside (0, 1]).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(msg));
        // Written so that NaN fails too.
        let positive = |x: f32| x > 0.0;
        if !positive(self.repetition_penalty) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.do_sample && !positive(self.temperature) {
            return bad(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            ));
        }
        if !(positive(self.top_p) && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Chooses tokens with [`SamplingParams`] and its own seeded RNG (one draw per sampled token,
/// so a seed reproduces a generation).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Result<Sampler> {
        params.validate()?;
        Ok(Sampler {
            params,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token after `context` (prompt and generated ids, for the penalty) from its
    /// `logits` `[V]`.
    pub fn next_token(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut scores = logits.to_vec();
        apply_repetition_penalty(&mut scores, context, self.params.repetition_penalty);
        self.next_token_penalized(scores)
    }

    /// [`Sampler::next_token`] for logits the repetition penalty was applied to already.
    pub fn next_token_penalized(&mut self, mut scores: Vec<f32>) -> u32 {
        if !self.params.do_sample {
            return argmax(&scores);
        }
        let inverse_temperature = self.inverse_temperature();
        scores.iter_mut().for_each(|s| *s *= inverse_temperature);
        keep_top_k(&mut scores, self.params.top_k);
        self.draw(&mut scores)
    }

    /// What the scores are multiplied by before top-k (the device computes the same f32).
    pub fn inverse_temperature(&self) -> f32 {
        1.0 / self.params.temperature
    }

    /// The token [`Sampler::next_token`] draws when the penalty, the temperature and top-k were
    /// applied elsewhere (on the GPU): `candidates` are the `(token, score)` pairs top-k kept,
    /// in any order. The same token for the same seed: every other score is -inf in
    /// `next_token`'s row, which neither top-p (zero probability, sorted first) nor the draw
    /// (skipped) sees.
    pub fn next_token_from_candidates(&mut self, candidates: &mut [(u32, f32)]) -> u32 {
        candidates.sort_unstable_by_key(|&(token, _)| token);
        let mut scores: Vec<f32> = candidates.iter().map(|&(_, score)| score).collect();
        let chosen = self.draw(&mut scores);
        candidates[chosen as usize].0
    }

    /// Top-p, then a draw from the softmax of `scores`.
    fn draw(&mut self, scores: &mut [f32]) -> u32 {
        keep_top_p(scores, self.params.top_p);
        sample(scores, self.rng.random::<f64>())
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token of `context` (once, however often
/// it occurs) has its score divided by `penalty` when positive, multiplied when negative.
pub fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in context {
        let Some(score) = scores.get_mut(id as usize) else {
            continue;
        };
        if std::mem::replace(&mut seen[id as usize], true) {
            continue;
        }
        *score = if *score < 0.0 {
            *score * penalty
        } else {
            *score / penalty
        };
    }
}

/// The index of the largest score, the first on ties (as `torch.argmax`).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// `TopKLogitsWarper`: scores below the k-th largest become -inf (ties with it stay).
fn keep_top_k(scores: &mut [f32], k: usize) {
    if k == 0 || k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    scores
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: in ascending order of score, the tokens whose cumulative probability is
/// at most `1 - top_p` become -inf; the most likely token always stays.
fn keep_top_p(scores: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut cumulative = 0f64;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cumulative += probs[i];
        if rank < last && cumulative <= f64::from(1.0 - top_p) {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// The token whose cumulative-probability interval holds `u` in `[0, 1)`.
fn sample(scores: &[f32], u: f64) -> u32 {
    let probs = softmax(scores);
    let mut cumulative = 0.0;
    let mut last_possible = 0;
    for (i, p) in probs.iter().enumerate() {
        if *p > 0.0 {
            cumulative += p;
            last_possible = i;
            if u < cumulative {
                return i as u32;
            }
        }
    }
    // `u` above the rounded total: the last token that has any probability.
    last_possible as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawing_from_the_top_k_candidates_gives_the_full_rows_token() {
        let mut rng = StdRng::seed_from_u64(3);
        for case in 0..200 {
            let vocab = 50 + case;
            // Coarse values, so that the k-th largest often ties.
            let logits: Vec<f32> = (0..vocab)
                .map(|_| (rng.random::<f32>() * 40.0).round() / 4.0 - 5.0)
                .collect();
            let params = SamplingParams {
                do_sample: true,
                temperature: 0.3 + (case % 5) as f32 * 0.4,
                top_p: [1.0, 0.9, 0.5, 0.05][case % 4],
                top_k: 1 + case % 40,
                repetition_penalty: 1.0,
            };
            let mut full = Sampler::new(params, case as u64).unwrap();
            let mut from_candidates = Sampler::new(params, case as u64).unwrap();
            for _ in 0..5 {
                let expected = full.next_token(&logits, &[]);
                // What the device hands over: the kept scores in no particular order.
                let t = from_candidates.inverse_temperature();
                let mut scaled: Vec<f32> = logits.iter().map(|&l| l * t).collect();
                keep_top_k(&mut scaled, params.top_k);
                let mut candidates: Vec<(u32, f32)> = scaled
                    .iter()
                    .enumerate()
                    .rev()
                    .filter(|(_, s)| **s != f32::NEG_INFINITY)
                    .map(|(i, &s)| (i as u32, s))
                    .collect();
                assert_eq!(
                    from_candidates.next_token_from_candidates(&mut candidates),
                    expected,
                    "case {case}"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_scores_once() {
        let mut scores = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut scores, &[0, 1, 0, 7], 2.0);
        assert_eq!(scores, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_top_p_keeps_the_smallest_nucleus() {
        let mut scores = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        keep_top_k(&mut scores, 2);
        let inf = f32::NEG_INFINITY;
        assert_eq!(scores, vec![inf, 3.0, 2.0, 2.0, inf]);
        // probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two.
        let mut scores: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        keep_top_p(&mut scores, 0.6);
        assert!(scores[0].is_finite() && scores[1].is_finite() && scores[2] == inf);
        let mut scores: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        keep_top_p(&mut scores, 0.1);
        assert!(scores[0].is_finite() && scores[1] == inf && scores[2] == inf);
    }

    #[test]
    fn sampling_follows_the_probabilities_and_the_seed() {
        let logits: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let params = SamplingParams {
            do_sample: true,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
        };
        let draw = |seed| {
            let mut sampler = Sampler::new(params, seed).unwrap();
            (0..2000)
                .map(|_| sampler.next_token(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let tokens = draw(7);
        assert_eq!(tokens, draw(7));
        assert_ne!(tokens, draw(8));
        let share = tokens.iter().filter(|&&t| t == 0).count() as f64 / 2000.0;
        assert!(
            (share - 0.7).abs() < 0.04,
            "token 0 drawn {share} of the time"
        );
        let mut greedy = Sampler::new(SamplingParams::GREEDY, 0).unwrap();
        assert_eq!(greedy.next_token(&[0.1, 0.5, 0.5], &[]), 1);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let mut p = SamplingParams::YAYI;
        p.temperature = 0.0;
        assert!(Sampler::new(p, 0).is_err());
        let mut p = SamplingParams::GREEDY;
        p.top_p = 1.5;
        assert!(Sampler::new(p, 0).is_err());
    }
}
