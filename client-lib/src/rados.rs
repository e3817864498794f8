//! The object side of the client: [`Rados`] (a connected cluster handle following the
//! OSDMap) and [`IoCtx`] (one pool's objects), librados-style.
//!
//! Every op is routed by placement to its PG's acting primary in the client's newest map.
//! When the OSD answers "not primary", "interval changed" or "inactive", cannot be reached,
//! or a newer map names another primary while the op is out (the old one died or froze), the
//! client resends *with the same request id*, so an op that did land is answered from the PG
//! log instead of being applied twice. As in Ceph (`rados_osd_op_timeout = 0`), an op waits
//! as long as that takes unless `osd_op_timeout_ms` sets a bound: a block device above must
//! see a failure of the cluster as a pause, never as an I/O error.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_config::ClusterConfig;
use basalt_maps::{Epoch, OsdMap, PoolId};
use basalt_messenger::{CallError, Peer};
use basalt_ops::{
    decode, encode, LockKind, LockState, NotifyResult, ObjOp, OpError, OpOutput, OpResult,
    PgStateFlag, PgStateFlags, SnapContext, SnapListing, WatcherInfo, MAX_MESSAGE_BYTES,
};
use basalt_placement::{object_to_pg_ns, PgId};
use basalt_proto::auth::AuthChannel;
use basalt_proto::data_path;
use basalt_proto::mon::{command_request::Command, SnapRemove};
use basalt_proto::osd as pb;
use basalt_proto::osd::osd_client::OsdClient;
use bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{ClientError, Credentials, MapSubscription, MonClient};

/// Default watch timeout (Ceph's `osd_client_watch_timeout`).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one attempt of an op without a deadline lets the OSD hold it (waiting for its PG
/// to go active) before answering "inactive", which the client answers with a resend.
const UNBOUNDED_ATTEMPT: Duration = Duration::from_secs(30);

/// A connection to a cluster: monitors, the subscribed OSDMap and OSD connections. Cheap to
/// clone.
#[derive(Clone)]
pub struct Rados {
    inner: Arc<Inner>,
}

struct Inner {
    mon: MonClient,
    sub: MapSubscription,
    entity: String,
    incarnation: u64,
    /// `<entity>/<incarnation>`: see [`Rados::instance`].
    instance: String,
    next_tid: AtomicU64,
    osds: Mutex<HashMap<String, OsdConn>>,
    /// Each PG's acting primary address in one map epoch, so an op does not run CRUSH
    /// (`OsdMap::map_pg`) again for a PG the map has not changed; emptied by a newer map.
    primaries: Mutex<PrimaryCache>,
    /// Bound on object ops (`osd_op_timeout_ms`); None waits as long as it takes.
    op_timeout: Option<Duration>,
    /// Bound on waits for the monitors (`client_op_timeout_ms`), e.g. for a map epoch.
    mon_timeout: Duration,
}

#[derive(Default)]
struct PrimaryCache {
    epoch: Epoch,
    by_pg: HashMap<(PoolId, PgId), Option<String>>,
}

/// Object stat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub mtime_ns: u64,
    pub version: basalt_ops::Eversion,
}

impl Rados {
    /// Connects to the cluster in `config` and subscribes to the OSDMap. The client's entity
    /// name is the config's `[client] name` if set, else random per process
    /// (`client.<16 hex>`), as each librados instance has its own global id.
    pub async fn connect(config: ClusterConfig) -> Result<Rados, ClientError> {
        let entity = config
            .client
            .name
            .clone()
            .unwrap_or_else(|| format!("client.{:016x}", rand_u64()));
        Self::connect_as(config, &entity).await
    }

    /// As [`Rados::connect`] with a chosen entity name (what the blocklist and locks show).
    /// It authenticates with that entity's key if the config's keyring holds it, else as
    /// [`Credentials::from_config`] picks.
    pub async fn connect_as(config: ClusterConfig, entity: &str) -> Result<Rados, ClientError> {
        let creds = Credentials::from_config(&config, Some(entity))?;
        Self::connect_with(config, entity, creds).await
    }

    /// As [`Rados::connect_as`], authenticated as `creds`.
    pub async fn connect_with(
        config: ClusterConfig,
        entity: &str,
        creds: Credentials,
    ) -> Result<Rados, ClientError> {
        if entity.is_empty() || entity.len() > 256 || entity.contains('/') {
            return Err(ClientError::InvalidArgument(format!(
                "client name {entity:?} must be 1..=256 bytes without '/' \
                 ('/' separates a name from its instance nonce)"
            )));
        }
        let op_timeout = match config.timeouts.osd_op_timeout_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms.max(100))),
        };
        let mon_timeout = Duration::from_millis(config.timeouts.client_op_timeout_ms.max(100));
        let mon = MonClient::with_credentials(config, mon_timeout, creds)?;
        let sub = mon.subscribe().await?;
        let incarnation = rand_u64();
        Ok(Rados {
            inner: Arc::new(Inner {
                mon,
                sub,
                entity: entity.to_string(),
                incarnation,
                instance: format!("{entity}/{incarnation}"),
                next_tid: AtomicU64::new(1),
                osds: Mutex::new(HashMap::new()),
                primaries: Mutex::default(),
                op_timeout,
                mon_timeout,
            }),
        })
    }

    /// This client's entity name.
    pub fn entity(&self) -> &str {
        &self.inner.entity
    }

    /// This client instance, `<entity>/<nonce>` with a nonce random per `Rados` (Ceph's
    /// address nonce): what the OSDs record as the owner of its locks and watches, and what
    /// a lock breaker blocklists. Two processes under one fixed name (a gateway and its
    /// restart) are different instances, so fencing one leaves the other serving.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub fn mon(&self) -> &MonClient {
        &self.inner.mon
    }

    /// The newest OSDMap this client has.
    pub fn osdmap(&self) -> Arc<OsdMap> {
        self.inner.sub.current()
    }

    /// The bound on object operations; None: they wait as long as it takes.
    pub fn op_timeout(&self) -> Option<Duration> {
        self.inner.op_timeout
    }

    /// An I/O context on pool `pool` (default namespace).
    pub fn ioctx(&self, pool: &str) -> Result<IoCtx, ClientError> {
        let map = self.osdmap();
        let p = map.pool_by_name(pool).ok_or_else(|| {
            ClientError::NotFound(format!(
                "pool {pool} does not exist (basalt pool ls lists the pools)"
            ))
        })?;
        Ok(IoCtx {
            inner: self.inner.clone(),
            pool: p.id,
            pool_name: pool.to_string(),
            namespace: String::new(),
            full_try: false,
            snapc: SnapContext::default(),
            read_snap: 0,
        })
    }

    /// Every PG of every pool with its state, as the primaries report it. A PG whose primary
    /// does not answer is `unknown`; one without a primary in the map is `down`.
    pub async fn pg_stats(&self) -> Result<Vec<basalt_ops::PgStat>, ClientError> {
        let map = self.osdmap();
        let mut reported: BTreeMap<(u32, u32), basalt_ops::PgStat> = BTreeMap::new();
        let mut asks = Vec::new();
        for info in map.osds.values().filter(|o| o.up) {
            let mut c = self.inner.osd(&info.addr)?.grpc;
            asks.push(async move {
                tokio::time::timeout(Duration::from_secs(5), c.pg_stats(pb::PgStatsRequest {}))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .and_then(|r| {
                        decode::<Vec<basalt_ops::PgStat>>(&r.get_ref().stats, "PG stats").ok()
                    })
                    .unwrap_or_default()
            });
        }
        for stats in futures::future::join_all(asks).await {
            for s in stats {
                reported.insert((s.pool, s.seed), s);
            }
        }
        let mut out = Vec::new();
        for pool in map.pools.values() {
            for seed in 0..pool.pg_num {
                let pg = PgId {
                    pool: pool.id,
                    seed,
                };
                if let Some(s) = reported.remove(&(pool.id, seed)) {
                    out.push(s);
                    continue;
                }
                let mapping = map.map_pg(pool, pg).ok();
                let primary = mapping.as_ref().and_then(|m| m.acting_primary);
                out.push(basalt_ops::PgStat {
                    pgid: pg.to_string(),
                    pool: pool.id,
                    seed,
                    state: PgStateFlags::from([if primary.is_some() {
                        PgStateFlag::Unknown
                    } else {
                        PgStateFlag::Down
                    }]),
                    acting: mapping.map(|m| m.acting).unwrap_or_default(),
                    primary: primary.unwrap_or(u32::MAX),
                    interval_epoch: 0,
                    last_seq: 0,
                    detail: if primary.is_some() {
                        "its primary did not report".into()
                    } else {
                        "no OSD of its acting set is up".into()
                    },
                });
            }
        }
        Ok(out)
    }

    /// Asks PG `pg`'s primary to scrub, deep-scrub or repair it, and waits for the result.
    pub async fn pg_command(
        &self,
        pg: PgId,
        command: basalt_ops::PgCommand,
    ) -> Result<basalt_ops::ScrubResult, ClientError> {
        let inner = &self.inner;
        let map = inner.sub.current();
        let pool = map
            .pools
            .get(&pg.pool)
            .ok_or_else(|| ClientError::NotFound(format!("pool {} of PG {pg}", pg.pool)))?;
        if pg.seed >= pool.pg_num {
            return Err(ClientError::NotFound(format!(
                "PG {pg}: pool {} has {} PGs",
                pool.name, pool.pg_num
            )));
        }
        let command = encode(&command);
        inner
            .call_primary(
                pg.pool,
                |_| Ok(pg),
                &format!("PG {pg}"),
                inner.deadline(),
                |c, map, _, _| {
                    let req = pb::PgCommandRequest {
                        pool: pg.pool,
                        pg_seed: pg.seed,
                        epoch: map.epoch,
                        command: command.clone(),
                    };
                    async move {
                        let mut grpc = c.grpc;
                        grpc.pg_command(req)
                            .await
                            .map_err(AttemptError::from)
                            .map(|r| {
                                let r = r.into_inner();
                                (r.epoch, r.result)
                            })
                    }
                },
            )
            .await
    }

    /// Blocklists `entity` for `expire` and returns once this client's map carries the
    /// blocklist, so every op it sends afterwards makes OSDs refuse `entity` first.
    pub async fn blocklist_add(
        &self,
        entity: &str,
        expire: Duration,
    ) -> Result<Epoch, ClientError> {
        let reply = self
            .inner
            .mon
            .blocklist_add(entity, expire.as_secs().max(1))
            .await?;
        let mut sub = self.inner.sub.clone();
        sub.wait_for_epoch(reply.epoch, self.inner.mon_timeout)
            .await?;
        Ok(reply.epoch)
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; two of them in one process differ too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl Inner {
    fn osd(&self, addr: &str) -> Result<OsdConn, ClientError> {
        let mut m = self.osds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let connector = self.mon.connector().clone();
        let channel = crate::lazy_channel(addr, &connector, Duration::from_secs(2))
            .map_err(|e| ClientError::Internal(format!("OSD: {e}")))?;
        let c = OsdConn {
            grpc: OsdClient::new(basalt_proto::auth::authorized(
                channel,
                self.mon.osd_ticket(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            data: Arc::new(Peer::new(
                addr,
                connector,
                Duration::from_secs(2),
                MAX_MESSAGE_BYTES,
                self.mon.osd_ticket(),
            )),
        };
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The acting primary of `pg` in `map` and its address, if any.
    fn primary(&self, map: &OsdMap, pool: PoolId, pg: PgId) -> Option<String> {
        let compute = || {
            let p = map.pools.get(&pool)?;
            let mapping = map.map_pg(p, pg).ok()?;
            let primary = mapping.acting_primary?;
            map.osds.get(&primary).map(|o| o.addr.clone())
        };
        let mut cache = self.primaries.lock().unwrap_or_else(|p| p.into_inner());
        if cache.epoch != map.epoch {
            if map.epoch < cache.epoch {
                // An older map than the cached one (a caller still on it): no caching.
                return compute();
            }
            cache.epoch = map.epoch;
            cache.by_pg.clear();
        }
        cache
            .by_pg
            .entry((pool, pg))
            .or_insert_with(compute)
            .clone()
    }

    /// When an op started now must be answered, if it has a bound.
    fn deadline(&self) -> Option<Instant> {
        self.op_timeout.map(|t| Instant::now() + t)
    }

    /// Waits (bounded by `deadline`, and by `cap`) for a map newer than `than`.
    async fn newer_map(&self, than: Epoch, deadline: Option<Instant>, cap: Duration) {
        let mut sub = self.sub.clone();
        let limit = deadline.map_or(cap, |d| {
            d.saturating_duration_since(Instant::now()).min(cap)
        });
        let _ = sub.wait_for_epoch(than + 1, limit).await;
    }

    /// Resolves once a map newer than `sent` gives `pg_of`'s PG a primary other than `addr`
    /// (or none): a request out to `addr` will then never be answered usefully (the OSD died
    /// or froze, and the PG re-peered without it), so the caller resends to the new one, as
    /// Ceph's Objecter does on every map that changes an op's target.
    async fn target_moved(
        &self,
        sent: Epoch,
        pool: PoolId,
        pg_of: &impl Fn(&OsdMap) -> Result<PgId, ClientError>,
        addr: &str,
    ) {
        let mut sub = self.sub.clone();
        let mut seen = sent;
        loop {
            let Some(map) = sub.newer_than(seen).await else {
                // The subscription is gone: no map will ever move the target.
                return std::future::pending().await;
            };
            seen = map.epoch;
            let moved = match pg_of(&map) {
                Ok(pg) => self.primary(&map, pool, pg).as_deref() != Some(addr),
                Err(_) => true,
            };
            if moved {
                return;
            }
        }
    }

    /// Sends a request to the acting primary of the PG `pg_of` picks in the newest map,
    /// again and again until an answer other than "resend" or `deadline` (None: no bound):
    /// after "not primary" / "interval changed" (waiting for the epoch the OSD names), an OSD
    /// behind the client's map, an unreachable primary or none at all, it waits for a newer
    /// map first; after "inactive" (the OSD held it while the PG could not serve) it asks
    /// again; and a request out to a primary that a newer map replaces is abandoned and sent
    /// to the new one. Every resend carries what `send` builds from the same inputs, so a
    /// write keeps its request id and the PG log answers a resend of one that landed. `send`
    /// builds the request for one attempt (map, PG, how long the OSD may hold it) and returns
    /// the reply's (epoch, encoded `Result<T, OpError>`); `what` names the target in errors.
    async fn call_primary<T, F, Fut>(
        &self,
        pool: PoolId,
        pg_of: impl Fn(&OsdMap) -> Result<PgId, ClientError>,
        what: &str,
        deadline: Option<Instant>,
        mut send: F,
    ) -> Result<T, ClientError>
    where
        T: for<'de> serde::Deserialize<'de>,
        F: FnMut(OsdConn, &OsdMap, PgId, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<(Epoch, Bytes), AttemptError>>,
    {
        let mut last_err: Option<String> = None;
        let timed_out = |last: Option<String>| {
            let limit = self.op_timeout.unwrap_or_default();
            match last {
                Some(why) => {
                    ClientError::Unavailable(format!("{what} not served within {limit:?}: {why}"))
                }
                None => ClientError::Timeout(limit),
            }
        };
        loop {
            let map = self.sub.current();
            let pg = pg_of(&map)?;
            let remaining = match deadline {
                Some(d) => match d.saturating_duration_since(Instant::now()) {
                    r if r.is_zero() => return Err(timed_out(last_err)),
                    r => Some(r),
                },
                None => None,
            };
            let budget = remaining.unwrap_or(UNBOUNDED_ATTEMPT);
            let Some(addr) = self.primary(&map, pool, pg) else {
                last_err = Some(format!("PG {pg} has no primary at epoch {}", map.epoch));
                self.newer_map(map.epoch, deadline, budget).await;
                continue;
            };
            let client = self.osd(&addr)?;
            let attempt = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, send(client, &map, pg, budget))
                        .await
                        .ok(),
                    None => Some(send(client, &map, pg, budget).await),
                }
            };
            let reply = tokio::select! {
                r = attempt => r,
                () = self.target_moved(map.epoch, pool, &pg_of, &addr) => {
                    last_err = Some(format!("the primary of PG {pg} changed while {addr} held the request"));
                    continue;
                }
            };
            match reply {
                None => return Err(timed_out(last_err)),
                Some(Err(AttemptError::Failed(e))) => return Err(e),
                Some(Err(AttemptError::Unreachable(why))) => {
                    // The primary is unreachable (dead, restarting): the monitors will mark
                    // it down; resend to whoever the next map names.
                    last_err = Some(format!("OSD {addr}: {why}"));
                    self.newer_map(map.epoch, deadline, Duration::from_millis(500))
                        .await;
                }
                Some(Ok((reply_epoch, bytes))) => {
                    // Read payloads stay slices of the received frame (no copy).
                    let r: Result<T, OpError> = basalt_ops::decode_shared(&bytes, "OSD reply")
                        .map_err(|e| ClientError::Decode(e.to_string()))?;
                    let e = match r {
                        Ok(v) => return Ok(v),
                        Err(e) => e,
                    };
                    let behind = matches!(e, OpError::MapBehind { .. });
                    let inactive = matches!(e, OpError::Inactive { .. });
                    if !e.is_resend() && !behind && !inactive {
                        return Err(op_error(e, what));
                    }
                    let wanted = match &e {
                        OpError::NotPrimary { epoch, .. }
                        | OpError::IntervalChanged { epoch, .. } => *epoch,
                        _ => 0,
                    }
                    .max(reply_epoch);
                    last_err = Some(e.to_string());
                    if inactive {
                        // The OSD already waited `budget` for the PG; ask again at once
                        // (the loop gives up first if the deadline passed meanwhile).
                        continue;
                    }
                    if wanted > map.epoch {
                        let mut sub = self.sub.clone();
                        let _ = sub.wait_for_epoch(wanted, budget).await;
                    } else {
                        self.newer_map(map.epoch, deadline, Duration::from_millis(200))
                            .await;
                    }
                }
            }
        }
    }
}

/// Records how long one stage of an object op took in this client
/// (`basalt_client_op_stage_seconds`): `encode`, each `rpc` attempt (request sent to reply
/// decoded), and the whole `op` (routing, waits for maps and resends included).
fn stage(name: &'static str, since: std::time::Instant) {
    metrics::histogram!("basalt_client_op_stage_seconds", "stage" => name)
        .record(since.elapsed().as_secs_f64());
}

/// The ways to one OSD: the data-path messenger for object ops, gRPC for the rest
/// (listing, notify, PG commands). Cheap to clone.
#[derive(Clone)]
struct OsdConn {
    grpc: OsdClient<AuthChannel>,
    data: Arc<Peer>,
}

/// How one attempt to have a primary answer failed.
enum AttemptError {
    /// Not reached, or the connection broke mid-request (it may or may not have landed):
    /// resend, with the same request id, to whoever the next map names.
    Unreachable(String),
    /// Answered, and the answer is the outcome.
    Failed(ClientError),
}

impl From<tonic::Status> for AttemptError {
    fn from(s: tonic::Status) -> Self {
        if is_connection_failure(&s) {
            AttemptError::Unreachable(s.message().to_string())
        } else {
            AttemptError::Failed(ClientError::from(s))
        }
    }
}

impl From<CallError> for AttemptError {
    fn from(e: CallError) -> Self {
        if e.is_connection_failure() {
            AttemptError::Unreachable(e.to_string())
        } else if let CallError::Unauthenticated { .. } = e {
            AttemptError::Failed(ClientError::Unauthenticated(e.to_string()))
        } else {
            // The OSD could not decode what this client sent: a bug on one side, and
            // resending the same bytes would not help.
            AttemptError::Failed(ClientError::Internal(e.to_string()))
        }
    }
}

/// Whether a gRPC failure means the OSD could not be reached or the connection broke (the
/// request may or may not have landed; a resend with the same request id is safe), as
/// opposed to a definite refusal of the request itself (too large, not implemented...). The
/// OSD answers every op inside a successful reply, so `Internal` only comes from HTTP/2
/// (a stream or connection reset, e.g. by a stopping OSD) and is retried too.
fn is_connection_failure(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
    )
}

fn op_error(e: OpError, what: &str) -> ClientError {
    match e {
        OpError::NotFound => ClientError::NotFound(what.to_string()),
        OpError::Exists => ClientError::Exists(what.to_string()),
        OpError::Busy(m) => ClientError::Busy(format!("{what}: {m}")),
        OpError::CmpFailed(m) => ClientError::FailedPrecondition(format!("{what}: {m}")),
        OpError::InvalidArgument(m) => ClientError::InvalidArgument(format!("{what}: {m}")),
        OpError::NoSpace(m) => ClientError::NoSpace(format!("{what}: {m}")),
        e @ OpError::PoolFull { .. } => ClientError::PoolFull(format!("{what}: {e}")),
        OpError::Blocklisted(m) => ClientError::Blocklisted(m),
        OpError::PermissionDenied(m) => ClientError::PermissionDenied(m),
        OpError::NoSuchPool(p) => ClientError::NotFound(format!("pool {p}")),
        OpError::Corrupt(m) => ClientError::Io(format!("{what}: {m}")),
        OpError::Io(m) => ClientError::Io(format!("{what}: {m}")),
        e @ (OpError::Inactive { .. }
        | OpError::NotPrimary { .. }
        | OpError::IntervalChanged { .. }
        | OpError::MapBehind { .. }) => ClientError::Unavailable(format!("{what}: {e}")),
        // Only OSDs send peer messages; an OSD answering a client with this is a bug there.
        e @ OpError::BadPeerMessage(_) => ClientError::Internal(format!("{what}: {e}")),
    }
}

/// One pool's objects (in one namespace). Cheap to clone.
#[derive(Clone)]
pub struct IoCtx {
    inner: Arc<Inner>,
    pool: PoolId,
    pool_name: String,
    namespace: String,
    /// Requests carry Ceph's FULL_TRY ([`IoCtx::set_full_try`]).
    full_try: bool,
    /// The snap context writes carry ([`IoCtx::set_snap_context`]).
    snapc: SnapContext,
    /// The snapshot reads are of (0: the head; [`IoCtx::at_snap`]).
    read_snap: u64,
}

/// An event on a [`Watch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Somebody notified the object; answer with [`IoCtx::notify_ack`].
    Notify {
        notify_id: u64,
        notifier: String,
        payload: Bytes,
    },
    /// The watch is gone (timed out, blocklisted, object removed); no more events follow.
    Lost(ClientError),
}

/// A live watch. Dropping it (or [`Watch::unwatch`]) ends it.
pub struct Watch {
    pub cookie: u64,
    pub events: mpsc::Receiver<WatchEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    pub fn unwatch(self) {}
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IoCtx {
    pub fn pool_name(&self) -> &str {
        &self.pool_name
    }

    pub fn pool_id(&self) -> PoolId {
        self.pool
    }

    /// Marks every later request of this IoCtx as freeing space (librados'
    /// `set_osdmap_full_try`): on a full pool the OSD then also runs requests that change the
    /// metadata of existing objects (an image header, its lock), which `rbd rm` and a shrink
    /// need, but still refuses any that would create an object or store data. Without it a
    /// full pool runs only requests whose ops can only free space (removes, truncates...).
    pub fn set_full_try(&mut self, full_try: bool) {
        self.full_try = full_try;
    }

    /// Every later write carries this snap context (librados'
    /// `selfmanaged_snap_set_write_ctx`): `seq` the newest snapshot id the writer knows, `snaps`
    /// the snapshots of what it writes, newest first. Checked here, so a malformed one fails
    /// before anything is sent.
    pub fn set_snap_context(&mut self, snapc: SnapContext) -> Result<(), ClientError> {
        snapc
            .validate()
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?;
        self.snapc = snapc;
        Ok(())
    }

    /// The same pool, reading at snapshot `snap` (librados' `snap_set_read`; 0: the head).
    /// Writes through it are refused by the OSD: snapshots are read-only.
    pub fn at_snap(&self, snap: u64) -> IoCtx {
        IoCtx {
            read_snap: snap,
            ..self.clone()
        }
    }

    /// Allocates a new self-managed snapshot id in this pool (a Paxos-committed counter).
    pub async fn selfmanaged_snap_create(&self) -> Result<u64, ClientError> {
        let reply = self
            .inner
            .mon
            .command(Command::SnapCreate(self.pool_name.clone()))
            .await?;
        match reply.snap_id {
            0 => Err(ClientError::Decode(
                "the monitor allocated no snapshot id".into(),
            )),
            id => Ok(id),
        }
    }

    /// Marks snapshot `snap` removed: the OSDs trim its clones in the background, and no
    /// write carries it from the map that records the removal on.
    pub async fn selfmanaged_snap_remove(&self, snap: u64) -> Result<(), ClientError> {
        self.inner
            .mon
            .command(Command::SnapRemove(SnapRemove {
                pool: self.pool_name.clone(),
                snap,
            }))
            .await
            .map(|_| ())
    }

    /// The object's clones and what each preserves (librados' `list_snaps`).
    pub async fn list_snaps(&self, oid: &str) -> Result<SnapListing, ClientError> {
        match self.one(oid, ObjOp::ListSnaps).await? {
            OpOutput::Snaps(l) => Ok(l),
            o => Err(unexpected(o)),
        }
    }

    /// Makes the object what it was at snapshot `snap` (removing it if it did not exist
    /// then), preserving the current state for newer snapshots first.
    pub async fn rollback(&self, oid: &str, snap: u64) -> Result<(), ClientError> {
        self.operate(oid, vec![ObjOp::Rollback { snap }])
            .await
            .map(|_| ())
    }

    /// The same pool in namespace `ns`.
    pub fn with_namespace(&self, ns: &str) -> IoCtx {
        IoCtx {
            namespace: ns.to_string(),
            ..self.clone()
        }
    }

    fn what(&self, oid: &str) -> String {
        if self.namespace.is_empty() {
            format!("object {}/{oid}", self.pool_name)
        } else {
            format!("object {}/{}/{oid}", self.pool_name, self.namespace)
        }
    }

    fn pg_of(&self, map: &OsdMap, oid: &str) -> Result<PgId, ClientError> {
        let p = map.pools.get(&self.pool).ok_or_else(|| {
            ClientError::NotFound(format!("pool {} no longer exists", self.pool_name))
        })?;
        Ok(object_to_pg_ns(&p.placement(), &self.namespace, oid))
    }

    /// Runs a compound request on one object, atomically; resends across map changes.
    pub async fn operate(&self, oid: &str, ops: Vec<ObjOp>) -> Result<OpResult, ClientError> {
        if oid.is_empty() {
            return Err(ClientError::InvalidArgument("empty object name".into()));
        }
        for op in &ops {
            op.validate().map_err(|e| op_error(e, &self.what(oid)))?;
        }
        let inner = &self.inner;
        let reqid = pb::ReqId {
            client: inner.entity.clone(),
            incarnation: inner.incarnation,
            tid: inner.next_tid.fetch_add(1, Ordering::Relaxed),
        };
        let started = std::time::Instant::now();
        let ops = encode(&ops);
        stage("encode", started);
        let deadline = inner.deadline();
        let r = inner
            .call_primary(
                self.pool,
                |map| self.pg_of(map, oid),
                &self.what(oid),
                deadline,
                |c, map, pg, remaining| {
                    let req = pb::OpRequest {
                        pool: self.pool,
                        pg_seed: pg.seed,
                        namespace: self.namespace.clone(),
                        object: oid.to_string(),
                        epoch: map.epoch,
                        reqid: Some(reqid.clone()),
                        ops: ops.clone(),
                        timeout_ms: osd_wait_ms(remaining),
                        full_try: self.full_try,
                        snap_seq: self.snapc.seq,
                        snaps: self.snapc.snaps.clone(),
                        read_snap: self.read_snap,
                    };
                    async move {
                        let sent = std::time::Instant::now();
                        let reply = c
                            .data
                            .call(data_path::OP, Bytes::from(req.encode_to_vec()))
                            .await
                            .map_err(AttemptError::from)
                            .and_then(|b| {
                                let r = pb::OpReply::decode(b).map_err(|e| {
                                    AttemptError::Failed(ClientError::Decode(format!(
                                        "OSD op reply: {e}"
                                    )))
                                })?;
                                Ok((r.epoch, r.result))
                            });
                        stage("rpc", sent);
                        reply
                    }
                },
            )
            .await;
        stage("op", started);
        r
    }

    async fn one(&self, oid: &str, op: ObjOp) -> Result<OpOutput, ClientError> {
        let mut r = self.operate(oid, vec![op]).await?;
        Ok(r.outputs.pop().unwrap_or(OpOutput::None))
    }

    async fn write_op(&self, oid: &str, op: ObjOp) -> Result<(), ClientError> {
        self.operate(oid, vec![op]).await.map(|_| ())
    }

    /// Up to `len` bytes from `offset` (short at the end of the object).
    pub async fn read(&self, oid: &str, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        match self.one(oid, ObjOp::Read { offset, len }).await? {
            OpOutput::Data(d) => Ok(d),
            o => Err(unexpected(o)),
        }
    }

    pub async fn write(&self, oid: &str, offset: u64, data: Bytes) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Write { offset, data }).await
    }

    pub async fn write_full(&self, oid: &str, data: Bytes) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::WriteFull { data }).await
    }

    pub async fn append(&self, oid: &str, data: Bytes) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Append { data }).await
    }

    pub async fn truncate(&self, oid: &str, size: u64) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Truncate { size }).await
    }

    /// Zeroes a range (a no-op on a missing object).
    pub async fn zero(&self, oid: &str, offset: u64, len: u64) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Zero { offset, len }).await
    }

    pub async fn create(&self, oid: &str, exclusive: bool) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Create { exclusive }).await
    }

    pub async fn remove(&self, oid: &str) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::Remove).await
    }

    pub async fn stat(&self, oid: &str) -> Result<ObjectStat, ClientError> {
        match self.one(oid, ObjOp::Stat).await? {
            OpOutput::Stat {
                size,
                mtime_ns,
                version,
            } => Ok(ObjectStat {
                size,
                mtime_ns,
                version,
            }),
            o => Err(unexpected(o)),
        }
    }

    pub async fn getxattr(&self, oid: &str, name: &str) -> Result<Option<Bytes>, ClientError> {
        match self.one(oid, ObjOp::GetXattr { name: name.into() }).await? {
            OpOutput::Xattr(v) => Ok(v),
            o => Err(unexpected(o)),
        }
    }

    pub async fn getxattrs(&self, oid: &str) -> Result<BTreeMap<String, Bytes>, ClientError> {
        match self.one(oid, ObjOp::GetXattrs).await? {
            OpOutput::Xattrs(v) => Ok(v),
            o => Err(unexpected(o)),
        }
    }

    pub async fn setxattr(&self, oid: &str, name: &str, value: Bytes) -> Result<(), ClientError> {
        self.write_op(
            oid,
            ObjOp::SetXattr {
                name: name.into(),
                value,
            },
        )
        .await
    }

    pub async fn rmxattr(&self, oid: &str, name: &str) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::RmXattr { name: name.into() })
            .await
    }

    /// One page of omap entries after `start_after`; the bool says whether more follow.
    pub async fn omap_get_vals(
        &self,
        oid: &str,
        start_after: Option<&[u8]>,
        max: u32,
    ) -> Result<(Vec<(Bytes, Bytes)>, bool), ClientError> {
        let op = ObjOp::OmapGetVals {
            start_after: start_after.map(Bytes::copy_from_slice),
            max,
        };
        match self.one(oid, op).await? {
            OpOutput::Omap { entries, more } => Ok((entries, more)),
            o => Err(unexpected(o)),
        }
    }

    pub async fn omap_get_vals_by_keys(
        &self,
        oid: &str,
        keys: &[&[u8]],
    ) -> Result<Vec<(Bytes, Bytes)>, ClientError> {
        let op = ObjOp::OmapGetValsByKeys {
            keys: keys.iter().map(|k| Bytes::copy_from_slice(k)).collect(),
        };
        match self.one(oid, op).await? {
            OpOutput::Omap { entries, .. } => Ok(entries),
            o => Err(unexpected(o)),
        }
    }

    pub async fn omap_get_header(&self, oid: &str) -> Result<Option<Bytes>, ClientError> {
        match self.one(oid, ObjOp::OmapGetHeader).await? {
            OpOutput::OmapHeader(h) => Ok(h),
            o => Err(unexpected(o)),
        }
    }

    pub async fn omap_set(
        &self,
        oid: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::OmapSet { entries }).await
    }

    pub async fn omap_set_header(&self, oid: &str, header: Bytes) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::OmapSetHeader { header }).await
    }

    pub async fn omap_rm_keys(&self, oid: &str, keys: Vec<Bytes>) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::OmapRmKeys { keys }).await
    }

    pub async fn omap_clear(&self, oid: &str) -> Result<(), ClientError> {
        self.write_op(oid, ObjOp::OmapClear).await
    }

    /// Takes advisory lock `name` (cls_lock semantics, enforced by the OSD); `Busy` if held.
    pub async fn lock(
        &self,
        oid: &str,
        name: &str,
        kind: LockKind,
        cookie: &str,
        tag: &str,
        description: &str,
    ) -> Result<(), ClientError> {
        self.write_op(
            oid,
            ObjOp::Lock {
                name: name.into(),
                kind,
                cookie: cookie.into(),
                tag: tag.into(),
                description: description.into(),
            },
        )
        .await
    }

    pub async fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), ClientError> {
        self.write_op(
            oid,
            ObjOp::Unlock {
                name: name.into(),
                cookie: cookie.into(),
            },
        )
        .await
    }

    /// Removes another client's hold on a lock (after fencing it).
    pub async fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), ClientError> {
        self.write_op(
            oid,
            ObjOp::BreakLock {
                name: name.into(),
                client: client.into(),
                cookie: cookie.into(),
            },
        )
        .await
    }

    pub async fn lock_info(&self, oid: &str, name: &str) -> Result<LockState, ClientError> {
        match self.one(oid, ObjOp::LockInfo { name: name.into() }).await? {
            OpOutput::Lock(l) => Ok(l),
            o => Err(unexpected(o)),
        }
    }

    pub async fn list_watchers(&self, oid: &str) -> Result<Vec<WatcherInfo>, ClientError> {
        match self.one(oid, ObjOp::ListWatchers).await? {
            OpOutput::Watchers(w) => Ok(w),
            o => Err(unexpected(o)),
        }
    }

    /// Every object name in the pool (this namespace), PG by PG. A listing during which the
    /// pool's PGs were split starts again: objects of the PGs already listed may have moved
    /// into new PGs (OSDs refuse a page asked for with the old `pg_num`).
    pub async fn list_objects(&self) -> Result<Vec<String>, ClientError> {
        loop {
            let pg_num = self.pg_num()?;
            let out = self.list_objects_of(pg_num).await?;
            if self.pg_num()? == pg_num {
                return Ok(out);
            }
        }
    }

    fn pg_num(&self) -> Result<u32, ClientError> {
        let map = self.inner.sub.current();
        Ok(map
            .pools
            .get(&self.pool)
            .ok_or_else(|| ClientError::NotFound(format!("pool {}", self.pool_name)))?
            .pg_num)
    }

    async fn list_objects_of(&self, pg_num: u32) -> Result<Vec<String>, ClientError> {
        let mut out = Vec::new();
        for seed in 0..pg_num {
            let mut after: Option<(String, String)> = None;
            loop {
                let page = self.list_page(seed, after.as_ref()).await?;
                out.extend(
                    page.objects
                        .into_iter()
                        .filter(|(ns, _)| *ns == self.namespace)
                        .map(|(_, n)| n),
                );
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    async fn list_page(
        &self,
        seed: u32,
        after: Option<&(String, String)>,
    ) -> Result<ListPage, ClientError> {
        let inner = &self.inner;
        let pg = PgId {
            pool: self.pool,
            seed,
        };
        let start_after = after.map(|a| encode(&Some(a.clone()))).unwrap_or_default();
        inner
            .call_primary(
                self.pool,
                |_| Ok(pg),
                &format!("PG {pg}"),
                inner.deadline(),
                |c, map, _, remaining| {
                    let req = pb::ListRequest {
                        pool: self.pool,
                        pg_seed: seed,
                        epoch: map.epoch,
                        client: inner.instance.clone(),
                        start_after: start_after.clone(),
                        max: 1000,
                        timeout_ms: osd_wait_ms(remaining),
                        pg_num: map.pools.get(&self.pool).map_or(0, |p| p.pg_num),
                    };
                    async move {
                        let mut grpc = c.grpc;
                        grpc.list_objects(req)
                            .await
                            .map_err(AttemptError::from)
                            .map(|r| {
                                let r = r.into_inner();
                                (r.epoch, r.result)
                            })
                    }
                },
            )
            .await
    }

    /// Watches `oid` (which must exist). Notifications arrive on [`Watch::events`]; the watch
    /// follows the object's primary across map changes and ends if this client stops pinging
    /// for `timeout` (frozen, partitioned) or is blocklisted.
    pub async fn watch(&self, oid: &str, timeout: Duration) -> Result<Watch, ClientError> {
        let cookie = rand_u64() >> 1;
        let (tx, rx) = mpsc::channel(64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let ioctx = self.clone();
        let oid = oid.to_string();
        let task = tokio::spawn(async move {
            ioctx
                .run_watch(oid, cookie, timeout, tx, Some(ready_tx))
                .await;
        });
        let watch = Watch {
            cookie,
            events: rx,
            task,
        };
        // Without an op bound, run_watch itself retries until the watch is registered.
        let limit = self.inner.op_timeout.unwrap_or(Duration::MAX);
        match tokio::time::timeout(limit, ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(watch),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ClientError::Internal("watch task ended".into())),
            Err(_) => Err(ClientError::Timeout(limit)),
        }
    }

    async fn run_watch(
        &self,
        oid: String,
        cookie: u64,
        timeout: Duration,
        events: mpsc::Sender<WatchEvent>,
        mut ready: Option<tokio::sync::oneshot::Sender<Result<(), ClientError>>>,
    ) {
        let inner = &self.inner;
        let what = self.what(&oid);
        let fail = |ready: &mut Option<tokio::sync::oneshot::Sender<Result<(), ClientError>>>,
                    e: ClientError| {
            match ready.take() {
                Some(r) => {
                    let _ = r.send(Err(e));
                }
                None => {
                    let _ = events.try_send(WatchEvent::Lost(e));
                }
            }
        };
        // Bounds re-registering (from the start, or from the last time the watch was up).
        let mut attempt_deadline = inner.deadline();
        loop {
            let map = inner.sub.current();
            let pg = match self.pg_of(&map, &oid) {
                Ok(pg) => pg,
                Err(e) => return fail(&mut ready, e),
            };
            if attempt_deadline.is_some_and(|d| Instant::now() > d) {
                let limit = inner.op_timeout.unwrap_or_default();
                return fail(&mut ready, ClientError::Timeout(limit));
            }
            let Some(addr) = inner.primary(&map, self.pool, pg) else {
                inner
                    .newer_map(map.epoch, attempt_deadline, Duration::from_secs(1))
                    .await;
                continue;
            };
            let mut client = match inner.osd(&addr) {
                Ok(c) => c.grpc,
                Err(e) => return fail(&mut ready, e),
            };
            let first = pb::WatchPing {
                pool: self.pool,
                pg_seed: pg.seed,
                namespace: self.namespace.clone(),
                object: oid.clone(),
                client: inner.instance.clone(),
                cookie,
                epoch: map.epoch,
                timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
            };
            let interval = (timeout / 4).max(Duration::from_millis(100));
            let pings = async_stream(first, interval);
            let mut registered = false;
            let session = async {
                let mut stream = match client.watch(pings).await {
                    Ok(s) => s.into_inner(),
                    Err(_) => return None,
                };
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) if !ev.error.is_empty() => {
                            return Some(
                                decode::<OpError>(&ev.error, "watch error").unwrap_or_else(|e| e),
                            )
                        }
                        Ok(Some(ev)) if ev.notify_id == 0 => {
                            registered = true;
                            if let Some(r) = ready.take() {
                                let _ = r.send(Ok(()));
                            }
                        }
                        Ok(Some(ev)) => {
                            let _ = events
                                .send(WatchEvent::Notify {
                                    notify_id: ev.notify_id,
                                    notifier: ev.notifier,
                                    payload: ev.payload,
                                })
                                .await;
                        }
                        // Stream broken: the OSD died or the connection dropped.
                        Ok(None) | Err(_) => return None,
                    }
                }
            };
            // A primary that froze keeps the stream open but silent: follow the map to the
            // new one instead, as for any other op.
            let pg_of = |m: &OsdMap| self.pg_of(m, &oid);
            let outcome: Option<OpError> = tokio::select! {
                o = session => o,
                () = inner.target_moved(map.epoch, self.pool, &pg_of, &addr) => None,
            };
            match outcome {
                Some(e) if e.is_resend() || matches!(e, OpError::Inactive { .. }) => {
                    inner
                        .newer_map(map.epoch, None, Duration::from_secs(1))
                        .await;
                }
                Some(OpError::MapBehind { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(e) => return fail(&mut ready, op_error(e, &what)),
                None => {
                    inner
                        .newer_map(map.epoch, None, Duration::from_millis(500))
                        .await;
                }
            }
            if registered {
                attempt_deadline = inner.deadline();
            }
        }
    }

    /// Notifies every watcher of `oid` and waits (up to `timeout`) for their acks.
    pub async fn notify(
        &self,
        oid: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<NotifyResult, ClientError> {
        let inner = &self.inner;
        // The OSD waits up to `timeout` for acks; the call may take that long and more.
        let deadline = inner
            .op_timeout
            .map(|t| Instant::now() + t.max(timeout + Duration::from_secs(5)));
        inner
            .call_primary(
                self.pool,
                |map| self.pg_of(map, oid),
                &self.what(oid),
                deadline,
                |c, map, pg, _| {
                    let req = pb::NotifyRequest {
                        pool: self.pool,
                        pg_seed: pg.seed,
                        namespace: self.namespace.clone(),
                        object: oid.to_string(),
                        client: inner.instance.clone(),
                        epoch: map.epoch,
                        payload: payload.clone(),
                        timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
                    };
                    async move {
                        let mut grpc = c.grpc;
                        grpc.notify(req).await.map_err(AttemptError::from).map(|r| {
                            let r = r.into_inner();
                            (r.epoch, r.result)
                        })
                    }
                },
            )
            .await
    }

    /// Answers notification `notify_id` received on watch `cookie`.
    pub async fn notify_ack(
        &self,
        oid: &str,
        notify_id: u64,
        cookie: u64,
        reply: Bytes,
    ) -> Result<(), ClientError> {
        let inner = &self.inner;
        let map = inner.sub.current();
        let pg = self.pg_of(&map, oid)?;
        let addr = inner
            .primary(&map, self.pool, pg)
            .ok_or_else(|| ClientError::Unavailable(format!("PG {pg} has no primary")))?;
        let mut client = inner.osd(&addr)?.grpc;
        let req = pb::NotifyAckRequest {
            pool: self.pool,
            pg_seed: pg.seed,
            client: inner.instance.clone(),
            notify_id,
            cookie,
            reply,
        };
        // Not resent: an ack is worthless once the notifier's own timeout has passed.
        let limit = inner.op_timeout.unwrap_or(inner.mon_timeout);
        tokio::time::timeout(limit, client.notify_ack(req))
            .await
            .map_err(|_| ClientError::Timeout(limit))?
            .map_err(ClientError::from)?;
        Ok(())
    }
}

/// One page of a PG listing (mirrors the OSD's `pg::Listing`).
#[derive(serde::Deserialize)]
struct ListPage {
    objects: Vec<(String, String)>,
    next: Option<(String, String)>,
}

/// How long the OSD may hold a request: a little less than the client waits, so an OSD that
/// gives up (e.g. on an inactive PG) gets its reason back before the client's own timeout.
fn osd_wait_ms(remaining: Duration) -> u32 {
    let margin = (remaining / 10).min(Duration::from_millis(500));
    remaining
        .saturating_sub(margin)
        .as_millis()
        .min(u32::MAX as u128) as u32
}

fn unexpected(o: OpOutput) -> ClientError {
    ClientError::Decode(format!("unexpected op output {o:?}"))
}

/// The watch request followed by a ping every `interval`, as a stream for tonic.
fn async_stream(
    first: pb::WatchPing,
    interval: Duration,
) -> impl tokio_stream::Stream<Item = pb::WatchPing> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let ping = pb::WatchPing {
            cookie: first.cookie,
            ..Default::default()
        };
        if tx.send(first).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(interval).await;
            if tx.send(ping.clone()).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
