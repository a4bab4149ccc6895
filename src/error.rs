//! The one error type every user-facing path returns.
//!
//! Each variant is something the user can fix (exit code 2) except `Internal`, which is a bug
//! in trainer (exit code 1). Messages name the file, key or tensor and say what would be valid.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A recipe that does not parse, has unknown or mistyped keys, or breaks a cross-field rule.
    #[error("{0}")]
    Recipe(#[from] crate::recipe::RecipeError),
    /// A model config or checkpoint that does not fit the architecture.
    #[error("{0}")]
    Model(String),
    /// A file that is missing or unreadable.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// Training data that cannot be used: a bad row (`FILE:LINE: ...`), a missing self-cognition
    /// name, an empty training set.
    #[error("{0}")]
    Data(String),
    /// A request the build or the machine cannot serve (no CUDA in this binary, say).
    #[error("{0}")]
    Unsupported(String),
    /// A parallel launch or collective that failed: a port in use, an unreachable master, ranks
    /// launched with different recipes, a rank that died or hangs. The message names the rank.
    #[error("{0}")]
    Parallel(String),
    /// A broken internal invariant: a bug in trainer, not in the input.
    #[error("internal error: {0}")]
    Internal(String),
    /// Stopped by a signal (Ctrl-C, SIGTERM) after saving what there was to save; exits
    /// 128 + the signal's number, as shells report a process ended by it.
    #[error("{message}")]
    Interrupted { signal: i32, message: String },
}

impl Error {
    pub fn model(message: impl Into<String>) -> Self {
        Error::Model(message.into())
    }

    pub fn data(message: impl Into<String>) -> Self {
        Error::Data(message.into())
    }

    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), message: message.to_string() }
    }

    /// Exit code of the `trainer` binary for this error: 2 for bad input, 1 for bugs, 128 +
    /// the signal for an interrupted run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Internal(_) => 1,
            Error::Interrupted { signal, .. } => signal_exit_code(*signal),
            _ => 2,
        }
    }
}

/// The exit code of a process ended by `signal`, as shells report it (130 for SIGINT).
pub fn signal_exit_code(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
