//! The monitor's state owner: one task owns the Paxos core, the store, the
//! OSDMap service and the auth service, and runs a `select` → `apply` loop over peer messages,
//! client requests and the tick. Everything else (gRPC handlers, peer
//! senders, subscription streams) talks to it through channels and reads the
//! [`NodeView`] it publishes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_maps::{encode, Epoch, MapError, OsdId, OsdMap};
use basalt_paxos::{Input, Message, Output, Paxos, ProposalId, ProposeError, Rank, Role, Version};
use tokio::sync::{mpsc, oneshot, watch};

use basalt_auth::{AuthDb, AuthEntry, EntityName};

use crate::auth::{AuthCmdError, AuthCommand, AuthService};
use crate::service::{Boot, Command, OsdMapService, Outcome};
use crate::store::{MonStore, MonValue};

/// Why a request to the monitors failed, as the gRPC layer reports it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MonError {
    /// Definitely not applied: safe to retry elsewhere.
    #[error("{0}")]
    Unavailable(String),
    /// Proposed but leadership changed before it committed: it may or may not be applied.
    #[error("leadership changed while the change was being committed; it may or may not have been applied — check, then retry")]
    Ambiguous,
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Auth(#[from] AuthCmdError),
    #[error("monitor store failure: {0}")]
    Store(String),
}

/// What an auth command's reply carries: the entity and its committed record (none once
/// removed), and the auth database version that holds it.
pub type AuthOutcome = (EntityName, Option<AuthEntry>, u64);

pub type Reply<T> = oneshot::Sender<Result<T, MonError>>;

/// Requests the gRPC layer hands to the state owner.
pub enum Request {
    Peer {
        from: Rank,
        msg: Message,
    },
    Command {
        cmd: Command,
        reply: Reply<(Epoch, Outcome)>,
    },
    Boot {
        boot: Boot,
        reply: Reply<(OsdId, Epoch)>,
    },
    Auth {
        cmd: AuthCommand,
        reply: Reply<AuthOutcome>,
    },
    Beacon {
        id: OsdId,
        /// The OSD's store use, if it measured one.
        usage: Option<basalt_maps::OsdUsage>,
        reply: Reply<Epoch>,
    },
    Failure {
        reporter: OsdId,
        target: OsdId,
        /// The newest map the reporter had: a report older than the target's boot is stale.
        epoch: Epoch,
        still_failed: bool,
        reply: Reply<Epoch>,
    },
}

/// What the state owner publishes after every step.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub rank: Rank,
    pub role: Role,
    pub leader: Option<Rank>,
    pub quorum: Vec<Rank>,
    pub election_epoch: u64,
    pub first_committed: Version,
    pub last_committed: Version,
    /// May serve reads now (leader or peon under a valid lease).
    pub readable: bool,
    pub osdmap: Arc<OsdMap>,
    pub first_epoch: Epoch,
    /// The committed auth database.
    pub auth: Arc<AuthDb>,
}

/// Outbound consensus messages, one queue per peer rank.
pub type PeerOutbox = Arc<dyn Fn(Rank, Message) + Send + Sync>;

pub struct Node {
    rank: Rank,
    paxos: Paxos,
    store: MonStore,
    service: OsdMapService,
    auth: AuthService,
    outbox: PeerOutbox,
    view: watch::Sender<NodeView>,
    started: Instant,
    next_proposal: ProposalId,
    /// Replies owed once the pending changes commit, with the text to send.
    waiting: Vec<Waiter>,
    /// Replies owed once proposal `.0` (proposed at `.1`) commits.
    in_flight: Option<(ProposalId, Instant, Vec<Waiter>)>,
    propose_interval: Duration,
    last_propose: Instant,
    was_leader: bool,
}

enum Waiter {
    Command(Reply<(Epoch, Outcome)>, Outcome),
    Boot(Reply<(OsdId, Epoch)>, OsdId),
    Auth(Reply<AuthOutcome>, EntityName, Option<AuthEntry>),
}

impl Waiter {
    /// The proposal committed: OSDMap waiters get the map's epoch, auth waiters the auth
    /// database's version.
    fn succeed(self, epoch: Epoch, auth_version: u64) {
        match self {
            Waiter::Auth(tx, entity, entry) => {
                let _ = tx.send(Ok((entity, entry, auth_version)));
            }
            Waiter::Command(tx, msg) => {
                let _ = tx.send(Ok((epoch, msg)));
            }
            Waiter::Boot(tx, id) => {
                let _ = tx.send(Ok((id, epoch)));
            }
        }
    }

    fn fail(self, err: MonError) {
        match self {
            Waiter::Command(tx, _) => {
                let _ = tx.send(Err(err));
            }
            Waiter::Boot(tx, _) => {
                let _ = tx.send(Err(err));
            }
            Waiter::Auth(tx, _, _) => {
                let _ = tx.send(Err(err));
            }
        }
    }
}

/// The clock the Paxos core runs on. Leases carry absolute expiry times, so
/// every monitor must read the same clock: wall time, as in Ceph, which
/// likewise assumes monitors' clocks agree within a bounded drift
/// (`mon_clock_drift_allowed`). A per-process monotonic clock would make a
/// restarted monitor's leases meaningless to its peers.
fn paxos_clock_ms() -> u64 {
    wall_ms()
}

/// Registers help text for every monitor metric (Prometheus tooling expects it).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("basalt_mon_in_quorum", "1 if this monitor is in the quorum");
    describe_gauge!("basalt_mon_quorum_size", "Monitors in the current quorum");
    describe_gauge!("basalt_mon_is_leader", "1 if this monitor leads the quorum");
    describe_gauge!("basalt_mon_osdmap_epoch", "Latest committed OSDMap epoch");
    describe_gauge!(
        "basalt_mon_osds_fullness",
        "Up and in OSDs at each fullness state (nearfull, backfillfull, full) in the committed map"
    );
    describe_gauge!(
        "basalt_mon_pools_full",
        "Pools taking no new writes because an OSD serving them is full"
    );
    describe_counter!(
        "basalt_mon_elections_total",
        "Elections this monitor took part in"
    );
    describe_counter!(
        "basalt_mon_paxos_commits_total",
        "Proposals this monitor committed as leader"
    );
    describe_histogram!(
        "basalt_mon_paxos_commit_seconds",
        Unit::Seconds,
        "Time from proposing a value to its commit, on the leader"
    );
    describe_counter!(
        "basalt_mon_peer_messages_dropped_total",
        "Consensus messages dropped because a peer was unreachable or slow"
    );
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    pub fn new(
        rank: Rank,
        paxos: Paxos,
        store: MonStore,
        service: OsdMapService,
        auth: AuthService,
        outbox: PeerOutbox,
        propose_interval: Duration,
    ) -> (Self, watch::Receiver<NodeView>) {
        let view = NodeView {
            rank,
            role: paxos.role(),
            leader: paxos.leader(),
            quorum: paxos.quorum().to_vec(),
            election_epoch: paxos.election_epoch(),
            first_committed: paxos.first_committed(),
            last_committed: paxos.last_committed(),
            readable: false,
            osdmap: store.osdmap().clone(),
            first_epoch: store.first_epoch(),
            auth: store.auth().clone(),
        };
        let (tx, rx) = watch::channel(view);
        let now = Instant::now();
        (
            Node {
                rank,
                paxos,
                store,
                service,
                auth,
                outbox,
                view: tx,
                started: now,
                next_proposal: 1,
                waiting: Vec::new(),
                in_flight: None,
                propose_interval,
                last_propose: now,
                was_leader: false,
            },
            rx,
        )
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs until the request channel closes or the store fails.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>) -> Result<(), MonError> {
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                req = requests.recv() => match req {
                    Some(req) => self.on_request(req)?,
                    None => return Ok(()),
                },
                _ = tick.tick() => self.on_tick()?,
            }
            self.publish();
        }
    }

    fn step(&mut self, input: Input) -> Result<(), MonError> {
        let now = paxos_clock_ms();
        let outputs = self.paxos.handle(now, input, &self.store);
        self.execute(outputs)
    }

    /// Executes Paxos outputs in order; a Persist lands before anything after it.
    fn execute(&mut self, outputs: Vec<Output>) -> Result<(), MonError> {
        for out in outputs {
            match out {
                Output::Send { to, msg } => (self.outbox)(to, msg),
                Output::Persist(ops) => {
                    let changed = self
                        .store
                        .persist(&ops)
                        .map_err(|e| MonError::Store(e.to_string()))?;
                    if changed.osdmap {
                        let map = self.store.osdmap().clone();
                        metrics::gauge!("basalt_mon_osdmap_epoch").set(map.epoch as f64);
                        fullness_metrics(&map);
                        self.service.on_commit(map);
                    }
                    if changed.auth {
                        self.auth.on_commit(self.store.auth().clone());
                    }
                }
                Output::ProposalDone { id, result } => self.on_proposal_done(id, result),
                Output::StateChanged => self.on_state_changed(),
            }
        }
        Ok(())
    }

    fn on_proposal_done(&mut self, id: ProposalId, result: Result<Version, ProposeError>) {
        let Some((pid, proposed_at, waiters)) = self.in_flight.take() else {
            return;
        };
        if pid != id {
            self.in_flight = Some((pid, proposed_at, waiters));
            return;
        }
        match result {
            Ok(_) => {
                metrics::counter!("basalt_mon_paxos_commits_total").increment(1);
                metrics::histogram!("basalt_mon_paxos_commit_seconds")
                    .record(proposed_at.elapsed().as_secs_f64());
                let epoch = self.store.osdmap().epoch;
                let auth_version = self.store.auth().version;
                for w in waiters {
                    w.succeed(epoch, auth_version);
                }
            }
            Err(e) => {
                tracing::info!(error = %e, "proposal did not commit");
                self.service.abandon_in_flight();
                self.auth.abandon_in_flight();
                for w in waiters {
                    w.fail(MonError::Ambiguous);
                }
            }
        }
    }

    fn on_state_changed(&mut self) {
        let is_leader = self.paxos.role() == Role::Leader;
        tracing::info!(
            rank = self.rank,
            role = ?self.paxos.role(),
            leader = ?self.paxos.leader(),
            quorum = ?self.paxos.quorum(),
            epoch = self.paxos.election_epoch(),
            "monitor state changed"
        );
        if self.paxos.role() == Role::Electing {
            metrics::counter!("basalt_mon_elections_total").increment(1);
        }
        if is_leader != self.was_leader {
            // Queued changes were never proposed: failing them is unambiguous.
            let reason =
                MonError::Unavailable("this monitor is no longer the leader; retry".into());
            for w in self.waiting.drain(..) {
                w.fail(reason.clone());
            }
            if let Some((_, _, waiters)) = self.in_flight.take() {
                for w in waiters {
                    w.fail(MonError::Ambiguous);
                }
            }
            self.service.reset(self.now_ms());
            self.auth.reset();
            self.was_leader = is_leader;
        }
    }

    fn not_leader(&self) -> MonError {
        match self.paxos.leader() {
            Some(l) => MonError::Unavailable(format!(
                "mon.{} is not the leader (mon.{l} is); retry there",
                self.rank
            )),
            None => MonError::Unavailable(
                "no quorum: the monitors are electing a leader or too few are up".into(),
            ),
        }
    }

    fn on_request(&mut self, req: Request) -> Result<(), MonError> {
        let leader = self.paxos.role() == Role::Leader;
        match req {
            Request::Peer { from, msg } => self.step(Input::Receive { from, msg })?,
            Request::Command { cmd, reply } => {
                if !leader {
                    let _ = reply.send(Err(self.not_leader()));
                } else {
                    match self.service.command(cmd, wall_ms()) {
                        Ok(msg) => self.waiting.push(Waiter::Command(reply, msg)),
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Request::Boot { boot, reply } => {
                if !leader {
                    let _ = reply.send(Err(self.not_leader()));
                } else {
                    let now = self.now_ms();
                    match self.service.boot(boot, now) {
                        Ok(id) => self.waiting.push(Waiter::Boot(reply, id)),
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Request::Auth { cmd, reply } => {
                if !leader {
                    let _ = reply.send(Err(self.not_leader()));
                } else {
                    match self.auth.command(cmd) {
                        Ok((entity, entry)) => {
                            self.waiting.push(Waiter::Auth(reply, entity, entry))
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Request::Beacon { id, usage, reply } => {
                let r = if leader {
                    let now = self.now_ms();
                    self.service
                        .beacon(id, usage, now)
                        .map(|_| self.store.osdmap().epoch)
                        .map_err(MonError::from)
                } else {
                    Err(self.not_leader())
                };
                let _ = reply.send(r);
            }
            Request::Failure {
                reporter,
                target,
                epoch,
                still_failed,
                reply,
            } => {
                let r = if leader {
                    let now = self.now_ms();
                    self.service
                        .failure_report(reporter, target, epoch, still_failed, now)
                        .map(|_| self.store.osdmap().epoch)
                        .map_err(MonError::from)
                } else {
                    Err(self.not_leader())
                };
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    fn on_tick(&mut self) -> Result<(), MonError> {
        self.step(Input::Tick)?;
        if self.paxos.role() != Role::Leader || !self.paxos.readable(paxos_clock_ms()) {
            return Ok(());
        }
        let now = self.now_ms();
        self.service.tick(now, wall_ms());
        self.auth.seed_if_new();
        self.auth
            .rotate_if_due(wall_ms(), || match basalt_auth::Secret::generate() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a service secret; rotation waits");
                    None
                }
            });
        if self.paxos.can_propose()
            && self.in_flight.is_none()
            && (self.service.has_pending() || self.auth.has_pending())
            && self.last_propose.elapsed() >= self.propose_interval
        {
            let value = MonValue {
                osdmap: self.service.take_incremental(wall_ms()),
                auth: self.auth.take_changes(),
            };
            if value.osdmap.is_some() || !value.auth.is_empty() {
                let id = self.next_proposal;
                self.next_proposal += 1;
                self.last_propose = Instant::now();
                self.in_flight = Some((id, Instant::now(), std::mem::take(&mut self.waiting)));
                self.step(Input::Propose {
                    id,
                    value: encode(&value).into(),
                })?;
            }
        }
        Ok(())
    }

    fn publish(&self) {
        let view = NodeView {
            rank: self.rank,
            role: self.paxos.role(),
            leader: self.paxos.leader(),
            quorum: self.paxos.quorum().to_vec(),
            election_epoch: self.paxos.election_epoch(),
            first_committed: self.paxos.first_committed(),
            last_committed: self.paxos.last_committed(),
            readable: self.paxos.readable(paxos_clock_ms()),
            osdmap: self.store.osdmap().clone(),
            first_epoch: self.store.first_epoch(),
            auth: self.store.auth().clone(),
        };
        let old = self.view.borrow();
        let unchanged = old.role == view.role
            && old.leader == view.leader
            && old.quorum == view.quorum
            && old.election_epoch == view.election_epoch
            && old.last_committed == view.last_committed
            && old.readable == view.readable
            && Arc::ptr_eq(&old.osdmap, &view.osdmap)
            && Arc::ptr_eq(&old.auth, &view.auth);
        drop(old);
        if unchanged {
            return;
        }
        metrics::gauge!("basalt_mon_in_quorum").set(if view.quorum.contains(&self.rank) {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("basalt_mon_quorum_size").set(view.quorum.len() as f64);
        metrics::gauge!("basalt_mon_is_leader").set(if view.role == Role::Leader {
            1.0
        } else {
            0.0
        });
        self.view.send_replace(view);
    }
}

/// The committed map's full OSDs and pools as gauges (the health checks' counts).
fn fullness_metrics(map: &basalt_maps::OsdMap) {
    use basalt_maps::Fullness;
    for level in [Fullness::Nearfull, Fullness::Backfillfull, Fullness::Full] {
        let n = map
            .osds
            .keys()
            .filter(|id| map.fullness(**id) == level)
            .count();
        metrics::gauge!("basalt_mon_osds_fullness", "state" => level.name()).set(n as f64);
    }
    let full_pools = map.pools.keys().filter(|p| map.is_pool_full(**p)).count();
    metrics::gauge!("basalt_mon_pools_full").set(full_pools as f64);
}
