//! Shared helpers of the cross-crate tests: where the fixtures and the golden data live.

use std::path::PathBuf;

/// `tests/fixtures/`, the small golden files copied into the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `../shared/golden` beside the checkout, where CI has the large golden files; `None` (with a
/// printed reason) where it is absent, so a test can skip.
pub fn shared_golden() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent", p.display());
        None
    }
}

/// The demo GGUF (see `qlora_core::demo`), or `None` with the reason printed where it is absent.
pub fn demo_gguf() -> Option<PathBuf> {
    let Some(path) = qlora_core::demo::demo_gguf_path() else {
        eprintln!("skipped: neither QLORA_DEMO_GGUF, QLORA_CACHE nor HOME is set");
        return None;
    };
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch-demo-model.sh)",
            path.display()
        );
        None
    }
}

/// Writes `dir/tokenizer.json`: a whitespace-split word-level tokenizer whose ids are the
/// positions in `tokens`, the first `specials` of them added as special tokens (the first one
/// also the unknown token). The golden tiny models come without a tokenizer; the CLI tests give
/// them this one.
/// A copy of the golden tiny model in `source` (`config.json`, `model.safetensors`) with a
/// word-level tokenizer of `vocab` tokens: `<unk>` and `</s>` (special), `words`, then `w<i>`
/// for the remaining ids `i`.
pub fn tiny_model_with_words(
    source: &std::path::Path,
    words: &[&str],
    vocab: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), dir.path().join(file)).unwrap();
    }
    let tokens = ["<unk>", "</s>"]
        .into_iter()
        .chain(words.iter().copied())
        .map(String::from)
        .chain((2 + words.len()..vocab).map(|i| format!("w{i}")));
    write_word_level_tokenizer(dir.path(), tokens, 2);
    dir
}

pub fn write_word_level_tokenizer(
    dir: &std::path::Path,
    tokens: impl IntoIterator<Item = String>,
    specials: usize,
) {
    let tokens: Vec<String> = tokens.into_iter().collect();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = tokens[..specials]
        .iter()
        .enumerate()
        .map(|(id, t)| {
            serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": tokens[0]}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}
