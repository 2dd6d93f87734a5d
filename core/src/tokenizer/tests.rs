//! The GGUF tokenizer on a tiny synthetic vocabulary (the real SmolLM2 one is tested against
//! llama.cpp's ids in the `qlora-tests` crate).

use super::*;
use crate::gguf::test_writer::Writer;
use crate::gguf::Gguf;

const TOKENS: &[&str] = &[
    "<|end|>", "h", "i", "Ġ", "hi", "Ġhi", "1", "2", "<", "|", "e", "n", "d", ">", "<user>",
];
const END: u32 = 0;
const USER: u32 = 14;

/// A GGUF holding only tokenizer metadata. `tweak` may change the token types (CONTROL for
/// `<|end|>`, USER_DEFINED for `<user>`), the merges, the `pre` value and the EOS id.
struct Spec {
    model: &'static str,
    pre: &'static str,
    token_types: Vec<i32>,
    merges: Vec<&'static str>,
    eos: u32,
}

impl Default for Spec {
    fn default() -> Self {
        let mut token_types = vec![1; TOKENS.len()];
        token_types[END as usize] = 3;
        token_types[USER as usize] = 4;
        Spec {
            model: "gpt2",
            pre: "smollm",
            token_types,
            merges: vec!["h i", "Ġ hi"],
            eos: END,
        }
    }
}

impl Spec {
    fn gguf(&self) -> Result<Gguf> {
        let mut w = Writer::new(3, 0, 7);
        w.key("tokenizer.ggml.model", 8).str(self.model);
        w.key("tokenizer.ggml.pre", 8).str(self.pre);
        w.key("tokenizer.ggml.tokens", 9)
            .u32(8)
            .u64(TOKENS.len() as u64);
        for t in TOKENS {
            w.str(t);
        }
        w.key("tokenizer.ggml.token_type", 9)
            .u32(5)
            .u64(self.token_types.len() as u64);
        for t in &self.token_types {
            w.raw(&t.to_le_bytes());
        }
        w.key("tokenizer.ggml.merges", 9)
            .u32(8)
            .u64(self.merges.len() as u64);
        for m in &self.merges {
            w.str(m);
        }
        w.key("tokenizer.ggml.eos_token_id", 4).u32(self.eos);
        w.key("tokenizer.ggml.add_bos_token", 7).raw(&[0]);
        Gguf::from_bytes("tiny.gguf", w.bytes)
    }

    fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_gguf(&self.gguf()?)
    }
}

#[test]
fn control_tokens_are_parsed_only_when_asked_and_user_tokens_always() {
    let t = Spec::default().tokenizer().unwrap();
    assert_eq!(
        t.encode("hi hi12<|end|>", true).unwrap(),
        vec![4, 5, 6, 7, END]
    );
    assert_eq!(
        t.encode("hi<|end|>", false).unwrap(),
        vec![4, 8, 9, 10, 11, 12, 9, 13]
    );
    assert_eq!(t.encode("<user>hi", false).unwrap(), vec![USER, 4]);
    assert_eq!(t.decode(&[4, 5, END], true).unwrap(), "hi hi<|end|>");
    assert_eq!(t.decode(&[4, 5, END], false).unwrap(), "hi hi");
    assert_eq!(
        (t.eos_id(), t.bos_id(), t.add_bos()),
        (Some(END), None, false)
    );
    assert_eq!(t.vocab_size(), TOKENS.len());
}

#[test]
fn tokenizer_json_round_trip_keeps_the_ids() {
    let t = Spec::default().tokenizer().unwrap();
    let names = SpecialTokenNames {
        eos: Some("<|end|>".into()),
        ..SpecialTokenNames::default()
    };
    let json = t.to_tokenizer_json().unwrap();
    let back = Tokenizer::from_tokenizer_json("tokenizer.json", json.as_bytes(), &names).unwrap();
    for text in ["hi hi12<|end|>", "<user>hi", "hi<|end|>"] {
        for special in [true, false] {
            assert_eq!(
                back.encode(text, special).unwrap(),
                t.encode(text, special).unwrap()
            );
        }
    }
    assert_eq!(back.eos_id(), Some(END));
    let bad = SpecialTokenNames {
        pad: Some("<pad>".into()),
        ..SpecialTokenNames::default()
    };
    let msg = Tokenizer::from_tokenizer_json("tokenizer.json", json.as_bytes(), &bad)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`<pad>` is not in the vocabulary"), "{msg}");
    let msg = Tokenizer::from_tokenizer_json("tokenizer.json", b"{}", &names)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("tokenizer.json: not a usable tokenizer.json"),
        "{msg}"
    );
}

#[test]
fn unsupported_or_inconsistent_metadata_is_an_error_naming_it() {
    let cases = [
        (
            Spec {
                pre: "qwen2",
                ..Spec::default()
            },
            "unsupported tokenizer.ggml.pre `qwen2`",
        ),
        (
            Spec {
                model: "llama",
                ..Spec::default()
            },
            "unsupported tokenizer.ggml.model `llama`",
        ),
        (
            Spec {
                token_types: vec![1; 3],
                ..Spec::default()
            },
            "token_type has 3 entries for 15 tokens",
        ),
        (
            Spec {
                merges: vec!["hi"],
                ..Spec::default()
            },
            "merges[0] `hi` has no space",
        ),
        (
            Spec {
                merges: vec!["x y"],
                ..Spec::default()
            },
            "cannot build the BPE vocabulary",
        ),
        (
            Spec {
                eos: 99,
                ..Spec::default()
            },
            "eos_token_id` = 99 is not below the vocabulary size 15",
        ),
    ];
    for (spec, expect) in cases {
        let msg = spec.tokenizer().unwrap_err().to_string();
        assert!(
            msg.contains("tiny.gguf") && msg.contains(expect),
            "want `{expect}`: {msg}"
        );
    }
}

/// tokenizers 0.22 panicked on a syntax error or invalid UTF-8 inside `decoder` (found by the
/// `tokenizer` fuzz target; the full inputs are fuzz/corpus/tokenizer/regression_decoder_*).
#[test]
fn malformed_json_inside_the_decoder_is_an_error() {
    let inputs: [&[u8]; 2] = [
        br#"{"decoder": {"type" "ByteLevel"}}"#,
        b"{\"decoder\": {\"type\": \"ByteLevel\", \"a\xffb\": true}}",
    ];
    for json in inputs {
        let err = Tokenizer::from_tokenizer_json("t.json", json, &SpecialTokenNames::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.json: not a usable tokenizer.json"),
            "{err}"
        );
    }
}
