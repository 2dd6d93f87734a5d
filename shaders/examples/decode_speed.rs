//! Prefill and decode speed of the WGSL engine on random weights of a given shape, quantized to
//! NF4 on load (the shapes of a real model without its files; weights are made tensor by tensor
//! as the engine reads them, so a 7B shape needs no 28 GB in memory).
//!
//! `cargo run --release -p qlora-shaders --example decode_speed -- <bloom|llama> <hidden>
//! <layers> <vocab> [new tokens] [bf16|f32 LM head]`; YaYi-7B: `bloom 4096 30 250684`. The LM
//! head is bf16 unless `f32` is given (the CUDA path keeps it bf16). Prints one JSON object.

use std::time::Instant;

use qlora_core::arch::ModelConfig;
use qlora_core::checkpoint::{RawTensor, TensorInfo, TensorSource};
use qlora_core::{DType, Error, Result};
use qlora_shaders::{
    block_on, Engine, EngineOptions, GenerateOptions, LoadOptions, QuantizeOnLoad,
};
use rayon::prelude::*;

/// Every tensor of `config`, uniform in ±0.05 (norm weights 1), a function of the tensor's index
/// and the element's.
struct RandomWeights {
    infos: Vec<TensorInfo>,
}

impl TensorSource for RandomWeights {
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.infos.clone()
    }

    fn read(&self, name: &str) -> Result<RawTensor> {
        let (index, info) = self
            .infos
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == name)
            .ok_or_else(|| Error::tensor("random", name, "no such tensor"))?;
        let norm_weight =
            info.shape.len() == 1 && name.contains("norm") && name.ends_with("weight");
        // A counter-based generator filled in parallel: a 7B shape is ~7e9 values, which one
        // thread of a sequential generator took most of a minute and a half to make.
        let mut values = vec![1.0f32; info.numel()];
        if !norm_weight {
            values
                .par_chunks_mut(1 << 16)
                .enumerate()
                .for_each(|(chunk, out)| {
                    let start = (chunk as u64) << 16;
                    for (i, v) in out.iter_mut().enumerate() {
                        let bits = splitmix64(((index as u64) << 40) ^ (start + i as u64));
                        // 24 random bits -> [0, 1) -> [-0.05, 0.05)
                        *v = ((bits >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                    }
                });
        }
        Ok(RawTensor {
            dtype: DType::F32,
            shape: info.shape.clone(),
            data: bytemuck::cast_slice(&values).to_vec(),
        })
    }

    fn file_of(&self, _: &str) -> Option<String> {
        Some("random".into())
    }
}

/// SplitMix64's output function: a well-mixed 64-bit value of a counter.
fn splitmix64(counter: u64) -> u64 {
    let mut z = counter.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn config(arch: &str, hidden: usize, layers: usize, vocab: usize) -> Result<ModelConfig> {
    let heads = hidden / 128;
    let json = match arch {
        "bloom" => format!(
            r#"{{"model_type": "bloom", "vocab_size": {vocab}, "hidden_size": {hidden},
                "n_layer": {layers}, "n_head": {heads}}}"#
        ),
        "llama" => format!(
            r#"{{"model_type": "llama", "vocab_size": {vocab}, "hidden_size": {hidden},
                "intermediate_size": {}, "num_hidden_layers": {layers},
                "num_attention_heads": {heads}, "num_key_value_heads": {heads}}}"#,
            hidden * 8 / 3 / 256 * 256
        ),
        other => return Err(Error::Invalid(format!("arch {other}: bloom or llama"))),
    };
    ModelConfig::parse(&json, "arguments")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize| -> Result<usize> {
        args.get(i).map_or(Ok(default), |a| {
            a.parse()
                .map_err(|_| Error::Invalid(format!("argument {} `{a}` is not a number", i + 1)))
        })
    };
    let arch = args.first().map_or("bloom", String::as_str);
    let config = config(arch, number(1, 1024)?, number(2, 4)?, number(3, 32000)?)?;
    let new_tokens = number(4, 64)?;
    let bf16_lm_head = match args.get(5).map(String::as_str) {
        None | Some("bf16") => true,
        Some("f32") => false,
        Some(other) => return Err(Error::Invalid(format!("LM head `{other}`: bf16 or f32"))),
    };
    let weights = RandomWeights {
        infos: config
            .describe()
            .tensors()
            .into_iter()
            .map(|t| TensorInfo {
                name: t.name,
                dtype: DType::F32,
                shape: t.shape,
            })
            .collect(),
    };
    let engine = block_on(Engine::new(EngineOptions::default()))?;
    let options = LoadOptions {
        quantize: Some(QuantizeOnLoad::QLORA),
        max_seq_len: 512,
        chunk: 32,
        bf16_lm_head,
    };
    let plan = engine.plan(&config, &weights, &options)?;
    let started = Instant::now();
    let mut model = engine.load(&config, &weights, None, &options, &mut |_| {})?;
    let load_s = started.elapsed().as_secs_f64();
    let prompt: Vec<u32> = (0..32)
        .map(|i| (i * 7919 % config.vocab_size()) as u32)
        .collect();
    let started = Instant::now();
    block_on(model.prefill(&prompt))?;
    let prefill_s = started.elapsed().as_secs_f64();
    let greedy = GenerateOptions::greedy(new_tokens);
    let started = Instant::now();
    let ids = block_on(model.generate(&prompt, &greedy, |_| false))?;
    let generate_s = started.elapsed().as_secs_f64();
    // generate = one more 32-token prefill plus the decode steps (the first token comes from
    // the prefill).
    let decode_s = (generate_s - prefill_s).max(1e-9);
    let steps = ids.len() as f64 - 1.0;
    println!(
        "{{\"device\": \"{}\", \"arch\": \"{arch}\", \"hidden\": {}, \"layers\": {}, \
         \"vocab\": {}, \"lm_head\": \"{}\", \"weight_bytes\": {}, \"load_s\": {load_s:.2}, \
         \"prefill_32_tok_per_s\": {:.2}, \"decode_tok_per_s\": {:.2}, \
         \"decode_ms_per_token\": {:.3}}}",
        engine.report().adapter,
        config.hidden_size(),
        config.num_layers(),
        config.vocab_size(),
        if bf16_lm_head { "bf16" } else { "f32" },
        plan.weight_bytes,
        32.0 / prefill_s,
        steps / decode_s,
        1e3 * decode_s / steps,
    );
    Ok(())
}
