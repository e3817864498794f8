//! Public data types of the consensus core: configuration, persisted state,
//! wire messages, inputs and outputs.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Fixed per monitor from the initial monmap; lower = preferred leader.
pub type Rank = u32;
/// A Paxos version (1 is the first committed value; 0 means "nothing yet").
pub type Version = u64;
/// Identifies a client proposal so the driver can match [`Output::ProposalDone`].
pub type ProposalId = u64;

/// Proposal numbers are `k * PN_STRIDE + rank`, so ranks must stay below this.
pub const PN_STRIDE: u64 = 100;

/// Static configuration of one monitor.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    pub rank: Rank,
    /// Static monmap size (1, 3 or 5; anything below [`PN_STRIDE`] works).
    pub num_mons: u32,
    /// Ceph `mon_election_timeout` (5000). Tests use ~300-1000.
    pub election_timeout_ms: u64,
    /// Ceph `mon_lease` (5000). Leases are renewed every 0.6 × lease; missing
    /// lease acks / accepts / collects for 2 × lease trigger a new election.
    pub lease_ms: u64,
    /// Ceph `paxos_min`: committed versions always kept.
    pub keep_versions: u64,
    /// Ceph `paxos_trim_min`: trim only when at least this many versions are surplus.
    pub trim_min: u64,
    /// Ceph `paxos_trim_max`: trim at most this many versions at once.
    pub trim_max: u64,
}

impl Config {
    /// Ceph-like defaults for monitor `rank` in a monmap of `num_mons`.
    pub fn new(rank: Rank, num_mons: u32) -> Self {
        Config {
            rank,
            num_mons,
            election_timeout_ms: 5000,
            lease_ms: 5000,
            keep_versions: 500,
            trim_min: 250,
            trim_max: 500,
        }
    }

    /// Size of a strict majority of the monmap.
    pub fn majority(&self) -> usize {
        self.num_mons as usize / 2 + 1
    }
}

/// Everything this monitor must remember across a restart (besides the
/// committed values themselves, which the driver's store holds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PersistentState {
    /// Odd = electing, even = stable.
    pub election_epoch: u64,
    /// Highest proposal number this monitor generated as a leader.
    pub last_pn: u64,
    /// Highest proposal number this monitor promised (as acceptor).
    pub accepted_pn: u64,
    /// Oldest version whose value is kept (0 = none yet).
    pub first_committed: Version,
    pub last_committed: Version,
    /// The accepted but not (known to be) committed value: (version, pn, value).
    pub uncommitted: Option<(Version, u64, Bytes)>,
}

impl PersistentState {
    /// How one persisted op changes this state. The core, the monitor's store
    /// and the test kit all go through here, so a restarted monitor resumes
    /// from exactly the state the core had in memory.
    pub fn apply(&mut self, op: &PersistOp) {
        match op {
            PersistOp::ElectionEpoch(e) => self.election_epoch = *e,
            PersistOp::LastPn(pn) => self.last_pn = *pn,
            PersistOp::AcceptedPn(pn) => self.accepted_pn = *pn,
            PersistOp::Uncommitted { version, pn, value } => {
                self.uncommitted = Some((*version, *pn, value.clone()))
            }
            PersistOp::ClearUncommitted => self.uncommitted = None,
            PersistOp::Commit { version, .. } => {
                self.last_committed = *version;
                if self.first_committed == 0 {
                    self.first_committed = *version;
                }
            }
            PersistOp::InstallSnapshot { version, .. } => {
                self.first_committed = *version;
                self.last_committed = *version;
            }
            PersistOp::Trim { first_committed } => self.first_committed = *first_committed,
        }
    }
}

/// Read access to what this monitor has durably committed (the driver's store).
pub trait CommittedLog {
    /// The value committed at `v`, if still kept (`first_committed..=last_committed`).
    fn committed_value(&self, v: Version) -> Option<Bytes>;
    /// Full state of the replicated state machine at some committed version
    /// (for a peer behind our first_committed).
    fn snapshot(&self) -> (Version, Bytes);
}

/// Role of this monitor in the current election epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Electing,
    Leader,
    Peon,
}

/// Events fed to [`crate::Paxos::handle`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Time passed; call every ~1/10 of the shortest timeout (`election_timeout_ms`, `lease_ms`).
    Tick,
    Receive {
        from: Rank,
        msg: Message,
    },
    Propose {
        id: ProposalId,
        value: Bytes,
    },
}

/// Commands for the driver, to be carried out in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Send {
        to: Rank,
        msg: Message,
    },
    /// Must be durable (one atomic, fsynced store transaction) before any later
    /// Output in the same Vec is acted on.
    Persist(Vec<PersistOp>),
    /// A client proposal finished: Ok(version it committed at) or an error (not
    /// leader / busy / leadership lost — the value may or may not commit).
    ProposalDone {
        id: ProposalId,
        result: Result<Version, ProposeError>,
    },
    /// role/leader/quorum/epoch changed (the driver logs it, updates metrics,
    /// fails or forwards waiting commands).
    StateChanged,
}

/// One change to the durable store. A `Persist` batch is applied atomically.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PersistOp {
    ElectionEpoch(u64),
    LastPn(u64),
    AcceptedPn(u64),
    Uncommitted {
        version: Version,
        pn: u64,
        value: Bytes,
    },
    ClearUncommitted,
    /// Store value at version and set last_committed = version (and
    /// first_committed = version if it was 0); the driver ALSO applies the
    /// value to its state machine in the same transaction. `version` is always
    /// `last_committed + 1`.
    Commit {
        version: Version,
        value: Bytes,
    },
    /// Replace the whole state machine with a snapshot taken at `version`
    /// (first_committed = last_committed = version; values below are dropped).
    InstallSnapshot {
        version: Version,
        data: Bytes,
    },
    /// Drop committed values below `first_committed`.
    ///
    /// Departure from Ceph: Ceph trims through a Paxos proposal. Committed
    /// values are immutable and every monitor can fall back to a snapshot for a
    /// peer that is too far behind, so trimming is a purely local decision here
    /// and costs no consensus round.
    Trim {
        first_committed: Version,
    },
}

/// Messages exchanged between monitors. Every message after the election
/// carries the sender's election epoch; receivers drop those that do not match
/// their own (with a debug line) except for committed values, which are facts
/// and may be learned from anyone. (`Ord` only so model checkers can keep
/// messages in ordered sets.)
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Message {
    /// Elector: "elect me" in odd epoch `epoch`.
    Propose { epoch: u64 },
    /// Elector: the sender defers to the receiver in `epoch`.
    Ack { epoch: u64 },
    /// Elector: the receiver is a peon of the sender in even epoch `epoch`.
    Victory { epoch: u64, quorum: Vec<Rank> },
    /// Phase 1a. Carries the quorum too, so that a Collect overtaking its
    /// Victory on a reordering network still establishes the term.
    Collect {
        epoch: u64,
        pn: u64,
        quorum: Vec<Rank>,
        first_committed: Version,
        last_committed: Version,
    },
    /// Phase 1b. `accepted_pn > pn` is a refusal; otherwise a promise with the
    /// committed values the leader lacks and the peon's uncommitted value.
    Last {
        epoch: u64,
        pn: u64,
        accepted_pn: u64,
        first_committed: Version,
        last_committed: Version,
        snapshot: Option<(Version, Bytes)>,
        values: Vec<(Version, Bytes)>,
        uncommitted: Option<(Version, u64, Bytes)>,
    },
    /// Phase 2a.
    Begin {
        epoch: u64,
        pn: u64,
        version: Version,
        value: Bytes,
    },
    /// Phase 2b.
    Accept {
        epoch: u64,
        pn: u64,
        version: Version,
    },
    /// Committed values, in version order (one after an update, many for catch-up).
    Commit {
        epoch: u64,
        values: Vec<(Version, Bytes)>,
    },
    /// Lease until `expires_at` (absolute ms on the shared clock) over state
    /// `last_committed`. `expires_at == granted_at` is a pure heartbeat that
    /// grants no reads (sent while the leader may not grant a lease).
    Lease {
        epoch: u64,
        last_committed: Version,
        granted_at: u64,
        expires_at: u64,
    },
    /// Echoes the lease it acknowledges; `expires_at == granted_at` when the
    /// peon only confirms it still follows the leader but holds no read lease
    /// (e.g. it lacks commits: `last_committed` lets the leader back-fill it).
    LeaseAck {
        epoch: u64,
        granted_at: u64,
        expires_at: u64,
        last_committed: Version,
    },
    /// Full state machine at `version` for a peer behind our first_committed.
    Snapshot {
        epoch: u64,
        version: Version,
        data: Bytes,
    },
}

/// Why a proposal was not (certainly) committed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<Rank> },
    #[error("leader busy: a value is already in flight or recovery is not finished")]
    Busy,
    #[error("leadership lost while the value was in flight; it may or may not commit")]
    LeadershipLost,
}
