//! The library's error type. Every variant carries enough context (file, tensor or field, what was
//! expected and what was found) for a user to fix the input without reading our source.

use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    // The io::Error is shown in the message rather than chained, so it is printed once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file whose content does not follow its format.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A config.json field that is missing or has an unusable value.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: tensor `{tensor}` is missing (expected {expected})")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        expected: String,
    },
    /// A tensor with the wrong shape or dtype.
    #[error("{path}: tensor `{tensor}`: expected {expected}, found {found}")]
    TensorMismatch {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },
    /// A task file (HellaSwag, multiple choice, Winogrande) line that does not follow its layout.
    #[error("{path}:{line}: {field}: {msg}")]
    TaskFile {
        path: PathBuf,
        /// 1-based; 0 for the file as a whole.
        line: usize,
        field: String,
        msg: String,
    },
    /// A feature of the input that we do not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bad argument from the caller (CLI flag or API parameter).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The tokenizer library refused a file or an input.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A tensor operation failed inside candle.
    #[error("tensor operation: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// Our own bug: a state the code should never reach, whatever the input.
    #[error("internal error (a bug in minitron; please report it with the command line): {0}")]
    Internal(String),
}

/// A candle error's message without the backtrace candle attaches to some errors (a user's
/// error must never print one).
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The exit status a command-line tool should end with: 2 when the input or the arguments
    /// are at fault (a malformed or missing file, an unusable config, an unsupported feature, a
    /// bad option), 1 when the machine or we are (a failed write, a full disk, a tensor
    /// operation, a bug of ours).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => 2,
            Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => 1,
            Error::Format { .. }
            | Error::Config { .. }
            | Error::MissingTensor { .. }
            | Error::TensorMismatch { .. }
            | Error::Unsupported(_)
            | Error::Invalid(_)
            | Error::TaskFile { .. }
            | Error::Tokenizer { .. } => 2,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Whatever RUST_BACKTRACE says, a candle error reaches the user as its message alone.
    #[test]
    fn candle_errors_print_without_their_backtrace() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shape mismatch".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(e.to_string().lines().count() > 1, "the backtrace is there");
        let shown = super::Error::from(e).to_string();
        assert_eq!(shown, "tensor operation: shape mismatch");
    }

    /// Our bugs exit 1 (the machine's or ours), bad input 2.
    #[test]
    fn internal_errors_exit_1_and_say_they_are_ours() {
        let e = super::Error::Internal("a state nothing should reach".into());
        assert_eq!(e.exit_code(), 1);
        assert!(e
            .to_string()
            .starts_with("internal error (a bug in minitron"));
        assert_eq!(super::Error::Invalid("bad flag".into()).exit_code(), 2);
    }
}
