//! The inspector page: load a full-precision checkpoint, pick one tensor or the whole model and
//! the block sizes, and see what NF4 and FP4 (with and without double quant) do to the weights.
//! Every number and chart comes from `qlora_core::inspect` (what `qlora inspect` prints and
//! writes); the page runs it in steps, yielding to the browser between them.

use std::sync::Arc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use qlora_core::inspect::{
    self, ErrorSummary, Figure, InspectReport, ModelInspection, QuantConfig, SourceTensor, Sqnr,
    TensorInspection, DEFAULT_BINS, DEFAULT_BLOCKSIZES,
};
use qlora_core::quant::QuantType;

use super::charts::Chart;
use super::export::save_text;
use super::loader::Loader;
use super::progress::{Progress, ProgressBar};
use super::read::yield_now;
use crate::checkpoint::Checkpoint;
use crate::csv::{report_csv, sqnr_cell};
use crate::files::{human_bytes, FileSet, CONFIG_FILE};

/// The tensor picker's value for "the whole model".
const WHOLE_MODEL: &str = "";

/// What the numbers download as.
#[derive(Debug, Clone, Copy)]
enum Export {
    Csv,
    /// The `stats.json` document `qlora inspect` writes.
    Json,
}

/// A report with its charts, built once.
struct Results {
    report: InspectReport,
    figures: Vec<Figure>,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// No checkpoint yet.
    Empty,
    Ready,
    Working,
    Done,
    Failed(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Empty => "empty",
            State::Ready => "ready",
            State::Working => "working",
            State::Done => "done",
            State::Failed(_) => "error",
        }
    }
}

#[component]
pub fn InspectorPage() -> impl IntoView {
    let checkpoint = RwSignal::new(None::<Arc<Checkpoint>>);
    let tensor = RwSignal::new(String::new());
    let blocksizes = RwSignal::new(DEFAULT_BLOCKSIZES.to_vec());
    let state = RwSignal::new(State::Empty);
    let progress = RwSignal::new(None::<Progress>);
    let results = RwSignal::new(None::<Arc<Results>>);
    // Bumped to stop a running inspection (Stop, or a new checkpoint).
    let generation = RwSignal::new(0u64);

    let on_loaded = Callback::new(move |set: FileSet| {
        generation.update(|g| *g += 1);
        results.set(None);
        progress.set(None);
        let bytes = set.total_bytes();
        match Checkpoint::open(set) {
            Ok(c) => {
                let summary = format!(
                    "{}: {} tensors ({} float), {}{}",
                    c.label,
                    c.source.tensor_infos().len(),
                    c.float_tensors.len(),
                    human_bytes(bytes),
                    if c.config.is_some() {
                        ", with config.json"
                    } else {
                        "; no config.json, so one tensor at a time"
                    }
                );
                tensor.set(if c.config.is_some() {
                    WHOLE_MODEL.to_string()
                } else {
                    c.default_tensor().to_string()
                });
                checkpoint.set(Some(Arc::new(c)));
                state.set(State::Ready);
                Ok(summary)
            }
            Err(e) => {
                checkpoint.set(None);
                state.set(State::Empty);
                Err(e.to_string())
            }
        }
    });

    let run = move |_| {
        let Some(ckpt) = checkpoint.get_untracked() else {
            return;
        };
        generation.update(|g| *g += 1);
        let mine = generation.get_untracked();
        let configs = inspect::quant_configs(&blocksizes.get_untracked());
        let name = tensor.get_untracked();
        state.set(State::Working);
        results.set(None);
        spawn_local(async move {
            let stopped = move || generation.get_untracked() != mine;
            let outcome = if name == WHOLE_MODEL {
                inspect_model(&ckpt, configs, progress, stopped).await
            } else {
                inspect_tensor(&ckpt, &name, configs, progress, stopped).await
            };
            if stopped() {
                return;
            }
            progress.set(None);
            match outcome {
                Ok(report) => {
                    let figures = match &report {
                        InspectReport::Tensor(t) => inspect::tensor_figures(t),
                        InspectReport::Model(m) => inspect::model_figures(m),
                    };
                    results.set(Some(Arc::new(Results { report, figures })));
                    state.set(State::Done);
                }
                Err(e) => state.set(State::Failed(e)),
            }
        });
    };
    let stop = move |_| {
        generation.update(|g| *g += 1);
        progress.set(None);
        state.set(State::Failed("stopped".into()));
    };

    view! {
        <main class="page inspector" data-state=move || state.get().name()>
            <h1>"Quantization error inspector"</h1>
            <p class="lede">
                "What NF4 and FP4 (bitsandbytes' 4-bit types) do to a full-precision checkpoint's weights, \
                 at block sizes 64, 128 and 256, with and without double quant — the numbers and charts of \
                 " <code>"qlora inspect"</code> "."
            </p>
            <Loader
                on_loaded=on_loaded
                url_param="model"
                hint="a full-precision checkpoint (model.safetensors, or the shards with model.safetensors.index.json, and config.json)"
            />
            {move || checkpoint.get().map(|c| view! {
                <Controls checkpoint=c tensor=tensor blocksizes=blocksizes state=state.into() on_run=run on_stop=stop />
            })}
            <ProgressBar progress=progress.into() />
            {move || match state.get() {
                State::Failed(e) => Some(view! { <p class="status error" role="alert">{e}</p> }),
                _ => None,
            }}
            {move || results.get().map(|r| view! { <ResultsView results=r /> })}
        </main>
    }
}

/// Tensor picker, block sizes, Inspect and Stop.
#[component]
fn Controls(
    checkpoint: Arc<Checkpoint>,
    tensor: RwSignal<String>,
    blocksizes: RwSignal<Vec<usize>>,
    state: Signal<State>,
    on_run: impl Fn(()) + 'static,
    on_stop: impl Fn(()) + 'static,
) -> impl IntoView {
    let has_config = checkpoint.config.is_some();
    let options = checkpoint
        .float_tensors
        .iter()
        .map(|t| {
            let name = t.name.clone();
            let selected = {
                let name = name.clone();
                move || tensor.get() == name
            };
            view! {
                <option value=name.clone() selected=selected>
                    {format!("{name}  {:?} {}", t.shape, t.dtype)}
                </option>
            }
        })
        .collect_view();
    let blocksize_box = move |bs: usize| {
        view! {
            <label class="check">
                <input
                    type="checkbox"
                    prop:checked=move || blocksizes.get().contains(&bs)
                    on:change=move |ev| {
                        let on = event_target_checked(&ev);
                        blocksizes.update(|v| {
                            v.retain(|&b| b != bs);
                            if on {
                                v.push(bs);
                                v.sort_unstable();
                            }
                        });
                    }
                />
                {bs}
            </label>
        }
    };
    let working = move || state.get() == State::Working;
    view! {
        <section class="controls">
            <label>
                "Tensor "
                <select id="tensor" on:change=move |ev| tensor.set(event_target_value(&ev))>
                    <option value=WHOLE_MODEL disabled=!has_config selected=move || tensor.get() == WHOLE_MODEL>
                        {if has_config {
                            "All quantized weights (heat maps layer × module)".to_string()
                        } else {
                            format!("All quantized weights (needs {CONFIG_FILE})")
                        }}
                    </option>
                    {options}
                </select>
            </label>
            <fieldset>
                <legend>"Block sizes"</legend>
                {DEFAULT_BLOCKSIZES.map(blocksize_box).collect_view()}
            </fieldset>
            <button
                id="run"
                on:click=move |_| on_run(())
                disabled=move || working() || blocksizes.get().is_empty()
            >
                "Inspect"
            </button>
            <button on:click=move |_| on_stop(()) disabled=move || !working()>"Stop"</button>
        </section>
    }
}

/// One tensor in steps (two per configuration), with progress.
async fn inspect_tensor(
    ckpt: &Checkpoint,
    name: &str,
    configs: Vec<QuantConfig>,
    progress: RwSignal<Option<Progress>>,
    stopped: impl Fn() -> bool,
) -> Result<InspectReport, String> {
    let tensor = SourceTensor::read(&*ckpt.source, &ckpt.label, name).map_err(|e| e.to_string())?;
    let values = tensor.values().map_err(|e| e.to_string())?;
    let located = |e| tensor.locate(e).to_string();
    let mut job = TensorInspection::new(
        name,
        values.as_slice(),
        tensor.shape(),
        &configs,
        DEFAULT_BINS,
    )
    .map_err(located)?;
    while job.steps_done() < job.steps() {
        progress.set(Some(Progress {
            done: job.steps_done() as f64,
            total: job.steps() as f64,
            text: format!(
                "{name}: quantization {} of {} ({} weights)",
                job.steps_done() + 1,
                job.steps(),
                tensor.shape().iter().product::<usize>()
            ),
        }));
        yield_now().await;
        if stopped() {
            return Err("stopped".into());
        }
        job.step().map_err(located)?;
    }
    Ok(InspectReport::Tensor(job.finish().map_err(located)?))
}

/// Every quantized weight, one configuration of one tensor a step, with progress.
async fn inspect_model(
    ckpt: &Checkpoint,
    configs: Vec<QuantConfig>,
    progress: RwSignal<Option<Progress>>,
    stopped: impl Fn() -> bool,
) -> Result<InspectReport, String> {
    let config = ckpt.config.as_ref().ok_or(format!(
        "{}: no {CONFIG_FILE}, so the quantized weights are unknown: pick one tensor",
        ckpt.label
    ))?;
    let source = &*ckpt.source;
    let mut job = ModelInspection::new(config, CONFIG_FILE, source, &ckpt.label, configs)
        .map_err(|e| e.to_string())?;
    let configs_per_tensor = job.steps() / job.specs().len().max(1);
    while let Some(spec) = job.next_tensor() {
        progress.set(Some(Progress {
            done: job.steps_done() as f64,
            total: job.steps() as f64,
            text: format!(
                "{}: tensor {} of {}, quantization {} of {configs_per_tensor}",
                spec.name,
                job.tensors_done() + 1,
                job.specs().len(),
                job.steps_done() % configs_per_tensor + 1,
            ),
        }));
        yield_now().await;
        if stopped() {
            return Err("stopped".into());
        }
        job.step(source).map_err(|e| e.to_string())?;
    }
    Ok(InspectReport::Model(
        job.finish(source).map_err(|e| e.to_string())?,
    ))
}

/// The (block size, double quant) groups of `configs`, in order.
fn groups(configs: impl Iterator<Item = QuantConfig>) -> Vec<(usize, bool)> {
    let mut out: Vec<(usize, bool)> = Vec::new();
    for c in configs {
        if !out.contains(&(c.blocksize, c.double_quant)) {
            out.push((c.blocksize, c.double_quant));
        }
    }
    out
}

fn sqnr_text(sqnr: Sqnr) -> String {
    match sqnr {
        Sqnr::Db(db) => format!("{db:.2} dB"),
        Sqnr::Lossless => "lossless".into(),
        Sqnr::NoSignal => "n/a (all zero)".into(),
    }
}

#[component]
fn ResultsView(results: Arc<Results>) -> impl IntoView {
    let (title, configs, grid_rows): (String, Vec<QuantConfig>, Vec<GridCell>) =
        match &results.report {
            InspectReport::Tensor(t) => (
                format!(
                    "{} {:?} {}: min {:.4e}, max {:.4e}, mean {:.4e}, std {:.4e}",
                    t.name,
                    t.shape,
                    t.dtype,
                    t.weights.min,
                    t.weights.max,
                    t.weights.mean,
                    t.weights.std
                ),
                t.configs.iter().map(|d| d.summary.config).collect(),
                t.configs.iter().map(|d| GridCell::of(&d.summary)).collect(),
            ),
            InspectReport::Model(m) => (
                format!(
                    "All {} quantized weights ({} values)",
                    m.tensors.len(),
                    m.totals.first().map_or(0, |t| t.numel)
                ),
                m.configs.clone(),
                m.totals
                    .iter()
                    .map(|t| GridCell {
                        config: t.config,
                        mse: t.mse,
                        max_abs_error: m
                            .tensors
                            .iter()
                            .flat_map(|s| s.configs.iter().filter(|c| c.config == t.config))
                            .map(|c| c.max_abs_error)
                            .fold(0.0, f64::max),
                        sqnr: t.sqnr,
                    })
                    .collect(),
            ),
        };
    let groups = groups(configs.into_iter());
    let selected = RwSignal::new(groups[0]);
    let file_stem = match &results.report {
        InspectReport::Tensor(t) => t.name.clone(),
        InspectReport::Model(_) => "model".to_string(),
    };
    let export_error = RwSignal::new(None::<String>);
    let export = {
        let results = results.clone();
        let stem = file_stem.clone();
        move |kind: Export| {
            let (text, mime, extension) = match kind {
                Export::Csv => (report_csv(&results.report), "text/csv", "csv"),
                Export::Json => (
                    serde_json::to_string_pretty(&results.report).expect("reports serialize")
                        + "\n",
                    "application/json",
                    "json",
                ),
            };
            export_error.set(save_text(&text, mime, &format!("{stem}.{extension}")).err());
        }
    };
    let export_json = export.clone();
    let charts = {
        let results = results.clone();
        move || {
            let (bs, dq) = selected.get();
            results
                .figures
                .iter()
                .filter(|f| f.blocksize == bs && f.double_quant == dq)
                .map(|f| view! { <Chart figure=f.clone() /> })
                .collect_view()
        }
    };
    view! {
        <section class="results">
            <h2>{title}</h2>
            <div class="exports">
                <button on:click=move |_| export(Export::Csv)>"Download CSV"</button>
                <button on:click=move |_| export_json(Export::Json)>"Download JSON (stats.json)"</button>
                {move || export_error.get().map(|e| view! { <span class="status error">{e}</span> })}
            </div>
            <SettingsGrid groups=groups.clone() cells=grid_rows selected=selected />
            <div class="charts">{charts}</div>
            <NumbersTable report=results.clone() />
        </section>
    }
}

/// One configuration's headline numbers.
#[derive(Debug, Clone, Copy)]
struct GridCell {
    config: QuantConfig,
    mse: f64,
    max_abs_error: f64,
    sqnr: Sqnr,
}

impl GridCell {
    fn of(s: &ErrorSummary) -> GridCell {
        GridCell {
            config: s.config,
            mse: s.mse,
            max_abs_error: s.max_abs_error,
            sqnr: s.sqnr,
        }
    }
}

/// Block size × double quant (rows) by NF4 | FP4 (columns); a row picks the charts shown.
#[component]
fn SettingsGrid(
    groups: Vec<(usize, bool)>,
    cells: Vec<GridCell>,
    selected: RwSignal<(usize, bool)>,
) -> impl IntoView {
    let cell = move |group: (usize, bool), q: QuantType| {
        cells
            .iter()
            .find(|c| {
                c.config.quant_type == q && (c.config.blocksize, c.config.double_quant) == group
            })
            .map(|c| {
                view! {
                    <td>{format!("{:.3e}", c.mse)}</td>
                    <td>{format!("{:.3e}", c.max_abs_error)}</td>
                    <td class="sqnr">{sqnr_text(c.sqnr)}</td>
                }
                .into_any()
            })
            .unwrap_or_else(|| view! { <td colspan="3">"–"</td> }.into_any())
    };
    let rows = groups
        .into_iter()
        .map(|group| {
            let (bs, dq) = group;
            view! {
                <tr
                    class:selected=move || selected.get() == group
                    on:click=move |_| selected.set(group)
                    tabindex="0"
                    on:keydown=move |ev| {
                        if ev.key() == "Enter" || ev.key() == " " {
                            selected.set(group)
                        }
                    }
                    title="show this setting's charts"
                >
                    <th>{bs}</th>
                    <th>{if dq { "yes" } else { "no" }}</th>
                    {cell(group, QuantType::Nf4)}
                    {cell(group, QuantType::Fp4)}
                </tr>
            }
        })
        .collect_view();
    view! {
        <table class="grid">
            <thead>
                <tr>
                    <th rowspan="2">"block size"</th>
                    <th rowspan="2">"double quant"</th>
                    <th colspan="3">"NF4"</th>
                    <th colspan="3">"FP4"</th>
                </tr>
                <tr>
                    <th>"MSE"</th><th>"max |err|"</th><th>"SQNR"</th>
                    <th>"MSE"</th><th>"max |err|"</th><th>"SQNR"</th>
                </tr>
            </thead>
            <tbody>{rows}</tbody>
        </table>
    }
}

/// Every error summary in full precision: one row per tensor and configuration, each number
/// also in a `data-value` attribute (what the browser test reads and compares with the CLI).
#[component]
fn NumbersTable(report: Arc<Results>) -> impl IntoView {
    let rows: Vec<(String, ErrorSummary)> = match &report.report {
        InspectReport::Tensor(t) => t
            .configs
            .iter()
            .map(|d| (t.name.clone(), d.summary.clone()))
            .collect(),
        InspectReport::Model(m) => m
            .tensors
            .iter()
            .flat_map(|t| t.configs.iter().map(|s| (t.name.clone(), s.clone())))
            .collect(),
    };
    let count = rows.len();
    let number = |value: f64| {
        view! { <td data-value=value.to_string()>{format!("{value:.6e}")}</td> }
    };
    let rows = rows
        .into_iter()
        .map(|(tensor, s)| {
            let tensor_attr = tensor.clone();
            view! {
                <tr class="numbers" data-tensor=tensor_attr data-config=s.config.label()>
                    <td>{tensor}</td>
                    <td>{s.config.label()}</td>
                    <td data-value=s.numel.to_string()>{s.numel}</td>
                    {number(s.mse)}
                    {number(s.mean_abs_error)}
                    {number(s.max_abs_error)}
                    <td data-value=sqnr_cell(s.sqnr)>{sqnr_text(s.sqnr)}</td>
                    {number(s.block_rel_error.map_or(f64::NAN, |q| q.p50))}
                    {number(s.block_rel_error.map_or(f64::NAN, |q| q.max))}
                </tr>
            }
        })
        .collect_view();
    view! {
        <details class="numbers">
            <summary>{format!("All numbers ({count} rows)")}</summary>
            <table id="numbers">
                <thead>
                    <tr>
                        <th>"tensor"</th><th>"config"</th><th>"numel"</th><th>"MSE"</th>
                        <th>"mean |err|"</th><th>"max |err|"</th><th>"SQNR"</th>
                        <th>"block rel. err. p50"</th><th>"block rel. err. max"</th>
                    </tr>
                </thead>
                <tbody>{rows}</tbody>
            </table>
        </details>
    }
}
