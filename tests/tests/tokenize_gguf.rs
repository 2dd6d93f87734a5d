//! The demo GGUF (SmolLM2-135M-Instruct Q4_1) read by the GGUF parser, and its tokenizer and chat
//! template checked against llama.cpp's own output (tests/fixtures/golden/smollm2). The GGUF comes
//! from `scripts/fetch-demo-model.sh`; the tests skip, saying why, where it is absent.

use qlora_core::data::{load_examples, Columns, ExampleOptions, IGNORE_INDEX};
use qlora_core::gguf::{GgmlType, Gguf};
use qlora_core::prompt::{Conversation, PromptTemplate};
use qlora_core::tokenizer::Tokenizer;
use qlora_tests::{demo_gguf, DEMO_GGUF_NAME as GGUF_NAME};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let path = qlora_tests::fixtures().join("golden/smollm2").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn header_matches_the_gguf_py_dump() {
    let Some(path) = demo_gguf() else { return };
    let meta = golden("gguf_metadata.json");
    let g = Gguf::open(&path).unwrap();
    let summary = &meta["summary"];
    assert_eq!(
        u64::from(g.version()),
        summary["GGUF.version"].as_u64().unwrap()
    );
    assert_eq!(
        g.metadata().len() as u64,
        summary["GGUF.kv_count"].as_u64().unwrap()
    );
    assert_eq!(
        g.tensors().len() as u64,
        summary["GGUF.tensor_count"].as_u64().unwrap()
    );
    for (key, value) in summary.as_object().unwrap() {
        if key.starts_with("GGUF.") {
            continue;
        }
        // Big arrays appear in the dump only as their length, under "<key> (len)".
        match key.strip_suffix(" (len)") {
            Some(array_key) => {
                let len = g.get(array_key).unwrap().as_array().unwrap().len();
                assert_eq!(len as u64, value.as_u64().unwrap(), "{array_key}");
            }
            None => {
                let ours = g
                    .get(key)
                    .unwrap_or_else(|| panic!("metadata `{key}` missing"));
                match value {
                    Value::String(s) => assert_eq!(ours.as_str(), Some(s.as_str()), "{key}"),
                    Value::Bool(b) => assert_eq!(ours.as_bool(), Some(*b), "{key}"),
                    Value::Number(n) if n.is_f64() => {
                        assert_eq!(ours.as_float(), n.as_f64(), "{key}")
                    }
                    Value::Number(n) => {
                        assert_eq!(ours.as_int(), n.as_u64().map(i128::from), "{key}")
                    }
                    Value::Array(items) => {
                        let ours: Vec<&str> = g.get_str_array(key).unwrap().unwrap();
                        let theirs: Vec<&str> = items.iter().map(|v| v.as_str().unwrap()).collect();
                        assert_eq!(ours, theirs, "{key}");
                    }
                    other => panic!("unexpected dump value for {key}: {other}"),
                }
            }
        }
    }
    let tensors = meta["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), g.tensors().len());
    for (ours, theirs) in g.tensors().iter().zip(tensors) {
        assert_eq!(ours.name, theirs["name"].as_str().unwrap());
        assert_eq!(
            ours.ggml_type.name,
            theirs["type"].as_str().unwrap(),
            "{}",
            ours.name
        );
        let dims: Vec<u64> = theirs["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        assert_eq!(ours.dims, dims, "{}", ours.name);
    }
    // The tensors tile the data section: each starts where the previous one ends, rounded up
    // to the alignment, and the last one ends at the end of the file.
    let mut sorted: Vec<_> = g.tensors().iter().collect();
    sorted.sort_by_key(|t| t.data.start);
    assert_eq!(sorted[0].data.start as u64, g.header().data_offset);
    for pair in sorted.windows(2) {
        let aligned_end = (pair[0].data.end as u64).next_multiple_of(g.header().alignment);
        assert_eq!(pair[1].data.start as u64, aligned_end, "{}", pair[1].name);
    }
    assert_eq!(sorted.last().unwrap().data.end, g.bytes().len());
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.ggml_type, embd.shape()),
        (GgmlType::Q8_0, vec![49152, 576])
    );
    assert_eq!(
        g.tensor_data("token_embd.weight").unwrap().len(),
        49152 * 576 / 32 * 34
    );
    // The same file parsed from memory (the wasm path) gives the same header.
    let from_bytes = Gguf::from_bytes(GGUF_NAME, std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(from_bytes.header(), g.header());
}

fn smollm2_tokenizer() -> Option<Tokenizer> {
    let path = demo_gguf()?;
    Some(Tokenizer::from_gguf(&Gguf::open(path).unwrap()).unwrap())
}

/// Checks all 23 strings with `tokenizer` and reports every mismatch at once.
fn check_against_llama_cpp(tokenizer: &Tokenizer) {
    let cases = golden("tokenize_ref.json");
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 23);
    let mut mismatches = Vec::new();
    let mut check = |what: &str, text: &str, ours: String, theirs: String| {
        if ours != theirs {
            mismatches.push(format!(
                "{what} of {text:?}:\n  ours   {ours}\n  theirs {theirs}"
            ));
        }
    };
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = ids(&case["ids_special"]);
        let plain = ids(&case["ids_plain"]);
        let str_of = |key: &str| case[key].as_str().unwrap().to_string();
        check(
            "ids_special",
            text,
            format!("{:?}", tokenizer.encode(text, true).unwrap()),
            format!("{special:?}"),
        );
        check(
            "ids_plain",
            text,
            format!("{:?}", tokenizer.encode(text, false).unwrap()),
            format!("{plain:?}"),
        );
        check(
            "detok special ids, rendered",
            text,
            tokenizer.decode(&special, true).unwrap(),
            str_of("detok_special_ids_render_special"),
        );
        check(
            "detok special ids, not rendered",
            text,
            tokenizer.decode(&special, false).unwrap(),
            str_of("detok_special_ids_no_render_special"),
        );
        check(
            "detok plain ids",
            text,
            tokenizer.decode(&plain, false).unwrap(),
            str_of("detok_plain_ids"),
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn gguf_tokenizer_gives_llama_cpp_ids_on_all_23_strings() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    check_against_llama_cpp(&tokenizer);
    let ids = tokenizer.special_ids();
    assert_eq!(
        (ids.bos, ids.eos, ids.pad, ids.unk),
        (Some(1), Some(2), Some(2), Some(0))
    );
    assert!(!tokenizer.add_bos());
    assert_eq!(tokenizer.vocab_size(), 49152);
    assert_eq!(tokenizer.id_to_token(216).as_deref(), Some("Ġ"));
}

#[test]
fn saved_as_tokenizer_json_it_still_gives_llama_cpp_ids() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_tokenizer_json().unwrap()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_bos_token": false,
        "chat_template": tokenizer.chat_template().unwrap(),
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let reloaded = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(reloaded.chat_template(), tokenizer.chat_template());
    check_against_llama_cpp(&reloaded);
    assert_eq!(reloaded.special_ids(), tokenizer.special_ids());
}

/// The `chat_en` prompt of tests/fixtures/golden/smollm2/README.txt (37 tokens).
const CHAT_EN: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
<|im_start|>assistant\n";

#[test]
fn gguf_chat_template_renders_the_reference_prompt() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    let source = tokenizer
        .chat_template()
        .expect("the GGUF has a chat template");
    let template = PromptTemplate::chat(source, "<|im_start|>", "<|im_end|>").unwrap();
    let mut conversation = Conversation::new("What is the capital of France?");
    // Without a system message the template writes its default one, which is the same text.
    assert_eq!(template.prompt(&conversation).unwrap(), CHAT_EN);
    conversation.system =
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face".into());
    let prompt = template.prompt(&conversation).unwrap();
    assert_eq!(prompt, CHAT_EN);
    let prompt_ids = tokenizer.encode(&prompt, true).unwrap();
    assert_eq!(prompt_ids.len(), 37);
    // llama.cpp's ids for the same prompt, where the large golden files are present.
    if let Some(shared) = qlora_tests::shared_golden() {
        let text = std::fs::read_to_string(shared.join("smollm2/logits_ref.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let chat_en = &reference["prompts"]["chat_en"];
        assert_eq!(chat_en["text"].as_str(), Some(CHAT_EN));
        assert_eq!(prompt_ids, ids(&chat_en["prompt_ids"]));
        let chat_zh = &reference["prompts"]["chat_zh"];
        let zh = template
            .prompt(&Conversation::new("请用一句话介绍一下北京。"))
            .unwrap();
        assert_eq!(zh, chat_zh["text"].as_str().unwrap());
        assert_eq!(
            tokenizer.encode(&zh, true).unwrap(),
            ids(&chat_zh["prompt_ids"])
        );
    }
    let parts = template.training_parts(&conversation, "Paris.").unwrap();
    assert_eq!(parts.prompt, CHAT_EN);
    assert_eq!(parts.answer, "Paris.<|im_end|>\n");
}

/// Values from gguf-py 0.19.0 (`gguf.quants.dequantize`, as the golden numpy forward pass used):
/// name, the first 8 values, (index, value) samples, the f64 sum and sum of squares.
type DequantRef = (&'static str, [f32; 8], [(usize, f32); 3], f64, f64);
const DEQUANT_REF: &[DequantRef] = &[
    (
        "token_embd.weight", // Q8_0
        [
            -0.106544495,
            0.032978058,
            0.0481987,
            -0.022830963,
            -0.06849289,
            -0.045661926,
            0.02029419,
            -0.12176514,
        ],
        [
            (33, -0.15135956),
            (1000, 0.007411957),
            (28311551, -0.04170227),
        ],
        -15353.04449415207,
        520415.71544763993,
    ),
    (
        "blk.0.attn_norm.weight", // F32
        [
            0.013977051,
            0.023803711,
            -0.01977539,
            -0.030273438,
            -0.01965332,
            -0.03515625,
            0.022583008,
            -0.020019531,
        ],
        [(33, 0.029174805), (574, 0.050048828), (575, -0.038330078)],
        0.6129436492919922,
        0.9180835409024439,
    ),
    (
        "blk.0.attn_q.weight", // Q4_1
        [
            -0.09631348,
            0.15734863,
            -0.09631348,
            -0.73046875,
            1.1719971,
            -0.09631348,
            0.030517578,
            0.66467285,
        ],
        [(33, 0.32946777), (1000, -0.13842773), (331775, -0.25585938)],
        59.22322082519531,
        26749.573275085306,
    ),
    (
        "blk.29.ffn_down.weight", // Q4_1
        [
            -0.27331543,
            0.1862793,
            0.1862793,
            0.04840088,
            0.1862793,
            0.1862793,
            -0.3192749,
            -0.18139648,
        ],
        [
            (33, -0.016998291),
            (1000, 0.08392334),
            (884735, 0.056640625),
        ],
        49.83570861816406,
        29667.074891592143,
    ),
];

#[test]
fn dequantized_tensors_match_gguf_py() {
    let Some(path) = demo_gguf() else { return };
    let g = Gguf::open(path).unwrap();
    for &(name, first, samples, sum, sum_sq) in DEQUANT_REF {
        let values = g.tensor_f32(name).unwrap();
        assert_eq!(values[..8], first, "{name}");
        for (i, v) in samples {
            assert_eq!(values[i], v, "{name}[{i}]");
        }
        // Summation order differs from numpy's pairwise sum, so only to f64 rounding.
        let ours: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let ours_sq: f64 = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!(
            (ours - sum).abs() <= 1e-9 * sum_sq,
            "{name}: sum {ours} vs {sum}"
        );
        assert!(
            (ours_sq - sum_sq).abs() <= 1e-9 * sum_sq,
            "{name}: {ours_sq} vs {sum_sq}"
        );
    }
    let msg = g.tensor_f32("nope").unwrap_err().to_string();
    assert!(msg.contains("tensor `nope`"), "{msg}");
}

#[test]
fn chat_training_examples_mask_the_37_token_prompt() {
    let Some(tokenizer) = smollm2_tokenizer() else {
        return;
    };
    let template = PromptTemplate::chat(
        tokenizer.chat_template().unwrap(),
        "<|im_start|>",
        "<|im_end|>",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("train.jsonl");
    std::fs::write(
        &path,
        r#"{"content": "What is the capital of France?", "summary": "Paris."}"#,
    )
    .unwrap();
    let options = ExampleOptions {
        max_source_length: 64,
        max_target_length: 16,
        system: None,
    };
    let out = load_examples(&path, &Columns::default(), &template, &tokenizer, &options).unwrap();
    let example = &out.examples[0];
    let answer = tokenizer.encode("Paris.<|im_end|>\n", true).unwrap();
    assert_eq!(example.input_ids.len(), 37 + answer.len() + 1);
    assert_eq!(
        example.input_ids[..37],
        tokenizer.encode(CHAT_EN, true).unwrap()[..]
    );
    assert!(example.labels[..37].iter().all(|&l| l == IGNORE_INDEX));
    let learned: Vec<u32> = example.labels[37..].iter().map(|&l| l as u32).collect();
    assert_eq!(learned, [answer, vec![2]].concat());
}
