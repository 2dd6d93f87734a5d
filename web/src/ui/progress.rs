//! A progress bar with a line of text (bytes read, tensors done).

use leptos::prelude::*;

#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub done: f64,
    /// 0 when the total is not known yet: the bar is then indeterminate.
    pub total: f64,
    pub text: String,
}

#[component]
pub fn ProgressBar(progress: Signal<Option<Progress>>) -> impl IntoView {
    move || {
        progress.get().map(|p| {
            let bar = if p.total > 0.0 {
                view! { <progress max=p.total value=p.done></progress> }.into_any()
            } else {
                view! { <progress></progress> }.into_any()
            };
            view! {
                <div class="progress" role="status">
                    {bar}
                    <span>{p.text}</span>
                </div>
            }
        })
    }
}
