//! Generation settings: temperature (0 is greedy), top-p, repetition penalty, max new tokens,
//! the system prompt, and the adapter switch.

use leptos::prelude::*;
use qlora_shaders::{GenerateOptions, Sampling};

/// `qlora predict`'s top-k when sampling (YaYi's generation defaults).
const TOP_K: usize = 50;

/// The fields as typed; read when a message is sent.
#[derive(Clone, Copy)]
pub struct Settings {
    pub temperature: RwSignal<String>,
    pub top_p: RwSignal<String>,
    pub repetition_penalty: RwSignal<String>,
    pub max_new_tokens: RwSignal<String>,
    pub system: RwSignal<String>,
    pub error: RwSignal<Option<String>>,
}

impl Settings {
    /// `qlora predict`'s defaults.
    pub fn new() -> Settings {
        Settings {
            temperature: RwSignal::new("0.3".into()),
            top_p: RwSignal::new("1.0".into()),
            repetition_penalty: RwSignal::new("1.1".into()),
            max_new_tokens: RwSignal::new("100".into()),
            system: RwSignal::new(String::new()),
            error: RwSignal::new(None),
        }
    }

    /// The system prompt, `None` (the template's own) when empty.
    pub fn system_prompt(&self) -> Option<String> {
        Some(self.system.get_untracked()).filter(|s| !s.trim().is_empty())
    }

    /// The options of the next generation, or which field is wrong.
    pub fn options(&self, stop_ids: &[u32]) -> Result<GenerateOptions, String> {
        fn number<T: std::str::FromStr>(field: RwSignal<String>, name: &str) -> Result<T, String> {
            let text = field.get_untracked();
            text.trim()
                .parse()
                .map_err(|_| format!("{name}: `{text}` is not a number"))
        }
        let temperature: f32 = number(self.temperature, "temperature")?;
        if temperature.is_nan() || temperature < 0.0 {
            return Err("temperature: must be 0 (greedy) or more".into());
        }
        let do_sample = temperature > 0.0;
        let options = GenerateOptions {
            max_new_tokens: number(self.max_new_tokens, "max new tokens")?,
            stop_ids: stop_ids.to_vec(),
            sampling: Sampling {
                do_sample,
                temperature: if do_sample { temperature } else { 1.0 },
                top_p: number(self.top_p, "top-p")?,
                top_k: if do_sample { TOP_K } else { 0 },
                repetition_penalty: number(self.repetition_penalty, "repetition penalty")?,
            },
            seed: now_seed(),
        };
        Ok(options)
    }
}

/// A new seed per message, so that sampling varies between tries.
fn now_seed() -> u64 {
    js_sys::Date::now() as u64
}

#[component]
pub fn SettingsPanel(
    settings: Settings,
    has_adapter: Signal<bool>,
    adapter_on: RwSignal<bool>,
) -> impl IntoView {
    let field =
        |id: &'static str, label: &'static str, value: RwSignal<String>, step: &'static str| {
            view! {
                <label for=id>
                    {label}
                    <input
                        id=id
                        type="number"
                        step=step
                        min="0"
                        prop:value=move || value.get()
                        on:input=move |ev| value.set(event_target_value(&ev))
                    />
                </label>
            }
        };
    view! {
        <details class="settings">
            <summary>"Settings"</summary>
            <div class="fields">
                {field("temperature", "Temperature (0: greedy)", settings.temperature, "0.05")}
                {field("top-p", "Top-p", settings.top_p, "0.05")}
                {field("repetition-penalty", "Repetition penalty", settings.repetition_penalty, "0.05")}
                {field("max-new-tokens", "Max new tokens", settings.max_new_tokens, "1")}
                <label for="system" class="wide">
                    "System prompt (empty: the template's own)"
                    <textarea
                        id="system"
                        rows="2"
                        prop:value=move || settings.system.get()
                        on:input=move |ev| settings.system.set(event_target_value(&ev))
                    ></textarea>
                </label>
            </div>
            {move || settings.error.get().map(|e| view! { <p class="status error" role="alert">{e}</p> })}
        </details>
        <label class="adapter-switch" class:disabled=move || !has_adapter.get()>
            <input
                id="adapter-on"
                type="checkbox"
                disabled=move || !has_adapter.get()
                prop:checked=move || adapter_on.get()
                on:change=move |ev| adapter_on.set(event_target_checked(&ev))
            />
            {move || if has_adapter.get() { "Adapter on (off: the base model)" } else { "No adapter loaded" }}
        </label>
    }
}
