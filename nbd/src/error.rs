//! The error type exports return, and how it maps to NBD errnos.

use crate::proto;

/// An error from an [`Export`](crate::Export) or [`ExportRegistry`](crate::ExportRegistry),
/// or from a connection. Each variant carries a message saying what failed;
/// in the transmission phase it becomes an NBD errno (and, with structured
/// replies, the message reaches the client too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// No such export (`NBD_REP_ERR_UNKNOWN` during negotiation, `EIO` later).
    #[error("export not found: {0}")]
    NotFound(String),
    /// `EPERM`: e.g. a write to a read-only export.
    #[error("operation not permitted: {0}")]
    PermissionDenied(String),
    /// `EIO`: the backing store failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// `ENOMEM`.
    #[error("out of memory: {0}")]
    NoMemory(String),
    /// `EINVAL`: bad offset, length or flags.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// `ENOSPC`: no room, or a write past the end of the export.
    #[error("no space: {0}")]
    NoSpace(String),
    /// `EOVERFLOW`: a request too large to answer.
    #[error("too large: {0}")]
    Overflow(String),
    /// `ENOTSUP`: e.g. a FAST_ZERO write-zeroes the export cannot do fast.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// `ESHUTDOWN`: the server or the export is shutting down.
    #[error("shutting down: {0}")]
    Shutdown(String),
    /// The peer broke the protocol; the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl NbdError {
    /// The NBD errno sent for this error in the transmission phase.
    pub fn errno(&self) -> u32 {
        match self {
            NbdError::PermissionDenied(_) => proto::EPERM,
            NbdError::NotFound(_) | NbdError::Io(_) => proto::EIO,
            NbdError::NoMemory(_) => proto::ENOMEM,
            NbdError::Invalid(_) | NbdError::Protocol(_) => proto::EINVAL,
            NbdError::NoSpace(_) => proto::ENOSPC,
            NbdError::Overflow(_) => proto::EOVERFLOW,
            NbdError::NotSupported(_) => proto::ENOTSUP,
            NbdError::Shutdown(_) => proto::ESHUTDOWN,
        }
    }

    /// The option reply error sent when opening or listing fails during
    /// negotiation.
    pub fn rep_error(&self) -> u32 {
        match self {
            NbdError::NotFound(_) => proto::REP_ERR_UNKNOWN,
            NbdError::PermissionDenied(_) => proto::REP_ERR_POLICY,
            NbdError::Invalid(_) | NbdError::Protocol(_) => proto::REP_ERR_INVALID,
            NbdError::NotSupported(_) => proto::REP_ERR_UNSUP,
            NbdError::Shutdown(_) => proto::REP_ERR_SHUTDOWN,
            NbdError::Overflow(_) => proto::REP_ERR_TOO_BIG,
            // No generic "I/O error" exists among option replies; the
            // message says what really failed.
            NbdError::Io(_) | NbdError::NoMemory(_) | NbdError::NoSpace(_) => {
                proto::REP_ERR_UNKNOWN
            }
        }
    }
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        NbdError::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(NbdError::PermissionDenied("x".into()).errno(), 1);
        assert_eq!(NbdError::Io("x".into()).errno(), 5);
        assert_eq!(NbdError::NoMemory("x".into()).errno(), 12);
        assert_eq!(NbdError::Invalid("x".into()).errno(), 22);
        assert_eq!(NbdError::NoSpace("x".into()).errno(), 28);
        assert_eq!(NbdError::Overflow("x".into()).errno(), 75);
        assert_eq!(NbdError::NotSupported("x".into()).errno(), 95);
        assert_eq!(NbdError::Shutdown("x".into()).errno(), 108);
        assert_eq!(
            NbdError::NotFound("rbd/x".into()).rep_error(),
            proto::REP_ERR_UNKNOWN
        );
        assert_eq!(
            NbdError::Io("osd 3 timed out".into()).to_string(),
            "I/O error: osd 3 timed out"
        );
    }
}
