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

use super::engine::{Cf, Engine, KvOp};
use super::error::{Result, StoreError};
use super::keys::{self, prefix_end};
use super::onode::{canonical, encode_chunk, verify_chunk, Onode};
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

/// The outcome of building a transaction: the mutations and the change in charged bytes.
pub(crate) struct Built {
    pub ops: Vec<KvOp>,
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
    /// The object was removed earlier in this transaction: none of its stored chunks count.
    data_wiped: bool,
    /// Chunk overlay: new canonical content, or None for "delete".
    chunks: BTreeMap<u64, Option<Vec<u8>>>,
    omap_ops: Vec<KvOp>,
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
    max_object_size: u64,
    pgs: HashMap<PgId, PgState>,
    objs: HashMap<Vec<u8>, ObjState>,
    order: Vec<Vec<u8>>,
    /// PG wipes: emitted before everything else.
    pre: Vec<KvOp>,
    /// PG and meta bookkeeping, emitted after object mutations, in op order.
    pg_ops: Vec<(Option<PgId>, KvOp)>,
    wipe_delta: i64,
}

pub(crate) fn build(eng: &Engine, max_object_size: u64, txn: &Transaction) -> Result<Built> {
    let mut ex = Exec {
        eng,
        max_object_size,
        pgs: HashMap::new(),
        objs: HashMap::new(),
        order: Vec::new(),
        pre: Vec::new(),
        pg_ops: Vec::new(),
        wipe_delta: 0,
    };
    for op in &txn.ops {
        ex.apply(op)?;
    }
    Ok(ex.finish())
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

    fn load_chunk(&self, eng: &Engine, idx: u64) -> Result<Vec<u8>> {
        if let Some(c) = self.chunks.get(&idx) {
            return Ok(c.clone().unwrap_or_default());
        }
        let Some(&len) = self.cur.as_ref().and_then(|o| o.chunks.get(&idx)) else {
            return Ok(Vec::new());
        };
        if self.data_wiped {
            return Ok(Vec::new());
        }
        let raw = eng
            .get(Cf::Data, &keys::chunk_key(&self.key, idx))?
            .ok_or_else(|| StoreError::Corrupt {
                object: self.id.to_string(),
                chunk: idx,
            })?;
        Ok(verify_chunk(&raw, len, &self.id, idx)?.to_vec())
    }

    fn set_chunk(&mut self, idx: u64, content: Option<Vec<u8>>) {
        let o = self.cur.get_or_insert_with(Onode::default);
        match &content {
            Some(c) => {
                o.chunks.insert(idx, c.len() as u32);
            }
            None => {
                let was_stored = o.chunks.remove(&idx).is_some();
                if !was_stored && !self.chunks.contains_key(&idx) {
                    return;
                }
            }
        }
        self.chunks.insert(idx, content);
    }

    fn write_range(&mut self, eng: &Engine, max: u64, offset: u64, src: Src<'_>) -> Result<()> {
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
        for idx in offset / CHUNK_SIZE..=(end - 1) / CHUNK_SIZE {
            let base = idx * CHUNK_SIZE;
            let lo = (offset.max(base) - base) as usize;
            let hi = (end.min(base + CHUNK_SIZE) - base) as usize;
            let from = (base + lo as u64 - offset) as usize;
            let new = if lo == 0 && hi == CHUNK_SIZE as usize {
                // Whole chunk replaced: no read needed.
                match &src {
                    Src::Data(d) => canonical(d[from..from + hi].to_vec()),
                    Src::Zeros(_) => None,
                }
            } else {
                let mut cur = self.load_chunk(eng, idx)?;
                if matches!(src, Src::Zeros(_)) && cur.len() <= lo {
                    continue; // those bytes already read as zeros
                }
                if cur.len() < hi {
                    cur.resize(hi, 0);
                }
                match &src {
                    Src::Data(d) => cur[lo..hi].copy_from_slice(&d[from..from + (hi - lo)]),
                    Src::Zeros(_) => cur[lo..hi].fill(0),
                }
                canonical(cur)
            };
            self.set_chunk(idx, new);
        }
        let o = self.ensure();
        o.size = o.size.max(end);
        Ok(())
    }

    fn truncate(&mut self, eng: &Engine, max: u64, size: u64) -> Result<()> {
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
            let tail = (size % CHUNK_SIZE) as usize;
            let partial = size / CHUNK_SIZE;
            let partial_len = o.chunks.get(&partial).copied();
            for idx in dead {
                self.set_chunk(idx, None);
            }
            if let Some(len) = partial_len {
                if tail > 0 && len as usize > tail {
                    let mut c = self.load_chunk(eng, partial)?;
                    c.truncate(tail);
                    self.set_chunk(partial, canonical(c));
                }
            }
        }
        self.require()?.size = size;
        Ok(())
    }

    fn remove(&mut self) -> Result<()> {
        self.require()?;
        self.cur = None;
        self.data_wiped = true;
        self.chunks.clear();
        self.omap_ops = vec![KvOp::DeleteRange(
            Cf::Omap,
            self.key.clone(),
            prefix_end(&self.key),
        )];
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
                    data_wiped: false,
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
            Op::Write { obj, offset, data } => {
                self.obj(obj)?
                    .write_range(eng, max, *offset, Src::Data(data))?;
            }
            Op::WriteFull { obj, data } => {
                let st = self.obj(obj)?;
                let o = st.ensure();
                let old: Vec<u64> = o.chunks.keys().copied().collect();
                o.size = 0;
                for idx in old {
                    st.set_chunk(idx, None);
                }
                st.write_range(eng, max, 0, Src::Data(data))?;
            }
            Op::Append { obj, data } => {
                let st = self.obj(obj)?;
                let offset = st.ensure().size;
                st.write_range(eng, max, offset, Src::Data(data))?;
            }
            Op::Truncate { obj, size } => self.obj(obj)?.truncate(eng, max, *size)?,
            Op::Zero { obj, offset, len } => {
                self.obj(obj)?
                    .write_range(eng, max, *offset, Src::Zeros(*len))?;
            }
            Op::Remove { obj } => self.obj(obj)?.remove()?,
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
        }
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

    fn finish(self) -> Built {
        let Exec {
            mut objs,
            order,
            pre,
            pg_ops,
            wipe_delta,
            ..
        } = self;
        let mut ops = pre;
        let mut delta = wipe_delta;
        for key in order {
            let Some(st) = objs.remove(&key) else {
                continue;
            };
            if st.data_wiped {
                ops.push(KvOp::DeleteRange(Cf::Data, key.clone(), prefix_end(&key)));
            }
            for (idx, c) in st.chunks {
                let ck = keys::chunk_key(&key, idx);
                ops.push(match c {
                    Some(data) => KvOp::Put(Cf::Data, ck, Bytes::from(encode_chunk(&data))),
                    None => KvOp::Delete(Cf::Data, ck),
                });
            }
            ops.extend(st.omap_ops);
            if st.onode_dirty {
                ops.push(match &st.cur {
                    Some(o) => KvOp::Put(Cf::Onode, key.clone(), Bytes::from(o.encode())),
                    None => KvOp::Delete(Cf::Onode, key.clone()),
                });
            }
            let charged = |o: &Option<Onode>| o.as_ref().map_or(0, |o| o.charged_bytes() as i64);
            delta += charged(&st.cur) - charged(&st.base);
        }
        ops.extend(pg_ops.into_iter().map(|(_, op)| op));
        if delta != 0 {
            ops.push(KvOp::AddUsed(delta));
        }
        Built {
            ops,
            used_delta: delta,
        }
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
    use crate::store::engine::MemEngine;

    fn pg() -> PgId {
        PgId { pool: 1, seed: 0 }
    }

    fn engine_with_object(size: usize) -> (Engine, ObjectId) {
        let eng = Engine::Memory(MemEngine::default());
        let o = ObjectId::new(pg(), "rbd_data.1");
        let mut t = Transaction::new();
        t.pg_create(pg()).write_full(&o, vec![7u8; size]);
        let built = build(&eng, DEFAULT_MAX_OBJECT_SIZE, &t).unwrap();
        eng.write(built.ops, false).unwrap();
        (eng, o)
    }

    fn data_puts(ops: &[KvOp]) -> Vec<usize> {
        ops.iter()
            .filter_map(|op| match op {
                KvOp::Put(Cf::Data, _, v) => Some(v.len()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn small_write_into_big_object_rewrites_only_its_chunks() {
        let (eng, o) = engine_with_object(4 << 20);
        let mut t = Transaction::new();
        t.write(&o, 12 * CHUNK_SIZE + 4096, vec![1u8; 4096]);
        let built = build(&eng, DEFAULT_MAX_OBJECT_SIZE, &t).unwrap();
        // One 64 KiB chunk (+ digest), one onode, nothing else.
        assert_eq!(data_puts(&built.ops), vec![CHUNK_SIZE as usize + 32]);
        assert_eq!(built.ops.len(), 2);
        assert_eq!(built.used_delta, 0);

        // Straddling a chunk boundary touches exactly two chunks.
        let mut t = Transaction::new();
        t.write(&o, 3 * CHUNK_SIZE - 2048, vec![1u8; 4096]);
        let built = build(&eng, DEFAULT_MAX_OBJECT_SIZE, &t).unwrap();
        assert_eq!(data_puts(&built.ops).len(), 2);
        assert_eq!(built.ops.len(), 3);
    }

    #[test]
    fn onode_of_a_4mib_object_stays_small() {
        let (eng, o) = engine_with_object(4 << 20);
        let raw = eng
            .get(Cf::Onode, &crate::store::keys::onode_key(&o))
            .unwrap()
            .unwrap();
        assert!(raw.len() < 512, "onode is {} bytes", raw.len());
    }
}
