//! The conversation as shown: each message, the answer's speed, and the history a prompt
//! repeats.

use leptos::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    /// An answer: whether the adapter was on.
    pub adapter: bool,
    pub done: bool,
    pub stopped: bool,
    pub tokens: usize,
    /// An answer's generated ids, for tests and curious readers (`data-ids`).
    pub ids: Vec<u32>,
    pub tokens_per_second: f64,
    pub error: Option<String>,
}

impl Message {
    pub fn user(text: String) -> Message {
        Message {
            role: Role::User,
            text,
            adapter: false,
            done: true,
            stopped: false,
            tokens: 0,
            ids: Vec::new(),
            tokens_per_second: 0.0,
            error: None,
        }
    }

    /// An answer about to stream in.
    pub fn assistant(adapter: bool) -> Message {
        Message {
            role: Role::Assistant,
            adapter,
            done: false,
            ..Message::user(String::new())
        }
    }
}

/// The finished (query, answer) turns, oldest first, for the next prompt.
pub fn history(messages: &[Message]) -> Vec<(String, String)> {
    messages
        .chunks(2)
        .filter_map(|pair| match pair {
            [q, a]
                if q.role == Role::User
                    && a.role == Role::Assistant
                    && a.done
                    && a.error.is_none() =>
            {
                Some((q.text.clone(), a.text.clone()))
            }
            _ => None,
        })
        .collect()
}

#[component]
pub fn MessageList(messages: Signal<Vec<Message>>) -> impl IntoView {
    view! {
        <ol class="messages" aria-live="polite">
            {move || messages.get().into_iter().map(|m| view! { <MessageItem message=m /> }).collect_view()}
        </ol>
    }
}

#[component]
fn MessageItem(message: Message) -> impl IntoView {
    let (class, who) = match message.role {
        Role::User => ("message user", "You".to_string()),
        Role::Assistant => (
            "message assistant",
            if message.adapter {
                "Model + adapter"
            } else {
                "Base model"
            }
            .to_string(),
        ),
    };
    let stats =
        (message.role == Role::Assistant && message.done && message.error.is_none()).then(|| {
            format!(
                "{} tokens, {:.1} tokens/s{}",
                message.tokens,
                message.tokens_per_second,
                if message.stopped { ", stopped" } else { "" }
            )
        });
    view! {
        <li
            class=class
            data-done=message.done.to_string()
            data-adapter=message.adapter.to_string()
            data-tokens=message.tokens.to_string()
            data-ids=format!("{:?}", message.ids)
            data-tokens-per-second=format!("{:.2}", message.tokens_per_second)
        >
            <span class="who">{who}</span>
            <p class="text">{message.text}</p>
            {stats.map(|s| view! { <span class="stats">{s}</span> })}
            {message.error.map(|e| view! { <p class="status error" role="alert">{e}</p> })}
        </li>
    }
}
