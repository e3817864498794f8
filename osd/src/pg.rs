//! The PG layer's pure core: turning a client's compound op into one store transaction, and
//! the store-side halves of peering and scrub (a copy's state, applying a push, scanning
//! objects, scrub maps). No IO beyond the local store, no clock: the daemon's service
//! ([`crate::service`]) feeds it and carries out what it returns. Peering's decisions live
//! in [`crate::peering`].

use std::collections::{BTreeMap, BTreeSet};

use basalt_ops::{
    Eversion, LockKind, LockState, Locker, LogEntry, ObjOp, OpError, OpOutput, ReqId, SnapContext,
};
use basalt_placement::{OsdId, PgId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::peering::{PeerState, PgInfo};
use crate::snaps::{self, SnapSet, SNAP_XATTR_PREFIX};
use crate::store::{ObjectHead, ObjectId, ObjectMeta, Store, StoreError, Transaction};

/// Prefix of the xattrs holding advisory locks (`lock.<name>`); hidden from `GetXattrs`.
pub const LOCK_XATTR_PREFIX: &str = "lock.";

/// An object's name within its PG.
pub type ObjectName = (String, String);

/// Everything about one object, as recovery copies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectState {
    pub namespace: String,
    pub name: String,
    pub data: Bytes,
    pub xattrs: BTreeMap<String, Bytes>,
    pub omap_header: Option<Bytes>,
    pub omap: Vec<(Bytes, Bytes)>,
    pub meta: ObjectMeta,
    /// The object's clones (snapshot id, state), which recovery copies with it.
    pub clones: Vec<(u64, ObjectState)>,
}

/// What the primary sends a peer to make it equal to the authoritative copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub objects: Vec<ObjectState>,
    pub remove: Vec<ObjectName>,
    /// When set, the peer's PG log becomes exactly this.
    pub log: Option<Vec<LogEntry>>,
    /// When set, the peer's PG info becomes this (in the same transaction as the objects,
    /// so a backfill cursor never runs ahead of the data).
    pub info: Option<PgInfo>,
}

/// One page of a PG listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub objects: Vec<ObjectName>,
    /// Pass back as `start_after` for the next page; `None` when the PG is exhausted.
    pub next: Option<ObjectName>,
}

/// Maps a store failure to what the client is told.
pub fn store_error(e: StoreError) -> OpError {
    match e {
        StoreError::NotFound { .. } => OpError::NotFound,
        StoreError::AlreadyExists { .. } => OpError::Exists,
        StoreError::Full { reason } => OpError::NoSpace(reason),
        StoreError::InvalidArgument(m) => OpError::InvalidArgument(m),
        StoreError::TooLarge { .. } => OpError::InvalidArgument(e.to_string()),
        StoreError::Corrupt { .. } => OpError::Corrupt(e.to_string()),
        other => OpError::Io(other.to_string()),
    }
}

/// The result of executing a request's ops against the current object state.
pub struct Executed {
    pub txn: Transaction,
    pub outputs: Vec<OpOutput>,
    /// The request removed an object that existed.
    pub removed: bool,
    /// The object exists after the request.
    pub exists_after: bool,
    /// The store holds the object's head after the request: the object, or a whiteout
    /// keeping its clones. Its metadata then records the write's version (so backfill sees
    /// a changed whiteout as changed).
    pub stored_after: bool,
    /// The request changes something (needs a version, log entry and replication).
    pub is_write: bool,
    /// The object's version before the request (default if it did not exist).
    pub version_before: Eversion,
    /// The request creates the object.
    pub created: bool,
}

/// Whether a write request may run while its pool is full (Ceph's `FULL_TRY` rule). A request
/// whose ops can only free or keep space (removes, truncates, zeroing, removing keys, xattrs
/// or locks: [`ObjOp::may_use_space`]) always may. A request sent with `full_try` (the client
/// says it is freeing space, e.g. `rbd rm` or `rbd resize --allow-shrink` updating the image
/// header and taking its lock) may change the metadata of existing objects, but may neither
/// create an object nor store data bytes. Anything else is refused: the answer is the reason.
pub fn full_verdict(ops: &[ObjOp], full_try: bool, created: bool) -> Result<(), &'static str> {
    if !ops.iter().any(ObjOp::may_use_space) {
        return Ok(());
    }
    if !full_try {
        return Err("it may store more, and only requests that free space run on a full pool");
    }
    if created {
        return Err("it would create an object");
    }
    if ops.iter().any(ObjOp::writes_data) {
        return Err("it would store data");
    }
    Ok(())
}

/// What a request says about snapshots: the writer's snap context, and the snapshot a read
/// is of (0: the head).
#[derive(Clone, Debug, Default)]
pub struct SnapArgs {
    pub snapc: SnapContext,
    pub read_snap: u64,
}

/// Executes `ops` against `obj`'s current state. Reads and guards see the object as it is
/// before the request; writes are collected into one transaction (which the store applies
/// atomically), after the copy-on-write a snapshot taken since the last write needs. Lock ops
/// are read-modify-writes of the lock xattr, safe because the caller holds the object's op
/// lock.
pub fn execute(
    store: &Store,
    obj: &ObjectId,
    client: &str,
    ops: &[ObjOp],
    snap: &SnapArgs,
    watchers: &dyn Fn() -> Vec<basalt_ops::WatcherInfo>,
) -> Result<Executed, OpError> {
    // One onode read serves every read op of the request.
    let stored = store.head(obj).map_err(store_error)?;
    if snap.read_snap != 0 {
        return execute_at_snap(store, obj, stored.as_ref(), snap.read_snap, ops);
    }
    // A whiteout (a deleted object whose clones remain) is no object to a client.
    let head = stored
        .as_ref()
        .filter(|_| !snaps::is_whiteout(stored.as_ref()));
    let exists_before = head.is_some();
    let mut exists = exists_before;
    let mut txn = Transaction::new();
    let writing = ops.iter().any(ObjOp::is_write);
    // The snap set as found, and as it will be after the write (`finish` compares them).
    let (snaps_before, mut snapset) = if writing {
        snap.snapc.validate()?;
        let before = SnapSet::of(stored.as_ref())?;
        let after = snaps::before_write(
            store,
            obj,
            stored.as_ref(),
            before.clone(),
            &snap.snapc,
            ops,
            &mut txn,
        )?;
        (before, after)
    } else {
        (SnapSet::default(), SnapSet::default())
    };
    let mut outputs = Vec::with_capacity(ops.len());
    let mut is_write = false;
    // Lock states changed earlier in this request (a later op must see them).
    let mut locks: BTreeMap<String, LockState> = BTreeMap::new();
    let need = |exists: bool| {
        if exists {
            Ok(())
        } else {
            Err(OpError::NotFound)
        }
    };
    for op in ops {
        op.validate()?;
        let mut out = OpOutput::None;
        match op {
            ObjOp::AssertExists => need(exists)?,
            ObjOp::CmpXattr { name, value } => {
                let head = head.ok_or(OpError::NotFound)?;
                if &head.xattr(name) != value {
                    return Err(OpError::CmpFailed(format!("xattr {name} differs")));
                }
            }
            ObjOp::Read { offset, len } => {
                let head = head.ok_or(OpError::NotFound)?;
                out = OpOutput::Data(
                    store
                        .read_head(obj, head, *offset, *len)
                        .map_err(store_error)?,
                );
            }
            ObjOp::Stat => {
                let st = head.ok_or(OpError::NotFound)?.stat();
                out = OpOutput::Stat {
                    size: st.size,
                    mtime_ns: st.meta.mtime_ns,
                    version: Eversion::decode(&st.meta.version).unwrap_or_default(),
                };
            }
            ObjOp::GetXattr { name } => {
                let head = head.ok_or(OpError::NotFound)?;
                out = OpOutput::Xattr(user_xattr(name).and_then(|n| head.xattr(n)));
            }
            ObjOp::GetXattrs => {
                out = OpOutput::Xattrs(user_xattrs(head.ok_or(OpError::NotFound)?));
            }
            ObjOp::ListSnaps => {
                if stored.is_none() {
                    return Err(OpError::NotFound);
                }
                out = OpOutput::Snaps(SnapSet::of(stored.as_ref())?.listing(exists_before));
            }
            ObjOp::OmapGetHeader => {
                need(exists_before)?;
                out = OpOutput::OmapHeader(store.omap_get_header(obj).map_err(store_error)?);
            }
            ObjOp::OmapGetVals { start_after, max } => {
                need(exists_before)?;
                let max = (*max).clamp(1, 10_000) as usize;
                let l = store
                    .omap_list(obj, start_after.as_deref(), max)
                    .map_err(store_error)?;
                out = OpOutput::Omap {
                    entries: l.entries,
                    more: l.more,
                };
            }
            ObjOp::OmapGetValsByKeys { keys } => {
                need(exists_before)?;
                let wanted: Vec<&[u8]> = keys.iter().map(|k| k.as_ref()).collect();
                out = OpOutput::Omap {
                    entries: store.omap_get(obj, &wanted).map_err(store_error)?,
                    more: false,
                };
            }
            ObjOp::LockInfo { name } => {
                out = OpOutput::Lock(read_lock(head, name)?);
            }
            ObjOp::ListWatchers => {
                need(exists_before)?;
                out = OpOutput::Watchers(watchers());
            }
            ObjOp::Create { exclusive } => {
                if *exclusive && exists {
                    return Err(OpError::Exists);
                }
                txn.create(obj, false);
                exists = true;
            }
            ObjOp::Write { offset, data } => {
                txn.write(obj, *offset, data.clone());
                exists = true;
            }
            ObjOp::WriteFull { data } => {
                txn.write_full(obj, data.clone());
                exists = true;
            }
            ObjOp::Append { data } => {
                txn.append(obj, data.clone());
                exists = true;
            }
            ObjOp::Zero { offset, len } => {
                // Ceph's zero on a missing object is a no-op success; creating it would turn
                // a discard of a hole into an allocation.
                if exists {
                    txn.zero(obj, *offset, *len);
                }
            }
            ObjOp::Truncate { size } => {
                need(exists)?;
                txn.truncate(obj, *size);
            }
            ObjOp::Remove => {
                need(exists)?;
                txn.remove(obj);
                exists = false;
                locks.clear();
            }
            ObjOp::SetXattr { name, value } => {
                need(exists)?;
                if user_xattr(name).is_none() {
                    return Err(OpError::InvalidArgument(format!(
                        "xattr names starting with {LOCK_XATTR_PREFIX:?} or \
                         {SNAP_XATTR_PREFIX:?} are reserved (locks, snapshots)"
                    )));
                }
                txn.setxattr(obj, name.clone(), value.clone());
            }
            ObjOp::RmXattr { name } => {
                need(exists)?;
                if user_xattr(name).is_none() {
                    return Err(OpError::InvalidArgument(format!(
                        "xattr {name:?} is reserved; remove a lock with unlock"
                    )));
                }
                txn.rmxattr(obj, name.clone());
            }
            ObjOp::OmapSet { entries } => {
                need(exists)?;
                txn.omap_set(obj, entries.iter().cloned());
            }
            ObjOp::OmapRmKeys { keys } => {
                need(exists)?;
                txn.omap_rm_keys(obj, keys.iter().cloned());
            }
            ObjOp::OmapClear => {
                need(exists)?;
                txn.omap_clear(obj);
            }
            ObjOp::OmapSetHeader { header } => {
                need(exists)?;
                txn.omap_set_header(obj, header.clone());
            }
            ObjOp::Lock {
                name,
                kind,
                cookie,
                tag,
                description,
            } => {
                // cls_lock creates the object it locks.
                if !exists {
                    txn.create(obj, false);
                    exists = true;
                }
                let mut st = current_lock(head, &locks, name)?;
                lock(&mut st, client, *kind, cookie, tag, description)?;
                txn.setxattr(obj, lock_xattr(name), basalt_ops::encode(&st));
                locks.insert(name.clone(), st);
            }
            ObjOp::Unlock { name, cookie } => {
                need(exists)?;
                let mut st = current_lock(head, &locks, name)?;
                unlock(&mut st, client, cookie)?;
                txn.setxattr(obj, lock_xattr(name), basalt_ops::encode(&st));
                locks.insert(name.clone(), st);
            }
            ObjOp::BreakLock {
                name,
                client: holder,
                cookie,
            } => {
                need(exists)?;
                let mut st = current_lock(head, &locks, name)?;
                unlock(&mut st, holder, cookie)?;
                txn.setxattr(obj, lock_xattr(name), basalt_ops::encode(&st));
                locks.insert(name.clone(), st);
            }
            ObjOp::Rollback { snap } => {
                // The snapshot as the request found it: this request's own copy-on-write
                // only preserves the head for newer snapshots.
                match snaps::read_at(store, obj, stored.as_ref(), *snap, 0, u64::MAX)? {
                    Some(data) => {
                        txn.write_full(obj, data);
                        exists = true;
                    }
                    None if exists => {
                        txn.remove(obj);
                        exists = false;
                        locks.clear();
                    }
                    None => {}
                }
            }
            ObjOp::TrimSnaps { removed } => {
                snaps::trim(store, obj, &mut snapset, removed, &mut txn)?;
            }
        }
        is_write |= op.is_write();
        outputs.push(out);
    }
    let whiteout_after = is_write
        && snaps::finish(
            obj,
            stored.as_ref(),
            &snaps_before,
            &snapset,
            exists,
            &mut txn,
        );
    Ok(Executed {
        txn,
        outputs,
        removed: exists_before && !exists,
        exists_after: exists,
        stored_after: exists || whiteout_after,
        is_write,
        version_before: head
            .and_then(|h| Eversion::decode(&h.meta().version))
            .unwrap_or_default(),
        created: !exists_before && exists,
    })
}

/// `name` if a client may read or change it (locks and snapshot records are the OSD's).
fn user_xattr(name: &str) -> Option<&str> {
    (!name.starts_with(LOCK_XATTR_PREFIX) && !name.starts_with(SNAP_XATTR_PREFIX)).then_some(name)
}

fn user_xattrs(head: &ObjectHead) -> BTreeMap<String, Bytes> {
    let mut all = head.xattrs().clone();
    all.retain(|k, _| user_xattr(k).is_some());
    all
}

/// A read-only request at snapshot `snap`.
fn execute_at_snap(
    store: &Store,
    obj: &ObjectId,
    stored: Option<&ObjectHead>,
    snap: u64,
    ops: &[ObjOp],
) -> Result<Executed, OpError> {
    if let Some(op) = ops.iter().find(|op| !op.reads_snapshot()) {
        return Err(OpError::InvalidArgument(format!(
            "{} cannot run at snapshot {snap}: snapshots are read-only",
            op.name()
        )));
    }
    let head_live = stored.is_some() && !snaps::is_whiteout(stored);
    let at = snaps::object_at(obj, stored, snap)?;
    // Metadata comes from the clone that holds the snapshot (or the head); data through the
    // chain of clones.
    let clone = match &at {
        Some((id, _)) if id != obj => Some(
            store
                .head(id)
                .map_err(store_error)?
                .ok_or_else(|| OpError::Corrupt(format!("clone {id} of {obj} is missing")))?,
        ),
        _ => None,
    };
    let holder = clone.as_ref().or(stored);
    let mut outputs = Vec::with_capacity(ops.len());
    for op in ops {
        if *op == ObjOp::ListSnaps {
            outputs.push(OpOutput::Snaps(SnapSet::of(stored)?.listing(head_live)));
            continue;
        }
        let (Some((_, size)), Some(holder)) = (&at, holder) else {
            return Err(OpError::NotFound);
        };
        outputs.push(match op {
            ObjOp::AssertExists => OpOutput::None,
            ObjOp::Read { offset, len } => OpOutput::Data(
                snaps::read_at(store, obj, stored, snap, *offset, *len)?.unwrap_or_default(),
            ),
            ObjOp::Stat => OpOutput::Stat {
                size: *size,
                mtime_ns: holder.meta().mtime_ns,
                version: Eversion::decode(&holder.meta().version).unwrap_or_default(),
            },
            ObjOp::GetXattr { name } => {
                OpOutput::Xattr(user_xattr(name).and_then(|n| holder.xattr(n)))
            }
            ObjOp::GetXattrs => OpOutput::Xattrs(user_xattrs(holder)),
            other => {
                return Err(OpError::InvalidArgument(format!(
                    "{} cannot run at a snapshot",
                    other.name()
                )))
            }
        });
    }
    Ok(Executed {
        txn: Transaction::new(),
        outputs,
        removed: false,
        exists_after: at.is_some(),
        stored_after: stored.is_some(),
        is_write: false,
        version_before: Eversion::ZERO,
        created: false,
    })
}

fn lock_xattr(name: &str) -> String {
    format!("{LOCK_XATTR_PREFIX}{name}")
}

/// The lock `name` of an object as the request found it (`head`: `None` if it did not exist).
fn read_lock(head: Option<&ObjectHead>, name: &str) -> Result<LockState, OpError> {
    match head.and_then(|h| h.xattr(&lock_xattr(name))) {
        Some(b) => basalt_ops::decode(&b, "lock state"),
        None => Ok(LockState::default()),
    }
}

fn current_lock(
    head: Option<&ObjectHead>,
    changed: &BTreeMap<String, LockState>,
    name: &str,
) -> Result<LockState, OpError> {
    match changed.get(name) {
        Some(st) => Ok(st.clone()),
        None => read_lock(head, name),
    }
}

/// cls_lock's `lock`: exclusive excludes everyone else; shared lockers must share the tag.
/// Re-locking with the same (client, cookie) succeeds (idempotent), as in Ceph.
pub fn lock(
    st: &mut LockState,
    client: &str,
    kind: LockKind,
    cookie: &str,
    tag: &str,
    description: &str,
) -> Result<(), OpError> {
    let mine = |l: &Locker| l.client == client && l.cookie == cookie;
    if st.lockers.iter().any(mine) {
        if st.kind == Some(kind) {
            return Ok(());
        }
        return Err(OpError::Busy("already locked with another type".into()));
    }
    if let Some(holder) = st.lockers.first() {
        if kind == LockKind::Exclusive || st.kind == Some(LockKind::Exclusive) {
            return Err(OpError::Busy(format!(
                "locked by {} (cookie {})",
                holder.client, holder.cookie
            )));
        }
        if st.tag != tag {
            return Err(OpError::Busy(format!(
                "shared lock has tag {:?}, not {tag:?}",
                st.tag
            )));
        }
    }
    st.kind = Some(kind);
    st.tag = tag.to_string();
    st.lockers.push(Locker {
        client: client.to_string(),
        cookie: cookie.to_string(),
        description: description.to_string(),
    });
    Ok(())
}

/// Removes `(client, cookie)` from the lock (unlock, or break by someone else).
pub fn unlock(st: &mut LockState, client: &str, cookie: &str) -> Result<(), OpError> {
    let before = st.lockers.len();
    st.lockers
        .retain(|l| !(l.client == client && l.cookie == cookie));
    if st.lockers.len() == before {
        return Err(OpError::NotFound);
    }
    if st.lockers.is_empty() {
        st.kind = None;
        st.tag.clear();
    }
    Ok(())
}

/// Adds the version bookkeeping of a write to its transaction: object metadata, the PG log
/// entry and the request's dup record (all in the same atomic batch), plus trimming the log
/// (and with it the window in which a resent request is recognised) to `log_keep` entries.
#[allow(clippy::too_many_arguments)]
pub fn finish_write(
    txn: &mut Transaction,
    obj: &ObjectId,
    exists_after: bool,
    removed: bool,
    version: Eversion,
    reqid: &ReqId,
    result: Bytes,
    mtime_ns: u64,
    log_keep: u64,
) -> LogEntry {
    if exists_after {
        txn.set_meta(
            obj,
            ObjectMeta {
                version: version.encode(),
                user_version: version.seq,
                mtime_ns,
            },
        );
    }
    let entry = LogEntry {
        version,
        namespace: obj.namespace().to_string(),
        object: obj.name().to_string(),
        removed,
        reqid: reqid.clone(),
        result: result.clone(),
    };
    let pg = obj.pg();
    txn.pg_log_append(pg, version.seq, basalt_ops::encode(&entry));
    txn.dup_record(pg, reqid.key(), version.seq, result);
    // Trimming in steps keeps the per-write cost flat; the log holds log_keep to
    // log_keep + step entries.
    let step = (log_keep / 8).clamp(1, 256);
    if version.seq > log_keep && version.seq.is_multiple_of(step) {
        txn.pg_log_trim(pg, version.seq - log_keep);
        txn.dup_trim(pg, version.seq - log_keep);
    }
    entry
}

/// Reads everything about an object for recovery: the head (a whiteout included) and its
/// clones.
pub fn object_state(store: &Store, obj: &ObjectId) -> Result<ObjectState, OpError> {
    let head = store.head(obj).map_err(store_error)?;
    let mut state = one_object_state(store, obj).map_err(store_error)?;
    for clone in snaps::clone_objects(obj, head.as_ref())? {
        let st = one_object_state(store, &clone).map_err(store_error)?;
        state.clones.push((clone.snap(), st));
    }
    Ok(state)
}

fn one_object_state(store: &Store, obj: &ObjectId) -> Result<ObjectState, StoreError> {
    let st = store.stat(obj)?;
    let data = store.read(obj, 0, st.size)?;
    let xattrs = store.xattrs(obj)?;
    let omap_header = store.omap_get_header(obj)?;
    let mut omap = Vec::new();
    let mut after: Option<Bytes> = None;
    loop {
        let page = store.omap_list(obj, after.as_deref(), 1024)?;
        after = page.entries.last().map(|(k, _)| k.clone());
        omap.extend(page.entries);
        if !page.more || after.is_none() {
            break;
        }
    }
    Ok(ObjectState {
        namespace: obj.namespace().to_string(),
        name: obj.name().to_string(),
        data,
        xattrs,
        omap_header,
        omap,
        meta: st.meta,
        clones: Vec::new(),
    })
}

/// [`object_state`], with an object that does not exist as `None`.
pub fn object_if_present(store: &Store, obj: &ObjectId) -> Result<Option<ObjectState>, OpError> {
    if !store.exists(obj).map_err(store_error)? {
        return Ok(None);
    }
    object_state(store, obj).map(Some)
}

/// Adds to `txn` what removes `obj` (whose head is `head`) with its clones.
pub fn remove_object(txn: &mut Transaction, obj: &ObjectId, head: Option<&ObjectHead>) {
    if head.is_some() {
        snaps::remove_clones(obj, head, txn);
        txn.remove(obj);
    }
}

/// Adds to `txn` what replaces `obj` (whose current head is `head`) and its clones with
/// `state`.
pub fn install_object(
    txn: &mut Transaction,
    obj: &ObjectId,
    head: Option<&ObjectHead>,
    state: &ObjectState,
) {
    remove_object(txn, obj, head);
    install_one(txn, obj, state);
    for (snap, clone) in &state.clones {
        install_one(txn, &obj.clone().at_snap(*snap), clone);
    }
}

fn install_one(txn: &mut Transaction, obj: &ObjectId, state: &ObjectState) {
    txn.create(obj, false);
    txn.write_full(obj, state.data.clone());
    for (k, v) in &state.xattrs {
        txn.setxattr(obj, k.clone(), v.clone());
    }
    if let Some(h) = &state.omap_header {
        txn.omap_set_header(obj, h.clone());
    }
    if !state.omap.is_empty() {
        txn.omap_set(obj, state.omap.iter().cloned());
    }
    txn.set_meta(obj, state.meta.clone());
}

/// Adds to `txn` what makes `pg`'s log exactly `log` (and its dups the log's requests).
pub fn replace_log(txn: &mut Transaction, pg: PgId, log: &[LogEntry]) {
    txn.pg_log_remove_from(pg, 0);
    txn.dup_trim(pg, u64::MAX);
    for e in log {
        txn.pg_log_append(pg, e.version.seq, basalt_ops::encode(e));
        txn.dup_record(pg, e.reqid.key(), e.version.seq, e.result.clone());
    }
}

/// The PG's log as stored (oldest first); undecodable entries are reported, not skipped.
pub fn read_log(store: &Store, pg: PgId) -> Result<Vec<LogEntry>, OpError> {
    let mut out = Vec::new();
    let mut from = 0u64;
    loop {
        let page = store.pg_log_scan(pg, from, 1024).map_err(store_error)?;
        let Some(&(last, _)) = page.last() else { break };
        for (_, b) in &page {
            out.push(basalt_ops::decode::<LogEntry>(b, "PG log entry")?);
        }
        if page.len() < 1024 {
            break;
        }
        from = last + 1;
    }
    Ok(out)
}

/// The PG info this OSD stores for `pg` (default when never written).
pub fn read_info(store: &Store, pg: PgId) -> Result<PgInfo, OpError> {
    match store.pg_info(pg).map_err(store_error)? {
        Some(b) => PgInfo::decode(&b),
        None => Ok(PgInfo::default()),
    }
}

/// What this OSD holds of `pg`, for peering.
pub fn peer_state(store: &Store, pg: PgId) -> Result<PeerState, OpError> {
    if !store.pg_exists(pg).map_err(store_error)? {
        return Ok(PeerState::default());
    }
    let log = read_log(store, pg)?;
    let info = read_info(store, pg)?;
    Ok(PeerState {
        last_update: log
            .last()
            .map_or(Eversion::ZERO, |e| e.version)
            .max(info.last_update_floor),
        info,
        log,
    })
}

/// Head objects of `pg` after `after`, in listing order ([`listing_key`]), with their
/// versions: one backfill scan page of at most `max`.
pub fn scan_objects(
    store: &Store,
    pg: PgId,
    after: Option<&ObjectName>,
    max: usize,
) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
    let mut out = Vec::new();
    if !store.pg_exists(pg).map_err(store_error)? {
        return Ok(out);
    }
    let mut cursor = after.map(|(ns, n)| ObjectId::with_namespace(pg, ns.clone(), n.clone()));
    while out.len() < max {
        let page = store
            .list_objects(pg, cursor.as_ref(), max - out.len())
            .map_err(store_error)?;
        for o in &page.objects {
            if o.snap() != crate::store::SNAP_HEAD {
                continue;
            }
            let st = store.stat(o).map_err(store_error)?;
            out.push((
                (o.namespace().to_string(), o.name().to_string()),
                Eversion::decode(&st.meta.version).unwrap_or_default(),
            ));
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    Ok(out)
}

/// Objects of `pg` after `after` (at most `max` scanned) with clones that serve any of the
/// `removed` snapshots, each with those snapshots; and where the next page starts (`None`:
/// the PG is done).
#[allow(clippy::type_complexity)]
pub fn objects_to_trim(
    store: &Store,
    pg: PgId,
    after: Option<&ObjectName>,
    max: usize,
    removed: &[u64],
) -> Result<(Vec<(ObjectName, Vec<u64>)>, Option<ObjectName>), OpError> {
    let mut out = Vec::new();
    if !store.pg_exists(pg).map_err(store_error)? {
        return Ok((out, None));
    }
    let cursor = after.map(|(ns, n)| ObjectId::with_namespace(pg, ns.clone(), n.clone()));
    let page = store
        .list_objects(pg, cursor.as_ref(), max)
        .map_err(store_error)?;
    for o in page
        .objects
        .iter()
        .filter(|o| o.snap() == crate::store::SNAP_HEAD)
    {
        let head = store.head(o).map_err(store_error)?;
        let mut snaps: Vec<u64> = SnapSet::of(head.as_ref())?
            .clones
            .iter()
            .flat_map(|c| c.snaps.iter().copied())
            .filter(|s| removed.contains(s))
            .collect();
        snaps.sort_unstable();
        snaps.dedup();
        if !snaps.is_empty() {
            out.push(((o.namespace().to_string(), o.name().to_string()), snaps));
        }
    }
    let next = page
        .next
        .map(|o| (o.namespace().to_string(), o.name().to_string()));
    Ok((out, next))
}

/// Builds the transaction that applies `push` to this OSD's copy of `pg`; a copy it creates
/// is laid out for `pg_num` PGs (its pool's in the map the push was checked against).
pub fn apply_push(
    store: &Store,
    pg: PgId,
    pg_num: u32,
    push: &Push,
) -> Result<Transaction, OpError> {
    let mut txn = Transaction::new();
    if !store.pg_exists(pg).map_err(store_error)? {
        txn.pg_create(pg);
        crate::split::record_layout(&mut txn, pg, pg_num);
    }
    let mut seen = BTreeSet::new();
    for st in &push.objects {
        let obj = ObjectId::with_namespace(pg, st.namespace.clone(), st.name.clone());
        if !seen.insert((st.namespace.clone(), st.name.clone())) {
            return Err(OpError::InvalidArgument(format!(
                "object {obj} pushed twice"
            )));
        }
        let head = store.head(&obj).map_err(store_error)?;
        install_object(&mut txn, &obj, head.as_ref(), st);
    }
    for (ns, name) in &push.remove {
        let obj = ObjectId::with_namespace(pg, ns.clone(), name.clone());
        let head = store.head(&obj).map_err(store_error)?;
        remove_object(&mut txn, &obj, head.as_ref());
    }
    if let Some(log) = &push.log {
        replace_log(&mut txn, pg, log);
    }
    if let Some(info) = &push.info {
        txn.pg_info_set(pg, basalt_ops::encode(info));
    }
    Ok(txn)
}

/// What scrub learns about one copy of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubObject {
    pub version: Eversion,
    pub size: u64,
    /// Deep scrub only (zero for a shallow scrub): digests of data, omap and attributes.
    pub data_digest: [u8; 32],
    pub omap_digest: [u8; 32],
    pub attrs_digest: [u8; 32],
    /// Chunks whose stored checksum does not match their bytes (deep scrub only).
    pub bad_chunks: Vec<u64>,
    /// Snapshot clones with such chunks (deep scrub only). The clones' digests are folded
    /// into the head's, so a clone that differs between copies makes the object differ.
    pub bad_clones: Vec<u64>,
}

impl ScrubObject {
    fn verifies(&self) -> bool {
        self.bad_chunks.is_empty() && self.bad_clones.is_empty()
    }
}

/// One member's view of a PG for scrub.
pub type ScrubMap = BTreeMap<ObjectName, ScrubObject>;

/// Where `name` stands in the store's listing order of `pg` — placement hash first, not
/// name order — the order backfill and scrub walk a PG in.
pub fn listing_key(pg: PgId, name: &ObjectName) -> ObjectId {
    ObjectId::with_namespace(pg, name.0.clone(), name.1.clone())
}

/// Objects after `after` (exclusive) up to `until` (inclusive; `None`: to the end), in
/// [`listing_key`] order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRange {
    pub after: Option<ObjectName>,
    pub until: Option<ObjectName>,
}

/// Builds this OSD's scrub map of the objects of `pg` in `range` (at most `max`): sizes and
/// versions, plus every chunk read back and checked against its blocks' crc32c when `deep`.
pub fn scrub_map(
    store: &Store,
    pg: PgId,
    deep: bool,
    range: &NameRange,
    max: usize,
) -> Result<ScrubMap, OpError> {
    let mut out = ScrubMap::new();
    if !store.pg_exists(pg).map_err(store_error)? {
        return Ok(out);
    }
    let mut after = range.after.as_ref().map(|n| listing_key(pg, n));
    let until = range.until.as_ref().map(|n| listing_key(pg, n));
    loop {
        let page = store
            .list_objects(pg, after.as_ref(), 1024)
            .map_err(store_error)?;
        for o in &page.objects {
            if o.snap() != crate::store::SNAP_HEAD {
                continue;
            }
            if out.len() >= max || until.as_ref().is_some_and(|u| o > u) {
                return Ok(out);
            }
            let name = (o.namespace().to_string(), o.name().to_string());
            let st = store.stat(o).map_err(store_error)?;
            let mut entry = ScrubObject {
                version: Eversion::decode(&st.meta.version).unwrap_or_default(),
                size: st.size,
                data_digest: [0; 32],
                omap_digest: [0; 32],
                attrs_digest: [0; 32],
                bad_chunks: vec![],
                bad_clones: vec![],
            };
            if deep {
                let r = store.deep_scrub_object(o).map_err(store_error)?;
                entry.bad_chunks = r.bad_chunks();
                entry.data_digest = r.data_digest;
                entry.omap_digest = r.omap_digest;
                entry.attrs_digest = r.attrs_digest;
                let head = store.head(o).map_err(store_error)?;
                let clones = snaps::clone_objects(o, head.as_ref())?;
                if !clones.is_empty() {
                    let mut h = blake3::Hasher::new();
                    h.update(&entry.data_digest);
                    for c in clones {
                        let r = store.deep_scrub_object(&c).map_err(store_error)?;
                        if !r.bad_chunks().is_empty() {
                            entry.bad_clones.push(c.snap());
                        }
                        h.update(&c.snap().to_be_bytes());
                        h.update(&r.data_digest);
                        h.update(&r.omap_digest);
                        h.update(&r.attrs_digest);
                    }
                    entry.data_digest = *h.finalize().as_bytes();
                }
            }
            out.insert(name, entry);
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    Ok(out)
}

/// One inconsistent object: which members hold a bad (or no) copy, and a member whose copy
/// is good (the repair source), if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inconsistency {
    pub namespace: String,
    pub name: String,
    pub bad: Vec<OsdId>,
    pub good: Option<OsdId>,
    pub why: String,
}

/// Compares the members' scrub maps. A copy is good when its chunks all verify; among good
/// copies the one most members agree with (ties: the primary's, then the lowest id) is
/// authoritative, and every copy that differs from it, has bad chunks or is missing is bad.
pub fn compare_scrub_maps(primary: OsdId, maps: &BTreeMap<OsdId, ScrubMap>) -> Vec<Inconsistency> {
    let names: BTreeSet<&ObjectName> = maps.values().flat_map(|m| m.keys()).collect();
    let mut out = Vec::new();
    for name in names {
        let copies: BTreeMap<OsdId, Option<&ScrubObject>> =
            maps.iter().map(|(&osd, m)| (osd, m.get(name))).collect();
        let key = |o: &ScrubObject| {
            (
                o.version,
                o.size,
                o.data_digest,
                o.omap_digest,
                o.attrs_digest,
            )
        };
        let mut votes: BTreeMap<_, Vec<OsdId>> = BTreeMap::new();
        for (&osd, c) in &copies {
            if let Some(c) = c.filter(|c| c.verifies()) {
                votes.entry(key(c)).or_default().push(osd);
            }
        }
        let auth = votes.values().max_by(|a, b| {
            a.len()
                .cmp(&b.len())
                .then_with(|| a.contains(&primary).cmp(&b.contains(&primary)))
                .then_with(|| b.first().cmp(&a.first()))
        });
        let auth_key = auth
            .and_then(|v| v.first())
            .and_then(|o| copies[o])
            .map(key);
        let mut bad = Vec::new();
        let mut why = Vec::new();
        for (&osd, c) in &copies {
            match c {
                None => {
                    bad.push(osd);
                    why.push(format!("osd.{osd}: missing"));
                }
                Some(c) if !c.bad_chunks.is_empty() => {
                    bad.push(osd);
                    why.push(format!(
                        "osd.{osd}: chunks {:?} fail their checksum",
                        c.bad_chunks
                    ));
                }
                Some(c) if !c.bad_clones.is_empty() => {
                    bad.push(osd);
                    why.push(format!(
                        "osd.{osd}: snapshot clones {:?} fail their checksum",
                        c.bad_clones
                    ));
                }
                Some(c) if Some(key(c)) != auth_key => {
                    bad.push(osd);
                    why.push(format!("osd.{osd}: differs from the authoritative copy"));
                }
                Some(_) => {}
            }
        }
        if !bad.is_empty() {
            out.push(Inconsistency {
                namespace: name.0.clone(),
                name: name.1.clone(),
                bad,
                good: auth.and_then(|v| v.first().copied()),
                why: why.join("; "),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_full_pool_runs_only_what_frees_space() {
        use super::full_verdict;
        use basalt_ops::ObjOp;
        use bytes::Bytes;
        let write = ObjOp::Write {
            offset: 0,
            data: Bytes::from_static(b"x"),
        };
        let omap = ObjOp::OmapSet {
            entries: vec![(Bytes::from_static(b"size"), Bytes::from_static(b"1"))],
        };
        // Freeing ops run for anyone, with or without the flag.
        for ops in [
            vec![ObjOp::Remove],
            vec![ObjOp::Truncate { size: 0 }],
            vec![ObjOp::Zero {
                offset: 0,
                len: 4096,
            }],
            vec![ObjOp::OmapRmKeys { keys: vec![] }],
            vec![ObjOp::Unlock {
                name: "rbd_lock".into(),
                cookie: "c".into(),
            }],
        ] {
            assert_eq!(full_verdict(&ops, false, false), Ok(()), "{ops:?}");
        }
        // Ops that may store more are refused without the flag...
        assert!(full_verdict(&[write.clone()], false, false).is_err());
        assert!(full_verdict(&[omap.clone()], false, false).is_err());
        // ...and with it run only on existing objects and without data.
        assert_eq!(full_verdict(&[omap.clone()], true, false), Ok(()));
        assert!(full_verdict(&[omap], true, true).is_err());
        assert!(full_verdict(&[write], true, false).is_err());
        assert_eq!(
            full_verdict(
                &[ObjOp::WriteFull { data: Bytes::new() }, ObjOp::Remove],
                true,
                false
            ),
            Ok(())
        );
    }

    use super::*;
    use crate::store::StoreConfig;

    fn ev(epoch: u64, seq: u64) -> Eversion {
        Eversion { epoch, seq }
    }

    fn name(n: &str) -> ObjectName {
        (String::new(), n.to_string())
    }

    fn scrubbed(v: u64, digest: u8, bad: &[u64]) -> ScrubObject {
        ScrubObject {
            version: ev(1, v),
            size: 10,
            data_digest: [digest; 32],
            omap_digest: [0; 32],
            attrs_digest: [0; 32],
            bad_chunks: bad.to_vec(),
            bad_clones: vec![],
        }
    }

    #[test]
    fn scrub_finds_bit_rot_missing_and_divergent_copies() {
        let mut maps: BTreeMap<OsdId, ScrubMap> = BTreeMap::new();
        for osd in [1, 2, 3] {
            maps.insert(osd, ScrubMap::new());
        }
        // "a": osd.2's chunk 0 fails its checksum.
        maps.get_mut(&1)
            .expect("1")
            .insert(name("a"), scrubbed(1, 7, &[]));
        maps.get_mut(&2)
            .expect("2")
            .insert(name("a"), scrubbed(1, 9, &[0]));
        maps.get_mut(&3)
            .expect("3")
            .insert(name("a"), scrubbed(1, 7, &[]));
        // "b": missing on osd.3.
        maps.get_mut(&1)
            .expect("1")
            .insert(name("b"), scrubbed(2, 1, &[]));
        maps.get_mut(&2)
            .expect("2")
            .insert(name("b"), scrubbed(2, 1, &[]));
        // "c": osd.1 (primary) differs; the majority wins.
        maps.get_mut(&1)
            .expect("1")
            .insert(name("c"), scrubbed(3, 5, &[]));
        maps.get_mut(&2)
            .expect("2")
            .insert(name("c"), scrubbed(3, 6, &[]));
        maps.get_mut(&3)
            .expect("3")
            .insert(name("c"), scrubbed(3, 6, &[]));
        // "d": consistent.
        for osd in [1, 2, 3] {
            maps.get_mut(&osd)
                .expect("osd")
                .insert(name("d"), scrubbed(4, 4, &[]));
        }
        let found = compare_scrub_maps(1, &maps);
        let by_name: BTreeMap<&str, &Inconsistency> =
            found.iter().map(|i| (i.name.as_str(), i)).collect();
        assert_eq!(by_name.len(), 3, "{found:?}");
        assert_eq!(by_name["a"].bad, vec![2]);
        assert_eq!(by_name["a"].good, Some(1));
        assert_eq!(by_name["b"].bad, vec![3]);
        assert_eq!(by_name["c"].bad, vec![1]);
        assert_eq!(by_name["c"].good, Some(2));
    }

    #[test]
    fn locks_follow_cls_lock_rules() {
        let mut st = LockState::default();
        lock(&mut st, "c1", LockKind::Exclusive, "k1", "", "d").expect("first");
        lock(&mut st, "c1", LockKind::Exclusive, "k1", "", "d").expect("idempotent");
        assert!(matches!(
            lock(&mut st, "c2", LockKind::Exclusive, "k2", "", "d"),
            Err(OpError::Busy(_))
        ));
        assert!(matches!(
            unlock(&mut st, "c2", "k2"),
            Err(OpError::NotFound)
        ));
        unlock(&mut st, "c1", "k1").expect("unlock");
        lock(&mut st, "a", LockKind::Shared, "1", "t", "").expect("shared");
        lock(&mut st, "b", LockKind::Shared, "2", "t", "").expect("shared 2");
        assert!(lock(&mut st, "c", LockKind::Shared, "3", "other", "").is_err());
        assert!(lock(&mut st, "c", LockKind::Exclusive, "3", "t", "").is_err());
    }

    #[test]
    fn execute_builds_atomic_writes_and_reads_see_the_old_state() {
        let store = Store::in_memory(StoreConfig::default()).expect("store");
        let pg = PgId { pool: 1, seed: 0 };
        let mut t = Transaction::new();
        t.pg_create(pg);
        store.submit_blocking(&t).expect("pg");
        let obj = ObjectId::new(pg, "o");
        let none = || vec![];
        let ops = vec![
            ObjOp::WriteFull {
                data: Bytes::from_static(b"hello"),
            },
            ObjOp::SetXattr {
                name: "k".into(),
                value: Bytes::from_static(b"v"),
            },
        ];
        let ex = execute(&store, &obj, "c", &ops, &SnapArgs::default(), &none).expect("exec");
        assert!(ex.is_write && !ex.removed);
        store.submit_blocking(&ex.txn).expect("apply");
        let ops = vec![
            ObjOp::Read {
                offset: 0,
                len: 100,
            },
            ObjOp::Remove,
        ];
        let ex = execute(&store, &obj, "c", &ops, &SnapArgs::default(), &none).expect("exec");
        assert_eq!(ex.outputs[0], OpOutput::Data(Bytes::from_static(b"hello")));
        assert!(ex.removed);
        // A failing guard fails the whole request.
        let ops = vec![
            ObjOp::WriteFull {
                data: Bytes::from_static(b"x"),
            },
            ObjOp::CmpXattr {
                name: "k".into(),
                value: Some(Bytes::from_static(b"no")),
            },
        ];
        assert!(matches!(
            execute(&store, &obj, "c", &ops, &SnapArgs::default(), &none),
            Err(OpError::CmpFailed(_))
        ));
        // Reserved names are refused.
        let ops = vec![ObjOp::SetXattr {
            name: "lock.x".into(),
            value: Bytes::new(),
        }];
        assert!(execute(&store, &obj, "c", &ops, &SnapArgs::default(), &none).is_err());
    }

    #[test]
    fn chunked_scrub_maps_and_scan_pages_cover_every_object_once() {
        let pg = PgId { pool: 3, seed: 0 };
        let store = Store::in_memory(StoreConfig::default()).expect("store");
        let mut t = Transaction::new();
        t.pg_create(pg);
        for i in 0..40 {
            let obj = ObjectId::new(pg, format!("obj{i}"));
            t.create(&obj, false);
            t.write_full(&obj, Bytes::from_static(b"x"));
        }
        store.submit_blocking(&t).expect("objects");
        // Scrub chunks as the primary cuts them: its first 7, ending at the last listed.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let first = NameRange {
                after: after.clone(),
                until: None,
            };
            let chunk = scrub_map(&store, pg, false, &first, 7).expect("chunk");
            let until = (chunk.len() >= 7)
                .then(|| chunk.keys().max_by_key(|n| listing_key(pg, n)).cloned())
                .flatten();
            // A replica mapping the same range sees the same objects.
            let same = NameRange {
                after: after.clone(),
                until: until.clone(),
            };
            let replica = scrub_map(&store, pg, false, &same, usize::MAX).expect("range");
            assert_eq!(
                replica.keys().collect::<Vec<_>>(),
                chunk.keys().collect::<Vec<_>>()
            );
            seen.extend(chunk.into_keys());
            match until {
                Some(u) => after = Some(u),
                None => break,
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 40);
        let mut paged = Vec::new();
        let mut cursor = None;
        loop {
            let page = scan_objects(&store, pg, cursor.as_ref(), 6).expect("page");
            cursor = page.last().map(|(n, _)| n.clone());
            let done = page.len() < 6;
            paged.extend(page.into_iter().map(|(n, _)| n));
            if done {
                break;
            }
        }
        assert_eq!(paged.len(), 40);
        assert!(paged
            .windows(2)
            .all(|w| listing_key(pg, &w[0]) < listing_key(pg, &w[1])));
    }

    #[test]
    fn push_makes_a_peer_equal_to_the_authority() {
        let pg = PgId { pool: 2, seed: 1 };
        let auth = Store::in_memory(StoreConfig::default()).expect("store");
        let peer = Store::in_memory(StoreConfig::default()).expect("store");
        for s in [&auth, &peer] {
            let mut t = Transaction::new();
            t.pg_create(pg);
            s.submit_blocking(&t).expect("pg");
        }
        let write = |s: &Store, n: &str, data: &'static [u8], v: Eversion| {
            let obj = ObjectId::new(pg, n);
            let ops = vec![ObjOp::WriteFull {
                data: Bytes::from_static(data),
            }];
            let mut ex =
                execute(s, &obj, "c", &ops, &SnapArgs::default(), &|| vec![]).expect("exec");
            let reqid = ReqId {
                client: "c".into(),
                incarnation: 1,
                tid: v.seq,
            };
            let (exists, removed) = (ex.stored_after, ex.removed);
            finish_write(
                &mut ex.txn,
                &obj,
                exists,
                removed,
                v,
                &reqid,
                Bytes::new(),
                0,
                3000,
            );
            s.submit_blocking(&ex.txn).expect("apply");
        };
        write(&auth, "a", b"new", ev(2, 2));
        write(&auth, "b", b"bb", ev(2, 3));
        write(&peer, "a", b"old", ev(1, 1));
        write(&peer, "z", b"zz", ev(1, 2));
        // The logs share nothing, so this is a backfill: diff the scans, push the difference.
        let auth_state = peer_state(&auth, pg).expect("s");
        assert_eq!(
            crate::peering::catchup(&auth_state, &peer_state(&peer, pg).expect("s")),
            crate::peering::Catchup::Backfill { after: None }
        );
        let (copy, remove) = crate::peering::backfill_diff(
            &scan_objects(&auth, pg, None, 100).expect("scan"),
            &scan_objects(&peer, pg, None, 100).expect("scan"),
        );
        assert_eq!(
            copy,
            vec![(String::new(), "a".into()), (String::new(), "b".into())]
        );
        assert_eq!(remove, vec![(String::new(), "z".into())]);
        let push = Push {
            objects: copy
                .iter()
                .map(|(ns, n)| {
                    object_state(&auth, &ObjectId::with_namespace(pg, ns.clone(), n.clone()))
                        .expect("state")
                })
                .collect(),
            remove,
            log: Some(auth_state.log.clone()),
            info: Some(auth_state.info.clone()),
        };
        let txn = apply_push(&peer, pg, 8, &push).expect("push");
        peer.submit_blocking(&txn).expect("apply");
        assert_eq!(peer_state(&peer, pg).expect("s"), auth_state);
        assert_eq!(
            scan_objects(&peer, pg, None, 100).expect("scan"),
            scan_objects(&auth, pg, None, 100).expect("scan")
        );
        assert_eq!(
            scan_objects(&peer, pg, Some(&(String::new(), "a".into())), 100).expect("scan"),
            vec![((String::new(), "b".into()), ev(2, 3))]
        );
        assert_eq!(
            peer.read(&ObjectId::new(pg, "a"), 0, 10).expect("read"),
            Bytes::from_static(b"new")
        );
        let reqid = ReqId {
            client: "c".into(),
            incarnation: 1,
            tid: 3,
        };
        assert!(peer.dup_lookup(pg, &reqid.key()).expect("dup").is_some());
    }
}
