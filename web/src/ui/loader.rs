//! Loading files into the app, shared by every page: a file picker (several files), a folder
//! picker, drag and drop (files or a folder), and `?model=<same-origin URL>` so that a link
//! preloads. Shows bytes read as it goes; what the page makes of the files (tensors found, or
//! why they are not a model) comes back through `on_loaded` and is shown here too.

use std::cell::Cell;
use std::collections::BTreeMap;

use leptos::prelude::*;
use leptos::task::spawn_local;
use qlora_core::checkpoint::{ShardedCheckpoint, CHECKPOINT_FILES};
use web_sys::File;

use super::progress::{Progress, ProgressBar};
use super::read::{self, dropped_entries, entry_files, fetch_file, read_file, relative_path};
use crate::files::{base_name, directly_in_folder, human_bytes, FileSet, ModelUrl, CONFIG_FILE};

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Idle,
    Loading,
    /// What the page made of the files.
    Loaded(String),
    Failed(String),
}

impl Status {
    fn name(&self) -> &'static str {
        match self {
            Status::Idle => "idle",
            Status::Loading => "loading",
            Status::Loaded(_) => "loaded",
            Status::Failed(_) => "error",
        }
    }
}

/// `on_loaded` gets the files and answers with a one-line summary, or why they cannot be used.
/// `url_param` is the query parameter that names a URL to load at start.
#[component]
pub fn Loader(
    on_loaded: Callback<FileSet, Result<String, String>>,
    url_param: &'static str,
    /// What to load, in words, for the drop zone.
    hint: &'static str,
    /// For a directory URL: the files to try, in order, until one exists (a checkpoint's by
    /// default).
    #[prop(default = &CHECKPOINT_FILES)]
    main_files: &'static [&'static str],
    /// Files fetched from beside it where they exist (a tokenizer, an adapter's config).
    #[prop(optional)]
    side_files: &'static [&'static str],
) -> impl IntoView {
    let status = RwSignal::new(Status::Idle);
    let progress = RwSignal::new(None::<Progress>);

    let finish = move |result: Result<FileSet, String>| {
        progress.set(None);
        status.set(match result.and_then(|set| on_loaded.run(set)) {
            Ok(summary) => Status::Loaded(summary),
            Err(e) => Status::Failed(e),
        });
    };
    let load_files = move |files: Vec<File>, label: Option<String>| {
        if status.get_untracked() == Status::Loading {
            return;
        }
        status.set(Status::Loading);
        spawn_local(async move { finish(read_files(files, label, progress).await) });
    };
    let load_url = move |url: String| {
        status.set(Status::Loading);
        spawn_local(async move {
            finish(fetch_model(&url, url_param, main_files, side_files, progress).await)
        });
    };

    // A URL in the query string loads at once.
    if let Some(url) = query_param(url_param) {
        load_url(url);
    }

    let on_pick = move |ev: leptos::ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&ev);
        let Some(list) = input.files() else { return };
        let files: Vec<File> = (0..list.length()).filter_map(|i| list.get(i)).collect();
        // A folder pick lists every file below the folder, with its relative path.
        let folder = files
            .first()
            .map(relative_path)
            .filter(|p| !p.is_empty())
            .and_then(|p| p.split('/').next().map(str::to_string));
        let files = files
            .into_iter()
            .filter(|f| folder.is_none() || directly_in_folder(&relative_path(f)))
            .collect();
        load_files(files, folder);
        // So that picking the same files again fires `change` again.
        input.set_value("");
    };
    let dragging = RwSignal::new(false);
    let on_drop = move |ev: leptos::ev::DragEvent| {
        ev.prevent_default();
        dragging.set(false);
        let entries = dropped_entries(&ev);
        if entries.is_empty() {
            return;
        }
        if status.get_untracked() == Status::Loading {
            return;
        }
        status.set(Status::Loading);
        spawn_local(async move {
            match entry_files(entries).await {
                Ok((files, folder)) => finish(read_files(files, folder, progress).await),
                Err(e) => finish(Err(e)),
            }
        });
    };

    view! {
        <section class="loader" data-state=move || status.get().name()>
            <div
                class="drop-zone"
                class:dragging=move || dragging.get()
                on:dragover=move |ev: leptos::ev::DragEvent| {
                    ev.prevent_default();
                    dragging.set(true);
                }
                on:dragleave=move |_| dragging.set(false)
                on:drop=on_drop
            >
                <p>{"Drop "}{hint}{" here (several files, or the model's folder), or choose:"}</p>
                <label class="button">
                    "Files…"
                    <input type="file" multiple on:change=on_pick />
                </label>
                <label class="button">
                    "Folder…"
                    <input type="file" prop:webkitdirectory=true on:change=on_pick />
                </label>
                <p class="hint">
                    {format!("Or open this page with ?{url_param}=<URL of a model directory or .safetensors file> (same origin).")}
                </p>
            </div>
            <ProgressBar progress=progress.into() />
            {move || match status.get() {
                Status::Loaded(summary) => Some(view! { <p class="status ok">{summary}</p> }.into_any()),
                Status::Failed(e) => Some(view! { <p class="status error" role="alert">{e}</p> }.into_any()),
                Status::Idle | Status::Loading => None,
            }}
        </section>
    }
}

/// The value of `?name=` in the page's URL.
fn query_param(name: &str) -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get(name)
        .filter(|v| !v.is_empty())
}

fn set_bytes(progress: RwSignal<Option<Progress>>, name: &str, done: u64, total: u64) {
    progress.set(Some(Progress {
        done: done as f64,
        total: total as f64,
        text: if total > 0 {
            format!("{name}: {} of {}", human_bytes(done), human_bytes(total))
        } else {
            format!("{name}: {}", human_bytes(done))
        },
    }));
}

/// Reads picked or dropped files into a set, by base name. Two files of one name are refused
/// rather than one silently winning.
async fn read_files(
    files: Vec<File>,
    folder: Option<String>,
    progress: RwSignal<Option<Progress>>,
) -> Result<FileSet, String> {
    if files.is_empty() {
        return Err("no files to load".into());
    }
    let label = folder.unwrap_or_else(|| files[0].name());
    let total: u64 = files.iter().map(|f| f.size() as u64).sum();
    let mut set = FileSet {
        label,
        files: BTreeMap::new(),
    };
    let mut done = 0u64;
    for file in &files {
        let name = base_name(&file.name()).to_string();
        if set.files.contains_key(&name) {
            return Err(format!(
                "two files are named {name}: load one model at a time"
            ));
        }
        let bytes = read_file(file, &mut |n| {
            done += n;
            set_bytes(progress, &name, done, total);
        })
        .await?;
        set.files.insert(name, bytes);
    }
    Ok(set)
}

/// Fetches a model from `?model=` (or the page's other `param`): the URL must be of this page's
/// origin (the app never asks another site for files).
async fn fetch_model(
    url: &str,
    param: &str,
    main_files: &[&str],
    side_files: &[&str],
    progress: RwSignal<Option<Progress>>,
) -> Result<FileSet, String> {
    let location = web_sys::window().ok_or("no window")?.location();
    let href = location.href().map_err(read::js_error)?;
    let resolved = web_sys::Url::new_with_base(url, &href)
        .map_err(|_| format!("?{param}={url}: not a URL"))?;
    if resolved.origin() != location.origin().map_err(read::js_error)? {
        return Err(format!(
            "?{param}={url}: only URLs of this page's origin can be loaded"
        ));
    }
    resolved.set_search("");
    resolved.set_hash("");
    let plan = ModelUrl::parse(&resolved.href());
    let mut set = FileSet {
        label: url.to_string(),
        files: BTreeMap::new(),
    };
    // Bytes read, and the total of the lengths announced so far.
    let (done, total) = (Cell::new(0u64), Cell::new(0u64));
    let fetch = async |name: &str| -> Result<Option<Vec<u8>>, String> {
        let file_url = plan.file_url(name);
        fetch_file(
            &file_url,
            &mut |length| total.set(total.get() + length.unwrap_or(0)),
            &mut |n| {
                done.set(done.get() + n);
                set_bytes(progress, name, done.get(), total.get());
            },
        )
        .await
    };
    for name in std::iter::once(CONFIG_FILE).chain(side_files.iter().copied()) {
        if let Some(bytes) = fetch(name).await? {
            set.files.insert(name.into(), bytes);
        }
    }
    let candidates = match &plan {
        ModelUrl::Directory { .. } => main_files.iter().map(|f| f.to_string()).collect(),
        ModelUrl::File { .. } => plan.checkpoint_candidates(),
    };
    let mut checkpoint = None;
    for name in candidates.iter().cloned() {
        if let Some(bytes) = fetch(&name).await? {
            checkpoint = Some((name, bytes));
            break;
        }
    }
    let Some((name, bytes)) = checkpoint else {
        return Err(format!(
            "{}: no checkpoint there (tried {})",
            plan.base(),
            candidates.join(", ")
        ));
    };
    if name.ends_with(".index.json") {
        for shard in ShardedCheckpoint::shard_files(&name, &bytes).map_err(|e| e.to_string())? {
            if base_name(&shard) != shard {
                return Err(format!("{name}: shard `{shard}` is not a file name"));
            }
            let shard_bytes = fetch(&shard).await?.ok_or_else(|| {
                format!(
                    "{}: not found (a shard {name} names)",
                    plan.file_url(&shard)
                )
            })?;
            set.files.insert(shard, shard_bytes);
        }
    }
    set.files.insert(name, bytes);
    Ok(set)
}
