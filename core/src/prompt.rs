//! Prompt building: turns a conversation (system message, earlier turns, the query) into the text
//! a model sees, and, for training, splits a full sample into the prompt part (everything before
//! the answer starts, which gets no loss) and the answer part.
//!
//! Three kinds of template:
//! - [`PromptTemplate::yayi`]: the YaYi/BLOOM format (the first model qlora targets).
//! - [`PromptTemplate::chat`]: a Hugging Face / GGUF Jinja `chat_template`, rendered with
//!   minijinja the way `transformers` renders it.
//! - [`PromptTemplate::from_format`]: a user-written format string (`--prompt_template`); its
//!   placeholders are described there.

use crate::{Error, Result};
use minijinja::{context, Environment, Value};

/// One conversation to render. `history` holds earlier `(query, response)` turns, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    /// The system message; `None` leaves the template's default (YaYi's introduction, or
    /// whatever a chat template does without a system message).
    pub system: Option<String>,
    pub history: Vec<(String, String)>,
    pub query: String,
}

impl Conversation {
    pub fn new(query: impl Into<String>) -> Conversation {
        Conversation {
            query: query.into(),
            ..Conversation::default()
        }
    }
}

/// A training sample as text: `prompt` gets no loss, `answer` is what the model learns to write
/// (including the template's end-of-turn text, e.g. YaYi's `\n\n<|End|>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptParts {
    pub prompt: String,
    pub answer: String,
}

/// YaYi's system introduction (from the YaYi training code).
pub const YAYI_SYSTEM: &str = "A chat between a human and an AI assistant named YaYi.\nYaYi is a \
helpful and harmless language model developed by Beijing Wenge Technology Co.,Ltd.";

/// YaYi's training format, as a format string (see [`PromptTemplate::from_format`]).
pub const YAYI_FORMAT: &str =
    "<|System|>:\n{system}\n\n{history}<|Human|>:\n{query}\n\n<|YaYi|>:\n{answer}\n\n<|End|>";

/// How to render conversations.
#[derive(Debug, Clone)]
pub enum PromptTemplate {
    Format(FormatTemplate),
    /// Boxed: a minijinja environment is several times larger than a format template.
    Chat(Box<ChatTemplate>),
}

impl PromptTemplate {
    /// YaYi/BLOOM: `<|System|>:\n{system}\n\n<|Human|>:\n{query}\n\n<|YaYi|>:\n{answer}\n\n<|End|>`,
    /// with each earlier turn written as a complete `<|Human|>`/`<|YaYi|>`/`<|End|>` block,
    /// followed by a blank line (`\n\n`), before the current one.
    pub fn yayi() -> PromptTemplate {
        let mut format = FormatTemplate::parse(YAYI_FORMAT).expect("YAYI_FORMAT is well-formed");
        format.default_system = YAYI_SYSTEM.to_string();
        format.turn_separator = "\n\n".to_string();
        PromptTemplate::Format(format)
    }

    /// A template from a format string (the `--prompt_template` option). Placeholders:
    /// - `{query}` (required): the current user message.
    /// - `{answer}` (optional): where the answer goes. Everything before it is the prompt part,
    ///   it and everything after it the answer part (so text after `{answer}` is an end-of-turn
    ///   marker the model learns to write). Without it, the answer follows the whole template.
    /// - `{system}` (optional): the conversation's system message (empty when it has none).
    /// - `{history}` (optional): where earlier turns go. The text from `{history}` to the end is
    ///   the turn part; each earlier turn is that part rendered with its query and response, in
    ///   order. A conversation with history needs this placeholder.
    ///
    /// Every other `{` and `}` is literal text. Example, the YaYi format: [`YAYI_FORMAT`].
    pub fn from_format(format: &str) -> Result<PromptTemplate> {
        FormatTemplate::parse(format).map(PromptTemplate::Format)
    }

    /// A Jinja chat template (`chat_template` of `tokenizer_config.json`, or
    /// `tokenizer.chat_template` of a GGUF). `bos_token` and `eos_token` are the strings the
    /// template may refer to.
    pub fn chat(source: &str, bos_token: &str, eos_token: &str) -> Result<PromptTemplate> {
        ChatTemplate::new(source, bos_token, eos_token).map(|c| PromptTemplate::Chat(Box::new(c)))
    }

    /// The chat template of a tokenizer (from its GGUF or `tokenizer_config.json`), with the
    /// tokenizer's BOS and EOS strings; an error when it has none.
    pub fn from_tokenizer(tokenizer: &crate::tokenizer::Tokenizer) -> Result<PromptTemplate> {
        let source = tokenizer.chat_template().ok_or_else(|| {
            Error::Invalid(
                "the tokenizer has no chat template; give a prompt template instead".into(),
            )
        })?;
        let token = |id: Option<u32>| {
            id.and_then(|id| tokenizer.id_to_token(id))
                .unwrap_or_default()
        };
        PromptTemplate::chat(
            source,
            &token(tokenizer.bos_id()),
            &token(tokenizer.eos_id()),
        )
    }

    /// The prompt for generation: the conversation up to where the model starts answering.
    pub fn prompt(&self, conversation: &Conversation) -> Result<String> {
        match self {
            PromptTemplate::Format(f) => f.render(conversation, None),
            PromptTemplate::Chat(c) => c.render(&c.messages(conversation, None), true),
        }
    }

    /// A training sample split into the prompt part and the answer part.
    pub fn training_parts(&self, conversation: &Conversation, answer: &str) -> Result<PromptParts> {
        match self {
            PromptTemplate::Format(f) => {
                let prompt = f.render(conversation, None)?;
                let full = f.render(conversation, Some(answer))?;
                let answer = full[prompt.len()..].to_string();
                Ok(PromptParts { prompt, answer })
            }
            PromptTemplate::Chat(c) => c.training_parts(conversation, answer),
        }
    }
}

/// A format-string template, parsed once (see [`PromptTemplate::from_format`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatTemplate {
    /// Text before `{history}` (the whole template when it has none).
    header: String,
    /// Text from `{history}` on; `None` when the template has no `{history}`.
    turn: Option<String>,
    /// Used for `{system}` when the conversation has no system message.
    default_system: String,
    /// Written after each earlier turn.
    turn_separator: String,
}

impl FormatTemplate {
    fn parse(format: &str) -> Result<FormatTemplate> {
        let count = |p: &str| format.matches(p).count();
        for placeholder in ["{query}", "{answer}", "{system}", "{history}"] {
            if count(placeholder) > 1 {
                return Err(Error::Invalid(format!(
                    "prompt template: `{placeholder}` appears more than once"
                )));
            }
        }
        if count("{query}") == 0 {
            return Err(Error::Invalid(
                "prompt template: `{query}` is missing (it marks where the user message goes)"
                    .into(),
            ));
        }
        let (header, turn) = match format.split_once("{history}") {
            Some((header, turn)) => (header, Some(turn)),
            None => (format, None),
        };
        let turn_part = turn.unwrap_or(format);
        if !turn_part.contains("{query}")
            || (format.contains("{answer}") && !turn_part.contains("{answer}"))
        {
            return Err(Error::Invalid(
                "prompt template: `{query}` and `{answer}` must come after `{history}`".into(),
            ));
        }
        if matches!((format.find("{query}"), format.find("{answer}")), (Some(q), Some(a)) if a < q)
        {
            return Err(Error::Invalid(
                "prompt template: `{answer}` must come after `{query}`".into(),
            ));
        }
        if turn.is_some_and(|t| t.contains("{system}")) {
            return Err(Error::Invalid(
                "prompt template: `{system}` must come before `{history}`".into(),
            ));
        }
        Ok(FormatTemplate {
            header: header.to_string(),
            turn: turn.map(str::to_string),
            default_system: String::new(),
            turn_separator: String::new(),
        })
    }

    fn render(&self, conversation: &Conversation, answer: Option<&str>) -> Result<String> {
        let system = conversation
            .system
            .as_deref()
            .unwrap_or(&self.default_system);
        let Some(turn) = &self.turn else {
            if !conversation.history.is_empty() {
                return Err(Error::Invalid(
                    "prompt template has no `{history}` placeholder, but the conversation has \
                     earlier turns"
                        .into(),
                ));
            }
            return Ok(fill(&self.header, system, &conversation.query, answer));
        };
        let mut out = fill(&self.header, system, "", None);
        for (query, response) in &conversation.history {
            out.push_str(&fill(turn, system, query, Some(response)));
            out.push_str(&self.turn_separator);
        }
        out.push_str(&fill(turn, system, &conversation.query, answer));
        Ok(out)
    }
}

/// `part` of a format template with `{system}` and `{query}` filled in, cut where `{answer}` is
/// when there is no answer, or with the answer there (at the end when `part` has no `{answer}`).
fn fill(part: &str, system: &str, query: &str, answer: Option<&str>) -> String {
    let values = [("{system}", system), ("{query}", query)];
    let (before, after) = part.split_once("{answer}").unwrap_or((part, ""));
    let mut out = substitute(before, &values);
    if let Some(answer) = answer {
        out.push_str(answer);
        out.push_str(&substitute(after, &values));
    }
    out
}

/// Replaces placeholders in one pass over the template text, so that a value containing
/// `{query}` or `{system}` is left as it is.
fn substitute(text: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, placeholder, value)) = values
        .iter()
        .filter_map(|&(p, v)| rest.find(p).map(|at| (at, p, v)))
        .min_by_key(|&(at, _, _)| at)
    {
        out.push_str(&rest[..at]);
        out.push_str(value);
        rest = &rest[at + placeholder.len()..];
    }
    out.push_str(rest);
    out
}

/// A Jinja chat template with the environment `transformers` renders it in.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // transformers renders chat templates with trim_blocks and lstrip_blocks on, and offers
        // `raise_exception` and Python's string methods (`.strip()`, `.startswith()`, ...).
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(
            syntax
                .build()
                .map_err(|e| Error::Invalid(format!("chat template syntax: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::Invalid(format!("chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    fn messages(&self, conversation: &Conversation, answer: Option<&str>) -> Vec<Value> {
        let message = |role: &str, content: &str| context! { role => role, content => content };
        let mut messages = Vec::new();
        if let Some(system) = &conversation.system {
            messages.push(message("system", system));
        }
        for (query, response) in &conversation.history {
            messages.push(message("user", query));
            messages.push(message("assistant", response));
        }
        messages.push(message("user", &conversation.query));
        if let Some(answer) = answer {
            messages.push(message("assistant", answer));
        }
        messages
    }

    fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Invalid(format!("chat template: {e}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| Error::Invalid(format!("chat template does not render: {e:#}")))
    }

    /// The prompt is the conversation rendered with the generation prompt; the answer is what the
    /// full conversation (answer included) adds after it. A template whose full rendering does
    /// not start with its prompt rendering cannot be split, and is an error.
    fn training_parts(&self, conversation: &Conversation, answer: &str) -> Result<PromptParts> {
        let prompt = self.render(&self.messages(conversation, None), true)?;
        let full = self.render(&self.messages(conversation, Some(answer)), false)?;
        match full.strip_prefix(&prompt) {
            Some(rest) => Ok(PromptParts {
                prompt,
                answer: rest.to_string(),
            }),
            None => Err(Error::Invalid(format!(
                "chat template: the rendered conversation with its answer does not start with the \
                 rendered prompt, so prompt and answer cannot be split (prompt: {prompt:?})"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_history() -> Conversation {
        Conversation {
            system: None,
            history: vec![("q1".into(), "r1".into()), ("q2".into(), "r2".into())],
            query: "q3".into(),
        }
    }

    #[test]
    fn yayi_single_turn_is_the_training_format() {
        let parts = PromptTemplate::yayi()
            .training_parts(&Conversation::new("你好"), "您好！")
            .unwrap();
        assert_eq!(
            parts.prompt,
            format!("<|System|>:\n{YAYI_SYSTEM}\n\n<|Human|>:\n你好\n\n<|YaYi|>:\n")
        );
        assert_eq!(parts.answer, "您好！\n\n<|End|>");
    }

    #[test]
    fn yayi_history_turns_are_complete_blocks() {
        let t = PromptTemplate::yayi();
        let prompt = t.prompt(&with_history()).unwrap();
        assert_eq!(
            prompt,
            format!(
                "<|System|>:\n{YAYI_SYSTEM}\n\n\
                 <|Human|>:\nq1\n\n<|YaYi|>:\nr1\n\n<|End|>\n\n\
                 <|Human|>:\nq2\n\n<|YaYi|>:\nr2\n\n<|End|>\n\n\
                 <|Human|>:\nq3\n\n<|YaYi|>:\n"
            )
        );
        let parts = t.training_parts(&with_history(), "a3").unwrap();
        assert_eq!(
            (parts.prompt, parts.answer.as_str()),
            (prompt, "a3\n\n<|End|>")
        );
    }

    #[test]
    fn yayi_takes_a_system_override() {
        let mut c = Conversation::new("q");
        c.system = Some("Be brief.".into());
        let prompt = PromptTemplate::yayi().prompt(&c).unwrap();
        assert!(
            prompt.starts_with("<|System|>:\nBe brief.\n\n<|Human|>:\nq"),
            "{prompt}"
        );
    }

    #[test]
    fn custom_format_without_answer_placeholder_appends_the_answer() {
        let t = PromptTemplate::from_format("[{system}] Q: {query} A:").unwrap();
        let parts = t
            .training_parts(&Conversation::new("x {system} {answer}"), " z")
            .unwrap();
        assert_eq!(parts.prompt, "[] Q: x {system} {answer} A:");
        assert_eq!(parts.answer, " z");
        let msg = t.prompt(&with_history()).unwrap_err().to_string();
        assert!(msg.contains("no `{history}`"), "{msg}");
    }

    #[test]
    fn custom_format_repeats_its_turn_part_for_history() {
        let t = PromptTemplate::from_format("S{history}<u>{query}</u><a>{answer}</a>").unwrap();
        let parts = t.training_parts(&with_history(), "a3").unwrap();
        assert_eq!(
            parts.prompt,
            "S<u>q1</u><a>r1</a><u>q2</u><a>r2</a><u>q3</u><a>"
        );
        assert_eq!(parts.answer, "a3</a>");
    }

    #[test]
    fn bad_formats_are_explained() {
        for (format, expect) in [
            ("no query here", "`{query}` is missing"),
            ("{query}{query}", "more than once"),
            ("{query}{history}x", "must come after `{history}`"),
            ("{query}{history}", "must come after `{history}`"),
            ("{answer} {query}", "`{answer}` must come after `{query}`"),
            ("{history}{query}{system}", "`{system}` must come before"),
        ] {
            let msg = PromptTemplate::from_format(format).unwrap_err().to_string();
            assert!(msg.contains(expect), "{format}: {msg}");
        }
    }

    const CHATML: &str =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
        message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}\
        {{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chat_template_splits_prompt_and_answer() {
        let t = PromptTemplate::chat(CHATML, "", "<|im_end|>").unwrap();
        let parts = t.training_parts(&with_history(), "a3").unwrap();
        assert!(parts
            .prompt
            .starts_with("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\nr1"));
        assert!(parts
            .prompt
            .ends_with("<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n"));
        assert_eq!(parts.answer, "a3<|im_end|>\n");
    }

    #[test]
    fn chat_template_errors_are_reported() {
        let msg = PromptTemplate::chat("{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not parse"), "{msg}");
        let raising =
            PromptTemplate::chat("{{ raise_exception('no system role') }}", "", "").unwrap();
        let msg = raising
            .prompt(&Conversation::new("q"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no system role"), "{msg}");
        let unsplittable = PromptTemplate::chat("{{ messages | length }}", "", "").unwrap();
        let msg = unsplittable
            .training_parts(&Conversation::new("q"), "a")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cannot be split"), "{msg}");
    }

    #[test]
    fn chat_template_has_python_string_methods() {
        let t = PromptTemplate::chat("{{ messages[0]['content'].strip() }}", "", "").unwrap();
        assert_eq!(t.prompt(&Conversation::new("  hi  ")).unwrap(), "hi");
    }
}
