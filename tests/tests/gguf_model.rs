//! The demo GGUF seen as an HF checkpoint: its config and tensors match the LLaMA description.

use qlora_core::checkpoint::TensorSource;
use qlora_core::gguf::GgufCheckpoint;
use qlora_tests::demo_gguf;

#[test]
fn smollm2_gguf_is_a_complete_llama_checkpoint() {
    let Some(path) = demo_gguf() else { return };
    let ckpt = GgufCheckpoint::open(&path).unwrap();
    let config = ckpt.config();
    assert_eq!(config.architecture().model_type(), "llama");
    assert_eq!(
        (
            config.hidden_size(),
            config.num_layers(),
            config.vocab_size()
        ),
        (576, 30, 49152)
    );
    let mut want: Vec<(String, Vec<usize>)> = config
        .describe()
        .tensors()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    want.sort();
    let got: Vec<(String, Vec<usize>)> = ckpt
        .tensor_infos()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    assert_eq!(got, want);
    let q = ckpt.read("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![576, 576]);
    assert!(q.to_f32().unwrap().iter().all(|v| v.is_finite()));
}
