//! One error type for the library. Every variant says which file (and where it applies, which
//! tensor) the problem is in, so the CLI can print it as it is.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content is not what its format says (corrupt, truncated, lying header).
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    /// A problem with one tensor of a file (wrong dtype, shape, missing piece).
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        file: String,
        tensor: String,
        msg: String,
    },
    /// A bad argument or combination of arguments, not tied to a file.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(file: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Format {
            file: file.to_string(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        file: impl std::fmt::Display,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            file: file.to_string(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}
