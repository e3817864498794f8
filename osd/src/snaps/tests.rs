//! Snapshots of one object against a model: every snapshot reads what the object held when
//! it was taken, after any mix of writes, truncates, removes, rollbacks and trims.

use std::collections::BTreeMap;

use basalt_ops::{Eversion, ObjOp, OpError, OpOutput, ReqId, SnapContext};
use basalt_placement::PgId;
use bytes::Bytes;

use crate::pg::{execute, finish_write, SnapArgs};
use crate::store::{ObjectId, Store, StoreConfig, Transaction, CHUNK_SIZE};

struct Rig {
    store: Store,
    obj: ObjectId,
    seq: u64,
}

impl Rig {
    fn new() -> Rig {
        let store = Store::in_memory(StoreConfig::default()).expect("store");
        let pg = PgId { pool: 1, seed: 0 };
        let mut t = Transaction::new();
        t.pg_create(pg);
        store.submit_blocking(&t).expect("pg");
        Rig {
            store,
            obj: ObjectId::new(pg, "rbd_data.1.0"),
            seq: 0,
        }
    }

    fn run(&mut self, ops: Vec<ObjOp>, snapc: &SnapContext) -> Result<Vec<OpOutput>, OpError> {
        let args = SnapArgs {
            snapc: snapc.clone(),
            read_snap: 0,
        };
        let mut ex = execute(&self.store, &self.obj, "c", &ops, &args, &|| vec![])?;
        if ex.is_write {
            self.seq += 1;
            let reqid = ReqId {
                client: "c".into(),
                incarnation: 1,
                tid: self.seq,
            };
            let (exists, removed) = (ex.stored_after, ex.removed);
            let v = Eversion {
                epoch: 1,
                seq: self.seq,
            };
            finish_write(
                &mut ex.txn,
                &self.obj,
                exists,
                removed,
                v,
                &reqid,
                Bytes::new(),
                0,
                1000,
            );
            self.store.submit_blocking(&ex.txn).expect("apply");
        }
        Ok(ex.outputs)
    }

    fn write(&mut self, offset: u64, data: Vec<u8>, snapc: &SnapContext) {
        self.run(
            vec![ObjOp::Write {
                offset,
                data: data.into(),
            }],
            snapc,
        )
        .expect("write");
    }

    /// The object at `snap` (0: the head); `None` if it does not exist there.
    fn read(&self, snap: u64) -> Option<Vec<u8>> {
        let args = SnapArgs {
            snapc: SnapContext::default(),
            read_snap: snap,
        };
        let ops = [
            ObjOp::Stat,
            ObjOp::Read {
                offset: 0,
                len: 64 << 20,
            },
        ];
        match execute(&self.store, &self.obj, "c", &ops, &args, &|| vec![]) {
            Ok(ex) => {
                let (OpOutput::Stat { size, .. }, OpOutput::Data(d)) =
                    (&ex.outputs[0], &ex.outputs[1])
                else {
                    panic!("unexpected outputs {:?}", ex.outputs)
                };
                assert_eq!(*size, d.len() as u64, "stat and read disagree at {snap}");
                Some(d.to_vec())
            }
            Err(OpError::NotFound) => None,
            Err(e) => panic!("read at {snap}: {e}"),
        }
    }

    fn listing(&self) -> basalt_ops::SnapListing {
        let out = execute(
            &self.store,
            &self.obj,
            "c",
            &[ObjOp::ListSnaps],
            &SnapArgs::default(),
            &|| vec![],
        )
        .expect("list snaps");
        match &out.outputs[0] {
            OpOutput::Snaps(l) => l.clone(),
            o => panic!("{o:?}"),
        }
    }
}

fn snapc(seq: u64, snaps: &[u64]) -> SnapContext {
    SnapContext {
        seq,
        snaps: snaps.to_vec(),
    }
}

const C: usize = CHUNK_SIZE as usize;

#[test]
fn a_snapshot_keeps_what_a_later_write_changes_copying_only_touched_chunks() {
    let mut r = Rig::new();
    let a = vec![b'a'; 4 * C];
    r.write(0, a.clone(), &snapc(0, &[]));
    // Snapshot 1, then a 4 KiB write into chunk 1 and one into chunk 2.
    let s1 = snapc(1, &[1]);
    r.write(C as u64 + 10, vec![b'b'; 4096], &s1);
    r.write(2 * C as u64, vec![b'c'; 10], &s1);
    assert_eq!(r.read(1), Some(a.clone()));
    let mut head = a.clone();
    head[C + 10..C + 10 + 4096].fill(b'b');
    head[2 * C..2 * C + 10].fill(b'c');
    assert_eq!(r.read(0), Some(head.clone()));
    let l = r.listing();
    assert_eq!(l.clones.len(), 1);
    assert_eq!(l.clones[0].id, 1);
    assert_eq!(l.clones[0].differs, vec![(C as u64, 2 * C as u64)]);
    // The clone holds two chunks, not the object.
    let clone = r.obj.clone().at_snap(1);
    assert_eq!(
        r.store.stat(&clone).expect("clone").stored_bytes,
        2 * C as u64
    );

    // Snapshot 2 and a write to chunk 1 again: each snapshot reads its own past.
    let s2 = snapc(2, &[2, 1]);
    r.write(C as u64, vec![b'd'; C], &s2);
    assert_eq!(r.read(1), Some(a.clone()));
    assert_eq!(r.read(2), Some(head.clone()));
    let mut head2 = head.clone();
    head2[C..2 * C].fill(b'd');
    assert_eq!(r.read(0), Some(head2.clone()));
    // A snapshot id newer than every write reads the head.
    assert_eq!(r.read(3), Some(head2));
}

#[test]
fn removed_objects_leave_a_whiteout_until_their_snapshots_are_trimmed() {
    let mut r = Rig::new();
    let a = vec![b'a'; 2 * C + 100];
    r.write(0, a.clone(), &snapc(0, &[]));
    r.run(vec![ObjOp::Remove], &snapc(1, &[1])).expect("rm");
    assert_eq!(r.read(0), None);
    assert_eq!(r.read(1), Some(a.clone()));
    assert!(!r.listing().head_exists);
    // Invisible to stat and to a second remove.
    assert_eq!(
        r.run(vec![ObjOp::Stat], &snapc(1, &[1])).err(),
        Some(OpError::NotFound)
    );
    assert_eq!(
        r.run(vec![ObjOp::Remove], &snapc(1, &[1])).err(),
        Some(OpError::NotFound)
    );
    // Recreated after the snapshot: the snapshot still reads the old object.
    r.write(0, b"new".to_vec(), &snapc(1, &[1]));
    assert_eq!(r.read(0), Some(b"new".to_vec()));
    assert_eq!(r.read(1), Some(a));
    r.run(vec![ObjOp::Remove], &snapc(1, &[1])).expect("rm");
    r.run(vec![ObjOp::TrimSnaps { removed: vec![1] }], &snapc(1, &[]))
        .expect("trim");
    // Nothing is left in the store.
    assert!(!r.store.exists(&r.obj).expect("exists"));
    assert!(!r.store.exists(&r.obj.clone().at_snap(1)).expect("exists"));
}

#[test]
fn an_object_created_after_a_snapshot_is_absent_from_it() {
    let mut r = Rig::new();
    r.write(0, b"x".to_vec(), &snapc(3, &[3, 1]));
    assert_eq!(r.read(1), None);
    assert_eq!(r.read(3), None);
    assert_eq!(r.read(4), Some(b"x".to_vec()));
}

#[test]
fn writes_at_a_snapshot_and_reserved_xattrs_are_refused() {
    let mut r = Rig::new();
    r.write(0, b"x".to_vec(), &snapc(0, &[]));
    let args = SnapArgs {
        snapc: SnapContext::default(),
        read_snap: 1,
    };
    let w = [ObjOp::Write {
        offset: 0,
        data: Bytes::from_static(b"y"),
    }];
    assert!(matches!(
        execute(&r.store, &r.obj, "c", &w, &args, &|| vec![]),
        Err(OpError::InvalidArgument(_))
    ));
    let set = ObjOp::SetXattr {
        name: "snap.set".into(),
        value: Bytes::new(),
    };
    assert!(matches!(
        r.run(vec![set], &snapc(0, &[])),
        Err(OpError::InvalidArgument(_))
    ));
    // A malformed snap context (not descending) is refused before anything happens.
    assert!(matches!(
        r.run(
            vec![ObjOp::Write {
                offset: 0,
                data: Bytes::from_static(b"z"),
            }],
            &snapc(2, &[1, 2])
        ),
        Err(OpError::InvalidArgument(_))
    ));
}

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, zeroes, truncates, removes, snapshots, rollbacks and trims on one object;
/// after every step each live snapshot and the head read exactly as the model says.
/// `SNAP_MODEL_SEED=N` replays one seed.
#[test]
fn every_snapshot_reads_as_the_model_says() {
    let seeds: Vec<u64> = match std::env::var("SNAP_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("SNAP_MODEL_SEED is a number")],
        Err(_) => (1..=60).collect(),
    };
    for seed in seeds {
        run_model(seed);
    }
}

fn run_model(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut r = Rig::new();
    let mut head: Option<Vec<u8>> = None;
    // Live snapshots: id → the object then.
    let mut snaps: BTreeMap<u64, Option<Vec<u8>>> = BTreeMap::new();
    let mut next_snap = 1u64;
    let max = 6 * C as u64;
    for step in 0..120 {
        let ctx = snapc(
            next_snap - 1,
            &snaps.keys().rev().copied().collect::<Vec<_>>(),
        );
        let what = rng.below(100);
        let (ops, desc): (Vec<ObjOp>, String) = if what < 45 {
            let off = rng.below(max);
            let len = 1 + rng.below(2 * C as u64);
            let byte = (rng.below(250) + 1) as u8;
            let mut h = head.clone().unwrap_or_default();
            let end = (off + len) as usize;
            if h.len() < end {
                h.resize(end, 0);
            }
            h[off as usize..end].fill(byte);
            head = Some(h);
            (
                vec![ObjOp::Write {
                    offset: off,
                    data: vec![byte; len as usize].into(),
                }],
                format!("write {off}+{len}"),
            )
        } else if what < 55 {
            let to = rng.below(max);
            let Some(h) = head.as_mut() else { continue };
            h.resize(to as usize, 0);
            (vec![ObjOp::Truncate { size: to }], format!("truncate {to}"))
        } else if what < 62 {
            let off = rng.below(max);
            let len = rng.below(C as u64 * 2);
            // The store's zero of an existing object extends it, as a write of zeros would.
            if let Some(h) = head.as_mut() {
                let end = (off + len) as usize;
                if len > 0 && h.len() < end {
                    h.resize(end, 0);
                }
                if (off as usize) < end.min(h.len()) {
                    h[off as usize..end].fill(0);
                }
            }
            (
                vec![ObjOp::Zero { offset: off, len }],
                format!("zero {off}+{len}"),
            )
        } else if what < 68 {
            if head.is_none() {
                continue;
            }
            head = None;
            (vec![ObjOp::Remove], "remove".into())
        } else if what < 82 {
            snaps.insert(next_snap, head.clone());
            next_snap += 1;
            continue;
        } else if what < 90 {
            let Some(&s) = snaps
                .keys()
                .nth(rng.below(snaps.len().max(1) as u64) as usize)
            else {
                continue;
            };
            head = snaps[&s].clone();
            (vec![ObjOp::Rollback { snap: s }], format!("rollback {s}"))
        } else {
            let Some(&s) = snaps
                .keys()
                .nth(rng.below(snaps.len().max(1) as u64) as usize)
            else {
                continue;
            };
            snaps.remove(&s);
            let ctx = snapc(
                next_snap - 1,
                &snaps.keys().rev().copied().collect::<Vec<_>>(),
            );
            r.run(vec![ObjOp::TrimSnaps { removed: vec![s] }], &ctx)
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: trim {s}: {e}"));
            check(&r, &head, &snaps, seed, step, &format!("trim {s}"));
            continue;
        };
        r.run(ops, &ctx)
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: {desc}: {e}"));
        check(&r, &head, &snaps, seed, step, &desc);
    }
}

fn check(
    r: &Rig,
    head: &Option<Vec<u8>>,
    snaps: &BTreeMap<u64, Option<Vec<u8>>>,
    seed: u64,
    step: usize,
    desc: &str,
) {
    assert!(
        r.read(0) == *head,
        "seed {seed} step {step} ({desc}): the head differs from the model"
    );
    for (s, want) in snaps {
        assert!(
            r.read(*s) == *want,
            "seed {seed} step {step} ({desc}): snapshot {s} differs from the model"
        );
    }
}

/// Deep scrub covers clones: a copy whose clone lost a byte, or holds other bytes, is found.
#[test]
fn deep_scrub_checks_clones() {
    use crate::pg::{compare_scrub_maps, scrub_map, NameRange};
    let build = || {
        let mut r = Rig::new();
        r.write(0, vec![b'a'; 2 * C], &snapc(0, &[]));
        r.write(0, vec![b'b'; 4096], &snapc(1, &[1]));
        r
    };
    let (good, rotten, other) = (build(), build(), build());
    let clone = good.obj.clone().at_snap(1);
    // The clone holds chunk 0 only: flip a byte of it on one copy.
    rotten
        .store
        .inject_bitflip_for_testing(&clone, 0, 100)
        .expect("bitflip");
    // And give another copy's clone different bytes with valid checksums.
    let mut t = Transaction::new();
    t.write(&clone, 0, Bytes::from(vec![b'x'; 4096]));
    other.store.submit_blocking(&t).expect("apply");
    let pg = good.obj.pg();
    let map = |r: &Rig| scrub_map(&r.store, pg, true, &NameRange::default(), 100).expect("map");
    let maps = [
        (0, map(&good)),
        (1, map(&rotten)),
        (2, map(&good)),
        (3, map(&other)),
    ]
    .into_iter()
    .collect();
    let found = compare_scrub_maps(0, &maps);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].bad, vec![1, 3], "{found:?}");
    assert!(found[0].why.contains("clones [1]"), "{found:?}");
}
