//! Generation on the device: the prompt through the model in chunks, then one token per step,
//! the token chosen on the device (argmax, or a draw with temperature, top-k and top-p) so
//! that only its id comes back.

use qlora_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::buffers::{submit_with_read, PendingRead};
use crate::kernels::SampleParams;
use crate::model::LoadedModel;

/// How the next token is chosen (transformers' `GenerationConfig` fields of the same names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
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

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        do_sample: false,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
    };

    fn validate(&self) -> Result<()> {
        let positive = |x: f32| x > 0.0;
        if !positive(self.repetition_penalty) {
            return Err(Error::Invalid(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            )));
        }
        if self.do_sample && !positive(self.temperature) {
            return Err(Error::Invalid(format!(
                "temperature must be > 0 when sampling, got {}",
                self.temperature
            )));
        }
        if !(positive(self.top_p) && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// When and how generation goes on.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end generation (EOS, an end-of-turn token); they are not returned.
    pub stop_ids: Vec<u32>,
    pub sampling: Sampling,
    /// Seeds the draws (one per sampled token), so a seed reproduces a generation.
    pub seed: u64,
}

impl GenerateOptions {
    pub fn greedy(max_new_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens,
            stop_ids: Vec::new(),
            sampling: Sampling::GREEDY,
            seed: 0,
        }
    }
}

impl LoadedModel {
    /// Generates after `prompt` (the cache is reset first). `on_token(generated)` sees the ids
    /// so far after each new token and returns `true` to stop. Returns the generated ids
    /// without a stop id; generation also ends when the KV cache is full. Afterwards the cache
    /// holds the prompt and every generated id but the last.
    pub async fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_token: impl FnMut(&[u32]) -> bool,
    ) -> Result<Vec<u32>> {
        options.sampling.validate()?;
        if prompt.is_empty() {
            return Err(Error::Invalid("generation needs a non-empty prompt".into()));
        }
        self.reset();
        let chunk = self.chunk();
        let (head, last) = prompt.split_at((prompt.len() - 1) / chunk * chunk);
        for piece in head.chunks(chunk) {
            let rec = self.record_forward_last(piece)?;
            self.engine().queue.submit([rec.into_encoder().finish()]);
        }
        let rec = self.record_forward_last(last)?;
        if options.max_new_tokens == 0 {
            // The cache must still hold the whole prompt.
            self.engine().queue.submit([rec.into_encoder().finish()]);
            return Ok(Vec::new());
        }
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut context: Vec<u32> = prompt.to_vec();
        let mut generated = Vec::new();
        // Without a repetition penalty a choice needs nothing from the host, so each chosen
        // token's pass is recorded and submitted before the token is read back: the host
        // records a step while the GPU computes the one before (a pass whose token turns out
        // unwanted is forgotten). With a penalty the host uploads the context first.
        let ahead = options.sampling.repetition_penalty == 1.0;
        let mut pending = self.submit_choice(rec, &options.sampling, &context, &mut rng)?;
        loop {
            let run_ahead = ahead
                && generated.len() + 1 < options.max_new_tokens
                && self.cached_tokens() < self.max_seq_len();
            let next = if run_ahead {
                let rec = self.record_forward_chosen()?;
                Some(self.submit_choice(rec, &options.sampling, &context, &mut rng)?)
            } else {
                None
            };
            let bytes = pending.read(self.engine()).await?;
            let token = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let done = if options.stop_ids.contains(&token) {
                true
            } else {
                context.push(token);
                generated.push(token);
                let cached = self.cached_tokens() - usize::from(run_ahead);
                on_token(&generated)
                    || cached == self.max_seq_len()
                    || generated.len() == options.max_new_tokens
            };
            if done {
                if run_ahead {
                    // Its token was not wanted: the cache ends at the last one that was.
                    self.forget_last();
                }
                break;
            }
            pending = match next {
                Some(next) => next,
                None => {
                    let rec = self.record_forward_last(&[token])?;
                    self.submit_choice(rec, &options.sampling, &context, &mut rng)?
                }
            };
        }
        Ok(generated)
    }

    /// Adds the choice of the next token to `rec` (after the forward pass), and its copy into
    /// the step buffer for a pass run ahead, and submits it with the token's read-back.
    fn submit_choice(
        &self,
        mut rec: crate::kernels::Recorder,
        sampling: &Sampling,
        context: &[u32],
        rng: &mut StdRng,
    ) -> Result<PendingRead> {
        let mut params = SampleParams {
            n: self.vocab_size() as u32,
            context_len: 0,
            top_k: sampling.top_k.min(u32::MAX as usize) as u32,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            penalty: sampling.repetition_penalty,
            u: 0.0,
        };
        let (logits, token, context_ids) = self.sampling_buffers();
        if sampling.repetition_penalty != 1.0 {
            let mut distinct = context.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            // The context never exceeds the cache, which the buffer is sized for.
            self.engine()
                .queue
                .write_buffer(context_ids, 0, bytemuck::cast_slice(&distinct));
            params.context_len = distinct.len() as u32;
            rec.repetition_penalty(&params, logits, context_ids);
        }
        if sampling.do_sample {
            params.u = rng.random::<f32>();
        }
        rec.choose(&params, !sampling.do_sample, logits, token);
        self.keep_choice(&mut rec);
        Ok(submit_with_read(
            self.engine(),
            rec.into_encoder(),
            token,
            4,
        ))
    }
}
