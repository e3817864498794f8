//! The OSD object store: objects, omap, xattrs and PG bookkeeping, on a write-ahead journal, a
//! data area of 4 KiB blocks, and RocksDB (or in memory) for metadata.
//!
//! # Shape of a write
//!
//! A 4 KiB client write costs **one sequential journal write, shared by every transaction in
//! the same group commit, and one `fdatasync`** before it is acknowledged; nothing else is on
//! the synchronous path. In detail ([`commit`] has the threads):
//!
//! 1. *Build* (the caller's thread): the [`Transaction`] is executed against the current state
//!    into a journal [`Record`](journal::Record): RocksDB mutations (onode, chunk extent
//!    records, omap, PG log, dups), the 4 KiB blocks to write, allocation units taken and
//!    freed. A partial block is read (verified) and patched; whole blocks are not read.
//! 2. *Append + apply* (committer): everything queued becomes one journal record, written with
//!    one `pwrite` to the journal ring; its key-value batch is applied to RocksDB **without
//!    RocksDB's WAL** and its blocks are staged in memory; the transaction is now visible.
//! 3. *Sync* (syncer): one `fdatasync` of the journal covers every group appended since the
//!    last; the transaction is now durable and acknowledged.
//! 4. *Home* (flusher, background): the blocks are written in place to their allocation unit
//!    in the data file (page cache, adjacent blocks in one write) and dropped from memory.
//! 5. *Checkpoint* (committer, every half journal or 16 MiB of metadata): wait until all is
//!    durable and home, `fdatasync` the data file, write the checkpoint position and the
//!    allocation bitmap, and flush RocksDB's memtables (atomically across column families).
//!    The journal before the position is free again.
//!
//! Bytes written to disk per 4 KiB overwrite: the journal record (4 KiB + ~0.5–1 KiB of
//! metadata, less per op when groups are large), the 4 KiB block at home, and the metadata's
//! share of RocksDB flushes and compactions (BENCHMARKS.md measures the total).
//!
//! # Why a journal, and why blocks in place
//!
//! The previous engine kept data in RocksDB as 64 KiB chunk values: a 4 KiB write read,
//! patched and rewrote 64 KiB to the WAL and again to a blob file (16× write amplification).
//! Here data lives in a plain file of 64 KiB allocation units (AUs), one per stored chunk,
//! written in 4 KiB blocks in place — safe because a block is written home only after the
//! journal record carrying it is durable, so a torn home write is repaired by replay. Every
//! block carries a crc32c (hardware-accelerated: SSE4.2 on x86-64, a few hundred ns per 4 KiB;
//! blake3 would cost more and its 32 bytes per block would grow every extent record eightfold),
//! stored in the chunk's extent record and verified on every read: a mismatch is
//! [`StoreError::Corrupt`] and no bytes are returned (the PG layer repairs from a replica).
//! Large writes go through the journal too (written twice): measured in BENCHMARKS.md; writing
//! whole AUs directly to fresh space is the next step if the sequential-write figure needs it.
//!
//! The extent record names an AU per chunk, so an object clone can later share AUs by
//! reference (with a per-AU reference count and copy-on-write of the first block written
//! after a snapshot); that is not built yet.
//!
//! # Recovery
//!
//! RocksDB runs without its WAL, so after a crash it holds the state of its last flush — the
//! last checkpoint (or a later clean close). [`Store::open`] reads the checkpoint position
//! (generation, seq, offset) and the allocation bitmap, then replays the journal from that
//! offset: each record whose header and payload checksums hold, whose generation matches and
//! whose seq is the next one is applied (key-value batch, blocks written home, allocations),
//! and the first that does not ends the chain (see [`journal`] for why that is exact). Records
//! are idempotent (puts, deletes and absolute values), so replaying onto a later state is
//! harmless. Open then bumps the generation and checkpoints, so records an earlier incarnation
//! wrote past its durable end can never be mistaken for new ones.
//!
//! The crash simulation (`tests/store_crash.rs`) runs this code on files that forget unsynced
//! writes and tear one of them ([`io::MemFile`]) and an engine that forgets everything after
//! its last flush, at thousands of seeded crash points.
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
//! | `meta` | `02` | used bytes (u64) |
//! | `meta` | `03 pool seed` | PG present (empty) |
//! | `meta` | `04 key` | daemon metadata ([`Transaction::meta_set`]) |
//! | `meta` | `05` | checkpoint: journal generation, seq, offset |
//! | `meta` | `06 page(u64)` | allocation bitmap page (262,144 AUs) |
//! | `onode` | `okey = pool seed rev(hash) esc(ns) esc(name) snap` | onode: `01` + postcard {size, meta, xattrs, chunk index → stored length} |
//! | `data` | `okey chunk(u32)` | extent: `01` + postcard {AU, per-block crc32c or none for zeros} |
//! | `omap` | `okey 00` | omap header |
//! | `omap` | `okey 01 key` | omap value |
//! | `pglog` | `pool seed 01` | PG info |
//! | `pglog` | `pool seed 02 version(u64)` | PG log entry |
//! | `pglog` | `pool seed 03 reqid` | dup: `version(u64) ‖ result` |
//! | `pglog` | `pool seed 04 version(u64) reqid` | dup index by version (for trimming) |
//!
//! `rev(hash)` is the placement hash bit-reversed, as in Ceph's hobject sort order: iterating a
//! PG visits objects in the order backfill and scrub cursors use, and the children of a future
//! PG split are contiguous key ranges. Every key of a PG starts with `pool seed`, so removing a
//! PG is one range delete per column family (plus freeing its AUs).
//!
//! Files in the store directory: `db/` (RocksDB), `journal` (the ring), `block` (the data
//! area, grown with `fallocate` in 64 MiB steps so a block's home always has space).
//!
//! # Chunks
//!
//! Object data is cut into 64 KiB chunks, one AU each. A chunk is stored canonically:
//! trailing zeros trimmed, an all-zero chunk not stored, all-zero blocks inside it not written
//! (`None` in the extent). Holes read as zeros; `zero` and `truncate` free AUs; replicas with
//! the same bytes have the same stored lengths regardless of history. The onode lists every
//! stored chunk with its length (at most 64 entries for a 4 MiB object).
//!
//! # Atomicity and durability contract
//!
//! - A [`Transaction`] is applied all-or-nothing: it is one journal record (or part of one
//!   group record) and one RocksDB batch. Any failing op fails the whole transaction with a
//!   typed error and nothing is written.
//! - When [`Store::submit`] (or [`Store::submit_blocking`]) returns `Ok`, it is durable.
//! - Ops inside one transaction see each other's effects, in order.
//! - [`Store::apply_blocking`] is a submit split in two: visible when it returns, durable
//!   once the returned [`Durable`] resolves or a later [`Store::sync_blocking`] returns. A
//!   crash in between loses it (and any later apply) but never an earlier durable one.
//! - Building a transaction reads the current state, so **the caller must serialise
//!   transactions that touch the same object** and must not submit one touching an object
//!   until the previous one touching it has been applied. PG-level records follow the same
//!   rule per PG, and `pg_create` / `pg_remove` must not overlap any other transaction on that
//!   PG.
//! - The in-memory store runs the same code on memory (inline, deterministic); it is "durable"
//!   only for the life of the value.
//! - After a journal or data-file I/O error the store refuses every later write with that
//!   error (reads go on) until it is reopened: what was acknowledged is in the journal.
//!
//! # Capacity
//!
//! The store charges the bytes of stored data chunks and xattrs ([`StoreStats::used_bytes`]),
//! kept as an absolute counter in every record that changes it, so it is exact across
//! crashes. With [`StoreConfig::capacity_bytes`] set, a transaction that would grow the charged
//! bytes past it fails with [`StoreError::Full`]; transactions that shrink usage (removes,
//! truncates) always pass, so a full store can be emptied. Omap, onodes and PG logs are not
//! charged. A data area that cannot grow (ENOSPC from `fallocate`) also fails the transaction
//! with `Full` before anything is written; the journal never grows, so removals keep working
//! on a full disk.

pub mod commit;
mod data;
mod engine;
mod error;
pub mod io;
mod journal;
mod keys;
mod onode;
mod txn;
mod types;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use basalt_placement::PgId;
use bytes::Bytes;

pub use commit::Durable;
use commit::{Core, Pipeline, Shared};
use data::{Bitmap, DataArea, Extent, BLOCK};
use engine::{Cf, Engine, KvOp, MemEngine, RocksEngine};
use io::{BlockFile, MemFile, OsFile};
use journal::Position;
use onode::Onode;

pub use error::{Result, StoreError};

/// Records how long one stage of a commit took (`basalt_store_stage_seconds`).
fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_store_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}
pub use txn::{Op, Transaction};
pub use types::*;

/// On-disk format written by this build (2: journal + data area; 1 kept data in RocksDB).
pub const FORMAT_VERSION: u32 = 2;

/// The in-memory store's journal: big enough for a 16 MiB transaction.
const MEMORY_JOURNAL_BYTES: u64 = 32 << 20;

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
    /// First field: dropped (threads joined, final checkpoint written) before anything else.
    pipeline: Pipeline,
    cfg: StoreConfig,
    superblock: Superblock,
    /// Charged bytes, including reservations of transactions being committed.
    used: AtomicI64,
    path: Option<PathBuf>,
    /// The simulated disk of a power-loss-tracking store (crash tests).
    sim: Option<SimDisk>,
}

#[derive(Clone)]
struct SimDisk {
    journal: Arc<MemFile>,
    data: Arc<MemFile>,
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
    if cfg.journal_bytes < 1 << 20 {
        return Err(StoreError::InvalidArgument(format!(
            "journal_bytes {} is below the 1 MiB minimum",
            cfg.journal_bytes
        )));
    }
    Ok(())
}

fn io_err(what: String) -> impl Fn(std::io::Error) -> StoreError {
    move |e| StoreError::from_io(&what, e)
}

/// Opened pieces, before recovery.
struct Parts {
    engine: Engine,
    journal: Box<dyn BlockFile>,
    journal_size: u64,
    data: Box<dyn BlockFile>,
    threaded: bool,
}

impl Store {
    /// A fresh in-memory store (fsid and osd uuid `"memory"`).
    pub fn in_memory(cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        Self::format_and_open(
            Parts {
                engine: Engine::Memory(MemEngine::default()),
                journal: Box::new(MemFile::new()),
                journal_size: cfg.journal_bytes.min(MEMORY_JOURNAL_BYTES),
                data: Box::new(MemFile::new()),
                threaded: false,
            },
            Superblock::new("memory", "memory"),
            cfg,
            None,
            None,
        )
    }

    /// An in-memory store whose "disk" forgets like a real one at [`Store::power_loss`]: the
    /// crash simulation's store.
    #[doc(hidden)]
    pub fn simulated(cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let sim = SimDisk {
            journal: Arc::new(MemFile::with_power_loss()),
            data: Arc::new(MemFile::with_power_loss()),
        };
        Self::format_and_open(
            Parts {
                engine: Engine::Memory(MemEngine::with_power_loss()),
                journal: Box::new(sim.journal.clone()),
                journal_size: cfg.journal_bytes,
                data: Box::new(sim.data.clone()),
                threaded: false,
            },
            Superblock::new("sim", "sim"),
            cfg,
            None,
            Some(sim),
        )
    }

    /// The simulated store as it opens after the power went out now (see [`io::MemFile`]):
    /// `seed` picks which unsynced writes survive and which one tears.
    #[doc(hidden)]
    pub fn power_loss(&self, seed: u64) -> Result<Store> {
        use rand::SeedableRng;
        let sim = self
            .inner
            .sim
            .as_ref()
            .ok_or_else(|| StoreError::InvalidArgument("not a simulated store".into()))?;
        let Engine::Memory(mem) = &self.inner.pipeline.shared.engine else {
            return Err(StoreError::InvalidArgument("not a simulated store".into()));
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let io = |e: std::io::Error| StoreError::Io(e.to_string());
        let disk = SimDisk {
            journal: Arc::new(sim.journal.power_loss(&mut rng).map_err(io)?),
            data: Arc::new(sim.data.power_loss(&mut rng).map_err(io)?),
        };
        Self::recover(
            Parts {
                engine: Engine::Memory(mem.power_loss()?),
                journal: Box::new(disk.journal.clone()),
                journal_size: self.inner.cfg.journal_bytes,
                data: Box::new(disk.data.clone()),
                threaded: false,
            },
            self.inner.cfg.clone(),
            None,
            Some(disk),
        )
    }

    /// Writes the superblock and an empty checkpoint into fresh parts, then opens them.
    fn format_and_open(
        parts: Parts,
        superblock: Superblock,
        cfg: StoreConfig,
        path: Option<&Path>,
        sim: Option<SimDisk>,
    ) -> Result<Store> {
        let start = Position {
            generation: 1,
            seq: 0,
            offset: 0,
        };
        parts.engine.write(vec![
            KvOp::Put(
                Cf::Meta,
                keys::META_SUPERBLOCK.to_vec(),
                Bytes::from(encode_superblock(&superblock)),
            ),
            KvOp::Put(
                Cf::Meta,
                keys::META_CHECKPOINT.to_vec(),
                Bytes::from(postcard::to_stdvec(&start).unwrap_or_default()),
            ),
        ])?;
        parts.engine.flush()?;
        Self::recover(parts, cfg, path, sim)
    }

    /// Where this store's files live inside `dir`.
    fn db_dir(dir: &Path) -> PathBuf {
        dir.join("db")
    }

    /// True if `dir` holds a store made by [`Store::mkfs`].
    pub fn is_formatted(dir: impl AsRef<Path>) -> bool {
        Self::db_dir(dir.as_ref()).join("CURRENT").exists()
    }

    /// Formats a new store in `path` (created if missing; must not hold a store): RocksDB, a
    /// zero-filled journal of `journal_bytes`, an empty data area.
    pub fn mkfs(path: impl AsRef<Path>, superblock: Superblock, cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let path = path.as_ref();
        if Self::is_formatted(path) {
            return Err(StoreError::AlreadyFormatted {
                path: path.display().to_string(),
            });
        }
        std::fs::create_dir_all(Self::db_dir(path))
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", path.display())))?;
        let journal = OsFile::open(&path.join("journal"), true)
            .map_err(io_err(format!("creating {}/journal", path.display())))?;
        // Zero-filled once, so appends never allocate blocks or change the file's size: each
        // journal fdatasync then writes data only (DESIGN §C measured metadata commits as far
        // more expensive than the write itself).
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < cfg.journal_bytes {
            let n = (cfg.journal_bytes - off).min(zeros.len() as u64) as usize;
            journal
                .write_at(&zeros[..n], off)
                .map_err(io_err(format!("zero-filling {}/journal", path.display())))?;
            off += n as u64;
        }
        journal
            .sync()
            .map_err(io_err(format!("syncing {}/journal", path.display())))?;
        let data = OsFile::open(&path.join("block"), true)
            .map_err(io_err(format!("creating {}/block", path.display())))?;
        let engine = Engine::Rocks(RocksEngine::open(&Self::db_dir(path), &cfg, true)?);
        let superblock = Superblock {
            format_version: FORMAT_VERSION,
            ..superblock
        };
        Self::format_and_open(
            Parts {
                engine,
                journal: Box::new(journal),
                journal_size: cfg.journal_bytes,
                data: Box::new(data),
                threaded: true,
            },
            superblock,
            cfg,
            Some(path),
            None,
        )
    }

    /// Opens a store made by [`Store::mkfs`], replaying the journal (see "Recovery").
    pub fn open(path: impl AsRef<Path>, cfg: StoreConfig) -> Result<Store> {
        check_config(&cfg)?;
        let path = path.as_ref();
        if !Self::is_formatted(path) {
            return Err(StoreError::NotFormatted {
                path: path.display().to_string(),
            });
        }
        let engine = Engine::Rocks(RocksEngine::open(&Self::db_dir(path), &cfg, false)?);
        let journal = OsFile::open(&path.join("journal"), false)
            .map_err(io_err(format!("opening {}/journal", path.display())))?;
        let journal_size = journal
            .len()
            .map_err(io_err(format!("opening {}/journal", path.display())))?;
        let data = OsFile::open(&path.join("block"), false)
            .map_err(io_err(format!("opening {}/block", path.display())))?;
        Self::recover(
            Parts {
                engine,
                journal: Box::new(journal),
                journal_size,
                data: Box::new(data),
                threaded: true,
            },
            cfg,
            Some(path),
            None,
        )
    }

    /// Replays the journal from the last checkpoint, checkpoints under a new generation and
    /// starts the pipeline.
    fn recover(
        parts: Parts,
        cfg: StoreConfig,
        path: Option<&Path>,
        sim: Option<SimDisk>,
    ) -> Result<Store> {
        let Parts {
            engine,
            journal,
            journal_size,
            data,
            threaded,
        } = parts;
        let where_ = || {
            path.map_or("the in-memory store".to_string(), |p| {
                p.display().to_string()
            })
        };
        let raw = engine
            .get(Cf::Meta, keys::META_SUPERBLOCK)?
            .ok_or_else(|| StoreError::NotFormatted { path: where_() })?;
        let superblock: Superblock =
            postcard::from_bytes(&raw).map_err(|e| StoreError::corrupt_meta("superblock", e))?;
        if superblock.format_version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat {
                found: superblock.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let raw = engine
            .get(Cf::Meta, keys::META_CHECKPOINT)?
            .ok_or_else(|| StoreError::corrupt_meta("checkpoint", "missing"))?;
        let checkpoint: Position =
            postcard::from_bytes(&raw).map_err(|e| StoreError::corrupt_meta("checkpoint", e))?;
        let mut in_use = Bitmap::default();
        let pages = engine.scan(
            Cf::Meta,
            &[keys::META_BITMAP],
            &[keys::META_BITMAP + 1],
            usize::MAX,
        )?;
        for (k, v) in pages {
            let page = keys::decode_u64(&k[1..], "bitmap page key")?;
            in_use.load_page(page, &v)?;
        }

        let started = std::time::Instant::now();
        // Pass 1: the last record (re)allocating each AU. Blocks an earlier record journaled
        // into that AU belonged to its previous owner and are stale: replaying them could
        // overwrite a chunk written straight to the AU after it was reallocated.
        let mut last_alloc: std::collections::HashMap<u64, u64> = Default::default();
        journal::replay(&*journal, journal_size, checkpoint, |seq, rec| {
            for au in rec.alloc {
                last_alloc.insert(au, seq);
            }
            Ok(())
        })?;
        let mut replayed = 0u64;
        let end = journal::replay(&*journal, journal_size, checkpoint, |seq, rec| {
            engine.write(rec.kv)?;
            for b in &rec.blocks {
                if last_alloc.get(&b.au).is_some_and(|&s| s > seq) {
                    continue;
                }
                data.write_at(&b.data, b.au * CHUNK_SIZE + b.block as u64 * BLOCK)
                    .map_err(io_err("replaying into the data file".into()))?;
            }
            for au in rec.alloc {
                in_use.set(au, true);
            }
            for au in rec.free {
                in_use.set(au, false);
            }
            replayed += 1;
            Ok(())
        })?;
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                from = checkpoint.seq + 1,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the object store journal"
            );
        }
        let used = match engine.get(Cf::Meta, keys::META_USED)? {
            Some(v) => keys::decode_u64(&v, "used-bytes counter")? as i64,
            None => 0,
        };
        // Checkpoint the replayed state under a new generation: the chain now starts at `end`.
        let pos = Position {
            generation: checkpoint.generation + 1,
            ..end
        };
        data.sync()
            .map_err(io_err("syncing the data file".into()))?;
        let mut kv = vec![KvOp::Put(
            Cf::Meta,
            keys::META_CHECKPOINT.to_vec(),
            Bytes::from(postcard::to_stdvec(&pos).unwrap_or_default()),
        )];
        for p in 0..in_use.pages() {
            kv.push(KvOp::Put(
                Cf::Meta,
                keys::meta_bitmap_key(p),
                Bytes::from(in_use.page(p)),
            ));
        }
        engine.write(kv)?;
        engine.flush()?;

        let area = DataArea::open(data, in_use.clone())?;
        let shared = Shared::new(engine, area, journal, journal_size, cfg.sync, pos.seq);
        let core = Core::new(pos, in_use, used);
        let pipeline = if threaded {
            Pipeline::threaded(shared, core)?
        } else {
            Pipeline::inline(shared, core)
        };
        Ok(Store {
            inner: Arc::new(Inner {
                pipeline,
                cfg,
                superblock,
                used: AtomicI64::new(used),
                path: path.map(Path::to_path_buf),
                sim,
            }),
        })
    }

    fn engine(&self) -> &Engine {
        &self.inner.pipeline.shared.engine
    }

    fn data(&self) -> &DataArea {
        &self.inner.pipeline.shared.data
    }

    pub fn superblock(&self) -> &Superblock {
        &self.inner.superblock
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    pub fn is_in_memory(&self) -> bool {
        matches!(self.engine(), Engine::Memory(_))
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    /// Applies `txn` atomically and durably; see the module docs for the contract. Never blocks
    /// the async runtime: on-disk commits run on a blocking thread, the in-memory store applies
    /// inline (deterministic for simulations).
    pub async fn submit(&self, txn: Transaction) -> Result<()> {
        if self.is_in_memory() {
            return self.submit_blocking(&txn);
        }
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.submit_blocking(&txn))
            .await
            .map_err(|e| StoreError::Io(format!("commit task failed: {e}")))?
    }

    /// Synchronous [`Store::submit`]: blocks the calling thread until the commit is durable.
    pub fn submit_blocking(&self, txn: &Transaction) -> Result<()> {
        self.commit(txn)?.wait()
    }

    /// Applies `txn` atomically and makes it visible to every later read and build at once,
    /// without waiting for it to be durable: the returned [`Durable`] resolves once it is
    /// (the committer appends the next group while the journal sync of this one runs). The op
    /// path uses it so the next write to an object can be built on this one while this one's
    /// sync is pending; its callers must not let anyone act on the applied state before
    /// then (the OSD holds reads of an object back while a write to it is in flight).
    pub fn apply_blocking(&self, txn: &Transaction) -> Result<Durable> {
        self.commit(txn)
    }

    /// Makes every transaction applied before this call durable.
    pub fn sync_blocking(&self) -> Result<()> {
        self.apply_blocking(&Transaction::new())?.wait()
    }

    /// Checkpoints now (crash tests; the store checkpoints by itself as the journal fills).
    #[doc(hidden)]
    pub fn checkpoint_for_testing(&self) -> Result<()> {
        self.inner.pipeline.checkpoint()
    }

    fn commit(&self, txn: &Transaction) -> Result<Durable> {
        let inner = &*self.inner;
        let started = std::time::Instant::now();
        let built = txn::build(self.engine(), self.data(), inner.cfg.max_object_size, txn)?;
        stage("build", started);
        let delta = built.used_delta;
        let taken = built.rec.alloc.clone();
        // Reserve growth before committing so concurrent transactions cannot jointly overshoot
        // the capacity; shrinkage is only released once applied.
        if delta > 0 {
            let before = inner.used.fetch_add(delta, Ordering::SeqCst);
            if let Some(cap) = inner.cfg.capacity_bytes {
                let after = before.saturating_add(delta);
                if after > cap as i64 {
                    inner.used.fetch_sub(delta, Ordering::SeqCst);
                    let _ = self.data().release(&taken);
                    return Err(StoreError::Full {
                        reason: format!(
                            "transaction needs {delta} more bytes but {before} of the \
                             {cap}-byte capacity are used; remove objects or raise capacity_bytes"
                        ),
                    });
                }
            }
        }
        let bytes = txn
            .ops()
            .iter()
            .map(|op| match op {
                Op::Write { data, .. } | Op::WriteFull { data, .. } | Op::Append { data, .. } => {
                    data.len() + 64
                }
                _ => 64,
            })
            .sum();
        let res = inner.pipeline.apply(built.rec, delta, bytes);
        match (&res, delta) {
            (Err(_), d) => {
                if d > 0 {
                    inner.used.fetch_sub(d, Ordering::SeqCst);
                }
                let _ = self.data().release(&taken);
            }
            (Ok(_), d) if d < 0 => {
                inner.used.fetch_add(d, Ordering::SeqCst);
            }
            _ => {}
        }
        if let Err(e) = &res {
            tracing::warn!(error = %e, "object store commit failed");
        }
        res
    }

    // -----------------------------------------------------------------------------------------
    // Object reads

    fn onode(&self, obj: &ObjectId) -> Result<(Vec<u8>, Onode)> {
        txn::check_object(obj)?;
        let key = keys::onode_key(obj);
        let raw = self
            .engine()
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
        for (idx, stored) in wanted {
            let ext = self.extent(obj, key, idx, stored)?;
            let base = idx * CHUNK_SIZE;
            let lo = offset.max(base) - base;
            let hi = (end.min(base + stored as u64) - base).max(lo);
            if lo >= hi {
                continue;
            }
            let (b0, b1) = ((lo / BLOCK) as usize, (hi - 1) as usize / BLOCK as usize);
            let blocks = self
                .data()
                .read_blocks(ext.au, b0, &ext.blocks[b0..=b1], obj, idx)?;
            let from = (lo - b0 as u64 * BLOCK) as usize;
            let dst = (base + lo - offset) as usize;
            out[dst..dst + (hi - lo) as usize]
                .copy_from_slice(&blocks[from..from + (hi - lo) as usize]);
        }
        Ok(Bytes::from(out))
    }

    /// The extent record of a chunk the onode lists with `stored` bytes; missing or
    /// inconsistent is corruption.
    fn extent(&self, obj: &ObjectId, key: &[u8], idx: u64, stored: u32) -> Result<Extent> {
        let corrupt = || StoreError::Corrupt {
            object: obj.to_string(),
            chunk: idx,
        };
        let raw = self
            .engine()
            .get(Cf::Data, &keys::chunk_key(key, idx))?
            .ok_or_else(corrupt)?;
        let ext = Extent::decode(&raw, obj)?;
        if ext.blocks.len() != (stored as u64).div_ceil(BLOCK) as usize {
            return Err(corrupt());
        }
        Ok(ext)
    }

    pub fn getxattr(&self, obj: &ObjectId, name: &str) -> Result<Option<Bytes>> {
        Ok(self.onode(obj)?.1.xattrs.get(name).cloned())
    }

    pub fn xattrs(&self, obj: &ObjectId) -> Result<std::collections::BTreeMap<String, Bytes>> {
        Ok(self.onode(obj)?.1.xattrs)
    }

    pub fn omap_get_header(&self, obj: &ObjectId) -> Result<Option<Bytes>> {
        let (key, _) = self.onode(obj)?;
        self.engine().get(Cf::Omap, &keys::omap_header_key(&key))
    }

    /// Values of the given keys; absent keys are left out.
    pub fn omap_get(&self, obj: &ObjectId, wanted: &[&[u8]]) -> Result<Vec<(Bytes, Bytes)>> {
        let (key, _) = self.onode(obj)?;
        let mut out = Vec::new();
        for k in wanted {
            if let Some(v) = self
                .engine()
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
        let mut page = self.engine().scan(
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
        let mut page = self.engine().scan(
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
        let mut data_h = blake3::Hasher::new();
        data_h.update(&o.size.to_be_bytes());
        let mut chunks = Vec::with_capacity(o.chunks.len());
        let crc_digest = |crcs: &[Option<u32>]| {
            *blake3::hash(&postcard::to_stdvec(crcs).unwrap_or_default()).as_bytes()
        };
        for (&idx, &stored) in &o.chunks {
            let ext = match self.engine().get(Cf::Data, &keys::chunk_key(&key, idx))? {
                Some(raw) => Extent::decode(&raw, obj).ok(),
                None => None,
            };
            let (stored_d, computed, content) = match ext {
                Some(ext) => {
                    let raw = self.data().read_raw(ext.au, 0, ext.blocks.len())?;
                    let recomputed: Vec<Option<u32>> = ext
                        .blocks
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            c.map(|_| data::block_crc(&raw[i * BLOCK as usize..][..BLOCK as usize]))
                        })
                        .collect();
                    let mut content = raw;
                    for (i, c) in ext.blocks.iter().enumerate() {
                        if c.is_none() {
                            content[i * BLOCK as usize..][..BLOCK as usize].fill(0);
                        }
                    }
                    content.truncate(stored as usize);
                    (
                        Some(crc_digest(&ext.blocks)),
                        Some(crc_digest(&recomputed)),
                        content,
                    )
                }
                None => (None, None, Vec::new()),
            };
            data_h.update(&idx.to_be_bytes());
            data_h.update(blake3::hash(&content).as_bytes());
            chunks.push(ChunkScrub {
                index: idx,
                stored: stored_d,
                computed,
            });
        }
        let mut omap_h = blake3::Hasher::new();
        let mut start = key.clone();
        let end = keys::prefix_end(&key);
        loop {
            let page = self.engine().scan(Cf::Omap, &start, &end, 1024)?;
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
        self.engine()
            .scan(Cf::Meta, &[keys::META_PG], &[keys::META_PG + 1], usize::MAX)?
            .iter()
            .map(|(k, _)| keys::decode_pg_key(k))
            .collect()
    }

    pub fn pg_exists(&self, pg: PgId) -> Result<bool> {
        txn::check_pg(pg)?;
        Ok(self
            .engine()
            .get(Cf::Meta, &keys::meta_pg_key(pg))?
            .is_some())
    }

    pub fn pg_info(&self, pg: PgId) -> Result<Option<Bytes>> {
        txn::check_pg(pg)?;
        self.engine()
            .get(Cf::PgLog, &keys::pglog_key(pg, keys::PGLOG_INFO, &[]))
    }

    /// Log entries with version `>= from`, at most `max`, in version order.
    pub fn pg_log_scan(&self, pg: PgId, from: u64, max: usize) -> Result<Vec<(u64, Bytes)>> {
        txn::check_pg(pg)?;
        let head = keys::pglog_key(pg, keys::PGLOG_ENTRY, &[]);
        self.engine()
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
            .engine()
            .get(Cf::PgLog, &keys::pglog_key(pg, keys::PGLOG_DUP, reqid))?
        {
            Some(v) => txn::decode_dup(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.engine().get(Cf::Meta, &keys::meta_user_key(key))
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            used_bytes: self.inner.used.load(Ordering::SeqCst).max(0) as u64,
            capacity_bytes: self.inner.cfg.capacity_bytes,
            db_bytes: self.engine().db_bytes(),
            data_free_bytes: self.data().free_bytes(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fault injection

    /// Flips bit 0 of byte `byte` of chunk `chunk`'s stored data at its home in the data area,
    /// bypassing transactions and checksums, to simulate bit rot on this replica. For tests
    /// (here and in other crates' integration tests) only; returns `NotFound` if the chunk is
    /// not stored (a hole) and `InvalidArgument` if `byte` is beyond its stored length or in a
    /// block of zeros that was never written.
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
        let ext = self.extent(obj, &key, chunk, len)?;
        if byte >= len as usize || ext.blocks[byte / BLOCK as usize].is_none() {
            return Err(StoreError::InvalidArgument(format!(
                "byte {byte} of chunk {chunk} is not stored data ({len} bytes stored)"
            )));
        }
        self.data().flip_bit(ext.au, byte as u64)
    }
}

fn encode_superblock(sb: &Superblock) -> Vec<u8> {
    postcard::to_stdvec(sb).unwrap_or_default()
}
