//! Progress bars, one per phase: drawn on an interactive stderr, silent otherwise (pipes, CI,
//! tests). Each shows its work in a unit a user can check against something they know: bytes
//! of the checkpoint, tokens per second, prompts.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// Whether bars should be drawn.
pub fn enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("CI").is_none()
}

/// What a bar counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Bytes (of the input checkpoint, or written): `1.2 GiB/4.5 GiB 410 MiB/s`.
    Bytes,
    /// Token × block steps of a model run `passes` blocks deep: the bar shows the share done
    /// and `tokens/s` through the whole model (the step rate over `passes`).
    Tokens { passes: u64 },
    /// Whole items, named: `3/8 prompts 0.4 prompts/s`.
    Items(&'static str),
}

/// Every bar of the process, stacked: phases that overlap (a block's calibration inside the
/// conversion's stream) each keep their own line.
fn multi() -> &'static MultiProgress {
    static M: std::sync::OnceLock<MultiProgress> = std::sync::OnceLock::new();
    M.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// A bar over `len` units labelled `what`; hidden when [`enabled`] is false.
pub fn bar(len: u64, what: &str, unit: Unit) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    let pb = if enabled() { multi().add(pb) } else { pb };
    pb.set_style(style(unit));
    pb.set_message(what.to_owned());
    pb
}

fn style(unit: Unit) -> ProgressStyle {
    let tmpl = match unit {
        Unit::Bytes => {
            "{msg:>10} [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {elapsed} eta {eta}"
        }
        Unit::Tokens { .. } => "{msg:>10} [{bar:32}] {percent:>3}% {rate} {elapsed} eta {eta}",
        Unit::Items(_) => "{msg:>10} [{bar:32}] {pos}/{len} {unit} {rate} {elapsed} eta {eta}",
    };
    let s = ProgressStyle::with_template(tmpl)
        .expect("valid template")
        .progress_chars("=> ");
    match unit {
        Unit::Bytes => s,
        Unit::Tokens { passes } => s.with_key(
            "rate",
            move |st: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} tokens/s", st.per_sec() / passes.max(1) as f64);
            },
        ),
        Unit::Items(name) => s
            .with_key(
                "unit",
                move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(name);
                },
            )
            .with_key(
                "rate",
                move |st: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}", rate(st.per_sec(), name));
                },
            ),
    }
}

/// `12.3 prompts/s`, or `8.1 s/prompt` below one per second: a rate a reader takes in at a
/// glance, never a four-decimal fraction.
pub fn rate(per_sec: f64, name: &str) -> String {
    if per_sec >= 1.0 || per_sec == 0.0 {
        format!("{per_sec:.1} {name}/s")
    } else {
        let one = name.strip_suffix('s').unwrap_or(name);
        format!("{:.1} s/{one}", 1.0 / per_sec)
    }
}

/// A note on what the run is doing that a user should see whatever the terminal: stderr.
pub fn note(msg: &str) {
    eprintln!("{msg}");
}

/// A warning a user should see whatever the terminal: printed to stderr.
pub fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_read_at_a_glance() {
        assert_eq!(super::rate(12.345, "prompts"), "12.3 prompts/s");
        assert_eq!(super::rate(0.125, "prompts"), "8.0 s/prompt");
    }
}
