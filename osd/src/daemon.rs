//! The `basalt-osd` daemon's life cycle with the monitors; each new map goes on to the data path
//! ([`crate::service::OsdCore::on_map`]), and a background task runs the scrub schedule.
//!
//! ```text
//!  gRPC Osd::Ping ◀── peers            state owner (one task, `Daemon::run`)
//!  (reads Shared: id, epoch)           select {
//!                                        shutdown signal        → mark me down (best effort), stop
//!  MonClient::subscribe ──watch──▶       new OSDMap             → persist epoch, metrics, re-boot if
//!                                                                  the map says we are down / moved
//!                                        beacon tick            → beacon
//!                                        heartbeat tick         → ping peers, report the silent
//!                                                                  ones past the grace
//!  spawned mon calls / pings ──mpsc──▶   Event (boot result, pong, beacon done)
//!                                      }
//! ```
//!
//! Everything that talks to the network (monitor calls, pings) runs in spawned tasks that send
//! an `Event` back, so a slow or absent monitor never stalls the loop: heartbeats keep
//! flowing while a beacon waits for quorum, and SIGTERM is handled at once.
//!
//! Failure detection (Ceph's): a peer whose ping is refused or reset — its process is gone
//! while its host still answers — is reported at once (`osd_fast_fail_on_connection_refused`);
//! one that stays silent (frozen, cut off) is reported after `osd_heartbeat_grace_ms`. Either
//! way the monitors mark it down only on reports from `min_down_reporters` distinct other
//! hosts, so one confused OSD cannot take others down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_auth::Guard;
use basalt_config::ClusterConfig;
use basalt_maps::{Epoch, Fullness, OsdId, OsdMap, OsdUsage};
use basalt_monclient::{ClientError, MapSubscription, MonClient};
use basalt_proto::auth::AuthChannel;
use basalt_proto::osd::osd_client::OsdClient;
use basalt_proto::osd::osd_server::OsdServer;
use basalt_proto::osd::PingRequest;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;

use crate::service::{OsdCore, OsdService};
use crate::store::{Store, StoreConfig, StoreError, Superblock, Transaction};

/// Meta key (see [`Transaction::meta_set`]) holding the newest OSDMap epoch this OSD has seen,
/// big-endian u64, so a restarted OSD knows how old its view is.
pub const META_LAST_MAP_EPOCH: &[u8] = b"last_map_epoch";
/// Meta key holding the id the monitors gave this OSD (big-endian u32), for logs and tools.
pub const META_WHOAMI: &[u8] = b"whoami";
/// Ceph's `osd_heartbeat_min_peers`: OSDs heartbeated at least, PG peers or not.
const HEARTBEAT_MIN_PEERS: usize = 10;

/// Why the daemon cannot start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "{path} holds a store of cluster fsid {found}, but the config is for fsid {expected}; \
         use an empty directory for this cluster"
    )]
    WrongCluster {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path} is not empty and holds no basalt OSD store; pass an empty or new directory")]
    NotAStore { path: String },
    #[error("cannot read data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("monitors refused this OSD: {0}")]
    Refused(ClientError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Opens the store in `dir`, or formats it with a new OSD uuid when `dir` is missing or empty.
/// A store made for another cluster is refused: its objects and OSD identity belong there.
/// `capacity_bytes` caps the object data the store accepts (`StoreConfig::capacity_bytes`):
/// a write past it fails with `Full`, removals always pass.
pub fn open_or_mkfs(
    dir: &Path,
    fsid: &str,
    capacity_bytes: Option<u64>,
) -> Result<Store, DaemonError> {
    let cfg = StoreConfig {
        capacity_bytes,
        ..StoreConfig::default()
    };
    let has_store = Store::is_formatted(dir);
    if !has_store {
        let empty = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(source) => {
                return Err(DaemonError::DataDir {
                    path: dir.display().to_string(),
                    source,
                })
            }
        };
        if !empty {
            // Formatting here would bury someone's files inside a RocksDB directory.
            return Err(DaemonError::NotAStore {
                path: dir.display().to_string(),
            });
        }
        let uuid = new_uuid();
        let store = Store::mkfs(dir, Superblock::new(fsid, uuid.clone()), cfg)?;
        tracing::info!(data = %dir.display(), %uuid, %fsid, "formatted a new OSD store");
        return Ok(store);
    }
    let store = Store::open(dir, cfg)?;
    let sb = store.superblock();
    if sb.fsid != fsid {
        return Err(DaemonError::WrongCluster {
            path: dir.display().to_string(),
            found: sb.fsid.clone(),
            expected: fsid.to_string(),
        });
    }
    Ok(store)
}

/// A random (version 4) UUID. The monitors map it to an OSD id, so it only has to be unique.
fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The newest OSDMap epoch recorded in the store (0 if none yet).
pub fn last_map_epoch(store: &Store) -> Result<Epoch, StoreError> {
    Ok(match store.meta_get(META_LAST_MAP_EPOCH)? {
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            u64::from_be_bytes(b)
        }
        Some(_) => return Err(StoreError::corrupt_meta("last_map_epoch", "not 8 bytes")),
        None => 0,
    })
}

/// Registers the metrics' help text (promtool wants HELP and TYPE for every family).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "basalt_osd_up",
        "1 if the latest OSDMap this OSD has seen shows it up, else 0"
    );
    metrics::describe_gauge!(
        "basalt_osd_in",
        "1 if the latest OSDMap this OSD has seen shows it in (holding data), else 0"
    );
    metrics::describe_histogram!(
        "basalt_osd_commit_seconds",
        "Commit latency of one client write on this OSD, primary or replica: applied and WAL-synced"
    );
    metrics::describe_gauge!(
        "basalt_osd_map_epoch",
        "Newest OSDMap epoch this OSD has seen"
    );
    metrics::describe_counter!(
        "basalt_osd_beacons_total",
        "Beacons the monitors acknowledged"
    );
    metrics::describe_counter!(
        "basalt_osd_heartbeat_failures_reported_total",
        "Peer failure reports (still failed) sent to the monitors"
    );
    metrics::describe_gauge!(
        "basalt_osd_store_used_bytes",
        "Bytes of object data and xattrs charged in the object store"
    );
    metrics::describe_gauge!(
        "basalt_osd_store_total_bytes",
        "Bytes this OSD may use as it reports them to the monitors: --capacity-bytes, or the \
         data filesystem's size when smaller"
    );
    metrics::describe_gauge!(
        "basalt_osd_fullness",
        "1 for this OSD's fullness state in the map (nearfull, backfillfull, full)"
    );
    metrics::describe_counter!(
        "basalt_osd_full_refusals_total",
        "Client writes refused up front (ENOSPC) because their pool is full"
    );
    metrics::describe_gauge!(
        "basalt_osd_pgs",
        "PG instances on this OSD by state (primary: peering/active/inactive; replica; stray)"
    );
    metrics::describe_counter!(
        "basalt_osd_client_ops_total",
        "Client requests handled as primary, by kind (read/write) and result"
    );
    metrics::describe_histogram!(
        "basalt_osd_client_op_seconds",
        "Client request latency at the primary, including replication"
    );
    metrics::describe_counter!(
        "basalt_osd_client_bytes_total",
        "Encoded client request/reply bytes, by direction"
    );
    metrics::describe_histogram!(
        "basalt_osd_op_stage_seconds",
        "Time per stage of the op path: on the primary queue (receipt to holding the object's \
         order lock with the PG active), dup_check, execute, local_apply (written, visible), \
         local_sync (journal fdatasync), replica_wait (waiting for the slowest replica after the local \
         sync); on a replica sub_op_decode, sub_op_apply, sub_op_sync"
    );
    metrics::describe_histogram!(
        "basalt_store_stage_seconds",
        "Time per stage of a store commit: build (reading what the transaction modifies and \
         encoding it, whole chunks written to the data area), queue (waiting for the committer \
         thread), append (the committer's journal write, RocksDB apply and block staging of a \
         whole group), journal_write (its journal pwrite alone), journal_sync (the syncer's \
         journal fdatasync covering every group appended before it), checkpoint (the \
         committer's checkpoint: data file sync and RocksDB flush)"
    );
    metrics::describe_histogram!(
        "basalt_store_group_commit_transactions",
        "Transactions made durable together by one WAL fsync"
    );
    metrics::describe_histogram!(
        "basalt_osd_sub_op_seconds",
        "Replica sub-op latency (apply and commit on this OSD)"
    );
    metrics::describe_counter!(
        "basalt_osd_write_no_space_retries_total",
        "Attempts to commit a write (where: local = this primary, replica = a sub-op) refused \
         for lack of space and retried: the write waits until it is durable on every member"
    );
    metrics::describe_counter!(
        "basalt_osd_dup_replies_total",
        "Resent requests answered from the PG log instead of being applied again"
    );
    metrics::describe_counter!(
        "basalt_osd_recovered_objects_total",
        "Objects copied by peering/recovery (pulled or pushed)"
    );
    metrics::describe_counter!(
        "basalt_osd_read_repairs_total",
        "Corrupt local copies replaced from a replica during a read"
    );
    metrics::describe_gauge!("basalt_osd_watches", "Watches held on this OSD's objects");
    metrics::describe_counter!(
        "basalt_osd_scrub_errors_total",
        "Inconsistent objects found by scrubs this OSD ran as primary"
    );
    metrics::describe_counter!(
        "basalt_osd_scrub_repairs_total",
        "Objects repaired from a good copy by pg repair or an auto-repairing scheduled scrub"
    );
    metrics::describe_counter!(
        "basalt_osd_snap_trims_total",
        "Objects whose removed snapshots' clones this OSD trimmed as primary"
    );
    metrics::describe_counter!(
        "basalt_osd_scrubs_total",
        "Scrubs (kind: shallow or deep) this OSD ran as primary, on demand or scheduled"
    );
    metrics::describe_counter!(
        "basalt_osd_recovered_on_write_total",
        "Writes that first recovered their object on a replica still catching up"
    );
    metrics::describe_counter!(
        "basalt_osd_recoveries_total",
        "PG copies this OSD caught up as primary (kind: log = the objects its log names, backfill = whole object ranges)"
    );
}

/// What the daemon needs besides its store.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub cluster: ClusterConfig,
    pub data: PathBuf,
    pub host: String,
    /// Address served and advertised in the OSDMap (already bound: no port 0).
    pub addr: SocketAddr,
    /// CRUSH weight, 16.16 fixed point.
    pub crush_weight: u32,
    /// The OSD's key (`osd.N`): it authenticates as osd.N and boots as OSD N.
    pub creds: basalt_monclient::Credentials,
    /// How the port is served: TLS with this OSD's certificate, or plain text (`[tls]`).
    pub acceptor: basalt_tls::Acceptor,
}

/// Results of spawned network work, handed back to the state owner.
enum Event {
    Booted(Result<(OsdId, Epoch), ClientError>),
    Subscribed(MapSubscription),
    BeaconDone(bool),
    Pong {
        target: OsdId,
        addr: String,
        answer: PingAnswer,
    },
}

/// How a heartbeat ping ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PingAnswer {
    Ok,
    /// The peer's host refused or reset the connection: nothing listens at its address.
    Refused,
    /// No (valid) answer in time: the peer may be frozen, overloaded or cut off.
    Silent,
}

/// What this OSD knows about one peer it heartbeats.
struct Peer {
    addr: String,
    client: OsdClient<AuthChannel>,
    /// Last answer, or when we started watching it (a new peer gets a full grace).
    last_ok: Instant,
    /// When we last told the monitors it failed (None = not reported).
    reported_at: Option<Instant>,
    ping_in_flight: bool,
}

/// The state owner.
pub struct Daemon {
    cfg: DaemonConfig,
    /// The id this OSD authenticates (and boots) as.
    osd_id: OsdId,
    /// Checks clients' and peers' tickets with the osd service secrets from the monitors.
    guard: Arc<Guard>,
    store: Store,
    mon: MonClient,
    core: Arc<OsdCore>,
    /// The newest map epoch, as the heartbeat reports it.
    epoch: Arc<AtomicU64>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    /// Some once booted: our id and the epoch the boot landed in.
    booted: Option<(OsdId, Epoch)>,
    booting: bool,
    /// The last boot got a definite refusal; the next tick tries again.
    boot_refused: bool,
    sub: Option<MapSubscription>,
    subscribing: bool,
    map: Option<Arc<OsdMap>>,
    persisted_epoch: Epoch,
    beacon_in_flight: bool,
    peers: BTreeMap<OsdId, Peer>,
    beacon_interval: Duration,
    heartbeat_interval: Duration,
    heartbeat_grace: Duration,
}

impl Daemon {
    pub fn new(cfg: DaemonConfig, store: Store) -> Result<Self, DaemonError> {
        let t = &cfg.cluster.timeouts;
        let beacon_interval = Duration::from_millis(t.osd_beacon_interval_ms.max(1));
        let heartbeat_interval = Duration::from_millis(t.osd_heartbeat_interval_ms.max(1));
        let heartbeat_grace = Duration::from_millis(t.osd_heartbeat_grace_ms.max(1));
        // Bound each monitor call by half the beacon grace: a beacon that takes longer is
        // useless anyway, and a dead monitor set then shows up as retries in the log rather
        // than one long silent wait.
        let op_timeout = Duration::from_millis(
            t.client_op_timeout_ms
                .min(t.osd_beacon_grace_ms / 2)
                .max(1_000),
        );
        let Some(osd_id) = cfg.creds.entity.osd_id() else {
            return Err(DaemonError::Config(format!(
                "an OSD authenticates as osd.N, not {}",
                cfg.creds.entity
            )));
        };
        let mon = MonClient::with_credentials(cfg.cluster.clone(), op_timeout, cfg.creds.clone())
            .map_err(|e| DaemonError::Config(e.to_string()))?;
        let persisted_epoch = last_map_epoch(&store)?;
        let (events_tx, events) = mpsc::channel(1024);
        let core = OsdCore::new(
            store.clone(),
            cfg.cluster.osd.clone(),
            mon.connector().clone(),
        );
        core.set_mon(mon.clone());
        let epoch = Arc::new(AtomicU64::new(persisted_epoch));
        Ok(Daemon {
            cfg,
            osd_id,
            guard: Arc::new(Guard::default()),
            store,
            mon,
            core,
            epoch,
            events_tx,
            events,
            booted: None,
            booting: false,
            boot_refused: false,
            sub: None,
            subscribing: false,
            map: None,
            persisted_epoch,
            beacon_interval,
            heartbeat_interval,
            heartbeat_grace,
            beacon_in_flight: false,
            peers: BTreeMap::new(),
        })
    }

    /// Serves `listener` and runs the life cycle until `shutdown` resolves.
    pub async fn run(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        // Every gRPC request needs an authorizer for the osd service.
        let service = InterceptedService::new(
            OsdServer::new(OsdService {
                core: self.core.clone(),
                epoch: self.epoch.clone(),
            })
            .max_decoding_message_size(basalt_ops::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_ops::MAX_MESSAGE_BYTES),
            basalt_proto::auth::Verify(self.guard.clone()),
        );
        // Client ops and sub-ops arrive on the messenger, everything else on gRPC: one port,
        // told apart by the first byte a connection sends.
        let data_path: Arc<dyn basalt_messenger::Handler> = Arc::new(crate::data_path::DataPath {
            core: self.core.clone(),
        });
        let incoming = basalt_messenger::split_listener(
            listener,
            self.cfg.acceptor.clone(),
            data_path,
            basalt_ops::MAX_MESSAGE_BYTES,
            self.guard.clone(),
        );
        let grpc = tokio::spawn(
            basalt_proto::transport::server()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                }),
        );
        let uuid = self.store.superblock().osd_uuid.clone();
        tracing::info!(
            %uuid,
            addr = %self.cfg.addr,
            host = %self.cfg.host,
            last_map_epoch = self.persisted_epoch,
            "osd starting"
        );
        metrics::gauge!("basalt_osd_up").set(0.0);
        metrics::gauge!("basalt_osd_map_epoch").set(self.persisted_epoch as f64);
        metrics::counter!("basalt_osd_beacons_total").increment(0);
        metrics::counter!("basalt_osd_heartbeat_failures_reported_total").increment(0);
        self.update_store_metric();

        let service_keys = tokio::spawn(refresh_service_keys(
            self.mon.clone(),
            self.guard.clone(),
            Duration::from_millis(
                (self.cfg.cluster.auth.ticket_ttl_secs.saturating_mul(1000) / 4).clamp(500, 60_000),
            ),
        ));
        let scrubs = tokio::spawn(self.core.clone().run_scrub_schedule());
        let snap_trimmer = tokio::spawn(self.core.clone().run_snap_trimmer());
        self.start_boot(0);
        let mut tick = tokio::time::interval(self.beacon_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let next_epoch = self.map.as_ref().map_or(1, |m| m.epoch + 1);
            tokio::select! {
                _ = &mut shutdown => break,
                Some(ev) = self.events.recv() => self.handle_event(ev).await,
                m = wait_map(&mut self.sub, next_epoch) => match m {
                    Some(map) => self.handle_map(map).await,
                    // The subscription task ended; take a new one.
                    None => { self.sub = None; self.start_subscribe(); }
                },
                _ = tick.tick() => self.on_tick(),
                _ = heartbeat.tick() => self.on_heartbeat(),
            }
        }
        tracing::info!("shutting down");
        scrubs.abort();
        snap_trimmer.abort();
        service_keys.abort();
        if let Some((id, _)) = self.booted {
            // Ceph's OSD asks to be marked down on a clean stop so clients do not wait out the
            // grace; best effort and bounded, since the monitors may be gone.
            match tokio::time::timeout(Duration::from_secs(2), self.mon.osd_down(id)).await {
                Ok(Ok(_)) => tracing::info!(osd = id, "monitors marked this OSD down"),
                Ok(Err(e)) => tracing::warn!(osd = id, error = %e, "could not mark myself down"),
                Err(_) => tracing::warn!(osd = id, "no monitor answered the mark-down in time"),
            }
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(5), grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
            Err(_) => tracing::warn!("gRPC server did not stop within 5 s"),
        }
        tracing::info!("osd stopped");
        Ok(())
    }

    /// Boots (again) in the background, retrying with bounded backoff while the monitors lack
    /// quorum; only a definite refusal ends the retries (and the daemon).
    fn start_boot(&mut self, attempt_epoch: Epoch) {
        if self.booting {
            return;
        }
        self.booting = true;
        let mon = self.mon.clone();
        let tx = self.events_tx.clone();
        let uuid = self.store.superblock().osd_uuid.clone();
        let addr = self.cfg.addr.to_string();
        let host = self.cfg.host.clone();
        let weight = self.cfg.crush_weight;
        let osd_id = self.osd_id;
        let guard = self.guard.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                // Peers and clients find this OSD once it is up in the map: it must be able to
                // check their tickets by then.
                let ready = if guard.has_keys() {
                    Ok(())
                } else {
                    mon.service_keys().await.map(|k| guard.set_keys(k))
                };
                let booted = match ready {
                    Ok(()) => mon.osd_boot(osd_id, &uuid, &addr, &host, weight).await,
                    Err(e) => Err(e),
                };
                match booted {
                    Ok(r) => {
                        let _ = tx.send(Event::Booted(Ok(r))).await;
                        return;
                    }
                    Err(e) if retryable(&e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, seen_epoch = attempt_epoch, "boot not acknowledged; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Booted(Err(e))).await;
                        return;
                    }
                }
            }
        });
    }

    fn start_subscribe(&mut self) {
        if self.subscribing || self.sub.is_some() {
            return;
        }
        self.subscribing = true;
        let mon = self.mon.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match mon.subscribe().await {
                    Ok(sub) => {
                        let _ = tx.send(Event::Subscribed(sub)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot subscribe to the OSDMap; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    async fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Booted(Ok((id, epoch))) => {
                self.booting = false;
                let first = self.booted.is_none();
                self.booted = Some((id, epoch));
                tracing::info!(
                    osd = id,
                    epoch,
                    "booted: the monitors know this OSD as osd.{id}"
                );
                if first {
                    let mut txn = Transaction::new();
                    txn.meta_set(META_WHOAMI, id.to_be_bytes().to_vec());
                    if let Err(e) = self.store.submit(txn).await {
                        tracing::error!(error = %e, "cannot record the OSD id in the store");
                    }
                }
                self.start_subscribe();
            }
            Event::Booted(Err(e)) => {
                // A definite "no" (bad address, unknown cluster…): keep serving pings, log
                // loudly and try again later in case an operator fixes the cluster side.
                self.booting = false;
                self.boot_refused = true;
                tracing::error!(error = %DaemonError::Refused(e), "boot refused; retrying on the next tick");
            }
            Event::Subscribed(sub) => {
                self.subscribing = false;
                let map = sub.current();
                self.sub = Some(sub);
                self.handle_map(map).await;
            }
            Event::BeaconDone(ok) => {
                self.beacon_in_flight = false;
                if ok {
                    metrics::counter!("basalt_osd_beacons_total").increment(1);
                }
            }
            Event::Pong {
                target,
                addr,
                answer,
            } => self.handle_pong(target, addr, answer),
        }
    }

    async fn handle_map(&mut self, map: Arc<OsdMap>) {
        if self.map.as_ref().is_some_and(|m| m.epoch >= map.epoch) {
            return;
        }
        // Persisted before it is shown (peers, metrics), so whatever epoch this OSD has
        // advertised survives a crash.
        if map.epoch > self.persisted_epoch {
            let mut txn = Transaction::new();
            txn.meta_set(META_LAST_MAP_EPOCH, map.epoch.to_be_bytes().to_vec());
            match self.store.submit(txn).await {
                Ok(()) => self.persisted_epoch = map.epoch,
                Err(e) => tracing::error!(error = %e, "cannot persist the map epoch"),
            }
        }
        self.epoch.store(map.epoch, Ordering::Relaxed);
        metrics::gauge!("basalt_osd_map_epoch").set(map.epoch as f64);
        if let Some((id, boot_epoch)) = self.booted {
            let me = map.osds.get(&id);
            let up_here = me.is_some_and(|o| o.up && o.addr == self.cfg.addr.to_string());
            metrics::gauge!("basalt_osd_up").set(if up_here { 1.0 } else { 0.0 });
            let is_in = me.is_some_and(|o| o.is_in());
            metrics::gauge!("basalt_osd_in").set(if is_in { 1.0 } else { 0.0 });
            // A map older than our boot may still show the previous incarnation down: only a
            // map that includes the boot can say we were marked down since.
            if !up_here && map.epoch >= boot_epoch && !self.booting {
                tracing::warn!(
                    osd = id,
                    epoch = map.epoch,
                    "the OSDMap shows this OSD down or at another address while it runs (wrongly marked down); booting again"
                );
                self.start_boot(map.epoch);
            }
            if let Err(e) = self.core.on_map(id, map.clone()).await {
                tracing::error!(
                    epoch = map.epoch,
                    error = %e,
                    "cannot apply the OSDMap; serving the previous one until a later map applies"
                );
                return;
            }
            self.update_peers(&map, id);
        }
        self.map = Some(map);
    }

    /// Chooses the OSDs to heartbeat: those sharing a PG with this one (they are the ones
    /// whose silence stalls its I/O), topped up with the nearest up OSDs by id to
    /// HEARTBEAT_MIN_PEERS, as Ceph does, so an OSD with few PGs is still watched by several
    /// hosts. In clusters of up to HEARTBEAT_MIN_PEERS + 1 OSDs that is every other OSD.
    fn update_peers(&mut self, map: &OsdMap, me: OsdId) {
        let now = Instant::now();
        let up: Vec<OsdId> = map
            .osds
            .iter()
            .filter(|(_, o)| o.up)
            .map(|(id, _)| *id)
            .collect();
        let pg_members = self
            .core
            .pg_summary()
            .into_iter()
            .flat_map(|(_, _, acting)| acting);
        let wanted = heartbeat_peers(me, pg_members, &up);
        self.peers.retain(|id, p| {
            wanted.contains(id) && map.osds.get(id).is_some_and(|o| o.up && o.addr == p.addr)
        });
        for id in wanted {
            let Some(o) = map.osds.get(&id) else { continue };
            if self.peers.contains_key(&id) {
                continue;
            }
            let Ok(channel) = basalt_monclient::lazy_channel(
                &o.addr,
                self.mon.connector(),
                self.heartbeat_grace / 2,
            ) else {
                tracing::warn!(osd = id, addr = %o.addr, "peer has an unusable address; not watching it");
                continue;
            };
            self.peers.insert(
                id,
                Peer {
                    addr: o.addr.clone(),
                    client: OsdClient::new(basalt_proto::auth::authorized(
                        channel,
                        self.mon.osd_ticket(),
                    )),
                    last_ok: now,
                    reported_at: None,
                    ping_in_flight: false,
                },
            );
        }
    }

    fn on_tick(&mut self) {
        self.update_store_metric();
        if self.boot_refused && !self.booting {
            self.boot_refused = false;
            self.start_boot(self.map.as_ref().map_or(0, |m| m.epoch));
        }
        let Some((id, _)) = self.booted else {
            return;
        };
        if !self.beacon_in_flight {
            self.beacon_in_flight = true;
            let mon = self.mon.clone();
            let tx = self.events_tx.clone();
            let epoch = self.map.as_ref().map_or(0, |m| m.epoch);
            let store = self.store.clone();
            let data = self.cfg.data.clone();
            let core = self.core.clone();
            tokio::spawn(async move {
                // statvfs is a syscall on the data dir's filesystem: off the runtime threads.
                let usage = tokio::task::spawn_blocking(move || store_usage(&store, &data))
                    .await
                    .ok()
                    .flatten();
                core.set_measured_usage(usage);
                if let Some(u) = usage {
                    metrics::gauge!("basalt_osd_store_total_bytes").set(u.total_bytes as f64);
                }
                let ok = match mon.osd_beacon(id, epoch, usage).await {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "beacon not acknowledged");
                        false
                    }
                };
                let _ = tx.send(Event::BeaconDone(ok)).await;
            });
        }
    }

    /// Pings every heartbeat peer that has no ping out, and reports those silent past the
    /// grace.
    fn on_heartbeat(&mut self) {
        if self.booted.is_none() {
            return;
        }
        let epoch = self.map.as_ref().map_or(0, |m| m.epoch);
        let now = Instant::now();
        let timeout = self.heartbeat_interval.max(Duration::from_millis(500));
        let mut silent_peers = Vec::new();
        for (&target, peer) in &mut self.peers {
            if !peer.ping_in_flight {
                peer.ping_in_flight = true;
                let mut client = peer.client.clone();
                let tx = self.events_tx.clone();
                let addr = peer.addr.clone();
                tokio::spawn(async move {
                    let answer =
                        match tokio::time::timeout(timeout, client.ping(PingRequest { epoch }))
                            .await
                        {
                            Ok(Ok(r)) if r.get_ref().osd_id == target => PingAnswer::Ok,
                            Ok(Err(status)) if is_refused(&status) => PingAnswer::Refused,
                            _ => PingAnswer::Silent,
                        };
                    let _ = tx
                        .send(Event::Pong {
                            target,
                            addr,
                            answer,
                        })
                        .await;
                });
            }
            let silent = now.saturating_duration_since(peer.last_ok);
            if silent >= self.heartbeat_grace {
                silent_peers.push((target, silent));
            }
        }
        for (target, silent) in silent_peers {
            self.report_failure(target, silent, "peer missed heartbeats past the grace");
        }
    }

    /// Tells the monitors `target` failed, unless it was reported less than a grace ago:
    /// reports are re-sent every grace period while it stays failed, since the monitors only
    /// count recent ones.
    fn report_failure(&mut self, target: OsdId, silent: Duration, why: &'static str) {
        let Some((id, _)) = self.booted else {
            return;
        };
        let epoch = self.map.as_ref().map_or(0, |m| m.epoch);
        let grace = self.heartbeat_grace;
        let Some(peer) = self.peers.get_mut(&target) else {
            return;
        };
        let now = Instant::now();
        if peer
            .reported_at
            .is_some_and(|at| now.saturating_duration_since(at) < grace)
        {
            return;
        }
        peer.reported_at = Some(now);
        tracing::warn!(
            osd = target,
            silent_ms = silent.as_millis() as u64,
            epoch,
            "{why}; reporting it"
        );
        metrics::counter!("basalt_osd_heartbeat_failures_reported_total").increment(1);
        let mon = self.mon.clone();
        let failed_for_ms = silent.as_millis() as u64;
        tokio::spawn(async move {
            if let Err(e) = mon
                .osd_failure(id, target, failed_for_ms, epoch, true)
                .await
            {
                tracing::warn!(osd = target, error = %e, "failure report not delivered");
            }
        });
    }

    fn handle_pong(&mut self, target: OsdId, addr: String, answer: PingAnswer) {
        let Some(peer) = self.peers.get_mut(&target) else {
            return;
        };
        if peer.addr != addr {
            return; // an answer from a previous incarnation's address
        }
        peer.ping_in_flight = false;
        match answer {
            PingAnswer::Ok => {}
            PingAnswer::Silent => return,
            PingAnswer::Refused => {
                // Its process is gone: waiting out the grace would only stall its PGs.
                let silent = Instant::now().saturating_duration_since(peer.last_ok);
                self.report_failure(target, silent, "peer refused the connection");
                return;
            }
        }
        peer.last_ok = Instant::now();
        if peer.reported_at.take().is_some() {
            if let Some((id, _)) = self.booted {
                tracing::info!(
                    osd = target,
                    "peer answers again; withdrawing the failure report"
                );
                let mon = self.mon.clone();
                let epoch = self.map.as_ref().map_or(0, |m| m.epoch);
                tokio::spawn(async move {
                    if let Err(e) = mon.osd_failure(id, target, 0, epoch, false).await {
                        tracing::warn!(osd = target, error = %e, "cannot withdraw failure report");
                    }
                });
            }
        }
    }

    fn update_store_metric(&self) {
        if let Some(map) = &self.map {
            if let Some((id, _)) = self.booted {
                let full = map.fullness(id);
                for level in [Fullness::Nearfull, Fullness::Backfillfull, Fullness::Full] {
                    metrics::gauge!("basalt_osd_fullness", "state" => level.name())
                        .set(if full == level { 1.0 } else { 0.0 });
                }
            }
        }
        metrics::gauge!("basalt_osd_store_used_bytes").set(self.store.stats().used_bytes as f64);
        let mut by_state: BTreeMap<&'static str, u64> = [
            "peering",
            "recovering",
            "backfilling",
            "backfill_toofull",
            "down",
            "incomplete",
            "active",
            "inactive",
            "replica",
            "stray",
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        for (_, kind, _) in self.core.pg_summary() {
            *by_state.entry(kind).or_default() += 1;
        }
        for (state, n) in by_state {
            metrics::gauge!("basalt_osd_pgs", "state" => state).set(n as f64);
        }
    }
}

/// The OSDs `me` heartbeats (see `Daemon::update_peers`): the up members of its PGs, plus
/// the up OSDs nearest by id (upwards, wrapping) until there are HEARTBEAT_MIN_PEERS.
fn heartbeat_peers(
    me: OsdId,
    pg_members: impl IntoIterator<Item = OsdId>,
    up: &[OsdId],
) -> BTreeSet<OsdId> {
    let others = |id: &OsdId| *id != me && up.contains(id);
    let mut wanted: BTreeSet<OsdId> = pg_members.into_iter().filter(others).collect();
    let mut nearest: Vec<OsdId> = up.iter().copied().filter(others).collect();
    nearest.sort_by_key(|id| id.wrapping_sub(me));
    for id in nearest {
        if wanted.len() >= HEARTBEAT_MIN_PEERS {
            break;
        }
        wanted.insert(id);
    }
    wanted
}

/// The next map at or after `epoch`, or pending forever without a subscription (the select
/// then waits on the other branches). `None` means the subscription ended.
async fn wait_map(sub: &mut Option<MapSubscription>, epoch: Epoch) -> Option<Arc<OsdMap>> {
    match sub {
        Some(s) => loop {
            match s.wait_for_epoch(epoch, Duration::from_secs(3600)).await {
                Ok(m) => return Some(m),
                Err(ClientError::Timeout(_)) => continue,
                Err(_) => return None,
            }
        },
        None => std::future::pending().await,
    }
}

/// Whether a failed ping means nothing listens at the peer's address any more: the
/// connection was refused or reset (its process died; its host's kernel answers for it).
fn is_refused(status: &tonic::Status) -> bool {
    use std::io::ErrorKind;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
            ) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// Errors worth another try: the cluster may recover (quorum, partitions); anything else is
/// an answer.
fn retryable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::NoQuorum(_)
            | ClientError::Timeout(_)
            | ClientError::Ambiguous(_)
            | ClientError::Unavailable(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_peers_are_pg_members_topped_up_by_nearest_id() {
        let up: Vec<OsdId> = (0..30).collect();
        // Small clusters: everyone else.
        assert_eq!(
            heartbeat_peers(3, [], &up[..6]),
            [0, 1, 2, 4, 5].into_iter().collect()
        );
        // PG members first (down ones and itself skipped), then the next ids, wrapping.
        let got = heartbeat_peers(27, [27, 5, 9, 40], &up);
        let want: BTreeSet<OsdId> = [5, 9, 28, 29, 0, 1, 2, 3, 4, 6].into_iter().collect();
        assert_eq!(got, want);
        // Many PG peers: all of them, nothing added.
        let many = heartbeat_peers(0, 1..=15, &up);
        assert_eq!(many, (1..=15).collect());
    }

    #[test]
    fn a_ping_to_a_closed_port_is_refused_and_one_to_a_silent_listener_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let closed_addr = closed.local_addr().expect("addr").to_string();
            drop(closed);
            // Accepts (the kernel's backlog) but never answers: a frozen process.
            let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let silent_addr = silent.local_addr().expect("addr").to_string();
            for (addr, refused) in [(closed_addr, true), (silent_addr, false)] {
                let channel = basalt_monclient::lazy_channel(
                    &addr,
                    &basalt_tls::Connector::plain(),
                    Duration::from_millis(500),
                )
                .expect("channel");
                let r = tokio::time::timeout(
                    Duration::from_secs(2),
                    OsdClient::new(channel).ping(PingRequest { epoch: 0 }),
                )
                .await;
                let got = matches!(&r, Ok(Err(status)) if is_refused(status));
                assert_eq!(got, refused, "{addr}: {r:?}");
            }
            drop(silent);
        });
    }

    #[test]
    fn uuids_are_v4_shaped_and_distinct() {
        let a = new_uuid();
        let b = new_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
    }

    #[test]
    fn store_of_another_cluster_is_refused_and_epoch_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("osd");
        let store = open_or_mkfs(&path, "fsid-a", None).expect("mkfs");
        let uuid = store.superblock().osd_uuid.clone();
        let mut txn = Transaction::new();
        txn.meta_set(META_LAST_MAP_EPOCH, 42u64.to_be_bytes().to_vec());
        store.submit_blocking(&txn).expect("submit");
        drop(store);
        let again = open_or_mkfs(&path, "fsid-a", None).expect("reopen");
        assert_eq!(again.superblock().osd_uuid, uuid);
        assert_eq!(last_map_epoch(&again).expect("epoch"), 42);
        drop(again);
        let err = open_or_mkfs(&path, "fsid-b", None).expect_err("other cluster");
        assert!(err.to_string().contains("fsid-a"), "{err}");
        std::fs::write(dir.path().join("x"), b"x").expect("write");
        let err = open_or_mkfs(dir.path(), "fsid-a", None).expect_err("non-empty");
        assert!(matches!(err, DaemonError::NotAStore { .. }), "{err}");
    }
}

/// What this OSD reports to the monitors as its use: the store's charged bytes against
/// `--capacity-bytes`, or the data directory's filesystem (from statvfs) when that is smaller
/// or no capacity is set. The filesystem also holds the journal and RocksDB, which the store
/// does not charge, so only its own figures say when it fills; but the data file keeps the
/// space of removed objects for reuse, so that space counts as free (as BlueStore counts its
/// allocator's free space), or deleting data would never clear a full disk.
/// None if neither can be measured.
pub fn store_usage(store: &Store, data: &Path) -> Option<OsdUsage> {
    let stats = store.stats();
    let capped = stats.capacity_bytes.map(|cap| OsdUsage {
        used_bytes: stats.used_bytes,
        total_bytes: cap,
    });
    let fs = match filesystem_usage(data) {
        Ok(u) => Some(OsdUsage {
            used_bytes: u.used_bytes.saturating_sub(stats.data_free_bytes),
            total_bytes: u.total_bytes,
        }),
        Err(e) => {
            tracing::warn!(path = %data.display(), error = %e, "cannot measure the data filesystem");
            None
        }
    };
    reported_usage(capped, fs)
}

/// Of the use against `--capacity-bytes` and the filesystem's, the one that reaches its
/// limit first: the filesystem only when it is smaller than the capacity.
pub fn reported_usage(capped: Option<OsdUsage>, fs: Option<OsdUsage>) -> Option<OsdUsage> {
    match (capped, fs) {
        (Some(c), Some(f)) if f.total_bytes < c.total_bytes => Some(f),
        (Some(c), _) => Some(c),
        (None, f) => f,
    }
}

/// The filesystem holding `path` as `df` counts it: bytes used, and as total the used bytes
/// plus what an unprivileged writer may still take (blocks reserved for root excluded).
pub fn filesystem_usage(path: &Path) -> std::io::Result<OsdUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` a properly sized, writable
    // statvfs struct that the call fills; nothing is kept past the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let used = (st.f_blocks as u64)
        .saturating_sub(st.f_bfree as u64)
        .saturating_mul(frsize);
    let avail = (st.f_bavail as u64).saturating_mul(frsize);
    Ok(OsdUsage {
        used_bytes: used,
        total_bytes: used.saturating_add(avail),
    })
}

/// Keeps the guard's osd service secrets current: fetched from the monitors every `every`
/// (a quarter of a ticket's life), so tickets sealed after a rotation open here.
async fn refresh_service_keys(mon: MonClient, guard: Arc<Guard>, every: Duration) {
    loop {
        let wait = match mon.service_keys().await {
            Ok(keys) => {
                guard.set_keys(keys);
                every
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the osd service secrets; retrying");
                Duration::from_millis(500)
            }
        };
        tokio::time::sleep(wait).await;
    }
}
