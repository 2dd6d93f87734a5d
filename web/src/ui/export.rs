//! Saving what the page shows: text files (CSV, JSON, SVG) and a chart as PNG (the SVG drawn
//! onto a canvas at twice its size).

use js_sys::Array;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{Blob, BlobPropertyBag, HtmlAnchorElement, HtmlCanvasElement, HtmlImageElement, Url};

use super::read::{callback_promise, js_error};

fn blob(text: &str, mime: &str) -> Result<Blob, String> {
    let options = BlobPropertyBag::new();
    options.set_type(mime);
    Blob::new_with_str_sequence_and_options(&Array::of1(&text.into()), &options).map_err(js_error)
}

/// Hands `blob` to the browser as a download named `file_name`.
fn save_blob(blob: &Blob, file_name: &str) -> Result<(), String> {
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or("no document")?;
    let url = Url::create_object_url_with_blob(blob).map_err(js_error)?;
    let a: HtmlAnchorElement = document
        .create_element("a")
        .map_err(js_error)?
        .unchecked_into();
    a.set_href(&url);
    a.set_download(file_name);
    a.click();
    Url::revoke_object_url(&url).map_err(js_error)
}

pub fn save_text(text: &str, mime: &str, file_name: &str) -> Result<(), String> {
    save_blob(&blob(text, mime)?, file_name)
}

/// Renders `svg` (a standalone document with width and height) to a PNG and saves it.
pub async fn save_png(svg: &str, file_name: &str) -> Result<(), String> {
    const SCALE: f64 = 2.0;
    let url = Url::create_object_url_with_blob(&blob(svg, "image/svg+xml")?).map_err(js_error)?;
    let image = HtmlImageElement::new().map_err(js_error)?;
    image.set_src(&url);
    let decoded = JsFuture::from(image.decode()).await;
    Url::revoke_object_url(&url).map_err(js_error)?;
    decoded.map_err(|e| format!("{file_name}: the chart did not render: {}", js_error(e)))?;
    let (w, h) = (image.natural_width(), image.natural_height());
    let document = web_sys::window()
        .and_then(|w| w.document())
        .ok_or("no document")?;
    let canvas: HtmlCanvasElement = document
        .create_element("canvas")
        .map_err(js_error)?
        .unchecked_into();
    canvas.set_width((w as f64 * SCALE) as u32);
    canvas.set_height((h as f64 * SCALE) as u32);
    let context: web_sys::CanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(js_error)?
        .ok_or("no 2d canvas context")?
        .unchecked_into();
    context.scale(SCALE, SCALE).map_err(js_error)?;
    context
        .draw_image_with_html_image_element(&image, 0.0, 0.0)
        .map_err(js_error)?;
    let png = callback_promise(|resolve, reject| {
        if let Err(e) = canvas.to_blob_with_type(resolve, "image/png") {
            let _ = reject.call1(&wasm_bindgen::JsValue::NULL, &e);
        }
    })
    .await?;
    let png: Blob = png
        .dyn_into()
        .map_err(|_| format!("{file_name}: the canvas gave no PNG"))?;
    save_blob(&png, file_name)
}
