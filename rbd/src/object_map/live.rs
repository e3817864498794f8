//! The head object map of an image whose exclusive lock this client holds: read by every
//! write, changed on an object's first write and after a whole-object discard, persisted
//! before a write relies on it.
//!
//! **One writer of the stored map.** Changes are sent to one task per map (the owner), which
//! takes every change queued meanwhile, writes the bytes they touch in one object write, and
//! only then makes them visible in memory and answers. So the stored map never goes back in
//! time (no two writes of the same byte race), a burst of first writes to new objects costs
//! one map write, and a write that finds its object already marked `Exists` in memory knows
//! the stored map says so too.
//!
//! Memory holds one atomic state per object (what the stored map says, plus `Pending`) and
//! a count of writes in flight per object. Two transitions happen outside the owner, on
//! the atomics alone, because they change nothing stored: a discard marks an existing object
//! `Pending` before removing it, and a write that finishes turns `Pending` back into
//! `Exists`. The owner turns `Pending` into `Nonexistent` only if it is still `Pending` and
//! no write to the object is in flight: a write that raced the removal either is still in
//! flight, or already turned the state back, or will ask the owner (and wait) before writing.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{put_state, ObjectMap, ObjectState};
use crate::backend::{BackendError, ObjectBackend};

/// Most changes one map write carries.
const MAX_BATCH: usize = 1024;

type Reply = oneshot::Sender<Result<(), BackendError>>;

enum Change {
    /// Make object `n` `to` (stored first).
    Mark(u64, ObjectState, Reply),
    /// Object `n` was removed by a discard: `Nonexistent` if still `Pending` and idle.
    Removed(u64, Reply),
    /// Replace the whole map (same length): after a snapshot, a rollback, a snapshot removal.
    Whole(ObjectMap, Reply),
}

struct Slots {
    states: Vec<AtomicU8>,
    writes_in_flight: Vec<AtomicU32>,
}

impl Slots {
    fn get(&self, n: u64) -> ObjectState {
        self.states
            .get(n as usize)
            .map_or(ObjectState::Nonexistent, |s| {
                ObjectState::from_bits(s.load(Ordering::SeqCst))
            })
    }

    fn store(&self, n: u64, s: ObjectState) {
        if let Some(slot) = self.states.get(n as usize) {
            slot.store(s as u8, Ordering::SeqCst);
        }
    }

    fn swap_if(&self, n: u64, from: ObjectState, to: ObjectState) -> bool {
        self.states.get(n as usize).is_some_and(|s| {
            s.compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })
    }

    fn idle(&self, n: u64) -> bool {
        self.writes_in_flight
            .get(n as usize)
            .is_none_or(|c| c.load(Ordering::SeqCst) == 0)
    }
}

/// The live head map (see the module docs).
pub(crate) struct LiveMap {
    slots: Arc<Slots>,
    changes: mpsc::UnboundedSender<Change>,
}

/// Held while a write to one object is in flight.
pub(crate) struct WriteMark {
    slots: Arc<Slots>,
    n: u64,
}

impl Drop for WriteMark {
    fn drop(&mut self) {
        self.slots
            .swap_if(self.n, ObjectState::Pending, ObjectState::Exists);
        if let Some(c) = self.slots.writes_in_flight.get(self.n as usize) {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl LiveMap {
    /// Keeps `map`, stored in `oid` of `backend` (a backend without snap context: the map
    /// object itself is never snapshotted), changing it through a new owner task.
    pub(crate) fn start(backend: Arc<dyn ObjectBackend>, oid: String, map: &ObjectMap) -> LiveMap {
        let slots = Arc::new(Slots {
            states: map
                .states()
                .iter()
                .map(|s| AtomicU8::new(*s as u8))
                .collect(),
            writes_in_flight: (0..map.len()).map(|_| AtomicU32::new(0)).collect(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(slots.clone(), backend, oid, rx));
        LiveMap { slots, changes: tx }
    }

    pub(crate) fn len(&self) -> u64 {
        self.slots.states.len() as u64
    }

    /// The map as it is now in memory.
    pub(crate) fn current(&self) -> ObjectMap {
        ObjectMap::from_states((0..self.len()).map(|n| self.slots.get(n)).collect())
    }

    async fn ask(&self, change: impl FnOnce(Reply) -> Change) -> Result<(), BackendError> {
        let (tx, rx) = oneshot::channel();
        let gone = || BackendError::Io("the object map's writer stopped".into());
        self.changes.send(change(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Counts a write to object `n` in flight until the mark drops.
    fn track(&self, n: u64) -> WriteMark {
        if let Some(c) = self.slots.writes_in_flight.get(n as usize) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        WriteMark {
            slots: self.slots.clone(),
            n,
        }
    }

    /// Before writing object `n`: counts the write in flight and makes sure the stored map
    /// says `Exists` (dirty) first. Keep the mark until the write is answered.
    pub(crate) async fn before_write(&self, n: u64) -> Result<WriteMark, BackendError> {
        let mark = self.track(n);
        if n < self.len() && self.slots.get(n) != ObjectState::Exists {
            self.ask(|r| Change::Mark(n, ObjectState::Exists, r))
                .await?;
        }
        Ok(mark)
    }

    /// Before changing object `n`'s data in place without creating it (zeroing part of it):
    /// with fast-diff the stored map must say changed too. `None` when the map knows the
    /// object does not exist, so there is nothing to change.
    pub(crate) async fn before_change(&self, n: u64) -> Result<Option<WriteMark>, BackendError> {
        let mark = self.track(n);
        match self.slots.get(n) {
            ObjectState::Nonexistent if n < self.len() => return Ok(None),
            ObjectState::ExistsClean => {
                self.ask(|r| Change::Mark(n, ObjectState::Exists, r))
                    .await?
            }
            _ => {}
        }
        Ok(Some(mark))
    }

    /// Before removing object `n` as a whole: whether it was marked existing (then call
    /// [`LiveMap::removed`] once it is gone).
    pub(crate) fn begin_remove(&self, n: u64) -> bool {
        self.slots
            .swap_if(n, ObjectState::Exists, ObjectState::Pending)
            || self
                .slots
                .swap_if(n, ObjectState::ExistsClean, ObjectState::Pending)
    }

    /// Object `n` was removed after [`LiveMap::begin_remove`].
    pub(crate) async fn removed(&self, n: u64) -> Result<(), BackendError> {
        self.ask(|r| Change::Removed(n, r)).await
    }

    /// Stores `map` (of this map's length) and keeps it.
    pub(crate) async fn replace(&self, map: ObjectMap) -> Result<(), BackendError> {
        if map.len() != self.len() {
            return Err(BackendError::InvalidArgument(format!(
                "object map of {} objects replaced by one of {}",
                self.len(),
                map.len()
            )));
        }
        self.ask(|r| Change::Whole(map, r)).await
    }
}

async fn run(
    slots: Arc<Slots>,
    backend: Arc<dyn ObjectBackend>,
    oid: String,
    mut rx: mpsc::UnboundedReceiver<Change>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let mut marks: Vec<(u64, ObjectState, Reply)> = Vec::new();
        for change in batch {
            match change {
                Change::Mark(n, s, r) => marks.push((n, s, r)),
                Change::Removed(n, r) => {
                    if slots.get(n) == ObjectState::Pending && slots.idle(n) {
                        marks.push((n, ObjectState::Nonexistent, r));
                    } else {
                        let _ = r.send(Ok(()));
                    }
                }
                Change::Whole(map, r) => {
                    // Marks queued before it are stored first, in order.
                    store_all(&slots, backend.as_ref(), &oid, std::mem::take(&mut marks)).await;
                    let res = backend.write_full(&oid, map.encode()).await;
                    if res.is_ok() {
                        for (n, s) in map.states().iter().enumerate() {
                            slots.store(n as u64, *s);
                        }
                    }
                    let _ = r.send(res);
                }
            }
        }
        store_all(&slots, backend.as_ref(), &oid, marks).await;
    }
}

/// Stores `marks` in one write per run of nearby bytes (a batch spread over a large image
/// does not rewrite the bytes between).
async fn store_all(
    slots: &Slots,
    backend: &dyn ObjectBackend,
    oid: &str,
    mut marks: Vec<(u64, ObjectState, Reply)>,
) {
    const SPAN: u64 = 4096;
    marks.sort_by_key(|m| m.0);
    while !marks.is_empty() {
        let start = marks[0].0 / 4;
        let k = marks
            .iter()
            .position(|m| m.0 / 4 >= start + SPAN)
            .unwrap_or(marks.len());
        let rest = marks.split_off(k);
        store_marks(slots, backend, oid, marks).await;
        marks = rest;
    }
}

/// Writes the bytes holding `marks` (every other object in them as memory has it), then
/// makes the marks visible and answers them.
async fn store_marks(
    slots: &Slots,
    backend: &dyn ObjectBackend,
    oid: &str,
    marks: Vec<(u64, ObjectState, Reply)>,
) {
    let Some(lo) = marks.iter().map(|m| m.0 / 4).min() else {
        return;
    };
    let hi = marks.iter().map(|m| m.0 / 4).max().unwrap_or(lo);
    let mut bytes = vec![0u8; (hi - lo + 1) as usize];
    let first = lo * 4;
    let last = ((hi + 1) * 4).min(slots.states.len() as u64);
    for n in first..last {
        put_state(&mut bytes, n - first, slots.get(n));
    }
    for (n, s, _) in &marks {
        put_state(&mut bytes, n - first, *s);
    }
    let res = backend.write(oid, lo, Bytes::from(bytes)).await;
    for (n, s, r) in marks {
        if res.is_ok() {
            slots.store(n, s);
        }
        let _ = r.send(res.clone());
    }
}
