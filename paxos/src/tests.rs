//! Unit tests of the state machine, driven by hand without a network.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::testkit::{check_persist_before_send, MemStore};
use crate::*;

struct Node {
    px: Paxos,
    store: MemStore,
}

struct Cluster {
    nodes: Vec<Node>,
    now: u64,
    net: VecDeque<(Rank, Rank, Message)>,
    done: Vec<(ProposalId, Result<Version, ProposeError>)>,
    snapshots_sent: usize,
}

fn cfg(rank: Rank, n: u32) -> Config {
    Config {
        election_timeout_ms: 1000,
        lease_ms: 1000,
        ..Config::new(rank, n)
    }
}

impl Cluster {
    fn new(n: u32) -> Self {
        Self::with(n, |_| {})
    }

    fn with(n: u32, f: impl Fn(&mut Config)) -> Self {
        let nodes = (0..n)
            .map(|r| {
                let mut c = cfg(r, n);
                f(&mut c);
                Node {
                    px: Paxos::new(c, PersistentState::default()),
                    store: MemStore::default(),
                }
            })
            .collect();
        Cluster {
            nodes,
            now: 1,
            net: VecDeque::new(),
            done: Vec::new(),
            snapshots_sent: 0,
        }
    }

    fn step(&mut self, i: Rank, input: Input) -> Vec<Output> {
        let node = &mut self.nodes[i as usize];
        let out = node.px.handle(self.now, input, &node.store);
        check_persist_before_send(&node.store.state, &out).unwrap();
        for o in &out {
            match o {
                Output::Persist(ops) => node.store.apply(ops).unwrap(),
                Output::Send { to, msg } => {
                    self.snapshots_sent += matches!(msg, Message::Snapshot { .. }) as usize;
                    self.net.push_back((i, *to, msg.clone()))
                }
                Output::ProposalDone { id, result } => self.done.push((*id, result.clone())),
                Output::StateChanged => {}
            }
        }
        assert_eq!(&node.store.state, node.px.persistent_state());
        out
    }

    fn tick(&mut self, i: Rank) -> Vec<Output> {
        self.step(i, Input::Tick)
    }

    fn tick_all(&mut self) {
        for i in 0..self.nodes.len() as Rank {
            self.tick(i);
        }
    }

    /// Deliver queued messages (FIFO) while `keep` says so; drop the others.
    fn deliver_filtered(&mut self, keep: impl Fn(Rank, Rank, &Message) -> bool) {
        let mut guard = 0;
        while let Some((from, to, msg)) = self.net.pop_front() {
            guard += 1;
            assert!(guard < 100_000, "message storm");
            if keep(from, to, &msg) {
                self.step(to, Input::Receive { from, msg });
            }
        }
    }

    fn deliver_all(&mut self) {
        self.deliver_filtered(|_, _, _| true);
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    fn px(&self, i: Rank) -> &Paxos {
        &self.nodes[i as usize].px
    }

    /// Elect rank 0 with everyone up.
    fn elect(&mut self) {
        self.tick_all(); // first tick: everyone starts an election
        self.deliver_all();
        assert_eq!(self.px(0).role(), Role::Leader);
        assert!(self.px(0).can_propose());
    }

    fn propose(&mut self, at: Rank, id: ProposalId, v: &'static str) {
        self.step(
            at,
            Input::Propose {
                id,
                value: Bytes::from_static(v.as_bytes()),
            },
        );
    }
}

#[test]
fn single_monitor_elects_itself_and_commits() {
    let mut c = Cluster::new(1);
    c.tick(0);
    assert_eq!(c.px(0).role(), Role::Leader);
    assert_eq!(c.px(0).election_epoch(), 2);
    assert_eq!(c.px(0).quorum(), &[0]);
    assert!(c.px(0).readable(c.now));
    c.propose(0, 7, "a");
    assert_eq!(c.done, vec![(7, Ok(1))]);
    assert_eq!(c.px(0).last_committed(), 1);
    assert_eq!(c.nodes[0].store.applied, vec![Bytes::from_static(b"a")]);
}

#[test]
fn rank0_wins_with_all_acks_immediately() {
    let mut c = Cluster::new(3);
    c.elect();
    for r in 1..3 {
        assert_eq!(c.px(r).role(), Role::Peon);
        assert_eq!(c.px(r).leader(), Some(0));
        assert_eq!(c.px(r).quorum(), &[0, 1, 2]);
    }
    assert_eq!(c.px(0).quorum(), &[0, 1, 2]);
    let e = c.px(0).election_epoch();
    assert_eq!(e % 2, 0);
    assert!((0..3).all(|r| c.px(r).election_epoch() == e));
    // Lease granted and acked: everyone readable.
    assert!(
        (0..3).all(|r| c.px(r).readable(c.now)),
        "all readable after lease"
    );
}

#[test]
fn lower_rank_defers_and_higher_rank_runs_itself() {
    let mut c = Cluster::new(3);
    // Only rank 2 starts an election; the others have not ticked yet.
    c.tick(2);
    let e = c.px(2).election_epoch();
    // Rank 1 outranks 2: it runs itself in the same epoch rather than deferring.
    let (from, to, msg) = c.net.pop_front().unwrap();
    assert_eq!((from, to), (2, 0));
    let out = c.step(to, Input::Receive { from, msg });
    assert!(out.iter().any(
        |o| matches!(o, Output::Send { to: 1, msg: Message::Propose { epoch } } if *epoch == e)
    ));
    c.deliver_all();
    // Rank 0 got acks from 1 and 2 (2 withdrew in favour of 0).
    assert_eq!(c.px(0).role(), Role::Leader);
    assert_eq!(c.px(2).leader(), Some(0));
    assert_eq!(c.px(1).leader(), Some(0));
}

#[test]
fn victory_with_majority_only_after_timeout() {
    let mut c = Cluster::new(3);
    c.tick(0);
    c.tick(1);
    // Rank 2 is down: drop everything to/from it.
    c.deliver_filtered(|f, t, _| f != 2 && t != 2);
    assert_eq!(c.px(0).role(), Role::Electing);
    c.advance(999);
    c.tick(0);
    assert_eq!(c.px(0).role(), Role::Electing);
    c.advance(1);
    c.tick(0);
    assert_eq!(c.px(0).role(), Role::Leader);
    assert_eq!(c.px(0).quorum(), &[0, 1]);
    c.deliver_filtered(|f, t, _| f != 2 && t != 2);
    assert_eq!(c.px(1).role(), Role::Peon);
    // Partial quorum: the leader accepts the proposal but parks it for 2 × lease.
    assert!(c.px(0).can_propose());
    c.propose(0, 1, "x");
    assert!(!c.px(0).can_propose());
    assert!(c
        .net
        .iter()
        .all(|(_, _, m)| !matches!(m, Message::Begin { .. })));
    for _ in 0..20 {
        c.advance(100);
        c.tick(0);
        c.tick(1);
        c.deliver_filtered(|f, t, _| f != 2 && t != 2);
    }
    assert_eq!(c.done, vec![(1, Ok(1))]);
}

#[test]
fn pn_generation_is_rank_unique_and_persisted_before_collect() {
    let mut c = Cluster::new(3);
    c.nodes[1].store.state.last_pn = 250;
    c.nodes[1].store.state.accepted_pn = 120;
    c.nodes[1].px = Paxos::new(cfg(1, 3), c.nodes[1].store.state.clone());
    // Elect rank 1 alone with rank 2 (rank 0 down).
    c.tick(1);
    c.tick(2);
    c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    c.advance(1000);
    let out = c.tick(1);
    assert_eq!(c.px(1).role(), Role::Leader);
    let persisted = out
        .iter()
        .position(|o| matches!(o, Output::Persist(ops) if ops.contains(&PersistOp::LastPn(301))));
    let collect = out.iter().position(|o| {
        matches!(
            o,
            Output::Send {
                msg: Message::Collect { pn: 301, .. },
                ..
            }
        )
    });
    assert!(persisted.unwrap() < collect.unwrap());
}

#[test]
fn promise_rules() {
    // A peon restarted in epoch 3 with a promise of 500.
    let mut peon = Paxos::new(
        cfg(1, 3),
        PersistentState {
            election_epoch: 3,
            accepted_pn: 500,
            ..Default::default()
        },
    );
    let store = MemStore::default();
    let victory = Input::Receive {
        from: 0,
        msg: Message::Victory {
            epoch: 4,
            quorum: vec![0, 1, 2],
        },
    };
    // Restarted in epoch 3 (no_vote) but named in the quorum: accepts.
    let _ = peon.handle(10, victory, &store);
    assert_eq!(peon.role(), Role::Peon);
    let collect = |pn| Input::Receive {
        from: 0,
        msg: Message::Collect {
            epoch: 4,
            pn,
            quorum: vec![0, 1, 2],
            first_committed: 0,
            last_committed: 0,
        },
    };
    // Lower pn: refused, nothing persisted, Last reports the higher promise.
    let out = peon.handle(11, collect(301), &store);
    assert!(matches!(
        out.as_slice(),
        [Output::Send {
            to: 0,
            msg: Message::Last {
                pn: 301,
                accepted_pn: 500,
                ..
            }
        }]
    ));
    // Higher pn: promise persisted first, then Last.
    let out = peon.handle(12, collect(600), &store);
    assert!(matches!(
        out.as_slice(),
        [Output::Persist(ops), Output::Send { msg: Message::Last { pn: 600, accepted_pn: 600, .. }, .. }]
            if ops == &vec![PersistOp::AcceptedPn(600)]
    ));
    // Same pn again (duplicate): promise repeated, nothing new persisted.
    let out = peon.handle(13, collect(600), &store);
    assert!(matches!(
        out.as_slice(),
        [Output::Send {
            msg: Message::Last { pn: 600, .. },
            ..
        }]
    ));
}

#[test]
fn commit_only_after_every_quorum_member_accepted() {
    let mut c = Cluster::new(3);
    c.elect();
    c.propose(0, 1, "v1");
    // Deliver Begin to both peons, but hold their Accepts.
    let mut accepts = Vec::new();
    while let Some((from, to, msg)) = c.net.pop_front() {
        if matches!(msg, Message::Accept { .. }) {
            accepts.push((from, to, msg));
        } else {
            c.step(to, Input::Receive { from, msg });
        }
    }
    assert_eq!(accepts.len(), 2);
    // Peons are mid-update: not readable although their lease is valid.
    assert!(!c.px(1).readable(c.now));
    let (from, to, msg) = accepts.remove(0);
    c.step(to, Input::Receive { from, msg });
    assert_eq!(c.px(0).last_committed(), 0, "a majority is not enough");
    assert!(c.done.is_empty());
    let (from, to, msg) = accepts.remove(0);
    c.step(to, Input::Receive { from, msg });
    assert_eq!(c.px(0).last_committed(), 1);
    assert_eq!(c.done, vec![(1, Ok(1))]);
    c.deliver_all();
    assert!((0..3).all(|r| c.px(r).last_committed() == 1 && c.px(r).readable(c.now)));
}

#[test]
fn proposals_rejected_when_not_leader_or_busy() {
    let mut c = Cluster::new(3);
    c.elect();
    c.propose(1, 1, "x");
    assert_eq!(
        c.done,
        vec![(1, Err(ProposeError::NotLeader { leader: Some(0) }))]
    );
    c.propose(0, 2, "y");
    c.propose(0, 3, "z");
    assert_eq!(c.done[1], (3, Err(ProposeError::Busy)));
    c.deliver_all();
    assert_eq!(c.done[2], (2, Ok(1)));
}

#[test]
fn leadership_lost_fails_the_in_flight_proposal() {
    let mut c = Cluster::new(3);
    c.elect();
    c.propose(0, 9, "x");
    c.net.clear();
    c.advance(2001);
    c.tick(0);
    assert_eq!(c.px(0).role(), Role::Electing);
    assert_eq!(c.done, vec![(9, Err(ProposeError::LeadershipLost))]);
}

#[test]
fn new_leader_recovers_uncommitted_value_and_catches_up_peons() {
    let mut c = Cluster::new(3);
    c.elect();
    c.propose(0, 1, "a");
    c.deliver_all();
    c.propose(0, 2, "b");
    // Begin reaches rank 1 only; rank 2 misses the Begin and Commit of "a"…
    c.deliver_filtered(|_, t, m| t != 2 && !matches!(m, Message::Accept { .. }));
    assert_eq!(c.nodes[1].store.state.uncommitted.as_ref().unwrap().0, 2);
    // …and rank 0 dies. Rank 1 wins with rank 2 after the timeout.
    c.advance(2500);
    c.tick(1);
    c.tick(2);
    c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    c.advance(1000);
    c.tick(1);
    c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    assert_eq!(c.px(1).role(), Role::Leader);
    // Parked re-proposal (partial quorum), then committed after 2 × lease.
    for _ in 0..25 {
        c.advance(100);
        c.tick(1);
        c.tick(2);
        c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    }
    for r in [1, 2] {
        assert_eq!(c.px(r).last_committed(), 2, "rank {r}");
        assert_eq!(
            c.nodes[r as usize].store.applied,
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
    }
}

#[test]
fn peon_ahead_of_leader_hands_over_commits_in_last() {
    let mut c = Cluster::new(3);
    c.elect();
    c.propose(0, 1, "a");
    // Rank 1 misses the commit of "a"; rank 2 learns it.
    c.deliver_filtered(|_, t, m| !(t == 1 && matches!(m, Message::Commit { .. })));
    assert_eq!(c.px(1).last_committed(), 0);
    // Rank 0 dies; rank 1 (behind) leads with rank 2 and must learn "a" from it.
    c.advance(2500);
    c.tick(1);
    c.tick(2);
    c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    c.advance(1000);
    c.tick(1);
    c.deliver_filtered(|f, t, _| f != 0 && t != 0);
    assert_eq!(c.px(1).role(), Role::Leader);
    assert_eq!(c.px(1).last_committed(), 1);
    assert_eq!(c.nodes[1].store.applied, vec![Bytes::from_static(b"a")]);
    // Its own stale uncommitted "a" at v1 is gone, nothing is re-proposed.
    assert_eq!(c.nodes[1].store.state.uncommitted, None);
    assert!(c.px(1).can_propose());
}

#[test]
fn lagging_peon_beyond_first_committed_gets_snapshot() {
    let mut c = Cluster::with(3, |c| {
        c.keep_versions = 2;
        c.trim_min = 1;
        c.trim_max = 10;
    });
    c.elect();
    // Rank 2 hears nothing while 8 values commit… it cannot accept, so the
    // quorum must be {0,1}: elect that first.
    c.advance(2500);
    c.tick(0);
    c.tick(1);
    c.deliver_filtered(|f, t, _| f != 2 && t != 2);
    c.advance(1000);
    c.tick(0);
    c.deliver_filtered(|f, t, _| f != 2 && t != 2);
    assert_eq!(c.px(0).quorum(), &[0, 1]);
    for i in 0..8u64 {
        let v: &'static str = Box::leak(format!("v{i}").into_boxed_str());
        c.propose(0, i, v);
        for _ in 0..25 {
            c.advance(100);
            c.tick(0);
            c.tick(1);
            c.deliver_filtered(|f, t, _| f != 2 && t != 2);
            if c.done.len() as u64 > i {
                break;
            }
        }
    }
    assert_eq!(c.px(0).last_committed(), 8);
    assert!(c.px(0).first_committed() > 1, "trimmed");
    assert!(c.nodes[0].store.values.len() < 8);
    // Rank 2 comes back: old-epoch propose forces a full election and catch-up.
    c.advance(100);
    c.tick(2);
    c.deliver_all();
    for _ in 0..30 {
        c.advance(100);
        c.tick_all();
        c.deliver_all();
    }
    assert_eq!(c.px(0).quorum(), &[0, 1, 2]);
    assert_eq!(c.px(2).last_committed(), 8);
    assert!(c.snapshots_sent > 0, "caught up through a snapshot");
    assert_eq!(c.nodes[2].store.applied, c.nodes[0].store.applied);
}

#[test]
fn trim_keeps_the_configured_window() {
    let mut c = Cluster::with(1, |c| {
        c.keep_versions = 5;
        c.trim_min = 3;
        c.trim_max = 4;
    });
    c.tick(0);
    for i in 0..20 {
        c.propose(0, i, "x");
    }
    let st = &c.nodes[0].store.state;
    assert_eq!(st.last_committed, 20);
    // Trim fires when lc - fc > 8, by at most 4, keeping ≥ 5.
    assert!(st.last_committed - st.first_committed >= 5);
    assert!(st.last_committed - st.first_committed <= 8);
    assert_eq!(
        c.nodes[0].store.values.len() as u64,
        st.last_committed - st.first_committed + 1
    );
}

#[test]
fn expired_lease_makes_peon_unreadable_and_reelect() {
    let mut c = Cluster::new(3);
    c.elect();
    assert!(c.px(1).readable(c.now));
    c.advance(1000);
    assert!(!c.px(1).readable(c.now));
    assert!(!c.px(0).readable(c.now), "leader needs acked valid leases");
    c.advance(1001);
    c.tick(1);
    assert_eq!(c.px(1).role(), Role::Electing);
}

#[test]
fn garbage_messages_never_panic() {
    let mut c = Cluster::new(3);
    c.elect();
    let junk = vec![
        Message::Propose { epoch: 0 },
        Message::Propose { epoch: 2 },
        Message::Ack { epoch: 99 },
        Message::Victory {
            epoch: 1000,
            quorum: vec![],
        },
        Message::Victory {
            epoch: 1001,
            quorum: vec![7, 1],
        },
        Message::Collect {
            epoch: 0,
            pn: u64::MAX,
            quorum: vec![],
            first_committed: 5,
            last_committed: u64::MAX,
        },
        Message::Last {
            epoch: 2,
            pn: 0,
            accepted_pn: 0,
            first_committed: 9,
            last_committed: 3,
            snapshot: Some((5, Bytes::from_static(b"nonsense"))),
            values: vec![(3, Bytes::new())],
            uncommitted: Some((u64::MAX, 1, Bytes::new())),
        },
        Message::Begin {
            epoch: 2,
            pn: 1,
            version: 0,
            value: Bytes::new(),
        },
        Message::Accept {
            epoch: 2,
            pn: 0,
            version: 7,
        },
        Message::Commit {
            epoch: 0,
            values: vec![(5, Bytes::new()), (1, Bytes::new())],
        },
        Message::Lease {
            epoch: 2,
            last_committed: 0,
            granted_at: 10,
            expires_at: 5,
        },
        Message::LeaseAck {
            epoch: 2,
            granted_at: u64::MAX,
            expires_at: u64::MAX,
            last_committed: u64::MAX,
        },
        Message::Snapshot {
            epoch: 2,
            version: 0,
            data: Bytes::new(),
        },
    ];
    for to in 0..3 {
        for from in [0, 1, 2, 3, u32::MAX] {
            for m in &junk {
                // The store may reject a nonsense snapshot install; the core
                // itself must not panic. Use a scratch store.
                let node = &mut c.nodes[to as usize];
                let mut p = node.px.clone();
                let _ = p.handle(
                    c.now,
                    Input::Receive {
                        from,
                        msg: m.clone(),
                    },
                    &node.store,
                );
            }
        }
    }
}
