//! The inspector page (web/) in headless Chromium against `qlora inspect`: the page loads the
//! golden tiny BLOOM from a same-origin URL, inspects the whole model and then one tensor (and
//! the whole tiny LLaMA and Qwen2), and must show the numbers the CLI writes to stats.json; bad input (a URL with no model, a
//! corrupt file picked) gets a message naming it and the page goes on working. Screenshots go to
//! target/artifacts/inspector.png (whole model) and inspector-tensor.png. Skips, saying why,
//! where Chromium, chromedriver, trunk or wasm-bindgen is missing (scripts/test.sh installs
//! them, so CI runs it).

// The harness is shared by the browser tests; this one uses part of it.
#[allow(dead_code)]
mod browser;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qlora_core::inspect::ErrorSummary;
use serde_json::{json, Value};

use browser::server::StaticServer;
use browser::webdriver::Browser;
use browser::{app, save_artifact, tools};

const TENSOR: &str = "transformer.h.0.self_attention.query_key_value.weight";

/// The page's state, and its visible error when a wait fails.
const STATE_JS: &str = "return document.querySelector('main.inspector')?.dataset.state ?? null";
const ERROR_JS: &str = "return Array.from(document.querySelectorAll('.status.error')).map(e => e.textContent).join(' | ')";

/// Each row of the page's numbers table: tensor, config label, then the `data-value` of each
/// cell (numel, MSE, mean |err|, max |err|, SQNR dB, block rel. err. p50 and max).
const ROWS_JS: &str = "return Array.from(document.querySelectorAll('tr.numbers')).map(r => \
    [r.dataset.tensor, r.dataset.config].concat(Array.from(r.querySelectorAll('td[data-value]')).map(td => td.dataset.value)))";

fn golden() -> PathBuf {
    app::workspace().join("tests/fixtures/golden")
}

/// `qlora inspect` on the golden tiny BLOOM with `extra` arguments: its stats.json.
fn cli_stats(extra: &[&str]) -> Value {
    cli_stats_of("tiny-bloom", extra)
}

/// `qlora inspect` on golden model `model` (a path under the golden fixtures).
fn cli_stats_of(model: &str, extra: &[&str]) -> Value {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("inspect");
    let o = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("inspect")
        .arg("--model_name_or_path")
        .arg(golden().join(model))
        .arg("--out")
        .arg(&dir)
        .args(extra)
        .output()
        .expect("qlora runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap()
}

/// (tensor, summary) for every error summary of a stats.json, in its order.
fn cli_rows(stats: &Value) -> Vec<(String, ErrorSummary)> {
    let summary = |v: &Value| serde_json::from_value::<ErrorSummary>(v.clone()).unwrap();
    match stats["kind"].as_str() {
        Some("model") => stats["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| {
                let name = t["name"].as_str().unwrap().to_string();
                t["configs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(move |s| (name.clone(), summary(s)))
            })
            .collect(),
        _ => stats["configs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    stats["name"].as_str().unwrap().to_string(),
                    summary(&d["summary"]),
                )
            })
            .collect(),
    }
}

/// Checks the page's rows against the CLI's, in order: integers and every value that is a sum,
/// a maximum or a square root exactly (IEEE arithmetic is the same in wasm); SQNR (a log10,
/// which wasm's libm and the native one may round differently) to 1e-12 relative. Returns the
/// number of values compared and the largest relative SQNR difference.
fn compare(page: &Value, cli: &[(String, ErrorSummary)]) -> (usize, f64) {
    let page = page.as_array().expect("rows");
    assert_eq!(page.len(), cli.len(), "rows on the page vs in stats.json");
    let (mut compared, mut worst_sqnr) = (0, 0.0f64);
    for (row, (tensor, s)) in page.iter().zip(cli) {
        let cell = |i: usize| row[i].as_str().unwrap_or_else(|| panic!("{row}: cell {i}"));
        let number = |i: usize| -> f64 { cell(i).parse().unwrap_or(f64::NAN) };
        assert_eq!(cell(0), tensor);
        assert_eq!(cell(1), s.config.label(), "{tensor}");
        let what = format!("{tensor} {}", s.config.label());
        assert_eq!(cell(2), s.numel.to_string(), "{what}: numel");
        assert_eq!(number(3), s.mse, "{what}: MSE");
        assert_eq!(number(4), s.mean_abs_error, "{what}: mean |err|");
        assert_eq!(number(5), s.max_abs_error, "{what}: max |err|");
        match s.block_rel_error {
            Some(q) => {
                assert_eq!(number(7), q.p50, "{what}: block rel. err. p50");
                assert_eq!(number(8), q.max, "{what}: block rel. err. max");
            }
            // An all-zero tensor has no relative error: no number on the page either.
            None => assert!(number(7).is_nan() && number(8).is_nan(), "{what}"),
        }
        let (page_db, cli_db) = (number(6), s.sqnr.db());
        let rel = ((page_db - cli_db) / cli_db).abs();
        assert!(
            rel <= 1e-12,
            "{what}: SQNR {page_db} on the page, {cli_db} from the CLI"
        );
        worst_sqnr = worst_sqnr.max(rel);
        compared += 8;
    }
    (compared, worst_sqnr)
}

#[test]
fn inspector_page_shows_the_cli_numbers() {
    let (chromium, chromedriver) = match tools() {
        Ok(t) => t,
        Err(reason) => return eprintln!("SKIP inspector_page: {reason}"),
    };
    let dist = match app::dist() {
        Ok(d) => d,
        Err(reason) => return eprintln!("SKIP inspector_page: {reason}"),
    };
    let server = StaticServer::start(vec![
        ("/".into(), dist.clone()),
        ("/golden/".into(), golden()),
    ]);
    let golden_server = &server;
    let browser = Browser::start(&chromedriver, &chromium, 1280, 2200);
    let wait = |script: &str, want: Value| {
        browser.wait_for(script, &want, Duration::from_secs(120), ERROR_JS)
    };
    // Opens the inspector on the model at `url`, inspects the whole model, returns its rows.
    let inspect_whole_model = |url: String| {
        browser.goto(&url);
        wait(STATE_JS, json!("ready"));
        browser.eval("document.getElementById('run').click()");
        wait(
            "return document.querySelector('main.inspector').dataset.state == 'done' \
             && document.querySelectorAll('tr.numbers').length > 0",
            json!(true),
        );
        browser.eval(ROWS_JS)
    };

    // A URL with no model: a clear message, and the page stays usable.
    browser.goto(&server.url("/?model=/golden/no-such-model/#inspector"));
    wait(
        "return document.querySelector('section.loader')?.dataset.state ?? null",
        json!("error"),
    );
    let message = browser.eval(ERROR_JS);
    assert!(
        message.as_str().unwrap().contains("no checkpoint there"),
        "{message}"
    );

    // The whole model.
    let cli_model = cli_stats(&[]);
    let rows = inspect_whole_model(server.url("/?model=/golden/tiny-bloom/#inspector"));
    let (n, worst) = compare(&rows, &cli_rows(&cli_model));
    eprintln!(
        "whole model: {n} values equal to stats.json's ({} rows), SQNR within {worst:.1e} relative",
        n / 8
    );
    let heat_maps =
        browser.eval("return document.querySelectorAll('figure.chart svg title').length");
    assert!(
        heat_maps.as_u64().unwrap() > 0,
        "the heat maps have tooltips"
    );
    let shot = save_artifact("inspector.png", &browser.screenshot());
    eprintln!("screenshot: {}", shot.display());

    // One tensor, picked in the page.
    let cli_tensor = cli_stats(&["--tensor", TENSOR]);
    browser.eval(&format!(
        "const s = document.getElementById('tensor'); s.value = '{TENSOR}'; \
         s.dispatchEvent(new Event('change')); document.getElementById('run').click()"
    ));
    wait(
        &format!(
            "const rows = Array.from(document.querySelectorAll('tr.numbers')); \
             return document.querySelector('main.inspector').dataset.state == 'done' \
             && rows.length > 0 && rows.every(r => r.dataset.tensor == '{TENSOR}')"
        ),
        json!(true),
    );
    let (n, worst) = compare(&browser.eval(ROWS_JS), &cli_rows(&cli_tensor));
    eprintln!("{TENSOR}: {n} values equal to stats.json's, SQNR within {worst:.1e} relative");
    let charts = browser.eval("return document.querySelectorAll('figure.chart').length");
    assert_eq!(
        charts,
        json!(3),
        "weights, error and block error charts of one setting"
    );
    let shot = save_artifact("inspector-tensor.png", &browser.screenshot());
    eprintln!("screenshot: {}", shot.display());

    // Exports: the first chart as PNG and the numbers as CSV. Downloads are caught at the
    // link the page clicks, and their content read back.
    browser.eval(
        "window.downloads = []; URL.revokeObjectURL = () => {}; \
         HTMLAnchorElement.prototype.click = function () { \
           window.downloads.push({ name: this.download, href: this.href }); }; \
         document.querySelector('figure.chart figcaption button').click(); \
         document.querySelector('.exports button').click();",
    );
    wait("return window.downloads.length", json!(2));
    let downloads = browser.eval_async(
        "const done = arguments[0]; \
         Promise.all(window.downloads.map(async d => { \
           const bytes = new Uint8Array(await (await fetch(d.href)).arrayBuffer()); \
           return [d.name, bytes.length, Array.from(bytes.slice(0, 4)), \
                   new TextDecoder().decode(bytes.slice(0, 20))]; \
         })).then(done);",
    );
    let by_name = |name: &str| {
        downloads
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d[0] == name)
            .unwrap_or_else(|| panic!("no download {name}: {downloads}"))
            .clone()
    };
    let png = by_name("weights_bs64.png");
    assert_eq!(png[2], json!([0x89, b'P', b'N', b'G']), "{png}");
    assert!(png[1].as_u64().unwrap() > 10_000, "{png}");
    let csv = by_name(&format!("{TENSOR}.csv"));
    assert_eq!(csv[3], json!("tensor,quant_type,bl"), "{csv}");
    eprintln!(
        "exports: {} ({} bytes), {} ({} bytes)",
        png[0], png[1], csv[0], csv[1]
    );

    // Files from the picker: a corrupt checkpoint is named in the message and the page stays
    // usable; the real files then load.
    let loader_state = "return document.querySelector('section.loader').dataset.state";
    let picker = "input[type=file][multiple]";
    let tmp = tempfile::tempdir().unwrap();
    let corrupt = tmp.path().join("model.safetensors");
    std::fs::write(&corrupt, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    browser.pick_files(picker, &[&corrupt]);
    wait(loader_state, json!("error"));
    let message = browser.eval(ERROR_JS);
    assert!(
        message
            .as_str()
            .unwrap()
            .contains("model.safetensors: safetensors header length"),
        "{message}"
    );
    let model = golden().join("tiny-bloom");
    browser.pick_files(
        picker,
        &[&model.join("config.json"), &model.join("model.safetensors")],
    );
    wait(loader_state, json!("loaded"));
    wait(STATE_JS, json!("ready"));

    // The same model in two shards with an index, from a URL: the same numbers.
    let sharded = tmp.path().join("sharded");
    write_sharded(&model, &sharded);
    let server = StaticServer::start(vec![("/".into(), dist), ("/sharded/".into(), sharded)]);
    let rows = inspect_whole_model(server.url("/?model=sharded/#inspector"));
    let (n, _) = compare(&rows, &cli_rows(&cli_model));
    eprintln!("sharded checkpoint from a URL: {n} values equal to stats.json's");

    // The other golden architectures, whole model.
    for model in ["llama/tiny-llama", "llama/tiny-qwen2"] {
        let cli = cli_stats_of(model, &[]);
        let rows =
            inspect_whole_model(golden_server.url(&format!("/?model=/golden/{model}/#inspector")));
        let (n, worst) = compare(&rows, &cli_rows(&cli));
        eprintln!("{model}: {n} values equal to stats.json's, SQNR within {worst:.1e} relative");
    }
}

/// `model` (a directory with model.safetensors and config.json) rewritten into `out` as two
/// shards and a `model.safetensors.index.json`, the way transformers shards.
fn write_sharded(model: &Path, out: &Path) {
    use qlora_core::checkpoint::{open_checkpoint, SafetensorsWriter, TensorSource};

    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(model.join("config.json"), out.join("config.json")).unwrap();
    let source = open_checkpoint(model).unwrap();
    let infos = source.tensor_infos();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in infos.chunks(infos.len().div_ceil(2)).enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", i + 1);
        let mut w = SafetensorsWriter::create(&out.join(&shard), part).unwrap();
        while let Some(next) = w.expected().cloned() {
            w.write_tensor(&next.name, &source.read(&next.name).unwrap().data)
                .unwrap();
            weight_map.insert(next.name, json!(shard));
        }
        w.commit().unwrap();
    }
    let index = json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(out.join("model.safetensors.index.json"), index.to_string()).unwrap();
}
