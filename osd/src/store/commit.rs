//! The commit pipeline: journal append → apply → journal sync → write home → checkpoint.
//!
//! Three roles, each with one owner:
//! - the **committer** owns the journal head ([`Core`]): it takes every queued transaction
//!   (up to 4 MiB), writes them as one journal record without syncing, applies the record's
//!   key-value batch to the engine and stages its data blocks (so reads see them), and answers
//!   "applied";
//! - the **syncer** `fdatasync`s the journal once for every group appended since its last sync
//!   and answers "durable";
//! - the **flusher** writes durable groups' blocks to their homes in the data area (page cache,
//!   no sync) and gives AUs freed by them back to the allocator.
//!
//! Every so often (journal half full, or enough key-value bytes for the memtables) the store
//! **checkpoints** at the last appended position P: once everything up to P is durable and
//! home, the data file is synced, then the checkpoint position and the allocation bitmap are
//! written and the engine is flushed. The journal before P is then free. With RocksDB the
//! roles are threads, and the slow half — waiting for P to be home and syncing the data file
//! (about 100 ms under random 4 KiB writes, against 40 ms for the engine flush) — runs on a
//! fourth, the **data syncer**, while the committer goes on appending; the committer finishes
//! the checkpoint at its next append after the sync. Its engine flush then persists state past
//! P: harmless, since it first waits until those later records are durable and replaying a
//! record is idempotent (see `engine`). Only if the journal fills up meanwhile (three quarters,
//! or no contiguous room) does the committer checkpoint on the spot, waiting. The in-memory
//! store runs every step inline in the caller (deterministic, for simulations and the crash
//! test).

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::data::{Bitmap, DataArea};
use super::engine::{Cf, Engine, KvOp};
use super::error::{Result, StoreError};
use super::io::BlockFile;
use super::journal::{self, BlockWrite, Position, Record};
use super::keys;

/// Checkpoint once this many key-value bytes were applied since the last one: far below the
/// engine's memtable size (`engine::WRITE_BUFFER_BYTES`), so RocksDB never flushes by itself a
/// batch whose journal record may not be durable yet.
pub(crate) const CHECKPOINT_KV_BYTES: usize = 16 << 20;
/// The committer's group limit.
const MAX_GROUP_BYTES: usize = 4 << 20;

/// What the journal, the engine and the data area share.
pub(crate) struct Shared {
    pub engine: Engine,
    pub data: DataArea,
    journal: Box<dyn BlockFile>,
    journal_size: u64,
    /// fdatasync the journal (off only for benchmarks and throwaway stores).
    sync: bool,
    progress: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Default)]
struct Progress {
    /// Last seq whose record is durable.
    durable: u64,
    /// Last seq whose blocks are home.
    home: u64,
    /// Last seq whose blocks are home and synced in the data file (the data syncer's).
    synced: u64,
    /// Latched: once the journal or data area failed, every later commit fails with this.
    failed: Option<StoreError>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Io("store pipeline lock poisoned by a panicking thread".into())
}

impl Shared {
    pub fn new(
        engine: Engine,
        data: DataArea,
        journal: Box<dyn BlockFile>,
        journal_size: u64,
        sync: bool,
        at: u64,
    ) -> Shared {
        Shared {
            engine,
            data,
            journal,
            journal_size,
            sync,
            progress: Mutex::new(Progress {
                durable: at,
                home: at,
                synced: at,
                failed: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
        }
        self.changed.notify_all();
    }

    fn fail(&self, e: &StoreError) {
        tracing::error!(error = %e, "object store failed; refusing writes until restarted");
        self.update(|p| {
            p.failed.get_or_insert_with(|| e.clone());
        });
    }

    fn failed(&self) -> Option<StoreError> {
        self.progress.lock().ok().and_then(|p| p.failed.clone())
    }

    fn wait_for(&self, seq: u64) -> Result<()> {
        let mut p = self.progress.lock().map_err(poisoned)?;
        loop {
            if let Some(e) = &p.failed {
                return Err(e.clone());
            }
            if p.durable >= seq && p.home >= seq {
                return Ok(());
            }
            p = self.changed.wait(p).map_err(poisoned)?;
        }
    }

    /// Waits until the journal is durable through `seq` (its blocks need not be home).
    fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut p = self.progress.lock().map_err(poisoned)?;
        loop {
            if let Some(e) = &p.failed {
                return Err(e.clone());
            }
            if p.durable >= seq {
                return Ok(());
            }
            p = self.changed.wait(p).map_err(poisoned)?;
        }
    }

    fn synced(&self) -> u64 {
        self.progress.lock().map_or(0, |p| p.synced)
    }

    fn sync_journal(&self) -> Result<()> {
        if !self.sync {
            return Ok(());
        }
        let started = Instant::now();
        let r = self
            .journal
            .sync()
            .map_err(|e| StoreError::Io(format!("journal sync: {e}")));
        super::stage("journal_sync", started);
        r
    }
}

/// A group appended to the journal, on its way to durable and home.
pub(crate) struct Group {
    seq: u64,
    blocks: Vec<BlockWrite>,
    free: Vec<u64>,
}

/// The committer's state.
pub(crate) struct Core {
    /// Generation, last appended seq, head offset.
    pos: Position,
    /// Offset of the first record after the last checkpoint.
    tail: u64,
    kv_bytes: usize,
    /// Committed allocation state (persisted in pages at checkpoints).
    in_use: Bitmap,
    dirty_pages: BTreeSet<u64>,
    /// The persisted used-bytes counter, as of the last append.
    used: i64,
    /// Inline mode: groups appended but not yet synced and home.
    unsynced: Vec<Group>,
    /// Threaded mode: where the data syncer gets checkpoint positions to sync through.
    data_syncer: Option<mpsc::Sender<u64>>,
    /// A checkpoint at this position waits for the data syncer.
    pending: Option<Position>,
}

impl Core {
    pub fn new(pos: Position, in_use: Bitmap, used: i64) -> Core {
        Core {
            pos,
            tail: pos.offset,
            kv_bytes: 0,
            in_use,
            dirty_pages: BTreeSet::new(),
            used,
            unsynced: Vec::new(),
            data_syncer: None,
            pending: None,
        }
    }

    fn live_bytes(&self, size: u64) -> u64 {
        if self.pos.offset >= self.tail {
            self.pos.offset - self.tail
        } else {
            size - self.tail + self.pos.offset
        }
    }

    fn fits(&self, len: u64, size: u64) -> bool {
        let (head, tail) = (self.pos.offset, self.tail);
        if head >= tail {
            head + len <= size || len < tail
        } else {
            head + len < tail
        }
    }

    /// Appends `recs` as one journal record, applies it and stages its blocks.
    fn append(&mut self, sh: &Shared, recs: Vec<(Record, i64)>, inline: bool) -> Result<Group> {
        if let Some(e) = sh.failed() {
            return Err(e);
        }
        let mut rec = Record::default();
        let mut used = self.used;
        for (r, delta) in recs {
            rec.extend(r);
            used += delta;
        }
        if used != self.used {
            // Absolute, not a delta: replaying a record twice must not count twice.
            rec.kv.push(KvOp::Put(
                Cf::Meta,
                keys::META_USED.to_vec(),
                Bytes::copy_from_slice(&(used.max(0) as u64).to_be_bytes()),
            ));
        }
        let seq = self.pos.seq + 1;
        let bytes = journal::encode(self.pos.generation, seq, &rec)?;
        let len = bytes.len() as u64;
        if len > sh.journal_size / 2 {
            return Err(StoreError::InvalidArgument(format!(
                "a {len}-byte commit does not fit half of the {}-byte journal; \
                 split the write or raise journal_bytes",
                sh.journal_size
            )));
        }
        self.checkpoint_in_background(sh, len, inline)?;
        let at = journal::place(self.pos.offset, len, sh.journal_size);
        if rec.direct && sh.sync {
            // Chunks written straight to the data file must be durable before any byte of a
            // record naming them can be: a drive may persist the journal write first, and a
            // replayed record must never point at data that is not there.
            sh.data.sync()?;
        }
        let started = Instant::now();
        sh.journal
            .write_at(&bytes, at)
            .map_err(|e| StoreError::Io(format!("journal write: {e}")))?;
        super::stage("journal_write", started);
        sh.data.stage(seq, &rec.blocks)?;
        let kv_bytes: usize = rec.kv.iter().map(op_bytes).sum();
        if let Err(e) = sh.engine.write(rec.kv) {
            // The record must never replay: it was not applied and its callers get an error.
            let _ = sh.journal.write_at(&[0; journal::HEADER_LEN as usize], at);
            sh.fail(&e);
            return Err(e);
        }
        for &au in &rec.alloc {
            self.in_use.set(au, true);
            self.dirty_pages.insert(au / super::data::PAGE_AUS);
        }
        for &au in &rec.free {
            self.in_use.set(au, false);
            self.dirty_pages.insert(au / super::data::PAGE_AUS);
        }
        self.pos.seq = seq;
        self.pos.offset = at + len;
        self.kv_bytes += kv_bytes;
        self.used = used;
        Ok(Group {
            seq,
            blocks: rec.blocks,
            free: rec.free,
        })
    }

    /// Inline mode: syncs the journal and writes every pending group home.
    fn settle_inline(&mut self, sh: &Shared) -> Result<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        sh.sync_journal()?;
        let seq = self.pos.seq;
        sh.update(|p| p.durable = seq);
        for g in std::mem::take(&mut self.unsynced) {
            home(sh, g)?;
        }
        Ok(())
    }

    /// Journal half full, or enough key-value bytes applied for the memtables.
    fn checkpoint_due(&self, sh: &Shared, len: u64) -> bool {
        self.live_bytes(sh.journal_size) + len > sh.journal_size / 2
            || self.kv_bytes > CHECKPOINT_KV_BYTES
    }

    /// Before appending `len` bytes: finishes a checkpoint whose data sync is done, asks the
    /// data syncer for a new one when one is due, and checkpoints on the spot only when the
    /// journal (or the memtables' budget) is about to run out meanwhile. Inline, the data
    /// syncer's half runs here at the next append after the request, so the power-loss
    /// simulation sees the same order: the engine flushed past the checkpoint position.
    fn checkpoint_in_background(&mut self, sh: &Shared, len: u64, inline: bool) -> Result<()> {
        if let Some(p) = self.pending.filter(|_| inline) {
            self.settle_inline(sh)?;
            data_sync_through(sh, p.seq)?;
        }
        if let Some(p) = self.pending.filter(|p| sh.synced() >= p.seq) {
            self.pending = None;
            let started = Instant::now();
            // The flush below persists the engine as of the last append, past P: those
            // records must be durable in the journal first (replaying them is idempotent).
            let r = sh
                .wait_durable(self.pos.seq)
                .and_then(|()| self.persist_checkpoint(sh, p));
            super::stage("checkpoint", started);
            if let Err(e) = &r {
                sh.fail(e);
            }
            r?;
        }
        let size = sh.journal_size;
        let cramped = !self.fits(len, size)
            || self.live_bytes(size) + len > size / 4 * 3
            || self.kv_bytes > 2 * CHECKPOINT_KV_BYTES;
        if cramped {
            return self.checkpoint(sh, inline);
        }
        if self.pending.is_none() && self.checkpoint_due(sh, len) {
            let asked = inline
                || self
                    .data_syncer
                    .as_ref()
                    .is_some_and(|tx| tx.send(self.pos.seq).is_ok());
            if !asked {
                return self.checkpoint(sh, false);
            }
            self.pending = Some(self.pos);
        }
        Ok(())
    }

    /// Makes the engine's state durable up to the last append and frees the journal before
    /// it, waiting for every step.
    fn checkpoint(&mut self, sh: &Shared, inline: bool) -> Result<()> {
        self.pending = None;
        let started = Instant::now();
        let r = self.checkpoint_steps(sh, inline);
        if let Err(e) = &r {
            sh.fail(e);
        }
        super::stage("checkpoint", started);
        r
    }

    fn checkpoint_steps(&mut self, sh: &Shared, inline: bool) -> Result<()> {
        if inline {
            self.settle_inline(sh)?;
        }
        sh.wait_for(self.pos.seq)?;
        sh.data.sync()?;
        self.persist_checkpoint(sh, self.pos)
    }

    /// Records checkpoint `at` (everything through it durable, home and synced), with the
    /// allocation bitmap as of the last append, and flushes the engine; the journal before
    /// `at` is then free.
    fn persist_checkpoint(&mut self, sh: &Shared, at: Position) -> Result<()> {
        let mut kv = vec![KvOp::Put(
            Cf::Meta,
            keys::META_CHECKPOINT.to_vec(),
            Bytes::from(postcard::to_stdvec(&at).unwrap_or_default()),
        )];
        for &p in &self.dirty_pages {
            kv.push(KvOp::Put(
                Cf::Meta,
                keys::meta_bitmap_key(p),
                Bytes::from(self.in_use.page(p)),
            ));
        }
        sh.engine.write(kv)?;
        sh.engine.flush()?;
        self.tail = at.offset;
        self.kv_bytes = 0;
        self.dirty_pages.clear();
        Ok(())
    }
}

/// Writes a durable group's blocks home and releases the AUs it freed.
fn home(sh: &Shared, g: Group) -> Result<()> {
    let r = sh
        .data
        .write_home(g.seq, &g.blocks)
        .and_then(|()| sh.data.release(&g.free));
    match &r {
        Ok(()) => sh.update(|p| p.home = p.home.max(g.seq)),
        Err(e) => sh.fail(e),
    }
    r
}

fn op_bytes(op: &KvOp) -> usize {
    match op {
        KvOp::Put(_, k, v) => k.len() + v.len() + 16,
        KvOp::Delete(_, k) => k.len() + 16,
        KvOp::DeleteRange(_, a, b) => a.len() + b.len() + 16,
    }
}

// ---------------------------------------------------------------------------------------------
// Drivers

/// Resolves once a commit is durable: [`Durable::wait`] from a thread that may block,
/// [`Durable::done`] from async code. The syncer thread answers through a tokio oneshot, so
/// an async caller is woken by it directly rather than through a parked blocking thread.
pub struct Durable(Pending);

/// The syncer's answer to one commit.
type DurableSender = oneshot::Sender<Result<()>>;

enum Pending {
    Channel(oneshot::Receiver<Result<()>>),
    Inline(Arc<Shared>, Arc<Mutex<Core>>, u64),
}

fn syncer_gone<T>(_: T) -> StoreError {
    StoreError::Io("the store's journal sync thread exited".into())
}

impl Durable {
    /// Blocks until the commit is durable (not from an async task: use [`Durable::done`]).
    pub fn wait(self) -> Result<()> {
        match self.0 {
            Pending::Channel(rx) => rx.blocking_recv().map_err(syncer_gone)?,
            Pending::Inline(sh, core, seq) => settle_inline_to(&sh, &core, seq),
        }
    }

    /// Resolves once the commit is durable. The in-memory store's inline pipeline settles
    /// right here (memory writes, no disk wait).
    pub async fn done(self) -> Result<()> {
        match self.0 {
            Pending::Channel(rx) => rx.await.map_err(syncer_gone)?,
            Pending::Inline(sh, core, seq) => settle_inline_to(&sh, &core, seq),
        }
    }
}

fn settle_inline_to(sh: &Shared, core: &Mutex<Core>, seq: u64) -> Result<()> {
    let mut core = core.lock().map_err(poisoned)?;
    let durable = sh.progress.lock().map_err(poisoned)?.durable;
    if durable < seq {
        core.settle_inline(sh)?;
    }
    Ok(())
}

struct Job {
    rec: Record,
    used_delta: i64,
    applied: mpsc::SyncSender<Result<()>>,
    durable: DurableSender,
    queued: Instant,
    bytes: usize,
}

/// Runs the pipeline: inline (in-memory stores) or on three threads (on disk).
pub(crate) struct Pipeline {
    pub shared: Arc<Shared>,
    mode: Mode,
}

enum Mode {
    Inline(Arc<Mutex<Core>>),
    Threads {
        tx: Mutex<Option<mpsc::Sender<Job>>>,
        committer: Mutex<Option<JoinHandle<()>>>,
    },
}

impl Pipeline {
    pub fn inline(shared: Shared, core: Core) -> Pipeline {
        Pipeline {
            shared: Arc::new(shared),
            mode: Mode::Inline(Arc::new(Mutex::new(core))),
        }
    }

    pub fn threaded(shared: Shared, core: Core) -> Result<Pipeline> {
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel::<Job>();
        let sh = shared.clone();
        let committer = std::thread::Builder::new()
            .name("osd-store-commit".into())
            .spawn(move || run_committer(sh, core, rx))
            .map_err(|e| StoreError::Io(format!("cannot start the committer thread: {e}")))?;
        Ok(Pipeline {
            shared,
            mode: Mode::Threads {
                tx: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
            },
        })
    }

    /// Appends and applies `rec`; returns once it is visible, with its durability wait.
    pub fn apply(&self, rec: Record, used_delta: i64, bytes: usize) -> Result<Durable> {
        match &self.mode {
            Mode::Inline(core) => {
                let mut c = core.lock().map_err(poisoned)?;
                let g = c.append(&self.shared, vec![(rec, used_delta)], true)?;
                let seq = g.seq;
                c.unsynced.push(g);
                Ok(Durable(Pending::Inline(
                    self.shared.clone(),
                    core.clone(),
                    seq,
                )))
            }
            Mode::Threads { tx, .. } => {
                let (applied, applied_rx) = mpsc::sync_channel(1);
                let (durable, durable_rx) = oneshot::channel();
                let tx = tx.lock().map_err(poisoned)?;
                tx.as_ref()
                    .ok_or_else(|| StoreError::Io("store is closing".into()))?
                    .send(Job {
                        rec,
                        used_delta,
                        applied,
                        durable,
                        queued: Instant::now(),
                        bytes,
                    })
                    .map_err(|_| StoreError::Io("committer thread exited".into()))?;
                drop(tx);
                applied_rx
                    .recv()
                    .map_err(|_| StoreError::Io("committer thread exited".into()))??;
                Ok(Durable(Pending::Channel(durable_rx)))
            }
        }
    }

    /// Checkpoints now (tests; the store checkpoints by itself).
    pub fn checkpoint(&self) -> Result<()> {
        match &self.mode {
            Mode::Inline(core) => core
                .lock()
                .map_err(poisoned)?
                .checkpoint(&self.shared, true),
            Mode::Threads { .. } => Ok(()),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        match &self.mode {
            Mode::Inline(core) => {
                if let Ok(mut c) = core.lock() {
                    let _ = c.settle_inline(&self.shared);
                }
            }
            Mode::Threads { tx, committer } => {
                if let Ok(mut tx) = tx.lock() {
                    tx.take();
                }
                if let Ok(mut t) = committer.lock() {
                    if let Some(t) = t.take() {
                        let _ = t.join();
                    }
                }
            }
        }
    }
}

fn run_committer(sh: Arc<Shared>, mut core: Core, rx: mpsc::Receiver<Job>) {
    type Waiters = Vec<DurableSender>;
    let (to_syncer, synced_rx) = mpsc::channel::<(Group, Waiters)>();
    let (to_flusher, flush_rx) = mpsc::channel::<Group>();
    let syncer = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("osd-store-sync".into())
            .spawn(move || run_syncer(&sh, synced_rx, to_flusher))
    };
    let flusher = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("osd-store-flush".into())
            .spawn(move || {
                while let Ok(g) = flush_rx.recv() {
                    let _ = home(&sh, g);
                }
            })
    };
    let (data_syncer_tx, data_syncer_rx) = mpsc::channel::<u64>();
    let data_syncer = {
        let sh = sh.clone();
        std::thread::Builder::new()
            .name("osd-store-dsync".into())
            .spawn(move || run_data_syncer(&sh, data_syncer_rx))
    };
    let (syncer, flusher, data_syncer) = match (syncer, flusher, data_syncer) {
        (Ok(s), Ok(f), Ok(d)) => (s, f, d),
        _ => {
            let e =
                StoreError::Io("cannot start the store's sync, flush and data sync threads".into());
            sh.fail(&e);
            while let Ok(j) = rx.recv() {
                let _ = j.applied.send(Err(e.clone()));
                let _ = j.durable.send(Err(e.clone()));
            }
            return;
        }
    };
    core.data_syncer = Some(data_syncer_tx);
    while let Ok(first) = rx.recv() {
        let mut bytes = first.bytes;
        let mut jobs = vec![first];
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(j) => {
                    bytes += j.bytes;
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut recs = Vec::with_capacity(jobs.len());
        let mut waiters = Vec::with_capacity(jobs.len());
        let mut applied = Vec::with_capacity(jobs.len());
        for j in jobs {
            super::stage("queue", j.queued);
            recs.push((j.rec, j.used_delta));
            waiters.push(j.durable);
            applied.push(j.applied);
        }
        let started = Instant::now();
        let res = core.append(&sh, recs, false);
        super::stage("append", started);
        match res {
            Ok(g) => {
                for a in applied {
                    let _ = a.send(Ok(()));
                }
                if let Err(mpsc::SendError((_, waiters))) = to_syncer.send((g, waiters)) {
                    for w in waiters {
                        let _ = w.send(Err(StoreError::Io("journal sync thread exited".into())));
                    }
                }
            }
            Err(e) => {
                for a in applied {
                    let _ = a.send(Err(e.clone()));
                }
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
    }
    // Closing: everything appended becomes durable, home and checkpointed, so the next open
    // replays nothing.
    if sh.failed().is_none() {
        let _ = core.checkpoint(&sh, false);
    }
    core.data_syncer = None;
    let _ = data_syncer.join();
    drop(to_syncer);
    let _ = syncer.join();
    let _ = flusher.join();
}

/// The slow half of a checkpoint, off the committer: waits until everything through the
/// requested seq is durable and home, then syncs the data file.
fn run_data_syncer(sh: &Shared, requests: mpsc::Receiver<u64>) {
    while let Ok(mut seq) = requests.recv() {
        while let Ok(later) = requests.try_recv() {
            seq = seq.max(later);
        }
        if data_sync_through(sh, seq).is_err() {
            return;
        }
    }
}

/// Waits until everything through `seq` is durable and home, syncs the data file and says
/// so (`Progress::synced`).
fn data_sync_through(sh: &Shared, seq: u64) -> Result<()> {
    let started = Instant::now();
    let r = sh.wait_for(seq).and_then(|()| sh.data.sync());
    super::stage("checkpoint_data_sync", started);
    match &r {
        Ok(()) => sh.update(|p| p.synced = p.synced.max(seq)),
        Err(e) => sh.fail(e),
    }
    r
}

/// One journal fdatasync for every group appended since the last one.
fn run_syncer(
    sh: &Shared,
    groups: mpsc::Receiver<(Group, Vec<DurableSender>)>,
    to_flusher: mpsc::Sender<Group>,
) {
    while let Ok(first) = groups.recv() {
        let mut batch = vec![first];
        while let Ok(more) = groups.try_recv() {
            batch.push(more);
        }
        let res = match sh.failed() {
            Some(e) => Err(e),
            None => sh.sync_journal(),
        };
        let n: usize = batch.iter().map(|(_, w)| w.len()).sum();
        metrics::histogram!("basalt_store_group_commit_transactions").record(n as f64);
        match &res {
            Ok(()) => {
                let last = batch.last().map_or(0, |(g, _)| g.seq);
                sh.update(|p| p.durable = p.durable.max(last));
            }
            Err(e) => sh.fail(e),
        }
        for (g, waiters) in batch {
            for w in waiters {
                let _ = w.send(res.clone());
            }
            if res.is_ok() {
                let _ = to_flusher.send(g);
            }
        }
    }
}
