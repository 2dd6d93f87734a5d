//! `qlora predict`: generation with a base model and an optional adapter, on a CUDA device or
//! the CPU. One `--prompt`, a JSON-lines file (`--input`/`--output`), or an interactive chat
//! that keeps the history (`/reset` forgets it, end of input quits). Responses stream as they
//! are generated.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use qlora_core::prompt::Conversation;
use qlora_core::quant::QuantType;
use qlora_trainer::generate::model::{load_for_generation, GenerationDevice, GenerationModel};
use qlora_trainer::generate::text::{prompt_ids, response_text, Stops, TextStream};
use qlora_trainer::generate::{generate, GenerateOptions, Sampler, SamplingParams};
use qlora_trainer::load::QuantOnLoad;

use super::train::{choose_device, CudaPrecision, Device};

/// The model to generate with (shared by `predict` and `eval`).
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct ModelArgs {
    /// HF model directory (full precision or 4-bit) or a LLaMA-family `.gguf` file.
    #[arg(long)]
    pub model_name_or_path: PathBuf,
    /// A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantize a full-precision base to this 4-bit type on load (QLoRA's frozen base).
    #[arg(long)]
    pub quan: Option<QuantType>,
    /// With `--quan`: quantize the absmax too.
    #[arg(long)]
    pub double_quant: bool,
    /// A prompt format string replacing the model's own template (see `qlora train --help`).
    #[arg(long)]
    pub prompt_template: Option<String>,
    /// The system message (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Where to generate [default: cuda when a CUDA device opens, else cpu].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// CUDA: activation precision (f32 is the exact check mode).
    #[arg(long, value_enum, default_value = "bf16")]
    pub precision: CudaPrecision,
    /// CUDA: fold the adapter into a dense bf16 copy of each adapted weight instead of applying
    /// it unmerged (faster prefill; slower decoding and more memory, as every token reads the
    /// copy in bf16).
    #[arg(long)]
    pub merge_adapter: bool,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<GenerationModel> {
        let quant = self.quan.map(|quant_type| QuantOnLoad {
            quant_type,
            double_quant: self.double_quant,
            blocksize: 64,
        });
        if quant.is_none() && self.double_quant {
            bail!("--double_quant needs --quan");
        }
        let device = match choose_device(self.device)? {
            Some(gpu) => {
                tracing::info!("generating on {}", gpu.describe());
                GenerationDevice::Cuda {
                    gpu,
                    precision: self.precision.into(),
                    merge_adapter: self.merge_adapter,
                }
            }
            None if self.merge_adapter => bail!("--merge_adapter needs --device cuda"),
            None => GenerationDevice::Cpu,
        };
        load_for_generation(
            &self.model_name_or_path,
            self.adapter.as_deref(),
            quant,
            self.prompt_template.as_deref(),
            device,
        )
    }
}

/// Token choice and length (transformers' `generate` arguments of the same names); unset values
/// take the command's defaults.
#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct SamplingArgs {
    /// `false` for greedy decoding.
    #[arg(long, action = clap::ArgAction::Set)]
    pub do_sample: Option<bool>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// 0 keeps every token.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self, defaults: SamplingParams) -> SamplingParams {
        SamplingParams {
            do_sample: self.do_sample.unwrap_or(defaults.do_sample),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
        }
    }
}

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Defaults as YaYi's README: sampling, temperature 0.3, repetition penalty 1.1, top-k 50.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// One prompt; the response is streamed to stdout.
    #[arg(long, conflicts_with = "input")]
    pub prompt: Option<String>,
    /// JSON lines, one object per prompt with the text under `--prompt_column`.
    #[arg(long, requires = "output")]
    pub input: Option<PathBuf>,
    /// Where `--input`'s objects go, each with a `response` added.
    #[arg(long, requires = "input")]
    pub output: Option<PathBuf>,
    #[arg(long, default_value = "content")]
    pub prompt_column: String,
}

/// The loaded model and everything each generation shares.
struct Predictor {
    loaded: GenerationModel,
    stops: Stops,
    options: GenerateOptions,
    sampler: Sampler,
    system: Option<String>,
}

impl Predictor {
    /// Generates the response to `conversation`, writing it to `out` as it grows (when given).
    fn respond(
        &mut self,
        conversation: &Conversation,
        mut out: Option<&mut dyn Write>,
    ) -> anyhow::Result<String> {
        let GenerationModel {
            model,
            tokenizer,
            template,
        } = &self.loaded;
        let prompt = prompt_ids(tokenizer, template, conversation)?;
        let mut stream = TextStream::new(tokenizer, &self.stops);
        let mut write_error = None;
        let generated = generate(&**model, &prompt, &self.options, &mut self.sampler, |ids| {
            let Some(out) = out.as_deref_mut() else {
                return false;
            };
            match stream.push(ids) {
                Ok((piece, ended)) => {
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                        write_error = Some(e);
                        return true;
                    }
                    ended
                }
                Err(_) => false,
            }
        })?;
        if let Some(e) = write_error {
            return Err(e).context("writing the response");
        }
        if let Some(out) = out {
            write!(out, "{}", stream.finish(&generated)?)?;
            writeln!(out)?;
            out.flush()?;
        }
        Ok(response_text(tokenizer, &self.stops, &generated)?)
    }

    fn conversation(&self, query: &str) -> Conversation {
        Conversation {
            system: self.system.clone(),
            ..Conversation::new(query)
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let stops = Stops::new(&loaded.tokenizer, &loaded.template)?;
    let options = GenerateOptions {
        max_new_tokens: args.sampling.max_new_tokens,
        stop_ids: stops.ids.clone(),
    };
    let sampler = Sampler::new(
        args.sampling.params(SamplingParams::YAYI),
        args.sampling.seed,
    )?;
    let mut predictor = Predictor {
        loaded,
        stops,
        options,
        sampler,
        system: args.model.system.clone(),
    };
    let stdout = std::io::stdout();
    if let Some(prompt) = &args.prompt {
        let conversation = predictor.conversation(prompt);
        predictor.respond(&conversation, Some(&mut stdout.lock()))?;
    } else if let (Some(input), Some(output)) = (&args.input, &args.output) {
        predict_file(&mut predictor, input, output, &args.prompt_column)?;
    } else {
        chat(&mut predictor)?;
    }
    Ok(())
}

/// Each line of `input` (a JSON object) with its `response`, written to `output`.
fn predict_file(
    predictor: &mut Predictor,
    input: &std::path::Path,
    output: &std::path::Path,
    column: &str,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("{}", input.display()))?;
    let mut lines = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", input.display(), i + 1);
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let Some(query) = object.get(column).and_then(|v| v.as_str()) else {
            bail!("{}: no string field `{column}`", at());
        };
        let conversation = predictor.conversation(query);
        let response = predictor.respond(&conversation, None)?;
        eprintln!("{}: {response}", at());
        object.insert("response".into(), response.into());
        lines.push(serde_json::to_string(&object)?);
    }
    let mut body = lines.join("\n");
    body.push('\n');
    std::fs::write(output, body).with_context(|| format!("{}", output.display()))
}

/// Reads queries from stdin until its end; the conversation keeps every turn until `/reset`.
fn chat(predictor: &mut Predictor) -> anyhow::Result<()> {
    let mut history: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    eprintln!("Type a message; /reset forgets the conversation, end of input (Ctrl-D) quits.");
    for line in stdin.lock().lines() {
        let query = line.context("reading stdin")?;
        let query = query.trim();
        if query.is_empty() {
            continue;
        }
        if query == "/reset" {
            history.clear();
            eprintln!("(conversation reset)");
            continue;
        }
        let conversation = Conversation {
            history: history.clone(),
            ..predictor.conversation(query)
        };
        let response = predictor.respond(&conversation, Some(&mut std::io::stdout().lock()))?;
        history.push((query.to_string(), response));
    }
    Ok(())
}
