//! Browser input: a `File` or a fetched URL read as a stream of chunks into one buffer (so the
//! progress bar moves and nothing is held twice), and the files of a drop (folders included).

use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    DragEvent, File, FileSystemDirectoryEntry, FileSystemEntry, FileSystemFileEntry,
    ReadableStream, ReadableStreamDefaultReader, Response,
};

use crate::files::check_size;

/// A JS exception or rejection as text.
pub fn js_error(e: JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// Lets the browser run (paint, handle input) before the caller goes on.
pub async fn yield_now() {
    gloo_timers::future::TimeoutFuture::new(0).await;
}

/// Reads `stream` to its end; `expected` (bytes, when known) sizes the buffer once, and
/// `on_chunk` hears the size of each chunk as it comes.
async fn read_stream(
    label: &str,
    stream: ReadableStream,
    expected: Option<u64>,
    on_chunk: &mut dyn FnMut(u64),
) -> Result<Vec<u8>, String> {
    if let Some(n) = expected {
        check_size(label, n)?;
    }
    let reader: ReadableStreamDefaultReader = stream.get_reader().unchecked_into();
    let mut out = Vec::with_capacity(expected.unwrap_or(0) as usize);
    loop {
        let result = JsFuture::from(reader.read())
            .await
            .map_err(|e| format!("{label}: reading failed: {}", js_error(e)))?;
        let done = Reflect::get(&result, &"done".into())
            .ok()
            .and_then(|d| d.as_bool())
            .unwrap_or(true);
        if done {
            return Ok(out);
        }
        let chunk: Uint8Array = Reflect::get(&result, &"value".into())
            .map_err(js_error)?
            .dyn_into()
            .map_err(|_| format!("{label}: the stream gave something other than bytes"))?;
        let (start, len) = (out.len(), chunk.length() as usize);
        check_size(label, (start + len) as u64)?;
        out.resize(start + len, 0);
        chunk.copy_to(&mut out[start..]);
        on_chunk(len as u64);
    }
}

/// The whole content of a picked or dropped file.
pub async fn read_file(file: &File, on_chunk: &mut dyn FnMut(u64)) -> Result<Vec<u8>, String> {
    let name = file.name();
    read_stream(&name, file.stream(), Some(file.size() as u64), on_chunk).await
}

/// Fetches `url` (same origin). `Ok(None)` when the server says it has no such file (404), so
/// the caller can try the next candidate; other failures are errors naming the URL.
pub async fn fetch_file(
    url: &str,
    on_start: &mut dyn FnMut(Option<u64>),
    on_chunk: &mut dyn FnMut(u64),
) -> Result<Option<Vec<u8>>, String> {
    let window = web_sys::window().ok_or("no window")?;
    let response: Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| format!("{url}: {}", js_error(e)))?
        .unchecked_into();
    if response.status() == 404 {
        return Ok(None);
    }
    if !response.ok() {
        return Err(format!(
            "{url}: the server answered {} {}",
            response.status(),
            response.status_text()
        ));
    }
    let length = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|l| l.parse::<u64>().ok());
    on_start(length);
    match response.body() {
        Some(body) => read_stream(url, body, length, on_chunk).await.map(Some),
        None => Ok(Some(Vec::new())),
    }
}

/// A browser callback API (`readEntries`, `file`) as a future of the value it calls back with.
pub(super) async fn callback_promise(
    start: impl FnOnce(&Function, &Function),
) -> Result<JsValue, String> {
    let mut start = Some(start);
    let promise = Promise::new(&mut |resolve, reject| {
        if let Some(start) = start.take() {
            start(&resolve, &reject)
        }
    });
    JsFuture::from(promise).await.map_err(js_error)
}

/// The entries a drop carries, taken while the event is live (the browser clears them after).
pub fn dropped_entries(ev: &DragEvent) -> Vec<FileSystemEntry> {
    let Some(transfer) = ev.data_transfer() else {
        return Vec::new();
    };
    let items = transfer.items();
    (0..items.length())
        .filter_map(|i| items.get(i))
        .filter_map(|item| item.webkit_get_as_entry().ok().flatten())
        .collect()
}

/// The files of dropped entries: files as they are, a folder's files (not its subfolders').
/// Also returns the folder's name when exactly one folder was dropped.
pub async fn entry_files(
    entries: Vec<FileSystemEntry>,
) -> Result<(Vec<File>, Option<String>), String> {
    let mut files = Vec::new();
    let mut folders = Vec::new();
    for entry in entries {
        if entry.is_directory() {
            folders.push(entry.name());
            let reader = entry
                .unchecked_into::<FileSystemDirectoryEntry>()
                .create_reader();
            // readEntries hands over a batch at a time; an empty batch ends the listing.
            loop {
                let batch = callback_promise(|resolve, reject| {
                    if let Err(e) = reader.read_entries_with_callback(resolve) {
                        let _ = reject.call1(&JsValue::NULL, &e);
                    }
                })
                .await?;
                let batch: Array = batch.unchecked_into();
                if batch.length() == 0 {
                    break;
                }
                for child in batch.iter() {
                    let child: FileSystemEntry = child.unchecked_into();
                    if child.is_file() {
                        files.push(entry_file(child).await?);
                    }
                }
            }
        } else if entry.is_file() {
            files.push(entry_file(entry).await?);
        }
    }
    let folder = match folders.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    };
    Ok((files, folder))
}

async fn entry_file(entry: FileSystemEntry) -> Result<File, String> {
    let name = entry.name();
    let file_entry: FileSystemFileEntry = entry.unchecked_into();
    callback_promise(|resolve, reject| file_entry.file_with_callback_and_callback(resolve, reject))
        .await
        .map(JsCast::unchecked_into)
        .map_err(|e| format!("{name}: {e}"))
}

/// `webkitRelativePath` of a file from a folder pick (empty for a plain pick).
pub fn relative_path(file: &File) -> String {
    Reflect::get(file, &"webkitRelativePath".into())
        .ok()
        .and_then(|p| p.as_string())
        .unwrap_or_default()
}
