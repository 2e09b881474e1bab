//! Progress bars: drawn on an interactive stderr, silent otherwise (pipes, CI, tests).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether bars should be drawn.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// A bar over `len` units labelled `what`; hidden when [`enabled`] is false.
pub fn bar(len: u64, what: &str, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if !enabled() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let tmpl = if bytes {
        "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}"
    };
    pb.set_style(
        ProgressStyle::with_template(tmpl)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}
