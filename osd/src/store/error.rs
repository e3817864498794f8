//! The store's typed errors.

use basalt_placement::PgId;

/// Everything the store can refuse or report. A failed [`submit`](crate::store::Store::submit)
/// wrote nothing, whatever the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("object {object} does not exist")]
    NotFound { object: String },

    #[error("object {object} already exists (exclusive create)")]
    AlreadyExists { object: String },

    #[error("PG {pg} does not exist on this store")]
    NoSuchPg { pg: PgId },

    #[error("PG {pg} already exists on this store")]
    PgExists { pg: PgId },

    /// A stored 4 KiB block failed its crc32c check (or the chunk's extent record is missing
    /// although the onode lists it). The bytes are never returned; the PG layer repairs the
    /// object from another replica.
    #[error("corrupt data: object {object}, chunk {chunk} fails its checksum")]
    Corrupt { object: String, chunk: u64 },

    /// Metadata (an onode, a key, a counter) could not be decoded, or RocksDB itself reported
    /// corruption.
    #[error("corrupt metadata ({what}): {detail}")]
    CorruptMetadata { what: String, detail: String },

    /// The configured capacity would be exceeded, or the disk itself is full (ENOSPC: the data
    /// area cannot grow, or RocksDB cannot write a checkpoint). The store stays readable.
    /// Removals and other shrinking transactions are still accepted while only growth is
    /// refused; after a failed checkpoint the store refuses every write until it is reopened
    /// with free disk space. `reason` says which, and what to do.
    #[error("store full: {reason}")]
    Full { reason: String },

    /// Bad input from the caller: oversize names/keys/values, offset overflow, bad ids.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("object {object} would reach {size} bytes, above the {max}-byte object size limit")]
    TooLarge { object: String, size: u64, max: u64 },

    #[error("no store at {path}: run mkfs first")]
    NotFormatted { path: String },

    #[error("store at {path} is already formatted")]
    AlreadyFormatted { path: String },

    #[error("store format version {found} is not supported (this build reads {supported})")]
    UnsupportedFormat { found: u32, supported: u32 },

    /// Any other failure from RocksDB or the OS.
    #[error("store I/O error: {0}")]
    Io(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// An OS error from `what`: ENOSPC is `Full` (callers branch on it), anything else `Io`.
    pub(crate) fn from_io(what: &str, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            StoreError::Full {
                reason: format!("the disk is full ({what}: {e}); free disk space"),
            }
        } else {
            StoreError::Io(format!("{what}: {e}"))
        }
    }

    pub(crate) fn corrupt_meta(what: impl Into<String>, detail: impl ToString) -> Self {
        StoreError::CorruptMetadata {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        let msg = e.to_string();
        // RocksDB reports ENOSPC as an IOError whose text carries the OS message ("No space left
        // on device") or its own NoSpace subcode; both must surface as Full so callers can tell
        // "disk full" from "disk broken".
        let lower = msg.to_ascii_lowercase();
        if lower.contains("no space") || lower.contains("nospace") || lower.contains("enospc") {
            return StoreError::Full {
                reason: format!(
                    "the disk is full ({msg}); free disk space, then restart the OSD \
                     (writes stay refused until the store is reopened)"
                ),
            };
        }
        match e.kind() {
            rocksdb::ErrorKind::Corruption => StoreError::corrupt_meta("rocksdb", msg),
            _ => StoreError::Io(msg),
        }
    }
}
