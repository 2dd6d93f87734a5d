//! The chat page's place in the app. The chat itself (a 4-bit model and an adapter on WebGPU)
//! arrives with the WGSL engine; until then the page says so rather than pretend.

use leptos::prelude::*;

#[component]
pub fn ChatPage() -> impl IntoView {
    view! {
        <main class="page chat" data-state="unavailable">
            <h1>"Chat"</h1>
            <p>
                "Chatting with a 4-bit model and a LoRA adapter in the browser arrives with the WGSL \
                 (WebGPU) engine; it is not part of this build yet."
            </p>
            <p>
                "Meanwhile the " <a href="#inspector">"Inspector"</a>
                " shows what 4-bit quantization does to a checkpoint's weights."
            </p>
        </main>
    }
}
