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
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => ClientError::NotFound(msg),
            Code::AlreadyExists => ClientError::Exists(msg),
            Code::InvalidArgument | Code::OutOfRange => ClientError::InvalidArgument(msg),
            Code::Unavailable => ClientError::NoQuorum(msg),
            Code::DeadlineExceeded | Code::Cancelled => {
                ClientError::NoQuorum(format!("monitor did not answer in time: {msg}"))
            }
            Code::Aborted => ClientError::Ambiguous(msg),
            // The connection broke while the request was out (the peer died, or keepalive
            // gave up on a silent link): it may or may not have been applied.
            Code::Unknown if msg.contains("transport error") => ClientError::Ambiguous(format!(
                "the connection broke mid-request ({msg}); it may or may not have been applied"
            )),
            Code::PermissionDenied if msg.contains("blocklist") => ClientError::Blocklisted(msg),
            Code::PermissionDenied => ClientError::PermissionDenied(msg),
            Code::Unauthenticated => ClientError::Unauthenticated(msg),
            Code::FailedPrecondition => ClientError::FailedPrecondition(msg),
            _ => ClientError::Internal(msg),
        }
    }
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
