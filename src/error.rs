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
    /// A broken internal invariant: a bug in trainer, not in the input.
    #[error("internal error: {0}")]
    Internal(String),
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

    /// Exit code of the `trainer` binary for this error: 2 for bad input, 1 for bugs.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Internal(_) => 1,
            _ => 2,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
