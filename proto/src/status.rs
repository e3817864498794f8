//! What kind of failure a basalt server's gRPC error is, said in a typed form: every status a
//! monitor or OSD returns carries its [`ErrorKind`] in the `x-basalt-error` metadata key, and
//! clients branch on that ([`ErrorKind::of`]), never on the message text (which is for
//! people). The constructors below mirror tonic's (`status::unavailable(msg)` for
//! `Status::unavailable(msg)`) and add the kind.
//!
//! A status without the key was not made by a basalt server: tonic's own (the connection
//! broke, a message too large), which a client classifies by its code and its error source.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The metadata key of a status' [`ErrorKind`].
pub const ERROR_KIND_KEY: &str = "x-basalt-error";

/// What went wrong, as far as the caller's next step is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Definitely not applied, and another server or a later try may serve it (no quorum,
    /// not the leader, shutting down, not booted yet).
    Unavailable,
    /// May or may not have been applied (leadership changed, or the wait for the commit
    /// ended, while the change was being committed).
    Ambiguous,
    NotFound,
    Exists,
    /// The request itself is wrong; resending it cannot succeed.
    InvalidArgument,
    /// Refused because of the cluster's state (an OSD still up, still needed); nothing was
    /// applied.
    FailedPrecondition,
    /// Authenticated, but the caps do not allow it; nothing was applied.
    PermissionDenied,
    /// The client (instance) is blocklisted; nothing was applied.
    Blocklisted,
    /// Who the caller is could not be established (no, wrong or expired ticket).
    Unauthenticated,
    /// The caller did not send what the server waited for in time.
    Timeout,
    /// The server failed (its store, its randomness, an encoding).
    Internal,
}

impl ErrorKind {
    const ALL: [ErrorKind; 11] = [
        ErrorKind::Unavailable,
        ErrorKind::Ambiguous,
        ErrorKind::NotFound,
        ErrorKind::Exists,
        ErrorKind::InvalidArgument,
        ErrorKind::FailedPrecondition,
        ErrorKind::PermissionDenied,
        ErrorKind::Blocklisted,
        ErrorKind::Unauthenticated,
        ErrorKind::Timeout,
        ErrorKind::Internal,
    ];

    /// The kind's wire name (the metadata value).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Ambiguous => "ambiguous",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Exists => "exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::FailedPrecondition => "failed-precondition",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::Blocklisted => "blocklisted",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }

    /// The gRPC code a status of this kind has (for gRPC clients that are not basalt's).
    pub fn code(self) -> Code {
        match self {
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Ambiguous => Code::Aborted,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::Exists => Code::AlreadyExists,
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::PermissionDenied | ErrorKind::Blocklisted => Code::PermissionDenied,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Timeout => Code::DeadlineExceeded,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// A status of this kind with `message` (what failed and what to do).
    pub fn status(self, message: impl Into<String>) -> Status {
        let mut s = Status::new(self.code(), message);
        s.metadata_mut()
            .insert(ERROR_KIND_KEY, MetadataValue::from_static(self.name()));
        s
    }

    /// The kind a basalt server gave `status`; `None` for a status it did not make (or a
    /// kind this build does not know).
    pub fn of(status: &Status) -> Option<ErrorKind> {
        let value = status.metadata().get(ERROR_KIND_KEY)?.to_str().ok()?;
        Self::ALL.into_iter().find(|k| k.name() == value)
    }
}

pub fn unavailable(message: impl Into<String>) -> Status {
    ErrorKind::Unavailable.status(message)
}
pub fn ambiguous(message: impl Into<String>) -> Status {
    ErrorKind::Ambiguous.status(message)
}
pub fn not_found(message: impl Into<String>) -> Status {
    ErrorKind::NotFound.status(message)
}
pub fn already_exists(message: impl Into<String>) -> Status {
    ErrorKind::Exists.status(message)
}
pub fn invalid_argument(message: impl Into<String>) -> Status {
    ErrorKind::InvalidArgument.status(message)
}
pub fn failed_precondition(message: impl Into<String>) -> Status {
    ErrorKind::FailedPrecondition.status(message)
}
pub fn permission_denied(message: impl Into<String>) -> Status {
    ErrorKind::PermissionDenied.status(message)
}
pub fn blocklisted(message: impl Into<String>) -> Status {
    ErrorKind::Blocklisted.status(message)
}
pub fn unauthenticated(message: impl Into<String>) -> Status {
    ErrorKind::Unauthenticated.status(message)
}
pub fn deadline_exceeded(message: impl Into<String>) -> Status {
    ErrorKind::Timeout.status(message)
}
pub fn internal(message: impl Into<String>) -> Status {
    ErrorKind::Internal.status(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_trip_through_the_status_headers() {
        for kind in ErrorKind::ALL {
            let s = kind.status("what failed and what to do");
            assert_eq!(s.code(), kind.code());
            // What a client sees: the status rebuilt from the response's headers.
            let headers = s.into_http::<()>().headers().clone();
            let back = Status::from_header_map(&headers).expect("a status");
            assert_eq!(ErrorKind::of(&back), Some(kind), "{kind:?}");
            assert_eq!(back.message(), "what failed and what to do");
        }
    }

    #[test]
    fn a_status_basalt_did_not_make_has_no_kind() {
        assert_eq!(ErrorKind::of(&Status::unavailable("tonic's own")), None);
        let mut s = Status::internal("odd");
        s.metadata_mut().insert(
            ERROR_KIND_KEY,
            MetadataValue::from_static("from-the-future"),
        );
        assert_eq!(ErrorKind::of(&s), None);
    }
}
