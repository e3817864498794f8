//! The key-value engines under the store: RocksDB, and an ordered in-memory map with the same
//! column families and the same write-batch semantics.
//!
//! Neither is the source of durability: the journal is (see the store docs). A batch written
//! here is visible at once and survives only once [`Engine::flush`] returns (the checkpoint).
//! RocksDB runs without its WAL and with atomic flushes across column families, so after a
//! crash it holds the state of a flush: the last checkpoint, or a later one at shutdown (the
//! store checkpoints before it closes). Replaying journal records onto a later state than the
//! one they were written after is harmless: every record is idempotent (puts, deletes and range
//! deletes, with absolute values). The in-memory engine, built with power-loss tracking, keeps
//! a copy of its last flushed state for the crash simulation.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, FlushOptions, Options,
    WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use super::types::StoreConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum KvOp {
    Put(Cf, Vec<u8>, Bytes),
    Delete(Cf, Vec<u8>),
    /// `[from, to)`.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
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

    /// Applies `ops` atomically and visibly; durable only after the next [`Engine::flush`].
    pub fn write(&self, ops: Vec<KvOp>) -> Result<()> {
        match self {
            Engine::Memory(m) => m.write(ops),
            Engine::Rocks(r) => r.write(ops),
        }
    }

    /// Makes everything written so far durable, atomically across column families.
    pub fn flush(&self) -> Result<()> {
        match self {
            Engine::Memory(m) => m.flush(),
            Engine::Rocks(r) => r.flush(),
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

// ---------------------------------------------------------------------------------------------
// In-memory engine

type Maps = [BTreeMap<Vec<u8>, Bytes>; 5];

#[derive(Default)]
pub(crate) struct MemEngine {
    maps: RwLock<Maps>,
    /// With power-loss tracking: the maps as of the last flush.
    flushed: Option<Mutex<Maps>>,
}

impl MemEngine {
    /// An engine that remembers its last flushed state for [`MemEngine::power_loss`].
    pub fn with_power_loss() -> MemEngine {
        MemEngine {
            maps: RwLock::default(),
            flushed: Some(Mutex::default()),
        }
    }

    /// The engine after a power loss: its last flushed state (still tracking power loss).
    pub fn power_loss(&self) -> Result<MemEngine> {
        let state = match &self.flushed {
            Some(f) => f.lock().map_err(poisoned)?.clone(),
            None => self.maps.read().map_err(poisoned)?.clone(),
        };
        Ok(MemEngine {
            maps: RwLock::new(state.clone()),
            flushed: Some(Mutex::new(state)),
        })
    }

    fn flush(&self) -> Result<()> {
        if let Some(f) = &self.flushed {
            *f.lock().map_err(poisoned)? = self.maps.read().map_err(poisoned)?.clone();
        }
        Ok(())
    }

    fn write(&self, ops: Vec<KvOp>) -> Result<()> {
        let mut maps = self.maps.write().map_err(poisoned)?;
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
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// RocksDB engine

pub(crate) struct RocksEngine {
    db: DB,
}

/// Memtable size per column family. RocksDB flushes a full memtable by itself, and such a
/// flush could persist a batch whose journal record is not yet durable; the store checkpoints
/// (flushes on purpose) long before: see `commit::CHECKPOINT_KV_BYTES`.
pub(crate) const WRITE_BUFFER_BYTES: usize = 64 << 20;

impl RocksEngine {
    pub fn open(path: &Path, cfg: &StoreConfig, create: bool) -> Result<RocksEngine> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(create);
        db_opts.create_missing_column_families(create);
        db_opts.set_max_background_jobs(2);
        // The journal is the log: a flush must persist every column family at the same point.
        db_opts.set_atomic_flush(true);
        db_opts.set_db_write_buffer_size(0);
        let cache = Cache::new_lru_cache(cfg.block_cache_bytes);

        let cf_opts = |cf: Cf| {
            let mut o = Options::default();
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            t.set_bloom_filter(10.0, false);
            t.set_cache_index_and_filter_blocks(true);
            o.set_block_based_table_factory(&t);
            o.set_write_buffer_size(WRITE_BUFFER_BYTES);
            o.set_max_write_buffer_number(2);
            o.set_compression_type(DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(cf.name(), o)
        };
        let cfs = [Cf::Meta, Cf::Onode, Cf::Data, Cf::Omap, Cf::PgLog].map(cf_opts);
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        Ok(RocksEngine { db })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StoreError::Io(format!("column family {} missing", cf.name())))
    }

    fn write(&self, ops: Vec<KvOp>) -> Result<()> {
        let mut batch = WriteBatch::default();
        for op in &ops {
            match op {
                KvOp::Put(c, k, v) => batch.put_cf(self.cf(*c)?, k, v),
                KvOp::Delete(c, k) => batch.delete_cf(self.cf(*c)?, k),
                KvOp::DeleteRange(c, a, b) => batch.delete_range_cf(self.cf(*c)?, a, b),
            }
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let cfs = CF_NAMES
            .iter()
            .map(|n| {
                self.db
                    .cf_handle(n)
                    .ok_or_else(|| StoreError::Io(format!("column family {n} missing")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&cfs, &fo)?;
        Ok(())
    }

    fn db_bytes(&self) -> u64 {
        let mut total = 0;
        for name in CF_NAMES {
            if let Some(cf) = self.db.cf_handle(name) {
                for prop in [
                    "rocksdb.total-sst-files-size",
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
}
