//! Writes the CPU path's logits for given token ids, with an optional PEFT adapter and an
//! optional 4-bit base, so the Python stack can be compared with qlora on the same inputs
//! (scripts/gpu/check_peft_adapter.py):
//!
//! cargo run --release -p qlora-trainer --example dump_logits -- \
//!     MODEL_DIR ADAPTER_DIR|- nf4|fp4|none INPUTS.safetensors OUT.safetensors
//!
//! INPUTS holds `input_ids` (and optionally `attention_mask`) as i64 [batch, seq].

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use qlora_core::arch::{ModelConfig, PeftNaming};
use qlora_core::checkpoint::{
    open_checkpoint, open_file, RawTensor, SafetensorsWriter, TensorInfo, TensorSource,
};
use qlora_core::peft::{AdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use qlora_core::DType;
use qlora_trainer::cpu::{LoraInit, LoraSetup, Mode, Model};
use qlora_trainer::load::{quantize_on_read, QuantOnLoad};

fn i64_tensor(raw: RawTensor) -> Result<Tensor> {
    if raw.dtype != DType::I64 {
        bail!("expected int64 token ids, found {}", raw.dtype);
    }
    let v: Vec<i64> = raw
        .data
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Ok(Tensor::from_vec(v, raw.shape, &Device::Cpu)?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, adapter, quant, inputs, out] = args.as_slice() else {
        bail!("usage: dump_logits MODEL_DIR ADAPTER_DIR|- nf4|fp4|none INPUTS OUT");
    };
    let model_dir = Path::new(model);
    let config = ModelConfig::load(&model_dir.join("config.json"))?;
    let base = open_checkpoint(model_dir)?;
    let weights = match quant.as_str() {
        "none" => base,
        q => quantize_on_read(
            &config,
            base,
            QuantOnLoad {
                quant_type: q.parse()?,
                double_quant: true,
                blocksize: 64,
            },
        )?,
    };
    let adapter_files;
    let setup = if adapter == "-" {
        None
    } else {
        let dir = Path::new(adapter);
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).context("adapter config")?;
        let adapter_config = AdapterConfig::from_json(CONFIG_FILE, &text)?;
        adapter_files = open_file(&dir.join(WEIGHTS_FILE))?;
        Some(LoraSetup {
            config: adapter_config.lora,
            init: LoraInit::FromSource {
                source: adapter_files.as_ref(),
                naming: PeftNaming::Saved,
            },
        })
    };
    let model = Model::load(&config, weights.as_ref(), setup.as_ref())?;
    let inputs = open_file(Path::new(inputs))?;
    let ids = i64_tensor(inputs.read("input_ids")?)?;
    let mask = match inputs.read("attention_mask") {
        Ok(m) => Some(i64_tensor(m)?),
        Err(_) => None,
    };
    let logits = model.forward(&ids, mask.as_ref(), &mut Mode::Eval)?;
    let shape = logits.dims().to_vec();
    let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    let plan = [TensorInfo {
        name: "logits".into(),
        dtype: DType::F32,
        shape,
    }];
    let mut w = SafetensorsWriter::create(Path::new(out), &plan)?;
    w.write_tensor("logits", &qlora_core::dtype::from_f32(DType::F32, &values))?;
    w.commit()?;
    Ok(())
}
