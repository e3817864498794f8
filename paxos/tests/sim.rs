//! Seeded deterministic simulation of 1, 3 or 5 monitors.
//!
//! One simulated millisecond clock shared by everyone (leases assume
//! synchronised clocks), one event queue, one ChaCha RNG per seed: a seed
//! replays exactly. During a fault window of random length the network loses,
//! duplicates and delays (reorders) messages, partitions come and go
//! (symmetric splits, isolated monitors, one-way links), monitors crash —
//! sometimes half-way through carrying out a `handle` result — and restart
//! from their persisted state only. Clients propose at random monitors and
//! read wherever `readable()` says so. Then every fault heals and the run must
//! commit again and converge within a bounded simulated time.
//!
//! Invariants are checked as each output is carried out: one value per
//! version ever (across all monitors and restarts), snapshots agree with it,
//! an `Ok(v)` answer names the value committed at v, one leader per epoch,
//! one owner per pn, persist-before-send, stores' own contract checks, and
//! every served read sees at least the newest version acknowledged before it.
//! At the end every monitor holds the same history containing every
//! acknowledged proposal.
//!
//! `BASALT_SIM_SEEDS=N` runs N seeds (default 4000: 2000 with 3 monitors,
//! 1800 with 5, 200 with 1; about 10 s on two cores — the default is that
//! high because removing the partial-quorum lease wait is first caught around
//! seed 900); `BASALT_SIM_SEED=N` replays one seed and prints its trace
//! (`BASALT_SIM_TRACE=1` prints it on success too, `BASALT_SIM_VERBOSE=1`
//! prints per-seed statistics).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use basalt_paxos::testkit::{check_persist_before_send, decode_list, MemStore};
use basalt_paxos::*;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DEFAULT_SEEDS: u64 = 4000;

fn mons_for_seed(seed: u64) -> usize {
    match seed % 20 {
        19 => 1,
        s if s % 2 == 0 => 3,
        _ => 5,
    }
}

#[derive(Debug)]
enum Ev {
    Deliver { from: Rank, to: Rank, msg: Message },
    Tick(usize),
    Client,
    Read,
    Crash,
    Restart(usize),
    Partition,
    Heal,
}

struct Node {
    px: Option<Paxos>,
    store: MemStore,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    events: u64,
    acked: u64,
    reads: u64,
    crashes: u64,
    elections: u64,
    snapshots: u64,
    heal_to_commit_ms: u64,
}

struct Sim {
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    cfgs: Vec<Config>,
    nodes: Vec<Node>,
    blocked: Vec<Vec<bool>>,
    faults: bool,
    loss: f64,
    dup: f64,
    late: f64,
    mid_output_crash: f64,
    heal_at: u64,
    bound_ms: u64,
    // --- global knowledge for invariants ---
    chosen: BTreeMap<Version, Bytes>,
    values_by_id: HashMap<ProposalId, Bytes>,
    acked: Vec<(ProposalId, Version)>,
    max_acked: Version,
    leader_of_epoch: HashMap<u64, Rank>,
    pn_owner: HashMap<u64, Rank>,
    next_id: ProposalId,
    post_heal_ack: Option<u64>,
    stats: Stats,
    trace: Option<VecDeque<String>>,
}

impl Sim {
    fn new(seed: u64, n: usize, trace: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let election_timeout_ms = [300, 500, 1000][rng.random_range(0..3)];
        let lease_ms = [300, 500, 1000][rng.random_range(0..3)];
        let keep_versions = rng.random_range(1..10);
        let trim_min = rng.random_range(1..4);
        let trim_max = rng.random_range(1..6);
        let cfgs: Vec<Config> = (0..n as Rank)
            .map(|r| Config {
                election_timeout_ms,
                lease_ms,
                keep_versions,
                trim_min,
                trim_max,
                ..Config::new(r, n as u32)
            })
            .collect();
        let nodes = cfgs
            .iter()
            .map(|c| Node {
                px: Some(Paxos::new(c.clone(), PersistentState::default())),
                store: MemStore::default(),
            })
            .collect();
        let loss = rng.random_range(0.0..0.1);
        let dup = rng.random_range(0.0..0.1);
        let late = rng.random_range(0.0..0.1);
        let heal_at = rng.random_range(3_000..20_000);
        Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            cfgs,
            nodes,
            blocked: vec![vec![false; n]; n],
            faults: true,
            loss,
            dup,
            late,
            mid_output_crash: 0.002,
            heal_at,
            bound_ms: 40_000,
            chosen: BTreeMap::new(),
            values_by_id: HashMap::new(),
            acked: Vec::new(),
            max_acked: 0,
            leader_of_epoch: HashMap::new(),
            pn_owner: HashMap::new(),
            next_id: 1,
            post_heal_ack: None,
            stats: Stats::default(),
            trace: trace.then(VecDeque::new),
        }
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            if t.len() >= 3000 {
                t.pop_front();
            }
            let line = format!("[{:>6}] {}", self.now, f());
            t.push_back(line);
        }
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn n(&self) -> usize {
        self.nodes.len()
    }

    fn run(&mut self) -> Result<Stats, String> {
        for i in 0..self.n() {
            let d = self.rng.random_range(0..20);
            self.at(d, Ev::Tick(i));
        }
        self.at(50, Ev::Client);
        self.at(10, Ev::Read);
        let n = self.n() as u64;
        if n > 1 {
            let d = self.rng.random_range(500..3000);
            self.at(d, Ev::Crash);
            let d = self.rng.random_range(200..3000);
            self.at(d, Ev::Partition);
        } else {
            let d = self.rng.random_range(500..3000);
            self.at(d, Ev::Crash);
        }
        let h = self.heal_at;
        self.at(h, Ev::Heal);
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            self.now = t;
            self.stats.events += 1;
            let ev = self.events.remove(&seq).expect("event");
            self.event(ev)?;
            if !self.faults {
                if self.now > self.heal_at + self.bound_ms {
                    return Err(format!(
                        "no progress/convergence {} ms after healing (post-heal ack: {:?}, lcs: {:?}, roles: {:?})",
                        self.bound_ms,
                        self.post_heal_ack,
                        self.nodes.iter().map(|n| n.store.state.last_committed).collect::<Vec<_>>(),
                        self.nodes
                            .iter()
                            .map(|n| n.px.as_ref().map(|p| (p.role(), p.election_epoch(), p.quorum().to_vec())))
                            .collect::<Vec<_>>()
                    ));
                }
                if self.post_heal_ack.is_some() && self.converged() {
                    self.final_checks()?;
                    return Ok(self.stats);
                }
            }
        }
        Err("event queue ran dry".into())
    }

    fn converged(&self) -> bool {
        let Some(lp) = self.nodes.iter().find_map(|n| {
            n.px.as_ref()
                .filter(|p| p.role() == Role::Leader)
                .map(|p| (p.config().rank, p.election_epoch()))
        }) else {
            return false;
        };
        let lc = self.nodes[lp.0 as usize].store.state.last_committed;
        self.nodes.iter().all(|n| {
            n.px.as_ref().is_some_and(|p| {
                p.leader() == Some(lp.0)
                    && p.election_epoch() == lp.1
                    && p.quorum().len() == self.n()
                    && n.store.state.last_committed == lc
            })
        })
    }

    fn final_checks(&self) -> Result<(), String> {
        let reference = &self.nodes[0].store.applied;
        for (i, node) in self.nodes.iter().enumerate() {
            if &node.store.applied != reference {
                return Err(format!(
                    "mon {i} history differs from mon 0 after convergence"
                ));
            }
            for &(id, v) in &self.acked {
                let want = &self.values_by_id[&id];
                if node.store.applied.get(v as usize - 1) != Some(want) {
                    return Err(format!(
                        "acknowledged proposal {id} (v{v}) missing on mon {i}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn up(&self) -> Vec<usize> {
        (0..self.n())
            .filter(|&i| self.nodes[i].px.is_some())
            .collect()
    }

    fn event(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Tick(i) => {
                if self.nodes[i].px.is_some() {
                    self.step(i, Input::Tick)?;
                }
                let d = self.rng.random_range(5..16);
                self.at(d, Ev::Tick(i));
            }
            Ev::Deliver { from, to, msg } => {
                let t = to as usize;
                if self.nodes[t].px.is_none() || self.blocked[from as usize][t] {
                    self.log(|| format!("drop {from}->{to} {msg:?}"));
                    return Ok(());
                }
                self.log(|| format!("deliver {from}->{to} {msg:?}"));
                self.step(t, Input::Receive { from, msg })?;
            }
            Ev::Client => {
                if self.post_heal_ack.is_none() {
                    let up = self.up();
                    if !up.is_empty() {
                        let leader = up
                            .iter()
                            .copied()
                            .find(|&i| self.nodes[i].px.as_ref().unwrap().role() == Role::Leader);
                        let i = match leader {
                            Some(l) if !self.faults || self.rng.random_bool(0.5) => l,
                            _ => up[self.rng.random_range(0..up.len())],
                        };
                        let id = self.next_id;
                        self.next_id += 1;
                        let value = Bytes::from(format!("p{id}"));
                        self.values_by_id.insert(id, value.clone());
                        self.log(|| format!("client propose {id} at mon {i}"));
                        self.step(i, Input::Propose { id, value })?;
                    }
                }
                let d = self.rng.random_range(20..300);
                self.at(d, Ev::Client);
            }
            Ev::Read => {
                let up = self.up();
                if !up.is_empty() {
                    let i = up[self.rng.random_range(0..up.len())];
                    let px = self.nodes[i].px.as_ref().unwrap();
                    if px.readable(self.now) {
                        let lc = px.last_committed();
                        self.stats.reads += 1;
                        if lc < self.max_acked {
                            return Err(format!(
                                "stale read at mon {i} ({:?}): last_committed {lc} < acknowledged v{}",
                                px.role(),
                                self.max_acked
                            ));
                        }
                        if self.nodes[i].store.applied.len() as u64 != lc {
                            return Err(format!("mon {i} state machine not at last_committed"));
                        }
                    }
                }
                let d = self.rng.random_range(3..40);
                self.at(d, Ev::Read);
            }
            Ev::Crash => {
                if self.faults {
                    let up = self.up();
                    if !up.is_empty() {
                        let i = up[self.rng.random_range(0..up.len())];
                        self.crash(i);
                    }
                    let d = self.rng.random_range(1000..8000);
                    self.at(d, Ev::Crash);
                }
            }
            Ev::Restart(i) => {
                if self.nodes[i].px.is_none() {
                    self.restart(i);
                }
            }
            Ev::Partition => {
                if self.faults {
                    self.repartition();
                    let d = self.rng.random_range(300..4000);
                    self.at(d, Ev::Partition);
                }
            }
            Ev::Heal => {
                self.faults = false;
                self.log(|| "HEAL".into());
                for row in &mut self.blocked {
                    row.iter_mut().for_each(|b| *b = false);
                }
                for i in 0..self.n() {
                    if self.nodes[i].px.is_none() {
                        self.restart(i);
                    }
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, i: usize) {
        self.log(|| format!("CRASH mon {i}"));
        self.stats.crashes += 1;
        self.nodes[i].px = None;
        let d = self.rng.random_range(50..3000);
        self.at(d, Ev::Restart(i));
    }

    fn restart(&mut self, i: usize) {
        self.log(|| format!("RESTART mon {i}"));
        let st = self.nodes[i].store.state.clone();
        self.nodes[i].px = Some(Paxos::new(self.cfgs[i].clone(), st));
    }

    fn repartition(&mut self) {
        let n = self.n();
        for row in &mut self.blocked {
            row.iter_mut().for_each(|b| *b = false);
        }
        match self.rng.random_range(0..4) {
            0 => {}
            1 => {
                // Symmetric split into two random sides.
                let side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        self.blocked[a][b] = side[a] != side[b];
                    }
                }
            }
            2 => {
                // One monitor isolated.
                let x = self.rng.random_range(0..n);
                for o in 0..n {
                    self.blocked[x][o] = true;
                    self.blocked[o][x] = true;
                }
            }
            _ => {
                // Random one-way links.
                for _ in 0..self.rng.random_range(1..=n) {
                    let a = self.rng.random_range(0..n);
                    let b = self.rng.random_range(0..n);
                    self.blocked[a][b] = true;
                }
            }
        }
        let b = self.blocked.clone();
        self.log(|| format!("PARTITION {b:?}"));
    }

    fn send(&mut self, from: Rank, to: Rank, msg: Message) {
        let copies = if self.faults {
            if self.rng.random_bool(self.loss) {
                0
            } else if self.rng.random_bool(self.dup) {
                2
            } else {
                1
            }
        } else {
            1
        };
        for _ in 0..copies {
            let d = if self.faults && self.rng.random_bool(self.late) {
                self.rng.random_range(20..2500)
            } else {
                self.rng.random_range(1..20)
            };
            self.at(
                d,
                Ev::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn step(&mut self, i: usize, input: Input) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let px = node.px.as_mut().expect("up");
        let out = px.handle(self.now, input, &node.store);
        check_persist_before_send(&node.store.state, &out).map_err(|e| format!("mon {i}: {e}"))?;
        let crash_at =
            if self.faults && !out.is_empty() && self.rng.random_bool(self.mid_output_crash) {
                Some(self.rng.random_range(0..out.len()))
            } else {
                None
            };
        for (k, o) in out.into_iter().enumerate() {
            if crash_at == Some(k) {
                self.log(|| format!("mon {i} crashes after {k} outputs"));
                self.crash(i);
                return Ok(());
            }
            match o {
                Output::Persist(ops) => self.persist(i, &ops)?,
                Output::Send { to, msg } => {
                    if to as usize >= self.n() || to as usize == i {
                        return Err(format!("mon {i} sent to bad rank {to}"));
                    }
                    self.send(i as Rank, to, msg)
                }
                Output::ProposalDone { id, result } => self.proposal_done(i, id, result)?,
                Output::StateChanged => self.state_changed(i)?,
            }
        }
        let node = &self.nodes[i];
        if let Some(px) = &node.px {
            if px.persistent_state() != &node.store.state {
                return Err(format!(
                    "mon {i}: core's idea of persisted state differs from store"
                ));
            }
            if px.can_propose() {
                // Several candidates may count one ack, but only one leader
                // per epoch may ever finish recovery.
                let epoch = px.election_epoch();
                let owner = *self.leader_of_epoch.entry(epoch).or_insert(i as Rank);
                if owner != i as Rank {
                    return Err(format!(
                        "two working leaders in epoch {epoch}: mon {owner} and mon {i}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn persist(&mut self, i: usize, ops: &[PersistOp]) -> Result<(), String> {
        for op in ops {
            match op {
                PersistOp::Commit { version, value } => match self.chosen.get(version) {
                    Some(v) if v != value => {
                        return Err(format!(
                            "two values committed at v{version}: {v:?} and {value:?} (mon {i})"
                        ))
                    }
                    Some(_) => {}
                    None => {
                        self.chosen.insert(*version, value.clone());
                    }
                },
                PersistOp::InstallSnapshot { version, data } => {
                    self.stats.snapshots += 1;
                    let list = decode_list(data).ok_or("bad snapshot")?;
                    if list.len() as u64 != *version {
                        return Err(format!("snapshot length {} at v{version}", list.len()));
                    }
                    for (k, val) in list.iter().enumerate() {
                        if self.chosen.get(&(k as u64 + 1)) != Some(val) {
                            return Err(format!("snapshot disagrees with committed v{}", k + 1));
                        }
                    }
                }
                PersistOp::LastPn(pn) => {
                    let owner = *self.pn_owner.entry(*pn).or_insert(i as Rank);
                    if owner != i as Rank {
                        return Err(format!("pn {pn} generated by mon {owner} and mon {i}"));
                    }
                }
                _ => {}
            }
        }
        self.nodes[i]
            .store
            .apply(ops)
            .map_err(|e| format!("mon {i} store rejected {ops:?}: {e}"))
    }

    fn proposal_done(
        &mut self,
        i: usize,
        id: ProposalId,
        result: Result<Version, ProposeError>,
    ) -> Result<(), String> {
        self.log(|| format!("mon {i} proposal {id} -> {result:?}"));
        if let Ok(v) = result {
            let want = self.values_by_id.get(&id).ok_or("unknown proposal id")?;
            if self.chosen.get(&v) != Some(want) {
                return Err(format!(
                    "proposal {id} acknowledged at v{v} but v{v} holds something else"
                ));
            }
            if self.acked.iter().any(|&(a, _)| a == id) {
                return Err(format!("proposal {id} acknowledged twice"));
            }
            self.acked.push((id, v));
            self.max_acked = self.max_acked.max(v);
            self.stats.acked += 1;
            if !self.faults && self.post_heal_ack.is_none() {
                self.post_heal_ack = Some(self.now);
                self.stats.heal_to_commit_ms = self.now - self.heal_at;
            }
        }
        Ok(())
    }

    fn state_changed(&mut self, i: usize) -> Result<(), String> {
        let px = self.nodes[i].px.as_ref().unwrap();
        let (role, epoch) = (px.role(), px.election_epoch());
        self.log(|| format!("mon {i} now {role:?} epoch {epoch}"));
        if role == Role::Leader {
            self.stats.elections += 1;
        }
        Ok(())
    }
}

fn run_seed(seed: u64, trace: bool) -> Result<(Stats, usize), String> {
    let n = mons_for_seed(seed);
    let mut sim = Sim::new(seed, n, trace);
    let r = sim.run();
    if std::env::var("BASALT_SIM_TRACE").is_ok() && r.is_ok() {
        for line in sim.trace.iter().flatten() {
            eprintln!("{line}");
        }
    }
    match r {
        Ok(s) => Ok((s, n)),
        Err(e) => {
            if let Some(t) = &sim.trace {
                for line in t {
                    eprintln!("{line}");
                }
            }
            Err(format!(
                "seed {seed} ({n} mons) failed at t={} ms: {e}\nreplay: BASALT_SIM_SEED={seed} cargo test --release -p basalt-paxos --test sim",
                sim.now
            ))
        }
    }
}

#[test]
fn simulation() {
    if let Ok(s) = std::env::var("BASALT_SIM_SEED") {
        let seed: u64 = s.parse().expect("BASALT_SIM_SEED must be a number");
        match run_seed(seed, true) {
            Ok((stats, n)) => eprintln!("seed {seed} ({n} mons) ok: {stats:?}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let seeds: u64 = std::env::var("BASALT_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    let start = Instant::now();
    let threads = 2u64;
    let results: Vec<Result<Vec<(Stats, usize)>, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (0..seeds)
                        .filter(|seed| seed % threads == t)
                        .map(|seed| run_seed(seed, false))
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = Vec::new();
    for r in results {
        match r {
            Ok(v) => all.extend(v),
            Err(e) => panic!("{e}"),
        }
    }
    if std::env::var("BASALT_SIM_VERBOSE").is_ok() {
        for (k, (s, n)) in all.iter().enumerate() {
            eprintln!("#{k} n={n} {s:?}");
        }
    }
    let by_n = |n| all.iter().filter(|(_, m)| *m == n).count();
    let sum = |f: fn(&Stats) -> u64| all.iter().map(|(s, _)| f(s)).sum::<u64>();
    let worst_heal = all
        .iter()
        .map(|(s, _)| s.heal_to_commit_ms)
        .max()
        .unwrap_or(0);
    eprintln!(
        "simulated {seeds} seeds (1 mon: {}, 3 mons: {}, 5 mons: {}) in {:.1?}: {} events, {} acknowledged proposals, \
         {} leased reads, {} crashes, {} leaderships, {} snapshot installs; worst heal→commit {} ms",
        by_n(1),
        by_n(3),
        by_n(5),
        start.elapsed(),
        sum(|s| s.events),
        sum(|s| s.acked),
        sum(|s| s.reads),
        sum(|s| s.crashes),
        sum(|s| s.elections),
        sum(|s| s.snapshots),
        worst_heal,
    );
}
