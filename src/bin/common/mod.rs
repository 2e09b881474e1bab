//! Shared by both binaries: thread setup, atomic writes, error exit.
#![allow(dead_code)]

use std::path::Path;

use anyhow::Context;

/// Fixes the worker count for rayon and for candle's matmuls (both read RAYON_NUM_THREADS).
pub fn set_threads(n: Option<usize>) -> usize {
    let n = n.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
}

/// Writes `text` to `path` through a temporary file in the same folder, renamed on success.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// The process's command line as one string, for reports.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// A bad argument or input found by a binary itself (exit status 2).
#[derive(Debug)]
pub struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Runs `f`, printing the error chain on failure (never a backtrace) and exiting with status 2
/// for bad input or arguments (see `minitron::Error::exit_code`; [`BadInput`] and the binaries'
/// own argument errors), 1 for a failure of the machine or of ours.
pub fn exit_on_error(f: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    // Past a file-size limit (RLIMIT_FSIZE) a write should fail with an error we report and
    // clean up after, not kill the process with SIGXFSZ and leave a temporary behind.
    #[cfg(unix)]
    // SAFETY: sets this process's disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match f() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // The binaries' own errors are about their arguments, except failed reads and
            // writes of files they handle themselves (reports).
            let code = if let Some(l) = e.downcast_ref::<minitron::Error>() {
                l.exit_code()
            } else if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::NotFound {
                    2
                } else {
                    1
                }
            } else {
                2
            };
            std::process::ExitCode::from(code)
        }
    }
}
