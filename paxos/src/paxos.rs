//! The elector + Multi-Paxos + lease state machine. See the crate docs for the
//! contract and the reasoning; comments here explain the individual rules.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use tracing::debug;

use crate::types::*;

/// What a lagging peer needs: an optional snapshot, then values in order.
type CatchUp = (Option<(Version, Bytes)>, Vec<(Version, Bytes)>);

/// Leader-side view of one quorum peon.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
struct PeerState {
    /// Latest leader-clock send time of a request of ours that this peon has
    /// answered in this term: the peon certainly still followed us then.
    confirmed_at: u64,
    /// Latest expiry of a read lease this peon acknowledged holding.
    acked_expiry: u64,
    /// Last committed version we believe it has (optimistic after catch-up).
    last_committed: Version,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Collecting {
    pn: u64,
    sent_at: u64,
    responded: BTreeSet<Rank>,
    /// Best (highest pn) uncommitted value reported per version.
    candidates: BTreeMap<Version, (u64, Bytes)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Updating {
    version: Version,
    value: Bytes,
    /// `None` while parked behind `write_allowed_at` (see [`Paxos::write_allowed_at`]).
    begun_at: Option<u64>,
    accepted: BTreeSet<Rank>,
    id: Option<ProposalId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// Not a leader.
    Idle,
    Collecting(Collecting),
    Active,
    Updating(Updating),
}

/// The sans-IO monitor consensus state machine (elector + Paxos + leases).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Paxos {
    cfg: Config,
    /// Mirror of the durable state as of the last emitted `Persist`.
    ps: PersistentState,
    role: Role,
    leader: Option<Rank>,
    quorum: Vec<Rank>,
    /// False until the first Tick after construction (restart).
    started: bool,
    /// Epoch in which we may already have acked someone before a restart (the
    /// ack itself is not persisted), so we must not ack anyone else in it.
    no_vote_epoch: Option<u64>,

    // --- elector ---
    electing_me: bool,
    acked_me: BTreeSet<Rank>,
    leader_acked: Option<Rank>,
    election_deadline: u64,
    candidacy_started_at: u64,

    // --- paxos ---
    max_seen_pn: u64,
    /// The pn of our current leadership (valid while role == Leader).
    pn: u64,
    phase: Phase,
    peers: BTreeMap<Rank, PeerState>,
    /// No BEGIN before this time (leader): leases granted by earlier leaders to
    /// monitors outside our quorum may still be valid until then.
    write_allowed_at: u64,
    last_lease_sent_at: u64,
    /// Last retransmission of an unanswered Propose/Collect/Begin.
    last_retry_at: u64,

    // --- peon ---
    last_leader_contact: u64,
    lease_expiry: u64,
    lease_lc: Version,
}

/// Per-call context: the clock, the output buffer and the values committed in
/// this very call (the driver's log only shows what was durable before it).
struct Cx<'a, L: CommittedLog> {
    now: u64,
    out: Vec<Output>,
    log: &'a L,
    fresh: BTreeMap<Version, Bytes>,
    fresh_snapshot: Option<(Version, Bytes)>,
}

impl<L: CommittedLog> Cx<'_, L> {
    fn send(&mut self, to: Rank, msg: Message) {
        self.out.push(Output::Send { to, msg });
    }
    fn value(&self, v: Version) -> Option<Bytes> {
        self.fresh
            .get(&v)
            .cloned()
            .or_else(|| self.log.committed_value(v))
    }
    fn snapshot(&self) -> (Version, Bytes) {
        match &self.fresh_snapshot {
            Some(s) => s.clone(),
            None => self.log.snapshot(),
        }
    }
}

impl Paxos {
    /// A monitor starting (or restarting) from its persisted state. It holds no
    /// lease and no role; it starts an election on its first Tick.
    pub fn new(config: Config, persisted: PersistentState) -> Self {
        let epoch = persisted.election_epoch;
        let max_seen_pn = persisted.last_pn.max(persisted.accepted_pn);
        Paxos {
            cfg: config,
            ps: persisted,
            role: Role::Electing,
            leader: None,
            quorum: Vec::new(),
            started: false,
            no_vote_epoch: Some(epoch),
            electing_me: false,
            acked_me: BTreeSet::new(),
            leader_acked: None,
            election_deadline: 0,
            candidacy_started_at: 0,
            max_seen_pn,
            pn: 0,
            phase: Phase::Idle,
            peers: BTreeMap::new(),
            write_allowed_at: 0,
            last_lease_sent_at: 0,
            last_retry_at: 0,
            last_leader_contact: 0,
            lease_expiry: 0,
            lease_lc: 0,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn leader(&self) -> Option<Rank> {
        self.leader
    }
    /// Sorted ranks of the current quorum (empty while electing).
    pub fn quorum(&self) -> &[Rank] {
        &self.quorum
    }
    pub fn election_epoch(&self) -> u64 {
        self.ps.election_epoch
    }
    pub fn first_committed(&self) -> Version {
        self.ps.first_committed
    }
    pub fn last_committed(&self) -> Version {
        self.ps.last_committed
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// What this monitor has asked the driver to persist so far.
    pub fn persistent_state(&self) -> &PersistentState {
        &self.ps
    }

    /// May serve reads of `last_committed` now.
    ///
    /// A peon needs a valid lease covering its state and no accepted-but-not-
    /// committed value (between BEGIN(v) and COMMIT(v) the leader may already
    /// have acknowledged v). The leader needs every quorum peon to have acked a
    /// still-valid lease: that is what keeps a newer leader from committing.
    pub fn readable(&self, now_ms: u64) -> bool {
        match self.role {
            Role::Electing => false,
            Role::Leader => {
                self.phase == Phase::Active && self.peers.values().all(|p| p.acked_expiry > now_ms)
            }
            Role::Peon => {
                now_ms < self.lease_expiry
                    && self.lease_lc <= self.ps.last_committed
                    && self
                        .ps
                        .uncommitted
                        .as_ref()
                        .is_none_or(|u| u.0 <= self.ps.last_committed)
            }
        }
    }

    /// Leader, recovery finished, no value in flight.
    pub fn can_propose(&self) -> bool {
        self.role == Role::Leader && self.phase == Phase::Active
    }

    /// Feed one event; returns the commands to carry out, in order.
    pub fn handle(&mut self, now_ms: u64, input: Input, log: &impl CommittedLog) -> Vec<Output> {
        let before = (
            self.role,
            self.leader,
            self.quorum.clone(),
            self.ps.election_epoch,
        );
        let mut cx = Cx {
            now: now_ms,
            out: Vec::new(),
            log,
            fresh: BTreeMap::new(),
            fresh_snapshot: None,
        };
        match input {
            Input::Tick => self.tick(&mut cx),
            Input::Receive { from, msg } => self.receive(&mut cx, from, msg),
            Input::Propose { id, value } => self.propose(&mut cx, id, value),
        }
        let after = (
            self.role,
            self.leader,
            self.quorum.clone(),
            self.ps.election_epoch,
        );
        let mut out = merge_persists(cx.out);
        if before != after {
            out.push(Output::StateChanged);
        }
        out
    }

    // ------------------------------------------------------------------
    // durable state
    // ------------------------------------------------------------------

    fn persist<L: CommittedLog>(&mut self, cx: &mut Cx<L>, ops: Vec<PersistOp>) {
        if ops.is_empty() {
            return;
        }
        for op in &ops {
            self.ps.apply(op);
            match op {
                PersistOp::Commit { version, value } => {
                    cx.fresh.insert(*version, value.clone());
                }
                PersistOp::InstallSnapshot { version, data } => {
                    cx.fresh.clear();
                    cx.fresh_snapshot = Some((*version, data.clone()));
                }
                _ => {}
            }
        }
        cx.out.push(Output::Persist(ops));
    }

    /// Learn committed values (any source: a committed value is a fact).
    /// Applies the contiguous run starting at last_committed+1.
    fn learn<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        snapshot: Option<(Version, Bytes)>,
        values: Vec<(Version, Bytes)>,
    ) {
        let mut ops = Vec::new();
        let mut lc = self.ps.last_committed;
        if let Some((sv, data)) = snapshot {
            if sv > lc {
                ops.push(PersistOp::InstallSnapshot { version: sv, data });
                lc = sv;
            }
        }
        let mut values = values;
        values.sort_by_key(|(v, _)| *v);
        for (v, value) in values {
            if v == lc + 1 {
                ops.push(PersistOp::Commit { version: v, value });
                lc = v;
            } else if v > lc + 1 {
                debug!(
                    rank = self.cfg.rank,
                    v, lc, "gap in committed values, ignoring rest"
                );
                break;
            }
        }
        if ops.is_empty() {
            return;
        }
        if self.ps.uncommitted.as_ref().is_some_and(|u| u.0 <= lc) {
            ops.push(PersistOp::ClearUncommitted);
        }
        self.persist(cx, ops);
        self.maybe_trim(cx);
    }

    fn maybe_trim<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let fc = self.ps.first_committed;
        let lc = self.ps.last_committed;
        if fc == 0 || lc < fc {
            return;
        }
        if lc - fc > self.cfg.keep_versions + self.cfg.trim_min {
            let target = (fc + self.cfg.trim_max.max(1)).min(lc - self.cfg.keep_versions);
            if target > fc {
                self.persist(
                    cx,
                    vec![PersistOp::Trim {
                        first_committed: target,
                    }],
                );
            }
        }
    }

    /// What a peer at `peer_lc` needs to reach our last_committed.
    fn catch_up<L: CommittedLog>(&self, cx: &Cx<L>, peer_lc: Version) -> Option<CatchUp> {
        let lc = self.ps.last_committed;
        if peer_lc >= lc {
            return None;
        }
        if peer_lc + 1 >= self.ps.first_committed {
            let vals: Option<Vec<_>> = (peer_lc + 1..=lc)
                .map(|v| cx.value(v).map(|b| (v, b)))
                .collect();
            if let Some(vals) = vals {
                return Some((None, vals));
            }
        }
        let (sv, data) = cx.snapshot();
        if sv <= peer_lc || sv > lc {
            debug!(
                rank = self.cfg.rank,
                sv, peer_lc, lc, "no usable snapshot for catch-up"
            );
            return None;
        }
        let vals: Option<Vec<_>> = (sv + 1..=lc).map(|v| cx.value(v).map(|b| (v, b))).collect();
        match vals {
            Some(vals) => Some((Some((sv, data)), vals)),
            None => {
                debug!(
                    rank = self.cfg.rank,
                    sv, lc, "values after snapshot missing"
                );
                None
            }
        }
    }

    fn send_catch_up<L: CommittedLog>(&mut self, cx: &mut Cx<L>, to: Rank, peer_lc: Version) {
        let epoch = self.ps.election_epoch;
        if let Some((snap, values)) = self.catch_up(cx, peer_lc) {
            if let Some((version, data)) = snap {
                cx.send(
                    to,
                    Message::Snapshot {
                        epoch,
                        version,
                        data,
                    },
                );
            }
            if !values.is_empty() {
                cx.send(to, Message::Commit { epoch, values });
            }
        }
    }

    // ------------------------------------------------------------------
    // dispatch
    // ------------------------------------------------------------------

    fn tick<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let now = cx.now;
        let lease = self.cfg.lease_ms;
        if !self.started {
            self.started = true;
            // A restarted monitor has no term; an election is the only way back.
            if self.role == Role::Electing && !self.electing_me && self.leader_acked.is_none() {
                self.start_election(cx);
            }
            return;
        }
        match self.role {
            Role::Electing => {
                if now >= self.election_deadline {
                    if self.electing_me && self.acked_me.len() >= self.cfg.majority() {
                        self.declare_victory(cx);
                    } else {
                        debug!(rank = self.cfg.rank, "election timed out, restarting");
                        self.start_election(cx);
                    }
                } else if self.electing_me && self.retry_due(now) {
                    // Ceph's sessions retransmit; our driver may simply drop.
                    let epoch = self.ps.election_epoch;
                    for r in 0..self.cfg.num_mons {
                        if !self.acked_me.contains(&r) {
                            cx.send(r, Message::Propose { epoch });
                        }
                    }
                }
            }
            Role::Peon => {
                if now > self.last_leader_contact + 2 * lease {
                    debug!(
                        rank = self.cfg.rank,
                        "no lease from leader, calling election"
                    );
                    self.start_election(cx);
                }
            }
            Role::Leader => self.leader_tick(cx),
        }
    }

    /// Retransmission interval: a quarter of the shorter timeout.
    fn retry_due(&mut self, now: u64) -> bool {
        let every = (self.cfg.lease_ms.min(self.cfg.election_timeout_ms) / 4).max(1);
        if now >= self.last_retry_at + every {
            self.last_retry_at = now;
            true
        } else {
            false
        }
    }

    fn leader_tick<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let now = cx.now;
        let lease = self.cfg.lease_ms;
        let epoch = self.ps.election_epoch;
        match &self.phase {
            Phase::Collecting(c) => {
                if now > c.sent_at + 2 * lease {
                    debug!(rank = self.cfg.rank, "collect timed out");
                    self.start_election(cx);
                } else if self.retry_due(now) {
                    let Phase::Collecting(c) = &self.phase else {
                        return;
                    };
                    let msg = Message::Collect {
                        epoch,
                        pn: c.pn,
                        quorum: self.quorum.clone(),
                        first_committed: self.ps.first_committed,
                        last_committed: self.ps.last_committed,
                    };
                    let missing: Vec<Rank> = self
                        .peers
                        .keys()
                        .filter(|r| !c.responded.contains(r))
                        .copied()
                        .collect();
                    for r in missing {
                        cx.send(r, msg.clone());
                    }
                }
                return;
            }
            Phase::Updating(u) => {
                if let Some(b) = u.begun_at {
                    if now > b + 2 * lease {
                        debug!(rank = self.cfg.rank, "accept timed out");
                        self.start_election(cx);
                        return;
                    }
                    if self.retry_due(now) {
                        let Phase::Updating(u) = &self.phase else {
                            return;
                        };
                        let msg = Message::Begin {
                            epoch,
                            pn: self.pn,
                            version: u.version,
                            value: u.value.clone(),
                        };
                        let missing: Vec<Rank> = self
                            .peers
                            .keys()
                            .filter(|r| !u.accepted.contains(r))
                            .copied()
                            .collect();
                        for r in missing {
                            cx.send(r, msg.clone());
                        }
                    }
                } else if now >= self.write_allowed_at {
                    self.do_begin(cx);
                    if self.role != Role::Leader {
                        return;
                    }
                }
            }
            Phase::Active | Phase::Idle => {}
        }
        if self
            .peers
            .values()
            .any(|p| now > p.confirmed_at + 2 * lease)
        {
            debug!(rank = self.cfg.rank, "lease acks missing, calling election");
            self.start_election(cx);
            return;
        }
        if now >= self.last_lease_sent_at + lease * 6 / 10 {
            self.extend_lease(cx);
        }
    }

    fn receive<L: CommittedLog>(&mut self, cx: &mut Cx<L>, from: Rank, msg: Message) {
        if from >= self.cfg.num_mons || from == self.cfg.rank {
            debug!(
                rank = self.cfg.rank,
                from, "message from unknown rank or self, ignored"
            );
            return;
        }
        match msg {
            Message::Propose { epoch } => self.on_propose(cx, from, epoch),
            Message::Ack { epoch } => self.on_ack(cx, from, epoch),
            Message::Victory { epoch, quorum } => self.on_victory(cx, from, epoch, quorum),
            Message::Collect {
                epoch,
                pn,
                quorum,
                first_committed: _,
                last_committed,
            } => {
                if epoch > self.ps.election_epoch {
                    // The Collect overtook the Victory; it carries the same facts.
                    self.on_victory(cx, from, epoch, quorum);
                }
                self.on_collect(cx, from, epoch, pn, last_committed);
            }
            Message::Last {
                epoch,
                pn,
                accepted_pn,
                first_committed: _,
                last_committed,
                snapshot,
                values,
                uncommitted,
            } => self.on_last(
                cx,
                from,
                epoch,
                pn,
                accepted_pn,
                last_committed,
                snapshot,
                values,
                uncommitted,
            ),
            Message::Begin {
                epoch,
                pn,
                version,
                value,
            } => self.on_begin(cx, from, epoch, pn, version, value),
            Message::Accept { epoch, pn, version } => self.on_accept(cx, from, epoch, pn, version),
            Message::Commit { epoch, values } => {
                if self.role == Role::Leader {
                    // Our own update state must stay consistent with our log;
                    // a commit we did not make means another leader exists, and
                    // our timeouts will sort that out.
                    debug!(
                        rank = self.cfg.rank,
                        from, epoch, "leader ignores foreign commit"
                    );
                    return;
                }
                if self.is_current_leader(from, epoch) {
                    self.last_leader_contact = cx.now;
                }
                self.learn(cx, None, values);
            }
            Message::Snapshot {
                epoch,
                version,
                data,
            } => {
                if self.role == Role::Leader {
                    debug!(
                        rank = self.cfg.rank,
                        from, epoch, "leader ignores foreign snapshot"
                    );
                    return;
                }
                if self.is_current_leader(from, epoch) {
                    self.last_leader_contact = cx.now;
                }
                self.learn(cx, Some((version, data)), Vec::new());
            }
            Message::Lease {
                epoch,
                last_committed,
                granted_at,
                expires_at,
            } => self.on_lease(cx, from, epoch, last_committed, granted_at, expires_at),
            Message::LeaseAck {
                epoch,
                granted_at,
                expires_at,
                last_committed,
            } => self.on_lease_ack(cx, from, epoch, granted_at, expires_at, last_committed),
        }
    }

    fn is_current_leader(&self, from: Rank, epoch: u64) -> bool {
        self.role == Role::Peon && self.leader == Some(from) && epoch == self.ps.election_epoch
    }

    // ------------------------------------------------------------------
    // elector
    // ------------------------------------------------------------------

    /// Leave the current term (if any): fail the in-flight proposal, forget
    /// leases and leader state.
    fn step_down<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        if let Phase::Updating(u) = &self.phase {
            if let Some(id) = u.id {
                cx.out.push(Output::ProposalDone {
                    id,
                    result: Err(ProposeError::LeadershipLost),
                });
            }
        }
        self.phase = Phase::Idle;
        self.peers.clear();
        self.role = Role::Electing;
        self.leader = None;
        self.quorum.clear();
        // A peon entering an election drops its lease: the next leader's
        // quorum may exclude it, yet commit at once if the quorum is complete.
        self.lease_expiry = 0;
        self.lease_lc = 0;
    }

    fn start_election<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        self.step_down(cx);
        self.started = true;
        let e = self.ps.election_epoch;
        // Every round gets a fresh odd epoch (Ceph re-uses an odd epoch when it
        // restarts a round); a fresh epoch keeps "one ack per epoch" simple.
        let new_epoch = if e.is_multiple_of(2) { e + 1 } else { e + 2 };
        self.persist(cx, vec![PersistOp::ElectionEpoch(new_epoch)]);
        self.electing_me = true;
        self.acked_me = BTreeSet::from([self.cfg.rank]);
        self.leader_acked = None;
        self.candidacy_started_at = cx.now;
        self.election_deadline = cx.now + self.cfg.election_timeout_ms;
        debug!(rank = self.cfg.rank, epoch = new_epoch, "starting election");
        for r in 0..self.cfg.num_mons {
            if r != self.cfg.rank {
                cx.send(r, Message::Propose { epoch: new_epoch });
            }
        }
        if self.acked_me.len() == self.cfg.num_mons as usize {
            self.declare_victory(cx);
        }
    }

    fn on_propose<L: CommittedLog>(&mut self, cx: &mut Cx<L>, from: Rank, epoch: u64) {
        let mine = self.ps.election_epoch;
        if epoch.is_multiple_of(2) {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "propose with even epoch, ignored"
            );
            return;
        }
        if epoch < mine {
            if mine.is_multiple_of(2) && self.role != Role::Electing && !self.quorum.contains(&from)
            {
                // A monitor outside our quorum just (re)started: re-elect so it can join.
                debug!(
                    rank = self.cfg.rank,
                    from, epoch, "old propose from outsider, re-electing"
                );
                self.start_election(cx);
            } else {
                debug!(rank = self.cfg.rank, from, epoch, "old propose ignored");
            }
            return;
        }
        if epoch > mine {
            self.step_down(cx);
            self.started = true;
            self.persist(cx, vec![PersistOp::ElectionEpoch(epoch)]);
            self.electing_me = false;
            self.acked_me.clear();
            self.leader_acked = None;
            self.election_deadline = cx.now + self.cfg.election_timeout_ms;
        }
        // epoch == ours, odd.
        if self.no_vote_epoch == Some(epoch) {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "may have voted before restart, silent"
            );
            return;
        }
        if from < self.cfg.rank {
            match self.leader_acked {
                Some(l) if l == from => cx.send(from, Message::Ack { epoch }),
                Some(l) if l < from => debug!(rank = self.cfg.rank, from, "backing a better rank"),
                _ => {
                    // Defer, withdrawing our own candidacy or switching to a
                    // better candidate (as Ceph does: the one we backed will
                    // defer to it too). Two candidates may thus both count our
                    // ack, but we follow only the one we back last, and a
                    // leader needs every quorum member to follow it (collect),
                    // so at most one leader per epoch ever gets a working term.
                    self.electing_me = false;
                    self.acked_me.clear();
                    self.leader_acked = Some(from);
                    // The candidate may take a whole election timeout to declare
                    // victory. A backer whose timer equalled it would restart the
                    // election just as the VICTORY arrives; with equal timeouts on
                    // every monitor two restarted peers did exactly that in lock
                    // step, forever (seen in the process tests). Backers wait twice
                    // as long: they only need to act if the candidate died.
                    self.election_deadline = cx.now + 2 * self.cfg.election_timeout_ms;
                    cx.send(from, Message::Ack { epoch });
                }
            }
        } else if self.leader_acked.is_none() && !self.electing_me {
            // We outrank the proposer: run ourselves in the same epoch.
            self.electing_me = true;
            self.acked_me = BTreeSet::from([self.cfg.rank]);
            self.candidacy_started_at = cx.now;
            self.election_deadline = cx.now + self.cfg.election_timeout_ms;
            for r in 0..self.cfg.num_mons {
                if r != self.cfg.rank {
                    cx.send(r, Message::Propose { epoch });
                }
            }
        }
    }

    fn on_ack<L: CommittedLog>(&mut self, cx: &mut Cx<L>, from: Rank, epoch: u64) {
        if self.role != Role::Electing || !self.electing_me || epoch != self.ps.election_epoch {
            debug!(rank = self.cfg.rank, from, epoch, "stray ack ignored");
            return;
        }
        self.acked_me.insert(from);
        if self.acked_me.len() == self.cfg.num_mons as usize {
            self.declare_victory(cx);
        }
    }

    fn new_pn(&self) -> u64 {
        let base = self
            .ps
            .last_pn
            .max(self.ps.accepted_pn)
            .max(self.max_seen_pn);
        (base / PN_STRIDE + 1) * PN_STRIDE + u64::from(self.cfg.rank)
    }

    fn declare_victory<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let epoch = self.ps.election_epoch + 1;
        let quorum: Vec<Rank> = self.acked_me.iter().copied().collect();
        let pn = self.new_pn();
        // Our own promise too: we are an acceptor of our own proposals.
        self.persist(
            cx,
            vec![
                PersistOp::ElectionEpoch(epoch),
                PersistOp::LastPn(pn),
                PersistOp::AcceptedPn(pn),
            ],
        );
        self.max_seen_pn = self.max_seen_pn.max(pn);
        self.role = Role::Leader;
        self.leader = Some(self.cfg.rank);
        self.quorum = quorum.clone();
        self.electing_me = false;
        self.acked_me.clear();
        self.leader_acked = None;
        self.no_vote_epoch = None;
        self.pn = pn;
        // Leases granted by an earlier leader end at most 2 × lease after the
        // last member of our quorum left that leader (see crate docs, "Lease
        // safety"); members of our quorum dropped theirs when they acked us,
        // so with everyone in the quorum there is nobody left to wait for.
        self.write_allowed_at = if quorum.len() < self.cfg.num_mons as usize {
            cx.now + 2 * self.cfg.lease_ms
        } else {
            cx.now
        };
        self.peers = quorum
            .iter()
            .filter(|&&r| r != self.cfg.rank)
            .map(|&r| {
                (
                    r,
                    PeerState {
                        confirmed_at: self.candidacy_started_at,
                        ..Default::default()
                    },
                )
            })
            .collect();
        debug!(rank = self.cfg.rank, epoch, ?quorum, pn, "won election");
        for &r in self.peers.keys() {
            cx.send(
                r,
                Message::Victory {
                    epoch,
                    quorum: quorum.clone(),
                },
            );
        }
        self.begin_collect(cx);
    }

    fn on_victory<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        quorum: Vec<Rank>,
    ) {
        let mine = self.ps.election_epoch;
        if epoch <= mine {
            if epoch < mine || self.leader != Some(from) {
                debug!(rank = self.cfg.rank, from, epoch, "stale victory ignored");
            }
            return;
        }
        let sane = epoch.is_multiple_of(2)
            && quorum.contains(&self.cfg.rank)
            && quorum.first() == Some(&from)
            && quorum.windows(2).all(|w| w[0] < w[1])
            && quorum.len() >= self.cfg.majority()
            && quorum.iter().all(|&r| r < self.cfg.num_mons);
        if !sane {
            debug!(
                rank = self.cfg.rank,
                from,
                epoch,
                ?quorum,
                "malformed victory ignored"
            );
            return;
        }
        if epoch != mine + 1 || self.role != Role::Electing {
            // We cannot have been part of that election: force a new one.
            debug!(
                rank = self.cfg.rank,
                from, epoch, mine, "funny victory epoch, re-electing"
            );
            self.persist(cx, vec![PersistOp::ElectionEpoch(epoch)]);
            self.start_election(cx);
            return;
        }
        if self.leader_acked.is_some_and(|l| l != from) || self.electing_me {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "victory of someone we did not back"
            );
            return;
        }
        self.persist(cx, vec![PersistOp::ElectionEpoch(epoch)]);
        self.role = Role::Peon;
        self.leader = Some(from);
        self.quorum = quorum;
        self.electing_me = false;
        self.acked_me.clear();
        self.leader_acked = None;
        self.no_vote_epoch = None;
        self.phase = Phase::Idle;
        self.last_leader_contact = cx.now;
        self.lease_expiry = 0;
        self.lease_lc = 0;
        debug!(rank = self.cfg.rank, leader = from, epoch, "peon");
    }

    // ------------------------------------------------------------------
    // phase 1: collect / last
    // ------------------------------------------------------------------

    fn begin_collect<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let mut candidates = BTreeMap::new();
        if let Some((v, pn, val)) = &self.ps.uncommitted {
            candidates.insert(*v, (*pn, val.clone()));
        }
        self.phase = Phase::Collecting(Collecting {
            pn: self.pn,
            sent_at: cx.now,
            responded: BTreeSet::new(),
            candidates,
        });
        let msg = Message::Collect {
            epoch: self.ps.election_epoch,
            pn: self.pn,
            quorum: self.quorum.clone(),
            first_committed: self.ps.first_committed,
            last_committed: self.ps.last_committed,
        };
        for &r in self.peers.keys() {
            cx.send(r, msg.clone());
        }
        if self.peers.is_empty() {
            self.finish_collect(cx);
        }
    }

    fn on_collect<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        pn: u64,
        leader_lc: Version,
    ) {
        if !self.is_current_leader(from, epoch) {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "collect outside our term ignored"
            );
            return;
        }
        self.last_leader_contact = cx.now;
        self.max_seen_pn = self.max_seen_pn.max(pn);
        let e = self.ps.election_epoch;
        if pn < self.ps.accepted_pn {
            cx.send(
                from,
                Message::Last {
                    epoch: e,
                    pn,
                    accepted_pn: self.ps.accepted_pn,
                    first_committed: self.ps.first_committed,
                    last_committed: self.ps.last_committed,
                    snapshot: None,
                    values: Vec::new(),
                    uncommitted: None,
                },
            );
            return;
        }
        if pn > self.ps.accepted_pn {
            // The promise must be durable before the leader can rely on it.
            self.persist(cx, vec![PersistOp::AcceptedPn(pn)]);
        }
        let (snapshot, values) = self.catch_up(cx, leader_lc).unwrap_or((None, Vec::new()));
        cx.send(
            from,
            Message::Last {
                epoch: e,
                pn,
                accepted_pn: self.ps.accepted_pn,
                first_committed: self.ps.first_committed,
                last_committed: self.ps.last_committed,
                snapshot,
                values,
                uncommitted: self.ps.uncommitted.clone(),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_last<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        pn: u64,
        accepted_pn: u64,
        peer_lc: Version,
        snapshot: Option<(Version, Bytes)>,
        values: Vec<(Version, Bytes)>,
        uncommitted: Option<(Version, u64, Bytes)>,
    ) {
        if self.role != Role::Leader || epoch != self.ps.election_epoch {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "last outside our term ignored"
            );
            return;
        }
        let (cpn, sent_at) = match &self.phase {
            Phase::Collecting(c) => (c.pn, c.sent_at),
            _ => {
                debug!(
                    rank = self.cfg.rank,
                    from, "last while not collecting ignored"
                );
                return;
            }
        };
        if pn != cpn || !self.peers.contains_key(&from) {
            debug!(
                rank = self.cfg.rank,
                from, pn, "last for another collect ignored"
            );
            return;
        }
        self.max_seen_pn = self.max_seen_pn.max(accepted_pn);
        if accepted_pn > cpn {
            // Someone promised a higher pn: pick a higher one and collect again.
            let npn = self.new_pn();
            debug!(
                rank = self.cfg.rank,
                from, accepted_pn, npn, "recollecting with higher pn"
            );
            self.persist(cx, vec![PersistOp::LastPn(npn), PersistOp::AcceptedPn(npn)]);
            self.pn = npn;
            self.begin_collect(cx);
            return;
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.confirmed_at = p.confirmed_at.max(sent_at);
            p.last_committed = peer_lc;
        }
        self.learn(cx, snapshot, values);
        if let Phase::Collecting(c) = &mut self.phase {
            if let Some((v, upn, val)) = uncommitted {
                let better = c.candidates.get(&v).is_none_or(|(p, _)| upn > *p);
                if better {
                    c.candidates.insert(v, (upn, val));
                }
            }
            c.responded.insert(from);
            if c.responded.len() == self.peers.len() {
                self.finish_collect(cx);
            }
        }
    }

    fn finish_collect<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let Phase::Collecting(c) = std::mem::replace(&mut self.phase, Phase::Active) else {
            return;
        };
        let lc = self.ps.last_committed;
        if self.ps.uncommitted.as_ref().is_some_and(|u| u.0 <= lc) {
            self.persist(cx, vec![PersistOp::ClearUncommitted]);
        }
        let lagging: Vec<(Rank, Version)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.last_committed < lc)
            .map(|(&r, p)| (r, p.last_committed))
            .collect();
        for (r, plc) in lagging {
            self.send_catch_up(cx, r, plc);
            if let Some(p) = self.peers.get_mut(&r) {
                p.last_committed = lc;
            }
        }
        debug!(rank = self.cfg.rank, lc, "collect finished");
        if let Some((_, val)) = c.candidates.get(&(lc + 1)) {
            // A value some quorum member accepted may already be chosen (even
            // acknowledged): it must be re-proposed before anything new.
            self.start_update(cx, val.clone(), None);
        } else {
            self.extend_lease(cx);
        }
    }

    // ------------------------------------------------------------------
    // phase 2: begin / accept / commit
    // ------------------------------------------------------------------

    fn propose<L: CommittedLog>(&mut self, cx: &mut Cx<L>, id: ProposalId, value: Bytes) {
        let err = if self.role != Role::Leader {
            Some(ProposeError::NotLeader {
                leader: self.leader,
            })
        } else if self.phase != Phase::Active {
            Some(ProposeError::Busy)
        } else {
            None
        };
        match err {
            Some(e) => cx.out.push(Output::ProposalDone { id, result: Err(e) }),
            None => self.start_update(cx, value, Some(id)),
        }
    }

    fn start_update<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        value: Bytes,
        id: Option<ProposalId>,
    ) {
        self.phase = Phase::Updating(Updating {
            version: self.ps.last_committed + 1,
            value,
            begun_at: None,
            accepted: BTreeSet::new(),
            id,
        });
        if cx.now >= self.write_allowed_at {
            self.do_begin(cx);
        } else {
            debug!(
                rank = self.cfg.rank,
                until = self.write_allowed_at,
                "update parked behind old leases"
            );
        }
    }

    fn do_begin<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let Phase::Updating(u) = &self.phase else {
            return;
        };
        let (version, value) = (u.version, u.value.clone());
        self.persist(
            cx,
            vec![PersistOp::Uncommitted {
                version,
                pn: self.pn,
                value: value.clone(),
            }],
        );
        if let Phase::Updating(u) = &mut self.phase {
            u.begun_at = Some(cx.now);
            u.accepted = BTreeSet::from([self.cfg.rank]);
        }
        let msg = Message::Begin {
            epoch: self.ps.election_epoch,
            pn: self.pn,
            version,
            value,
        };
        for &r in self.peers.keys() {
            cx.send(r, msg.clone());
        }
        self.maybe_commit(cx);
    }

    fn on_begin<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        pn: u64,
        version: Version,
        value: Bytes,
    ) {
        if !self.is_current_leader(from, epoch) {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "begin outside our term ignored"
            );
            return;
        }
        self.last_leader_contact = cx.now;
        self.max_seen_pn = self.max_seen_pn.max(pn);
        if pn < self.ps.accepted_pn || version != self.ps.last_committed + 1 {
            debug!(
                rank = self.cfg.rank,
                pn,
                version,
                lc = self.ps.last_committed,
                "begin refused"
            );
            return;
        }
        let mut ops = Vec::new();
        if pn > self.ps.accepted_pn {
            ops.push(PersistOp::AcceptedPn(pn));
        }
        ops.push(PersistOp::Uncommitted { version, pn, value });
        self.persist(cx, ops);
        cx.send(from, Message::Accept { epoch, pn, version });
    }

    fn on_accept<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        pn: u64,
        version: Version,
    ) {
        if self.role != Role::Leader || epoch != self.ps.election_epoch || pn != self.pn {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "accept outside our term ignored"
            );
            return;
        }
        let Phase::Updating(u) = &mut self.phase else {
            return;
        };
        let Some(begun) = u.begun_at else { return };
        if u.version != version || !self.peers.contains_key(&from) {
            return;
        }
        u.accepted.insert(from);
        if let Some(p) = self.peers.get_mut(&from) {
            p.confirmed_at = p.confirmed_at.max(begun);
        }
        self.maybe_commit(cx);
    }

    fn maybe_commit<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        let Phase::Updating(u) = &self.phase else {
            return;
        };
        // Every quorum member, not a majority: a leased peon must have seen
        // BEGIN (and so stopped serving reads) before the client hears "ok".
        if u.begun_at.is_none() || u.accepted.len() < self.quorum.len() {
            return;
        }
        let Phase::Updating(u) = std::mem::replace(&mut self.phase, Phase::Active) else {
            return;
        };
        self.persist(
            cx,
            vec![
                PersistOp::Commit {
                    version: u.version,
                    value: u.value.clone(),
                },
                PersistOp::ClearUncommitted,
            ],
        );
        let msg = Message::Commit {
            epoch: self.ps.election_epoch,
            values: vec![(u.version, u.value)],
        };
        for (&r, p) in self.peers.iter_mut() {
            p.last_committed = u.version;
            cx.send(r, msg.clone());
        }
        if let Some(id) = u.id {
            cx.out.push(Output::ProposalDone {
                id,
                result: Ok(u.version),
            });
        }
        self.maybe_trim(cx);
        self.extend_lease(cx);
    }

    // ------------------------------------------------------------------
    // leases
    // ------------------------------------------------------------------

    /// Send a lease (or, when we may not grant one, a heartbeat lease that
    /// expires at once) to every quorum peon.
    fn extend_lease<L: CommittedLog>(&mut self, cx: &mut Cx<L>) {
        if self.role != Role::Leader || matches!(self.phase, Phase::Collecting(_) | Phase::Idle) {
            return;
        }
        let now = cx.now;
        let lease = self.cfg.lease_ms;
        // Only grant to peons that answered a request sent within the last
        // lease: a peon that silently left our term (to back a newer leader)
        // thus bounds every lease we still hand out (crate docs, "Lease safety").
        let grant = self.phase == Phase::Active
            && self.peers.values().all(|p| p.confirmed_at + lease >= now);
        let expires_at = if grant { now + lease } else { now };
        self.last_lease_sent_at = now;
        let msg = Message::Lease {
            epoch: self.ps.election_epoch,
            last_committed: self.ps.last_committed,
            granted_at: now,
            expires_at,
        };
        for &r in self.peers.keys() {
            cx.send(r, msg.clone());
        }
    }

    fn on_lease<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        lc: Version,
        granted_at: u64,
        expires_at: u64,
    ) {
        if !self.is_current_leader(from, epoch) {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "lease outside our term ignored"
            );
            return;
        }
        if expires_at < granted_at {
            debug!(rank = self.cfg.rank, from, "malformed lease ignored");
            return;
        }
        if lc > self.ps.last_committed {
            // We are missing commits the leader has: a read here could be
            // stale. Stay silent so the leader notices and re-elects (which
            // back-fills us).
            debug!(
                rank = self.cfg.rank,
                lc,
                mine = self.ps.last_committed,
                "lease ahead of us"
            );
            return;
        }
        self.last_leader_contact = cx.now;
        let held = expires_at > cx.now;
        if held && expires_at > self.lease_expiry {
            self.lease_expiry = expires_at;
            self.lease_lc = lc;
        }
        cx.send(
            from,
            Message::LeaseAck {
                epoch,
                granted_at,
                expires_at: if held { expires_at } else { granted_at },
                last_committed: self.ps.last_committed,
            },
        );
    }

    fn on_lease_ack<L: CommittedLog>(
        &mut self,
        cx: &mut Cx<L>,
        from: Rank,
        epoch: u64,
        granted_at: u64,
        expires_at: u64,
        peer_lc: Version,
    ) {
        if self.role != Role::Leader || epoch != self.ps.election_epoch {
            debug!(
                rank = self.cfg.rank,
                from, epoch, "lease ack outside our term ignored"
            );
            return;
        }
        // Sanity: only our own grants can be echoed.
        if granted_at > cx.now
            || granted_at > self.last_lease_sent_at
            || expires_at > granted_at + self.cfg.lease_ms
        {
            debug!(rank = self.cfg.rank, from, "implausible lease ack ignored");
            return;
        }
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        p.confirmed_at = p.confirmed_at.max(granted_at);
        p.acked_expiry = p.acked_expiry.max(expires_at);
        // Back-fill a lagging peon, at most once per lease renewal (the ack of
        // an old lease may report an old state).
        if peer_lc < self.ps.last_committed && granted_at == self.last_lease_sent_at {
            p.last_committed = self.ps.last_committed;
            self.send_catch_up(cx, from, peer_lc);
        }
    }
}

/// Adjacent Persist batches can share one fsync: both are durable before any
/// later output either way.
fn merge_persists(out: Vec<Output>) -> Vec<Output> {
    let mut merged: Vec<Output> = Vec::with_capacity(out.len());
    for o in out {
        if let (Output::Persist(next), Some(Output::Persist(prev))) = (&o, merged.last_mut()) {
            prev.extend(next.iter().cloned());
            continue;
        }
        merged.push(o);
    }
    merged
}
