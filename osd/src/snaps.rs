//! Self-managed snapshots of one object: which clones preserve it for which snapshots, the
//! copy-on-write a write does first, reads at a snapshot, rollback and trimming.
//!
//! The model is Ceph's (a `SnapSet` beside the head, one clone per run of snapshots taken
//! while the head did not change), with the copying at the granularity of the store's
//! 64 KiB chunks rather than whole objects:
//!
//! - A clone starts empty. Before a write changes a chunk of the head, the newest clone gets
//!   a copy of that chunk unless it already owns one (`owned`). A chunk a clone does not own
//!   reads the same as in the next newer clone (or the head), so a read at a snapshot walks
//!   newer clones until one owns the chunk. The first write to each 64 KiB after a snapshot
//!   therefore costs one chunk copy, and a snapshot costs nothing until then.
//! - Why chunks are copied rather than shared by reference: the store's extents are not
//!   reference-counted, and sharing needs that for trimming and for a 4 KiB edit of a shared
//!   chunk alike; a copy of the chunk the write is about to change is what a shared chunk
//!   would cost on that write anyway.
//! - A deleted object whose clones are still needed leaves a *whiteout* head: empty, with
//!   the snap set and a marker, invisible to clients, copied by recovery like any object.
//! - The copies go into the same transaction as the write, so they are replicated, logged and
//!   recovered with it; clones are store objects at `ObjectId::at_snap(id)`, next to their
//!   head in the store's order, so backfill and PG splits carry them along.
//!
//! Pure over the store's read API: it reads the current state and adds to a transaction.

use std::collections::BTreeSet;

use basalt_ops::{CloneSummary, ObjOp, OpError, SnapContext, SnapListing};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::pg::store_error;
use crate::store::{ObjectHead, ObjectId, Store, Transaction, CHUNK_SIZE};

/// Prefix of the xattrs snapshots keep on a head; hidden from clients and not settable.
pub const SNAP_XATTR_PREFIX: &str = "snap.";
/// The head's [`SnapSet`].
const SNAPSET_XATTR: &str = "snap.set";
/// Present on a whiteout head (a deleted object whose clones remain).
const WHITEOUT_XATTR: &str = "snap.whiteout";

/// One clone: the object as it was for snapshots `snaps` (ids in `covers_from..=id`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    pub id: u64,
    pub covers_from: u64,
    /// The snapshots it serves, ascending; trimming removes ids, and an empty clone goes.
    pub snaps: Vec<u64>,
    /// The object's size then.
    pub size: u64,
    /// Chunk indexes this clone holds a copy of; every other chunk below `size` reads as in
    /// the next newer clone, or the head.
    pub owned: BTreeSet<u64>,
}

/// What a head records about its clones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapSet {
    /// The newest snap context `seq` a write to the object carried.
    pub seq: u64,
    /// Oldest first (ascending ids).
    pub clones: Vec<CloneRecord>,
}

impl SnapSet {
    /// The snap set stored on `head` (empty when none, or when there is no head).
    pub fn of(head: Option<&ObjectHead>) -> Result<SnapSet, OpError> {
        match head.and_then(|h| h.xattr(SNAPSET_XATTR)) {
            Some(b) => basalt_ops::decode(&b, "snap set"),
            None => Ok(SnapSet::default()),
        }
    }

    /// Which object serves a read at snapshot `snap`.
    pub fn resolve(&self, head_live: bool, snap: u64) -> Resolved {
        match self.clones.iter().position(|c| c.id >= snap) {
            Some(i) if snap >= self.clones[i].covers_from => Resolved::Clone(i),
            Some(_) => Resolved::Absent,
            None if head_live && snap > self.seq => Resolved::Head,
            None => Resolved::Absent,
        }
    }

    pub fn listing(&self, head_live: bool) -> SnapListing {
        SnapListing {
            seq: self.seq,
            head_exists: head_live,
            clones: self
                .clones
                .iter()
                .map(|c| CloneSummary {
                    id: c.id,
                    covers_from: c.covers_from,
                    snaps: c.snaps.clone(),
                    size: c.size,
                    differs: ranges(&c.owned, c.size),
                })
                .collect(),
        }
    }
}

/// Where a read at a snapshot goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Head,
    /// The clone at this index of [`SnapSet::clones`].
    Clone(usize),
    /// The object did not exist at that snapshot.
    Absent,
}

/// Whether `head` is a whiteout (the object was deleted; clones remain).
pub fn is_whiteout(head: Option<&ObjectHead>) -> bool {
    head.is_some_and(|h| h.xattr(WHITEOUT_XATTR).is_some())
}

fn clone_id(obj: &ObjectId, id: u64) -> ObjectId {
    obj.clone().at_snap(id)
}

/// Owned chunks as byte ranges, clamped to `size`, adjacent chunks merged.
fn ranges(owned: &BTreeSet<u64>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &k in owned {
        let start = k * CHUNK_SIZE;
        if start >= size {
            break;
        }
        let len = CHUNK_SIZE.min(size - start);
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

/// The chunks of an object of `size` bytes whose existing bytes `ops` may change (what the
/// newest clone must hold a copy of first). Appends and growth change no existing byte.
pub fn chunks_touched(ops: &[ObjOp], size: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let nchunks = size.div_ceil(CHUNK_SIZE);
    let mut span = |from: u64, to: u64| {
        // [from, to) clamped to the existing bytes
        let to = to.min(size);
        if from < to {
            out.extend(from / CHUNK_SIZE..=(to - 1) / CHUNK_SIZE);
        }
    };
    for op in ops {
        match op {
            ObjOp::Write { offset, data } => span(*offset, offset + data.len() as u64),
            ObjOp::Zero { offset, len } => span(*offset, offset.saturating_add(*len)),
            ObjOp::Truncate { size: to } => span(*to, size),
            ObjOp::WriteFull { .. } | ObjOp::Remove | ObjOp::Rollback { .. } => {
                span(0, nchunks * CHUNK_SIZE)
            }
            _ => {}
        }
    }
    out
}

/// Before a write of `ops` under `snapc` changes `obj` (whose head is `head`, with snap set
/// `ss` as stored there): adds to `txn` the clone a new snapshot needs and the copies of the
/// chunks the write touches, and returns the snap set as it must be after the write (the
/// caller stores it with [`finish`]).
pub fn before_write(
    store: &Store,
    obj: &ObjectId,
    head: Option<&ObjectHead>,
    mut ss: SnapSet,
    snapc: &SnapContext,
    ops: &[ObjOp],
    txn: &mut Transaction,
) -> Result<SnapSet, OpError> {
    let live = head.filter(|_| !is_whiteout(head));
    if let Some(h) = live {
        let newer: Vec<u64> = snapc
            .snaps
            .iter()
            .copied()
            .filter(|&s| s > ss.seq)
            .collect();
        if let Some(&id) = newer.first() {
            // The head as it stands is what the snapshots since its last write saw.
            let cid = clone_id(obj, id);
            txn.create(&cid, false);
            for (k, v) in h.xattrs() {
                if !k.starts_with(SNAP_XATTR_PREFIX) {
                    txn.setxattr(&cid, k.clone(), v.clone());
                }
            }
            copy_omap(store, obj, &cid, txn)?;
            txn.set_meta(&cid, h.meta().clone());
            let mut snaps = newer;
            snaps.reverse();
            ss.clones.push(CloneRecord {
                id,
                covers_from: ss.seq + 1,
                snaps,
                size: h.stat().size,
                owned: BTreeSet::new(),
            });
        }
    }
    ss.seq = ss.seq.max(snapc.seq);
    if let (Some(h), Some(newest)) = (live, ss.clones.last_mut()) {
        let cid = clone_id(obj, newest.id);
        for k in chunks_touched(ops, h.stat().size) {
            let start = k * CHUNK_SIZE;
            if start >= newest.size || newest.owned.contains(&k) {
                continue;
            }
            let len = CHUNK_SIZE.min(newest.size - start);
            let data = store.read_head(obj, h, start, len).map_err(store_error)?;
            txn.write(&cid, start, data);
            newest.owned.insert(k);
        }
    }
    Ok(ss)
}

fn copy_omap(
    store: &Store,
    from: &ObjectId,
    to: &ObjectId,
    txn: &mut Transaction,
) -> Result<(), OpError> {
    if let Some(h) = store.omap_get_header(from).map_err(store_error)? {
        txn.omap_set_header(to, h);
    }
    let mut after: Option<Bytes> = None;
    loop {
        let page = store
            .omap_list(from, after.as_deref(), 1024)
            .map_err(store_error)?;
        after = page.entries.last().map(|(k, _)| k.clone());
        if !page.entries.is_empty() {
            txn.omap_set(to, page.entries);
        }
        if !page.more || after.is_none() {
            return Ok(());
        }
    }
}

/// Stores `ss` with the write: on the head if it exists after the write; if the write
/// removed it while clones remain, the head becomes a whiteout instead (the caller has
/// already added the removal); a whiteout whose last clone went is removed. Returns whether
/// the head is a whiteout after the write.
pub fn finish(
    obj: &ObjectId,
    head: Option<&ObjectHead>,
    before: &SnapSet,
    ss: &SnapSet,
    exists_after: bool,
    txn: &mut Transaction,
) -> bool {
    let was_whiteout = is_whiteout(head);
    if exists_after {
        if was_whiteout {
            txn.rmxattr(obj, WHITEOUT_XATTR);
        }
        if ss != before || was_whiteout {
            if *ss == SnapSet::default() {
                txn.rmxattr(obj, SNAPSET_XATTR);
            } else {
                txn.setxattr(obj, SNAPSET_XATTR, basalt_ops::encode(ss));
            }
        }
        false
    } else if !ss.clones.is_empty() {
        // The removal (already in `txn`, or a whiteout already there) is followed by an
        // empty head that keeps the record.
        txn.create(obj, false);
        txn.setxattr(obj, WHITEOUT_XATTR, Bytes::new());
        txn.setxattr(obj, SNAPSET_XATTR, basalt_ops::encode(ss));
        true
    } else {
        if was_whiteout {
            txn.remove(obj);
        }
        false
    }
}

/// `obj` at snapshot `snap` (`head`'s snap set decides which object holds it): its bytes in
/// `[offset, offset + len)` clamped to its size, or `None` if it did not exist then.
pub fn read_at(
    store: &Store,
    obj: &ObjectId,
    head: Option<&ObjectHead>,
    snap: u64,
    offset: u64,
    len: u64,
) -> Result<Option<Bytes>, OpError> {
    let ss = SnapSet::of(head)?;
    let live = head.is_some() && !is_whiteout(head);
    let i = match ss.resolve(live, snap) {
        Resolved::Absent => return Ok(None),
        Resolved::Head => {
            let h = head.ok_or(OpError::NotFound)?;
            return store
                .read_head(obj, h, offset, len)
                .map(Some)
                .map_err(store_error);
        }
        Resolved::Clone(i) => i,
    };
    let size = ss.clones[i].size;
    if offset >= size || len == 0 {
        return Ok(Some(Bytes::new()));
    }
    let end = offset.saturating_add(len).min(size);
    let mut out = BytesMut::with_capacity((end - offset) as usize);
    let mut at = offset;
    while at < end {
        let k = at / CHUNK_SIZE;
        let upto = ((k + 1) * CHUNK_SIZE).min(end);
        let owner = ss.clones[i..].iter().find(|c| c.owned.contains(&k));
        let part = match owner {
            Some(c) => store.read(&clone_id(obj, c.id), at, upto - at),
            None => match head {
                Some(h) => store.read_head(obj, h, at, upto - at),
                None => Ok(Bytes::new()),
            },
        }
        .map_err(store_error)?;
        out.extend_from_slice(&part);
        // A chunk past the end of what holds it reads as zeros (a hole).
        out.resize((upto - offset) as usize, 0);
        at = upto;
    }
    Ok(Some(out.freeze()))
}

/// The store object that holds `obj`'s xattrs and metadata at `snap` (`None`: it did not
/// exist then), with the object's size at that snapshot.
pub fn object_at(
    obj: &ObjectId,
    head: Option<&ObjectHead>,
    snap: u64,
) -> Result<Option<(ObjectId, u64)>, OpError> {
    let ss = SnapSet::of(head)?;
    let live = head.is_some() && !is_whiteout(head);
    Ok(match ss.resolve(live, snap) {
        Resolved::Absent => None,
        Resolved::Head => head.map(|h| (obj.clone(), h.stat().size)),
        Resolved::Clone(i) => Some((clone_id(obj, ss.clones[i].id), ss.clones[i].size)),
    })
}

/// Drops the `removed` snapshots from `ss`'s clones; a clone left serving none is deleted,
/// its chunks first handed to the next older clone where that one reads through to it.
pub fn trim(
    store: &Store,
    obj: &ObjectId,
    ss: &mut SnapSet,
    removed: &[u64],
    txn: &mut Transaction,
) -> Result<(), OpError> {
    let mut i = 0;
    while i < ss.clones.len() {
        ss.clones[i].snaps.retain(|s| !removed.contains(s));
        if !ss.clones[i].snaps.is_empty() {
            i += 1;
            continue;
        }
        let gone = ss.clones.remove(i);
        let gone_obj = clone_id(obj, gone.id);
        if i > 0 {
            let older = &mut ss.clones[i - 1];
            let older_obj = clone_id(obj, older.id);
            for &k in &gone.owned {
                let start = k * CHUNK_SIZE;
                if start >= older.size || older.owned.contains(&k) {
                    continue;
                }
                let len = CHUNK_SIZE.min(older.size - start);
                let data = store.read(&gone_obj, start, len).map_err(store_error)?;
                txn.write(&older_obj, start, data);
                older.owned.insert(k);
            }
        }
        txn.remove(&gone_obj);
    }
    Ok(())
}

/// Adds to `txn` the removal of every clone `head` records (with the head itself removed by
/// the caller): recovery replacing an object, backfill dropping one.
pub fn remove_clones(obj: &ObjectId, head: Option<&ObjectHead>, txn: &mut Transaction) {
    if let Ok(ss) = SnapSet::of(head) {
        for c in &ss.clones {
            txn.remove(&clone_id(obj, c.id));
        }
    }
}

/// The clones `head` records, as store ids (for recovery to copy them).
pub fn clone_objects(obj: &ObjectId, head: Option<&ObjectHead>) -> Result<Vec<ObjectId>, OpError> {
    Ok(SnapSet::of(head)?
        .clones
        .iter()
        .map(|c| clone_id(obj, c.id))
        .collect())
}

#[cfg(test)]
mod tests;
