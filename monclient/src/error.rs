use basalt_proto::status::ErrorKind;
use tonic::Code;

/// Why a client operation failed. Callers branch on the variant; the text
/// says what failed and what to do.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    Exists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("timed out after {0:?}; the cluster may be overloaded or partitioned")]
    Timeout(std::time::Duration),
    /// The request may or may not have been applied (leadership changed mid-commit).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    #[error("this client is blocklisted: {0}")]
    Blocklisted(String),
    /// Authenticated, but the entity's caps do not allow the request; the text names the
    /// missing cap. Nothing was applied.
    #[error("{0}")]
    PermissionDenied(String),
    /// The cluster could not authenticate this client (no or wrong key, unknown entity, an
    /// expired or replayed ticket), or this client could not authenticate the cluster.
    /// Nothing was applied.
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    #[error("refused: {0}")]
    FailedPrecondition(String),
    /// A lock or resource is held by someone else.
    #[error("busy: {0}")]
    Busy(String),
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The pool is full (an OSD serving it is past the full ratio): the write was refused
    /// before it was applied anywhere. Block devices report it as ENOSPC.
    #[error("no space left: {0}")]
    PoolFull(String),
    /// The data is temporarily unservable (PG inactive, no primary); retrying later may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("cannot decode a reply: {0}")]
    Decode(String),
    #[error("bad client configuration: {0}")]
    Config(String),
    #[error("cluster error: {0}")]
    Internal(String),
}

impl ClientError {
    /// Whether another monitor (or a later try) may succeed where this failed.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, ClientError::NoQuorum(_))
    }
}

impl From<tonic::Status> for ClientError {
    /// Maps on the kind a basalt server put on the status (`basalt_proto::status`); a status
    /// without one was made by tonic itself, and is classified by its error source (a broken
    /// connection) and code. Never by the message text.
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        if let Some(kind) = ErrorKind::of(&s) {
            return match kind {
                ErrorKind::Unavailable => ClientError::NoQuorum(msg),
                ErrorKind::Ambiguous => ClientError::Ambiguous(msg),
                ErrorKind::NotFound => ClientError::NotFound(msg),
                ErrorKind::Exists => ClientError::Exists(msg),
                ErrorKind::InvalidArgument => ClientError::InvalidArgument(msg),
                ErrorKind::FailedPrecondition => ClientError::FailedPrecondition(msg),
                ErrorKind::PermissionDenied => ClientError::PermissionDenied(msg),
                ErrorKind::Blocklisted => ClientError::Blocklisted(msg),
                ErrorKind::Unauthenticated => ClientError::Unauthenticated(msg),
                ErrorKind::Timeout => ClientError::InvalidArgument(format!(
                    "the server waited for this client in vain: {msg}"
                )),
                ErrorKind::Internal => ClientError::Internal(msg),
            };
        }
        match s.code() {
            // The connection broke while the request was out (the peer died, or keepalive
            // gave up on a silent link): it may or may not have been applied.
            Code::Unknown if is_transport_failure(&s) => ClientError::Ambiguous(format!(
                "the connection broke mid-request ({msg}); it may or may not have been applied"
            )),
            // Not connected at all (tonic maps a failed connect to Unavailable, though its
            // source is a transport error too): not applied.
            Code::Unavailable => ClientError::NoQuorum(msg),
            Code::DeadlineExceeded | Code::Cancelled => {
                ClientError::NoQuorum(format!("monitor did not answer in time: {msg}"))
            }
            Code::Aborted => ClientError::Ambiguous(msg),
            // This client's own interceptor: no ticket yet.
            Code::Unauthenticated => ClientError::Unauthenticated(msg),
            // The request or reply was too large, or undecodable.
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted => {
                ClientError::InvalidArgument(msg)
            }
            _ => ClientError::Internal(msg),
        }
    }
}

/// Whether `status` stands for a transport failure: its error source chain holds tonic's
/// transport error or an I/O error (what tonic wraps a broken HTTP/2 connection in).
fn is_transport_failure(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

impl From<basalt_maps::MapError> for ClientError {
    fn from(e: basalt_maps::MapError) -> Self {
        match e {
            basalt_maps::MapError::Decode { .. } => ClientError::Decode(e.to_string()),
            basalt_maps::MapError::PoolNotFound(_) | basalt_maps::MapError::OsdNotFound(_) => {
                ClientError::NotFound(e.to_string())
            }
            _ => ClientError::InvalidArgument(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::status;

    #[test]
    fn a_servers_error_maps_on_its_kind_not_its_words() {
        // The words would have said otherwise: only the kind counts.
        let e = ClientError::from(status::blocklisted("client.a/1 may not"));
        assert!(matches!(e, ClientError::Blocklisted(_)), "{e:?}");
        let e = ClientError::from(status::permission_denied("blocklist: no such cap"));
        assert!(matches!(e, ClientError::PermissionDenied(_)), "{e:?}");
        let e = ClientError::from(status::ambiguous("leadership changed"));
        assert!(matches!(e, ClientError::Ambiguous(_)), "{e:?}");
        let e = ClientError::from(status::unavailable("transport error"));
        assert!(matches!(e, ClientError::NoQuorum(_)), "{e:?}");
        let e = ClientError::from(status::already_exists("pool rbd"));
        assert!(matches!(e, ClientError::Exists(_)), "{e:?}");
    }

    #[test]
    fn a_broken_connection_is_told_by_its_error_type() {
        // What tonic makes of a connection that broke mid-request: Unknown, the source kept.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let s = tonic::Status::from_error(Box::new(io));
        assert_eq!(s.code(), Code::Unknown);
        assert!(matches!(ClientError::from(s), ClientError::Ambiguous(_)));
        // The same code and words without such a source: not a transport failure.
        let s = tonic::Status::new(Code::Unknown, "transport error");
        assert!(matches!(ClientError::from(s), ClientError::Internal(_)));
    }
}
