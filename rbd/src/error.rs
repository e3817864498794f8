//! The image layer's errors: what failed, in terms an operator (or the NBD
//! gateway mapping them to errno) can act on.

use crate::backend::BackendError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbdError {
    #[error("image {0} does not exist")]
    NotFound(String),
    #[error("image {0} already exists")]
    Exists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("image {0} is in use ({1}); close it there first")]
    Busy(String, String),
    /// This client was fenced by another one that took over the image. Never
    /// retried: the caller must stop writing (the data it could not write was
    /// never acknowledged).
    #[error("this client ({0}) is blocklisted: another client took over the image; reopen it from a new client")]
    Blocklisted(String),
    #[error("timed out waiting for the exclusive lock of image {0}")]
    LockTimeout(String),
    #[error("image {0} is closed")]
    Closed(String),
    /// A write to an image opened at a snapshot.
    #[error("read-only: {0}; snapshots cannot be written (roll the image back to one with `basalt rbd snap rollback`)")]
    ReadOnly(String),
    #[error("snapshot {0} is protected; unprotect it first (`basalt rbd snap unprotect`)")]
    SnapshotProtected(String),
    #[error("snapshot {0} has {1} clone(s); flatten or remove them first (`basalt rbd children` lists them)")]
    SnapshotHasChildren(String, usize),
    #[error("image {0} has {1} snapshot(s); remove them first (`basalt rbd snap purge`)")]
    HasSnapshots(String, usize),
    #[error("image {0} has corrupt metadata: {1}")]
    Corrupt(String, String),
    /// Reading the import source or writing the export target failed.
    #[error("local I/O: {0}")]
    LocalIo(String),
    #[error("object store: {0}")]
    Backend(BackendError),
}

impl From<BackendError> for RbdError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Blocklisted(who) => RbdError::Blocklisted(who),
            other => RbdError::Backend(other),
        }
    }
}

pub type Result<T, E = RbdError> = std::result::Result<T, E>;
