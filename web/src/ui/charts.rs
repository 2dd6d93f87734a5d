//! One chart of the inspector: core's SVG shown inline (so its `<title>` tooltips work), with
//! PNG and SVG downloads.

use leptos::prelude::*;
use leptos::task::spawn_local;
use qlora_core::inspect::Figure;

use super::export::{save_png, save_text};

#[component]
pub fn Chart(figure: Figure) -> impl IntoView {
    let Figure { file_name, svg, .. } = figure;
    let png_name = file_name.replace(".svg", ".png");
    let error = RwSignal::new(None::<String>);
    let (svg_for_png, svg_for_file) = (svg.clone(), svg.clone());
    let svg_name = file_name.clone();
    view! {
        <figure class="chart" data-file=file_name>
            <div class="svg" inner_html=svg></div>
            <figcaption>
                <button on:click=move |_| {
                    let (svg, name) = (svg_for_png.clone(), png_name.clone());
                    spawn_local(async move {
                        error.set(save_png(&svg, &name).await.err());
                    });
                }>"PNG"</button>
                <button on:click=move |_| {
                    error.set(save_text(&svg_for_file, "image/svg+xml", &svg_name).err());
                }>"SVG"</button>
                {move || error.get().map(|e| view! { <span class="status error">{e}</span> })}
            </figcaption>
        </figure>
    }
}
