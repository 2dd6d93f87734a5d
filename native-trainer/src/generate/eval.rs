//! The ADGEN evaluation: a response generated for each example's prompt, scored against its label
//! with ROUGE-1/2/L and BLEU-4 as ChatGLM's evaluation does.

use super::decode::{generate_batch, GenerateOptions, Generator};
use super::sampling::{Sampler, SamplingParams};
use super::text::{prompt_ids, response_text, Stops};
use qlora_core::metrics::{mean, AdgenScorer, MeanScores};
use qlora_core::prompt::{Conversation, PromptTemplate};
use qlora_core::tokenizer::Tokenizer;
use qlora_core::{Error, Result};

/// One validation example: the user's text and the reference response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub prompt: String,
    pub label: String,
}

/// A generated response and its reference (the `{"pred", "label"}` lines `qlora score` reads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub pred: String,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    pub sampling: SamplingParams,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Prompts generated together (left-padded).
    pub batch_size: usize,
    /// The system message of every prompt (`None`: the template's default).
    pub system: Option<String>,
}

impl Default for EvalOptions {
    /// Greedy, 100 new tokens, batches of 4.
    fn default() -> Self {
        EvalOptions {
            sampling: SamplingParams::GREEDY,
            seed: 0,
            max_new_tokens: 100,
            batch_size: 4,
            system: None,
        }
    }
}

/// The predictions, in example order, and their mean scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub predictions: Vec<Prediction>,
    pub scores: MeanScores,
}

/// Generates a response for every example and scores it. `on_batch(done, total)` reports
/// progress after each batch.
pub fn evaluate(
    model: &dyn Generator,
    tokenizer: &Tokenizer,
    template: &PromptTemplate,
    examples: &[Example],
    options: &EvalOptions,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Evaluation> {
    if examples.is_empty() {
        return Err(Error::Invalid(
            "evaluation needs at least one example".into(),
        ));
    }
    let stops = Stops::new(tokenizer, template)?;
    let generate_options = GenerateOptions {
        max_new_tokens: options.max_new_tokens,
        stop_ids: stops.ids.clone(),
    };
    let mut sampler = Sampler::new(options.sampling, options.seed)?;
    let scorer = AdgenScorer::new();
    let mut predictions = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(options.batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|example| {
                let conversation = Conversation {
                    system: options.system.clone(),
                    ..Conversation::new(example.prompt.clone())
                };
                prompt_ids(tokenizer, template, &conversation)
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = generate_batch(
            model,
            &prompts,
            &generate_options,
            &mut sampler,
            |_, generated| {
                // A row ends at the end marker; decoding only the tail keeps this cheap.
                let tail = &generated[generated.len().saturating_sub(8)..];
                tokenizer
                    .decode(tail, false)
                    .is_ok_and(|text| stops.cut(&text).1)
            },
        )?;
        for (example, generated) in chunk.iter().zip(outputs) {
            predictions.push(Prediction {
                pred: response_text(tokenizer, &stops, &generated)?,
                label: example.label.clone(),
            });
        }
        on_batch(predictions.len(), examples.len());
    }
    let pair_scores: Vec<_> = predictions
        .iter()
        .map(|p| scorer.score_pair(&p.pred, &p.label))
        .collect();
    let scores = mean(&pair_scores).expect("at least one example was scored");
    Ok(Evaluation {
        predictions,
        scores,
    })
}
