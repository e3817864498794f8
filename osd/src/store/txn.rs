//! Transactions: the op list callers build, and the executor that turns one into a single
//! atomic batch of key-value mutations.
//!
//! The executor reads the current state (onodes, the chunks a partial write touches, PG and dup
//! records), applies the ops in order to a per-object overlay so later ops see earlier ones, and
//! emits the resulting puts and deletes. Any failing op aborts the build before anything is
//! written, which is what makes a failed transaction leave no trace.

use std::collections::{BTreeMap, HashMap};

use basalt_placement::PgId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::data::{block_crc, DataArea, Extent, BLOCK};
use super::engine::{Cf, Engine, KvOp};
use super::error::{Result, StoreError};
use super::journal::{BlockWrite, Record};
use super::keys::{self, prefix_end};
use super::onode::Onode;
use super::types::*;

/// One operation. Public so the PG layer can inspect a transaction (e.g. which objects it
/// touches); build them with the [`Transaction`] methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Create {
        obj: ObjectId,
        exclusive: bool,
    },
    Write {
        obj: ObjectId,
        offset: u64,
        data: Bytes,
    },
    WriteFull {
        obj: ObjectId,
        data: Bytes,
    },
    Append {
        obj: ObjectId,
        data: Bytes,
    },
    Truncate {
        obj: ObjectId,
        size: u64,
    },
    Zero {
        obj: ObjectId,
        offset: u64,
        len: u64,
    },
    Remove {
        obj: ObjectId,
    },
    SetMeta {
        obj: ObjectId,
        meta: ObjectMeta,
    },
    SetXattr {
        obj: ObjectId,
        name: String,
        value: Bytes,
    },
    RmXattr {
        obj: ObjectId,
        name: String,
    },
    OmapSet {
        obj: ObjectId,
        entries: Vec<(Bytes, Bytes)>,
    },
    OmapRmKeys {
        obj: ObjectId,
        keys: Vec<Bytes>,
    },
    OmapRmRange {
        obj: ObjectId,
        start: Bytes,
        end: Bytes,
    },
    OmapClear {
        obj: ObjectId,
    },
    OmapSetHeader {
        obj: ObjectId,
        header: Bytes,
    },
    PgCreate {
        pg: PgId,
    },
    PgRemove {
        pg: PgId,
    },
    PgSplit {
        parent: PgId,
        pg_num: u32,
        children: Vec<u32>,
        log_moves: Vec<(u64, u32)>,
    },
    PgLogAppend {
        pg: PgId,
        version: u64,
        entry: Bytes,
    },
    PgLogTrim {
        pg: PgId,
        up_to: u64,
    },
    PgLogRemoveFrom {
        pg: PgId,
        from: u64,
    },
    PgInfoSet {
        pg: PgId,
        info: Bytes,
    },
    DupRecord {
        pg: PgId,
        reqid: Bytes,
        version: u64,
        result: Bytes,
    },
    DupTrim {
        pg: PgId,
        up_to: u64,
    },
    MetaSet {
        key: Bytes,
        value: Bytes,
    },
    MetaRemove {
        key: Bytes,
    },
}

/// An ordered list of ops applied all-or-nothing by [`Store::submit`](super::Store::submit).
///
/// Semantics, op by op:
/// - `write`, `write_full`, `append`, `zero` create the object if it is missing; `create`
///   creates it (exclusive: fails with `AlreadyExists` if present). Everything else on an object
///   (`truncate`, `remove`, `set_meta`, xattrs, omap) needs it to exist (`NotFound`).
/// - `zero` is a write of zeros: it extends the size like a write would (as BlueStore does) but
///   stores nothing for the zeroed range.
/// - A zero-length write only creates the object; it does not move the size.
/// - `write_full` replaces the data and keeps xattrs and omap.
/// - Object ops need their PG created (`pg_create`), else `NoSuchPg`.
/// - A `pg_remove` wipes the PG's objects, omap, data, log, info and dups; ops after it in the
///   same transaction see an empty, non-existent PG.
///
/// Serialisable, so the primary can ship the very transaction it applied to its replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    ops: Vec<Op>,
}

impl Transaction {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// The PG log and dup record ops of this transaction, without what it does to objects:
    /// what a backfill target gets of a write to an object its backfill has not reached
    /// yet, so its log stays the primary's (later writes to the object find the entries
    /// they follow) while the object itself is copied when the backfill gets to it.
    pub fn log_only(&self) -> Transaction {
        Transaction {
            ops: self
                .ops
                .iter()
                .filter(|op| {
                    matches!(
                        op,
                        Op::PgLogAppend { .. }
                            | Op::PgLogTrim { .. }
                            | Op::DupRecord { .. }
                            | Op::DupTrim { .. }
                    )
                })
                .cloned()
                .collect(),
        }
    }

    pub fn create(&mut self, obj: &ObjectId, exclusive: bool) -> &mut Self {
        self.push(Op::Create {
            obj: obj.clone(),
            exclusive,
        })
    }
    pub fn write(&mut self, obj: &ObjectId, offset: u64, data: impl Into<Bytes>) -> &mut Self {
        self.push(Op::Write {
            obj: obj.clone(),
            offset,
            data: data.into(),
        })
    }
    pub fn write_full(&mut self, obj: &ObjectId, data: impl Into<Bytes>) -> &mut Self {
        self.push(Op::WriteFull {
            obj: obj.clone(),
            data: data.into(),
        })
    }
    pub fn append(&mut self, obj: &ObjectId, data: impl Into<Bytes>) -> &mut Self {
        self.push(Op::Append {
            obj: obj.clone(),
            data: data.into(),
        })
    }
    pub fn truncate(&mut self, obj: &ObjectId, size: u64) -> &mut Self {
        self.push(Op::Truncate {
            obj: obj.clone(),
            size,
        })
    }
    pub fn zero(&mut self, obj: &ObjectId, offset: u64, len: u64) -> &mut Self {
        self.push(Op::Zero {
            obj: obj.clone(),
            offset,
            len,
        })
    }
    pub fn remove(&mut self, obj: &ObjectId) -> &mut Self {
        self.push(Op::Remove { obj: obj.clone() })
    }
    pub fn set_meta(&mut self, obj: &ObjectId, meta: ObjectMeta) -> &mut Self {
        self.push(Op::SetMeta {
            obj: obj.clone(),
            meta,
        })
    }
    pub fn setxattr(
        &mut self,
        obj: &ObjectId,
        name: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        self.push(Op::SetXattr {
            obj: obj.clone(),
            name: name.into(),
            value: value.into(),
        })
    }
    pub fn rmxattr(&mut self, obj: &ObjectId, name: impl Into<String>) -> &mut Self {
        self.push(Op::RmXattr {
            obj: obj.clone(),
            name: name.into(),
        })
    }
    pub fn omap_set<K: Into<Bytes>, V: Into<Bytes>>(
        &mut self,
        obj: &ObjectId,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> &mut Self {
        self.push(Op::OmapSet {
            obj: obj.clone(),
            entries: entries
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        })
    }
    pub fn omap_rm_keys<K: Into<Bytes>>(
        &mut self,
        obj: &ObjectId,
        keys: impl IntoIterator<Item = K>,
    ) -> &mut Self {
        self.push(Op::OmapRmKeys {
            obj: obj.clone(),
            keys: keys.into_iter().map(Into::into).collect(),
        })
    }
    /// Removes keys in `[start, end)`.
    pub fn omap_rm_range(
        &mut self,
        obj: &ObjectId,
        start: impl Into<Bytes>,
        end: impl Into<Bytes>,
    ) -> &mut Self {
        self.push(Op::OmapRmRange {
            obj: obj.clone(),
            start: start.into(),
            end: end.into(),
        })
    }
    /// Removes every omap entry and the header.
    pub fn omap_clear(&mut self, obj: &ObjectId) -> &mut Self {
        self.push(Op::OmapClear { obj: obj.clone() })
    }
    pub fn omap_set_header(&mut self, obj: &ObjectId, header: impl Into<Bytes>) -> &mut Self {
        self.push(Op::OmapSetHeader {
            obj: obj.clone(),
            header: header.into(),
        })
    }
    pub fn pg_create(&mut self, pg: PgId) -> &mut Self {
        self.push(Op::PgCreate { pg })
    }
    pub fn pg_remove(&mut self, pg: PgId) -> &mut Self {
        self.push(Op::PgRemove { pg })
    }
    /// Splits `parent` for its pool's new PG count `pg_num`: every object of `parent` whose
    /// placement hash now maps to another PG moves there (its onode, extent records, omap
    /// and xattrs: keys only, the data blocks stay where they are), that PG being one of
    /// `children` (seeds of the same pool, already created, e.g. by `pg_create` earlier in
    /// this transaction). The log entries at the versions in `log_moves` move to the child
    /// seed given with each (the store cannot read the opaque entries; the caller knows
    /// their objects), and every dup record of `parent` is copied to every child, so a
    /// resent request is recognised wherever its object went.
    ///
    /// It reads the stored state of `parent`, so it must come before any other op on
    /// `parent` or on a child's objects in its transaction, and no op after it may touch
    /// their objects (both refused with `InvalidArgument`); PG records (info, log, dups) of
    /// the children may follow. Everything moves in the one atomic record of the
    /// transaction, so a crash leaves the PG either whole or split.
    pub fn pg_split(
        &mut self,
        parent: PgId,
        pg_num: u32,
        children: Vec<u32>,
        log_moves: Vec<(u64, u32)>,
    ) -> &mut Self {
        self.push(Op::PgSplit {
            parent,
            pg_num,
            children,
            log_moves,
        })
    }
    /// Stores an opaque log entry under `(pg, version)`; an existing entry at that version is
    /// replaced.
    pub fn pg_log_append(&mut self, pg: PgId, version: u64, entry: impl Into<Bytes>) -> &mut Self {
        self.push(Op::PgLogAppend {
            pg,
            version,
            entry: entry.into(),
        })
    }
    /// Drops log entries with version `<= up_to`.
    pub fn pg_log_trim(&mut self, pg: PgId, up_to: u64) -> &mut Self {
        self.push(Op::PgLogTrim { pg, up_to })
    }
    /// Drops log entries with version `>= from` (divergent entries rolled back by peering).
    pub fn pg_log_remove_from(&mut self, pg: PgId, from: u64) -> &mut Self {
        self.push(Op::PgLogRemoveFrom { pg, from })
    }
    pub fn pg_info_set(&mut self, pg: PgId, info: impl Into<Bytes>) -> &mut Self {
        self.push(Op::PgInfoSet {
            pg,
            info: info.into(),
        })
    }
    /// Remembers that request `reqid` completed at `version` with `result`, so a resent request
    /// can be answered without re-executing it. Re-recording a reqid replaces it.
    pub fn dup_record(
        &mut self,
        pg: PgId,
        reqid: impl Into<Bytes>,
        version: u64,
        result: impl Into<Bytes>,
    ) -> &mut Self {
        self.push(Op::DupRecord {
            pg,
            reqid: reqid.into(),
            version,
            result: result.into(),
        })
    }
    /// Forgets dups recorded at version `<= up_to`.
    pub fn dup_trim(&mut self, pg: PgId, up_to: u64) -> &mut Self {
        self.push(Op::DupTrim { pg, up_to })
    }
    /// Daemon-level metadata (e.g. OSDMaps) in the `meta` column family, beside the superblock.
    pub fn meta_set(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        self.push(Op::MetaSet {
            key: key.into(),
            value: value.into(),
        })
    }
    pub fn meta_remove(&mut self, key: impl Into<Bytes>) -> &mut Self {
        self.push(Op::MetaRemove { key: key.into() })
    }
}

// ---------------------------------------------------------------------------------------------
// Validation shared with the read path.

pub(crate) fn check_object(o: &ObjectId) -> Result<()> {
    if o.name().len() > MAX_NAME_LEN {
        return Err(StoreError::InvalidArgument(format!(
            "object name is {} bytes, limit {MAX_NAME_LEN}",
            o.name().len()
        )));
    }
    if o.namespace().len() > MAX_NAMESPACE_LEN {
        return Err(StoreError::InvalidArgument(format!(
            "namespace is {} bytes, limit {MAX_NAMESPACE_LEN}",
            o.namespace().len()
        )));
    }
    check_pg(o.pg())
}

pub(crate) fn check_pg(pg: PgId) -> Result<()> {
    // u32::MAX is reserved so every PG key prefix has a successor (see keys::prefix_end).
    if pg.pool == u32::MAX {
        return Err(StoreError::InvalidArgument(format!(
            "pool id {} is reserved",
            u32::MAX
        )));
    }
    Ok(())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(StoreError::InvalidArgument(format!(
            "{what} is {len} bytes, limit {max}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Executor

/// The outcome of building a transaction: its journal record and the change in charged bytes.
pub(crate) struct Built {
    pub rec: Record,
    pub used_delta: i64,
}

struct PgState {
    exists: bool,
    /// Removed earlier in this transaction: the engine's view of the PG is stale.
    wiped: bool,
}

struct ObjState {
    id: ObjectId,
    key: Vec<u8>,
    /// The onode before this transaction (None if absent or wiped by an earlier op).
    base: Option<Onode>,
    cur: Option<Onode>,
    onode_dirty: bool,
    /// The object was removed earlier in this transaction: every stored chunk is in `chunks`,
    /// wiped, and none other exists.
    data_wiped: bool,
    chunks: BTreeMap<u64, ChunkEdit>,
    omap_ops: Vec<KvOp>,
}

/// A chunk as this transaction changes it, block by block.
struct ChunkEdit {
    /// The stored extent (None: the chunk had no data).
    base: Option<Extent>,
    /// The stored extent's blocks no longer count (chunk emptied earlier in this transaction).
    wiped: bool,
    /// Current canonical stored length (trailing zeros trimmed).
    len: u64,
    /// Blocks changed: full 4 KiB content, or None for zeros.
    blocks: BTreeMap<usize, Option<Vec<u8>>>,
}

const B: u64 = BLOCK;

impl ChunkEdit {
    /// Current content of block `i`, or None if it reads as zeros.
    fn block(&self, data: &DataArea, i: usize, id: &ObjectId, idx: u64) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.blocks.get(&i) {
            return Ok(b.clone());
        }
        if self.wiped || i as u64 * B >= self.len {
            return Ok(None);
        }
        match &self.base {
            Some(e) => match e.blocks.get(i).copied().flatten() {
                Some(crc) => Ok(Some(data.read_blocks(e.au, i, &[Some(crc)], id, idx)?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Writes `src` (data, or zeros when None) at `lo..lo + len` within the chunk.
    fn write(
        &mut self,
        data: &DataArea,
        lo: u64,
        src: Option<&[u8]>,
        len: u64,
        id: &ObjectId,
        idx: u64,
    ) -> Result<()> {
        let hi = lo + len;
        for i in (lo / B) as usize..=((hi - 1) / B) as usize {
            let bs = i as u64 * B;
            let (a, z) = (lo.max(bs) - bs, hi.min(bs + B) - bs);
            if src.is_none() && bs >= self.len {
                continue; // already reads as zeros
            }
            let mut blk = if a == 0 && z == B {
                vec![0u8; B as usize]
            } else {
                self.block(data, i, id, idx)?
                    .unwrap_or_else(|| vec![0u8; B as usize])
            };
            if let Some(d) = src {
                let from = (bs + a - lo) as usize;
                blk[a as usize..z as usize].copy_from_slice(&d[from..from + (z - a) as usize]);
            } else {
                blk[a as usize..z as usize].fill(0);
            }
            let zero = blk.iter().all(|&b| b == 0);
            self.blocks.insert(i, (!zero).then_some(blk));
        }
        let candidate = self.len.max(if src.is_some() { hi } else { 0 });
        self.len = self.canonical_len(data, candidate, id, idx)?;
        Ok(())
    }

    /// Cuts the chunk to `tail` bytes (zeroing the rest of the block `tail` falls in).
    fn truncate(&mut self, data: &DataArea, tail: u64, id: &ObjectId, idx: u64) -> Result<()> {
        if tail >= self.len {
            return Ok(());
        }
        if tail % B != 0 {
            let i = (tail / B) as usize;
            if let Some(mut blk) = self.block(data, i, id, idx)? {
                blk[(tail % B) as usize..].fill(0);
                let zero = blk.iter().all(|&b| b == 0);
                self.blocks.insert(i, (!zero).then_some(blk));
            }
        }
        // Blocks past the cut read as zeros from now on, even if a later op in this
        // transaction grows the chunk again over them: explicit zero edits, not "unchanged".
        let first_dead = tail.div_ceil(B) as usize;
        for i in first_dead..self.len.div_ceil(B) as usize {
            self.blocks.insert(i, None);
        }
        self.len = self.canonical_len(data, tail, id, idx)?;
        Ok(())
    }

    fn clear(&mut self) {
        self.wiped = true;
        self.len = 0;
        self.blocks.clear();
    }

    /// The stored length once trailing zeros before `candidate` are trimmed.
    fn canonical_len(
        &self,
        data: &DataArea,
        candidate: u64,
        id: &ObjectId,
        idx: u64,
    ) -> Result<u64> {
        let mut end = candidate;
        while end > 0 {
            let i = ((end - 1) / B) as usize;
            let bs = i as u64 * B;
            // Blocks past the old length and not written read as zeros without a read.
            let content = if self.blocks.contains_key(&i) || bs < self.len {
                self.block(data, i, id, idx)?
            } else {
                None
            };
            if let Some(blk) = content {
                let upto = (end - bs) as usize;
                if let Some(p) = blk[..upto].iter().rposition(|&b| b != 0) {
                    return Ok(bs + p as u64 + 1);
                }
            }
            end = bs;
        }
        Ok(0)
    }
}

enum Src<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

impl Src<'_> {
    fn len(&self) -> u64 {
        match self {
            Src::Data(d) => d.len() as u64,
            Src::Zeros(n) => *n,
        }
    }
}

struct Exec<'a> {
    eng: &'a Engine,
    data: &'a DataArea,
    max_object_size: u64,
    pgs: HashMap<PgId, PgState>,
    objs: HashMap<Vec<u8>, ObjState>,
    order: Vec<Vec<u8>>,
    /// PG wipes: emitted before everything else.
    pre: Vec<KvOp>,
    /// AUs of wiped PGs.
    pre_free: Vec<u64>,
    /// PG and meta bookkeeping, emitted after object mutations, in op order.
    pg_ops: Vec<(Option<PgId>, KvOp)>,
    wipe_delta: i64,
    /// PGs a `pg_split` of this transaction moved objects between: their objects are not
    /// in the overlay, so later object ops on them are refused.
    split: Vec<PgId>,
}

pub(crate) fn build(
    eng: &Engine,
    data: &DataArea,
    max_object_size: u64,
    txn: &Transaction,
) -> Result<Built> {
    let mut ex = Exec {
        eng,
        data,
        max_object_size,
        pgs: HashMap::new(),
        objs: HashMap::new(),
        order: Vec::new(),
        pre: Vec::new(),
        pre_free: Vec::new(),
        pg_ops: Vec::new(),
        wipe_delta: 0,
        split: Vec::new(),
    };
    for op in &txn.ops {
        ex.apply(op)?;
    }
    ex.finish()
}

fn not_found(id: &ObjectId) -> StoreError {
    StoreError::NotFound {
        object: id.to_string(),
    }
}

impl ObjState {
    fn require(&mut self) -> Result<&mut Onode> {
        self.onode_dirty = true;
        match self.cur.as_mut() {
            Some(o) => Ok(o),
            None => Err(not_found(&self.id)),
        }
    }

    fn ensure(&mut self) -> &mut Onode {
        self.onode_dirty = true;
        self.cur.get_or_insert_with(Onode::default)
    }

    /// The edit of chunk `idx`, loading its stored extent on first touch.
    fn chunk(&mut self, eng: &Engine, idx: u64) -> Result<&mut ChunkEdit> {
        if !self.chunks.contains_key(&idx) {
            let len = match (self.data_wiped, &self.cur) {
                (false, Some(o)) => o.chunks.get(&idx).copied().unwrap_or(0) as u64,
                _ => 0,
            };
            let base = if len > 0 {
                let raw = eng
                    .get(Cf::Data, &keys::chunk_key(&self.key, idx))?
                    .ok_or_else(|| StoreError::Corrupt {
                        object: self.id.to_string(),
                        chunk: idx,
                    })?;
                Some(Extent::decode(&raw, &self.id)?)
            } else {
                None
            };
            self.chunks.insert(
                idx,
                ChunkEdit {
                    base,
                    wiped: false,
                    len,
                    blocks: BTreeMap::new(),
                },
            );
        }
        self.chunks
            .get_mut(&idx)
            .ok_or_else(|| StoreError::Io("chunk state vanished".into()))
    }

    /// Records chunk `idx`'s new length in the current onode.
    fn sync_len(&mut self, idx: u64) {
        let len = self.chunks.get(&idx).map_or(0, |c| c.len);
        let o = self.cur.get_or_insert_with(Onode::default);
        if len == 0 {
            o.chunks.remove(&idx);
        } else {
            o.chunks.insert(idx, len as u32);
        }
    }

    fn write_range(
        &mut self,
        eng: &Engine,
        data: &DataArea,
        max: u64,
        offset: u64,
        src: Src<'_>,
    ) -> Result<()> {
        let len = src.len();
        let end = offset.checked_add(len).ok_or_else(|| {
            StoreError::InvalidArgument(format!("offset {offset} + length {len} overflows"))
        })?;
        if end > max {
            return Err(StoreError::TooLarge {
                object: self.id.to_string(),
                size: end,
                max,
            });
        }
        self.ensure();
        if len == 0 {
            return Ok(());
        }
        let id = self.id.clone();
        for idx in offset / CHUNK_SIZE..=(end - 1) / CHUNK_SIZE {
            let base = idx * CHUNK_SIZE;
            let lo = offset.max(base) - base;
            let hi = end.min(base + CHUNK_SIZE) - base;
            let piece = match &src {
                Src::Data(d) => {
                    Some(&d[(base + lo - offset) as usize..(base + hi - offset) as usize])
                }
                Src::Zeros(_) => None,
            };
            let stored = self.cur.as_ref().and_then(|o| o.chunks.get(&idx)).is_some()
                || self.chunks.contains_key(&idx);
            if piece.is_none() && !stored {
                continue; // zeros over a hole
            }
            self.chunk(eng, idx)?
                .write(data, lo, piece, hi - lo, &id, idx)?;
            self.sync_len(idx);
        }
        let o = self.ensure();
        o.size = o.size.max(end);
        Ok(())
    }

    /// Empties every stored chunk (remove, write_full).
    fn clear_chunks(&mut self, eng: &Engine) -> Result<()> {
        let stored: Vec<u64> = self
            .cur
            .as_ref()
            .map(|o| o.chunks.keys().copied().collect())
            .unwrap_or_default();
        for idx in stored {
            self.chunk(eng, idx)?.clear();
            self.sync_len(idx);
        }
        Ok(())
    }

    fn truncate(&mut self, eng: &Engine, data: &DataArea, max: u64, size: u64) -> Result<()> {
        if size > max {
            return Err(StoreError::TooLarge {
                object: self.id.to_string(),
                size,
                max,
            });
        }
        let o = self.require()?;
        if size < o.size {
            let first_dead = size.div_ceil(CHUNK_SIZE);
            let dead: Vec<u64> = o.chunks.range(first_dead..).map(|(&i, _)| i).collect();
            let partial = size / CHUNK_SIZE;
            let tail = size % CHUNK_SIZE;
            let partial_stored = o.chunks.contains_key(&partial);
            for idx in dead {
                self.chunk(eng, idx)?.clear();
                self.sync_len(idx);
            }
            if tail > 0 && partial_stored {
                let id = self.id.clone();
                self.chunk(eng, partial)?
                    .truncate(data, tail, &id, partial)?;
                self.sync_len(partial);
            }
        }
        self.require()?.size = size;
        Ok(())
    }

    fn remove(&mut self, eng: &Engine) -> Result<()> {
        self.require()?;
        self.clear_chunks(eng)?;
        self.cur = None;
        self.data_wiped = true;
        self.omap_ops = vec![KvOp::DeleteRange(
            Cf::Omap,
            self.key.clone(),
            prefix_end(&self.key),
        )];
        Ok(())
    }

    /// Emits the chunk changes: extent records, blocks to write, AUs taken and freed.
    fn emit_chunks(&mut self, data: &DataArea, rec: &mut Record) -> Result<()> {
        for (idx, c) in std::mem::take(&mut self.chunks) {
            let ck = keys::chunk_key(&self.key, idx);
            if c.len == 0 {
                if let Some(b) = &c.base {
                    rec.kv.push(KvOp::Delete(Cf::Data, ck));
                    rec.free.push(b.au);
                }
                continue;
            }
            let nblocks = c.len.div_ceil(B) as usize;
            // A chunk rewritten whole goes straight to a fresh AU (written once, here, in the
            // caller's thread); the old AU is freed. Smaller writes are journaled and written
            // home in place later.
            if (0..nblocks).all(|i| c.blocks.contains_key(&i))
                && nblocks * B as usize == CHUNK_SIZE as usize
            {
                let au = data.allocate()?;
                rec.alloc.push(au);
                if let Some(b) = &c.base {
                    rec.free.push(b.au);
                }
                let mut content = vec![0u8; CHUNK_SIZE as usize];
                let mut ext = Extent {
                    au,
                    blocks: Vec::with_capacity(nblocks),
                };
                for i in 0..nblocks {
                    let blk = c.blocks.get(&i).cloned().flatten();
                    ext.blocks.push(blk.as_ref().map(|b| block_crc(b)));
                    if let Some(b) = blk {
                        content[i * B as usize..(i + 1) * B as usize].copy_from_slice(&b);
                    }
                }
                data.write_direct(au, &content)?;
                rec.direct = true;
                rec.kv.push(KvOp::Put(Cf::Data, ck, ext.encode()));
                continue;
            }
            let au = match &c.base {
                Some(b) => b.au,
                None => {
                    let au = data.allocate()?;
                    rec.alloc.push(au);
                    au
                }
            };
            let mut ext = Extent {
                au,
                blocks: Vec::with_capacity(nblocks),
            };
            for i in 0..nblocks {
                let crc = match c.blocks.get(&i) {
                    Some(Some(content)) => {
                        let crc = block_crc(content);
                        rec.blocks.push(BlockWrite {
                            au,
                            block: i as u16,
                            data: Bytes::from(content.clone()),
                        });
                        Some(crc)
                    }
                    Some(None) => None,
                    None if c.wiped => None,
                    None => c
                        .base
                        .as_ref()
                        .and_then(|b| b.blocks.get(i).copied().flatten()),
                };
                ext.blocks.push(crc);
            }
            if c.base.as_ref() != Some(&ext) {
                rec.kv.push(KvOp::Put(Cf::Data, ck, ext.encode()));
            }
        }
        Ok(())
    }
}

impl Exec<'_> {
    fn pg_state(&mut self, pg: PgId) -> Result<&mut PgState> {
        check_pg(pg)?;
        if !self.pgs.contains_key(&pg) {
            let exists = self.eng.get(Cf::Meta, &keys::meta_pg_key(pg))?.is_some();
            self.pgs.insert(
                pg,
                PgState {
                    exists,
                    wiped: false,
                },
            );
        }
        self.pgs
            .get_mut(&pg)
            .ok_or_else(|| StoreError::Io("pg state vanished".into()))
    }

    fn require_pg(&mut self, pg: PgId) -> Result<bool> {
        let st = self.pg_state(pg)?;
        if !st.exists {
            return Err(StoreError::NoSuchPg { pg });
        }
        Ok(st.wiped)
    }

    fn obj(&mut self, id: &ObjectId) -> Result<&mut ObjState> {
        check_object(id)?;
        if self.split.contains(&id.pg()) {
            return Err(StoreError::InvalidArgument(format!(
                "object {id}: its PG was split earlier in this transaction; submit object ops \
                 in a transaction of their own"
            )));
        }
        let wiped = self.require_pg(id.pg())?;
        let key = keys::onode_key(id);
        if !self.objs.contains_key(&key) {
            let base = if wiped {
                None
            } else {
                match self.eng.get(Cf::Onode, &key)? {
                    Some(raw) => Some(Onode::decode(&raw, id)?),
                    None => None,
                }
            };
            self.order.push(key.clone());
            self.objs.insert(
                key.clone(),
                ObjState {
                    id: id.clone(),
                    key: key.clone(),
                    cur: base.clone(),
                    base,
                    onode_dirty: false,
                    data_wiped: wiped,
                    chunks: BTreeMap::new(),
                    omap_ops: Vec::new(),
                },
            );
        }
        self.objs
            .get_mut(&key)
            .ok_or_else(|| StoreError::Io("object state vanished".into()))
    }

    fn apply(&mut self, op: &Op) -> Result<()> {
        let eng = self.eng;
        let data = self.data;
        let max = self.max_object_size;
        match op {
            Op::Create { obj, exclusive } => {
                let st = self.obj(obj)?;
                if *exclusive && st.cur.is_some() {
                    return Err(StoreError::AlreadyExists {
                        object: obj.to_string(),
                    });
                }
                st.ensure();
            }
            Op::Write {
                obj,
                offset,
                data: bytes,
            } => {
                self.obj(obj)?
                    .write_range(eng, data, max, *offset, Src::Data(bytes))?;
            }
            Op::WriteFull { obj, data: bytes } => {
                let st = self.obj(obj)?;
                st.ensure();
                st.clear_chunks(eng)?;
                st.ensure().size = 0;
                st.write_range(eng, data, max, 0, Src::Data(bytes))?;
            }
            Op::Append { obj, data: bytes } => {
                let st = self.obj(obj)?;
                let offset = st.ensure().size;
                st.write_range(eng, data, max, offset, Src::Data(bytes))?;
            }
            Op::Truncate { obj, size } => self.obj(obj)?.truncate(eng, data, max, *size)?,
            Op::Zero { obj, offset, len } => {
                self.obj(obj)?
                    .write_range(eng, data, max, *offset, Src::Zeros(*len))?;
            }
            Op::Remove { obj } => self.obj(obj)?.remove(eng)?,
            Op::SetMeta { obj, meta } => {
                check_len("object version", meta.version.len(), MAX_REQID_LEN)?;
                self.obj(obj)?.require()?.meta = meta.clone();
            }
            Op::SetXattr { obj, name, value } => {
                check_len("xattr name", name.len(), MAX_XATTR_NAME_LEN)?;
                check_len("xattr value", value.len(), MAX_XATTR_VALUE_LEN)?;
                let o = self.obj(obj)?.require()?;
                o.xattrs.insert(name.clone(), value.clone());
                check_len(
                    "xattrs of one object",
                    o.xattr_bytes() as usize,
                    MAX_XATTR_TOTAL,
                )?;
            }
            Op::RmXattr { obj, name } => {
                self.obj(obj)?.require()?.xattrs.remove(name);
            }
            Op::OmapSet { obj, entries } => {
                for (k, v) in entries {
                    check_len("omap key", k.len(), MAX_OMAP_KEY_LEN)?;
                    check_len("omap value", v.len(), MAX_OMAP_VALUE_LEN)?;
                }
                let st = self.obj(obj)?;
                st.require()?;
                for (k, v) in entries {
                    st.omap_ops.push(KvOp::Put(
                        Cf::Omap,
                        keys::omap_entry_key(&st.key, k),
                        v.clone(),
                    ));
                }
            }
            Op::OmapRmKeys { obj, keys: ks } => {
                let st = self.obj(obj)?;
                st.require()?;
                for k in ks {
                    st.omap_ops
                        .push(KvOp::Delete(Cf::Omap, keys::omap_entry_key(&st.key, k)));
                }
            }
            Op::OmapRmRange { obj, start, end } => {
                let st = self.obj(obj)?;
                st.require()?;
                if start < end {
                    st.omap_ops.push(KvOp::DeleteRange(
                        Cf::Omap,
                        keys::omap_entry_key(&st.key, start),
                        keys::omap_entry_key(&st.key, end),
                    ));
                }
            }
            Op::OmapClear { obj } => {
                let st = self.obj(obj)?;
                st.require()?;
                st.omap_ops.push(KvOp::DeleteRange(
                    Cf::Omap,
                    st.key.clone(),
                    prefix_end(&st.key),
                ));
            }
            Op::OmapSetHeader { obj, header } => {
                check_len("omap header", header.len(), MAX_OMAP_VALUE_LEN)?;
                let st = self.obj(obj)?;
                st.require()?;
                st.omap_ops.push(KvOp::Put(
                    Cf::Omap,
                    keys::omap_header_key(&st.key),
                    header.clone(),
                ));
            }
            Op::PgCreate { pg } => {
                let st = self.pg_state(*pg)?;
                if st.exists {
                    return Err(StoreError::PgExists { pg: *pg });
                }
                st.exists = true;
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::Put(Cf::Meta, keys::meta_pg_key(*pg), Bytes::new()),
                ));
            }
            Op::PgRemove { pg } => self.pg_remove(*pg)?,
            Op::PgSplit {
                parent,
                pg_num,
                children,
                log_moves,
            } => self.pg_split(*parent, *pg_num, children, log_moves)?,
            Op::PgLogAppend { pg, version, entry } => {
                check_len("PG log entry", entry.len(), MAX_PG_BLOB_LEN)?;
                self.require_pg(*pg)?;
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::pglog_entry_key(*pg, *version),
                        entry.clone(),
                    ),
                ));
            }
            Op::PgLogTrim { pg, up_to } => {
                self.require_pg(*pg)?;
                let end = match up_to.checked_add(1) {
                    Some(v) => keys::pglog_entry_key(*pg, v),
                    None => prefix_end(&keys::pglog_key(*pg, keys::PGLOG_ENTRY, &[])),
                };
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::DeleteRange(Cf::PgLog, keys::pglog_entry_key(*pg, 0), end),
                ));
            }
            Op::PgLogRemoveFrom { pg, from } => {
                self.require_pg(*pg)?;
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::DeleteRange(
                        Cf::PgLog,
                        keys::pglog_entry_key(*pg, *from),
                        prefix_end(&keys::pglog_key(*pg, keys::PGLOG_ENTRY, &[])),
                    ),
                ));
            }
            Op::PgInfoSet { pg, info } => {
                check_len("PG info", info.len(), MAX_PG_BLOB_LEN)?;
                self.require_pg(*pg)?;
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::pglog_key(*pg, keys::PGLOG_INFO, &[]),
                        info.clone(),
                    ),
                ));
            }
            Op::DupRecord {
                pg,
                reqid,
                version,
                result,
            } => {
                check_len("reqid", reqid.len(), MAX_REQID_LEN)?;
                check_len("dup result", result.len(), MAX_PG_BLOB_LEN)?;
                self.require_pg(*pg)?;
                if let Some((old, _)) = self.current_dup(*pg, reqid)? {
                    self.pg_ops.push((
                        Some(*pg),
                        KvOp::Delete(Cf::PgLog, keys::dup_index_key(*pg, old, reqid)),
                    ));
                }
                let mut v = version.to_be_bytes().to_vec();
                v.extend_from_slice(result);
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::pglog_key(*pg, keys::PGLOG_DUP, reqid),
                        Bytes::from(v),
                    ),
                ));
                self.pg_ops.push((
                    Some(*pg),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::dup_index_key(*pg, *version, reqid),
                        Bytes::new(),
                    ),
                ));
            }
            Op::DupTrim { pg, up_to } => self.dup_trim(*pg, *up_to)?,
            Op::MetaSet { key, value } => {
                check_len("meta key", key.len(), MAX_REQID_LEN)?;
                check_len("meta value", value.len(), MAX_PG_BLOB_LEN)?;
                self.pg_ops.push((
                    None,
                    KvOp::Put(Cf::Meta, keys::meta_user_key(key), value.clone()),
                ));
            }
            Op::MetaRemove { key } => {
                check_len("meta key", key.len(), MAX_REQID_LEN)?;
                self.pg_ops
                    .push((None, KvOp::Delete(Cf::Meta, keys::meta_user_key(key))));
            }
        }
        Ok(())
    }

    fn pg_remove(&mut self, pg: PgId) -> Result<()> {
        let wiped = self.require_pg(pg)?;
        let prefix = keys::pg_prefix(pg);
        let end = prefix_end(&prefix);
        if !wiped {
            // Charged bytes leave with the PG; read them from the onodes (metadata only).
            let mut start = prefix.clone();
            loop {
                let page = self.eng.scan(Cf::Onode, &start, &end, 1024)?;
                for (k, v) in &page {
                    let id = keys::decode_onode_key(k)?;
                    self.wipe_delta -= Onode::decode(v, &id)?.charged_bytes() as i64;
                }
                match page.last() {
                    Some((k, _)) if page.len() == 1024 => {
                        start = k.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
            // So do their allocation units.
            let mut start = prefix.clone();
            loop {
                let page = self.eng.scan(Cf::Data, &start, &end, 1024)?;
                for (_, v) in &page {
                    self.pre_free.push(Extent::decode(v, &pg)?.au);
                }
                match page.last() {
                    Some((k, _)) if page.len() == 1024 => {
                        start = k.clone();
                        start.push(0);
                    }
                    _ => break,
                }
            }
        }
        // Chunks this transaction already touched in the PG: their stored AUs are in the
        // scan above; AUs they were about to take were never taken (taken at finish).
        self.objs.retain(|_, st| st.id.pg() != pg);
        let objs = &self.objs;
        self.order.retain(|k| objs.contains_key(k));
        self.pg_ops.retain(|(p, _)| *p != Some(pg));
        for cf in [Cf::Onode, Cf::Data, Cf::Omap, Cf::PgLog] {
            self.pre
                .push(KvOp::DeleteRange(cf, prefix.clone(), end.clone()));
        }
        self.pg_ops
            .push((Some(pg), KvOp::Delete(Cf::Meta, keys::meta_pg_key(pg))));
        let st = self.pg_state(pg)?;
        st.exists = false;
        st.wiped = true;
        Ok(())
    }

    fn pg_split(
        &mut self,
        parent: PgId,
        pg_num: u32,
        children: &[u32],
        log_moves: &[(u64, u32)],
    ) -> Result<()> {
        let refuse = |why: String| {
            Err(StoreError::InvalidArgument(format!(
                "split of pg {parent}: {why}"
            )))
        };
        if self.require_pg(parent)? {
            return refuse("the PG was removed earlier in this transaction".into());
        }
        let child_ids: Vec<PgId> = children
            .iter()
            .map(|&seed| PgId {
                pool: parent.pool,
                seed,
            })
            .collect();
        for &child in &child_ids {
            if child == parent {
                return refuse("a PG is not its own child".into());
            }
            if self.require_pg(child)? {
                return refuse(format!(
                    "child {child} was removed earlier in this transaction"
                ));
            }
        }
        let touched = |pg: PgId| pg == parent || child_ids.contains(&pg);
        if self.objs.values().any(|st| touched(st.id.pg()))
            || self.pg_ops.iter().any(|(p, _)| *p == Some(parent))
        {
            return refuse("it must come before every other op on its PGs".into());
        }
        self.split.push(parent);
        self.split.extend(child_ids.iter().copied());

        // Objects: onode, extent records and omap move under the child's key prefix.
        let prefix = keys::pg_prefix(parent);
        let end = prefix_end(&prefix);
        let mut start = prefix.clone();
        loop {
            let page = self.eng.scan(Cf::Onode, &start, &end, 1024)?;
            for (okey, onode) in &page {
                let id = keys::decode_onode_key(okey)?;
                let seed = basalt_placement::hash_to_seed(id.hash(), pg_num);
                if seed == parent.seed {
                    continue;
                }
                let Some(&child) = child_ids.iter().find(|c| c.seed == seed) else {
                    return refuse(format!(
                        "object {id} maps to seed {seed}, which is not among the children \
                         {children:?}"
                    ));
                };
                let okey_end = prefix_end(okey);
                for cf in [Cf::Data, Cf::Omap] {
                    for (k, v) in self.eng.scan(cf, okey, &okey_end, usize::MAX)? {
                        self.pg_ops
                            .push((Some(child), KvOp::Put(cf, keys::rekey_to_pg(&k, child), v)));
                    }
                    self.pg_ops.push((
                        Some(parent),
                        KvOp::DeleteRange(cf, okey.clone(), okey_end.clone()),
                    ));
                }
                self.pg_ops.push((
                    Some(child),
                    KvOp::Put(Cf::Onode, keys::rekey_to_pg(okey, child), onode.clone()),
                ));
                self.pg_ops
                    .push((Some(parent), KvOp::Delete(Cf::Onode, okey.clone())));
            }
            match page.last() {
                Some((k, _)) if page.len() == 1024 => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }

        // Log entries named by the caller.
        for &(version, seed) in log_moves {
            let Some(&child) = child_ids.iter().find(|c| c.seed == seed) else {
                return refuse(format!(
                    "log entry {version} goes to seed {seed}, not among the children {children:?}"
                ));
            };
            let from = keys::pglog_entry_key(parent, version);
            let Some(entry) = self.eng.get(Cf::PgLog, &from)? else {
                return refuse(format!("it has no log entry at version {version}"));
            };
            self.pg_ops.push((
                Some(child),
                KvOp::Put(Cf::PgLog, keys::pglog_entry_key(child, version), entry),
            ));
            self.pg_ops
                .push((Some(parent), KvOp::Delete(Cf::PgLog, from)));
        }

        // Dups: a copy in every child (a reqid is looked up only by its own object's PG).
        let dup_prefix = keys::pglog_key(parent, keys::PGLOG_DUP, &[]);
        let dup_end = prefix_end(&dup_prefix);
        for (k, v) in self
            .eng
            .scan(Cf::PgLog, &dup_prefix, &dup_end, usize::MAX)?
        {
            let reqid = &k[dup_prefix.len()..];
            let (version, _) = decode_dup(&v)?;
            for &child in &child_ids {
                self.pg_ops.push((
                    Some(child),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::pglog_key(child, keys::PGLOG_DUP, reqid),
                        v.clone(),
                    ),
                ));
                self.pg_ops.push((
                    Some(child),
                    KvOp::Put(
                        Cf::PgLog,
                        keys::dup_index_key(child, version, reqid),
                        Bytes::new(),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The dup record for `reqid` as this transaction currently sees it.
    fn current_dup(&mut self, pg: PgId, reqid: &[u8]) -> Result<Option<(u64, Bytes)>> {
        let key = keys::pglog_key(pg, keys::PGLOG_DUP, reqid);
        for (_, op) in self.pg_ops.iter().rev() {
            match op {
                KvOp::Put(Cf::PgLog, k, v) if *k == key => return decode_dup(v).map(Some),
                KvOp::Delete(Cf::PgLog, k) if *k == key => return Ok(None),
                _ => {}
            }
        }
        if self.pg_state(pg)?.wiped {
            return Ok(None);
        }
        match self.eng.get(Cf::PgLog, &key)? {
            Some(v) => decode_dup(&v).map(Some),
            None => Ok(None),
        }
    }

    fn dup_trim(&mut self, pg: PgId, up_to: u64) -> Result<()> {
        let wiped = self.require_pg(pg)?;
        let start = keys::dup_index_key(pg, 0, &[]);
        let end = match up_to.checked_add(1) {
            Some(v) => keys::dup_index_key(pg, v, &[]),
            None => prefix_end(&keys::pglog_key(pg, keys::PGLOG_DUP_BY_VERSION, &[])),
        };
        let mut index_keys: Vec<Vec<u8>> = if wiped {
            Vec::new()
        } else {
            self.eng
                .scan(Cf::PgLog, &start, &end, usize::MAX)?
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        for (_, op) in &self.pg_ops {
            if let KvOp::Put(Cf::PgLog, k, _) = op {
                if *k >= start && *k < end {
                    index_keys.push(k.clone());
                }
            }
        }
        index_keys.sort();
        index_keys.dedup();
        let head = keys::pglog_key(pg, keys::PGLOG_DUP_BY_VERSION, &[]).len();
        for k in index_keys {
            if k.len() < head + 8 {
                return Err(StoreError::corrupt_meta("dup index key", "too short"));
            }
            let version = keys::decode_u64(&k[head..head + 8], "dup index version")?;
            let reqid = k[head + 8..].to_vec();
            self.pg_ops.push((Some(pg), KvOp::Delete(Cf::PgLog, k)));
            // Only forget the dup if it was not re-recorded at a newer version since.
            if matches!(self.current_dup(pg, &reqid)?, Some((v, _)) if v == version) {
                self.pg_ops.push((
                    Some(pg),
                    KvOp::Delete(Cf::PgLog, keys::pglog_key(pg, keys::PGLOG_DUP, &reqid)),
                ));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Built> {
        let Exec {
            mut objs,
            order,
            pre,
            pre_free,
            pg_ops,
            wipe_delta,
            data,
            ..
        } = self;
        let mut rec = Record {
            kv: pre,
            free: pre_free,
            ..Record::default()
        };
        let mut delta = wipe_delta;
        let res = (|| {
            for key in order {
                let Some(mut st) = objs.remove(&key) else {
                    continue;
                };
                st.emit_chunks(data, &mut rec)?;
                rec.kv.extend(std::mem::take(&mut st.omap_ops));
                if st.onode_dirty {
                    rec.kv.push(match &st.cur {
                        Some(o) => KvOp::Put(Cf::Onode, key.clone(), Bytes::from(o.encode())),
                        None => KvOp::Delete(Cf::Onode, key.clone()),
                    });
                }
                let charged =
                    |o: &Option<Onode>| o.as_ref().map_or(0, |o| o.charged_bytes() as i64);
                delta += charged(&st.cur) - charged(&st.base);
            }
            Ok(())
        })();
        if let Err(e) = res {
            // Nothing was committed: the AUs taken so far go back.
            let _ = data.release(&rec.alloc);
            return Err(e);
        }
        rec.kv.extend(pg_ops.into_iter().map(|(_, op)| op));
        Ok(Built {
            rec,
            used_delta: delta,
        })
    }
}

pub(crate) fn decode_dup(v: &[u8]) -> Result<(u64, Bytes)> {
    if v.len() < 8 {
        return Err(StoreError::corrupt_meta(
            "dup record",
            "shorter than 8 bytes",
        ));
    }
    Ok((
        keys::decode_u64(&v[..8], "dup version")?,
        Bytes::copy_from_slice(&v[8..]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig};

    fn pg() -> PgId {
        PgId { pool: 1, seed: 0 }
    }

    fn store_with_object(size: usize) -> (Store, ObjectId) {
        let s = Store::in_memory(StoreConfig::default()).unwrap();
        let o = ObjectId::new(pg(), "rbd_data.1");
        let mut t = Transaction::new();
        t.pg_create(pg()).write_full(&o, vec![7u8; size]);
        s.submit_blocking(&t).unwrap();
        (s, o)
    }

    fn built(s: &Store, t: &Transaction) -> Built {
        build(s.engine(), s.data(), DEFAULT_MAX_OBJECT_SIZE, t).unwrap()
    }

    #[test]
    fn a_log_only_copy_logs_the_write_and_leaves_the_object_alone() {
        let (s, o) = store_with_object(8192);
        let mut t = Transaction::new();
        t.write(&o, 0, vec![9u8; 4096])
            .pg_log_append(pg(), 1, vec![1u8])
            .dup_record(pg(), vec![2u8], 1, vec![3u8]);
        let log_only = t.log_only();
        assert_eq!(log_only.ops(), &t.ops()[1..]);
        s.submit_blocking(&log_only).unwrap();
        assert_eq!(s.read(&o, 0, 4096).unwrap(), vec![7u8; 4096]);
        assert_eq!(s.pg_log_scan(pg(), 1, 1).unwrap().len(), 1);
    }

    #[test]
    fn small_write_into_big_object_writes_only_its_blocks() {
        let (s, o) = store_with_object(4 << 20);
        let mut t = Transaction::new();
        t.write(&o, 12 * CHUNK_SIZE + 4096, vec![1u8; 4096]);
        let b = built(&s, &t);
        // One 4 KiB block, its chunk's extent record and the onode; no read-modify-write.
        assert_eq!(b.rec.blocks.len(), 1);
        assert_eq!(b.rec.blocks[0].block, 1);
        assert_eq!(b.rec.kv.len(), 2);
        assert!(b.rec.alloc.is_empty() && b.rec.free.is_empty());
        assert_eq!(b.used_delta, 0);

        // Straddling a chunk boundary touches exactly two blocks in two chunks.
        let mut t = Transaction::new();
        t.write(&o, 3 * CHUNK_SIZE - 2048, vec![1u8; 4096]);
        let b = built(&s, &t);
        assert_eq!(b.rec.blocks.len(), 2);
        assert_eq!(b.rec.kv.len(), 3);
    }

    #[test]
    fn onode_and_extents_of_a_4mib_object_stay_small() {
        let (s, o) = store_with_object(4 << 20);
        let key = keys::onode_key(&o);
        let raw = s.engine().get(Cf::Onode, &key).unwrap().unwrap();
        assert!(raw.len() < 512, "onode is {} bytes", raw.len());
        let ext = s
            .engine()
            .get(Cf::Data, &keys::chunk_key(&key, 5))
            .unwrap()
            .unwrap();
        assert!(ext.len() < 100, "extent record is {} bytes", ext.len());
    }

    #[test]
    fn zeros_free_space_and_removal_frees_every_au() {
        let (s, o) = store_with_object(4 << 20);
        let mut t = Transaction::new();
        t.zero(&o, 0, CHUNK_SIZE);
        let b = built(&s, &t);
        assert_eq!(b.rec.free.len(), 1, "an all-zero chunk gives its AU back");
        assert!(b.rec.blocks.is_empty());
        let mut t = Transaction::new();
        t.remove(&o);
        assert_eq!(built(&s, &t).rec.free.len(), 64);
    }
}
