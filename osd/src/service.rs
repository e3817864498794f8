//! The OSD's data path at run time: PG instances driven by OSDMap changes, the client op
//! path (primary-copy replication), peering, recovery and backfill, scrubs, and watch/notify.
//! The decisions (what an op changes: [`crate::pg`]; whether a PG may go active, who is
//! authoritative, how a copy catches up: [`crate::peering`]) are pure functions; this module
//! owns the concurrency and the network.
//!
//! # Ordering and durability
//!
//! - Ops on one object are serialised by a per-object async lock held from execution to the
//!   reply (reads too, so a read never sees a write that is not yet on every replica).
//!   Ops on different objects of a PG run concurrently; each write gets the PG's next
//!   sequence number under the PG's state lock.
//! - A write is committed locally and on every acting replica in parallel; the client gets
//!   its reply only after all of them returned (every store submit is fsynced).
//! - A replica that does not answer is retried until the PG's interval changes (the monitors
//!   mark it down on heartbeat reports); the op then fails with `IntervalChanged` and the
//!   client resends it with the same request id, which the new interval's primary answers
//!   from its log after peering made every member equal.
//! - A member (replica or the primary itself) refusing a sent write for lack of space is
//!   retried the same way: a write is either durable on every member or, if the interval
//!   changes first, settled by peering; it is never reported failed while visible.
//!
//! # Fencing
//!
//! Clients are fenced per instance (`name/nonce`, see `OsdMap::is_blocklisted`). Every client
//! request is checked against the blocklist of an OSDMap at least as new as the client's (the
//! OSD waits for that map first), and checked again once it holds its object's order lock:
//! Ceph's epoch barrier. A lock breaker's ops carry the blocklist's epoch, so once it has
//! touched an object through this OSD, no op of the fenced instance applies to that object
//! here, even one that arrived with an older map and queued behind it; and an OSD that has
//! not seen the blocklist has had no op of the breaker either, so what it applies is ordered
//! before the break. Replicas accept sub-ops only from the primary that peered them in the
//! current interval, so a deposed primary cannot write, and a new primary took over at a map
//! newer than any its predecessor served the breaker with.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_auth::{Authenticated, Perm, TicketCell};
use basalt_config::OsdTuning;
use basalt_maps::PoolId;
use basalt_maps::{Epoch, Fullness, OsdMap, OsdUsage};
use basalt_messenger::Peer;
use basalt_monclient::MonClient;
use basalt_ops::{
    decode, encode, Eversion, NotifyResult, ObjOp, OpError, OpResult, ReqId, WatcherInfo,
    MAX_MESSAGE_BYTES, MAX_OPS_PER_REQUEST,
};
use basalt_placement::{object_to_pg_ns, OsdId, PgId};
use basalt_proto::auth::{denied, peer, AuthChannel};
use basalt_proto::data_path;
use basalt_proto::osd as pb;
use basalt_proto::osd::osd_client::OsdClient;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::peer_msg::{header_of, PeerHeader, SubOp};
use crate::peering::{self, BackfillProgress, Catchup, PeerState, PgInfo};
use crate::pg::{self, ObjectName, Push};
use crate::pg_state::{pg_state_flags, PgConditions};
use crate::split;
use crate::store::{ObjectId, Store, Transaction};

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
/// Objects per scrub chunk (Ceph's `osd_scrub_chunk_max`): writes to a PG wait at most for
/// the mapping of this many objects on every member.
const SCRUB_CHUNK: usize = 25;
/// Longest a request waits for the OSD to catch up with the sender's map.
const MAP_WAIT: Duration = Duration::from_secs(10);
/// How often the snap trimmer looks for removed snapshots to trim.
const SNAP_TRIM_TICK: Duration = Duration::from_secs(1);
/// Objects per snap trimmer scan page.
const SNAP_TRIM_SCAN: usize = 256;

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

/// Wall-clock times (unix ms) of a PG's last scrub and deep scrub on this OSD.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
struct ScrubStamps {
    shallow_ms: u64,
    deep_ms: u64,
}

/// The removed snapshots of a PG's pool whose clones this OSD, as primary, has trimmed.
fn snap_trimmed_key(pg: PgId) -> Vec<u8> {
    format!("snap_trimmed.{pg}").into_bytes()
}

fn scrub_stamps_key(pg: PgId) -> Vec<u8> {
    format!("scrub_stamps.{pg}").into_bytes()
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

/// How ops on one object are ordered on this OSD.
///
/// A write holds `order` exclusively from its execution until its transaction is applied
/// locally (visible, not yet durable) and handed to the replicas; then the next write to the
/// object may execute on top of it while the first one's fsyncs and replica acks are still
/// pending. So sequential writes to one object overlap instead of running one at a time end
/// to end. Replicas apply them in the same order: each sub-op names the write to its object
/// still in flight before it (`after_seq`), and a replica applies it only once that one's log
/// entry is there.
///
/// Reads share `order` and wait until no write to the object is in flight: nobody sees a
/// write that could still be lost. A resent write whose first attempt is still in flight
/// waits the same way before it answers from the dup record.
struct ObjectSlot {
    order: Arc<tokio::sync::RwLock<()>>,
    /// Log seqs of writes applied on this OSD and not yet durable on every member.
    in_flight: watch::Sender<BTreeSet<u64>>,
}

impl ObjectSlot {
    fn new() -> Self {
        ObjectSlot {
            order: Arc::default(),
            in_flight: watch::channel(BTreeSet::new()).0,
        }
    }

    /// Marks write `seq` in flight; returns the newest write still in flight before it.
    fn begin(self: &Arc<Self>, seq: u64) -> (Option<u64>, InFlight) {
        let mut before = None;
        self.in_flight.send_modify(|s| {
            before = s.last().copied();
            s.insert(seq);
        });
        (
            before,
            InFlight {
                slot: self.clone(),
                seq,
            },
        )
    }

    async fn drained(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(BTreeSet::is_empty).await;
    }
}

/// A write in flight on its object; dropping it (done, failed or abandoned) ends that.
struct InFlight {
    slot: Arc<ObjectSlot>,
    seq: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.in_flight.send_modify(|s| {
            s.remove(&self.seq);
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct WatchEntry {
    client: String,
    cookie: u64,
    events: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

struct PendingNotify {
    waiting: BTreeSet<(String, u64)>,
    acks: Vec<(WatcherInfo, Bytes)>,
    done: Option<oneshot::Sender<()>>,
}

type WatchKey = (PgId, String, String);

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

/// A gRPC client for another OSD with the data path's message limits, dialed through
/// `connector`, authenticated with `ticket` (this OSD's own `osd` ticket).
pub fn osd_client(
    addr: &str,
    connector: &basalt_tls::Connector,
    ticket: Arc<TicketCell>,
) -> Result<OsdClient<AuthChannel>, OpError> {
    let channel = basalt_monclient::lazy_channel(addr, connector, Duration::from_secs(2))
        .map_err(|e| OpError::Io(format!("OSD: {e}")))?;
    Ok(
        OsdClient::new(basalt_proto::auth::authorized(channel, ticket))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
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

    /// Refuses an op that found its PG under an older map when the current map puts its
    /// object in another PG (a split moved it into a child): `NotPrimary` makes the client
    /// wait for this map and send the op to the object's PG.
    fn check_still_maps(&self, pg: &Pg, namespace: &str, name: &str) -> Result<(), OpError> {
        let Some(map) = self.current_map() else {
            return Ok(());
        };
        let Some(pool) = map.pools.get(&pg.id.pool) else {
            return Err(OpError::NoSuchPool(pg.id.pool));
        };
        if object_to_pg_ns(&pool.placement(), namespace, name) != pg.id {
            return Err(OpError::NotPrimary {
                pg: pg.id.to_string(),
                epoch: map.epoch,
            });
        }
        Ok(())
    }

    /// Takes `pg`'s gate shared (as writes do) for reading its objects, and checks that the
    /// PG is still in interval `generation` and still holds `object` (a name; None for a
    /// listing, checked by the caller): a split or peering of the PG either finished before
    /// (the generation changed) or waits until the read is done.
    async fn read_gate<'a>(
        &self,
        pg: &'a Pg,
        generation: u64,
        object: Option<(&str, &str)>,
    ) -> Result<tokio::sync::RwLockReadGuard<'a, ()>, OpError> {
        let gate = pg.gate.read().await;
        let (g, _, epoch) = pg.snapshot();
        if g != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch,
            });
        }
        if let Some((namespace, name)) = object {
            self.check_still_maps(pg, namespace, name)?;
        }
        Ok(gate)
    }

    /// `osd`'s address in the current map.
    fn peer_addr(&self, osd: OsdId) -> Result<String, OpError> {
        let map = self
            .current_map()
            .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?;
        map.osds
            .get(&osd)
            .map(|info| info.addr.clone())
            .ok_or_else(|| OpError::Io(format!("osd.{osd} is not in the map")))
    }

    /// This OSD's ticket for other OSDs (empty until the daemon has its monitor client).
    pub fn osd_ticket(&self) -> Arc<TicketCell> {
        self.mon
            .get()
            .map(MonClient::osd_ticket)
            .unwrap_or_default()
    }

    fn peer_client(&self, osd: OsdId) -> Result<OsdClient<AuthChannel>, OpError> {
        let addr = self.peer_addr(osd)?;
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(&addr) {
            return Ok(c.clone());
        }
        let c = osd_client(&addr, &self.connector, self.osd_ticket())?;
        peers.insert(addr, c.clone());
        Ok(c)
    }

    /// The data-path connection to `osd` (at its address in the current map).
    fn peer_messenger(&self, osd: OsdId) -> Result<Arc<Peer>, OpError> {
        let addr = self.peer_addr(osd)?;
        let ticket = self.osd_ticket();
        let mut peers = lock(&self.messengers);
        let peer = peers.entry(addr).or_insert_with_key(|addr| {
            Arc::new(Peer::new(
                addr,
                self.connector.clone(),
                Duration::from_secs(2),
                MAX_MESSAGE_BYTES,
                ticket,
            ))
        });
        Ok(peer.clone())
    }

    /// Finds the PG `object` maps to and checks that this OSD is its primary, waiting first
    /// for the client's map and refusing blocklisted clients.
    async fn primary_pg(
        &self,
        epoch: Epoch,
        pool: u32,
        seed: u32,
        namespace: &str,
        name: Option<&str>,
        client: &str,
    ) -> Result<(Arc<OsdMap>, Arc<Pg>), OpError> {
        let map = self.map_at_least(epoch).await?;
        let Some(p) = map.pools.get(&pool) else {
            return Err(OpError::NoSuchPool(pool));
        };
        if map.is_blocklisted(client, now_ms()) {
            return Err(OpError::Blocklisted(client.to_string()));
        }
        let id = match name {
            Some(n) => object_to_pg_ns(&p.placement(), namespace, n),
            None if seed < p.pg_num => PgId { pool, seed },
            None => {
                return Err(OpError::InvalidArgument(format!(
                    "pool {pool} has {} PGs, not {seed}",
                    p.pg_num
                )))
            }
        };
        let not_primary = || OpError::NotPrimary {
            pg: id.to_string(),
            epoch: map.epoch,
        };
        if id.seed != seed {
            return Err(not_primary());
        }
        let pg = self.pg(id).ok_or_else(not_primary)?;
        if lock(&pg.state).primary != self.me() {
            return Err(not_primary());
        }
        Ok((map, pg))
    }

    /// Waits until `pg` is active (bounded by `deadline`); returns its generation.
    async fn wait_active(&self, pg: &Pg, deadline: Instant) -> Result<u64, OpError> {
        let mut rx = pg.changed.subscribe();
        let start_generation = lock(&pg.state).generation;
        let started = Instant::now();
        loop {
            let (generation, status, epoch) = pg.snapshot();
            if generation != start_generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch,
                });
            }
            match status {
                PgStatus::Active => return Ok(generation),
                PgStatus::Peering
                | PgStatus::Recovering
                | PgStatus::Backfilling
                | PgStatus::BackfillToofull(_)
                | PgStatus::Down(_)
                | PgStatus::Incomplete(_)
                | PgStatus::Inactive(_) => {}
                PgStatus::Replica | PgStatus::Stray => {
                    return Err(OpError::NotPrimary {
                        pg: pg.id.to_string(),
                        epoch,
                    })
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(OpError::Inactive {
                    pg: pg.id.to_string(),
                    state: status.name(),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
        }
    }

    /// A client's compound request (`ops`, decoded from `req.ops`) on one object.
    pub async fn handle_op(
        self: &Arc<Self>,
        req: pb::OpRequest,
        ops: Vec<ObjOp>,
    ) -> Result<OpResult, OpError> {
        let received = std::time::Instant::now();
        let reqid = req
            .reqid
            .as_ref()
            .map(|r| ReqId {
                client: r.client.clone(),
                incarnation: r.incarnation,
                tid: r.tid,
            })
            .ok_or_else(|| OpError::InvalidArgument("request id missing".into()))?;
        if ops.is_empty() || ops.len() > MAX_OPS_PER_REQUEST {
            return Err(OpError::InvalidArgument(format!(
                "a request carries 1..={MAX_OPS_PER_REQUEST} ops, not {}",
                ops.len()
            )));
        }
        for op in &ops {
            op.validate()?;
        }
        let mut req = req;
        if let Some(map) = self.current_map() {
            if let Some(pool) = map.pools.get(&req.pool) {
                // A writer that has not yet heard of a snapshot's removal would otherwise
                // make a clone for it that nothing trims (Ceph filters the same way).
                req.snaps.retain(|s| !pool.removed_snaps.contains(s));
                if let Some(ObjOp::TrimSnaps { removed }) =
                    ops.iter().find(|op| matches!(op, ObjOp::TrimSnaps { .. }))
                {
                    if let Some(s) = removed.iter().find(|s| !pool.removed_snaps.contains(s)) {
                        return Err(OpError::InvalidArgument(format!(
                            "snapshot {s} of pool {} is not removed; only removed snapshots \
                             are trimmed",
                            pool.name
                        )));
                    }
                }
            }
        }
        if req.object.is_empty() {
            return Err(OpError::InvalidArgument("empty object name".into()));
        }
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        // The client instance (name/nonce): what the blocklist fences and locks record.
        let instance = format!("{}/{}", reqid.client, reqid.incarnation);
        let (_, pg) = self
            .primary_pg(
                req.epoch,
                req.pool,
                req.pg_seed,
                &req.namespace,
                Some(&req.object),
                &instance,
            )
            .await?;
        self.wait_active(&pg, deadline).await?;
        let name: ObjectName = (req.namespace.clone(), req.object.clone());
        let is_write = ops.iter().any(ObjOp::is_write);
        let slot = pg.object_slot(&name);
        let (shared, exclusive) = if is_write {
            (None, Some(slot.order.clone().write_owned().await))
        } else {
            let shared = slot.order.clone().read_owned().await;
            slot.drained().await;
            (Some(shared), None)
        };
        // The interval may have changed while we queued behind another op.
        let generation = self.wait_active(&pg, deadline).await?;
        let gate = self
            .read_gate(&pg, generation, Some((&req.namespace, &req.object)))
            .await?;
        // The epoch barrier, checked again now that this op holds its object: the check above
        // may have used a map older than the blocklist, and while this op queued, the lock
        // breaker's ops (which carry the blocklist's epoch, so this OSD waited for that map
        // before taking them) may have touched the object first. Whatever ran on the object
        // before this point ran with this OSD's map at least that new, so a fenced client's
        // op that gets here after any of them is refused; one that got here before them is
        // ordered before the break, as if it had landed before the blocklist.
        if self
            .current_map()
            .is_some_and(|m| m.is_blocklisted(&instance, now_ms()))
        {
            return Err(OpError::Blocklisted(instance));
        }
        stage("queue", received);
        let obj = ObjectId::with_namespace(pg.id, req.namespace.clone(), req.object.clone());
        let watchers = self.watchers_of(&(pg.id, req.namespace.clone(), req.object.clone()));
        let client = instance.clone();
        let dup_key = is_write.then(|| reqid.key());
        let ops2 = ops.clone();
        let obj2 = obj.clone();
        let snap = pg::SnapArgs {
            snapc: basalt_ops::SnapContext {
                seq: req.snap_seq,
                snaps: req.snaps.clone(),
            },
            read_snap: req.read_snap,
        };
        let snap2 = snap.clone();
        // The dup check and the execution share one trip to a blocking thread.
        let executed = self
            .on_store(move |store| {
                if let Some(key) = dup_key {
                    let started = std::time::Instant::now();
                    let dup = store.dup_lookup(obj2.pg(), &key).map_err(pg::store_error)?;
                    stage("dup_check", started);
                    if let Some((_, result)) = dup {
                        return Ok(Err(result));
                    }
                }
                let started = std::time::Instant::now();
                let ex = pg::execute(store, &obj2, &client, &ops2, &snap2, &|| watchers.clone());
                stage("execute", started);
                ex.map(Ok)
            })
            .await;
        // The write takes the gate again itself (and checks the interval once more).
        drop(gate);
        let ex = match executed {
            Ok(Ok(ex)) => ex,
            Ok(Err(recorded)) => {
                // The first attempt may still be in flight: answer once it is done, and only
                // if it stayed in this interval (otherwise peering decides its fate).
                slot.drained().await;
                self.wait_active(&pg, deadline).await?;
                if lock(&pg.state).generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: pg.snapshot().2,
                    });
                }
                metrics::counter!("basalt_osd_dup_replies_total").increment(1);
                return decode::<Result<OpResult, OpError>>(&recorded, "recorded result")?;
            }
            Err(OpError::Corrupt(what)) if !is_write => {
                // Never return corrupt bytes: repair from a replica, then read again.
                self.repair_object(&pg, generation, &obj, &what).await?;
                let client = instance.clone();
                let watchers = self.watchers_of(&(pg.id, req.namespace.clone(), req.object));
                let obj2 = obj.clone();
                let ops = ops.clone();
                self.on_store(move |store| {
                    pg::execute(store, &obj2, &client, &ops, &snap, &|| watchers.clone())
                })
                .await?
            }
            Err(e) => return Err(e),
        };
        if !ex.is_write {
            drop(shared);
            return Ok(OpResult {
                version: ex.version_before,
                outputs: ex.outputs,
            });
        }
        // A full pool refuses a new write here: after the dup lookup (a resend of a write
        // that was applied before the pool filled gets its recorded result, never a failure
        // for something visible) and before a version is assigned or anything replicated, so
        // the refused write leaves no trace. A write that got past this point is completed
        // whatever the fullness (see `write`).
        // The verdict first: it is cheap, and most requests may run on a full pool or not,
        // so the OSD fullness is looked up only for one that a full pool would refuse.
        if let (Err(why), Some(map)) = (
            pg::full_verdict(&ops, req.full_try, ex.created),
            self.current_map(),
        ) {
            let mut full = map.full_osds_of_pool(pg.id.pool);
            // This primary's own fullness counts at once, before its beacon has made it into
            // the map (Ceph's OSD-side full check): a fast writer would otherwise fill the
            // disk to its hard limit in the beacon interval, where an admitted write waits.
            let own_full = self
                .own_usage()
                .is_some_and(|u| map.full_ratios.classify(&u) == Fullness::Full);
            if let Some(me) = self.me().filter(|me| own_full && !full.contains(me)) {
                full.push(me);
            }
            if !full.is_empty() {
                metrics::counter!("basalt_osd_full_refusals_total").increment(1);
                let pool = map
                    .pools
                    .get(&pg.id.pool)
                    .map_or_else(|| pg.id.pool.to_string(), |p| p.name.clone());
                let osds: Vec<String> = full.iter().map(|o| format!("osd.{o}")).collect();
                tracing::debug!(pg = %pg.id, object = %name.1, why, "pool full: write refused");
                return Err(OpError::PoolFull {
                    pool,
                    osds: osds.join(", "),
                });
            }
        }
        let Some(order) = exclusive else {
            return Err(OpError::Io("write without its object's order lock".into()));
        };
        // Its own task: once a version is assigned, nothing may stop the write half-way (a
        // client hanging up drops this future) and leave replicas waiting for it.
        let core = self.clone();
        let write = Write {
            pg,
            generation,
            slot,
            order,
            name,
            obj,
            ex,
            reqid,
        };
        tokio::spawn(async move { core.write(write).await })
            .await
            .map_err(|e| OpError::Io(format!("write task failed: {e}")))?
    }

    /// Versions, logs and replicates an executed write; returns once every member has it
    /// durably. Releases the object's order lock as soon as the write is applied locally and
    /// on its way to the replicas (see [`ObjectSlot`]).
    ///
    /// A member that refuses the write for lack of space (`NoSpace`) is retried until it takes
    /// it, or until the interval changes; the client sees a pause, never that error. Why retry
    /// rather than fail the op or drop the member: once the sub-ops are out, the write is in
    /// the PG's history on the members that took it, and peering would make it the
    /// authority's, so an error to the client would be a lie (failed, yet visible). Taking the
    /// full replica out instead would need a map change per full disk (there is no `pg_temp`)
    /// and leave the PG running degraded on a disk problem an operator fixes by freeing
    /// space: removals always pass the store's capacity check, so deleting objects (or
    /// raising `--capacity-bytes`, or marking the OSD out) lets the waiting write complete.
    async fn write(self: Arc<Self>, w: Write) -> Result<OpResult, OpError> {
        let Write {
            pg,
            generation,
            slot,
            order,
            name,
            obj,
            mut ex,
            reqid,
        } = w;
        let _write = pg.gate.read().await;
        // A replica still recovering this object gets it first, so the write applies to the
        // same state on every member.
        if self.recover_object(&pg, generation, &name, &[]).await? > 0 {
            metrics::counter!("basalt_osd_recovered_on_write_total").increment(1);
        }
        // Version assignment and the generation check happen together, so a write is never
        // numbered in one interval and replicated in the next.
        let (version, replicas, interval_epoch) = {
            let mut s = lock(&pg.state);
            if s.generation != generation || s.status != PgStatus::Active {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let v = Eversion {
                epoch: s.interval_epoch,
                seq: s.next_seq,
            };
            s.next_seq += 1;
            let me = self.me();
            let key = pg::listing_key(pg.id, &name);
            let acting = s.acting.clone();
            // A backfill target whose backfill has not reached this object gets only the
            // write's log entry, and the object is noted so the backfill copies it when it
            // gets there. Why skip it rather than recover the object to it first (as a
            // log-recovering replica's missing object is): the target lacks most objects,
            // and a VM's 4 KiB write would then wait for a whole 4 MiB object to be pushed;
            // the backfill copies the object once either way.
            let replicas: Vec<(OsdId, bool)> = acting
                .into_iter()
                .filter(|o| Some(*o) != me)
                .map(|o| match s.backfill.get_mut(&o) {
                    Some(b) if !b.reach.covers(&key) => {
                        b.skipped.insert(key.clone());
                        (o, false)
                    }
                    _ => (o, true),
                })
                .collect();
            (v, replicas, s.interval_epoch)
        };
        let (after_seq, _in_flight) = slot.begin(version.seq);
        let result = OpResult {
            version,
            outputs: std::mem::take(&mut ex.outputs),
        };
        let recorded = encode(&Ok::<_, OpError>(result.clone()));
        let mut txn = std::mem::take(&mut ex.txn);
        pg::finish_write(
            &mut txn,
            &obj,
            ex.stored_after,
            ex.removed,
            version,
            &reqid,
            recorded,
            now_ns(),
            self.tuning.pg_log_entries,
        );
        let sub_op = SubOp {
            header: self.peer_header(pg.id, interval_epoch),
            version,
            reqid,
            object: name.clone(),
            after_seq,
            txn,
        };
        // Encoded once: every replica and every retry gets the same bytes. A backfill target
        // this write skips gets the same envelope with only the write's log entry.
        let sub_op_bytes = Bytes::from(sub_op.to_pb().encode_to_vec());
        let log_only_bytes = replicas.iter().any(|(_, full)| !full).then(|| {
            let log_only = SubOp {
                header: sub_op.header,
                version,
                reqid: sub_op.reqid.clone(),
                object: sub_op.object.clone(),
                after_seq,
                txn: sub_op.txn.log_only(),
            };
            Bytes::from(log_only.to_pb().encode_to_vec())
        });
        let txn = sub_op.txn;
        let committed = std::time::Instant::now();
        let mut tasks = Vec::with_capacity(replicas.len());
        for (osd, full) in replicas {
            let core = self.clone();
            let pg = pg.clone();
            let request = match (&log_only_bytes, full) {
                (Some(log_only), false) => log_only.clone(),
                _ => sub_op_bytes.clone(),
            };
            tasks.push(tokio::spawn(async move {
                core.sub_op_until_done(&pg, generation, osd, request).await
            }));
        }
        let started = std::time::Instant::now();
        let local = self.apply_until_room(&pg, generation, txn).await;
        stage("local_apply", started);
        drop(order);
        let local = match local {
            Ok(durable) => {
                let started = std::time::Instant::now();
                // Woken by the syncer thread itself: no blocking thread waits for the sync.
                let r = durable.done().await.map_err(pg::store_error);
                stage("local_sync", started);
                r
            }
            Err(e) => Err(e),
        };
        metrics::histogram!("basalt_osd_commit_seconds").record(committed.elapsed().as_secs_f64());
        let after_local = std::time::Instant::now();
        let mut first_err = local.as_ref().err().cloned();
        for t in tasks {
            let r = t
                .await
                .unwrap_or_else(|e| Err(OpError::Io(format!("replication task failed: {e}"))));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        stage("replica_wait", after_local);
        if let Err(e) = local {
            if let OpError::IntervalChanged { .. } = e {
                return Err(e);
            }
            // Replicas may hold a write the primary could not commit: re-peer so the PG
            // converges on one copy before it serves again.
            tracing::error!(pg = %pg.id, error = %e, "local commit failed; re-peering");
            self.restart_peering(&pg, generation);
            return Err(OpError::Io(format!(
                "write failed on the primary ({e}); it may or may not have been applied"
            )));
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(result),
        }
    }

    fn restart_peering(self: &Arc<Self>, pg: &Arc<Pg>, generation: u64) {
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return;
        }
        s.generation += 1;
        s.status = PgStatus::Peering;
        let g = s.generation;
        drop(s);
        pg.bump();
        let core = self.clone();
        let pg = pg.clone();
        tokio::spawn(async move { core.peer(pg, g).await });
    }

    /// Applies a write's transaction to the local store (the primary's half of `write`),
    /// retrying while the store refuses it for lack of space: its sub-ops are already on their
    /// way, so a replica may hold it, and it must not be reported failed (see `write`). Returns
    /// the durability ticket; `IntervalChanged` if the PG's interval changes meanwhile (the
    /// client resends, and peering settles the write's fate on every member alike).
    async fn apply_until_room(
        &self,
        pg: &Pg,
        generation: u64,
        txn: Transaction,
    ) -> Result<crate::store::Durable, OpError> {
        let txn = Arc::new(txn);
        let mut warned = false;
        loop {
            let t = txn.clone();
            match self
                .on_store(move |store| store.apply_blocking(&t).map_err(pg::store_error))
                .await
            {
                Err(OpError::NoSpace(m)) => {
                    metrics::counter!("basalt_osd_write_no_space_retries_total", "where" => "local")
                        .increment(1);
                    if !warned {
                        warned = true;
                        tracing::warn!(pg = %pg.id, reason = %m,
                            "no room for a write already sent to the replicas; retrying until there is");
                    }
                }
                other => return other,
            }
            pg.pause_before_retry(generation).await?;
        }
    }

    async fn sub_op_until_done(
        &self,
        pg: &Pg,
        generation: u64,
        osd: OsdId,
        request: Bytes,
    ) -> Result<(), OpError> {
        let mut warned_full = false;
        let mut warned_refused = false;
        loop {
            let (g, _, epoch) = pg.snapshot();
            if g != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch,
                });
            }
            let attempt = async {
                let peer = self.peer_messenger(osd)?;
                let reply = peer
                    .call(data_path::SUB_OP, request.clone())
                    .await
                    .map_err(|e| OpError::Io(format!("osd.{osd}: {e}")))?;
                let reply = pb::SubOpReply::decode(reply).map_err(|e| {
                    OpError::Io(format!("osd.{osd}: undecodable sub-op reply: {e}"))
                })?;
                decode::<Result<(), OpError>>(&reply.result, "sub-op reply")?
            };
            // A frozen replica never answers; once the monitors mark it down the interval
            // changes, and the client's resend should not wait out the RPC timeout.
            let answer = tokio::select! {
                a = tokio::time::timeout(PEER_RPC_TIMEOUT, attempt) => a,
                () = pg.left_generation(generation) => continue,
            };
            match answer {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(OpError::NoSpace(m))) => {
                    // The primary has committed this write, so failing it would leave it
                    // visible yet reported failed: wait for room instead (see `write`).
                    metrics::counter!("basalt_osd_write_no_space_retries_total", "where" => "replica")
                        .increment(1);
                    if !warned_full {
                        warned_full = true;
                        tracing::warn!(pg = %pg.id, osd, reason = %m,
                            "replica has no room for a committed write; retrying until it has");
                    }
                }
                Ok(Err(e @ OpError::BadPeerMessage(_))) => {
                    // Another release on the replica, or a bug: retrying sends the same bytes,
                    // so only an interval change (the replica restarted or was replaced) ends it.
                    if !warned_refused {
                        warned_refused = true;
                        tracing::error!(pg = %pg.id, osd, error = %e,
                            "replica refused the sub-op's envelope; retrying until the interval changes");
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(pg = %pg.id, osd, error = %e, "sub-op failed; retrying")
                }
                Err(_) => tracing::debug!(pg = %pg.id, osd, "sub-op timed out; retrying"),
            }
            let mut rx = pg.changed.subscribe();
            let _ = tokio::time::timeout(RETRY_PAUSE, rx.changed()).await;
        }
    }

    /// Replaces a corrupt local copy of `obj` with a replica's good one.
    async fn repair_object(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        obj: &ObjectId,
        what: &str,
    ) -> Result<(), OpError> {
        tracing::warn!(pg = %pg.id, object = %obj, error = what, "corrupt local copy; repairing from a replica");
        metrics::counter!("basalt_osd_read_repairs_total").increment(1);
        let name: ObjectName = (obj.namespace().to_string(), obj.name().to_string());
        let (replicas, interval_epoch) = {
            let s = lock(&pg.state);
            let me = self.me();
            // A replica still recovering this object holds a stale copy or none.
            let r: Vec<OsdId> = s
                .acting
                .iter()
                .copied()
                .filter(|o| Some(*o) != me)
                .filter(|o| !s.missing.get(o).is_some_and(|m| m.contains(&name)))
                .filter(|o| !s.backfill.contains_key(o))
                .collect();
            (r, s.interval_epoch)
        };
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        for osd in replicas {
            if lock(&pg.state).generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: interval_epoch,
                });
            }
            // The same copy-over as scrub repair, with this OSD as the bad member; a replica
            // whose own copy fails its checksum cannot supply one, so try the next.
            let inc = pg::Inconsistency {
                namespace: obj.namespace().to_string(),
                name: obj.name().to_string(),
                bad: vec![me],
                good: Some(osd),
                why: what.to_string(),
            };
            if let Ok(true) = self.repair_copies(pg, &inc).await {
                return Ok(());
            }
        }
        Err(OpError::Corrupt(format!(
            "{obj}: {what}; no replica could supply a good copy"
        )))
    }

    /// Sends a peering RPC to `osd` with the peer timeout and decodes its postcard result.
    async fn peer_rpc<T, F, Fut>(&self, osd: OsdId, what: &str, call: F) -> Result<T, OpError>
    where
        T: for<'de> serde::Deserialize<'de>,
        F: FnOnce(OsdClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Bytes>, Status>>,
    {
        let c = self.peer_client(osd)?;
        let reply = tokio::time::timeout(PEER_RPC_TIMEOUT, call(c))
            .await
            .map_err(|_| OpError::Io(format!("osd.{osd} did not answer a {what}")))?
            .map_err(|s| OpError::Io(format!("osd.{osd}: {}", s.message())))?;
        decode::<Result<T, OpError>>(reply.get_ref(), what)?
    }

    async fn query(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
    ) -> Result<PeerState, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if osd == me {
            return self.on_store(move |store| pg::peer_state(store, id)).await;
        }
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(osd, "query", |mut c| async move {
            let r = c.pg_query(pb::PgQueryRequest { header }).await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// One object as `source` holds it (None: it does not exist there).
    async fn fetch(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        source: OsdId,
        name: &ObjectName,
    ) -> Result<Option<pg::ObjectState>, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if source == me {
            let obj = ObjectId::with_namespace(id, name.0.clone(), name.1.clone());
            return self
                .on_store(move |store| pg::object_if_present(store, &obj))
                .await;
        }
        // One object per pull: sizes are unknown here and one object may be as large as the
        // message limit allows.
        let objects = encode(&vec![name.clone()]);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        let mut got: Vec<Option<pg::ObjectState>> = self
            .peer_rpc(source, "pull", |mut c| async move {
                let r = c.pg_pull(pb::PgPullRequest { header, objects }).await?;
                Ok(Response::new(r.into_inner().result))
            })
            .await?;
        got.pop()
            .ok_or_else(|| OpError::Io(format!("osd.{source} answered a pull with nothing")))
    }

    /// Applies `push` to `target`'s copy of the PG.
    async fn deliver(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        target: OsdId,
        push: &Push,
    ) -> Result<(), OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if target == me {
            let txn = pg::apply_push(&self.store, id, self.pg_num_of(id.pool), push)?;
            return self.store.submit(txn).await.map_err(pg::store_error);
        }
        let push = encode(push);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(target, "push", |mut c| async move {
            let r = c.pg_push(pb::PgPushRequest { header, push }).await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// One page of `osd`'s objects after `after`, in listing order (`pg::listing_key`).
    async fn scan(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
        after: Option<&ObjectName>,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let me = self.me().unwrap_or(u32::MAX);
        if osd == me {
            let after = after.cloned();
            return self
                .on_store(move |store| pg::scan_objects(store, id, after.as_ref(), BACKFILL_SCAN))
                .await;
        }
        let after = encode(&after);
        let header = Some(self.peer_header(id, interval_epoch).to_pb());
        self.peer_rpc(osd, "scan", |mut c| async move {
            let r = c
                .pg_scan(pb::PgScanRequest {
                    header,
                    after,
                    max: BACKFILL_SCAN as u32,
                })
                .await?;
            Ok(Response::new(r.into_inner().result))
        })
        .await
    }

    /// Copies `names` from `source` to `target` in pushes of at most RECOVERY_BATCH_BYTES
    /// (objects `source` lacks are removed). The first push also removes `remove`; every
    /// push carries `info`, except that the last carries `last` (log and info) when given.
    #[allow(clippy::too_many_arguments)]
    async fn transfer(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        source: OsdId,
        target: OsdId,
        names: &[ObjectName],
        remove: Vec<ObjectName>,
        info: Option<PgInfo>,
        last: Option<(Vec<basalt_ops::LogEntry>, PgInfo)>,
    ) -> Result<(), OpError> {
        let mut push = Push {
            remove,
            info: info.clone(),
            ..Push::default()
        };
        let mut bytes = 0u64;
        // Several objects are fetched at once (one pull is one object); they are applied in
        // order, in pushes of at most RECOVERY_BATCH_BYTES.
        let mut fetched = futures::stream::iter(0..names.len())
            .map(|i| self.fetch(id, interval_epoch, source, &names[i]))
            .buffered(RECOVERY_FETCHES_IN_FLIGHT)
            .enumerate();
        while let Some((i, state)) = fetched.next().await {
            let name = &names[i];
            match state? {
                Some(st) => {
                    bytes += st.data.len() as u64 + 1;
                    push.objects.push(st);
                }
                None => push.remove.push(name.clone()),
            }
            if bytes >= RECOVERY_BATCH_BYTES && i + 1 < names.len() {
                self.deliver(id, interval_epoch, target, &push).await?;
                self.recovery_sleep().await;
                metrics::counter!("basalt_osd_recovered_objects_total")
                    .increment(push.objects.len() as u64);
                push = Push {
                    info: info.clone(),
                    ..Push::default()
                };
                bytes = 0;
            }
        }
        if let Some((log, info)) = last {
            push.log = Some(log);
            push.info = Some(info);
        }
        metrics::counter!("basalt_osd_recovered_objects_total")
            .increment(push.objects.len() as u64);
        self.deliver(id, interval_epoch, target, &push).await
    }

    /// Makes `target`'s copy equal to `source`'s, which holds the authoritative state `auth`.
    #[allow(clippy::too_many_arguments)]
    async fn catch_up(
        &self,
        pg: &Pg,
        generation: u64,
        interval_epoch: Epoch,
        source: OsdId,
        target: OsdId,
        auth: &PeerState,
        target_state: &PeerState,
    ) -> Result<(), OpError> {
        let id = pg.id;
        // The target keeps its les until activation: a copy caught up but never activated
        // must not look newer than it is.
        let done = PgInfo {
            les: target_state.info.les,
            last_update_floor: auth.last_update,
            ..PgInfo::default()
        };
        match peering::catchup(auth, target_state) {
            Catchup::UpToDate => Ok(()),
            Catchup::Log { objects } => {
                self.set_status(pg, generation, PgStatus::Recovering);
                metrics::counter!("basalt_osd_recoveries_total", "kind" => "log").increment(1);
                tracing::info!(pg = %id, from = source, to = target, objects = objects.len(), "log-based recovery");
                self.transfer(
                    id,
                    interval_epoch,
                    source,
                    target,
                    &objects,
                    vec![],
                    None,
                    Some((auth.log.clone(), done)),
                )
                .await
            }
            Catchup::Backfill { mut after } => {
                self.set_status(pg, generation, PgStatus::Backfilling);
                metrics::counter!("basalt_osd_recoveries_total", "kind" => "backfill").increment(1);
                tracing::info!(pg = %id, from = source, to = target, resume_after = ?after, "backfill");
                loop {
                    // A target that filled up mid-backfill gets nothing more until it has room.
                    if !self.wait_backfill_room(pg, generation, &[target]).await {
                        return Err(OpError::IntervalChanged {
                            pg: id.to_string(),
                            epoch: interval_epoch,
                        });
                    }
                    self.set_status(pg, generation, PgStatus::Backfilling);
                    let wanted = self
                        .scan(id, interval_epoch, source, after.as_ref())
                        .await?;
                    // This range ends at the last object of the page, or covers the rest
                    // of the name space when the page is the last.
                    let end = (wanted.len() >= BACKFILL_SCAN)
                        .then(|| wanted.last().map(|(n, _)| n.clone()))
                        .flatten();
                    let have = self
                        .scan_range(id, interval_epoch, target, after.as_ref(), end.as_ref())
                        .await?;
                    let (copy, remove) = peering::backfill_diff(&wanted, &have);
                    let progress = |through: Option<ObjectName>| PgInfo {
                        les: target_state.info.les,
                        backfill: Some(BackfillProgress {
                            target: auth.last_update,
                            done_through: through,
                        }),
                        missing: vec![],
                        last_update_floor: target_state.info.last_update_floor,
                    };
                    let last = match &end {
                        Some(e) => (target_state.log.clone(), progress(Some(e.clone()))),
                        None => (auth.log.clone(), done.clone()),
                    };
                    self.transfer(
                        id,
                        interval_epoch,
                        source,
                        target,
                        &copy,
                        remove,
                        Some(progress(after.clone())),
                        Some(last),
                    )
                    .await?;
                    match end {
                        Some(e) => after = Some(e),
                        None => return Ok(()),
                    }
                }
            }
        }
    }

    /// Which of `targets` are at or past the backfillfull ratio in this OSD's map, described
    /// for `pg ls` (None: all have room).
    fn toofull(&self, targets: &[OsdId]) -> Option<String> {
        let map = self.current_map()?;
        let full: Vec<String> = targets
            .iter()
            .filter(|o| map.fullness(**o) >= Fullness::Backfillfull)
            .map(|o| {
                let pct = map
                    .osds
                    .get(o)
                    .and_then(|i| i.usage)
                    .map(|u| u.percent_str());
                format!(
                    "osd.{o} is {} at {} (backfillfull_ratio {})",
                    map.fullness(*o).name(),
                    pct.unwrap_or_default(),
                    basalt_maps::ratio_str(map.full_ratios.backfillfull)
                )
            })
            .collect();
        (!full.is_empty()).then(|| full.join(", "))
    }

    /// Resolves when this OSD has a map newer than `epoch`, or after a second (a bounded
    /// wait the callers repeat).
    async fn next_map_or_timeout(&self, epoch: Epoch) {
        let mut rx = self.map_tx.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch > epoch)),
        )
        .await;
    }

    /// Waits while any of `targets` is backfillfull, showing `backfill_toofull`; re-checked
    /// at every new map. False when the interval ended meanwhile.
    async fn wait_backfill_room(&self, pg: &Pg, generation: u64, targets: &[OsdId]) -> bool {
        loop {
            if lock(&pg.state).generation != generation {
                return false;
            }
            let epoch = self.current_map().map_or(0, |m| m.epoch);
            let Some(why) = self.toofull(targets) else {
                return true;
            };
            if !matches!(lock(&pg.state).status, PgStatus::BackfillToofull(_)) {
                tracing::warn!(pg = %pg.id, "backfill_toofull: {why}");
            }
            self.set_status(pg, generation, PgStatus::BackfillToofull(why));
            tokio::select! {
                () = self.next_map_or_timeout(epoch) => {}
                () = pg.left_generation(generation) => return false,
            }
        }
    }

    /// The configured pause between recovery pushes (`[osd] recovery_sleep_ms`).
    async fn recovery_sleep(&self) {
        if self.tuning.recovery_sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.tuning.recovery_sleep_ms)).await;
        }
    }

    fn set_status(&self, pg: &Pg, generation: u64, status: PgStatus) {
        let mut s = lock(&pg.state);
        if s.generation == generation && s.status != status {
            s.status = status;
            drop(s);
            pg.bump();
        }
    }

    /// Peering for an interval in which this OSD is primary: repeat until the PG is active
    /// or the interval is over. A PG that is down or incomplete keeps re-checking, since
    /// the member it waits for may come back without changing the acting set.
    async fn peer(self: Arc<Self>, pg: Arc<Pg>, generation: u64) {
        loop {
            let pause = match self.peer_once(&pg, generation).await {
                Ok(true) => return,
                Ok(false) => Duration::from_secs(2),
                Err(e) => {
                    if lock(&pg.state).generation != generation {
                        return;
                    }
                    tracing::info!(pg = %pg.id, error = %e, "peering round failed; retrying");
                    Duration::from_millis(500)
                }
            };
            let mut rx = pg.changed.subscribe();
            let _ = tokio::time::timeout(pause, rx.changed()).await;
            if lock(&pg.state).generation != generation {
                return;
            }
        }
    }

    /// One peering round: `Ok(true)` once the PG is active or only a new map can change its
    /// fate (a newer interval began, or too few members to serve); `Ok(false)` when it must
    /// wait (down, incomplete).
    ///
    /// The driver of [`peering::PeeringRound`]: it gathers the round's setup from the PG and
    /// the map, carries out each action (queries and activation pushes concurrently) and
    /// feeds the results back, until the round finishes or the interval ends.
    async fn peer_once(self: &Arc<Self>, pg: &Arc<Pg>, generation: u64) -> Result<bool, OpError> {
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let (acting, interval_epoch, min_size) = {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Ok(true);
            }
            // A re-peering in the same interval (`restart_peering`) starts over.
            s.missing.clear();
            s.backfill.clear();
            s.backfill_toofull = None;
            (s.acting.clone(), s.interval_epoch, s.min_size as usize)
        };
        let id = pg.id;
        let map = self
            .current_map()
            .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?;
        let activation = map.pg_activations.get(&id).cloned();
        let strays = activation
            .iter()
            .flat_map(|a| a.acting.iter().copied())
            .filter(|o| !acting.contains(o) && map.osds.get(o).is_some_and(|i| i.up))
            .collect();
        let setup = peering::RoundSetup {
            me,
            interval_epoch,
            acting,
            min_size,
            activation,
            strays,
            under_temp: map.pg_temp.contains_key(&id),
        };
        // In-flight writes of the previous interval finish (their replicas refuse them now)
        // before any member's state is read.
        let _quiesced = pg.gate.write().await;
        let (mut round, mut actions) = peering::PeeringRound::start(setup);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        // Held from AcquireRecoverySlot to ReleaseRecoverySlot (or the round's end).
        let mut recovery_slot = None;
        loop {
            for action in actions.drain(..) {
                use peering::RoundAction as A;
                use peering::RoundEvent as E;
                let core = self.clone();
                let pg2 = pg.clone();
                let io: Pin<Box<dyn std::future::Future<Output = Option<E>> + Send>> = match action
                {
                    A::Finish(outcome) => {
                        return self.round_finished(pg, generation, interval_epoch, outcome)
                    }
                    A::Query(osd) => Box::pin(async move {
                        let state = core.query(id, interval_epoch, osd).await;
                        Some(E::Queried { osd, state })
                    }),
                    A::RequestPgTemp(temp) => Box::pin(async move {
                        let r = core.request_pg_temp(id, temp.clone()).await;
                        match &r {
                            Ok(()) => {
                                metrics::counter!("basalt_osd_pg_temp_requests_total").increment(1);
                                tracing::info!(pg = %id, acting = ?temp, "pg_temp: a complete copy serves while this primary catches up");
                            }
                            Err(e) => {
                                tracing::warn!(pg = %id, error = %e, "no pg_temp; catching up before serving")
                            }
                        }
                        Some(E::PgTempSet(r))
                    }),
                    // None: the interval ended while it waited (the round is dropped below).
                    A::WaitBackfillRoom(targets) => Box::pin(async move {
                        core.wait_backfill_room(&pg2, generation, &targets)
                            .await
                            .then_some(E::BackfillRoom)
                    }),
                    A::AcquireRecoverySlot => {
                        let permit = self
                            .recovery_slots
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| OpError::Io("recovery throttle closed".into()))?;
                        recovery_slot.replace(permit);
                        Box::pin(async { Some(E::RecoverySlot) })
                    }
                    A::ReleaseRecoverySlot => {
                        recovery_slot.take();
                        continue;
                    }
                    A::CatchUp {
                        source,
                        target,
                        auth,
                        target_state,
                    } => Box::pin(async move {
                        let result = core
                            .catch_up(
                                &pg2,
                                generation,
                                interval_epoch,
                                source,
                                target,
                                &auth,
                                &target_state,
                            )
                            .await;
                        Some(E::CaughtUp {
                            osd: target,
                            result,
                        })
                    }),
                    A::Deliver { osd, info, log } => Box::pin(async move {
                        let push = Push {
                            log,
                            info: Some(info),
                            ..Push::default()
                        };
                        let result = core.deliver(id, interval_epoch, osd, &push).await;
                        Some(E::Delivered { osd, result })
                    }),
                    A::Record { missing, backfill } => Box::pin(async move {
                        if !core.note_healing(&pg2, generation, missing, backfill) {
                            return None;
                        }
                        Some(E::Recorded(
                            core.record_complete_members(&pg2, generation).await,
                        ))
                    }),
                };
                in_flight.push(io);
            }
            match in_flight.next().await {
                Some(Some(event)) => actions = round.handle(event),
                // The interval ended under the round: a new one peers afresh.
                Some(None) => return Ok(true),
                None => {
                    return Err(OpError::Io(format!(
                        "peering round of {id} waits for nothing (a bug): {round:?}"
                    )))
                }
            }
            if lock(&pg.state).generation != generation {
                return Ok(true);
            }
        }
    }

    /// Notes at activation what the PG still heals while it serves: the objects each
    /// log-recovering replica lacks, and each backfill target's reach. False when the
    /// interval is over.
    fn note_healing(
        &self,
        pg: &Pg,
        generation: u64,
        missing: BTreeMap<OsdId, BTreeSet<ObjectName>>,
        backfill: BTreeMap<OsdId, (Option<ObjectName>, Epoch)>,
    ) -> bool {
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return false;
        }
        s.missing = missing;
        s.backfill = backfill
            .into_iter()
            .map(|(osd, (after, les))| {
                let reach = match after {
                    Some(n) => peering::BackfillReach::Through(pg::listing_key(pg.id, &n)),
                    None => peering::BackfillReach::Nothing,
                };
                let b = ActiveBackfill {
                    reach,
                    skipped: BTreeSet::new(),
                    les,
                };
                (osd, b)
            })
            .collect();
        s.backfill_toofull = None;
        true
    }

    /// Applies a finished round to the PG: the answer of [`OsdCore::peer_once`].
    fn round_finished(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        epoch: Epoch,
        outcome: peering::RoundOutcome,
    ) -> Result<bool, OpError> {
        use peering::RoundOutcome as O;
        let id = pg.id;
        match outcome {
            O::Active {
                last_update,
                recover,
                backfill,
            } => {
                let mut s = lock(&pg.state);
                if s.generation != generation {
                    return Ok(true);
                }
                s.next_seq = last_update.seq + 1;
                s.activated_at = last_update;
                s.status = PgStatus::Active;
                let objects: usize = s.missing.values().map(BTreeSet::len).sum();
                drop(s);
                pg.bump();
                tracing::debug!(pg = %id, epoch, last_update = %last_update, "active");
                if !recover.is_empty() {
                    metrics::counter!("basalt_osd_recoveries_total", "kind" => "log")
                        .increment(recover.len() as u64);
                    tracing::info!(pg = %id, to = ?recover, objects, "log-based recovery while active");
                    let core = self.clone();
                    let pg = pg.clone();
                    tokio::spawn(async move {
                        core.recover_while_active(pg, generation, recover).await
                    });
                }
                if !backfill.is_empty() {
                    metrics::counter!("basalt_osd_recoveries_total", "kind" => "backfill")
                        .increment(backfill.len() as u64);
                    tracing::info!(pg = %id, to = ?backfill, "backfill while active");
                    let core = self.clone();
                    let pg = pg.clone();
                    tokio::spawn(async move {
                        core.backfill_while_active(pg, generation, backfill).await
                    });
                }
                Ok(true)
            }
            O::Undersized { acting, min_size } => {
                self.set_status(
                    pg,
                    generation,
                    PgStatus::Inactive(format!("undersized: {acting} acting, min_size {min_size}")),
                );
                Ok(true)
            }
            O::Blocked(blocked) => {
                let why = blocked.to_string();
                let status = match blocked {
                    peering::Blocked::Down { .. } => PgStatus::Down(why),
                    peering::Blocked::Incomplete { .. } => PgStatus::Incomplete(why),
                };
                if lock(&pg.state).status != status {
                    tracing::warn!(pg = %id, epoch, "{}", status.name());
                }
                self.set_status(pg, generation, status);
                Ok(false)
            }
            O::HandedOver(_) => Ok(true),
            // `peer` pauses and starts another round (or stops if the interval ended).
            O::Failed(e) => Err(e),
        }
    }

    /// Records the acting members that are complete now (see [`PgState::incomplete`]) as
    /// the PG's activation in its current interval.
    async fn record_complete_members(&self, pg: &Pg, generation: u64) -> Result<(), OpError> {
        let _one_at_a_time = pg.recording.lock().await;
        let (interval, members, all_complete) = {
            let s = lock(&pg.state);
            if s.generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let incomplete = s.incomplete();
            (
                s.interval_epoch,
                peering::complete_members(&s.acting, &incomplete),
                incomplete.is_empty(),
            )
        };
        self.record_activation(pg.id, interval, members).await?;
        // Every member is complete, the CRUSH primary too: a temporary acting set has done
        // its job, and the PG goes back to CRUSH's (whose primary then peers with nothing
        // left to copy).
        let temp = self
            .current_map()
            .is_some_and(|m| m.pg_temp.contains_key(&pg.id));
        if all_complete && temp {
            self.request_pg_temp(pg.id, vec![]).await?;
            tracing::info!(pg = %pg.id, "pg_temp removed: every member is complete");
        }
        Ok(())
    }

    /// Asks the monitors for `acting` as `id`'s temporary acting set (empty: CRUSH's again)
    /// and waits for the map that carries it.
    async fn request_pg_temp(&self, id: PgId, acting: Vec<OsdId>) -> Result<(), OpError> {
        let mon = self
            .mon
            .get()
            .ok_or_else(|| OpError::Io("no monitor client yet".into()))?;
        let reply = mon.pg_temp(id, acting).await.map_err(|e| {
            OpError::Io(format!(
                "cannot set the PG's temporary acting set with the monitors: {e}"
            ))
        })?;
        self.map_at_least(reply.epoch).await?;
        Ok(())
    }

    /// Records with the monitors that `id` went active in `interval` with `members` holding
    /// every acknowledged write (a no-op when the map already says so).
    async fn record_activation(
        &self,
        id: PgId,
        interval: Epoch,
        members: Vec<OsdId>,
    ) -> Result<(), OpError> {
        let recorded = self.current_map().is_some_and(|m| {
            m.pg_activations
                .get(&id)
                .is_some_and(|a| a.interval == interval && a.acting == members)
        });
        if recorded {
            return Ok(());
        }
        let mon = self
            .mon
            .get()
            .ok_or_else(|| OpError::Io("no monitor client yet".into()))?;
        let reply = mon.pg_activated(id, interval, members).await.map_err(|e| {
            OpError::Io(format!(
                "cannot record the activation with the monitors: {e}"
            ))
        })?;
        self.map_at_least(reply.epoch).await?;
        Ok(())
    }

    /// Copies `name` from this primary to every replica still missing it; returns how many
    /// got it. The caller holds the object's lock, so no write to it runs meanwhile.
    async fn recover_object(
        &self,
        pg: &Pg,
        generation: u64,
        name: &ObjectName,
        skip: &[OsdId],
    ) -> Result<usize, OpError> {
        let (targets, interval_epoch) = {
            let s = lock(&pg.state);
            if s.generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: s.interval_epoch,
                });
            }
            let t: Vec<OsdId> = s
                .missing
                .iter()
                .filter(|(o, set)| set.contains(name) && !skip.contains(o))
                .map(|(o, _)| *o)
                .collect();
            (t, s.interval_epoch)
        };
        if targets.is_empty() {
            return Ok(0);
        }
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let push = match self.fetch(pg.id, interval_epoch, me, name).await? {
            Some(st) => Push {
                objects: vec![st],
                ..Push::default()
            },
            None => Push {
                remove: vec![name.clone()],
                ..Push::default()
            },
        };
        for &osd in &targets {
            // A replica that cannot take the push (dead, restarting, frozen) makes the write
            // wait, as a sub-op to it would, until it answers or the interval changes (the
            // client then resends): never an I/O error for a passing failure.
            loop {
                let delivered = tokio::select! {
                    d = self.deliver(pg.id, interval_epoch, osd, &push) => d,
                    () = pg.left_generation(generation) => Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: lock(&pg.state).interval_epoch,
                    }),
                };
                let e = match delivered {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if let OpError::NoSpace(_) = e {
                    return Err(e);
                }
                tracing::debug!(pg = %pg.id, osd, error = %e, "push on write failed; retrying");
                pg.pause_before_retry(generation).await?;
            }
            metrics::counter!("basalt_osd_recovered_objects_total").increment(1);
            let mut s = lock(&pg.state);
            if s.generation == generation {
                if let Some(set) = s.missing.get_mut(&osd) {
                    set.remove(name);
                }
            }
        }
        Ok(targets.len())
    }

    /// Recovers, one object at a time under its lock, what the `deferred` replicas of an
    /// active PG still miss; then marks them complete (les) and records the complete members
    /// with the monitors. Stops when the interval ends (the next peering takes over from
    /// the replicas' persisted missing lists).
    async fn recover_while_active(
        self: Arc<Self>,
        pg: Arc<Pg>,
        generation: u64,
        deferred: Vec<OsdId>,
    ) {
        let Ok(_slot) = self.recovery_slots.clone().acquire_owned().await else {
            return;
        };
        let still_current = || lock(&pg.state).generation == generation;
        loop {
            let next = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return;
                }
                s.missing.clone()
            };
            if next.values().all(BTreeSet::is_empty) {
                break;
            }
            // Replicas past the backfillfull ratio get no background pushes (a write to an
            // object one lacks still pushes it first: the write must land on every member).
            let with_room: Vec<OsdId> = next
                .iter()
                .filter(|(o, set)| !set.is_empty() && self.toofull(&[**o]).is_none())
                .map(|(o, _)| *o)
                .collect();
            let Some(name) = with_room
                .first()
                .and_then(|o| next.get(o))
                .and_then(|set| set.iter().next().cloned())
            else {
                let waiting: Vec<OsdId> = next
                    .iter()
                    .filter(|(_, set)| !set.is_empty())
                    .map(|(o, _)| *o)
                    .collect();
                let why = self.toofull(&waiting);
                let epoch = self.current_map().map_or(0, |m| m.epoch);
                {
                    let mut s = lock(&pg.state);
                    if s.generation != generation {
                        return;
                    }
                    s.recovery_toofull = why;
                }
                pg.bump();
                tokio::select! {
                    () = self.next_map_or_timeout(epoch) => {}
                    () = pg.left_generation(generation) => return,
                }
                continue;
            };
            if lock(&pg.state).recovery_toofull.take().is_some() {
                pg.bump();
            }
            let toofull: Vec<OsdId> = next
                .keys()
                .copied()
                .filter(|o| !with_room.contains(o))
                .collect();
            self.recovery_sleep().await;
            let slot = pg.object_slot(&name);
            let _order = slot.order.write().await;
            slot.drained().await;
            if let Err(e) = self.recover_object(&pg, generation, &name, &toofull).await {
                if !still_current() {
                    return;
                }
                tracing::info!(pg = %pg.id, error = %e, "recovery of an object failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        loop {
            let (interval_epoch, activated_at) = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return;
                }
                (s.interval_epoch, s.activated_at)
            };
            let complete = Push {
                info: Some(PgInfo {
                    les: interval_epoch,
                    last_update_floor: activated_at,
                    ..PgInfo::default()
                }),
                ..Push::default()
            };
            let mut result = Ok(());
            for &osd in &deferred {
                result = result.and(self.deliver(pg.id, interval_epoch, osd, &complete).await);
            }
            if result.is_ok() {
                {
                    let mut s = lock(&pg.state);
                    if s.generation == generation {
                        for osd in &deferred {
                            s.missing.remove(osd);
                        }
                    }
                }
                result = self.record_complete_members(&pg, generation).await;
            }
            match result {
                Ok(()) => {
                    tracing::info!(pg = %pg.id, "recovery done");
                    pg.bump();
                    return;
                }
                Err(e) if still_current() => {
                    tracing::info!(pg = %pg.id, error = %e, "finishing recovery failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Backfills `targets` of an active PG one after another (Ceph's backfill while
    /// active): each target's reach (see [`peering::BackfillReach`]) moves through the
    /// objects in listing order, range by range, copying what differs from this primary;
    /// at the end the target is marked complete and recorded with the monitors. Stops when
    /// the interval ends (the next peering resumes from the target's persisted cursor, or
    /// starts over if writes came meanwhile).
    async fn backfill_while_active(
        self: Arc<Self>,
        pg: Arc<Pg>,
        generation: u64,
        targets: Vec<OsdId>,
    ) {
        let Ok(_slot) = self.recovery_slots.clone().acquire_owned().await else {
            return;
        };
        for target in targets {
            loop {
                match self.backfill_target(&pg, generation, target).await {
                    Ok(()) => break,
                    Err(_) if lock(&pg.state).generation != generation => return,
                    Err(e) => {
                        tracing::info!(pg = %pg.id, osd = target, error = %e, "backfill round failed; retrying");
                        if pg.pause_before_retry(generation).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One target's backfill while its PG serves (see [`Self::backfill_while_active`]).
    async fn backfill_target(
        &self,
        pg: &Pg,
        generation: u64,
        target: OsdId,
    ) -> Result<(), OpError> {
        let id = pg.id;
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let interval_changed = |epoch| OpError::IntervalChanged {
            pg: id.to_string(),
            epoch,
        };
        let (interval_epoch, activated_at) = {
            let s = lock(&pg.state);
            (s.interval_epoch, s.activated_at)
        };
        // What the PG's state says about this target, or IntervalChanged once it is over.
        let with_target = |f: &mut dyn FnMut(&mut ActiveBackfill)| -> Result<(), OpError> {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Err(interval_changed(s.interval_epoch));
            }
            match s.backfill.get_mut(&target) {
                Some(b) => {
                    f(b);
                    Ok(())
                }
                None => Err(interval_changed(s.interval_epoch)),
            }
        };
        loop {
            self.wait_active_backfill_room(pg, generation, target)
                .await?;
            if !lock(&pg.state).backfill.contains_key(&target) {
                return Ok(());
            }
            let mut reach = peering::BackfillReach::Nothing;
            let mut les = 0;
            with_target(&mut |b| {
                reach = b.reach.clone();
                les = b.les;
            })?;
            let after: Option<ObjectName> = match &reach {
                peering::BackfillReach::Nothing => None,
                peering::BackfillReach::Through(k) => {
                    Some((k.namespace().to_string(), k.name().to_string()))
                }
                peering::BackfillReach::Everything => break,
            };
            let wanted = self.scan(id, interval_epoch, me, after.as_ref()).await?;
            // This range ends at the last object of the page, or covers the rest of the name
            // space when the page is the last.
            let end = (wanted.len() >= BACKFILL_SCAN)
                .then(|| wanted.last().map(|(n, _)| n.clone()))
                .flatten();
            let have = self
                .scan_range(id, interval_epoch, target, after.as_ref(), end.as_ref())
                .await?;
            let (copy, remove) = peering::backfill_diff(&wanted, &have);
            // Objects that differed when scanned; writes since then that skipped the target
            // add theirs to its `skipped`, which the loop below takes too.
            let mut todo: BTreeSet<ObjectId> = copy
                .iter()
                .chain(remove.iter())
                .map(|n| pg::listing_key(id, n))
                .collect();
            let end_key = end.as_ref().map(|e| pg::listing_key(id, e));
            loop {
                let mut next = None;
                let mut advanced = false;
                with_target(&mut |b| {
                    let in_range = |k: &&ObjectId| {
                        !b.reach.covers(k) && end_key.as_ref().is_none_or(|e| *k <= e)
                    };
                    let skipped = b.skipped.iter().find(in_range);
                    let differing = todo.iter().find(in_range);
                    next = skipped.into_iter().chain(differing).min().cloned();
                    if next.is_none() && b.reach.may_advance_to(end_key.as_ref(), b.skipped.iter())
                    {
                        b.reach = match &end_key {
                            Some(e) => peering::BackfillReach::Through(e.clone()),
                            None => peering::BackfillReach::Everything,
                        };
                        advanced = true;
                    }
                })?;
                if advanced {
                    break;
                }
                if let Some(key) = next {
                    self.wait_active_backfill_room(pg, generation, target)
                        .await?;
                    self.backfill_object(pg, generation, interval_epoch, target, &key)
                        .await?;
                    todo.remove(&key);
                }
            }
            // The cursor persists on the target after each range, so a later peering with no
            // write in between resumes here.
            if let Some(e) = end {
                let progress = Push {
                    info: Some(PgInfo {
                        les,
                        backfill: Some(BackfillProgress {
                            target: activated_at,
                            done_through: Some(e),
                        }),
                        missing: vec![],
                        last_update_floor: activated_at,
                    }),
                    ..Push::default()
                };
                self.deliver(id, interval_epoch, target, &progress).await?;
            }
        }
        // Every write now reaches the target in full and every object is equal: it is
        // complete (its log has been the primary's since activation).
        let complete = Push {
            info: Some(PgInfo {
                les: interval_epoch,
                last_update_floor: activated_at,
                ..PgInfo::default()
            }),
            ..Push::default()
        };
        self.deliver(id, interval_epoch, target, &complete).await?;
        {
            let mut s = lock(&pg.state);
            if s.generation != generation {
                return Err(interval_changed(s.interval_epoch));
            }
            s.backfill.remove(&target);
            s.backfill_toofull = None;
        }
        pg.bump();
        // Retried here: the target is no longer in the backfill set, so a new round would
        // not record it.
        while let Err(e) = self.record_complete_members(pg, generation).await {
            tracing::info!(pg = %id, error = %e, "recording the complete members failed; retrying");
            pg.pause_before_retry(generation).await?;
        }
        tracing::info!(pg = %id, osd = target, "backfill done");
        pg.bump();
        Ok(())
    }

    /// Copies one object from this primary to a backfill target under the object's order
    /// lock, once no write to it is in flight, then moves the target's reach up to it
    /// unless a write skipped an object before it meanwhile (then that one goes first).
    async fn backfill_object(
        &self,
        pg: &Pg,
        generation: u64,
        interval_epoch: Epoch,
        target: OsdId,
        key: &ObjectId,
    ) -> Result<(), OpError> {
        let name: ObjectName = (key.namespace().to_string(), key.name().to_string());
        self.recovery_sleep().await;
        let slot = pg.object_slot(&name);
        let _order = slot.order.write().await;
        slot.drained().await;
        if lock(&pg.state).generation != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: interval_epoch,
            });
        }
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let push = match self.fetch(pg.id, interval_epoch, me, &name).await? {
            Some(st) => Push {
                objects: vec![st],
                ..Push::default()
            },
            None => Push {
                remove: vec![name.clone()],
                ..Push::default()
            },
        };
        self.deliver(pg.id, interval_epoch, target, &push).await?;
        metrics::counter!("basalt_osd_recovered_objects_total").increment(1);
        let mut s = lock(&pg.state);
        if s.generation != generation {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: s.interval_epoch,
            });
        }
        if let Some(b) = s.backfill.get_mut(&target) {
            // No write to it can be deciding now (we hold its order lock): its copy there is
            // current, and a later write that skips the target notes it again.
            b.skipped.remove(key);
            if b.reach.may_advance_to(Some(key), b.skipped.iter()) && !b.reach.covers(key) {
                b.reach = peering::BackfillReach::Through(key.clone());
            }
        }
        Ok(())
    }

    /// Waits while a backfill-while-active target is backfillfull (`pg ls` shows
    /// `active+backfill_toofull`; the PG keeps serving), re-checked at every new map.
    async fn wait_active_backfill_room(
        &self,
        pg: &Pg,
        generation: u64,
        target: OsdId,
    ) -> Result<(), OpError> {
        loop {
            let epoch = self.current_map().map_or(0, |m| m.epoch);
            let why = self.toofull(&[target]);
            let changed = {
                let mut s = lock(&pg.state);
                if s.generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: s.interval_epoch,
                    });
                }
                let changed = s.backfill_toofull != why;
                if changed {
                    if let Some(why) = &why {
                        tracing::warn!(pg = %pg.id, "backfill_toofull: {why}");
                    }
                    s.backfill_toofull = why.clone();
                }
                changed
            };
            if changed {
                pg.bump();
            }
            if why.is_none() {
                return Ok(());
            }
            tokio::select! {
                () = self.next_map_or_timeout(epoch) => {}
                () = pg.left_generation(generation) => {}
            }
        }
    }

    /// `osd`'s objects after `after` through `end` (None: to the end), in listing order,
    /// read page by page.
    async fn scan_range(
        &self,
        id: PgId,
        interval_epoch: Epoch,
        osd: OsdId,
        after: Option<&ObjectName>,
        end: Option<&ObjectName>,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let past_end =
            |n: &ObjectName| end.is_some_and(|e| pg::listing_key(id, n) > pg::listing_key(id, e));
        let mut have = Vec::new();
        let mut cursor = after.cloned();
        loop {
            let page = self.scan(id, interval_epoch, osd, cursor.as_ref()).await?;
            let full = page.len() >= BACKFILL_SCAN;
            cursor = page.last().map(|(n, _)| n.clone());
            let beyond = page.iter().any(|(n, _)| past_end(n));
            have.extend(page.into_iter().filter(|(n, _)| !past_end(n)));
            if !full || beyond {
                return Ok(have);
            }
        }
    }

    /// Checks a peering/replication request (its envelope `header`: from `from` for `pg` at
    /// `interval_epoch`): this OSD's map must be at least that new and show `from` as the
    /// PG's primary.
    async fn check_peer_request(&self, header: &PeerHeader) -> Result<Arc<Pg>, OpError> {
        let PeerHeader {
            pg: id,
            interval_epoch,
            from,
        } = *header;
        let map = self.map_at_least(interval_epoch).await?;
        let stale = || OpError::IntervalChanged {
            pg: id.to_string(),
            epoch: map.epoch,
        };
        let pg = self.pg(id).ok_or_else(stale)?;
        if lock(&pg.state).primary != Some(from) {
            return Err(stale());
        }
        Ok(pg)
    }

    pub async fn handle_pg_query(&self, header: PeerHeader) -> Result<PeerState, OpError> {
        let pg = self.check_peer_request(&header).await?;
        // From here on sub-ops of older intervals are refused, and those already admitted
        // have committed before the state below is read.
        {
            let mut s = lock(&pg.state);
            s.peered_interval = s.peered_interval.max(header.interval_epoch);
        }
        let _quiesced = pg.gate.write().await;
        let id = pg.id;
        self.on_store(move |store| pg::peer_state(store, id)).await
    }

    pub async fn handle_pg_pull(
        &self,
        header: PeerHeader,
        req: pb::PgPullRequest,
    ) -> Result<Vec<Option<pg::ObjectState>>, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let names: Vec<ObjectName> = decode(&req.objects, "object names")?;
        let id = pg.id;
        self.on_store(move |store| {
            names
                .iter()
                .map(|(ns, n)| {
                    pg::object_if_present(
                        store,
                        &ObjectId::with_namespace(id, ns.clone(), n.clone()),
                    )
                })
                .collect()
        })
        .await
    }

    pub async fn handle_pg_scan(
        &self,
        header: PeerHeader,
        req: pb::PgScanRequest,
    ) -> Result<Vec<(ObjectName, Eversion)>, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let after: Option<ObjectName> = decode(&req.after, "scan start")?;
        let max = (req.max as usize).clamp(1, 4 * BACKFILL_SCAN);
        let id = pg.id;
        self.on_store(move |store| pg::scan_objects(store, id, after.as_ref(), max))
            .await
    }

    pub async fn handle_pg_push(
        &self,
        header: PeerHeader,
        req: pb::PgPushRequest,
    ) -> Result<(), OpError> {
        let pg = self.check_peer_request(&header).await?;
        // Under the gate, so a split of this PG (which ends the interval first) never runs
        // between the interval check and the commit.
        let _write = pg.gate.read().await;
        if lock(&pg.state).peered_interval != header.interval_epoch {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: header.interval_epoch,
            });
        }
        let push: Push = decode(&req.push, "push")?;
        let id = pg.id;
        let pg_num = self.pg_num_of(id.pool);
        let txn = self
            .on_store(move |store| pg::apply_push(store, id, pg_num, &push))
            .await?;
        let r = self.store.submit(txn).await.map_err(pg::store_error);
        pg.applied.send_modify(|n| *n += 1);
        r
    }

    /// Applies a primary's write (already checked against its envelope by
    /// [`SubOp::from_pb`]).
    pub async fn handle_sub_op(&self, sub_op: SubOp) -> Result<(), OpError> {
        let pg = self.check_peer_request(&sub_op.header).await?;
        let SubOp {
            header,
            version,
            object,
            after_seq,
            txn,
            ..
        } = sub_op;
        // A resent sub-op must not apply twice (appends are not idempotent): its log entry
        // tells whether it already landed.
        let seq = version.seq;
        let committing = std::time::Instant::now();
        // Writes to one object apply in the primary's order: wait (bounded; the primary
        // resends) until the write in flight before this one has landed here.
        let slot = pg.object_slot(&object);
        let deadline = Instant::now() + PEER_RPC_TIMEOUT / 2;
        let order = loop {
            let mut landed = pg.applied.subscribe();
            let mut changed = pg.changed.subscribe();
            let order = slot.order.clone().write_owned().await;
            if lock(&pg.state).peered_interval != header.interval_epoch {
                return Err(OpError::IntervalChanged {
                    pg: pg.id.to_string(),
                    epoch: header.interval_epoch,
                });
            }
            let (id, after) = (pg.id, after_seq.unwrap_or(0));
            let (done, ready) = self
                .on_store(move |store| {
                    let logged = |seq: u64| -> Result<bool, OpError> {
                        Ok(store
                            .pg_log_scan(id, seq, 1)
                            .map_err(pg::store_error)?
                            .first()
                            .is_some_and(|(v, _)| *v == seq))
                    };
                    Ok((logged(seq)?, after == 0 || logged(after)?))
                })
                .await?;
            if done {
                // A resend of a sub-op that landed: answer once it is durable.
                drop(order);
                return self
                    .on_store(|store| store.sync_blocking().map_err(pg::store_error))
                    .await;
            }
            if ready {
                break order;
            }
            drop(order);
            let waited = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = landed.changed() => {}
                    _ = changed.changed() => {}
                }
            })
            .await;
            if waited.is_err() {
                return Err(OpError::Io(format!(
                    "pg {}: the write before log entry {seq} to this object has not arrived",
                    pg.id
                )));
            }
        };
        // Peering holds the gate exclusively while it reads this member's state, so no write
        // of an older interval lands behind its back (not held while waiting above: peering
        // must not wait for a write that may never come).
        let _write = pg.gate.read().await;
        if lock(&pg.state).peered_interval != header.interval_epoch {
            return Err(OpError::IntervalChanged {
                pg: pg.id.to_string(),
                epoch: header.interval_epoch,
            });
        }
        let started = std::time::Instant::now();
        let applied = self
            .on_store(move |store| store.apply_blocking(&txn).map_err(pg::store_error))
            .await;
        stage("sub_op_apply", started);
        pg.applied.send_modify(|n| *n += 1);
        drop(order);
        let durable = applied?;
        let started = std::time::Instant::now();
        let r = durable.done().await.map_err(pg::store_error);
        stage("sub_op_sync", started);
        metrics::histogram!("basalt_osd_commit_seconds").record(committing.elapsed().as_secs_f64());
        r
    }

    pub async fn handle_pg_scrub_map(
        &self,
        header: PeerHeader,
        req: pb::PgScrubMapRequest,
    ) -> Result<pg::ScrubMap, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let range: pg::NameRange = decode(&req.range, "scrub range")?;
        let (id, deep) = (pg.id, req.deep);
        self.on_store(move |store| pg::scrub_map(store, id, deep, &range, usize::MAX))
            .await
    }

    /// Scrub, deep scrub or repair of a PG this OSD is primary of (see [`Self::scrub_pg`]).
    pub async fn handle_pg_command(
        self: &Arc<Self>,
        req: pb::PgCommandRequest,
    ) -> Result<basalt_ops::ScrubResult, OpError> {
        let command: basalt_ops::PgCommand = decode(&req.command, "PG command")?;
        let (_, pg) = self
            .primary_pg(req.epoch, req.pool, req.pg_seed, "", None, "")
            .await?;
        let generation = self
            .wait_active(&pg, Instant::now() + Duration::from_secs(30))
            .await?;
        let deep = command != basalt_ops::PgCommand::Scrub;
        self.scrub_pg(
            &pg,
            generation,
            deep,
            command == basalt_ops::PgCommand::Repair,
        )
        .await
    }

    /// Scrubs (deep: every chunk's checksum) one active PG this OSD is primary of, repairs
    /// what it found from a good copy when `repair`, and records the outcome (state, health,
    /// metrics, the scrub stamps the schedule runs from).
    async fn scrub_pg(
        &self,
        pg: &Arc<Pg>,
        generation: u64,
        deep: bool,
        repair: bool,
    ) -> Result<basalt_ops::ScrubResult, OpError> {
        if lock(&pg.state).healing() {
            return Err(OpError::Busy(format!(
                "PG {} is recovering or backfilling; scrub it once it is clean",
                pg.id
            )));
        }
        let mut repaired = 0;
        let (objects, mut found) = self.scrub(pg, generation, deep).await?;
        metrics::counter!("basalt_osd_scrub_errors_total").increment(found.len() as u64);
        if repair && !found.is_empty() {
            for inc in &found {
                if self.repair_copies(pg, inc).await? {
                    repaired += 1;
                }
            }
            found = self.scrub(pg, generation, deep).await?.1;
        }
        let lines: Vec<String> = found
            .iter()
            .map(|i| format!("{}: {}", i.name, i.why))
            .collect();
        let now = now_ms();
        let stamps = {
            let mut s = lock(&pg.state);
            if s.generation == generation {
                s.inconsistent = lines.clone();
            }
            let st = s.scrub_stamps.get_or_insert(ScrubStamps {
                shallow_ms: now,
                deep_ms: now,
            });
            st.shallow_ms = now;
            if deep {
                st.deep_ms = now;
            }
            *st
        };
        let mut txn = Transaction::new();
        txn.meta_set(scrub_stamps_key(pg.id), encode(&stamps));
        if let Err(e) = self.store.submit(txn).await {
            tracing::warn!(pg = %pg.id, error = %e, "cannot persist the scrub stamps");
        }
        metrics::counter!("basalt_osd_scrubs_total", "kind" => if deep { "deep" } else { "shallow" })
            .increment(1);
        metrics::counter!("basalt_osd_scrub_repairs_total").increment(repaired);
        if !found.is_empty() {
            tracing::warn!(pg = %pg.id, inconsistent = found.len(), "scrub found inconsistent objects");
        }
        Ok(basalt_ops::ScrubResult {
            pgid: pg.id.to_string(),
            deep,
            objects,
            inconsistent: lines,
            repaired,
        })
    }

    /// Scrubs, one PG at a time (Ceph's `osd_max_scrubs` 1), every active PG this OSD is
    /// primary of whose last scrub or deep scrub is older than its interval; repairs what
    /// it finds when `scrub_auto_repair` is set. Runs until the process ends.
    /// The snap trimmer: for every PG this OSD is primary of, deletes the clones that only
    /// removed snapshots still needed, one object at a time through the write path (so each
    /// trim is logged and replicated like any write), with the recovery sleep between
    /// objects. Which removed snapshots a PG has been trimmed of is persisted after each
    /// complete pass, so a restart resumes with the snapshots not yet done (re-trimming an
    /// object is a no-op).
    pub async fn run_snap_trimmer(self: Arc<Self>) {
        let incarnation = now_ns();
        let mut tid = 0u64;
        loop {
            tokio::time::sleep(SNAP_TRIM_TICK).await;
            let (Some(map), Some(me)) = (self.current_map(), self.me()) else {
                continue;
            };
            let pgs: Vec<Arc<Pg>> = lock(&self.pgs).values().cloned().collect();
            for pg in pgs {
                let Some(pool) = map.pools.get(&pg.id.pool) else {
                    continue;
                };
                if pool.removed_snaps.is_empty() {
                    continue;
                }
                let (generation, todo) = {
                    let mut s = lock(&pg.state);
                    let recovering = s.healing();
                    if s.primary != Some(me) || s.status != PgStatus::Active || recovering {
                        continue;
                    }
                    let done = s.trimmed_snaps.get_or_insert_with(|| {
                        self.store
                            .meta_get(&snap_trimmed_key(pg.id))
                            .ok()
                            .flatten()
                            .and_then(|b| decode(&b, "trimmed snapshots").ok())
                            .unwrap_or_default()
                    });
                    let todo: Vec<u64> = pool.removed_snaps.difference(done).copied().collect();
                    if todo.is_empty() {
                        continue;
                    }
                    s.snaptrim = true;
                    (s.generation, todo)
                };
                let trimmed = self
                    .trim_pg(&pg, generation, me, map.epoch, &todo, incarnation, &mut tid)
                    .await;
                lock(&pg.state).snaptrim = false;
                match trimmed {
                    Ok(objects) => {
                        lock(&pg.state).trimmed_snaps = Some(pool.removed_snaps.clone());
                        let mut txn = Transaction::new();
                        txn.meta_set(snap_trimmed_key(pg.id), encode(&pool.removed_snaps));
                        if let Err(e) = self.store.submit(txn).await {
                            tracing::warn!(pg = %pg.id, error = %e, "cannot record the trimmed snapshots");
                        }
                        tracing::info!(pg = %pg.id, objects, snaps = ?todo, "snap trim done");
                    }
                    Err(e) => {
                        tracing::info!(pg = %pg.id, error = %e, "snap trim did not finish; will resume")
                    }
                }
            }
        }
    }

    /// One pass of the snap trimmer over `pg`; returns how many objects it trimmed.
    #[allow(clippy::too_many_arguments)]
    async fn trim_pg(
        self: &Arc<Self>,
        pg: &Arc<Pg>,
        generation: u64,
        me: OsdId,
        epoch: Epoch,
        removed: &[u64],
        incarnation: u64,
        tid: &mut u64,
    ) -> Result<u64, OpError> {
        let id = pg.id;
        let mut after: Option<ObjectName> = None;
        let mut trimmed = 0;
        loop {
            if lock(&pg.state).generation != generation {
                return Err(OpError::IntervalChanged {
                    pg: id.to_string(),
                    epoch: pg.snapshot().2,
                });
            }
            let (cursor, wanted) = (after.clone(), removed.to_vec());
            let (page, next) = self
                .on_store(move |store| {
                    pg::objects_to_trim(store, id, cursor.as_ref(), SNAP_TRIM_SCAN, &wanted)
                })
                .await?;
            for (name, snaps) in page {
                *tid += 1;
                let req = pb::OpRequest {
                    pool: id.pool,
                    pg_seed: id.seed,
                    namespace: name.0.clone(),
                    object: name.1.clone(),
                    epoch,
                    reqid: Some(pb::ReqId {
                        client: format!("osd.{me}.snaptrim"),
                        incarnation,
                        tid: *tid,
                    }),
                    timeout_ms: 30_000,
                    full_try: true,
                    ..Default::default()
                };
                self.handle_op(req, vec![ObjOp::TrimSnaps { removed: snaps }])
                    .await?;
                metrics::counter!("basalt_osd_snap_trims_total").increment(1);
                trimmed += 1;
                self.recovery_sleep().await;
            }
            match next {
                Some(n) => after = Some(n),
                None => return Ok(trimmed),
            }
        }
    }

    pub async fn run_scrub_schedule(self: Arc<Self>) {
        let (shallow, deep) = (
            self.tuning.scrub_interval_secs * 1000,
            self.tuning.deep_scrub_interval_secs * 1000,
        );
        let Some(shortest) = [shallow, deep].into_iter().filter(|i| *i > 0).min() else {
            tracing::info!("scheduled scrubs are off (both intervals are 0)");
            return;
        };
        let tick = Duration::from_millis((shortest / 4).clamp(500, 60_000));
        loop {
            tokio::time::sleep(tick).await;
            let me = self.me();
            let pgs: Vec<Arc<Pg>> = lock(&self.pgs).values().cloned().collect();
            for pg in pgs {
                let (generation, due_deep, due_shallow) = {
                    let mut s = lock(&pg.state);
                    let recovering = s.healing();
                    if s.primary.is_none()
                        || s.primary != me
                        || s.status != PgStatus::Active
                        || recovering
                    {
                        continue;
                    }
                    let now = now_ms();
                    // Stamps persisted by an earlier run; a PG never scrubbed here counts
                    // from now, so a new cluster (or a new primary) does not scrub at once.
                    let st = *s.scrub_stamps.get_or_insert_with(|| {
                        self.store
                            .meta_get(&scrub_stamps_key(pg.id))
                            .ok()
                            .flatten()
                            .and_then(|b| decode(&b, "scrub stamps").ok())
                            .unwrap_or(ScrubStamps {
                                shallow_ms: now,
                                deep_ms: now,
                            })
                    });
                    let due =
                        |last: u64, every: u64| every > 0 && now.saturating_sub(last) >= every;
                    (
                        s.generation,
                        due(st.deep_ms, deep),
                        due(st.shallow_ms, shallow),
                    )
                };
                if !due_deep && !due_shallow {
                    continue;
                }
                match self
                    .scrub_pg(&pg, generation, due_deep, self.tuning.scrub_auto_repair)
                    .await
                {
                    Ok(r) => tracing::info!(
                        pg = %pg.id,
                        deep = due_deep,
                        objects = r.objects,
                        inconsistent = r.inconsistent.len(),
                        repaired = r.repaired,
                        "scheduled scrub done"
                    ),
                    Err(e) => {
                        tracing::info!(pg = %pg.id, error = %e, "scheduled scrub did not finish")
                    }
                }
            }
        }
    }

    /// Builds every acting member's scrub map and compares them, SCRUB_CHUNK objects at a
    /// time: writes to the PG wait only while one chunk is mapped (Ceph's chunky scrub).
    /// Returns the objects seen and the inconsistencies found.
    async fn scrub(
        &self,
        pg: &Arc<Pg>,
        generation: u64,
        deep: bool,
    ) -> Result<(u64, Vec<pg::Inconsistency>), OpError> {
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let id = pg.id;
        let (mut objects, mut found) = (0u64, Vec::new());
        let mut after: Option<ObjectName> = None;
        loop {
            let _quiet = pg.gate.write().await;
            let (acting, interval_epoch) = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: s.interval_epoch,
                    });
                }
                (s.acting.clone(), s.interval_epoch)
            };
            // This primary's next SCRUB_CHUNK objects fix the chunk's end; the replicas map
            // the same name range, however many objects they hold in it.
            let first = pg::NameRange {
                after: after.clone(),
                until: None,
            };
            let own = self
                .on_store(move |store| pg::scrub_map(store, id, deep, &first, SCRUB_CHUNK))
                .await?;
            let until = (own.len() >= SCRUB_CHUNK)
                .then(|| own.keys().max_by_key(|n| pg::listing_key(id, n)).cloned())
                .flatten();
            let range = encode(&pg::NameRange {
                after: after.clone(),
                until: until.clone(),
            });
            let mut maps = BTreeMap::new();
            maps.insert(me, own);
            for &osd in acting.iter().filter(|o| **o != me) {
                let range = range.clone();
                let header = Some(self.peer_header(id, interval_epoch).to_pb());
                let m: pg::ScrubMap = self
                    .peer_rpc(osd, "scrub map", |mut c| async move {
                        let r = c
                            .pg_scrub_map(pb::PgScrubMapRequest {
                                header,
                                deep,
                                range,
                            })
                            .await?;
                        Ok(Response::new(r.into_inner().result))
                    })
                    .await?;
                maps.insert(osd, m);
            }
            objects += maps.values().map(|m| m.len()).max().unwrap_or(0) as u64;
            found.extend(pg::compare_scrub_maps(me, &maps));
            match until {
                Some(u) => after = Some(u),
                None => return Ok((objects, found)),
            }
        }
    }

    /// Copies the good copy of one inconsistent object over every bad one; false when no
    /// member holds a good copy.
    async fn repair_copies(&self, pg: &Arc<Pg>, inc: &pg::Inconsistency) -> Result<bool, OpError> {
        let Some(good) = inc.good else {
            return Ok(false);
        };
        let interval_epoch = lock(&pg.state).interval_epoch;
        let name = (inc.namespace.clone(), inc.name.clone());
        let Some(state) = self.fetch(pg.id, interval_epoch, good, &name).await? else {
            return Err(OpError::Io(format!(
                "osd.{good} no longer holds {}",
                inc.name
            )));
        };
        let push = Push {
            objects: vec![state],
            ..Push::default()
        };
        for &osd in &inc.bad {
            self.deliver(pg.id, interval_epoch, osd, &push).await?;
        }
        tracing::info!(pg = %pg.id, object = %inc.name, from = good, to = ?inc.bad, "repaired");
        Ok(true)
    }

    pub async fn handle_list(&self, req: pb::ListRequest) -> Result<pg::Listing, OpError> {
        let (_, pg) = self
            .primary_pg(req.epoch, req.pool, req.pg_seed, "", None, &req.client)
            .await?;
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        let generation = self.wait_active(&pg, deadline).await?;
        let _gate = self.read_gate(&pg, generation, None).await?;
        // A client listing with another pg_num would miss what a split moved into the new
        // PGs (or list it twice): it must list again with this map.
        if let Some(map) = self.current_map() {
            let pg_num = map.pools.get(&req.pool).map_or(0, |p| p.pg_num);
            if req.pg_num != 0 && req.pg_num != pg_num {
                return Err(OpError::NotPrimary {
                    pg: pg.id.to_string(),
                    epoch: map.epoch,
                });
            }
        }
        let after: Option<ObjectName> = if req.start_after.is_empty() {
            None
        } else {
            decode(&req.start_after, "listing cursor")?
        };
        let max = req.max.clamp(1, 10_000) as usize;
        let id = pg.id;
        self.on_store(move |store| {
            let start = after.map(|(ns, n)| ObjectId::with_namespace(id, ns, n));
            let page = store
                .list_objects(id, start.as_ref(), max)
                .map_err(pg::store_error)?;
            let mut objects = Vec::with_capacity(page.objects.len());
            for o in page
                .objects
                .iter()
                .filter(|o| o.snap() == crate::store::SNAP_HEAD)
            {
                // A whiteout (deleted, its clones kept for snapshots) is no object to list.
                let head = store.head(o).map_err(pg::store_error)?;
                if head.is_some() && !crate::snaps::is_whiteout(head.as_ref()) {
                    objects.push((o.namespace().to_string(), o.name().to_string()));
                }
            }
            Ok(pg::Listing {
                objects,
                next: page
                    .next
                    .map(|o| (o.namespace().to_string(), o.name().to_string())),
            })
        })
        .await
    }

    fn watchers_of(&self, key: &WatchKey) -> Vec<WatcherInfo> {
        lock(&self.watches)
            .get(key)
            .map(|v| {
                v.iter()
                    .map(|w| WatcherInfo {
                        client: w.client.clone(),
                        cookie: w.cookie,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn unwatch(&self, key: &WatchKey, client: &str, cookie: u64) {
        let mut w = lock(&self.watches);
        if let Some(v) = w.get_mut(key) {
            v.retain(|e| !(e.client == client && e.cookie == cookie));
            if v.is_empty() {
                w.remove(key);
            }
        }
        // A notify waiting for this watcher gives up on it now.
        let mut n = lock(&self.notifies);
        for p in n.values_mut() {
            if p.waiting.remove(&(client.to_string(), cookie)) && p.waiting.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    fn expire_blocklisted_watches(&self, map: &OsdMap) {
        let now = now_ms();
        let mut w = lock(&self.watches);
        for v in w.values_mut() {
            v.retain(|e| {
                let fenced = map.is_blocklisted(&e.client, now);
                if fenced {
                    let err = encode(&OpError::Blocklisted(e.client.clone()));
                    let _ = e.events.try_send(Ok(pb::WatchEvent {
                        error: err,
                        ..Default::default()
                    }));
                }
                !fenced
            });
        }
        w.retain(|_, v| !v.is_empty());
    }

    /// Serves one watch: registers it, then keeps it while pings arrive within the timeout and
    /// the PG keeps this OSD as primary.
    pub async fn handle_watch(
        self: &Arc<Self>,
        peer: &Authenticated,
        mut pings: Streaming<pb::WatchPing>,
    ) -> Result<mpsc::Receiver<Result<pb::WatchEvent, Status>>, Status> {
        let first = tokio::time::timeout(Duration::from_secs(10), pings.message())
            .await
            .map_err(|_| basalt_proto::status::deadline_exceeded("no watch request within 10 s"))??
            .ok_or_else(|| {
                basalt_proto::status::invalid_argument("watch stream closed before its request")
            })?;
        let (tx, rx) = mpsc::channel(64);
        let refuse = |e: OpError| {
            let _ = tx.try_send(Ok(pb::WatchEvent {
                error: encode(&e),
                ..Default::default()
            }));
        };
        if let Err(e) = self
            .check_pool(peer, first.pool, first.epoch, Perm::R.union(Perm::X))
            .await
        {
            refuse(e);
            return Ok(rx);
        }
        if first.object.is_empty() {
            refuse(OpError::InvalidArgument("empty object name".into()));
            return Ok(rx);
        }
        let (_, pg) = match self
            .primary_pg(
                first.epoch,
                first.pool,
                first.pg_seed,
                &first.namespace,
                Some(&first.object),
                &first.client,
            )
            .await
        {
            Ok(x) => x,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        let generation = match self
            .wait_active(&pg, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        // Watches need the object (as in Ceph).
        let gate = match self
            .read_gate(&pg, generation, Some((&first.namespace, &first.object)))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        let obj = ObjectId::with_namespace(pg.id, first.namespace.clone(), first.object.clone());
        let exists = self
            .on_store(move |store| Ok(store.exists(&obj).unwrap_or(false)))
            .await
            .unwrap_or(false);
        drop(gate);
        if !exists {
            refuse(OpError::NotFound);
            return Ok(rx);
        }
        let key: WatchKey = (pg.id, first.namespace.clone(), first.object.clone());
        let client = first.client.clone();
        let cookie = first.cookie;
        let timeout = Duration::from_millis(u64::from(first.timeout_ms.clamp(1_000, 3_600_000)));
        {
            let mut w = lock(&self.watches);
            let v = w.entry(key.clone()).or_default();
            v.retain(|e| !(e.client == client && e.cookie == cookie));
            v.push(WatchEntry {
                client: client.clone(),
                cookie,
                events: tx.clone(),
            });
        }
        let _ = tx.try_send(Ok(pb::WatchEvent::default()));
        metrics::gauge!("basalt_osd_watches").increment(1.0);
        let core = self.clone();
        tokio::spawn(async move {
            let mut changed = pg.changed.subscribe();
            let end = loop {
                tokio::select! {
                    m = tokio::time::timeout(timeout, pings.message()) => match m {
                        Ok(Ok(Some(_))) => continue,
                        Ok(_) => break None, // the client closed the stream
                        Err(_) => break Some(OpError::Io(format!(
                            "watch timed out: no ping for {} ms", timeout.as_millis()))),
                    },
                    _ = changed.changed() => {
                        let (g, _, epoch) = pg.snapshot();
                        if g != generation {
                            break Some(OpError::IntervalChanged { pg: pg.id.to_string(), epoch });
                        }
                    }
                    _ = tx.closed() => break None,
                }
            };
            core.unwatch(&key, &client, cookie);
            metrics::gauge!("basalt_osd_watches").decrement(1.0);
            if let Some(e) = end {
                tracing::info!(client = %client, cookie, object = %key.2, error = %e, "watch ended");
                let _ = tx
                    .send(Ok(pb::WatchEvent {
                        error: encode(&e),
                        ..Default::default()
                    }))
                    .await;
            }
        });
        Ok(rx)
    }

    pub async fn handle_notify(&self, req: pb::NotifyRequest) -> Result<NotifyResult, OpError> {
        let (_, pg) = self
            .primary_pg(
                req.epoch,
                req.pool,
                req.pg_seed,
                &req.namespace,
                Some(&req.object),
                &req.client,
            )
            .await?;
        let timeout = Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        self.wait_active(&pg, Instant::now() + timeout).await?;
        // Watches of an object that a split moved live under its new PG.
        self.check_still_maps(&pg, &req.namespace, &req.object)?;
        let key: WatchKey = (pg.id, req.namespace.clone(), req.object.clone());
        let id = self.next_notify.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let targets: Vec<(String, u64, mpsc::Sender<_>)> = lock(&self.watches)
            .get(&key)
            .map(|v| {
                v.iter()
                    .map(|w| (w.client.clone(), w.cookie, w.events.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() {
            return Ok(NotifyResult::default());
        }
        lock(&self.notifies).insert(
            id,
            PendingNotify {
                waiting: targets.iter().map(|(c, k, _)| (c.clone(), *k)).collect(),
                acks: vec![],
                done: Some(done_tx),
            },
        );
        for (_, _, events) in &targets {
            let _ = events.try_send(Ok(pb::WatchEvent {
                notify_id: id,
                notifier: req.client.clone(),
                payload: req.payload.clone(),
                error: Bytes::new(),
            }));
        }
        let _ = tokio::time::timeout(timeout, done_rx).await;
        let p = lock(&self.notifies).remove(&id);
        let Some(p) = p else {
            return Ok(NotifyResult::default());
        };
        Ok(NotifyResult {
            acks: p.acks,
            timed_out: p
                .waiting
                .into_iter()
                .map(|(client, cookie)| WatcherInfo { client, cookie })
                .collect(),
        })
    }

    pub fn handle_notify_ack(&self, req: pb::NotifyAckRequest) {
        let mut n = lock(&self.notifies);
        if let Some(p) = n.get_mut(&req.notify_id) {
            if p.waiting.remove(&(req.client.clone(), req.cookie)) {
                p.acks.push((
                    WatcherInfo {
                        client: req.client,
                        cookie: req.cookie,
                    },
                    req.reply,
                ));
            }
            if p.waiting.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// What an object op needs of the client's osd caps: `r` to read, `w` to change, `x` for
/// the class-style lock ops (Ceph's cls_lock).
fn op_needs(op: &ObjOp) -> Perm {
    let base = if op.is_write() { Perm::W } else { Perm::R };
    match op {
        ObjOp::Lock { .. }
        | ObjOp::Unlock { .. }
        | ObjOp::BreakLock { .. }
        | ObjOp::LockInfo { .. } => base.union(Perm::X),
        _ => base,
    }
}

impl OsdCore {
    /// Whether `peer`'s osd caps grant `need` on pool `pool`, by its name in this OSD's map
    /// once it is at least the request's `epoch` (a pool the client knows of may be newer
    /// than this OSD's map; 0: the current map).
    pub async fn check_pool(
        &self,
        peer: &Authenticated,
        pool: PoolId,
        epoch: Epoch,
        need: Perm,
    ) -> Result<(), OpError> {
        let map = match epoch {
            0 => self
                .current_map()
                .ok_or_else(|| OpError::Io("no OSDMap yet".into()))?,
            e => self.map_at_least(e).await?,
        };
        Self::pool_allows(&map, peer, pool, need)
    }

    fn pool_allows(
        map: &OsdMap,
        peer: &Authenticated,
        pool: PoolId,
        need: Perm,
    ) -> Result<(), OpError> {
        let name = map
            .pools
            .get(&pool)
            .map(|p| p.name.clone())
            .ok_or(OpError::NoSuchPool(pool))?;
        peer.check_osd(&name, need)
            .map_err(|e| OpError::PermissionDenied(e.to_string()))
    }

    /// The envelope of a request only OSD daemons send (sub-ops, peering, pushes): the peer
    /// must be `osd.N` (checked first, so nobody else learns anything from the reply), the
    /// envelope of this message version, and its `from` (the sender it names) N.
    pub fn osd_peer_header(
        peer: &Authenticated,
        header: Option<&pb::PeerHeader>,
    ) -> Result<PeerHeader, OpError> {
        let denied = |e: basalt_auth::PermissionDenied| OpError::PermissionDenied(e.to_string());
        peer.check_is_osd(None).map_err(denied)?;
        let header = header_of(header)?;
        peer.check_is_osd(Some(header.from)).map_err(denied)?;
        Ok(header)
    }

    /// Answers a client's op, whichever transport it came on (the data-path messenger, or
    /// the gRPC service for older clients), if `peer`'s caps allow every op in it.
    pub async fn serve_op(
        self: &Arc<Self>,
        peer: &Authenticated,
        req: pb::OpRequest,
    ) -> pb::OpReply {
        let started = std::time::Instant::now();
        let bytes_in = req.ops.len() as u64;
        // Write payloads stay slices of the received frame (no copy).
        let (kind, r) = match basalt_ops::decode_shared::<Vec<ObjOp>>(&req.ops, "ops") {
            Ok(ops) => {
                let kind = if ops.iter().any(ObjOp::is_write) {
                    "write"
                } else {
                    "read"
                };
                let need = ops.iter().map(op_needs).fold(Perm::default(), Perm::union);
                match self.check_pool(peer, req.pool, req.epoch, need).await {
                    Ok(()) => (kind, self.handle_op(req, ops).await),
                    Err(e) => ("denied", Err(e)),
                }
            }
            Err(e) => ("malformed", Err(e)),
        };
        metrics::counter!("basalt_osd_client_ops_total", "kind" => kind, "result" => if r.is_ok() { "ok" } else { "error" }).increment(1);
        metrics::histogram!("basalt_osd_client_op_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("basalt_osd_client_bytes_total", "direction" => "in").increment(bytes_in);
        let result = encode(&r);
        metrics::counter!("basalt_osd_client_bytes_total", "direction" => "out")
            .increment(result.len() as u64);
        pb::OpReply {
            epoch: reply_epoch(self),
            result,
        }
    }

    /// Answers a primary's sub-op, whichever transport it came on, if it is from the OSD it
    /// names.
    pub async fn serve_sub_op(
        &self,
        peer: &Authenticated,
        req: pb::SubOpRequest,
    ) -> pb::SubOpReply {
        let started = std::time::Instant::now();
        let r = match Self::osd_peer_header(peer, req.header.as_ref()) {
            Ok(_) => {
                let decoding = std::time::Instant::now();
                let sub_op = SubOp::from_pb(req);
                stage("sub_op_decode", decoding);
                match sub_op {
                    Ok(sub_op) => self.handle_sub_op(sub_op).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        metrics::histogram!("basalt_osd_sub_op_seconds").record(started.elapsed().as_secs_f64());
        pb::SubOpReply { result: encode(&r) }
    }
}

/// Records how long one stage of the op path took (`basalt_osd_op_stage_seconds`).
fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_osd_op_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}

/// An executed write on its way to being versioned and replicated ([`OsdCore::write`]).
struct Write {
    pg: Arc<Pg>,
    generation: u64,
    slot: Arc<ObjectSlot>,
    /// The object's order lock, held until the write is applied locally.
    order: tokio::sync::OwnedRwLockWriteGuard<()>,
    name: ObjectName,
    obj: ObjectId,
    ex: pg::Executed,
    reqid: ReqId,
}

/// The gRPC face of [`OsdCore`] plus the heartbeat.
pub struct OsdService {
    pub core: Arc<OsdCore>,
    pub epoch: Arc<AtomicU64>,
}

/// An OSD refusal as a gRPC error, for the few calls that answer with a bare status rather
/// than an encoded `OpError` (notify acks); its kind says what the client should do.
fn op_error_status(e: OpError) -> Status {
    use basalt_proto::status::ErrorKind;
    let kind = match &e {
        OpError::Blocklisted(_) => ErrorKind::Blocklisted,
        OpError::PermissionDenied(_) => ErrorKind::PermissionDenied,
        OpError::NotFound | OpError::NoSuchPool(_) => ErrorKind::NotFound,
        OpError::Exists => ErrorKind::Exists,
        OpError::InvalidArgument(_) | OpError::BadPeerMessage(_) => ErrorKind::InvalidArgument,
        OpError::NotPrimary { .. }
        | OpError::IntervalChanged { .. }
        | OpError::Inactive { .. }
        | OpError::MapBehind { .. }
        | OpError::Busy(_) => ErrorKind::Unavailable,
        OpError::CmpFailed(_) | OpError::NoSpace(_) | OpError::PoolFull { .. } => {
            ErrorKind::FailedPrecondition
        }
        OpError::Corrupt(_) | OpError::Io(_) => ErrorKind::Internal,
    };
    kind.status(e.to_string())
}

fn reply_epoch(core: &OsdCore) -> u64 {
    core.current_map().map_or(0, |m| m.epoch)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::osd_server::Osd for OsdService {
    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::PingReply>, Status> {
        peer(&req)?.check_is_osd(None).map_err(denied)?;
        let Some(osd_id) = self.core.me() else {
            return Err(basalt_proto::status::unavailable(
                "this OSD has not booted yet",
            ));
        };
        Ok(Response::new(pb::PingReply {
            osd_id,
            epoch: self.epoch.load(Ordering::Relaxed),
        }))
    }

    async fn op(&self, req: Request<pb::OpRequest>) -> Result<Response<pb::OpReply>, Status> {
        let who = peer(&req)?;
        Ok(Response::new(
            self.core.serve_op(&who, req.into_inner()).await,
        ))
    }

    async fn list_objects(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListReply>, Status> {
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::R).await {
            Ok(()) => self.core.handle_list(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::ListReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchPing>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = peer(&req)?;
        let rx = self.core.handle_watch(&who, req.into_inner()).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn notify(
        &self,
        req: Request<pb::NotifyRequest>,
    ) -> Result<Response<pb::NotifyReply>, Status> {
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::X).await {
            Ok(()) => self.core.handle_notify(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::NotifyReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    async fn notify_ack(
        &self,
        req: Request<pb::NotifyAckRequest>,
    ) -> Result<Response<pb::NotifyAckReply>, Status> {
        let who = peer(&req)?;
        if let Err(e) = self
            .core
            .check_pool(&who, req.get_ref().pool, 0, Perm::X)
            .await
        {
            return Err(op_error_status(e));
        }
        self.core.handle_notify_ack(req.into_inner());
        Ok(Response::new(pb::NotifyAckReply {}))
    }

    async fn sub_op(
        &self,
        req: Request<pb::SubOpRequest>,
    ) -> Result<Response<pb::SubOpReply>, Status> {
        let who = peer(&req)?;
        Ok(Response::new(
            self.core.serve_sub_op(&who, req.into_inner()).await,
        ))
    }

    async fn pg_query(
        &self,
        req: Request<pb::PgQueryRequest>,
    ) -> Result<Response<pb::PgQueryReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_query(header).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgQueryReply { result: encode(&r) }))
    }

    async fn pg_pull(
        &self,
        req: Request<pb::PgPullRequest>,
    ) -> Result<Response<pb::PgPullReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_pull(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgPullReply { result: encode(&r) }))
    }

    async fn pg_scan(
        &self,
        req: Request<pb::PgScanRequest>,
    ) -> Result<Response<pb::PgScanReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_scan(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgScanReply { result: encode(&r) }))
    }

    async fn pg_push(
        &self,
        req: Request<pb::PgPushRequest>,
    ) -> Result<Response<pb::PgPushReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => self.core.handle_pg_push(header, req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgPushReply { result: encode(&r) }))
    }

    async fn pg_scrub_map(
        &self,
        req: Request<pb::PgScrubMapRequest>,
    ) -> Result<Response<pb::PgScrubMapReply>, Status> {
        let who = peer(&req)?;
        let r = match OsdCore::osd_peer_header(&who, req.get_ref().header.as_ref()) {
            Ok(header) => {
                self.core
                    .handle_pg_scrub_map(header, req.into_inner())
                    .await
            }
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgScrubMapReply { result: encode(&r) }))
    }

    async fn pg_command(
        &self,
        req: Request<pb::PgCommandRequest>,
    ) -> Result<Response<pb::PgCommandReply>, Status> {
        // Scrub and repair read and rewrite every object of the PG.
        let who = peer(&req)?;
        let (pool, epoch) = (req.get_ref().pool, req.get_ref().epoch);
        let r = match self.core.check_pool(&who, pool, epoch, Perm::RWX).await {
            Ok(()) => self.core.handle_pg_command(req.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::PgCommandReply {
            epoch: reply_epoch(&self.core),
            result: encode(&r),
        }))
    }

    async fn pg_stats(
        &self,
        req: Request<pb::PgStatsRequest>,
    ) -> Result<Response<pb::PgStatsReply>, Status> {
        // Only the PGs of pools the peer may read.
        let who = peer(&req)?;
        let map = self.core.current_map();
        let stats: Vec<_> = self
            .core
            .primary_pg_stats()
            .into_iter()
            .filter(|s| {
                map.as_ref()
                    .is_some_and(|m| OsdCore::pool_allows(m, &who, s.pool, Perm::R).is_ok())
            })
            .collect();
        Ok(Response::new(pb::PgStatsReply {
            epoch: reply_epoch(&self.core),
            stats: encode(&stats),
        }))
    }
}
