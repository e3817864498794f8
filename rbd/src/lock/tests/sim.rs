//! Seeded random-schedule simulation: 2–4 clients run [`LockCore`]s against a
//! model OSD (lock, watches with timeout, notify with acks and timeout,
//! blocklist) with random latencies, random write arrivals, and clients that
//! freeze briefly, freeze past the watch timeout, or die.
//!
//! Checked on every step:
//! - **fence**: every write the OSD applies comes from the lock holder;
//! - **one writer**: at most one non-blocklisted client has admitted writes in flight.
//!
//! Checked at the end (writes stop, frozen clients thaw, time passes):
//! - **liveness**: every write of a client that is neither dead nor
//!   blocklisted was admitted and completed; a requester always got the lock
//!   from a holder that cooperated or died. No write timed out.
//!
//! A failing seed prints itself; replay it alone with
//! `BASALT_RBD_LOCK_SEED=<seed> cargo test --release -p basalt-rbd lock_sim`;
//! soak with `BASALT_RBD_LOCK_SEEDS=<count>`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use super::super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: tiny, seedable, stable across versions.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

const MS: u64 = 1;
const WATCH_TIMEOUT: u64 = 2_000 * MS;
const NOTIFY_TIMEOUT: u64 = 500 * MS;
const TICK: u64 = 50 * MS;

#[derive(Debug, Clone)]
enum Op {
    Act(Action),
    StoreWrite(WriteId),
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver(usize, Event),
    Exec(usize, Op),
    NotifyTimeout(u64),
    Tick(usize),
    Thaw(usize),
    NewWrite(usize),
    /// The client's user went away for now (the gateway's last connection closed).
    Relinquish(usize),
    Freeze(usize, Option<u64>),
}

struct Client {
    core: LockCore,
    /// `Some(since)` while frozen.
    frozen_since: Option<u64>,
    dead: bool,
    held: Vec<Ev>,
    /// Writes wanted and not yet finished or refused.
    wanted: BTreeSet<WriteId>,
}

struct Notify {
    requester: usize,
    waiting: BTreeSet<(usize, u64)>,
    acked: Vec<Watcher>,
    done: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    evs: HashMap<usize, Ev>,
    next_ev: usize,
    clients: Vec<Client>,
    lock: Option<LockOwner>,
    watches: Vec<(usize, u64)>,
    blocklist: BTreeSet<usize>,
    notifies: BTreeMap<u64, Notify>,
    next_cookie: u64,
    next_notify: u64,
    next_write: u64,
    violations: Vec<String>,
    stats: Stats,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    admitted: u64,
    handovers: u64,
    blocklists: u64,
    fenced: u64,
}

fn name(c: usize) -> String {
    format!("client.{c}")
}

impl Sim {
    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.next_ev += 1;
        self.evs.insert(self.next_ev, ev);
        self.queue.push(Reverse((t, self.seq, self.next_ev)));
    }

    fn lat(&mut self) -> u64 {
        self.rng.range(1, 20)
    }

    fn now_d(&self) -> Duration {
        Duration::from_millis(self.now)
    }

    fn frozen(&self, c: usize) -> bool {
        self.clients[c].frozen_since.is_some()
    }

    /// Drop watches of clients frozen past the watch timeout.
    fn reap(&mut self) {
        let now = self.now;
        let expired: Vec<(usize, u64)> = self
            .watches
            .iter()
            .copied()
            .filter(|(c, _)| {
                self.clients[*c]
                    .frozen_since
                    .is_some_and(|t| now >= t + WATCH_TIMEOUT)
            })
            .collect();
        for (c, cookie) in expired {
            self.drop_watch(c, cookie);
        }
    }

    fn drop_watch(&mut self, c: usize, cookie: u64) {
        self.watches.retain(|w| *w != (c, cookie));
        self.at(self.now, Ev::Deliver(c, Event::WatchLost));
    }

    fn watcher_list(&self) -> Vec<Watcher> {
        self.watches
            .iter()
            .map(|(c, k)| Watcher {
                client: name(*c),
                cookie: *k,
            })
            .collect()
    }

    fn reply(&mut self, c: usize, ev: Event) {
        let t = self.now + self.lat();
        self.at(t, Ev::Deliver(c, ev));
    }

    fn run(&mut self, end: u64) {
        while let Some(Reverse((t, _, id))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = t;
            let ev = self.evs.remove(&id).expect("event");
            self.process(ev);
            self.check_one_writer();
        }
    }

    fn process(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver(c, _) | Ev::Exec(c, _) if self.frozen(c) => {
                if !self.clients[c].dead {
                    self.clients[c].held.push(ev);
                }
            }
            Ev::Deliver(c, e) => self.deliver(c, e),
            Ev::Exec(c, op) => self.exec(c, op),
            Ev::NotifyTimeout(id) => self.finish_notify(id),
            Ev::Tick(c) => {
                if !self.frozen(c) {
                    self.deliver(c, Event::Tick);
                }
                self.at(self.now + TICK, Ev::Tick(c));
            }
            Ev::Thaw(c) => {
                self.clients[c].frozen_since = None;
                let held = std::mem::take(&mut self.clients[c].held);
                for (i, ev) in held.into_iter().enumerate() {
                    self.at(self.now + i as u64, ev);
                }
            }
            Ev::Freeze(c, thaw) => {
                if self.frozen(c) {
                    return;
                }
                self.clients[c].frozen_since = Some(self.now);
                match thaw {
                    Some(d) => self.at(self.now + d, Ev::Thaw(c)),
                    None => self.clients[c].dead = true,
                }
            }
            Ev::Relinquish(c) => {
                if !self.frozen(c) {
                    self.deliver(c, Event::Relinquish);
                }
            }
            Ev::NewWrite(c) => {
                if self.frozen(c) {
                    return; // a hung host issues nothing
                }
                self.next_write += 1;
                let id = self.next_write;
                self.clients[c].wanted.insert(id);
                self.deliver(c, Event::WriteWanted(id));
            }
        }
    }

    fn deliver(&mut self, c: usize, e: Event) {
        if let Event::WriteFinished(id) = e {
            self.clients[c].wanted.remove(&id);
        }
        let now = self.now_d();
        let actions = self.clients[c].core.handle(now, e);
        for a in actions {
            match a {
                Action::AdmitWrite(id) => {
                    self.stats.admitted += 1;
                    let t = self.now + self.lat();
                    self.at(t, Ev::Exec(c, Op::StoreWrite(id)));
                }
                Action::FailWrite(id, r) => {
                    self.clients[c].wanted.remove(&id);
                    match r {
                        Refusal::Blocklisted(_) => {
                            if !self.blocklist.contains(&c) {
                                self.violations.push(format!(
                                    "{} refused a write as blocklisted but is not",
                                    name(c)
                                ));
                            }
                        }
                        other => self.violations.push(format!(
                            "t={} {} write {id} refused: {other:?}",
                            self.now,
                            name(c)
                        )),
                    }
                }
                Action::RecordHandover => self.stats.handovers += 1,
                Action::Closed => {}
                a => {
                    let t = self.now + self.lat();
                    self.at(t, Ev::Exec(c, Op::Act(a)));
                }
            }
        }
    }

    fn exec(&mut self, c: usize, op: Op) {
        if self.blocklist.contains(&c) {
            let who = name(c);
            match op {
                Op::StoreWrite(id) => {
                    self.stats.fenced += 1;
                    self.reply(c, Event::Blocklisted(who));
                    self.reply(c, Event::WriteFinished(id));
                }
                Op::Act(Action::AckNotify { .. }) => self.reply(c, Event::Blocklisted(who)),
                Op::Act(Action::Rewatch) => {
                    self.reply(c, Event::RewatchFailed(BackendError::Blocklisted(who)))
                }
                Op::Act(_) => self.reply(c, Event::OpFailed(BackendError::Blocklisted(who))),
            }
            return;
        }
        self.reap();
        let me = name(c);
        match op {
            Op::StoreWrite(id) => {
                if self.lock.as_ref().map(|l| &l.client) != Some(&me) {
                    self.violations.push(format!(
                        "t={} fence: write {id} of {me} applied while the lock is {:?}",
                        self.now, self.lock
                    ));
                }
                self.reply(c, Event::WriteFinished(id));
            }
            Op::Act(a) => match a {
                Action::TryLock { cookie } => {
                    let mine = LockOwner { client: me, cookie };
                    match &self.lock {
                        None => {
                            self.lock = Some(mine);
                            self.reply(c, Event::LockAcquired);
                        }
                        Some(l) if *l == mine => self.reply(c, Event::LockAcquired),
                        Some(l) => {
                            let holder = Some(l.clone());
                            self.reply(c, Event::LockBusy { holder });
                        }
                    }
                }
                Action::NotifyRequestLock { .. } => {
                    self.next_notify += 1;
                    let id = self.next_notify;
                    let waiting: BTreeSet<(usize, u64)> = self.watches.iter().copied().collect();
                    for (w, _) in &waiting {
                        let t = self.now + self.rng.range(1, 20);
                        self.at(
                            t,
                            Ev::Deliver(*w, Event::RequestLockNotified { notify_id: id }),
                        );
                    }
                    self.notifies.insert(
                        id,
                        Notify {
                            requester: c,
                            waiting,
                            acked: Vec::new(),
                            done: false,
                        },
                    );
                    if self.notifies[&id].waiting.is_empty() {
                        self.finish_notify(id);
                    } else {
                        self.at(self.now + NOTIFY_TIMEOUT, Ev::NotifyTimeout(id));
                    }
                }
                Action::AckNotify { notify_id } => {
                    if let Some(n) = self.notifies.get_mut(&notify_id) {
                        if let Some(&(wc, k)) = n.waiting.iter().find(|(wc, _)| *wc == c) {
                            n.waiting.remove(&(wc, k));
                            n.acked.push(Watcher {
                                client: me,
                                cookie: k,
                            });
                            if n.waiting.is_empty() {
                                self.finish_notify(notify_id);
                            }
                        }
                    }
                }
                Action::ListWatchers => {
                    let l = self.watcher_list();
                    self.reply(c, Event::Watchers(l));
                }
                Action::GetLocker => {
                    let l = self.lock.clone();
                    self.reply(c, Event::LockInfo(l));
                }
                Action::Blocklist { client } => {
                    let victim: usize = client["client.".len()..].parse().unwrap();
                    if victim == c {
                        self.violations.push(format!("{me} blocklisted itself"));
                    }
                    self.stats.blocklists += 1;
                    self.blocklist.insert(victim);
                    let ws: Vec<(usize, u64)> = self
                        .watches
                        .iter()
                        .copied()
                        .filter(|(w, _)| *w == victim)
                        .collect();
                    for (w, k) in ws {
                        self.drop_watch(w, k);
                    }
                    self.reply(c, Event::BlocklistDone);
                }
                Action::BreakLock { owner } => {
                    if self.lock.as_ref() == Some(&owner) {
                        self.lock = None;
                        self.reply(c, Event::BreakDone);
                    } else {
                        self.reply(c, Event::OpFailed(BackendError::NotFound("lock".into())));
                    }
                }
                Action::Refresh => self.reply(c, Event::Refreshed),
                Action::Flush => self.reply(c, Event::Flushed),
                Action::Unlock { cookie } => {
                    let mine = LockOwner { client: me, cookie };
                    if self.lock.as_ref() == Some(&mine) {
                        self.lock = None;
                        self.reply(c, Event::Unlocked);
                    } else {
                        self.reply(c, Event::OpFailed(BackendError::NotFound("lock".into())));
                    }
                }
                Action::Rewatch => {
                    self.next_cookie += 1;
                    let k = self.next_cookie;
                    self.watches.push((c, k));
                    self.reply(c, Event::WatchRestored { cookie: k });
                }
                other => unreachable!("not an OSD op: {other:?}"),
            },
        }
    }

    fn finish_notify(&mut self, id: u64) {
        let Some(n) = self.notifies.get_mut(&id) else {
            return;
        };
        if n.done {
            return;
        }
        n.done = true;
        let requester = n.requester;
        let acked = n.acked.clone();
        let timed_out = n
            .waiting
            .iter()
            .map(|(c, k)| Watcher {
                client: name(*c),
                cookie: *k,
            })
            .collect();
        self.reply(requester, Event::NotifyDone { acked, timed_out });
    }

    fn check_one_writer(&mut self) {
        let writers: Vec<usize> = (0..self.clients.len())
            .filter(|c| !self.blocklist.contains(c) && self.clients[*c].core.in_flight() > 0)
            .collect();
        if writers.len() > 1 {
            self.violations.push(format!(
                "t={} {} clients have admitted writes in flight: {writers:?}",
                self.now,
                writers.len()
            ));
        }
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let mut rng = Rng(seed);
    let n = rng.range(2, 5) as usize;
    let cfg = LockConfig {
        retry_delay: Duration::from_millis(rng.range(50, 400)),
        release_yield: Duration::from_millis(rng.range(0, 100)),
        acquire_timeout: Duration::from_secs(10_000),
    };
    let mut sim = Sim {
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        evs: HashMap::new(),
        next_ev: 0,
        clients: Vec::new(),
        lock: None,
        watches: Vec::new(),
        blocklist: BTreeSet::new(),
        notifies: BTreeMap::new(),
        next_cookie: 0,
        next_notify: 0,
        next_write: 0,
        violations: Vec::new(),
        stats: Stats::default(),
    };
    for c in 0..n {
        sim.next_cookie += 1;
        let k = sim.next_cookie;
        sim.watches.push((c, k));
        sim.clients.push(Client {
            core: LockCore::new(cfg.clone(), name(c), k),
            frozen_since: None,
            dead: false,
            held: Vec::new(),
            wanted: BTreeSet::new(),
        });
        let t = sim.rng.range(0, TICK);
        sim.at(t, Ev::Tick(c));
    }
    // Workload: bursts of writes from random clients for `gen_end`.
    let gen_end = 20_000 * MS;
    let mut t = 0;
    while t < gen_end {
        let c = sim.rng.range(0, n as u64) as usize;
        let burst = sim.rng.range(1, 6);
        for i in 0..burst {
            let gap = sim.rng.range(0, 10);
            sim.at(t + i * gap, Ev::NewWrite(c));
        }
        // Sometimes the user disconnects after its burst (maybe before the writes finish).
        if sim.rng.range(0, 3) == 0 {
            let after = sim.rng.range(0, 60);
            sim.at(t + after, Ev::Relinquish(c));
        }
        t += sim.rng.range(10, 800);
    }
    // Faults: at most one death (someone must survive), brief and long freezes.
    let mut dead = false;
    let mut t = sim.rng.range(0, 3_000);
    while t < gen_end - 6_000 {
        let c = sim.rng.range(0, n as u64) as usize;
        let thaw = match sim.rng.range(0, 4) {
            0 if !dead => {
                dead = true;
                None
            }
            1 => Some(sim.rng.range(WATCH_TIMEOUT + 200, WATCH_TIMEOUT + 4_000)),
            _ => Some(sim.rng.range(50, WATCH_TIMEOUT - 200)),
        };
        sim.at(t, Ev::Freeze(c, thaw));
        t += sim.rng.range(1_000, 8_000);
    }
    // Writes stop at gen_end; everything settles well before `end`.
    let end = gen_end + 60_000;
    sim.run(end);
    let mut v = std::mem::take(&mut sim.violations);
    for (c, cl) in sim.clients.iter().enumerate() {
        if cl.dead || sim.blocklist.contains(&c) {
            continue;
        }
        if !cl.wanted.is_empty() {
            v.push(format!(
                "liveness: {} still has {} writes not done at the end (core: {:?})",
                name(c),
                cl.wanted.len(),
                cl.core
            ));
        }
    }
    if v.is_empty() {
        Ok(sim.stats)
    } else {
        v.truncate(5);
        Err(v.join("\n"))
    }
}

#[test]
fn lock_sim_random_schedules() {
    let seeds: Vec<u64> = match std::env::var("BASALT_RBD_LOCK_SEED") {
        Ok(s) => vec![s.parse().expect("BASALT_RBD_LOCK_SEED must be a u64")],
        // BASALT_RBD_LOCK_SEEDS=<n> runs n seeds (soak); default 1000.
        Err(_) => {
            let n = std::env::var("BASALT_RBD_LOCK_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000);
            (0..n).collect()
        }
    };
    let mut total = Stats::default();
    for seed in seeds.iter().copied() {
        let r = std::panic::catch_unwind(|| run_seed(seed));
        match r {
            Ok(Ok(s)) => {
                total.admitted += s.admitted;
                total.handovers += s.handovers;
                total.blocklists += s.blocklists;
                total.fenced += s.fenced;
            }
            Ok(Err(msg)) => panic!(
                "lock sim seed {seed} failed:\n{msg}\nreplay: BASALT_RBD_LOCK_SEED={seed} \
                 cargo test --release -p basalt-rbd lock_sim"
            ),
            Err(_) => panic!(
                "lock sim seed {seed} panicked; replay: BASALT_RBD_LOCK_SEED={seed} \
                 cargo test --release -p basalt-rbd lock_sim"
            ),
        }
    }
    eprintln!("lock sim over {} seeds: {total:?}", seeds.len());
    if seeds.len() > 1 {
        // The schedules must exercise every path, not just the happy one.
        assert!(total.handovers > 100, "{total:?}");
        assert!(total.blocklists > 10, "{total:?}");
        assert!(total.fenced > 0, "{total:?}");
    }
}
