//! The OSD's data path at run time: PG instances driven by OSDMap changes, the client op
//! path (primary-copy replication), peering, recovery and backfill, scrubs, and watch/notify.
//! The decisions (what an op changes: [`crate::pg`]; whether a PG may go active, who is
//! authoritative, how a copy catches up: [`crate::peering`]) are pure functions; this module
//! owns the concurrency and the network.
//!
//! This file holds what the rest shares ([`OsdCore`], the PG instances and their
//! [`PgStatus`]) and applies each new OSDMap to them (PG splits, new intervals, PGs created
//! and removed). Each child module does one job:
//!
//! - `peering_driver`: the driver of the sans-IO peering round, with its catch-up of members that
//!   are behind;
//! - `op`: the client op path and a replica's half of a write (ordering, durability, fencing);
//! - `object_slot`: how ops on one object are ordered;
//! - `peer_client`: the requests this OSD sends to other OSDs (query, pull, push, scan);
//! - `replica`: a member's answers to its primary's peering and recovery requests;
//! - `recovery`: recovery and backfill while a PG serves;
//! - `scrub`: scrubs, scheduled or commanded, and their repairs;
//! - `snap_trim`: the snap trimmer;
//! - `watch_notify`: watches and notifies;
//! - `serve`: what both transports call for a request (caps and envelope checks, metrics);
//! - `grpc`: the gRPC service, [`OsdService`].

mod grpc;
mod object_slot;
mod op;
mod peer_client;
mod peering_driver;
mod recovery;
mod replica;
mod scrub;
mod serve;
mod snap_trim;
mod watch_notify;

pub use grpc::OsdService;
pub use peer_client::osd_client;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_config::OsdTuning;
use basalt_maps::{Epoch, OsdMap, OsdUsage};
use basalt_messenger::Peer;
use basalt_monclient::MonClient;
use basalt_ops::{Eversion, OpError};
use basalt_placement::{OsdId, PgId};
use basalt_proto::auth::AuthChannel;
use basalt_proto::osd::osd_client::OsdClient;

use tokio::sync::watch;

use crate::peer_msg::PeerHeader;
use crate::peering;
use crate::pg::{self, ObjectName};
use crate::pg_state::{pg_state_flags, PgConditions};
use crate::split;
use crate::store::{ObjectId, Store, Transaction};
use object_slot::ObjectSlot;
use scrub::ScrubStamps;
use watch_notify::{PendingNotify, WatchEntry, WatchKey};

/// How long a peer RPC may take before the caller retries.
const PEER_RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts at a failed sub-op or peering round.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Largest total object bytes in one recovery push or pull.
const RECOVERY_BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// Objects one recovery transfer fetches at once.
const RECOVERY_FETCHES_IN_FLIGHT: usize = 8;
/// Objects per backfill scan page (and so per backfill range).
const BACKFILL_SCAN: usize = 256;
/// Longest a request waits for the OSD to catch up with the sender's map.
const MAP_WAIT: Duration = Duration::from_secs(10);

/// Where a PG instance on this OSD stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgStatus {
    /// Primary, gathering the members' states.
    Peering,
    /// Primary, copying the objects named in the logs to members that are behind.
    Recovering,
    /// Primary, copying whole object ranges to members the log cannot catch up.
    Backfilling,
    /// Primary that must backfill a member at or past the backfillfull ratio: it waits,
    /// pushing nothing, until the member has room or the ratio is raised (the reason names
    /// the OSD and its use).
    BackfillToofull(String),
    /// Primary that must not serve: no member of the last active interval answered.
    Down(String),
    /// Primary that must not serve: no complete copy answered.
    Incomplete(String),
    /// Primary, serving I/O.
    Active,
    /// Primary that cannot serve (the reason says why, e.g. below min_size).
    Inactive(String),
    /// Acting replica.
    Replica,
    /// Holds data but is no longer in the acting set.
    Stray,
}

impl PgStatus {
    /// The status without its reason (a metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            PgStatus::Peering => "peering",
            PgStatus::Recovering => "recovering",
            PgStatus::Backfilling => "backfilling",
            PgStatus::BackfillToofull(_) => "backfill_toofull",
            PgStatus::Down(_) => "down",
            PgStatus::Incomplete(_) => "incomplete",
            PgStatus::Active => "active",
            PgStatus::Inactive(_) => "inactive",
            PgStatus::Replica => "replica",
            PgStatus::Stray => "stray",
        }
    }

    /// The status with its reason, for logs.
    pub fn name(&self) -> String {
        match self {
            PgStatus::Peering => "peering".into(),
            PgStatus::Recovering => "recovering".into(),
            PgStatus::Backfilling => "backfilling".into(),
            PgStatus::BackfillToofull(why) => format!("backfill_toofull ({why})"),
            PgStatus::Down(why) => format!("down ({why})"),
            PgStatus::Incomplete(why) => format!("incomplete ({why})"),
            PgStatus::Active => "active".into(),
            PgStatus::Inactive(why) => format!("inactive ({why})"),
            PgStatus::Replica => "replica".into(),
            PgStatus::Stray => "stray".into(),
        }
    }
}

struct PgState {
    /// Epoch of the first map (seen here) with the current acting set and primary.
    interval_epoch: Epoch,
    acting: Vec<OsdId>,
    primary: Option<OsdId>,
    min_size: u32,
    status: PgStatus,
    /// Bumped at every interval change; tasks of an older generation stop.
    generation: u64,
    /// Next write's sequence number (primary, once active).
    next_seq: u64,
    /// Replica: the interval epoch of the primary that last peered us; sub-ops must match it.
    peered_interval: Epoch,
    /// Primary: what the last scrub found and repair could not fix (cleared by a new
    /// interval, whose peering makes members equal again, or by a clean scrub).
    inconsistent: Vec<String>,
    /// Primary: when this PG was last scrubbed (loaded lazily by the scrub schedule).
    scrub_stamps: Option<ScrubStamps>,
    /// Primary of an active PG: objects each replica still lacks (recovering while active).
    missing: BTreeMap<OsdId, BTreeSet<ObjectName>>,
    /// Primary of an active PG: replicas being backfilled while it serves.
    backfill: BTreeMap<OsdId, ActiveBackfill>,
    /// Primary of an active PG: the backfill waits because its target is backfillfull
    /// (what the reason says).
    backfill_toofull: Option<String>,
    /// Primary of an active PG: the authority's `last_update` at activation (every member's
    /// `last_update_floor` from then on).
    activated_at: Eversion,
    /// A split ended the PG's interval: the next map applied gives it a new one (and peers
    /// it) even if its acting set is the same.
    split: bool,
    /// Primary of an active PG: background recovery waits because every replica it still
    /// has to fill is backfillfull (what the reason says).
    recovery_toofull: Option<String>,
    /// Primary: the snap trimmer is deleting removed snapshots' clones.
    snaptrim: bool,
    /// Primary: the removed snapshots this OSD has trimmed the PG of (loaded lazily by the
    /// snap trimmer from the store, where each finished pass records them).
    trimmed_snaps: Option<BTreeSet<u64>>,
    /// The `up_from` epoch of each acting member when the interval began. A member that
    /// restarted (booted again) lost the interval it was peered in, so its return starts a
    /// new interval even when the monitors never saw it down (as Ceph's `up_from` does):
    /// otherwise the primary's sub-ops to it would be refused forever.
    acting_up_from: Vec<Epoch>,
}

impl PgState {
    /// Acting members that do not yet hold every object: an activation record lists none.
    fn incomplete(&self) -> BTreeSet<OsdId> {
        self.missing
            .keys()
            .chain(self.backfill.keys())
            .copied()
            .collect()
    }

    /// Some member is still recovering or backfilling: scrubs wait (the copies differ).
    fn healing(&self) -> bool {
        self.missing.values().any(|m| !m.is_empty()) || !self.backfill.is_empty()
    }
}

/// A replica backfilled while its PG serves (see [`peering::BackfillReach`]).
struct ActiveBackfill {
    /// How far it is filled, by listing key (`pg::listing_key`).
    reach: peering::BackfillReach<ObjectId>,
    /// Objects above `reach` that writes changed while sending it only their log entries:
    /// the backfill copies each before it moves past it.
    skipped: BTreeSet<ObjectId>,
    /// The copy's `les` before this backfill (kept until it is complete).
    les: Epoch,
}

struct Pg {
    id: PgId,
    state: Mutex<PgState>,
    changed: watch::Sender<u64>,
    /// Op ordering per object (see [`ObjectSlot`]).
    objects: Mutex<HashMap<ObjectName, Arc<ObjectSlot>>>,
    /// Replica: bumped whenever a sub-op or push lands, so sub-ops waiting for an earlier
    /// write to their object look again.
    applied: watch::Sender<u64>,
    /// Writes (primary: from version assignment to the last commit; replica: from the
    /// interval check to the commit) hold it shared; peering holds it exclusively while it
    /// reads a member's state, so no write of an older interval lands behind its back.
    gate: tokio::sync::RwLock<()>,
    /// Held while the complete members are worked out and recorded with the monitors, so
    /// two recordings of one interval (recovery and a backfill finishing) never land out
    /// of order with a smaller set last.
    recording: tokio::sync::Mutex<()>,
}

impl Pg {
    fn snapshot(&self) -> (u64, PgStatus, Epoch) {
        let s = lock(&self.state);
        (s.generation, s.status.clone(), s.interval_epoch)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Waits `RETRY_PAUSE` or until the PG changes, then fails with `IntervalChanged` if the
    /// interval of `generation` is over (the caller's retry loop then stops).
    async fn pause_before_retry(&self, generation: u64) -> Result<(), OpError> {
        let mut rx = self.changed.subscribe();
        let _ = tokio::time::timeout(RETRY_PAUSE, rx.changed()).await;
        let (g, _, epoch) = self.snapshot();
        if g != generation {
            return Err(OpError::IntervalChanged {
                pg: self.id.to_string(),
                epoch,
            });
        }
        Ok(())
    }

    /// Resolves once the PG has left interval `generation` (a new map changed its acting
    /// set, or it re-peers): work waiting on a member of the old interval can stop.
    async fn left_generation(&self, generation: u64) {
        let mut rx = self.changed.subscribe();
        loop {
            if lock(&self.state).generation != generation {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The op ordering of one object.
    fn object_slot(&self, name: &ObjectName) -> Arc<ObjectSlot> {
        let mut m = lock(&self.objects);
        if m.len() > 4096 {
            m.retain(|_, slot| Arc::strong_count(slot) > 1 || Arc::strong_count(&slot.order) > 1);
        }
        m.entry(name.clone())
            .or_insert_with(|| Arc::new(ObjectSlot::new()))
            .clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything the data path shares: the store, the newest map, the PG instances, peer
/// connections, watches.
pub struct OsdCore {
    store: Store,
    whoami: AtomicU32,
    map_tx: watch::Sender<Option<Arc<OsdMap>>>,
    pgs: Mutex<HashMap<PgId, Arc<Pg>>>,
    peers: Mutex<HashMap<String, OsdClient<AuthChannel>>>,
    /// Data-path connections to other OSDs (sub-ops), by address.
    messengers: Mutex<HashMap<String, Arc<Peer>>>,
    watches: Mutex<HashMap<WatchKey, Vec<WatchEntry>>>,
    notifies: Mutex<HashMap<u64, PendingNotify>>,
    next_notify: AtomicU64,
    tuning: OsdTuning,
    /// Where activations are recorded; set once the daemon has its monitor client.
    mon: OnceLock<MonClient>,
    /// How this OSD dials its peers (TLS against the cluster CA, or plain text).
    connector: basalt_tls::Connector,
    /// PGs recovering or backfilling at once with this OSD as primary.
    recovery_slots: Arc<tokio::sync::Semaphore>,
    /// PGs found in the store at start: their data matters to peering even where this OSD
    /// is no longer acting, so they get (stray) instances.
    stored_pgs: Mutex<BTreeSet<PgId>>,
    /// This OSD's use as the daemon last measured it (what it reports in beacons).
    measured_usage: Mutex<Option<OsdUsage>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl OsdCore {
    pub fn new(store: Store, tuning: OsdTuning, connector: basalt_tls::Connector) -> Arc<Self> {
        let (map_tx, _) = watch::channel(None);
        let stored_pgs = store.list_pgs().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot list the PGs in the store");
            Vec::new()
        });
        Arc::new(OsdCore {
            recovery_slots: Arc::new(tokio::sync::Semaphore::new(
                tuning.recovery_max_active.max(1) as usize,
            )),
            tuning,
            mon: OnceLock::new(),
            connector,
            stored_pgs: Mutex::new(stored_pgs.into_iter().collect()),
            store,
            whoami: AtomicU32::new(u32::MAX),
            map_tx,
            pgs: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            messengers: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            notifies: Mutex::new(HashMap::new()),
            next_notify: AtomicU64::new(1),
            measured_usage: Mutex::new(None),
        })
    }

    /// The daemon's latest measure of this OSD's use (`daemon::store_usage`).
    pub fn set_measured_usage(&self, usage: Option<OsdUsage>) {
        *lock(&self.measured_usage) = usage;
    }

    /// This OSD's own use now, as a primary checks it before admitting a write: the store's
    /// charged bytes against its capacity are exact at every write (no beacon lag); a
    /// filesystem's use is the daemon's latest measure.
    fn own_usage(&self) -> Option<OsdUsage> {
        let measured = *lock(&self.measured_usage);
        let stats = self.store.stats();
        let live = stats.capacity_bytes.map(|cap| OsdUsage {
            used_bytes: stats.used_bytes,
            total_bytes: cap,
        });
        // Where the last measure picked the filesystem (smaller than the capacity) it stays.
        crate::daemon::reported_usage(live, measured)
    }

    /// Runs `f` on the store off the async workers (RocksDB calls block).
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, OpError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| OpError::Io(format!("store task failed: {e}")))?
    }

    /// Gives the data path the monitor client it records PG activations with.
    pub fn set_mon(&self, mon: MonClient) {
        let _ = self.mon.set(mon);
    }

    fn me(&self) -> Option<OsdId> {
        let id = self.whoami.load(Ordering::Relaxed);
        (id != u32::MAX).then_some(id)
    }

    /// The envelope of this OSD's requests about `pg` in the interval begun at
    /// `interval_epoch`.
    fn peer_header(&self, pg: PgId, interval_epoch: Epoch) -> PeerHeader {
        PeerHeader {
            pg,
            interval_epoch,
            from: self.me().unwrap_or(u32::MAX),
        }
    }

    fn current_map(&self) -> Option<Arc<OsdMap>> {
        self.map_tx.borrow().clone()
    }

    /// PG states for metrics and status: (pg, status kind, acting).
    pub fn pg_summary(&self) -> Vec<(PgId, &'static str, Vec<OsdId>)> {
        let pgs = lock(&self.pgs);
        let mut v: Vec<_> = pgs
            .values()
            .map(|pg| {
                let s = lock(&pg.state);
                (pg.id, s.status.kind(), s.acting.clone())
            })
            .collect();
        v.sort();
        v
    }

    /// The PGs this OSD is primary of, Ceph-style state names included.
    pub fn primary_pg_stats(&self) -> Vec<basalt_ops::PgStat> {
        let me = self.me();
        let map = self.current_map();
        let pgs: Vec<Arc<Pg>> = lock(&self.pgs).values().cloned().collect();
        let mut out = Vec::new();
        for pg in pgs {
            let s = lock(&pg.state);
            if s.primary.is_none() || s.primary != me {
                continue;
            }
            let size = map
                .as_ref()
                .and_then(|m| m.pools.get(&pg.id.pool))
                .map_or(0, |p| p.size as usize);
            // Served by a temporary acting set (pg_temp) rather than CRUSH's.
            let remapped = map.as_ref().is_some_and(|m| m.pg_temp.contains_key(&pg.id));
            let state = pg_state_flags(
                &s.status,
                &PgConditions {
                    undersized: s.acting.len() < size,
                    recovering: s.missing.values().any(|m| !m.is_empty()),
                    recovery_toofull: s.recovery_toofull.is_some(),
                    backfilling: !s.backfill.is_empty(),
                    backfill_toofull: s.backfill_toofull.is_some(),
                    remapped,
                    inconsistent: !s.inconsistent.is_empty(),
                    snaptrim: s.snaptrim,
                },
            );
            let mut detail = match &s.status {
                PgStatus::Down(why)
                | PgStatus::Incomplete(why)
                | PgStatus::Inactive(why)
                | PgStatus::BackfillToofull(why) => why.clone(),
                _ => String::new(),
            };
            if let Some(why) = &s.recovery_toofull {
                detail.push_str(&format!("{why}; "));
            }
            if let Some(why) = &s.backfill_toofull {
                detail.push_str(&format!("{why}; "));
            }
            for (osd, b) in &s.backfill {
                let reach = match &b.reach {
                    peering::BackfillReach::Nothing => "nothing yet".to_string(),
                    peering::BackfillReach::Through(k) => format!("filled through {}", k.name()),
                    peering::BackfillReach::Everything => "filled".to_string(),
                };
                detail.push_str(&format!("osd.{osd} backfilling ({reach}); "));
            }
            for (osd, objects) in s.missing.iter().filter(|(_, m)| !m.is_empty()) {
                detail.push_str(&format!(
                    "osd.{osd} still lacks {} objects; ",
                    objects.len()
                ));
            }
            if remapped {
                detail.push_str("pg_temp: served by this set while the CRUSH primary catches up; ");
            }
            let detail = detail.trim_end_matches("; ").to_string();
            out.push(basalt_ops::PgStat {
                pgid: pg.id.to_string(),
                pool: pg.id.pool,
                seed: pg.id.seed,
                state,
                acting: s.acting.clone(),
                primary: s.primary.unwrap_or(u32::MAX),
                interval_epoch: s.interval_epoch,
                last_seq: s.next_seq.saturating_sub(1),
                detail,
            });
        }
        out.sort_by_key(|p| (p.pool, p.seed));
        out
    }

    /// Splits this OSD's copies of PGs laid out for fewer PGs than their pool has in `map`
    /// (see [`crate::split`]); returns the PGs split, parents and children. Runs before
    /// `map` is published here, so nothing is served under `map` before the split, and
    /// each parent's interval ends first: ops queued on it abort (their clients resend
    /// under the new map), sub-ops and pushes of the old interval are refused, and writes
    /// in flight finish or abort before the copy is read (the PG's gate).
    async fn split_for(self: &Arc<Self>, map: &OsdMap) -> Result<BTreeSet<PgId>, OpError> {
        let mut split = BTreeSet::new();
        let unchanged = self.current_map().is_some_and(|prev| {
            map.pools.values().all(|p| {
                prev.pools
                    .get(&p.id)
                    .is_none_or(|old| old.pg_num == p.pg_num)
            })
        });
        if unchanged {
            return Ok(split);
        }
        let pools: BTreeMap<u32, u32> = map.pools.values().map(|p| (p.id, p.pg_num)).collect();
        let layouts = pools.clone();
        let todo: Vec<(PgId, u32)> = self
            .on_store(move |store| {
                let pools = layouts;
                let mut todo = Vec::new();
                // Copies written before splitting existed carry no layout: record this map's.
                let mut legacy = Transaction::new();
                for id in store.list_pgs().map_err(pg::store_error)? {
                    let Some(&pg_num) = pools.get(&id.pool) else {
                        continue;
                    };
                    match split::read_layout(store, id)? {
                        Some(old) if old < pg_num => todo.push((id, old)),
                        Some(_) => {}
                        None => split::record_layout(&mut legacy, id, pg_num),
                    }
                }
                if !legacy.is_empty() {
                    store.submit_blocking(&legacy).map_err(pg::store_error)?;
                }
                Ok(todo)
            })
            .await?;
        for (parent, old_pg_num) in todo {
            let new_pg_num = pools[&parent.pool];
            let instance = self.pg(parent);
            if let Some(pg) = &instance {
                let mut s = lock(&pg.state);
                s.generation += 1;
                s.split = true;
                s.interval_epoch = map.epoch;
                s.peered_interval = map.epoch;
                if s.status != PgStatus::Replica && s.status != PgStatus::Stray {
                    s.status = PgStatus::Peering;
                }
                drop(s);
                pg.bump();
            }
            let _quiesced = match &instance {
                Some(pg) => Some(pg.gate.write().await),
                None => None,
            };
            let started = std::time::Instant::now();
            let txn = self
                .on_store(move |store| split::split_txn(store, parent, old_pg_num, new_pg_num))
                .await?;
            self.store.submit(txn).await.map_err(|e| {
                OpError::Io(format!(
                    "cannot split pg {parent} from {old_pg_num} to {new_pg_num} PGs: {e}"
                ))
            })?;
            metrics::counter!("basalt_osd_pg_splits_total").increment(1);
            tracing::info!(
                pg = %parent,
                from = old_pg_num,
                to = new_pg_num,
                ms = started.elapsed().as_millis() as u64,
                "PG copy split into its children"
            );
            split.insert(parent);
            for seed in basalt_placement::split_children(parent.seed, old_pg_num, new_pg_num) {
                split.insert(PgId {
                    pool: parent.pool,
                    seed,
                });
            }
        }
        Ok(split)
    }

    /// Applies a new OSDMap: splits of PGs whose pool grew `pg_num`, new intervals for PGs
    /// whose acting set or primary changed (starting peering where this OSD is primary),
    /// creation of PGs newly mapped here. A split that fails leaves the map unapplied (this
    /// OSD serves the older map, never a half-split PG); the next map tries again.
    pub async fn on_map(self: &Arc<Self>, me: OsdId, map: Arc<OsdMap>) -> Result<(), OpError> {
        self.whoami.store(me, Ordering::Relaxed);
        let split = self.split_for(&map).await?;
        let mut to_create = Vec::new();
        let mut to_peer = Vec::new();
        let mut to_remove = Vec::new();
        {
            let mut pgs = lock(&self.pgs);
            let stored = std::mem::take(&mut *lock(&self.stored_pgs));
            for pool in map.pools.values() {
                for seed in 0..pool.pg_num {
                    let id = PgId {
                        pool: pool.id,
                        seed,
                    };
                    let Ok(mapping) = map.map_pg(pool, id) else {
                        continue;
                    };
                    let in_acting = mapping.acting.contains(&me);
                    if !in_acting
                        && !pgs.contains_key(&id)
                        && !stored.contains(&id)
                        && !split.contains(&id)
                    {
                        continue;
                    }
                    let pg = pgs
                        .entry(id)
                        .or_insert_with(|| {
                            if in_acting {
                                to_create.push(id);
                            }
                            Arc::new(Pg {
                                id,
                                state: Mutex::new(PgState {
                                    interval_epoch: 0,
                                    acting: vec![],
                                    primary: None,
                                    min_size: 0,
                                    status: PgStatus::Stray,
                                    generation: 0,
                                    next_seq: 1,
                                    peered_interval: 0,
                                    inconsistent: vec![],
                                    scrub_stamps: None,
                                    missing: BTreeMap::new(),
                                    backfill: BTreeMap::new(),
                                    backfill_toofull: None,
                                    activated_at: Eversion::ZERO,
                                    split: false,
                                    recovery_toofull: None,
                                    snaptrim: false,
                                    trimmed_snaps: None,
                                    acting_up_from: vec![],
                                }),
                                changed: watch::channel(0).0,
                                objects: Mutex::new(HashMap::new()),
                                applied: watch::channel(0).0,
                                gate: tokio::sync::RwLock::new(()),
                                recording: tokio::sync::Mutex::new(()),
                            })
                        })
                        .clone();
                    let up_from: Vec<Epoch> = mapping
                        .acting
                        .iter()
                        .map(|o| map.osds.get(o).map_or(0, |i| i.up_from))
                        .collect();
                    let mut s = lock(&pg.state);
                    if s.acting == mapping.acting
                        && s.acting_up_from == up_from
                        && s.primary == mapping.acting_primary
                        && s.min_size == pool.min_size
                        && s.generation > 0
                        && !s.split
                    {
                        continue;
                    }
                    s.split = false;
                    s.interval_epoch = map.epoch;
                    s.acting = mapping.acting.clone();
                    s.acting_up_from = up_from;
                    s.primary = mapping.acting_primary;
                    s.min_size = pool.min_size;
                    s.generation += 1;
                    s.inconsistent.clear();
                    s.missing.clear();
                    s.backfill.clear();
                    s.backfill_toofull = None;
                    s.status = if s.primary == Some(me) {
                        to_peer.push((pg.clone(), s.generation));
                        PgStatus::Peering
                    } else if in_acting {
                        PgStatus::Replica
                    } else {
                        PgStatus::Stray
                    };
                    drop(s);
                    pg.bump();
                }
            }
            // Copies nothing will ask for again: PGs of deleted pools, and strays once their
            // PG went active on a full acting set without this OSD (that activation came
            // after recovery, so every member holds what this copy holds).
            for pg in pgs.values() {
                let redundant = match map.pools.get(&pg.id.pool) {
                    None => true,
                    Some(pool) => {
                        lock(&pg.state).status == PgStatus::Stray
                            && map.pg_activations.get(&pg.id).is_some_and(|a| {
                                a.acting.len() >= pool.size as usize && !a.acting.contains(&me)
                            })
                    }
                };
                if redundant {
                    let mut s = lock(&pg.state);
                    s.status = PgStatus::Stray;
                    s.generation += 1;
                    drop(s);
                    pg.bump();
                    to_remove.push(pg.id);
                }
            }
            for id in &to_remove {
                pgs.remove(id);
            }
        }
        if !to_remove.is_empty() {
            let ids = to_remove.clone();
            let txn = self
                .on_store(move |store| {
                    let mut txn = Transaction::new();
                    for id in ids {
                        if store.pg_exists(id).unwrap_or(false) {
                            txn.pg_remove(id);
                            txn.meta_remove(split::layout_key(id));
                        }
                    }
                    Ok(txn)
                })
                .await
                .unwrap_or_else(|_| Transaction::new());
            if !txn.is_empty() {
                match self.store.submit(txn).await {
                    Ok(()) => {
                        tracing::info!(pgs = ?to_remove, "removed copies no PG needs any more")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot remove redundant PG copies"),
                }
            }
        }
        if !to_create.is_empty() {
            let ids = to_create.clone();
            let pg_nums: BTreeMap<u32, u32> =
                map.pools.values().map(|p| (p.id, p.pg_num)).collect();
            let txn = self
                .on_store(move |store| {
                    let mut txn = Transaction::new();
                    for id in ids {
                        if !store.pg_exists(id).unwrap_or(true) {
                            txn.pg_create(id);
                            if let Some(&pg_num) = pg_nums.get(&id.pool) {
                                split::record_layout(&mut txn, id, pg_num);
                            }
                        }
                    }
                    Ok(txn)
                })
                .await
                .unwrap_or_else(|_| Transaction::new());
            if !txn.is_empty() {
                if let Err(e) = self.store.submit(txn).await {
                    tracing::error!(error = %e, "cannot create PGs mapped to this OSD");
                }
            }
        }
        self.map_tx.send_replace(Some(map.clone()));
        self.expire_blocklisted_watches(&map);
        for (pg, generation) in to_peer {
            let core = self.clone();
            tokio::spawn(async move { core.peer(pg, generation).await });
        }
        Ok(())
    }

    /// Waits (bounded) until this OSD has a map at least `epoch`.
    async fn map_at_least(&self, epoch: Epoch) -> Result<Arc<OsdMap>, OpError> {
        let mut rx = self.map_tx.subscribe();
        let found = tokio::time::timeout(MAP_WAIT, async {
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch >= epoch))
                .await
                .ok()
                .and_then(|m| m.clone())
        })
        .await;
        match found {
            Ok(Some(m)) => Ok(m),
            _ => Err(OpError::MapBehind {
                have: self.current_map().map_or(0, |m| m.epoch),
                want: epoch,
            }),
        }
    }

    fn pg(&self, id: PgId) -> Option<Arc<Pg>> {
        lock(&self.pgs).get(&id).cloned()
    }

    /// `pg_num` of `pool` in the current map (0 if unknown: then no layout is recorded
    /// that a split could act on).
    fn pg_num_of(&self, pool: u32) -> u32 {
        self.current_map()
            .and_then(|m| m.pools.get(&pool).map(|p| p.pg_num))
            .unwrap_or(0)
    }
}
