//! The key-value engines under the store: RocksDB, and an ordered in-memory map with the same
//! column families and the same write-batch semantics.
//!
//! Everything above this module (transaction execution, reads, verification, accounting) is
//! shared, so the two stores differ only in where bytes live and whether commits are durable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, MergeOperands, Options,
    WriteBatch, WriteOptions, DB,
};

use super::error::{Result, StoreError};
use super::keys::META_USED;
use super::types::{CommitMode, StoreConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cf {
    Meta = 0,
    Onode = 1,
    Data = 2,
    Omap = 3,
    PgLog = 4,
}

pub(crate) const CF_NAMES: [&str; 5] = ["meta", "onode", "data", "omap", "pglog"];

impl Cf {
    fn name(self) -> &'static str {
        CF_NAMES[self as usize]
    }
}

/// One mutation in a batch. Applied strictly in order, so a put after a range delete survives.
#[derive(Clone, Debug)]
pub(crate) enum KvOp {
    Put(Cf, Vec<u8>, Bytes),
    Delete(Cf, Vec<u8>),
    /// `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
    /// Add to the persisted used-bytes counter (a RocksDB merge, so concurrent batches commute).
    AddUsed(i64),
}

pub(crate) enum Engine {
    Memory(MemEngine),
    Rocks(RocksEngine),
}

impl Engine {
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Bytes>> {
        match self {
            Engine::Memory(m) => Ok(m.maps.read().map_err(poisoned)?[cf as usize]
                .get(key)
                .cloned()),
            Engine::Rocks(r) => {
                let v = r.db.get_pinned_cf(r.cf(cf)?, key)?;
                Ok(v.map(|v| Bytes::copy_from_slice(&v)))
            }
        }
    }

    /// Entries with `start <= key < end`, at most `max`, in key order.
    pub fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end || max == 0 {
            return Ok(Vec::new());
        }
        match self {
            Engine::Memory(m) => Ok(m.maps.read().map_err(poisoned)?[cf as usize]
                .range::<[u8], _>((
                    std::ops::Bound::Included(start),
                    std::ops::Bound::Excluded(end),
                ))
                .take(max)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()),
            Engine::Rocks(r) => {
                let mut ro = rocksdb::ReadOptions::default();
                ro.set_iterate_upper_bound(end.to_vec());
                let mut it = r.db.raw_iterator_cf_opt(r.cf(cf)?, ro);
                it.seek(start);
                let mut out = Vec::new();
                while it.valid() && out.len() < max {
                    if let (Some(k), Some(v)) = (it.key(), it.value()) {
                        out.push((k.to_vec(), Bytes::copy_from_slice(v)));
                    }
                    it.next();
                }
                it.status()?;
                Ok(out)
            }
        }
    }

    /// Applies `ops` atomically; with `sync`, durably (WAL fsynced) before returning.
    pub fn write(&self, ops: Vec<KvOp>, sync: bool) -> Result<()> {
        match self {
            Engine::Memory(m) => m.write(ops),
            Engine::Rocks(r) => r.write(ops, sync),
        }
    }

    /// Applies `ops` atomically; returns once they are visible to reads, with a [`Durable`]
    /// that resolves once they are also durable (see `Store::apply_blocking`).
    pub fn write_split(&self, ops: Vec<KvOp>) -> Result<Durable> {
        match self {
            Engine::Memory(m) => m.write(ops).map(|()| Durable::READY),
            Engine::Rocks(r) => r.write_split(ops),
        }
    }

    pub fn db_bytes(&self) -> Option<u64> {
        match self {
            Engine::Memory(_) => None,
            Engine::Rocks(r) => Some(r.db_bytes()),
        }
    }
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Io("in-memory store lock poisoned by a panicking thread".into())
}

fn decode_counter(b: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------------
// In-memory engine

#[derive(Default)]
pub(crate) struct MemEngine {
    maps: RwLock<[BTreeMap<Vec<u8>, Bytes>; 5]>,
}

impl MemEngine {
    fn write(&self, ops: Vec<KvOp>) -> Result<()> {
        let mut maps = self.maps.write().map_err(poisoned)?;
        // Check the one fallible step before mutating anything: the batch is all-or-nothing.
        let mut used = match maps[Cf::Meta as usize].get(META_USED) {
            Some(v) => decode_counter(v).ok_or_else(|| {
                StoreError::corrupt_meta("used-bytes counter", "not an 8-byte integer")
            })?,
            None => 0,
        };
        for op in ops {
            match op {
                KvOp::Put(cf, k, v) => {
                    maps[cf as usize].insert(k, v);
                }
                KvOp::Delete(cf, k) => {
                    maps[cf as usize].remove(&k);
                }
                KvOp::DeleteRange(cf, from, to) => {
                    if from < to {
                        let map = &mut maps[cf as usize];
                        let doomed: Vec<Vec<u8>> =
                            map.range(from..to).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            map.remove(&k);
                        }
                    }
                }
                KvOp::AddUsed(d) => {
                    used = used.wrapping_add(d);
                    maps[Cf::Meta as usize].insert(
                        META_USED.to_vec(),
                        Bytes::copy_from_slice(&used.to_be_bytes()),
                    );
                }
            }
        }
        Ok(())
    }

    /// Test hook: mutate a stored value in place, bypassing transactions.
    pub fn poke(&self, cf: Cf, key: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Result<bool> {
        let mut maps = self.maps.write().map_err(poisoned)?;
        let Some(v) = maps[cf as usize].get_mut(key) else {
            return Ok(false);
        };
        let mut raw = v.to_vec();
        f(&mut raw);
        *v = Bytes::from(raw);
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// RocksDB engine

pub(crate) struct RocksEngine {
    db: Arc<DB>,
    committer: Option<Committer>,
    /// `StoreConfig::sync`: without it (tests, benchmarks) nothing is fsynced.
    sync: bool,
}

/// Resolves once a batch written by [`Engine::write_split`] is durable.
pub struct Durable(Pending);

enum Pending {
    Ready,
    /// The committer's syncer answers after the WAL fsync that covers the batch.
    Syncer(mpsc::Receiver<Result<()>>),
    /// Concurrent-writers mode: the waiter fsyncs the WAL itself.
    Flush(Arc<DB>),
}

impl Durable {
    pub(crate) const READY: Durable = Durable(Pending::Ready);

    /// Blocks until the batch is durable.
    pub fn wait(self) -> Result<()> {
        match self.0 {
            Pending::Ready => Ok(()),
            Pending::Syncer(rx) => rx
                .recv()
                .map_err(|_| StoreError::Io("committer thread exited".into()))?,
            Pending::Flush(db) => Ok(db.flush_wal(true)?),
        }
    }
}

struct Job {
    ops: Vec<KvOp>,
    /// Told once the batch is written (visible), for split commits.
    applied: Option<mpsc::SyncSender<Result<()>>>,
    /// Told once the batch is durable.
    durable: mpsc::SyncSender<Result<()>>,
    queued: std::time::Instant,
}

struct Committer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Merge operator of the used-bytes counter: big-endian i64 deltas added up. Associative, so
/// RocksDB may combine operands in any grouping.
fn add_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut v = match existing {
        Some(b) => decode_counter(b)?,
        None => 0,
    };
    for op in operands {
        v = v.wrapping_add(decode_counter(op)?);
    }
    Some(v.to_be_bytes().to_vec())
}

fn fill_batch(db: &DB, batch: &mut WriteBatch, ops: &[KvOp]) -> Result<()> {
    let cf = |c: Cf| {
        db.cf_handle(c.name())
            .ok_or_else(|| StoreError::Io(format!("column family {} missing", c.name())))
    };
    for op in ops {
        match op {
            KvOp::Put(c, k, v) => batch.put_cf(cf(*c)?, k, v),
            KvOp::Delete(c, k) => batch.delete_cf(cf(*c)?, k),
            KvOp::DeleteRange(c, a, b) => batch.delete_range_cf(cf(*c)?, a, b),
            KvOp::AddUsed(d) => batch.merge_cf(cf(Cf::Meta)?, META_USED, d.to_be_bytes()),
        }
    }
    Ok(())
}

fn write_opts(sync: bool) -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    wo
}

impl RocksEngine {
    pub fn open(path: &Path, cfg: &StoreConfig, create: bool) -> Result<RocksEngine> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(create);
        db_opts.create_missing_column_families(create);
        db_opts.set_max_background_jobs(2);
        // Reusing WAL files turns each sync into a data-only fdatasync: appending to a fresh
        // file also commits file-size metadata through the filesystem journal, which DESIGN §C
        // measured as far more expensive than the write itself.
        db_opts.set_recycle_log_file_num(4);
        db_opts.set_max_total_wal_size(128 << 20);
        db_opts.set_bytes_per_sync(1 << 20);
        let cache = Cache::new_lru_cache(cfg.block_cache_bytes);

        let cf_opts = |cf: Cf| {
            let mut o = Options::default();
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            t.set_bloom_filter(10.0, false);
            t.set_cache_index_and_filter_blocks(true);
            o.set_block_based_table_factory(&t);
            match cf {
                Cf::Data => {
                    // Chunk data is mostly incompressible (or already sparse-trimmed); big values
                    // go to blob files so compaction does not rewrite them (DESIGN §6.1).
                    o.set_compression_type(DBCompressionType::None);
                    o.set_enable_blob_files(cfg.blob_files);
                    o.set_min_blob_size(4096);
                    o.set_blob_file_size(256 << 20);
                    o.set_blob_compression_type(DBCompressionType::None);
                    o.set_enable_blob_gc(true);
                    o.set_write_buffer_size(64 << 20);
                }
                Cf::Meta => {
                    o.set_compression_type(DBCompressionType::Lz4);
                    o.set_merge_operator_associative("basalt_add_i64", add_merge);
                }
                _ => {
                    o.set_compression_type(DBCompressionType::Lz4);
                    o.set_write_buffer_size(32 << 20);
                }
            }
            ColumnFamilyDescriptor::new(cf.name(), o)
        };
        let cfs = [Cf::Meta, Cf::Onode, Cf::Data, Cf::Omap, Cf::PgLog].map(cf_opts);
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, cfs)?);

        let committer = match cfg.commit_mode {
            CommitMode::ConcurrentWriters => None,
            CommitMode::CommitterThread => Some(Committer::start(db.clone(), cfg.sync)?),
        };
        Ok(RocksEngine {
            db,
            committer,
            sync: cfg.sync,
        })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError::Io(format!("column family {} missing", cf.name())))
    }

    fn write(&self, ops: Vec<KvOp>, sync: bool) -> Result<()> {
        if let Some(c) = &self.committer {
            return c.submit(ops, None)?.wait();
        }
        let mut batch = WriteBatch::default();
        fill_batch(&self.db, &mut batch, &ops)?;
        self.db.write_opt(batch, &write_opts(sync))?;
        Ok(())
    }

    fn write_split(&self, ops: Vec<KvOp>) -> Result<Durable> {
        if let Some(c) = &self.committer {
            let (applied, wait) = mpsc::sync_channel(1);
            let durable = c.submit(ops, Some(applied))?;
            wait.recv()
                .map_err(|_| StoreError::Io("committer thread exited".into()))??;
            return Ok(durable);
        }
        let mut batch = WriteBatch::default();
        fill_batch(&self.db, &mut batch, &ops)?;
        self.db.write_opt(batch, &write_opts(false))?;
        Ok(if self.sync {
            Durable(Pending::Flush(self.db.clone()))
        } else {
            Durable::READY
        })
    }

    fn db_bytes(&self) -> u64 {
        let mut total = 0;
        for name in CF_NAMES {
            if let Some(cf) = self.db.cf_handle(name) {
                for prop in [
                    "rocksdb.total-sst-files-size",
                    "rocksdb.total-blob-file-size",
                    "rocksdb.cur-size-all-mem-tables",
                ] {
                    total += self
                        .db
                        .property_int_value_cf(cf, prop)
                        .ok()
                        .flatten()
                        .unwrap_or(0);
                }
            }
        }
        total
    }

    pub fn raw_db(&self) -> &DB {
        &self.db
    }
}

impl Committer {
    fn start(db: Arc<DB>, sync: bool) -> Result<Committer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("osd-store-commit".into())
            .spawn(move || Self::run(db, rx, sync))
            .map_err(|e| StoreError::Io(format!("cannot start committer thread: {e}")))?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Two threads in a pipeline. This one takes everything queued (up to a bound, so one
    /// group's latency stays small), writes it as one batch without fsync, tells split
    /// commits it is visible, and hands the group to the syncer; then it writes the next
    /// group while the syncer fsyncs the WAL once for every group handed to it since its last
    /// fsync. A combined batch is still atomic, so each transaction in it is too, and a fsync
    /// covers every batch written before it (the WAL is a log).
    fn run(db: Arc<DB>, rx: mpsc::Receiver<Job>, sync: bool) {
        const MAX_GROUP_BYTES: usize = 4 << 20;
        let (to_syncer, groups) = mpsc::channel::<Vec<mpsc::SyncSender<Result<()>>>>();
        let syncer = {
            let db = db.clone();
            std::thread::Builder::new()
                .name("osd-store-sync".into())
                .spawn(move || Self::sync_loop(&db, groups, sync))
        };
        let syncer = match syncer {
            Ok(t) => t,
            Err(e) => {
                let e = StoreError::Io(format!("cannot start the WAL sync thread: {e}"));
                while let Ok(j) = rx.recv() {
                    let _ = j.durable.send(Err(e.clone()));
                    if let Some(a) = j.applied {
                        let _ = a.send(Err(e.clone()));
                    }
                }
                return;
            }
        };
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut bytes = 0;
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(j) => {
                        bytes += j.ops.iter().map(op_bytes).sum::<usize>();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            for j in &jobs {
                super::stage("queue", j.queued);
            }
            let started = std::time::Instant::now();
            let mut batch = WriteBatch::default();
            let res = jobs
                .iter()
                .try_for_each(|j| fill_batch(&db, &mut batch, &j.ops))
                .and_then(|()| Ok(db.write_opt(batch, &write_opts(false))?));
            super::stage("write", started);
            let mut waiting = Vec::with_capacity(jobs.len());
            for j in jobs {
                if let Some(a) = j.applied {
                    let _ = a.send(res.clone());
                }
                match &res {
                    Ok(()) => waiting.push(j.durable),
                    Err(e) => {
                        let _ = j.durable.send(Err(e.clone()));
                    }
                }
            }
            if !waiting.is_empty() {
                if let Err(mpsc::SendError(waiting)) = to_syncer.send(waiting) {
                    for w in waiting {
                        let _ = w.send(Err(StoreError::Io("WAL sync thread exited".into())));
                    }
                }
            }
        }
        drop(to_syncer);
        let _ = syncer.join();
    }

    /// One WAL fsync for every group written since the last one.
    fn sync_loop(db: &DB, groups: mpsc::Receiver<Vec<mpsc::SyncSender<Result<()>>>>, sync: bool) {
        // RocksDB latches a failed WAL sync; so do we, rather than ask again.
        let mut failed: Option<StoreError> = None;
        while let Ok(mut waiting) = groups.recv() {
            while let Ok(more) = groups.try_recv() {
                waiting.extend(more);
            }
            let res = match &failed {
                Some(e) => Err(e.clone()),
                None if sync => {
                    let started = std::time::Instant::now();
                    let r = db.flush_wal(true).map_err(StoreError::from);
                    super::stage("wal_sync", started);
                    if let Err(e) = &r {
                        failed = Some(e.clone());
                    }
                    r
                }
                None => Ok(()),
            };
            metrics::histogram!("basalt_store_group_commit_transactions")
                .record(waiting.len() as f64);
            for w in waiting {
                let _ = w.send(res.clone());
            }
        }
    }

    /// Queues `ops`; `applied` is told once they are written. Returns the durability wait.
    fn submit(
        &self,
        ops: Vec<KvOp>,
        applied: Option<mpsc::SyncSender<Result<()>>>,
    ) -> Result<Durable> {
        let (durable, wait) = mpsc::sync_channel(1);
        let tx = self.tx.lock().map_err(poisoned)?;
        let tx = tx
            .as_ref()
            .ok_or_else(|| StoreError::Io("store is closing".into()))?;
        tx.send(Job {
            ops,
            applied,
            durable,
            queued: std::time::Instant::now(),
        })
        .map_err(|_| StoreError::Io("committer thread exited".into()))?;
        Ok(Durable(Pending::Syncer(wait)))
    }
}

fn op_bytes(op: &KvOp) -> usize {
    match op {
        KvOp::Put(_, k, v) => k.len() + v.len(),
        KvOp::Delete(_, k) => k.len(),
        KvOp::DeleteRange(_, a, b) => a.len() + b.len(),
        KvOp::AddUsed(_) => 8,
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut t) = self.thread.lock() {
            if let Some(t) = t.take() {
                let _ = t.join();
            }
        }
    }
}
