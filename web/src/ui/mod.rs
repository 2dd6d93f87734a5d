//! The app in the browser: a nav between the pages, each page its own component with its own
//! state (no global state). The page is chosen by the URL's fragment (`#inspector`), so a link
//! can open either page and the query string stays free for what to load.

mod charts;
mod chat;
mod export;
mod inspector;
mod loader;
mod progress;
mod read;

use leptos::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Chat,
    Inspector,
}

impl Page {
    const ALL: [Page; 2] = [Page::Chat, Page::Inspector];

    fn fragment(self) -> &'static str {
        match self {
            Page::Chat => "#chat",
            Page::Inspector => "#inspector",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Page::Chat => "Chat",
            Page::Inspector => "Inspector",
        }
    }

    /// The page a fragment names; the chat for any other.
    fn from_fragment(fragment: &str) -> Page {
        Page::ALL
            .into_iter()
            .find(|p| p.fragment() == fragment)
            .unwrap_or(Page::Chat)
    }
}

fn current_fragment() -> String {
    web_sys::window()
        .and_then(|w| w.location().hash().ok())
        .unwrap_or_default()
}

#[component]
pub fn App() -> impl IntoView {
    let page = RwSignal::new(Page::from_fragment(&current_fragment()));
    // Back/forward and edited URLs change the fragment without a click.
    let on_hash = leptos::prelude::window_event_listener(leptos::ev::hashchange, move |_| {
        page.set(Page::from_fragment(&current_fragment()))
    });
    on_cleanup(move || on_hash.remove());
    let links = Page::ALL
        .map(|p| {
            view! {
                <a
                    href=p.fragment()
                    class:active=move || page.get() == p
                    aria-current=move || (page.get() == p).then_some("page")
                    on:click=move |_| page.set(p)
                >
                    {p.title()}
                </a>
            }
        })
        .collect_view();
    view! {
        <nav class="top">
            <span class="brand">"qlora"</span>
            {links}
        </nav>
        {move || match page.get() {
            Page::Chat => view! { <chat::ChatPage /> }.into_any(),
            Page::Inspector => view! { <inspector::InspectorPage /> }.into_any(),
        }}
    }
}
