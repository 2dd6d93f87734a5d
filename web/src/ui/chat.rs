//! The chat page: a model directory (4-bit, or full precision quantized to NF4 on load) and an
//! optional PEFT adapter go to the GPU through the WGSL engine (WebGPU); messages stream in as
//! tokens come, with Stop, sampling settings, an adapter on/off switch (one load answers as the
//! fine-tuned and as the base model) and tokens/s.

mod messages;
mod settings;

use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use qlora_core::peft::LoraAdapter;
use qlora_core::prompt::Conversation;
use qlora_core::response::{response_text, TextStream};
use qlora_shaders::{
    request_adapter, DeviceReport, Engine, EngineOptions, GenerateOptions, LoadOptions,
    LoadedModel, Pause, QuantizeOnLoad,
};

use super::loader::Loader;
use super::progress::{Progress, ProgressBar};
use super::read::yield_now;
use crate::chat_model::{open_adapter, ChatModel, ADAPTER_FILES, MODEL_SIDE_FILES};
use crate::files::{human_bytes, FileSet};
use messages::{Message, MessageList};
use settings::{Settings, SettingsPanel};

/// Whether the browser gives the page a GPU.
#[derive(Debug, Clone, PartialEq)]
enum Gpu {
    Checking,
    Ready(String),
    Missing(String),
    /// A WebGPU device that cannot run the engine (it rejected a kernel).
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No model on the GPU yet.
    Empty,
    Loading,
    Ready,
    Generating,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "empty",
            State::Loading => "loading",
            State::Ready => "ready",
            State::Generating => "generating",
        }
    }
}

/// What lives only in this page's thread (the GPU objects are not `Send`).
#[derive(Clone, Copy)]
struct Slots {
    engine: StoredValue<Option<Engine>, LocalStorage>,
    files: StoredValue<Option<Rc<ChatModel>>, LocalStorage>,
    adapter: StoredValue<Option<Rc<LoraAdapter>>, LocalStorage>,
    /// Taken out while a generation runs.
    model: StoredValue<Option<LoadedModel>, LocalStorage>,
    /// Counts the loads begun: a load that a newer one overtook discards its model.
    loads: StoredValue<u64, LocalStorage>,
}

#[component]
pub fn ChatPage() -> impl IntoView {
    let slots = Slots {
        engine: StoredValue::new_local(None),
        files: StoredValue::new_local(None),
        adapter: StoredValue::new_local(None),
        model: StoredValue::new_local(None),
        loads: StoredValue::new_local(0),
    };
    let gpu = RwSignal::new(Gpu::Checking);
    let state = RwSignal::new(State::Empty);
    let load_progress = RwSignal::new(None::<Progress>);
    let load_error = RwSignal::new(None::<String>);
    let has_adapter = RwSignal::new(false);
    let adapter_on = RwSignal::new(true);
    let messages = RwSignal::new(Vec::<Message>::new());
    let settings = Settings::new();
    let stop = RwSignal::new(false);

    let build = move || {
        // At once, so that nothing is sent to the model being replaced.
        state.set(State::Loading);
        spawn_local(async move {
            load_model(slots, state, load_progress, load_error).await;
        })
    };
    spawn_local(async move {
        match start_engine().await {
            Ok(engine) => {
                gpu.set(Gpu::Ready(adapter_summary(engine.report())));
                slots.engine.set_value(Some(engine));
                load_model(slots, state, load_progress, load_error).await;
            }
            Err(why) => gpu.set(why),
        }
    });

    let on_model = Callback::new(move |set: FileSet| {
        let bytes = set.total_bytes();
        let model = ChatModel::open(set).map_err(|e| e.to_string())?;
        let summary = format!(
            "{}: {:?}, {} tensors, {}, vocabulary {}",
            model.label,
            model.config.architecture(),
            model.source.tensor_infos().len(),
            human_bytes(bytes),
            model.tokenizer.vocab_size()
        );
        slots.files.set_value(Some(Rc::new(model)));
        build();
        Ok(summary)
    });
    let on_adapter = Callback::new(move |set: FileSet| {
        let label = set.label.clone();
        let adapter = open_adapter(set).map_err(|e| e.to_string())?;
        let summary = format!(
            "{label}: LoRA r={} on {} modules",
            adapter.config.lora.r,
            adapter.modules.len()
        );
        slots.adapter.set_value(Some(Rc::new(adapter)));
        has_adapter.set(true);
        adapter_on.set(true);
        build();
        Ok(summary)
    });

    let send = move |query: String| {
        if state.get_untracked() != State::Ready || query.trim().is_empty() {
            return;
        }
        let Some(files) = slots.files.get_value() else {
            return;
        };
        let options = match settings.options(&files.stops.ids) {
            Ok(o) => o,
            Err(e) => {
                settings.error.set(Some(e));
                return;
            }
        };
        settings.error.set(None);
        let with_adapter = has_adapter.get_untracked() && adapter_on.get_untracked();
        let conversation = Conversation {
            system: settings.system_prompt(),
            history: messages.with_untracked(|m| messages::history(m)),
            query: query.clone(),
        };
        messages.update(|m| {
            m.push(Message::user(query));
            m.push(Message::assistant(with_adapter));
        });
        stop.set(false);
        state.set(State::Generating);
        spawn_local(async move {
            let loads = slots.loads.get_value();
            let outcome = respond(
                slots,
                &files,
                &conversation,
                &options,
                with_adapter,
                messages,
                stop,
            )
            .await;
            if let Err(e) = outcome {
                messages.update(|m| {
                    if let Some(last) = m.last_mut() {
                        last.error = Some(e);
                        last.done = true;
                    }
                });
            }
            // A load begun meanwhile (a new file) owns the state now.
            if slots.loads.get_value() == loads {
                state.set(if slots.model.with_value(Option::is_some) {
                    State::Ready
                } else {
                    State::Empty
                });
            }
        });
    };

    view! {
        <main class="page chat" data-state=move || state.get().name()>
            <h1>"Chat"</h1>
            <GpuStatus gpu=gpu.into() />
            <details class="loaders" open=move || state.get() == State::Empty>
                <summary>"Model and adapter"</summary>
                <h2>"Model"</h2>
                <Loader
                    on_loaded=on_model
                    url_param="model"
                    hint="a model folder (config.json, tokenizer.json, the 4-bit or full-precision checkpoint)"
                    side_files=MODEL_SIDE_FILES
                />
                <h2>"Adapter (optional)"</h2>
                <div class="adapter-loader">
                    <Loader
                        on_loaded=on_adapter
                        url_param="adapter"
                        hint="a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)"
                        main_files=&ADAPTER_FILES[1..]
                        side_files=&ADAPTER_FILES[..1]
                    />
                </div>
            </details>
            // Outside the folded section, which stays shut while a model loads.
            <ProgressBar progress=load_progress.into() />
            {move || load_error.get().map(|e| view! { <p class="status error" role="alert">{e}</p> })}
            <SettingsPanel settings=settings has_adapter=has_adapter.into() adapter_on=adapter_on />
            <MessageList messages=messages.into() />
            <Composer
                state=state.into()
                on_send=Callback::new(send)
                on_stop=Callback::new(move |()| stop.set(true))
                on_clear=Callback::new(move |()| messages.set(Vec::new()))
            />
        </main>
    }
}

#[component]
fn GpuStatus(gpu: Signal<Gpu>) -> impl IntoView {
    move || {
        match gpu.get() {
        Gpu::Checking => view! { <p class="gpu" data-gpu="checking">"Looking for a WebGPU adapter…"</p> }.into_any(),
        Gpu::Ready(name) => view! { <p class="gpu" data-gpu="ready">{format!("WebGPU: {name}")}</p> }.into_any(),
        Gpu::Missing(why) => view! {
            <p class="gpu status error" data-gpu="missing" role="alert">
                {format!("No WebGPU: {why}. The chat needs a browser with WebGPU (a recent Chrome, Edge or Safari; Firefox 141+); the Inspector works without it.")}
            </p>
        }
        .into_any(),
        Gpu::Failed(why) => view! {
            <p class="gpu status error" data-gpu="failed" role="alert">
                {format!("WebGPU cannot run the chat here: {why}")}
            </p>
        }
        .into_any(),
    }
    }
}

/// The text box: Enter sends, Shift+Enter starts a new line, Escape stops the answer.
#[component]
fn Composer(
    state: Signal<State>,
    on_send: Callback<String>,
    on_stop: Callback<()>,
    on_clear: Callback<()>,
) -> impl IntoView {
    let text = RwSignal::new(String::new());
    let submit = move || {
        if state.get_untracked() == State::Ready {
            on_send.run(text.get_untracked());
            text.set(String::new());
        }
    };
    view! {
        <form class="composer" on:submit=move |ev| {
            ev.prevent_default();
            submit();
        }>
            <textarea
                id="prompt"
                rows="3"
                aria-label="Message"
                placeholder="Message (Enter sends, Shift+Enter: new line, Esc stops)"
                prop:value=move || text.get()
                on:input=move |ev| text.set(event_target_value(&ev))
                on:keydown=move |ev: leptos::ev::KeyboardEvent| {
                    if ev.key() == "Enter" && !ev.shift_key() && !ev.is_composing() {
                        ev.prevent_default();
                        submit();
                    } else if ev.key() == "Escape" && state.get_untracked() == State::Generating {
                        on_stop.run(());
                    }
                }
            ></textarea>
            <div class="buttons">
                <button id="send" type="submit" disabled=move || state.get() != State::Ready>"Send"</button>
                <button id="stop" type="button" disabled=move || state.get() != State::Generating
                    on:click=move |_| on_stop.run(())>"Stop"</button>
                <button id="clear" type="button" disabled=move || state.get() == State::Generating
                    on:click=move |_| on_clear.run(())>"New chat"</button>
            </div>
        </form>
    }
}

/// The adapter's name (browsers may withhold it) and the largest buffer the engine binds.
fn adapter_summary(report: &DeviceReport) -> String {
    let name = if report.adapter.is_empty() {
        "an adapter the browser does not name"
    } else {
        &report.adapter
    };
    format!(
        "{name}, buffers of up to {}",
        human_bytes(report.binding_size)
    )
}

/// The engine on the browser's WebGPU adapter, or why there is none.
async fn start_engine() -> Result<Engine, Gpu> {
    let navigator = web_sys::window()
        .ok_or_else(|| Gpu::Missing("no window".into()))?
        .navigator();
    if !js_sys::Reflect::has(&navigator, &"gpu".into()).unwrap_or(false) {
        return Err(Gpu::Missing(
            "this browser does not expose navigator.gpu".into(),
        ));
    }
    let adapter = request_adapter()
        .await
        .ok_or_else(|| Gpu::Missing("the browser offers no WebGPU adapter".into()))?;
    Engine::from_adapter(&adapter, EngineOptions::default())
        .await
        .map_err(|e| Gpu::Failed(e.to_string()))
}

/// Puts the loaded model (with the adapter, when one is loaded) on the GPU, replacing the one
/// there. Waits for the engine and the model files, whichever comes last starts it.
async fn load_model(
    slots: Slots,
    state: RwSignal<State>,
    progress: RwSignal<Option<Progress>>,
    error: RwSignal<Option<String>>,
) {
    let (Some(engine), Some(files)) = (slots.engine.get_value(), slots.files.get_value()) else {
        // Still waiting for the other; whichever comes last loads.
        state.set(State::Empty);
        return;
    };
    let adapter = slots.adapter.get_value();
    slots.model.set_value(None);
    error.set(None);
    state.set(State::Loading);
    let this_load = slots.loads.get_value() + 1;
    slots.loads.set_value(this_load);
    // Let the page show the loading state before the first tensor (the embedding, the largest)
    // holds the thread.
    yield_now().await;
    let options = LoadOptions {
        // A full-precision checkpoint becomes QLoRA's NF4 (a 4-bit one stays as stored).
        quantize: Some(QuantizeOnLoad::QLORA),
        ..LoadOptions::default()
    };
    // What the load will put on the GPU: the plan's weights and the adapter's f32 matrices.
    let lora_bytes: usize = adapter.as_deref().map_or(0, |a| {
        a.modules
            .values()
            .map(|p| 4 * (p.a.len() + p.b.len()))
            .sum()
    });
    let expected = engine
        .plan(&files.config, &*files.source, &options)
        .map(|footprint| {
            let bytes = footprint.weight_bytes + lora_bytes as u64;
            format!(" of about {}", human_bytes(bytes))
        })
        .unwrap_or_default();
    let loaded = engine
        .load_async(
            &files.config,
            &*files.source,
            adapter.as_deref(),
            &options,
            &mut |p| -> Pause {
                progress.set(Some(Progress {
                    done: p.done as f64,
                    total: p.total as f64,
                    text: format!(
                        "{} of {} tensors on the GPU ({}{expected}): {}",
                        p.done,
                        p.total,
                        human_bytes(p.bytes),
                        p.tensor
                    ),
                }));
                // A timer tick per tensor lets the page paint the bar (and stay responsive).
                Box::pin(yield_now())
            },
        )
        .await;
    if slots.loads.get_value() != this_load {
        // A newer load (another model or adapter picked meanwhile) owns the page now.
        return;
    }
    progress.set(None);
    match loaded {
        Ok(model) => {
            slots.model.set_value(Some(model));
            state.set(State::Ready);
        }
        Err(e) => {
            error.set(Some(format!("{}: {e}", files.label)));
            state.set(State::Empty);
        }
    }
}

/// Generates the answer to `conversation` into the last message, as it grows.
async fn respond(
    slots: Slots,
    files: &ChatModel,
    conversation: &Conversation,
    options: &GenerateOptions,
    with_adapter: bool,
    messages: RwSignal<Vec<Message>>,
    stop: RwSignal<bool>,
) -> Result<(), String> {
    let prompt = files.prompt(conversation).map_err(|e| e.to_string())?;
    let loads = slots.loads.get_value();
    let mut model = slots
        .model
        .try_update_value(Option::take)
        .flatten()
        .ok_or("no model on the GPU")?;
    model.set_adapter_enabled(with_adapter);
    let mut stream = TextStream::new(&files.tokenizer, &files.stops);
    let append = |piece: &str| {
        if !piece.is_empty() {
            messages.update(|m| {
                m.last_mut()
                    .expect("the answer's message")
                    .text
                    .push_str(piece)
            });
        }
    };
    let started = now_ms();
    let generated = model
        .generate(&prompt, options, |ids| {
            let (piece, ended) = stream.push(ids).unwrap_or_default();
            append(&piece);
            ended || stop.get_untracked()
        })
        .await;
    let seconds = (now_ms() - started) / 1000.0;
    // A load begun meanwhile (a new file) replaces this model.
    if slots.loads.get_value() == loads {
        slots.model.set_value(Some(model));
    }
    let generated = generated.map_err(|e| e.to_string())?;
    let text =
        response_text(&files.tokenizer, &files.stops, &generated).map_err(|e| e.to_string())?;
    messages.update(|m| {
        let last = m.last_mut().expect("the answer's message");
        last.text = text;
        last.tokens = generated.len();
        last.ids = generated.clone();
        last.tokens_per_second = generated.len() as f64 / seconds.max(1e-3);
        last.stopped = stop.get_untracked();
        last.done = true;
    });
    Ok(())
}

fn now_ms() -> f64 {
    web_sys::window()
        .and_then(|w| w.performance())
        .map_or(0.0, |p| p.now())
}
