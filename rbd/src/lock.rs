//! The exclusive-lock hand-over as a sans-IO state machine.
//!
//! [`LockCore`] decides; the driver in [`crate::image`] (or a test's
//! simulated cluster) performs. Every input is an [`Event`] with the current
//! time (`now`, a `Duration` since any fixed origin), every decision comes
//! back as [`Action`]s, and nothing here does IO or reads a clock — so the
//! protocol is tested exhaustively and under random schedules without a
//! cluster.
//!
//! The protocol (Ceph's `ManagedLock` + `BreakRequest`, DESIGN §4):
//!
//! - Every open image watches its header; the lock cookie names that watch
//!   (`"auto <watch cookie>"`), which is how a requester tells a live holder
//!   from a dead one.
//! - A write asks for admission ([`Event::WriteWanted`]). Holding the lock →
//!   admitted at once. Otherwise the writes queue and acquisition starts:
//!   `TryLock` → busy → `NotifyRequestLock` to the holder. A cooperative
//!   holder stops admitting, drains its in-flight writes, flushes, unlocks
//!   and only *then* acks, so an ack means "released"; the requester retries.
//! - Holder silent → `ListWatchers`. Its watch still there → it is alive but
//!   slow: back off and ask again. Its watch gone (the OSD timed it out) →
//!   re-read the lock owner (it may have just released — the kernel client's
//!   fix for blocklisting an innocent closer), `Blocklist` it, `BreakLock`,
//!   and try again. Blocklisting first is the fence: from then on no OSD
//!   applies a write from the old holder, so breaking its lock is safe.
//! - After acquiring, `Refresh` (drop read caches, re-read the header: size
//!   may have changed while another client held the lock) before admitting.
//! - Losing our own watch while holding means requesters will soon think we
//!   are dead: release at once, re-watch, and re-acquire with the new cookie.
//! - A `Blocklisted` error anywhere is terminal: every waiting and future
//!   write fails with it; nothing is retried into success.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::backend::{BackendError, Watcher};

/// Admission tickets for writes, chosen by the driver.
pub type WriteId = u64;

/// The lock's owner as the OSD records it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockOwner {
    pub client: String,
    pub cookie: String,
}

/// The lock cookie for an image whose header watch has `watch_cookie`.
pub fn lock_cookie(watch_cookie: u64) -> String {
    format!("auto {watch_cookie}")
}

impl LockOwner {
    /// The holder's header watch cookie, if the cookie was set by us (an
    /// external locker's cookie cannot be checked for liveness).
    pub fn watch_cookie(&self) -> Option<u64> {
        self.cookie.strip_prefix("auto ")?.parse().ok()
    }

    fn is_watcher(&self, w: &Watcher) -> bool {
        w.client == self.client && Some(w.cookie) == self.watch_cookie()
    }
}

/// Timing knobs. The notify timeout is the driver's (the core only sees the
/// notify's outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockConfig {
    /// Back-off before asking again when the holder is alive but did not
    /// release, or after a transient error.
    pub retry_delay: Duration,
    /// After handing the lock over, wait this long before asking for it back,
    /// so the requester (which retries on our ack) wins the race to lock.
    pub release_yield: Duration,
    /// A write that waited this long for the lock fails with
    /// [`Refusal::TimedOut`] instead of hanging its caller forever.
    pub acquire_timeout: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            retry_delay: Duration::from_secs(1),
            release_yield: Duration::from_millis(200),
            acquire_timeout: Duration::from_secs(120),
        }
    }
}

/// Why a write was refused admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This client was blocklisted: it must never write again.
    Blocklisted(String),
    /// The lock could not be obtained within `acquire_timeout`.
    TimedOut,
    /// The image is closing or closed.
    Closed,
    /// Taking the lock was refused for lack of space (the pool is full, so the OSD runs no
    /// lock request that may store more): the waiting writes could not have been stored
    /// either, so they fail as writes to a full pool do. Not terminal: a later write tries
    /// again.
    NoSpace(String),
}

/// Inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write/discard/zero (or resize) wants to modify the image.
    WriteWanted(WriteId),
    /// An admitted write completed (or a waiting one was abandoned).
    WriteFinished(WriteId),
    /// `TryLock` succeeded.
    LockAcquired,
    /// `TryLock` found the lock held (holder `None` if it vanished meanwhile).
    LockBusy {
        holder: Option<LockOwner>,
    },
    /// Another client's notify asks us to release the lock.
    RequestLockNotified {
        notify_id: u64,
    },
    /// Our `NotifyRequestLock` completed: who acked, who timed out.
    NotifyDone {
        acked: Vec<Watcher>,
        timed_out: Vec<Watcher>,
    },
    /// `ListWatchers` result.
    Watchers(Vec<Watcher>),
    /// `GetLocker` result.
    LockInfo(Option<LockOwner>),
    BlocklistDone,
    BreakDone,
    /// `Refresh` done: caches dropped, header re-read.
    Refreshed,
    Flushed,
    Unlocked,
    /// The current pipeline action (lock/notify/list/blocklist/break/refresh/
    /// flush/unlock) failed.
    OpFailed(BackendError),
    /// Our header watch is gone.
    WatchLost,
    WatchRestored {
        cookie: u64,
    },
    RewatchFailed(BackendError),
    /// Some operation of this client was refused with `Blocklisted`.
    Blocklisted(String),
    /// Nobody is using the image for now (the gateway's last connection to it closed):
    /// release the lock at once, as a close would, but stay open. The next writer
    /// elsewhere then locks on its first try instead of asking us and waiting for our
    /// release; a later write here takes the lock again as usual.
    Relinquish,
    /// Close the image: release the lock if held, refuse further writes.
    Close,
    /// Time passed; see [`LockCore::next_deadline`].
    Tick,
}

/// Outputs, to be performed in order. Each pipeline action's outcome comes
/// back as the matching event (or `OpFailed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    TryLock {
        cookie: String,
    },
    /// Notify the header with a RequestLock; report `NotifyDone`.
    NotifyRequestLock {
        holder: LockOwner,
    },
    ListWatchers,
    GetLocker,
    Blocklist {
        client: String,
    },
    BreakLock {
        owner: LockOwner,
    },
    /// Drop read caches and re-read the header; report `Refreshed`.
    Refresh,
    AdmitWrite(WriteId),
    FailWrite(WriteId, Refusal),
    /// All admitted writes have completed: make them durable; report `Flushed`.
    Flush,
    Unlock {
        cookie: String,
    },
    /// Answer a RequestLock notify (fire and forget; report only `Blocklisted`).
    AckNotify {
        notify_id: u64,
    },
    /// Watch the header again; report `WatchRestored` or `RewatchFailed`.
    Rewatch,
    /// We took the lock from another holder (count it).
    RecordHandover,
    /// Close finished: nothing is held, nothing will be admitted.
    Closed,
}

/// What the acquisition pipeline is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    TryLock { cookie: String },
    Notify { holder: LockOwner },
    ListWatchers { holder: LockOwner },
    GetLocker { holder: LockOwner },
    Blocklist { holder: LockOwner },
    Break { holder: LockOwner },
    Refresh { cookie: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Drain,
    Flush,
    Unlock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    Acquiring(Step),
    Backoff { until: Duration },
    Locked { cookie: String },
    Releasing { cookie: String, phase: Phase },
    Failed(Refusal),
    Closed,
}

/// The exclusive-lock state machine of one open image.
#[derive(Debug, Clone)]
pub struct LockCore {
    cfg: LockConfig,
    me: String,
    state: State,
    /// Our header watch cookie; `None` while it is lost.
    watch: Option<u64>,
    rewatch_at: Option<Duration>,
    rewatching: bool,
    /// Writes waiting for the lock, with their arrival time.
    waiting: BTreeMap<WriteId, Duration>,
    /// Admitted writes not yet finished.
    in_flight: BTreeSet<WriteId>,
    /// RequestLock notifies to ack once released.
    pending_acks: Vec<u64>,
    /// The current release was asked for by another client.
    release_requested: bool,
    closing: bool,
    /// A `Relinquish` arrived while the lock was being acquired and no write has wanted
    /// it since: release it as soon as it is ours.
    relinquish: bool,
    /// Another holder stood in our way during this acquisition.
    saw_holder: bool,
    /// The holder acked our last request (so a Busy right after is not a reason to hurry).
    last_answered: Option<LockOwner>,
    /// Our last `TryLock` found the lock held but nobody holding it by the time we looked:
    /// it was released in between (a holder relinquishing as we asked), so we retried at
    /// once; a second time in a row backs off instead of spinning.
    holder_vanished: bool,
}

impl LockCore {
    /// `me` is this client's id; `watch_cookie` the header watch opened with the image.
    pub fn new(cfg: LockConfig, me: impl Into<String>, watch_cookie: u64) -> Self {
        LockCore {
            cfg,
            me: me.into(),
            state: State::Idle,
            watch: Some(watch_cookie),
            rewatch_at: None,
            rewatching: false,
            waiting: BTreeMap::new(),
            in_flight: BTreeSet::new(),
            pending_acks: Vec::new(),
            release_requested: false,
            closing: false,
            relinquish: false,
            saw_holder: false,
            last_answered: None,
            holder_vanished: false,
        }
    }

    /// True while this image holds the lock and admits writes.
    pub fn is_locked(&self) -> bool {
        matches!(self.state, State::Locked { .. })
    }

    /// True once a blocklist (or close) made the image refuse every write.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, State::Failed(_) | State::Closed)
    }

    /// True while a release (drain, flush, unlock) is under way.
    pub fn is_releasing(&self) -> bool {
        matches!(self.state, State::Releasing { .. })
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The earliest time a `Tick` can change anything.
    pub fn next_deadline(&self) -> Option<Duration> {
        let mut d = self.rewatch_at;
        let mut min = |t: Duration| d = Some(d.map_or(t, |x: Duration| x.min(t)));
        if let State::Backoff { until } = self.state {
            min(until);
        }
        if let Some(oldest) = self.waiting.values().min() {
            min(*oldest + self.cfg.acquire_timeout);
        }
        d
    }

    /// Feed one event; get the actions to perform, in order.
    pub fn handle(&mut self, now: Duration, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        self.step(now, ev, &mut out);
        self.kick(now, &mut out);
        out
    }

    fn step(&mut self, now: Duration, ev: Event, out: &mut Vec<Action>) {
        match ev {
            Event::WriteWanted(id) => {
                // A user is back: a pending relinquish no longer applies.
                self.relinquish = false;
                match &self.state {
                    State::Failed(r) => out.push(Action::FailWrite(id, r.clone())),
                    State::Closed => out.push(Action::FailWrite(id, Refusal::Closed)),
                    _ if self.closing => out.push(Action::FailWrite(id, Refusal::Closed)),
                    State::Locked { .. } => {
                        self.in_flight.insert(id);
                        out.push(Action::AdmitWrite(id));
                    }
                    _ => {
                        self.waiting.insert(id, now);
                    }
                }
            }
            Event::WriteFinished(id) => {
                self.waiting.remove(&id);
                self.in_flight.remove(&id);
                self.maybe_flush(out);
            }
            Event::LockAcquired => {
                let Some(Step::TryLock { cookie }) = self.step_ref().cloned() else {
                    return;
                };
                self.last_answered = None;
                self.holder_vanished = false;
                if self.closing || self.watch.map(lock_cookie).as_ref() != Some(&cookie) {
                    // Closing, or our watch changed while we locked: a lock
                    // whose cookie names a dead watch would get us blocklisted.
                    self.begin_release(cookie, out);
                    return;
                }
                if std::mem::take(&mut self.saw_holder) {
                    out.push(Action::RecordHandover);
                }
                self.state = State::Acquiring(Step::Refresh { cookie });
                out.push(Action::Refresh);
            }
            Event::Refreshed => {
                let Some(Step::Refresh { cookie }) = self.step_ref().cloned() else {
                    return;
                };
                self.state = State::Locked {
                    cookie: cookie.clone(),
                };
                for (id, _) in std::mem::take(&mut self.waiting) {
                    self.in_flight.insert(id);
                    out.push(Action::AdmitWrite(id));
                }
                if self.closing || !self.pending_acks.is_empty() {
                    // Asked to release while refreshing: the writes just
                    // admitted go first (both sides progress), then hand over.
                    self.release_requested = !self.pending_acks.is_empty();
                    self.begin_release(cookie, out);
                } else if std::mem::take(&mut self.relinquish) {
                    // Relinquished while locking, and no write wanted the lock since.
                    self.begin_release(cookie, out);
                }
            }
            Event::LockBusy { holder } => {
                if !matches!(self.step_ref(), Some(Step::TryLock { .. })) {
                    return;
                }
                if self.closing {
                    self.close(out);
                    return;
                }
                match holder {
                    // Released between our lock attempt and our look: try again now,
                    // rather than wait out a back-off for a lock that is free.
                    None if !std::mem::replace(&mut self.holder_vanished, true) => {
                        self.try_lock(out)
                    }
                    None => {
                        self.holder_vanished = false;
                        self.backoff(now, out)
                    }
                    Some(h) if self.last_answered.as_ref() == Some(&h) => {
                        // It acked but still holds (it re-took the lock or
                        // never had released it): don't spin on it.
                        self.last_answered = None;
                        self.backoff(now, out);
                    }
                    Some(h) => {
                        self.holder_vanished = false;
                        self.saw_holder = true;
                        out.push(Action::NotifyRequestLock { holder: h.clone() });
                        self.state = State::Acquiring(Step::Notify { holder: h });
                    }
                }
            }
            Event::NotifyDone { acked, .. } => {
                let Some(Step::Notify { holder }) = self.step_ref().cloned() else {
                    return;
                };
                if acked.iter().any(|w| holder.is_watcher(w)) {
                    // The holder answers only after unlocking: retry now.
                    self.last_answered = Some(holder);
                    self.try_lock(out);
                } else {
                    out.push(Action::ListWatchers);
                    self.state = State::Acquiring(Step::ListWatchers { holder });
                }
            }
            Event::Watchers(list) => {
                let Some(Step::ListWatchers { holder }) = self.step_ref().cloned() else {
                    return;
                };
                if holder.watch_cookie().is_none() || list.iter().any(|w| holder.is_watcher(w)) {
                    // Alive (or an external locker we cannot judge): wait and ask again.
                    self.backoff(now, out);
                } else {
                    out.push(Action::GetLocker);
                    self.state = State::Acquiring(Step::GetLocker { holder });
                }
            }
            Event::LockInfo(owner) => {
                let Some(Step::GetLocker { holder }) = self.step_ref().cloned() else {
                    return;
                };
                if owner.as_ref() != Some(&holder) {
                    // Released or changed hands since we looked: start over.
                    self.try_lock(out);
                } else if holder.client == self.me {
                    // A stale lock of this very client instance (a watch
                    // we lost and replaced): nothing of ours writes under
                    // it, and we must never blocklist ourselves. An earlier
                    // process under the same name is another instance
                    // (client ids carry a per-process nonce) and is fenced
                    // like any other holder.
                    out.push(Action::BreakLock {
                        owner: holder.clone(),
                    });
                    self.state = State::Acquiring(Step::Break { holder });
                } else {
                    out.push(Action::Blocklist {
                        client: holder.client.clone(),
                    });
                    self.state = State::Acquiring(Step::Blocklist { holder });
                }
            }
            Event::BlocklistDone => {
                let Some(Step::Blocklist { holder }) = self.step_ref().cloned() else {
                    return;
                };
                out.push(Action::BreakLock {
                    owner: holder.clone(),
                });
                self.state = State::Acquiring(Step::Break { holder });
            }
            Event::BreakDone => {
                if matches!(self.step_ref(), Some(Step::Break { .. })) {
                    self.try_lock(out);
                }
            }
            Event::Flushed => {
                if let State::Releasing {
                    cookie,
                    phase: Phase::Flush,
                } = &self.state
                {
                    let cookie = cookie.clone();
                    out.push(Action::Unlock {
                        cookie: cookie.clone(),
                    });
                    self.state = State::Releasing {
                        cookie,
                        phase: Phase::Unlock,
                    };
                }
            }
            Event::Unlocked => self.released(now, out),
            Event::OpFailed(err) => self.op_failed(now, err, out),
            Event::RequestLockNotified { notify_id } => match &self.state {
                State::Locked { cookie } => {
                    let cookie = cookie.clone();
                    self.pending_acks.push(notify_id);
                    self.release_requested = true;
                    self.begin_release(cookie, out);
                }
                State::Releasing { .. } | State::Acquiring(Step::Refresh { .. }) => {
                    self.pending_acks.push(notify_id);
                }
                // Not the holder (the requester's view is stale, or this is
                // our own notify echoing back): nothing to release.
                _ => out.push(Action::AckNotify { notify_id }),
            },
            Event::WatchLost => {
                self.watch = None;
                if !self.rewatching && !self.is_failed() {
                    self.rewatching = true;
                    out.push(Action::Rewatch);
                }
                if let State::Locked { cookie } = &self.state {
                    let cookie = cookie.clone();
                    self.begin_release(cookie, out);
                }
            }
            Event::WatchRestored { cookie } => {
                self.rewatching = false;
                self.rewatch_at = None;
                self.watch = Some(cookie);
            }
            Event::RewatchFailed(err) => {
                self.rewatching = false;
                if let BackendError::Blocklisted(who) = err {
                    self.fail(Refusal::Blocklisted(who), out);
                } else {
                    self.rewatch_at = Some(now + self.cfg.retry_delay);
                }
            }
            Event::Blocklisted(who) => self.fail(Refusal::Blocklisted(who), out),
            Event::Relinquish => match &self.state {
                State::Locked { cookie } => {
                    let cookie = cookie.clone();
                    self.begin_release(cookie, out);
                }
                // Not holding now, but an acquisition under way may still end with the
                // lock: release it then, unless a write wants it by that time. (When the
                // lock is not ours nor coming, the flag does nothing: every acquisition
                // starts with a write, which clears it.)
                _ => self.relinquish = true,
            },
            Event::Close => {
                self.closing = true;
                match &self.state {
                    State::Locked { cookie } => {
                        let cookie = cookie.clone();
                        self.begin_release(cookie, out);
                    }
                    State::Idle | State::Backoff { .. } | State::Failed(_) => self.close(out),
                    // The lock may be ours once these finish: their outcome
                    // releases or closes.
                    State::Acquiring(Step::TryLock { .. } | Step::Refresh { .. })
                    | State::Releasing { .. }
                    | State::Closed => {}
                    // Not holding, nor about to: the step's outcome is ignored.
                    State::Acquiring(_) => self.close(out),
                }
            }
            Event::Tick => {
                if let State::Backoff { until } = self.state {
                    if now >= until {
                        self.state = State::Idle;
                    }
                }
                if self.rewatch_at.is_some_and(|t| now >= t) && !self.is_failed() {
                    self.rewatch_at = None;
                    self.rewatching = true;
                    out.push(Action::Rewatch);
                }
                let expired: Vec<WriteId> = self
                    .waiting
                    .iter()
                    .filter(|(_, t)| now >= **t + self.cfg.acquire_timeout)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    self.waiting.remove(&id);
                    out.push(Action::FailWrite(id, Refusal::TimedOut));
                }
            }
        }
    }

    fn step_ref(&self) -> Option<&Step> {
        match &self.state {
            State::Acquiring(s) => Some(s),
            _ => None,
        }
    }

    /// Start acquiring when writes wait and nothing stands in the way.
    fn kick(&mut self, _now: Duration, out: &mut Vec<Action>) {
        if self.state == State::Idle && !self.waiting.is_empty() && !self.closing {
            self.try_lock(out);
        }
    }

    fn try_lock(&mut self, out: &mut Vec<Action>) {
        if self.closing {
            self.close(out);
            return;
        }
        match self.watch {
            Some(w) => {
                let cookie = lock_cookie(w);
                out.push(Action::TryLock {
                    cookie: cookie.clone(),
                });
                self.state = State::Acquiring(Step::TryLock { cookie });
            }
            // Without a watch our lock would look dead; wait for WatchRestored.
            None => self.state = State::Idle,
        }
    }

    fn backoff(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.closing {
            self.close(out);
        } else {
            self.state = State::Backoff {
                until: now + self.cfg.retry_delay,
            };
        }
    }

    fn begin_release(&mut self, cookie: String, out: &mut Vec<Action>) {
        self.state = State::Releasing {
            cookie,
            phase: Phase::Drain,
        };
        self.maybe_flush(out);
    }

    fn maybe_flush(&mut self, out: &mut Vec<Action>) {
        if let State::Releasing {
            cookie,
            phase: Phase::Drain,
        } = &self.state
        {
            if self.in_flight.is_empty() {
                self.state = State::Releasing {
                    cookie: cookie.clone(),
                    phase: Phase::Flush,
                };
                out.push(Action::Flush);
            }
        }
    }

    fn released(&mut self, now: Duration, out: &mut Vec<Action>) {
        if !matches!(
            self.state,
            State::Releasing {
                phase: Phase::Unlock,
                ..
            }
        ) {
            return;
        }
        for notify_id in self.pending_acks.drain(..) {
            out.push(Action::AckNotify { notify_id });
        }
        let yielded = std::mem::take(&mut self.release_requested);
        if self.closing {
            self.close(out);
        } else if yielded && !self.waiting.is_empty() {
            self.state = State::Backoff {
                until: now + self.cfg.release_yield,
            };
        } else {
            self.state = State::Idle;
        }
    }

    fn op_failed(&mut self, now: Duration, err: BackendError, out: &mut Vec<Action>) {
        if let BackendError::Blocklisted(who) = err {
            self.fail(Refusal::Blocklisted(who), out);
            return;
        }
        match &self.state {
            State::Acquiring(Step::Break { .. }) if matches!(err, BackendError::NotFound(_)) => {
                // Someone else broke it first.
                self.try_lock(out);
            }
            State::Acquiring(_) => {
                if let BackendError::NoSpace(why) = &err {
                    // Retrying would hold the writes until the pool has room: a VM gets
                    // ENOSPC at once instead, as for a write past the lock.
                    for (id, _) in std::mem::take(&mut self.waiting) {
                        out.push(Action::FailWrite(id, Refusal::NoSpace(why.clone())));
                    }
                }
                tracing::warn!(error = %err, "exclusive lock: acquisition step failed, will retry");
                self.backoff(now, out);
            }
            State::Releasing {
                phase: Phase::Unlock,
                ..
            } if matches!(err, BackendError::NotFound(_)) => {
                // Our lock was broken already: nothing left to release.
                self.state = State::Releasing {
                    cookie: String::new(),
                    phase: Phase::Unlock,
                };
                self.released(now, out);
            }
            State::Releasing { cookie, phase } => {
                // Flush or unlock failed without a blocklist: try the step again later
                // by re-entering it (the driver retries on the next action).
                tracing::warn!(error = %err, "exclusive lock: release step failed, retrying");
                let (cookie, phase) = (cookie.clone(), phase.clone());
                match phase {
                    Phase::Flush => out.push(Action::Flush),
                    Phase::Unlock => out.push(Action::Unlock {
                        cookie: cookie.clone(),
                    }),
                    Phase::Drain => {}
                }
                self.state = State::Releasing { cookie, phase };
            }
            _ => {}
        }
    }

    fn fail(&mut self, why: Refusal, out: &mut Vec<Action>) {
        if matches!(self.state, State::Failed(_) | State::Closed) {
            return;
        }
        for (id, _) in std::mem::take(&mut self.waiting) {
            out.push(Action::FailWrite(id, why.clone()));
        }
        self.pending_acks.clear();
        self.rewatch_at = None;
        if self.closing {
            self.state = State::Closed;
            out.push(Action::Closed);
        } else {
            self.state = State::Failed(why);
        }
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        for (id, _) in std::mem::take(&mut self.waiting) {
            out.push(Action::FailWrite(id, Refusal::Closed));
        }
        for notify_id in self.pending_acks.drain(..) {
            out.push(Action::AckNotify { notify_id });
        }
        self.rewatch_at = None;
        self.state = State::Closed;
        out.push(Action::Closed);
    }
}

#[cfg(test)]
mod tests;
