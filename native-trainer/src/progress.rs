//! Progress bars for long work, on stderr (hidden when it is not a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting parameters (tensor elements) processed out of `total`.
pub fn params_bar(total: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {human_pos}/{human_len} params ({per_sec}, eta {eta}) {wide_msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// A bar counting optimizer steps out of `total`; the message carries loss, lr and speed.
pub fn steps_bar(total: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps ({elapsed} elapsed, eta {eta}) {wide_msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}
