//! The chat page (web/) in headless Chromium (SwiftShader's WebGPU) against `qlora predict`:
//! the page preloads the golden tiny Qwen2 (NF4, as `qlora quantize` writes it; given a small
//! word-level tokenizer with a chat template, the fixtures have none) and its LoRA adapter from
//! `?model=…&adapter=…`, answers a prompt greedily, and the streamed answer must equal the
//! CLI's, with the adapter on and switched off. Then: picked files load with live progress
//! (bytes read, then tensors and bytes on the GPU), a truncated checkpoint is refused with a
//! message naming it while the loaded model keeps answering, Escape stops an answer, and at
//! phone width (375 px) the page is one column. Screenshots: target/artifacts/chat.png and
//! chat-phone.png. Skips, saying why, where Chromium, chromedriver, trunk or wasm-bindgen is
//! missing.

// The harness is shared by the browser tests; this one uses part of it.
#[allow(dead_code)]
mod browser;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use browser::server::StaticServer;
use browser::webdriver::Browser;
use browser::{app, save_artifact, tools};

const PROMPT: &str = "hello red dress";
const MAX_NEW_TOKENS: &str = "8";
/// The random model repeats one word without a penalty.
const REPETITION_PENALTY: &str = "1.5";
const WORDS: [&str; 10] = [
    "user",
    "assistant",
    "system",
    ".",
    "hello",
    "world",
    "red",
    "dress",
    "short",
    "long",
];

fn golden(path: &str) -> PathBuf {
    app::workspace().join("tests/fixtures/golden").join(path)
}

/// The tiny Qwen2 (vocabulary 384) in NF4 with a word-level tokenizer (`<unk>`, `</s>` as EOS,
/// the words above, then `w12`..`w383`) and a chat template ending each turn with `.`.
fn tiny_model_dir() -> tempfile::TempDir {
    let dir = qlora_tests::tiny_model_with_words(&golden("llama/tiny-qwen2-nf4"), &WORDS, 384);
    let config = json!({
        "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for message in messages %}{{ message['role'] }} {{ message['content'] }} . {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// `qlora predict`'s greedy answer to PROMPT.
fn predict(model: &Path, adapter: Option<&Path>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qlora"));
    command
        .arg("predict")
        .arg("--model_name_or_path")
        .arg(model)
        .args(["--prompt", PROMPT, "--do_sample", "false"])
        .args(["--max_new_tokens", MAX_NEW_TOKENS])
        // The page computes in f32, as the CPU path does (a GPU machine would pick CUDA bf16).
        .args(["--device", "cpu"])
        .args(["--repetition_penalty", REPETITION_PENALTY]);
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    let output = command.output().expect("qlora runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

const STATE_JS: &str = "return document.querySelector('main.chat')?.dataset.state ?? null";
/// What the page shows when a wait fails: its state, the loaders', the GPU line and its errors
/// (the wait adds the browser's console: a panic in wasm, WebGPU's warnings).
const ERROR_JS: &str =
    "return JSON.stringify({state: document.querySelector('main.chat')?.dataset.state, \
    loaders: Array.from(document.querySelectorAll('section.loader')).map(l => l.dataset.state), \
    gpu: document.querySelector('p.gpu')?.textContent, \
    errors: Array.from(document.querySelectorAll('.status.error')).map(e => e.textContent)})";
const LAST_ANSWER_JS: &str = "const a = Array.from(document.querySelectorAll('li.message.assistant')).pop(); \
    return a && a.dataset.done == 'true' ? [a.querySelector('.text').textContent, a.dataset.adapter, \
    Number(a.dataset.tokens), Number(a.dataset.tokensPerSecond), a.dataset.ids, \
    a.querySelector('.status.error')?.textContent ?? null] : null";

/// Types PROMPT, presses Enter, and returns the finished answer: (text, adapter, tokens, tok/s).
fn ask(browser: &Browser) -> (String, bool, u64, f64) {
    browser.eval(&format!(
        "const t = document.getElementById('prompt'); t.value = '{PROMPT}'; \
         t.dispatchEvent(new Event('input', {{bubbles: true}})); \
         t.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true, cancelable: true}}));"
    ));
    browser.wait_for(
        "return document.querySelectorAll('li.message.assistant[data-done=true]').length > 0 \
         && document.querySelector('main.chat').dataset.state == 'ready'",
        &json!(true),
        Duration::from_secs(120),
        ERROR_JS,
    );
    let answer = browser.eval(LAST_ANSWER_JS);
    assert_eq!(answer[5], json!(null), "the answer failed");
    eprintln!("answer ids: {}", answer[4]);
    (
        answer[0].as_str().unwrap().to_string(),
        answer[1] == "true",
        answer[2].as_u64().unwrap(),
        answer[3].as_f64().unwrap(),
    )
}

#[test]
fn chat_page_answers_as_qlora_predict() {
    let (chromium, chromedriver) = match tools() {
        Ok(t) => t,
        Err(reason) => return eprintln!("SKIP chat_page: {reason}"),
    };
    let dist = match app::dist() {
        Ok(d) => d,
        Err(reason) => return eprintln!("SKIP chat_page: {reason}"),
    };
    let model = tiny_model_dir();
    let adapter = golden("llama/tiny-qwen2-lora");
    let tuned = predict(model.path(), Some(&adapter));
    let base = predict(model.path(), None);
    eprintln!("qlora predict: with adapter `{tuned}`, without `{base}`");
    assert!(!tuned.is_empty() && !base.is_empty());

    let server = StaticServer::start(vec![
        ("/".into(), dist),
        ("/model/".into(), model.path().to_path_buf()),
        ("/adapter/".into(), adapter),
    ]);
    let browser = Browser::start(&chromedriver, &chromium, 900, 1400);
    browser.goto(&server.url("/?model=/model/&adapter=/adapter/#chat"));
    browser.wait_for(
        "return document.querySelectorAll('section.loader[data-state=loaded]').length == 2 \
         && document.querySelector('main.chat').dataset.state == 'ready'",
        &json!(true),
        Duration::from_secs(120),
        ERROR_JS,
    );
    let gpu = browser.eval("return document.querySelector('p.gpu').textContent");
    eprintln!("{gpu}");
    set_fields(
        &browser,
        &[
            ("temperature", "0"),
            ("repetition-penalty", REPETITION_PENALTY),
            ("max-new-tokens", MAX_NEW_TOKENS),
        ],
    );

    let (text, with_adapter, tokens, speed) = ask(&browser);
    eprintln!("page, adapter on: `{text}` ({tokens} tokens, {speed:.1} tokens/s)");
    assert!(with_adapter);
    assert_eq!(text, tuned, "the page's answer with the adapter");
    let shot = save_artifact("chat.png", &browser.screenshot());
    eprintln!("screenshot: {}", shot.display());

    // The same prompt as a new chat with the adapter switched off: the base model's answer.
    browser.eval(
        "document.getElementById('clear').click(); document.getElementById('adapter-on').click()",
    );
    let (text, with_adapter, tokens, speed) = ask(&browser);
    eprintln!("page, adapter off: `{text}` ({tokens} tokens, {speed:.1} tokens/s)");
    assert!(!with_adapter);
    assert_eq!(text, base, "the page's answer without the adapter");
    assert_eq!(browser.eval(STATE_JS), json!("ready"));

    reload_with_progress(&browser, model.path());
    refuse_a_corrupt_checkpoint(&browser, model.path());
    browser.eval("document.getElementById('clear').click()");
    let (text, ..) = ask(&browser);
    assert_eq!(text, base, "the answer after a refused file");
    stop_with_escape(&browser);

    // Phone width (tall, so that the screenshot holds the opened sections): one column,
    // nothing wider than the screen.
    browser.resize(375, 1500);
    browser.eval("for (const d of document.querySelectorAll('main.chat details')) d.open = true");
    let layout = browser.eval(
        "return [document.documentElement.scrollWidth, window.innerWidth, \
         document.getElementById('prompt').getBoundingClientRect().width]",
    );
    eprintln!("phone layout (page width, window width, text box width): {layout}");
    let number = |i: usize| layout[i].as_f64().unwrap();
    assert!(
        number(0) <= number(1),
        "the page is wider than a phone: {layout}"
    );
    assert!(
        number(2) > 0.7 * number(1),
        "the text box is not full width: {layout}"
    );
    let shot = save_artifact("chat-phone.png", &browser.screenshot());
    eprintln!("screenshot: {}", shot.display());
}

/// Types `value` into each field `id`, as a user would.
fn set_fields(browser: &Browser, fields: &[(&str, &str)]) {
    for (id, value) in fields {
        browser.eval(&format!(
            "const e = document.getElementById('{id}'); e.value = '{value}'; \
             e.dispatchEvent(new Event('input', {{bubbles: true}}));"
        ));
    }
}

/// The model's files, picked: the load shows bytes read, then tensors and bytes on the GPU as
/// they go, up to all of them.
fn reload_with_progress(browser: &Browser, model: &Path) {
    browser.eval(
        "window.progressSeen = []; new MutationObserver(() => { \
           for (const s of document.querySelectorAll('.progress span')) \
             if (!window.progressSeen.includes(s.textContent)) window.progressSeen.push(s.textContent); \
         }).observe(document.querySelector('main.chat'), {subtree: true, childList: true, characterData: true});",
    );
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .map(|f| model.join(f));
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    browser.pick_files("section.loader input[multiple]", &files);
    browser.wait_for(
        "return window.progressSeen.some(t => /^(\\d+) of \\1 tensors on the GPU/.test(t)) \
         && document.querySelector('main.chat').dataset.state == 'ready'",
        &json!(true),
        Duration::from_secs(120),
        ERROR_JS,
    );
    let seen = browser.eval("return window.progressSeen");
    let seen: Vec<&str> = seen
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let on_gpu: Vec<&&str> = seen
        .iter()
        .filter(|t| t.contains("tensors on the GPU"))
        .collect();
    eprintln!(
        "progress: {} lines, {} of tensors; first `{}`, last `{}`",
        seen.len(),
        on_gpu.len(),
        seen[0],
        on_gpu.last().unwrap()
    );
    assert!(
        seen.iter()
            .any(|t| t.starts_with("model.safetensors: ") && t.contains(" of ")),
        "no bytes-read progress: {seen:?}"
    );
    assert!(
        on_gpu.len() > 5,
        "the tensors did not show one by one: {seen:?}"
    );
    assert!(
        on_gpu.iter().all(|t| t.contains(" of about ")),
        "no bytes on the GPU: {seen:?}"
    );
}

/// A truncated checkpoint is refused with a message naming it; the loaded model stays.
fn refuse_a_corrupt_checkpoint(browser: &Browser, model: &Path) {
    let broken = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(file), broken.path().join(file)).unwrap();
    }
    let checkpoint = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(
        broken.path().join("model.safetensors"),
        &checkpoint[..checkpoint.len() / 2],
    )
    .unwrap();
    let files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .map(|f| broken.path().join(f));
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    browser.pick_files("section.loader input[multiple]", &files);
    browser.wait_for(
        "return document.querySelector('section.loader').dataset.state",
        &json!("error"),
        Duration::from_secs(60),
        ERROR_JS,
    );
    let message =
        browser.eval("return document.querySelector('section.loader .status.error').textContent");
    eprintln!("corrupt checkpoint: {message}");
    assert!(
        message.as_str().unwrap().contains("model.safetensors"),
        "{message}"
    );
    assert_eq!(browser.eval(STATE_JS), json!("ready"));
}

/// A long answer (greedy: its first token is the base answer's, no stop) stops at Escape in
/// the text box, while the Stop button is enabled (reachable with Tab).
fn stop_with_escape(browser: &Browser) {
    set_fields(browser, &[("max-new-tokens", "1000")]);
    browser.eval(&format!(
        "document.getElementById('clear').click(); \
         const t = document.getElementById('prompt'); t.value = '{PROMPT}'; \
         t.dispatchEvent(new Event('input', {{bubbles: true}})); \
         t.dispatchEvent(new KeyboardEvent('keydown', {{key: 'Enter', bubbles: true, cancelable: true}}));"
    ));
    browser.wait_for(
        "return document.querySelector('main.chat').dataset.state == 'generating' \
         && !document.getElementById('stop').disabled",
        &json!(true),
        Duration::from_secs(60),
        ERROR_JS,
    );
    browser.eval(
        "document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown', \
         {key: 'Escape', bubbles: true, cancelable: true}))",
    );
    browser.wait_for(STATE_JS, &json!("ready"), Duration::from_secs(60), ERROR_JS);
    let answer = browser.eval(
        "const a = document.querySelector('li.message.assistant'); \
         return [Number(a.dataset.tokens), a.querySelector('.stats').textContent]",
    );
    eprintln!("stopped with Escape: {answer}");
    assert!(answer[0].as_u64().unwrap() < 1000, "{answer}");
    assert!(answer[1].as_str().unwrap().contains("stopped"), "{answer}");
}
