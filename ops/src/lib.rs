//! # basalt-ops: what a client can ask of an object, and what it gets back
//!
//! Owns the vocabulary the client library and the OSD share: the ops of a compound object
//! request ([`ObjOp`]), their outputs ([`OpOutput`]), the typed refusal ([`OpError`]), request
//! ids that make resends idempotent ([`ReqId`]), the PG log entry ([`LogEntry`]) and versions
//! ([`Eversion`]). They travel inside the gRPC messages of `basalt-proto` as postcard bytes,
//! the same way the cluster maps do: one Rust definition instead of a second, hand-kept
//! protobuf copy of every enum.
//!
//! Pure data and validation; no IO.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod shared;
pub use shared::decode_shared;

/// Largest payload of one op (a write or a read): big enough for a 64 MiB object in one
/// `write_full`, small enough that a malformed length cannot make an OSD allocate gigabytes.
pub const MAX_OP_DATA: u64 = 96 * 1024 * 1024;
/// Largest encoded request/reply the OSD's gRPC server and the client accept.
pub const MAX_MESSAGE_BYTES: usize = 160 * 1024 * 1024;
/// Most ops in one compound request.
pub const MAX_OPS_PER_REQUEST: usize = 64;
/// The lock name RBD's exclusive lock uses; any name works for the OSD.
pub const MAX_LOCK_NAME: usize = 256;

/// Identity of one client request across resends: `(client, incarnation, tid)`. A client
/// resends an op with the same id after a map change; the primary finds it in the PG log (or
/// its dups) and returns the recorded result instead of applying the op twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReqId {
    /// The client's entity name, e.g. `client.7f3a…`.
    pub client: String,
    /// Changes every time the client process starts: a restarted client never collides with
    /// its previous life's tids. `client/incarnation` is the client instance the blocklist
    /// fences and locks record.
    pub incarnation: u64,
    pub tid: u64,
}

impl ReqId {
    /// The key under which the store records the request's result.
    pub fn key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.client.len() + 17);
        k.extend_from_slice(self.client.as_bytes());
        k.push(0);
        k.extend_from_slice(&self.incarnation.to_be_bytes());
        k.extend_from_slice(&self.tid.to_be_bytes());
        k
    }
}

impl fmt::Display for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.client, self.incarnation, self.tid)
    }
}

/// A PG's version of an object or log entry: the epoch of the interval whose primary wrote it,
/// then a sequence number that grows across the PG's whole history (a new primary continues
/// from the authoritative log's head). Ordered by (epoch, seq), as Ceph's eversion_t.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Eversion {
    pub epoch: u64,
    pub seq: u64,
}

impl Eversion {
    pub const ZERO: Eversion = Eversion { epoch: 0, seq: 0 };

    pub fn encode(&self) -> Bytes {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        Bytes::from(b)
    }

    /// Decodes [`Eversion::encode`]'s output; an empty value (an object written before versions
    /// were recorded) is version zero.
    pub fn decode(b: &[u8]) -> Option<Eversion> {
        match b.len() {
            0 => Some(Eversion::ZERO),
            16 => {
                let mut e = [0u8; 8];
                let mut s = [0u8; 8];
                e.copy_from_slice(&b[..8]);
                s.copy_from_slice(&b[8..]);
                Some(Eversion {
                    epoch: u64::from_be_bytes(e),
                    seq: u64::from_be_bytes(s),
                })
            }
            _ => None,
        }
    }
}

impl fmt::Display for Eversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}'{}", self.epoch, self.seq)
    }
}

/// Lock kinds, as cls_lock's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Exclusive,
    Shared,
}

/// One holder of an advisory lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locker {
    pub client: String,
    pub cookie: String,
    pub description: String,
}

/// The state of one named lock on an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    pub kind: Option<LockKind>,
    /// Shared lockers must agree on the tag (cls_lock semantics).
    pub tag: String,
    pub lockers: Vec<Locker>,
}

/// A client watching an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherInfo {
    pub client: String,
    pub cookie: u64,
}

/// One step of a compound request on one object. Read steps see the object as it was before
/// the request; a request with any mutating step is a write, applied atomically (all steps or
/// none) on every acting replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjOp {
    // ---- guards (fail the whole request) ----
    AssertExists,
    /// Fails with `CmpFailed` unless the xattr holds exactly `value` (`None`: is absent).
    CmpXattr {
        name: String,
        value: Option<Bytes>,
    },
    // ---- reads ----
    Read {
        offset: u64,
        len: u64,
    },
    Stat,
    GetXattr {
        name: String,
    },
    GetXattrs,
    OmapGetHeader,
    OmapGetVals {
        start_after: Option<Bytes>,
        max: u32,
    },
    OmapGetValsByKeys {
        keys: Vec<Bytes>,
    },
    LockInfo {
        name: String,
    },
    ListWatchers,
    /// The object's snapshot record: which clones exist and what each preserves.
    ListSnaps,
    // ---- writes ----
    Create {
        exclusive: bool,
    },
    Write {
        offset: u64,
        #[serde(with = "crate::shared::payload")]
        data: Bytes,
    },
    WriteFull {
        #[serde(with = "crate::shared::payload")]
        data: Bytes,
    },
    Append {
        #[serde(with = "crate::shared::payload")]
        data: Bytes,
    },
    Truncate {
        size: u64,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Remove,
    SetXattr {
        name: String,
        value: Bytes,
    },
    RmXattr {
        name: String,
    },
    OmapSet {
        entries: Vec<(Bytes, Bytes)>,
    },
    OmapRmKeys {
        keys: Vec<Bytes>,
    },
    OmapClear,
    OmapSetHeader {
        header: Bytes,
    },
    Lock {
        name: String,
        kind: LockKind,
        cookie: String,
        tag: String,
        description: String,
    },
    Unlock {
        name: String,
        cookie: String,
    },
    BreakLock {
        name: String,
        client: String,
        cookie: String,
    },
    /// Makes the head what the object was at snapshot `snap` (removed if it did not exist
    /// then), preserving the current head for newer snapshots first (librados' rollback).
    Rollback {
        snap: u64,
    },
    /// Drops removed snapshots from the object's clones and deletes clones no snapshot needs
    /// any more. Sent by a PG's primary (its snap trimmer); every id must be removed in the
    /// pool's map, or the OSD refuses it.
    TrimSnaps {
        removed: Vec<u64>,
    },
}

impl ObjOp {
    /// Whether the op changes the object (and so needs a version, a log entry and replication).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            ObjOp::Create { .. }
                | ObjOp::Write { .. }
                | ObjOp::WriteFull { .. }
                | ObjOp::Append { .. }
                | ObjOp::Truncate { .. }
                | ObjOp::Zero { .. }
                | ObjOp::Remove
                | ObjOp::SetXattr { .. }
                | ObjOp::RmXattr { .. }
                | ObjOp::OmapSet { .. }
                | ObjOp::OmapRmKeys { .. }
                | ObjOp::OmapClear
                | ObjOp::OmapSetHeader { .. }
                | ObjOp::Lock { .. }
                | ObjOp::Unlock { .. }
                | ObjOp::BreakLock { .. }
                | ObjOp::Rollback { .. }
                | ObjOp::TrimSnaps { .. }
        )
    }

    /// Whether the op may make the store hold more: new data, a new object, new metadata.
    /// The others (removes, truncates, zeroing, removing keys, xattrs or a lock) can only
    /// free space or keep it, so a full pool still runs them for anyone: a gateway must be
    /// able to give its image lock back when the pool is full.
    pub fn may_use_space(&self) -> bool {
        matches!(
            self,
            ObjOp::Create { .. }
                | ObjOp::Write { .. }
                | ObjOp::WriteFull { .. }
                | ObjOp::Append { .. }
                | ObjOp::SetXattr { .. }
                | ObjOp::OmapSet { .. }
                | ObjOp::OmapSetHeader { .. }
                | ObjOp::Lock { .. }
                | ObjOp::Rollback { .. }
        )
    }

    /// Whether the op stores object data bytes (what a full pool refuses even to a client
    /// that is freeing space).
    pub fn writes_data(&self) -> bool {
        match self {
            ObjOp::Write { data, .. } | ObjOp::WriteFull { data } | ObjOp::Append { data } => {
                !data.is_empty()
            }
            _ => false,
        }
    }

    /// Short name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ObjOp::AssertExists => "assert_exists",
            ObjOp::CmpXattr { .. } => "cmpxattr",
            ObjOp::Read { .. } => "read",
            ObjOp::Stat => "stat",
            ObjOp::GetXattr { .. } => "getxattr",
            ObjOp::GetXattrs => "getxattrs",
            ObjOp::OmapGetHeader => "omap_get_header",
            ObjOp::OmapGetVals { .. } => "omap_get_vals",
            ObjOp::OmapGetValsByKeys { .. } => "omap_get_vals_by_keys",
            ObjOp::LockInfo { .. } => "lock_info",
            ObjOp::ListWatchers => "list_watchers",
            ObjOp::Create { .. } => "create",
            ObjOp::Write { .. } => "write",
            ObjOp::WriteFull { .. } => "write_full",
            ObjOp::Append { .. } => "append",
            ObjOp::Truncate { .. } => "truncate",
            ObjOp::Zero { .. } => "zero",
            ObjOp::Remove => "remove",
            ObjOp::SetXattr { .. } => "setxattr",
            ObjOp::RmXattr { .. } => "rmxattr",
            ObjOp::OmapSet { .. } => "omap_set",
            ObjOp::OmapRmKeys { .. } => "omap_rm_keys",
            ObjOp::OmapClear => "omap_clear",
            ObjOp::OmapSetHeader { .. } => "omap_set_header",
            ObjOp::Lock { .. } => "lock",
            ObjOp::Unlock { .. } => "unlock",
            ObjOp::BreakLock { .. } => "break_lock",
            ObjOp::ListSnaps => "list_snaps",
            ObjOp::Rollback { .. } => "rollback",
            ObjOp::TrimSnaps { .. } => "trim_snaps",
        }
    }

    /// Checks sizes a malformed or hostile request could abuse before anything is allocated
    /// for it or any state is touched.
    pub fn validate(&self) -> Result<(), OpError> {
        let too_big = |what: &str, n: u64| {
            if n > MAX_OP_DATA {
                Err(OpError::InvalidArgument(format!(
                    "{what} of {n} bytes exceeds the {MAX_OP_DATA}-byte limit per op; split it"
                )))
            } else {
                Ok(())
            }
        };
        match self {
            ObjOp::Read { len, .. } => too_big("read", *len),
            ObjOp::Write { offset, data } => {
                offset.checked_add(data.len() as u64).ok_or_else(|| {
                    OpError::InvalidArgument("write offset + length overflows".into())
                })?;
                too_big("write", data.len() as u64)
            }
            ObjOp::WriteFull { data } | ObjOp::Append { data } => {
                too_big("write", data.len() as u64)
            }
            ObjOp::Zero { offset, len } => offset
                .checked_add(*len)
                .map(|_| ())
                .ok_or_else(|| OpError::InvalidArgument("zero offset + length overflows".into())),
            ObjOp::Lock { name, cookie, .. } => {
                if name.is_empty() || name.len() > MAX_LOCK_NAME || cookie.len() > MAX_LOCK_NAME {
                    Err(OpError::InvalidArgument(format!(
                        "lock name must be 1..={MAX_LOCK_NAME} bytes and the cookie at most that"
                    )))
                } else {
                    Ok(())
                }
            }
            ObjOp::Rollback { snap } if *snap == 0 || *snap >= SNAP_ID_LIMIT => Err(
                OpError::InvalidArgument(format!("rollback to snapshot id {snap}: no such id")),
            ),
            _ => Ok(()),
        }
    }

    /// Whether the op may run on a snapshot (which is read-only).
    pub fn reads_snapshot(&self) -> bool {
        matches!(
            self,
            ObjOp::AssertExists
                | ObjOp::Read { .. }
                | ObjOp::Stat
                | ObjOp::GetXattr { .. }
                | ObjOp::GetXattrs
                | ObjOp::ListSnaps
        )
    }
}

/// Snapshot ids are below this; the store keeps the ids above for the head.
pub const SNAP_ID_LIMIT: u64 = u64::MAX - 2;

/// The snapshot context a write carries (librados' `SnapContext`): the newest snapshot id the
/// writer knows of, and the snapshots that exist of what it writes, newest first. An object
/// last written under an older `seq` is preserved for the snapshots between (copy-on-write)
/// before this write changes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapContext {
    pub seq: u64,
    pub snaps: Vec<u64>,
}

impl SnapContext {
    /// Refuses a context that would misplace clones: snaps must be strictly descending, each
    /// in `1..=seq`.
    pub fn validate(&self) -> Result<(), OpError> {
        if self.seq >= SNAP_ID_LIMIT {
            return Err(OpError::InvalidArgument(format!(
                "snap context seq {} is out of range",
                self.seq
            )));
        }
        let mut above = self.seq + 1;
        for &s in &self.snaps {
            if s == 0 || s >= above {
                return Err(OpError::InvalidArgument(format!(
                    "snap context {self:?}: snaps must be descending ids in 1..=seq"
                )));
            }
            above = s;
        }
        Ok(())
    }
}

/// One clone of an object: the object as it was for the snapshots `snaps` (taken while the
/// head was unchanged), ids in `covers_from..=id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSummary {
    pub id: u64,
    pub covers_from: u64,
    pub snaps: Vec<u64>,
    pub size: u64,
    /// Byte ranges `(offset, len)` where this clone may differ from the next newer clone (or
    /// the head): everything else reads the same there. What an incremental diff between
    /// two snapshots has to look at.
    pub differs: Vec<(u64, u64)>,
}

/// [`ObjOp::ListSnaps`]' answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapListing {
    /// The newest snap context `seq` the head was written under.
    pub seq: u64,
    /// Whether the head exists (a deleted object whose clones remain has no head).
    pub head_exists: bool,
    /// Oldest first.
    pub clones: Vec<CloneSummary>,
}

/// What one step returned, in request order (writes return `None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOutput {
    None,
    Data(#[serde(with = "crate::shared::payload")] Bytes),
    Stat {
        size: u64,
        mtime_ns: u64,
        version: Eversion,
    },
    Xattr(Option<Bytes>),
    Xattrs(BTreeMap<String, Bytes>),
    OmapHeader(Option<Bytes>),
    Omap {
        entries: Vec<(Bytes, Bytes)>,
        more: bool,
    },
    Lock(LockState),
    Watchers(Vec<WatcherInfo>),
    Snaps(SnapListing),
}

/// The reply to a successful request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    /// The version the request wrote (writes), or the object's version (reads).
    pub version: Eversion,
    pub outputs: Vec<OpOutput>,
}

/// Why an OSD refused or failed a request. Carried inside a successful gRPC reply so the
/// transport's own failures (connection refused, timeouts) stay distinguishable from answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    #[error("object not found")]
    NotFound,
    #[error("object already exists")]
    Exists,
    #[error("busy: {0}")]
    Busy(String),
    #[error("comparison failed: {0}")]
    CmpFailed(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no space: {0}")]
    NoSpace(String),
    /// The object's pool is full (an OSD serving it is past the full ratio): the primary
    /// refused the request before versioning or replicating anything, so it did not happen.
    /// Deletes, truncates and requests sent with `full_try` that store no new data still run.
    #[error(
        "pool '{pool}' is full ({osds} past the full ratio); the write was not applied. Free \
         space (`basalt rbd rm`, `basalt rbd resize --allow-shrink`, `basalt obj rm`), add \
         OSDs, or raise `basalt osd set-full-ratio`"
    )]
    PoolFull { pool: String, osds: String },
    #[error("client {0} is blocklisted; it may no longer change or read anything")]
    Blocklisted(String),
    #[error("pool {0} does not exist")]
    NoSuchPool(u32),
    /// The OSD is not this PG's acting primary in its map (epoch given): refresh the map and
    /// resend.
    #[error("not the primary of PG {pg} at epoch {epoch}")]
    NotPrimary { pg: String, epoch: u64 },
    /// The PG's acting set changed while the request was queued or in flight: resend (with the
    /// same request id) once the client's map is at least `epoch`.
    #[error("PG {pg} changed interval at epoch {epoch}; resend")]
    IntervalChanged { pg: String, epoch: u64 },
    /// The PG cannot serve: fewer acting replicas than the pool's min_size, or peering is stuck.
    #[error("PG {pg} is inactive ({state}); waited {waited_ms} ms")]
    Inactive {
        pg: String,
        state: String,
        waited_ms: u64,
    },
    #[error("stored data is corrupt on every reachable replica: {0}")]
    Corrupt(String),
    #[error("OSD error: {0}")]
    Io(String),
    /// The request needs OSDMap epoch `want` and this OSD has only `have` after waiting for
    /// it: resend (same request id) shortly; the OSD is catching up with the monitors.
    #[error(
        "this OSD has OSDMap epoch {have}, the request needs {want}; resend once it catches up"
    )]
    MapBehind { have: u64, want: u64 },
    /// The client's caps do not allow the request (the text names the missing cap, e.g.
    /// `osd 'allow w pool=rbd'`); nothing was applied.
    #[error("{0}")]
    PermissionDenied(String),
    /// An OSD-to-OSD request this OSD cannot take as it is: no or another message version,
    /// or a sub-op whose envelope and transaction disagree. Nothing was applied.
    #[error("refused a peer message: {0}")]
    BadPeerMessage(PeerMessageError),
}

/// Why an OSD refused another OSD's peering or replication request before acting on it
/// ([`OpError::BadPeerMessage`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerMessageError {
    /// The request has no envelope: the sender runs a basalt from before peer messages were
    /// versioned.
    #[error(
        "the request carries no peer envelope (message version 0, this OSD speaks {want}); \
         run the same basalt release on every OSD"
    )]
    NoEnvelope { want: u32 },
    /// The sender speaks another version of the peer messages.
    #[error(
        "the request is peer message version {have}, this OSD speaks {want}; run the same \
         basalt release on every OSD"
    )]
    Version { have: u32, want: u32 },
    /// A sub-op lacks a field every sub-op carries (its version or request id).
    #[error("the sub-op has no {0}")]
    MissingField(String),
    /// The sub-op's transaction holds no log entry for its PG, or more than one.
    #[error("the sub-op's transaction holds {count} log entries for PG {pg}; a write holds one")]
    LogEntries { pg: String, count: usize },
    /// The sub-op's envelope and its transaction's log entry disagree about `field`.
    #[error("the sub-op says {field} {envelope}, its log entry says {logged}")]
    LogEntryMismatch {
        field: String,
        envelope: String,
        logged: String,
    },
}

impl OpError {
    /// Whether the client should refresh its map and resend (same request id).
    pub fn is_resend(&self) -> bool {
        matches!(
            self,
            OpError::NotPrimary { .. } | OpError::IntervalChanged { .. }
        )
    }
}

/// What a PG log entry records about a write: enough to deduplicate a resend and to know which
/// object a version touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub version: Eversion,
    pub namespace: String,
    pub object: String,
    /// True when the write removed the object.
    pub removed: bool,
    pub reqid: ReqId,
    /// The encoded [`OpResult`] returned to the client (replayed for a resend).
    pub result: Bytes,
}

/// Encodes a value for the wire (postcard). Encoding our own types cannot fail short of
/// memory exhaustion, which aborts anyway.
pub fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(postcard::to_allocvec(v).unwrap_or_default())
}

/// Decodes bytes received from the network; `what` names them in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, OpError> {
    postcard::from_bytes(b)
        .map_err(|e| OpError::InvalidArgument(format!("cannot decode {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eversion_round_trips_and_orders() {
        let a = Eversion { epoch: 3, seq: 10 };
        let b = Eversion { epoch: 4, seq: 2 };
        assert!(a < b);
        assert_eq!(Eversion::decode(&a.encode()), Some(a));
        assert_eq!(Eversion::decode(&[]), Some(Eversion::ZERO));
        assert_eq!(Eversion::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn oversized_ops_are_refused_before_allocation() {
        assert!(ObjOp::Read {
            offset: 0,
            len: u64::MAX
        }
        .validate()
        .is_err());
        assert!(ObjOp::Zero {
            offset: u64::MAX,
            len: 2
        }
        .validate()
        .is_err());
        assert!(ObjOp::Write {
            offset: u64::MAX,
            data: Bytes::from_static(b"x")
        }
        .validate()
        .is_err());
        assert!(ObjOp::Read {
            offset: 0,
            len: 4096
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn reqid_keys_differ_by_each_part() {
        let r = |c: &str, i, t| {
            ReqId {
                client: c.into(),
                incarnation: i,
                tid: t,
            }
            .key()
        };
        assert_ne!(r("a", 1, 2), r("a", 1, 3));
        assert_ne!(r("a", 1, 2), r("a", 2, 2));
        assert_ne!(r("a", 1, 2), r("b", 1, 2));
    }

    #[test]
    fn pg_state_flags_render_in_ceph_order_whatever_the_insert_order() {
        use PgStateFlag::*;
        let render =
            |flags: &[PgStateFlag]| flags.iter().copied().collect::<PgStateFlags>().to_string();
        assert_eq!(render(&[Clean, Active]), "active+clean");
        assert_eq!(
            render(&[
                Inconsistent,
                Degraded,
                Snaptrim,
                Undersized,
                RecoveryToofull,
                Active
            ]),
            "active+recovery_toofull+undersized+degraded+snaptrim+inconsistent"
        );
        assert_eq!(
            render(&[Degraded, Undersized, Recovering, Active]),
            "active+recovering+undersized+degraded"
        );
        assert_eq!(render(&[Peered, Undersized]), "undersized+peered");
        assert_eq!(
            render(&[Degraded, BackfillToofull, Undersized]),
            "backfill_toofull+undersized+degraded"
        );
        assert_eq!(render(&[]), "unknown");
        let clean = PgStateFlags::from([Active, Clean]);
        assert!(clean.is_active_clean());
        assert!(!PgStateFlags::from([Active, Clean, Inconsistent]).is_active_clean());
        let back: PgStateFlags = postcard::from_bytes(&encode(&clean)).unwrap();
        assert_eq!(back, clean);
    }

    #[test]
    fn garbage_decodes_to_an_error() {
        let e = decode::<Vec<ObjOp>>(&[0xff, 0xff, 0xff], "ops").unwrap_err();
        assert!(matches!(e, OpError::InvalidArgument(_)));
    }
}

/// What a notify returns: every watcher's reply, and the watchers that did not answer in time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyResult {
    pub acks: Vec<(WatcherInfo, Bytes)>,
    pub timed_out: Vec<WatcherInfo>,
}

/// One PG as its primary reports it (`basalt pg ls`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgStat {
    /// `pool.seed` in hex, as Ceph spells PG ids.
    pub pgid: String,
    pub pool: u32,
    pub seed: u32,
    /// The PG's state flags; shown Ceph-style (`active+clean`, `active+undersized+degraded`,
    /// `peering`, `undersized+peered` below min_size, ...) by their `Display`.
    pub state: PgStateFlags,
    pub acting: Vec<u32>,
    pub primary: u32,
    /// Epoch at which the current interval began (as the primary saw it).
    pub interval_epoch: u64,
    /// Sequence number of the newest write (0: none since the PG was created).
    pub last_seq: u64,
    /// Why the PG is not active+clean, in words (what it waits for, what it still copies);
    /// empty when it is.
    pub detail: String,
}

/// One condition of a PG, as Ceph names it. Declared in the order a state string lists
/// them (`active+recovering+undersized+degraded+snaptrim+inconsistent`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PgStateFlag {
    /// Serving I/O.
    Active,
    /// Every acting member holds every object (nothing to recover).
    Clean,
    /// No member of the last active interval answered: the PG must not serve.
    Down,
    /// No complete copy answered: the PG must not serve.
    Incomplete,
    /// The primary is gathering the members' states.
    Peering,
    /// Objects named in the logs are being copied to members that are behind.
    Recovering,
    /// Recovery while active waits: every member it must fill is backfillfull.
    RecoveryToofull,
    /// Whole object ranges are being copied to members the log cannot catch up.
    Backfilling,
    /// Backfill waits: a target is at or past the backfillfull ratio.
    BackfillToofull,
    /// Fewer acting members than the pool's size.
    Undersized,
    /// Some objects have fewer copies than the pool's size.
    Degraded,
    /// Peered but below min_size: the PG does not serve.
    Peered,
    /// The snap trimmer is deleting removed snapshots' clones.
    Snaptrim,
    /// A scrub found copies that differ and repair could not fix them.
    Inconsistent,
    /// Served by a temporary acting set (`pg_temp`), not CRUSH's, while the CRUSH primary
    /// catches up.
    Remapped,
    /// This OSD holds the PG without being in its acting set.
    Stray,
    /// Nobody reported the PG's state (its primary did not answer).
    Unknown,
}

impl PgStateFlag {
    /// The flag's name in a state string.
    pub fn name(self) -> &'static str {
        match self {
            PgStateFlag::Active => "active",
            PgStateFlag::Clean => "clean",
            PgStateFlag::Down => "down",
            PgStateFlag::Incomplete => "incomplete",
            PgStateFlag::Peering => "peering",
            PgStateFlag::Recovering => "recovering",
            PgStateFlag::RecoveryToofull => "recovery_toofull",
            PgStateFlag::Backfilling => "backfilling",
            PgStateFlag::BackfillToofull => "backfill_toofull",
            PgStateFlag::Undersized => "undersized",
            PgStateFlag::Degraded => "degraded",
            PgStateFlag::Peered => "peered",
            PgStateFlag::Snaptrim => "snaptrim",
            PgStateFlag::Inconsistent => "inconsistent",
            PgStateFlag::Remapped => "remapped",
            PgStateFlag::Stray => "stray",
            PgStateFlag::Unknown => "unknown",
        }
    }
}

/// A PG's state: a set of [`PgStateFlag`]s. Callers test flags ([`PgStateFlags::contains`]);
/// the Ceph-style string (`active+clean`) is only for people, rendered by `Display`, in this
/// one place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PgStateFlags(std::collections::BTreeSet<PgStateFlag>);

impl PgStateFlags {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn contains(&self, flag: PgStateFlag) -> bool {
        self.0.contains(&flag)
    }
    pub fn insert(&mut self, flag: PgStateFlag) -> &mut Self {
        self.0.insert(flag);
        self
    }
    /// Adds `flag` when `cond` holds.
    pub fn insert_if(&mut self, cond: bool, flag: PgStateFlag) -> &mut Self {
        if cond {
            self.0.insert(flag);
        }
        self
    }
    pub fn iter(&self) -> impl Iterator<Item = PgStateFlag> + '_ {
        self.0.iter().copied()
    }
    /// Serving I/O.
    pub fn is_active(&self) -> bool {
        self.contains(PgStateFlag::Active)
    }
    /// `active+clean` and nothing else: what a healthy PG is.
    pub fn is_active_clean(&self) -> bool {
        self.0.len() == 2 && self.is_active() && self.contains(PgStateFlag::Clean)
    }
}

impl<const N: usize> From<[PgStateFlag; N]> for PgStateFlags {
    fn from(flags: [PgStateFlag; N]) -> Self {
        Self(flags.into_iter().collect())
    }
}

impl FromIterator<PgStateFlag> for PgStateFlags {
    fn from_iter<I: IntoIterator<Item = PgStateFlag>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl fmt::Display for PgStateFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(PgStateFlag::Unknown.name());
        }
        for (i, flag) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("+")?;
            }
            f.write_str(flag.name())?;
        }
        Ok(())
    }
}

/// What `basalt pg scrub|deep-scrub|repair` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubResult {
    pub pgid: String,
    pub deep: bool,
    /// Objects compared.
    pub objects: u64,
    /// One line per inconsistent object: `name: osd.N: why; ...` (after repair: what is left).
    pub inconsistent: Vec<String>,
    /// Objects repaired from a good copy.
    pub repaired: u64,
}

/// A PG maintenance command sent to the PG's primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgCommand {
    Scrub,
    DeepScrub,
    Repair,
}
