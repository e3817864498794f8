//! The OSD object store: objects, omap, xattrs and PG bookkeeping in RocksDB (or in memory).
//!
//! # Two engines, one store
//!
//! [`Store`] is one type over two key-value engines: RocksDB ([`Store::mkfs`] / [`Store::open`])
//! and an ordered in-memory map ([`Store::in_memory`]) with the same column families and batch
//! semantics. Transaction execution, checksums, sparse handling, accounting and every read path
//! are shared code above the engine, so the in-memory store (simulations, fast unit tests) has
//! the RocksDB store's semantics by construction rather than by a parallel implementation; the
//! shared test suite (`tests/store.rs`) runs every case against both anyway.
//!
//! # Key layout
//!
//! Integers are big-endian, so byte order is numeric order. `esc(s)` escapes `0x00` as
//! `0x00 0xFF` and ends with `0x00 0x01`: byte order stays string order and keys stay
//! prefix-free. `okey` below is the onode key.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `meta` | `01` | superblock (postcard: format version, fsid, osd uuid) |
//! | `meta` | `02` | used bytes, i64, maintained by a merge operator (deltas commute) |
//! | `meta` | `03 pool seed` | PG present (empty) |
//! | `meta` | `04 key` | daemon metadata ([`Transaction::meta_set`]) |
//! | `onode` | `okey = pool seed rev(hash) esc(ns) esc(name) snap` | onode: `01` + postcard {size, meta, xattrs, chunk index → stored length} |
//! | `data` | `okey chunk(u32)` | `blake3(data) ‖ data`, data ≤ 64 KiB, trailing zeros trimmed |
//! | `omap` | `okey 00` | omap header |
//! | `omap` | `okey 01 key` | omap value |
//! | `pglog` | `pool seed 01` | PG info |
//! | `pglog` | `pool seed 02 version(u64)` | PG log entry |
//! | `pglog` | `pool seed 03 reqid` | dup: `version(u64) ‖ result` |
//! | `pglog` | `pool seed 04 version(u64) reqid` | dup index by version (for trimming) |
//!
//! `rev(hash)` is the placement hash (`basalt_placement::object_hash`) bit-reversed, as in
//! Ceph's hobject sort order: iterating a PG visits objects in the order backfill and scrub
//! cursors use, and since PG membership is decided by the hash's low bits, the children of a
//! future PG split are contiguous key ranges. Every key of a PG starts with `pool seed`, so
//! removing a PG is one range delete per column family. (Ceph keeps the PG out of the key and
//! finds a PG's range from the hash; having it in the key makes listing and removal trivial, at
//! the price of rewriting keys when PGs split — a later, explicit migration.)
//!
//! # Chunks: why 64 KiB, why blake3
//!
//! Object data is cut into fixed 64 KiB chunks, one RocksDB value each. RBD writes 4 KiB blocks
//! into 4 MiB objects: with whole-object values each would be a 4 MiB read-modify-write; with
//! 64 KiB chunks it reads and rewrites at most two chunks plus a small onode. Smaller chunks
//! would mean more keys, a bigger onode chunk map and more per-value overhead for the sequential
//! 1 MiB case; 64 KiB keeps a sequential MiB at 16 values.
//!
//! Each chunk value carries the blake3 of its data, verified on every read: a mismatch is
//! [`StoreError::Corrupt`] and no bytes are returned (the PG layer then repairs from a replica).
//! blake3 is the project's digest for names and data (DESIGN §2.4), is SIMD-fast (GB/s per core,
//! so checksumming 64 KiB costs tens of microseconds against a millisecond-scale write), and its
//! 256-bit digests let deep scrub compare replicas by digest without shipping data. The digest
//! sits beside the chunk rather than in the onode (DESIGN §6.1 puts it in the onode) so that a
//! 4 KiB write does not rewrite a digest table proportional to the object.
//!
//! Chunks are stored canonically: trailing zeros trimmed, an all-zero chunk not stored. Holes
//! read as zeros; `zero` and `truncate` free chunks; replicas with the same bytes have the same
//! values regardless of history. The onode lists every stored chunk with its length, so a
//! chunk that vanished is reported as corruption instead of reading as a hole.
//!
//! # Atomicity and durability contract
//!
//! - A [`Transaction`] is applied as one RocksDB `WriteBatch` (one WAL record, atomic across
//!   column families): all of its effects or none. Any failing op fails the whole transaction
//!   with a typed error and nothing is written.
//! - When [`Store::submit`] (or [`Store::submit_blocking`]) returns `Ok`, the batch is in the
//!   WAL and the WAL is fsynced (`sync=true`): it survives a crash or power loss.
//! - Ops inside one transaction see each other's effects, in order.
//! - [`Store::apply_blocking`] is a submit split in two: the batch is written (and visible)
//!   when it returns, durable only after a later [`Store::sync_blocking`] returns. A crash in
//!   between loses it (and any later apply) but never an earlier synced one: the WAL is a log.
//! - Concurrent submits are atomic but not ordered with respect to each other. Building a
//!   transaction reads the current state (onodes, partially overwritten chunks), so **the caller
//!   must serialise transactions that touch the same object** (the PG layer orders a PG's writes
//!   anyway) and must not submit a transaction touching an object until the previous one touching
//!   it has returned. PG-level records (info, log entries at distinct versions) follow the same
//!   rule per PG, and `pg_create` / `pg_remove` must not overlap any other transaction on that PG
//!   (a transaction built while a removal is in flight would see the PG still present).
//! - The in-memory store gives the same atomicity and visibility; it is "durable" only for the
//!   life of the value.
//!
//! # Group commit
//!
//! Each submit needs an fsync, but concurrent submits share one. Two designs are implemented
//! and were measured (BENCHMARKS.md, "OSD object store"):
//!
//! - [`CommitMode::CommitterThread`] (default): the submitting thread builds its batch (the
//!   reads and hashing happen there, in parallel), then hands it to one committer thread, which
//!   concatenates everything queued (up to 4 MiB) into one `WriteBatch` and writes it without
//!   fsync; a second thread then fsyncs the WAL once for every group written since its last
//!   fsync, while the committer writes the next group. [`Store::apply_blocking`] returns when
//!   its group is written, [`Store::submit`] when it is fsynced.
//! - [`CommitMode::ConcurrentWriters`]: every submitting thread calls `DB::write(sync=true)`
//!   itself; RocksDB's write-group leader writes and fsyncs for all writers queued behind it.
//!
//! Same latency at one submitter; at 32 concurrent 4 KiB overwrites the committer thread did
//! 1.4–2.5× the ops/s with about half the p50/p99 latency on this 2-core machine (32 threads
//! contending inside RocksDB's write path cost more than one hand-off). A combined batch is
//! still atomic, so each transaction in it is too; if the combined write fails, every
//! transaction in the group gets the error and none is applied.
//!
//! [`Store::submit`] never blocks a runtime thread: building and committing run under
//! `spawn_blocking` (one hand-off per op; the in-memory store applies inline).
//!
//! # Capacity
//!
//! The store charges the bytes of stored data chunks and xattrs ([`StoreStats::used_bytes`]),
//! kept in a merge-operator counter updated in the same batch as the data, so it is exact across
//! crashes. With [`StoreConfig::capacity_bytes`] set, a transaction that would grow the charged
//! bytes past it fails with [`StoreError::Full`]; transactions that shrink usage (removes,
//! truncates) always pass, so a full store can be emptied. Omap, onodes and PG logs are not
//! charged: they are small next to data, and charging them exactly would need a read of every
//! overwritten omap value.
//!
//! A real ENOSPC from RocksDB also maps to `Full` (tested on a 24 MiB tmpfs by
//! `rocksdb_enospc_is_full_and_store_stays_readable`). Reads keep working, but RocksDB latches
//! the error: every later write, removals included, fails with `Full` until the store is
//! reopened, and reopening replays the WAL into new files, which itself needs free space (on a
//! still-full disk `open` fails with `Full`). So the capacity limit is the real guard: the OSD
//! should set `capacity_bytes` comfortably below the disk's size (Ceph's full ratio is 95%),
//! leaving room for RocksDB's own overhead (WAL, compaction, blob garbage).

mod engine;
mod error;
mod keys;
mod onode;
mod txn;
mod types;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use basalt_placement::PgId;
use bytes::Bytes;

pub use engine::Durable;
use engine::{Cf, Engine, KvOp, MemEngine, RocksEngine};
use onode::{split_chunk, verify_chunk, Onode};

pub use error::{Result, StoreError};

/// Records how long one stage of a commit took (`basalt_store_stage_seconds`).
fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_store_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}
pub use txn::{Op, Transaction};
pub use types::*;

/// On-disk format written by this build.
pub const FORMAT_VERSION: u32 = 1;

/// An object's onode as one read found it (see [`Store::head`]).
pub struct ObjectHead {
    key: Vec<u8>,
    onode: Onode,
}

impl ObjectHead {
    pub fn stat(&self) -> ObjectStat {
        ObjectStat {
            size: self.onode.size,
            stored_bytes: self.onode.data_bytes(),
            meta: self.onode.meta.clone(),
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        &self.onode.meta
    }

    pub fn xattr(&self, name: &str) -> Option<Bytes> {
        self.onode.xattrs.get(name).cloned()
    }

    pub fn xattrs(&self) -> &std::collections::BTreeMap<String, Bytes> {
        &self.onode.xattrs
    }
}

/// The object store. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    cfg: StoreConfig,
    superblock: Superblock,
    /// Charged bytes, including reservations of transactions being committed.
    used: AtomicI64,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("superblock", &self.inner.superblock)
            .finish()
    }
}

fn check_config(cfg: &StoreConfig) -> Result<()> {
    if cfg.max_object_size / CHUNK_SIZE >= u32::MAX as u64 {
        return Err(StoreError::InvalidArgument(format!(
            "max_object_size {} needs more than 2^32 chunks",
            cfg.max_object_size
        )));
    }
    Ok(())
}

impl Store {
    /// A fresh in-memory store (fsid and osd uuid `"memory"`).
    pub fn in_memory(cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let superblock = Superblock::new("memory", "memory");
        Self::format(Engine::Memory(MemEngine::default()), superblock, cfg, None)
    }

    /// Writes the superblock into a fresh engine and wraps it.
    fn format(
        engine: Engine,
        superblock: Superblock,
        cfg: StoreConfig,
        path: Option<&Path>,
    ) -> Result<Store> {
        let durable = path.is_some();
        engine.write(
            vec![KvOp::Put(
                Cf::Meta,
                keys::META_SUPERBLOCK.to_vec(),
                Bytes::from(encode_superblock(&superblock)),
            )],
            durable,
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                engine,
                cfg,
                superblock,
                used: AtomicI64::new(0),
                path: path.map(Path::to_path_buf),
            }),
        })
    }

    /// Formats a new RocksDB store in `path` (created if missing; must not hold a store).
    pub fn mkfs(path: impl AsRef<Path>, superblock: Superblock, cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let path = path.as_ref();
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
        let engine = Engine::Rocks(RocksEngine::open(path, &cfg, true)?);
        if engine.get(Cf::Meta, keys::META_SUPERBLOCK)?.is_some() {
            return Err(StoreError::AlreadyFormatted {
                path: path.display().to_string(),
            });
        }
        let superblock = Superblock {
            format_version: FORMAT_VERSION,
            ..superblock
        };
        Self::format(engine, superblock, cfg, Some(path))
    }

    /// Opens a store made by [`Store::mkfs`]. Recovery after a crash is RocksDB's WAL replay:
    /// every submit that returned is there, nothing of one that did not return is half there.
    pub fn open(path: impl AsRef<Path>, cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let path = path.as_ref();
        let not_formatted = || StoreError::NotFormatted {
            path: path.display().to_string(),
        };
        if !path.join("CURRENT").exists() {
            return Err(not_formatted());
        }
        let engine = Engine::Rocks(RocksEngine::open(path, &cfg, false)?);
        let raw = engine
            .get(Cf::Meta, keys::META_SUPERBLOCK)?
            .ok_or_else(not_formatted)?;
        let superblock: Superblock =
            postcard::from_bytes(&raw).map_err(|e| StoreError::corrupt_meta("superblock", e))?;
        if superblock.format_version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat {
                found: superblock.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let used = match engine.get(Cf::Meta, keys::META_USED)? {
            Some(v) => keys::decode_u64(&v, "used-bytes counter")? as i64,
            None => 0,
        };
        Ok(Store {
            inner: Arc::new(Inner {
                engine,
                cfg,
                superblock,
                used: AtomicI64::new(used),
                path: Some(path.to_path_buf()),
            }),
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.inner.superblock
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    pub fn is_in_memory(&self) -> bool {
        matches!(self.inner.engine, Engine::Memory(_))
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    /// Applies `txn` atomically and durably; see the module docs for the contract. Never blocks
    /// the async runtime: RocksDB commits run on a blocking thread, the in-memory store applies
    /// inline (no fsync, and deterministic for simulations).
    pub async fn submit(&self, txn: Transaction) -> Result<()> {
        if self.is_in_memory() {
            return self.submit_blocking(&txn);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.submit_blocking(&txn))
            .await
            .map_err(|e| StoreError::Io(format!("commit task failed: {e}")))?
    }

    /// Synchronous [`Store::submit`]: blocks the calling thread until the batch is durable.
    pub fn submit_blocking(&self, txn: &Transaction) -> Result<()> {
        self.commit(txn, true).map(|_| ())
    }

    /// Applies `txn` atomically and makes it visible to every later read and build at once,
    /// without waiting for it to be durable: the returned [`Durable`] resolves once it is
    /// (the committer writes the next group while the WAL fsync of this one runs). The op
    /// path uses it so the next write to an object can be built on this one while this one's
    /// fsync is pending; its callers must not let anyone act on the applied state before
    /// then (the OSD holds reads of an object back while a write to it is in flight).
    pub fn apply_blocking(&self, txn: &Transaction) -> Result<Durable> {
        self.commit(txn, false)
    }

    /// Makes every transaction applied before this call durable.
    pub fn sync_blocking(&self) -> Result<()> {
        self.apply_blocking(&Transaction::new())?.wait()
    }

    fn commit(&self, txn: &Transaction, durable: bool) -> Result<Durable> {
        let inner = &*self.inner;
        let started = std::time::Instant::now();
        let built = txn::build(&inner.engine, inner.cfg.max_object_size, txn)?;
        stage("build", started);
        let delta = built.used_delta;
        // Reserve growth before writing so concurrent transactions cannot jointly overshoot the
        // capacity; shrinkage is only released after it is durable.
        if delta > 0 {
            let before = inner.used.fetch_add(delta, Ordering::SeqCst);
            if let Some(cap) = inner.cfg.capacity_bytes {
                let after = before.saturating_add(delta);
                if after > cap as i64 {
                    inner.used.fetch_sub(delta, Ordering::SeqCst);
                    return Err(StoreError::Full {
                        reason: format!(
                            "transaction needs {delta} more bytes but {before} of the \
                             {cap}-byte capacity are used; remove objects or raise capacity_bytes"
                        ),
                    });
                }
            }
        }
        let res = if durable {
            inner.engine.write(built.ops, inner.cfg.sync).map(|()| None)
        } else {
            let started = std::time::Instant::now();
            let r = inner.engine.write_split(built.ops).map(Some);
            stage("apply", started);
            r
        };
        match (&res, delta) {
            (Err(_), d) if d > 0 => {
                inner.used.fetch_sub(d, Ordering::SeqCst);
            }
            (Ok(_), d) if d < 0 => {
                inner.used.fetch_add(d, Ordering::SeqCst);
            }
            _ => {}
        }
        if let Err(e) = &res {
            tracing::warn!(error = %e, "object store commit failed");
        }
        Ok(res?.unwrap_or(Durable::READY))
    }

    // -----------------------------------------------------------------------------------------
    // Object reads

    fn onode(&self, obj: &ObjectId) -> Result<(Vec<u8>, Onode)> {
        txn::check_object(obj)?;
        let key = keys::onode_key(obj);
        let raw = self
            .inner
            .engine
            .get(Cf::Onode, &key)?
            .ok_or_else(|| StoreError::NotFound {
                object: obj.to_string(),
            })?;
        let onode = Onode::decode(&raw, obj)?;
        Ok((key, onode))
    }

    /// `obj`'s onode, read once for every read op of one request; `None` if it does not exist.
    pub fn head(&self, obj: &ObjectId) -> Result<Option<ObjectHead>> {
        match self.onode(obj) {
            Ok((key, onode)) => Ok(Some(ObjectHead { key, onode })),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn exists(&self, obj: &ObjectId) -> Result<bool> {
        match self.onode(obj) {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn stat(&self, obj: &ObjectId) -> Result<ObjectStat> {
        let (_, o) = self.onode(obj)?;
        Ok(ObjectStat {
            size: o.size,
            stored_bytes: o.data_bytes(),
            meta: o.meta,
        })
    }

    /// Up to `len` bytes from `offset`: short at end of object, empty past it, zeros in holes.
    /// Every chunk touched is verified; a bad one fails the whole read with `Corrupt`.
    pub fn read(&self, obj: &ObjectId, offset: u64, len: u64) -> Result<Bytes> {
        let (key, o) = self.onode(obj)?;
        self.read_chunks(obj, &key, &o, offset, len)
    }

    /// [`Store::read`] of an object whose onode `head` was already read.
    pub fn read_head(
        &self,
        obj: &ObjectId,
        head: &ObjectHead,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        self.read_chunks(obj, &head.key, &head.onode, offset, len)
    }

    fn read_chunks(
        &self,
        obj: &ObjectId,
        key: &[u8],
        o: &Onode,
        offset: u64,
        len: u64,
    ) -> Result<Bytes> {
        if offset >= o.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(len).min(o.size);
        let first = offset / CHUNK_SIZE;
        let last = (end - 1) / CHUNK_SIZE;
        let mut out = vec![0u8; (end - offset) as usize];
        let wanted: Vec<(u64, u32)> = o
            .chunks
            .range(first..=last)
            .map(|(&i, &l)| (i, l))
            .collect();
        if wanted.is_empty() {
            return Ok(Bytes::from(out));
        }
        // One range scan instead of a point lookup per chunk when several are needed.
        let found: Vec<(Vec<u8>, Bytes)> = if wanted.len() == 1 {
            let k = keys::chunk_key(key, wanted[0].0);
            self.inner
                .engine
                .get(Cf::Data, &k)?
                .map(|v| (k, v))
                .into_iter()
                .collect()
        } else {
            self.inner.engine.scan(
                Cf::Data,
                &keys::chunk_key(key, wanted[0].0),
                &keys::chunk_key(key, last + 1),
                usize::MAX,
            )?
        };
        let mut found = found.into_iter().peekable();
        for (idx, len) in wanted {
            let k = keys::chunk_key(key, idx);
            // Skip orphans the onode does not list; they are never returned.
            while found.peek().is_some_and(|(fk, _)| *fk < k) {
                found.next();
            }
            let raw = match found.next_if(|(fk, _)| *fk == k) {
                Some((_, v)) => v,
                None => {
                    return Err(StoreError::Corrupt {
                        object: obj.to_string(),
                        chunk: idx,
                    })
                }
            };
            let data = verify_chunk(&raw, len, obj, idx)?;
            let base = idx * CHUNK_SIZE;
            let lo = offset.max(base);
            let hi = end.min(base + data.len() as u64);
            if lo < hi {
                out[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&data[(lo - base) as usize..(hi - base) as usize]);
            }
        }
        Ok(Bytes::from(out))
    }

    pub fn getxattr(&self, obj: &ObjectId, name: &str) -> Result<Option<Bytes>> {
        Ok(self.onode(obj)?.1.xattrs.get(name).cloned())
    }

    pub fn xattrs(&self, obj: &ObjectId) -> Result<std::collections::BTreeMap<String, Bytes>> {
        Ok(self.onode(obj)?.1.xattrs)
    }

    pub fn omap_get_header(&self, obj: &ObjectId) -> Result<Option<Bytes>> {
        let (key, _) = self.onode(obj)?;
        self.inner
            .engine
            .get(Cf::Omap, &keys::omap_header_key(&key))
    }

    /// Values of the given keys; absent keys are left out.
    pub fn omap_get(&self, obj: &ObjectId, wanted: &[&[u8]]) -> Result<Vec<(Bytes, Bytes)>> {
        let (key, _) = self.onode(obj)?;
        let mut out = Vec::new();
        for k in wanted {
            if let Some(v) = self
                .inner
                .engine
                .get(Cf::Omap, &keys::omap_entry_key(&key, k))?
            {
                out.push((Bytes::copy_from_slice(k), v));
            }
        }
        Ok(out)
    }

    /// Up to `max` entries in key order, strictly after `start_after` (from the first if None).
    pub fn omap_list(
        &self,
        obj: &ObjectId,
        start_after: Option<&[u8]>,
        max: usize,
    ) -> Result<OmapListing> {
        let (key, _) = self.onode(obj)?;
        let prefix = keys::omap_entry_prefix(&key);
        let start = match start_after {
            Some(k) => {
                let mut s = keys::omap_entry_key(&key, k);
                s.push(0);
                s
            }
            None => prefix.clone(),
        };
        let mut page = self.inner.engine.scan(
            Cf::Omap,
            &start,
            &keys::prefix_end(&prefix),
            max.saturating_add(1),
        )?;
        let more = page.len() > max;
        page.truncate(max);
        Ok(OmapListing {
            entries: page
                .into_iter()
                .map(|(k, v)| (Bytes::copy_from_slice(&k[prefix.len()..]), v))
                .collect(),
            more,
        })
    }

    /// Objects of `pg` in hash order (see the key layout), strictly after `start_after`.
    pub fn list_objects(
        &self,
        pg: PgId,
        start_after: Option<&ObjectId>,
        max: usize,
    ) -> Result<ObjectListing> {
        txn::check_pg(pg)?;
        let prefix = keys::pg_prefix(pg);
        let start = match start_after {
            Some(o) if o.pg() == pg => {
                let mut s = keys::onode_key(o);
                s.push(0);
                s
            }
            Some(o) => {
                return Err(StoreError::InvalidArgument(format!(
                    "cursor {o} is not in PG {pg}"
                )))
            }
            None => prefix.clone(),
        };
        let mut page = self.inner.engine.scan(
            Cf::Onode,
            &start,
            &keys::prefix_end(&prefix),
            max.saturating_add(1),
        )?;
        let more = page.len() > max;
        page.truncate(max);
        let objects = page
            .iter()
            .map(|(k, _)| keys::decode_onode_key(k))
            .collect::<Result<Vec<_>>>()?;
        let next = if more { objects.last().cloned() } else { None };
        Ok(ObjectListing { objects, next })
    }

    /// Recomputes every stored chunk's digest and compares it with the stored one; also digests
    /// omap and attributes so replicas can be compared. Never fails on bad chunks: reporting
    /// them is the point.
    pub fn deep_scrub_object(&self, obj: &ObjectId) -> Result<ScrubReport> {
        let (key, o) = self.onode(obj)?;
        let stored = self.inner.engine.scan(
            Cf::Data,
            &keys::chunk_key(&key, 0),
            &keys::prefix_end(&key),
            usize::MAX,
        )?;
        let by_key: std::collections::HashMap<Vec<u8>, Bytes> = stored.into_iter().collect();
        let mut data_h = blake3::Hasher::new();
        data_h.update(&o.size.to_be_bytes());
        let mut chunks = Vec::with_capacity(o.chunks.len());
        for &idx in o.chunks.keys() {
            let (stored, computed) = match by_key.get(&keys::chunk_key(&key, idx)) {
                Some(raw) => match split_chunk(raw) {
                    Some((d, data)) => (Some(d), Some(*blake3::hash(data).as_bytes())),
                    None => (None, Some(*blake3::hash(raw).as_bytes())),
                },
                None => (None, None),
            };
            data_h.update(&idx.to_be_bytes());
            data_h.update(&computed.unwrap_or([0; 32]));
            chunks.push(ChunkScrub {
                index: idx,
                stored,
                computed,
            });
        }
        let mut omap_h = blake3::Hasher::new();
        let mut start = key.clone();
        let end = keys::prefix_end(&key);
        loop {
            let page = self.inner.engine.scan(Cf::Omap, &start, &end, 1024)?;
            for (k, v) in &page {
                let rel = &k[key.len()..];
                omap_h.update(&(rel.len() as u64).to_be_bytes());
                omap_h.update(rel);
                omap_h.update(&(v.len() as u64).to_be_bytes());
                omap_h.update(v);
            }
            match page.last() {
                Some((k, _)) if page.len() == 1024 => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        let attrs = postcard::to_stdvec(&(&o.meta, &o.xattrs))
            .map_err(|e| StoreError::corrupt_meta("attrs", e))?;
        Ok(ScrubReport {
            size: o.size,
            chunks,
            data_digest: *data_h.finalize().as_bytes(),
            omap_digest: *omap_h.finalize().as_bytes(),
            attrs_digest: *blake3::hash(&attrs).as_bytes(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // PG reads

    pub fn list_pgs(&self) -> Result<Vec<PgId>> {
        self.inner
            .engine
            .scan(Cf::Meta, &[keys::META_PG], &[keys::META_PG + 1], usize::MAX)?
            .iter()
            .map(|(k, _)| keys::decode_pg_key(k))
            .collect()
    }

    pub fn pg_exists(&self, pg: PgId) -> Result<bool> {
        txn::check_pg(pg)?;
        Ok(self
            .inner
            .engine
            .get(Cf::Meta, &keys::meta_pg_key(pg))?
            .is_some())
    }

    pub fn pg_info(&self, pg: PgId) -> Result<Option<Bytes>> {
        txn::check_pg(pg)?;
        self.inner
            .engine
            .get(Cf::PgLog, &keys::pglog_key(pg, keys::PGLOG_INFO, &[]))
    }

    /// Log entries with version `>= from`, at most `max`, in version order.
    pub fn pg_log_scan(&self, pg: PgId, from: u64, max: usize) -> Result<Vec<(u64, Bytes)>> {
        txn::check_pg(pg)?;
        let head = keys::pglog_key(pg, keys::PGLOG_ENTRY, &[]);
        self.inner
            .engine
            .scan(
                Cf::PgLog,
                &keys::pglog_entry_key(pg, from),
                &keys::prefix_end(&head),
                max,
            )?
            .into_iter()
            .map(|(k, v)| Ok((keys::decode_u64(&k[head.len()..], "PG log key")?, v)))
            .collect()
    }

    /// The (version, result) recorded for `reqid`, if it is still remembered.
    pub fn dup_lookup(&self, pg: PgId, reqid: &[u8]) -> Result<Option<(u64, Bytes)>> {
        txn::check_pg(pg)?;
        match self
            .inner
            .engine
            .get(Cf::PgLog, &keys::pglog_key(pg, keys::PGLOG_DUP, reqid))?
        {
            Some(v) => txn::decode_dup(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.engine.get(Cf::Meta, &keys::meta_user_key(key))
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            used_bytes: self.inner.used.load(Ordering::SeqCst).max(0) as u64,
            capacity_bytes: self.inner.cfg.capacity_bytes,
            db_bytes: self.inner.engine.db_bytes(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fault injection

    /// Flips bit 0 of byte `byte` of the stored data of chunk `chunk`, bypassing transactions and
    /// checksums, to simulate bit rot on this replica. For tests (here and in other crates'
    /// integration tests) only; returns `NotFound` if the chunk is not stored (a hole) and
    /// `InvalidArgument` if `byte` is beyond its stored length.
    #[doc(hidden)]
    pub fn inject_bitflip_for_testing(
        &self,
        obj: &ObjectId,
        chunk: u64,
        byte: usize,
    ) -> Result<()> {
        let (key, o) = self.onode(obj)?;
        let len = *o.chunks.get(&chunk).ok_or_else(|| StoreError::NotFound {
            object: format!("{obj} chunk {chunk}"),
        })?;
        if byte >= len as usize {
            return Err(StoreError::InvalidArgument(format!(
                "byte {byte} is beyond chunk {chunk}'s {len} stored bytes"
            )));
        }
        let ck = keys::chunk_key(&key, chunk);
        let pos = onode::DIGEST_LEN + byte;
        match &self.inner.engine {
            Engine::Memory(m) => {
                m.poke(Cf::Data, &ck, |v| {
                    if let Some(b) = v.get_mut(pos) {
                        *b ^= 1;
                    }
                })?;
            }
            Engine::Rocks(r) => {
                let raw =
                    self.inner
                        .engine
                        .get(Cf::Data, &ck)?
                        .ok_or_else(|| StoreError::NotFound {
                            object: format!("{obj} chunk {chunk}"),
                        })?;
                let mut v = raw.to_vec();
                if let Some(b) = v.get_mut(pos) {
                    *b ^= 1;
                }
                let db = r.raw_db();
                let cf = db
                    .cf_handle("data")
                    .ok_or_else(|| StoreError::Io("data column family missing".into()))?;
                let mut wo = rocksdb::WriteOptions::default();
                wo.set_sync(true);
                db.put_cf_opt(cf, &ck, v, &wo)?;
            }
        }
        Ok(())
    }
}

fn encode_superblock(sb: &Superblock) -> Vec<u8> {
    postcard::to_stdvec(sb).unwrap_or_default()
}
