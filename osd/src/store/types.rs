//! Public value types of the store: object ids, stat results, configuration, scrub reports.

use std::cmp::Ordering;
use std::fmt;

use basalt_placement::{object_hash, PgId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Size of a data chunk. See the module docs for why 64 KiB.
pub const CHUNK_SIZE: u64 = 64 * 1024;

/// Longest object name accepted (bytes).
pub const MAX_NAME_LEN: usize = 4096;
/// Longest namespace accepted (bytes).
pub const MAX_NAMESPACE_LEN: usize = 256;
/// Longest xattr name (bytes).
pub const MAX_XATTR_NAME_LEN: usize = 256;
/// Largest xattr value. xattrs live in the onode, which is rewritten by every write to the object,
/// so big values belong in omap.
pub const MAX_XATTR_VALUE_LEN: usize = 64 * 1024;
/// Total xattr bytes (names + values) per object, for the same reason.
pub const MAX_XATTR_TOTAL: usize = 256 * 1024;
/// Longest omap key (bytes).
pub const MAX_OMAP_KEY_LEN: usize = 4096;
/// Largest omap value or header.
pub const MAX_OMAP_VALUE_LEN: usize = 4 * 1024 * 1024;
/// Largest PG log entry, PG info, dup result or meta value.
pub const MAX_PG_BLOB_LEN: usize = 16 * 1024 * 1024;
/// Longest reqid or meta key.
pub const MAX_REQID_LEN: usize = 512;
/// Ceph's `osd_max_object_size` default; the onode's chunk map grows with the object, so objects
/// are meant to be small (RBD uses 4 MiB).
pub const DEFAULT_MAX_OBJECT_SIZE: u64 = 128 * 1024 * 1024;

/// The snap id of the live ("head") object. Ceph's `CEPH_NOSNAP`: it sorts after every real snap
/// so an object's clones precede its head in listings.
pub const SNAP_HEAD: u64 = u64::MAX - 1;

/// Identity of a stored object: the PG it lives in, its namespace, name and snap. The placement
/// hash is computed from (namespace, name) with [`basalt_placement::object_hash`] so it can never
/// disagree with placement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    pg: PgId,
    hash: u32,
    namespace: String,
    name: String,
    snap: u64,
}

impl ObjectId {
    /// The head object `name` in the default (empty) namespace.
    pub fn new(pg: PgId, name: impl Into<String>) -> Self {
        Self::with_namespace(pg, "", name)
    }

    pub fn with_namespace(pg: PgId, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        let namespace = namespace.into();
        let name = name.into();
        ObjectId {
            pg,
            hash: object_hash(&namespace, &name),
            namespace,
            name,
            snap: SNAP_HEAD,
        }
    }

    /// The same object at snap `snap` (a clone).
    pub fn at_snap(mut self, snap: u64) -> Self {
        self.snap = snap;
        self
    }

    /// Rebuilds an id from a decoded key; the hash is recomputed and must match the stored one.
    pub(crate) fn from_parts(
        pg: PgId,
        hash: u32,
        namespace: String,
        name: String,
        snap: u64,
    ) -> Option<Self> {
        let id = ObjectId {
            pg,
            hash,
            namespace,
            name,
            snap,
        };
        (object_hash(&id.namespace, &id.name) == hash).then_some(id)
    }

    pub fn pg(&self) -> PgId {
        self.pg
    }
    pub fn hash(&self) -> u32 {
        self.hash
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn snap(&self) -> u64 {
        self.snap
    }
}

/// The store's iteration order: pool, PG seed, bit-reversed hash, namespace, name, snap — the
/// same order as the encoded keys (the key escaping preserves byte order).
impl Ord for ObjectId {
    fn cmp(&self, other: &Self) -> Ordering {
        (
            self.pg.pool,
            self.pg.seed,
            self.hash.reverse_bits(),
            self.namespace.as_bytes(),
            self.name.as_bytes(),
            self.snap,
        )
            .cmp(&(
                other.pg.pool,
                other.pg.seed,
                other.hash.reverse_bits(),
                other.namespace.as_bytes(),
                other.name.as_bytes(),
                other.snap,
            ))
    }
}

impl PartialOrd for ObjectId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.pg)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{}", self.name)?;
        if self.snap != SNAP_HEAD {
            write!(f, "@{:x}", self.snap)?;
        }
        Ok(())
    }
}

/// Object metadata the store keeps but never interprets: the PG layer's eversion (encoded as it
/// likes), the client-visible user version and the mtime. They are set explicitly by the PG layer
/// (the primary chooses them and ships them to replicas) so replicas stay byte-identical.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub version: Bytes,
    pub user_version: u64,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

/// What [`Store::stat`](crate::store::Store::stat) returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub meta: ObjectMeta,
    /// Data bytes actually stored (holes and trailing zeros of chunks are not stored).
    pub stored_bytes: u64,
}

/// Identity of a formatted store, written once by mkfs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub format_version: u32,
    pub fsid: String,
    pub osd_uuid: String,
}

impl Superblock {
    pub fn new(fsid: impl Into<String>, osd_uuid: impl Into<String>) -> Self {
        Superblock {
            format_version: crate::store::FORMAT_VERSION,
            fsid: fsid.into(),
            osd_uuid: osd_uuid.into(),
        }
    }
}

/// Tunables. `Default` is what the OSD uses.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Refuse transactions that would grow the stored bytes past this (see [`StoreStats`]).
    pub capacity_bytes: Option<u64>,
    pub max_object_size: u64,
    /// fdatasync the journal before a commit is durable. Only benchmarks and throwaway stores
    /// turn this off.
    pub sync: bool,
    /// RocksDB block cache shared by all column families.
    pub block_cache_bytes: usize,
    /// Size of the journal ring, fixed at mkfs (zero-filled then, so appending never changes
    /// file metadata). A commit may use at most half of it.
    pub journal_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            capacity_bytes: None,
            max_object_size: DEFAULT_MAX_OBJECT_SIZE,
            sync: true,
            block_cache_bytes: 64 * 1024 * 1024,
            journal_bytes: 128 * 1024 * 1024,
        }
    }
}

/// Capacity report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Logical bytes charged against the capacity: stored data chunk bytes plus xattr bytes. Omap,
    /// onodes and PG logs are not charged (they are small next to data; see the module docs).
    pub used_bytes: u64,
    pub capacity_bytes: Option<u64>,
    /// RocksDB's own estimate of its footprint (SST files + memtables); `None` for the
    /// in-memory store.
    pub db_bytes: Option<u64>,
    /// Bytes of the data file allocated on disk but free for new data (AUs not in use).
    pub data_free_bytes: u64,
}

/// One page of [`Store::list_objects`](crate::store::Store::list_objects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectListing {
    pub objects: Vec<ObjectId>,
    /// `Some(last)` when more objects may follow: pass it back as `start_after`.
    pub next: Option<ObjectId>,
}

/// One page of omap entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OmapListing {
    pub entries: Vec<(Bytes, Bytes)>,
    /// True when more entries follow the last one returned.
    pub more: bool,
}

/// Per-chunk result of a deep scrub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkScrub {
    pub index: u64,
    /// Digest of the chunk's stored per-block checksums (`None`: the onode lists the chunk but
    /// its extent record is missing).
    pub stored: Option<[u8; 32]>,
    /// The same digest over checksums recomputed from the blocks as read back now.
    pub computed: Option<[u8; 32]>,
}

impl ChunkScrub {
    pub fn is_ok(&self) -> bool {
        self.stored.is_some() && self.stored == self.computed
    }
}

/// Result of [`Store::deep_scrub_object`](crate::store::Store::deep_scrub_object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubReport {
    pub size: u64,
    pub chunks: Vec<ChunkScrub>,
    /// Digest of the object's data: size, then index and blake3 of the bytes of every stored
    /// chunk. Stored chunks are canonical (trailing zeros trimmed, all-zero chunks absent), so
    /// replicas holding the same bytes agree regardless of their write history.
    pub data_digest: [u8; 32],
    /// Digest of the omap header and entries.
    pub omap_digest: [u8; 32],
    /// Digest of the xattrs and object metadata.
    pub attrs_digest: [u8; 32],
}

impl ScrubReport {
    /// Indices of chunks whose stored digest is missing or differs from their data.
    pub fn bad_chunks(&self) -> Vec<u64> {
        self.chunks
            .iter()
            .filter(|c| !c.is_ok())
            .map(|c| c.index)
            .collect()
    }
    pub fn is_clean(&self) -> bool {
        self.chunks.iter().all(ChunkScrub::is_ok)
    }
}
