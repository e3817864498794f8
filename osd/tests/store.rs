//! The shared store test suite: every case runs against the in-memory store and the RocksDB
//! store (`<case>::memory` / `<case>::rocksdb`). RocksDB-only cases (reopen, crash) follow.

use std::collections::BTreeMap;

use basalt_osd::store::*;
use basalt_placement::PgId;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const PG: PgId = PgId { pool: 1, seed: 3 };
const C: u64 = CHUNK_SIZE;

fn cfg() -> StoreConfig {
    StoreConfig {
        // These tests check semantics, not durability; the crash test below turns sync back on.
        sync: false,
        block_cache_bytes: 8 << 20,
        ..StoreConfig::default()
    }
}

fn mem_store(cfg: StoreConfig) -> Store {
    Store::in_memory(cfg).unwrap()
}

fn rocks_store(dir: &tempfile::TempDir, cfg: StoreConfig) -> Store {
    Store::mkfs(
        dir.path(),
        Superblock::new("fsid-test", "osd-uuid-test"),
        cfg,
    )
    .unwrap()
}

fn with_pg(s: &Store) {
    let mut t = Transaction::new();
    t.pg_create(PG);
    s.submit_blocking(&t).unwrap();
}

fn oid(name: &str) -> ObjectId {
    ObjectId::new(PG, name)
}

fn submit(s: &Store, f: impl FnOnce(&mut Transaction)) -> Result<()> {
    let mut t = Transaction::new();
    f(&mut t);
    s.submit_blocking(&t)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    // No zero bytes, so stored sizes are exact; zero runs are added on purpose where wanted.
    v.iter_mut().for_each(|b| *b |= 1);
    v
}

/// Runs `$body(&Store)` against both engines, each with `$cfg` and a created PG.
macro_rules! both {
    ($name:ident, $body:expr) => {
        both!($name, cfg(), $body);
    };
    ($name:ident, $cfg:expr, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn memory() {
                let s = mem_store($cfg);
                with_pg(&s);
                ($body)(&s);
            }
            #[test]
            fn rocksdb() {
                let d = tempfile::tempdir().unwrap();
                let s = rocks_store(&d, $cfg);
                with_pg(&s);
                ($body)(&s);
            }
        }
    };
}

both!(small_round_trip, |s: &Store| {
    let o = oid("small");
    submit(s, |t| {
        t.write(&o, 0, &b"hello world"[..]);
    })
    .unwrap();
    assert_eq!(&s.read(&o, 0, 100).unwrap()[..], b"hello world");
    assert_eq!(&s.read(&o, 6, 3).unwrap()[..], b"wor");
    assert_eq!(s.read(&o, 11, 10).unwrap().len(), 0, "read at EOF is empty");
    assert_eq!(
        s.read(&o, 1000, 10).unwrap().len(),
        0,
        "read past EOF is empty"
    );
    let st = s.stat(&o).unwrap();
    assert_eq!(st.size, 11);
    assert_eq!(st.stored_bytes, 11);
    assert!(matches!(
        s.read(&oid("nope"), 0, 1),
        Err(StoreError::NotFound { .. })
    ));
    assert!(!s.exists(&oid("nope")).unwrap());
});

both!(large_round_trip_64mib, |s: &Store| {
    let o = oid("large");
    let data = pattern(7, 64 << 20);
    submit(s, |t| {
        t.write_full(&o, data.clone());
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().size, 64 << 20);
    assert!(s.read(&o, 0, 64 << 20).unwrap() == data[..]);
    // Unaligned windows across chunk boundaries.
    for (off, len) in [(C - 1, 2), (3 * C + 17, 5 * C + 3), ((64 << 20) - 10, 100)] {
        let got = s.read(&o, off, len).unwrap();
        let end = ((off + len) as usize).min(data.len());
        assert!(got == data[off as usize..end], "window {off}+{len}");
    }
    assert!(s.deep_scrub_object(&o).unwrap().is_clean());
});

both!(sparse_objects, |s: &Store| {
    let o = oid("sparse");
    submit(s, |t| {
        t.write(&o, 10 * C + 5, &b"x"[..]);
    })
    .unwrap();
    let got = s.read(&o, 0, 20 * C).unwrap();
    assert_eq!(got.len() as u64, 10 * C + 6);
    assert!(got[..(10 * C + 5) as usize].iter().all(|&b| b == 0));
    assert_eq!(got[(10 * C + 5) as usize], b'x');
    assert_eq!(
        s.stat(&o).unwrap().stored_bytes,
        6,
        "only the touched chunk, trimmed"
    );

    // Zeroing a whole chunk frees it; zeroing part of one trims it.
    submit(s, |t| {
        t.write(&o, 0, vec![1u8; 2 * C as usize]);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().stored_bytes, 2 * C + 6);
    submit(s, |t| {
        t.zero(&o, 0, C);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().stored_bytes, C + 6);
    submit(s, |t| {
        t.zero(&o, C + C / 2, C / 2);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().stored_bytes, C / 2 + 6);
    let got = s.read(&o, 0, 2 * C).unwrap();
    assert!(got[..C as usize].iter().all(|&b| b == 0));
    assert!(got[C as usize..(C + C / 2) as usize]
        .iter()
        .all(|&b| b == 1));
    assert!(got[(C + C / 2) as usize..].iter().all(|&b| b == 0));

    // Writing zeros explicitly stores nothing either.
    submit(s, |t| {
        t.write(&o, 4 * C, vec![0u8; C as usize]);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().stored_bytes, C / 2 + 6);

    // Truncate frees everything beyond, and the tail reads as zeros when re-extended.
    submit(s, |t| {
        t.truncate(&o, C + 10).truncate(&o, 3 * C);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().stored_bytes, 10);
    assert_eq!(s.stat(&o).unwrap().size, 3 * C);
    let got = s.read(&o, C, 2 * C).unwrap();
    assert!(got[..10].iter().all(|&b| b == 1));
    assert!(got[10..].iter().all(|&b| b == 0));
    assert_eq!(s.stats().used_bytes, 10);
});

/// A simple model: object name → bytes.
type Model = BTreeMap<String, Vec<u8>>;

fn model_write(m: &mut Model, name: &str, off: usize, data: &[u8]) {
    let v = m.entry(name.to_string()).or_default();
    if data.is_empty() {
        return;
    }
    if v.len() < off + data.len() {
        v.resize(off + data.len(), 0);
    }
    v[off..off + data.len()].copy_from_slice(data);
}

/// Stored bytes the canonical chunk form implies: per chunk, up to its last non-zero byte.
fn canonical_stored(v: &[u8]) -> u64 {
    v.chunks(C as usize)
        .map(|c| c.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1) as u64)
        .sum()
}

fn run_model(s: &Store, seed: u64, rounds: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::new();
    let base_used = s.stats().used_bytes;
    let owned: Vec<String> = ["a", "b", "c\0d", ""]
        .iter()
        .map(|n| format!("{n}{seed}"))
        .collect();
    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
    for round in 0..rounds {
        let mut t = Transaction::new();
        let mut next = model.clone();
        let nops = rng.random_range(1..=3);
        for _ in 0..nops {
            let name = names[rng.random_range(0..names.len())];
            let o = oid(name);
            let exists = next.contains_key(name);
            let len = match rng.random_range(0..4) {
                0 => rng.random_range(0..16),
                1 => rng.random_range(0..C as usize + 10),
                _ => rng.random_range(0..3 * C as usize),
            };
            let off = match rng.random_range(0..3) {
                0 => rng.random_range(0..4) * C as usize,
                1 => rng.random_range(0..6 * C as usize),
                _ => rng.random_range(1..4) * C as usize - rng.random_range(0..2),
            };
            // Data with zero runs so canonical trimming is exercised.
            let mut data = pattern(rng.random(), len);
            if rng.random_bool(0.3) {
                let z = rng.random_range(0..=len);
                data[z..].fill(0);
            }
            match rng.random_range(0..8) {
                0..=2 => {
                    t.write(&o, off as u64, data.clone());
                    model_write(&mut next, name, off, &data);
                }
                3 => {
                    t.zero(&o, off as u64, len as u64);
                    model_write(&mut next, name, off, &vec![0; len]);
                }
                4 if exists => {
                    t.truncate(&o, off as u64);
                    next.get_mut(name).unwrap().resize(off, 0);
                }
                5 => {
                    t.append(&o, data.clone());
                    let at = next.get(name).map_or(0, Vec::len);
                    model_write(&mut next, name, at, &data);
                }
                6 => {
                    t.write_full(&o, data.clone());
                    next.insert(name.to_string(), data.clone());
                }
                7 if exists => {
                    t.remove(&o);
                    next.remove(name);
                }
                _ => {
                    t.create(&o, false);
                    next.entry(name.to_string()).or_default();
                }
            }
        }
        s.submit_blocking(&t)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        model = next;
        for &name in &names {
            let o = oid(name);
            match model.get(name) {
                Some(v) => {
                    let st = s.stat(&o).unwrap();
                    assert_eq!(st.size, v.len() as u64, "round {round} {name:?} size");
                    assert_eq!(st.stored_bytes, canonical_stored(v), "round {round} stored");
                    let got = s.read(&o, 0, u64::MAX).unwrap();
                    assert!(got == v[..], "round {round} {name:?} content");
                    let off = rng.random_range(0..=v.len());
                    let len = rng.random_range(0..2 * C as usize);
                    let got = s.read(&o, off as u64, len as u64).unwrap();
                    assert!(
                        got == v[off..(off + len).min(v.len())],
                        "round {round} window"
                    );
                }
                None => assert!(!s.exists(&o).unwrap(), "round {round} {name:?} exists"),
            }
        }
        let used: u64 = model.values().map(|v| canonical_stored(v)).sum();
        assert_eq!(
            s.stats().used_bytes,
            base_used + used,
            "round {round} used bytes"
        );
    }
}

both!(random_ops_match_model, |s: &Store| {
    for seed in 0..3 {
        run_model(s, seed, 60);
    }
});

both!(failed_transaction_writes_nothing, |s: &Store| {
    let a = oid("a");
    let b = oid("b");
    submit(s, |t| {
        t.write(&a, 0, &b"one"[..]).create(&b, true);
    })
    .unwrap();
    let used = s.stats().used_bytes;
    // Exclusive create of an existing object, after other effects in the same transaction.
    let err = submit(s, |t| {
        t.write(&a, 0, &b"two"[..])
            .setxattr(&a, "k", &b"v"[..])
            .omap_set(&a, [(&b"k"[..], &b"v"[..])])
            .pg_log_append(PG, 1, &b"entry"[..])
            .pg_info_set(PG, &b"info"[..])
            .write(&oid("new"), 0, &b"x"[..])
            .create(&b, true);
    })
    .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    // Truncate of a missing object is NotFound, and also leaves nothing.
    let err = submit(s, |t| {
        t.remove(&a).truncate(&oid("missing"), 5);
    })
    .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert_eq!(&s.read(&a, 0, 10).unwrap()[..], b"one");
    assert!(s.xattrs(&a).unwrap().is_empty());
    assert!(s.omap_list(&a, None, 10).unwrap().entries.is_empty());
    assert!(s.pg_log_scan(PG, 0, 10).unwrap().is_empty());
    assert!(s.pg_info(PG).unwrap().is_none());
    assert!(!s.exists(&oid("new")).unwrap());
    assert_eq!(s.stats().used_bytes, used);
});

both!(ops_in_one_transaction_see_each_other, |s: &Store| {
    let o = oid("o");
    submit(s, |t| {
        t.create(&o, true)
            .write(&o, 0, vec![1u8; 100])
            .write(&o, 50, vec![2u8; 100])
            .setxattr(&o, "_", &b"oi"[..])
            .omap_set_header(&o, &b"hdr"[..])
            .omap_set(&o, [(&b"k1"[..], &b"v1"[..]), (&b"k2"[..], &b"v2"[..])])
            .append(&o, &b"tail"[..]);
    })
    .unwrap();
    let got = s.read(&o, 0, 1000).unwrap();
    assert_eq!(got.len(), 154);
    assert!(got[..50].iter().all(|&b| b == 1) && got[50..150].iter().all(|&b| b == 2));
    assert_eq!(&got[150..], b"tail");
    assert_eq!(
        s.getxattr(&o, "_").unwrap().unwrap(),
        Bytes::from_static(b"oi")
    );

    // Remove and re-create in one transaction: the new object starts empty (no old omap/data).
    submit(s, |t| {
        t.remove(&o)
            .create(&o, true)
            .write(&o, C, &b"new"[..])
            .omap_set(&o, [(&b"k3"[..], &b"v3"[..])]);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().size, C + 3);
    assert!(s.read(&o, 0, C).unwrap().iter().all(|&b| b == 0));
    assert!(s.xattrs(&o).unwrap().is_empty());
    assert!(s.omap_get_header(&o).unwrap().is_none());
    let keys: Vec<_> = s.omap_list(&o, None, 10).unwrap().entries;
    assert_eq!(
        keys,
        vec![(Bytes::from_static(b"k3"), Bytes::from_static(b"v3"))]
    );
    assert_eq!(s.stats().used_bytes, 3);
});

both!(xattrs_and_meta, |s: &Store| {
    let o = oid("x");
    assert!(matches!(
        submit(s, |t| {
            t.setxattr(&o, "a", &b"1"[..]);
        }),
        Err(StoreError::NotFound { .. })
    ));
    let meta = ObjectMeta {
        version: Bytes::from_static(b"\x00\x05"),
        user_version: 42,
        mtime_ns: 1_700_000_000_000_000_000,
    };
    submit(s, |t| {
        t.create(&o, false)
            .setxattr(&o, "a", &b"1"[..])
            .setxattr(&o, "b", &b"2"[..])
            .set_meta(&o, meta.clone());
    })
    .unwrap();
    submit(s, |t| {
        t.rmxattr(&o, "a").rmxattr(&o, "never-set");
    })
    .unwrap();
    let x = s.xattrs(&o).unwrap();
    assert_eq!(x.len(), 1);
    assert_eq!(x["b"], Bytes::from_static(b"2"));
    assert_eq!(s.getxattr(&o, "a").unwrap(), None);
    assert_eq!(s.stat(&o).unwrap().meta, meta);
    // xattr bytes are charged.
    assert_eq!(s.stats().used_bytes, 2);
});

both!(omap_listing_and_ranges, |s: &Store| {
    let o = oid("omap");
    let entries: Vec<(Vec<u8>, Vec<u8>)> = (0..100u32)
        .map(|i| (format!("key{i:03}").into_bytes(), i.to_be_bytes().to_vec()))
        .collect();
    submit(s, |t| {
        t.create(&o, false).omap_set(&o, entries.clone());
    })
    .unwrap();
    // Page through with start_after.
    let mut seen = Vec::new();
    let mut after: Option<Bytes> = None;
    loop {
        let page = s.omap_list(&o, after.as_deref(), 7).unwrap();
        seen.extend(page.entries.iter().cloned());
        if !page.more {
            break;
        }
        after = page.entries.last().map(|(k, _)| k.clone());
    }
    assert_eq!(seen.len(), 100);
    assert!(seen
        .iter()
        .zip(&entries)
        .all(|((k, v), (ek, ev))| k == &ek[..] && v == &ev[..]));
    // Start after a key that does not exist.
    let page = s.omap_list(&o, Some(&b"key0505"[..]), 2).unwrap();
    assert_eq!(&page.entries[0].0[..], b"key051");
    // Point gets, with a missing key.
    let got = s
        .omap_get(&o, &[&b"key007"[..], &b"nope"[..], &b"key099"[..]])
        .unwrap();
    assert_eq!(got.len(), 2);
    // rm_range [key010, key020), rm_keys, header.
    submit(s, |t| {
        t.omap_rm_range(&o, &b"key010"[..], &b"key020"[..])
            .omap_rm_keys(&o, [&b"key000"[..], &b"key099"[..]])
            .omap_set_header(&o, &b"H"[..]);
    })
    .unwrap();
    let all = s.omap_list(&o, None, 1000).unwrap();
    assert_eq!(all.entries.len(), 88);
    assert!(!all.more);
    assert!(all
        .entries
        .iter()
        .all(|(k, _)| !(k[..] >= b"key010"[..] && k[..] < b"key020"[..])));
    assert_eq!(
        s.omap_get_header(&o).unwrap().unwrap(),
        Bytes::from_static(b"H")
    );
    // A neighbour whose name extends this one's is not affected by clear.
    let n = oid("omap2");
    submit(s, |t| {
        t.create(&n, false).omap_set(&n, [(&b"k"[..], &b"v"[..])]);
    })
    .unwrap();
    submit(s, |t| {
        t.omap_clear(&o);
    })
    .unwrap();
    assert!(s.omap_list(&o, None, 10).unwrap().entries.is_empty());
    assert!(s.omap_get_header(&o).unwrap().is_none());
    assert_eq!(s.omap_list(&n, None, 10).unwrap().entries.len(), 1);
});

both!(pg_listing_in_hash_order_with_cursor, |s: &Store| {
    let other = PgId { pool: 1, seed: 4 };
    let mut expect = Vec::new();
    submit(s, |t| {
        t.pg_create(other);
        for i in 0..150 {
            let o =
                ObjectId::with_namespace(PG, if i % 3 == 0 { "ns" } else { "" }, format!("obj{i}"));
            t.write(&o, 0, &b"d"[..]);
            expect.push(o.clone());
            if i % 10 == 0 {
                let clone = o.clone().at_snap(5);
                t.create(&clone, true);
                expect.push(clone);
            }
            t.create(&ObjectId::new(other, format!("other{i}")), false);
        }
    })
    .unwrap();
    expect.sort();
    // Hash order: bit-reversed hashes never decrease.
    assert!(expect
        .windows(2)
        .all(|w| w[0].hash().reverse_bits() <= w[1].hash().reverse_bits()));
    let mut got = Vec::new();
    let mut cursor: Option<ObjectId> = None;
    loop {
        let page = s.list_objects(PG, cursor.as_ref(), 17).unwrap();
        assert!(page.objects.len() <= 17);
        got.extend(page.objects.iter().cloned());
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(got, expect);
    assert_eq!(
        s.list_objects(other, None, 1000).unwrap().objects.len(),
        150
    );
    assert!(s
        .list_objects(PgId { pool: 2, seed: 3 }, None, 10)
        .unwrap()
        .objects
        .is_empty());
    assert!(matches!(
        s.list_objects(other, Some(&expect[0]), 10),
        Err(StoreError::InvalidArgument(_))
    ));
    let mut pgs = s.list_pgs().unwrap();
    pgs.sort();
    assert_eq!(pgs, vec![PG, other]);
});

both!(pg_log_info_and_dups, |s: &Store| {
    submit(s, |t| {
        for v in 1..=20u64 {
            t.pg_log_append(PG, v, format!("e{v}"));
        }
        t.pg_info_set(PG, &b"info1"[..]);
    })
    .unwrap();
    let log = s.pg_log_scan(PG, 0, 100).unwrap();
    assert_eq!(log.len(), 20);
    assert_eq!(log[0], (1, Bytes::from_static(b"e1")));
    assert_eq!(
        s.pg_log_scan(PG, 15, 3)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        vec![15, 16, 17]
    );
    submit(s, |t| {
        t.pg_log_trim(PG, 10)
            .pg_log_remove_from(PG, 18)
            .pg_info_set(PG, &b"info2"[..]);
    })
    .unwrap();
    let versions: Vec<u64> = s
        .pg_log_scan(PG, 0, 100)
        .unwrap()
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(versions, (11..=17).collect::<Vec<_>>());
    assert_eq!(
        s.pg_info(PG).unwrap().unwrap(),
        Bytes::from_static(b"info2")
    );
    submit(s, |t| {
        t.pg_log_trim(PG, u64::MAX);
    })
    .unwrap();
    assert!(s.pg_log_scan(PG, 0, 100).unwrap().is_empty());

    // Dups: record, look up, trim by version, re-record at a newer version survives trim.
    submit(s, |t| {
        t.dup_record(PG, &b"client.1:1"[..], 5, &b"ok"[..])
            .dup_record(PG, &b"client.1:2"[..], 6, &b"err"[..])
            .dup_record(PG, &b"client.2:1"[..], 7, &b""[..]);
    })
    .unwrap();
    assert_eq!(
        s.dup_lookup(PG, b"client.1:2").unwrap(),
        Some((6, Bytes::from_static(b"err")))
    );
    submit(s, |t| {
        t.dup_record(PG, &b"client.1:1"[..], 9, &b"again"[..])
            .dup_trim(PG, 6);
    })
    .unwrap();
    assert_eq!(
        s.dup_lookup(PG, b"client.1:1").unwrap(),
        Some((9, Bytes::from_static(b"again")))
    );
    assert_eq!(s.dup_lookup(PG, b"client.1:2").unwrap(), None);
    assert!(s.dup_lookup(PG, b"client.2:1").unwrap().is_some());
    submit(s, |t| {
        t.dup_trim(PG, u64::MAX);
    })
    .unwrap();
    assert_eq!(s.dup_lookup(PG, b"client.1:1").unwrap(), None);
    assert_eq!(s.dup_lookup(PG, b"client.2:1").unwrap(), None);
});

both!(pg_create_and_remove, |s: &Store| {
    let pg2 = PgId { pool: 2, seed: 0 };
    let o = ObjectId::new(pg2, "o");
    assert!(matches!(
        submit(s, |t| {
            t.write(&o, 0, &b"x"[..]);
        }),
        Err(StoreError::NoSuchPg { .. })
    ));
    assert!(matches!(
        submit(s, |t| {
            t.pg_create(PG);
        }),
        Err(StoreError::PgExists { .. })
    ));
    submit(s, |t| {
        t.pg_create(pg2)
            .write(&o, 0, vec![9u8; 1000])
            .omap_set(&o, [(&b"k"[..], &b"v"[..])])
            .pg_log_append(pg2, 1, &b"e"[..])
            .pg_info_set(pg2, &b"i"[..]);
    })
    .unwrap();
    submit(s, |t| {
        t.write(&oid("keep"), 0, &b"keep"[..]);
    })
    .unwrap();
    assert_eq!(s.stats().used_bytes, 1004);
    submit(s, |t| {
        t.pg_remove(pg2);
    })
    .unwrap();
    assert!(!s.pg_exists(pg2).unwrap());
    assert_eq!(s.stats().used_bytes, 4);
    assert!(s.pg_info(pg2).unwrap().is_none());
    assert!(s.pg_log_scan(pg2, 0, 10).unwrap().is_empty());
    // Re-created in one transaction with a remove: starts empty.
    submit(s, |t| {
        t.pg_create(pg2).write(&o, 0, &b"y"[..]);
    })
    .unwrap();
    submit(s, |t| {
        t.write(&o, 1, &b"z"[..])
            .pg_remove(pg2)
            .pg_create(pg2)
            .create(&o, true);
    })
    .unwrap();
    assert_eq!(s.stat(&o).unwrap().size, 0);
    assert!(s.omap_list(&o, None, 10).unwrap().entries.is_empty());
    assert_eq!(
        s.list_objects(pg2, None, 10).unwrap().objects,
        vec![o.clone()]
    );
    assert_eq!(s.stats().used_bytes, 4);
    assert_eq!(&s.read(&oid("keep"), 0, 10).unwrap()[..], b"keep");
});

both!(bitflip_is_detected_on_read_and_scrub, |s: &Store| {
    let o = oid("rot");
    let data = pattern(3, 3 * C as usize + 100);
    submit(s, |t| {
        t.write_full(&o, data.clone());
    })
    .unwrap();
    let clean = s.deep_scrub_object(&o).unwrap();
    assert!(clean.is_clean());
    assert_eq!(clean.chunks.len(), 4);
    s.inject_bitflip_for_testing(&o, 1, 12345).unwrap();
    // Any read touching the bad 4 KiB block (block 3 of chunk 1) fails, naming the chunk;
    // reads elsewhere, even in the same chunk, still work.
    for (off, len) in [(0, u64::MAX), (C + 12345, 1), (C + 3 * 4096 - 1, 2)] {
        match s.read(&o, off, len) {
            Err(StoreError::Corrupt { object, chunk }) => {
                assert_eq!(chunk, 1);
                assert!(object.contains("rot"));
            }
            other => panic!("read {off}+{len} returned {:?}", other.map(|b| b.len())),
        }
    }
    assert!(s.read(&o, 0, C).unwrap() == data[..C as usize]);
    assert!(s.read(&o, C - 1, 2).unwrap() == data[C as usize - 1..C as usize + 1]);
    assert!(s.read(&o, 2 * C, 100).unwrap() == data[2 * C as usize..2 * C as usize + 100]);
    let rep = s.deep_scrub_object(&o).unwrap();
    assert_eq!(rep.bad_chunks(), vec![1]);
    assert_ne!(rep.chunks[1].stored, rep.chunks[1].computed);
    assert_ne!(rep.data_digest, clean.data_digest);
    // A partial write into the bad block refuses to launder it.
    assert!(matches!(
        submit(s, |t| {
            t.write(&o, C + 12340, &b"x"[..]);
        }),
        Err(StoreError::Corrupt { chunk: 1, .. })
    ));
    // Rewriting the whole chunk repairs it (what recovery will do).
    submit(s, |t| {
        t.write(&o, C, data[C as usize..2 * C as usize].to_vec());
    })
    .unwrap();
    assert!(s.read(&o, 0, u64::MAX).unwrap() == data[..]);
    assert_eq!(s.deep_scrub_object(&o).unwrap(), clean);
    assert!(matches!(
        s.inject_bitflip_for_testing(&o, 9, 0),
        Err(StoreError::NotFound { .. })
    ));
});

both!(
    full_store_refuses_growth_and_stays_usable,
    StoreConfig {
        capacity_bytes: Some(1 << 20),
        ..cfg()
    },
    |s: &Store| {
        let a = oid("a");
        submit(s, |t| {
            t.write(&a, 0, pattern(1, 600 << 10));
        })
        .unwrap();
        let err = submit(s, |t| {
            t.write(&oid("b"), 0, pattern(2, 600 << 10));
        })
        .unwrap_err();
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        assert!(err.to_string().contains("full"));
        assert!(!s.exists(&oid("b")).unwrap());
        // Still readable, and overwrites that do not grow usage still pass.
        assert_eq!(s.read(&a, 0, u64::MAX).unwrap().len(), 600 << 10);
        submit(s, |t| {
            t.write(&a, 0, pattern(3, 4096))
                .pg_log_append(PG, 1, &b"e"[..]);
        })
        .unwrap();
        assert_eq!(s.stats().used_bytes, 600 << 10);
        assert_eq!(s.stats().capacity_bytes, Some(1 << 20));
        // Freeing space makes room again.
        submit(s, |t| {
            t.truncate(&a, 100 << 10);
        })
        .unwrap();
        submit(s, |t| {
            t.write(&oid("b"), 0, pattern(2, 600 << 10));
        })
        .unwrap();
        assert_eq!(s.stats().used_bytes, 700 << 10);
    }
);

both!(invalid_input_is_a_typed_error, |s: &Store| {
    let long = "n".repeat(MAX_NAME_LEN + 1);
    let invalid =
        |r: Result<()>| assert!(matches!(r, Err(StoreError::InvalidArgument(_))), "{r:?}");
    invalid(submit(s, |t| {
        t.write(&oid(&long), 0, &b"x"[..]);
    }));
    assert!(matches!(
        s.read(&oid(&long), 0, 1),
        Err(StoreError::InvalidArgument(_))
    ));
    submit(s, |t| {
        t.write(&oid(&"n".repeat(MAX_NAME_LEN)), 0, &b"x"[..]);
    })
    .unwrap();
    invalid(submit(s, |t| {
        t.write(&oid("o"), u64::MAX - 1, &b"xyz"[..]);
    }));
    invalid(submit(s, |t| {
        t.zero(&oid("o"), 5, u64::MAX);
    }));
    assert!(matches!(
        submit(s, |t| {
            t.write(&oid("o"), DEFAULT_MAX_OBJECT_SIZE, &b"x"[..]);
        }),
        Err(StoreError::TooLarge { .. })
    ));
    assert!(matches!(
        submit(s, |t| {
            t.create(&oid("o"), false).truncate(&oid("o"), u64::MAX);
        }),
        Err(StoreError::TooLarge { .. })
    ));
    invalid(submit(s, |t| {
        t.create(&oid("o"), false)
            .setxattr(&oid("o"), "v", vec![0u8; MAX_XATTR_VALUE_LEN + 1]);
    }));
    invalid(submit(s, |t| {
        t.create(&oid("o"), false).setxattr(
            &oid("o"),
            "k".repeat(MAX_XATTR_NAME_LEN + 1),
            &b""[..],
        );
    }));
    invalid(submit(s, |t| {
        t.create(&oid("o"), false)
            .omap_set(&oid("o"), [(vec![0u8; MAX_OMAP_KEY_LEN + 1], vec![])]);
    }));
    invalid(submit(s, |t| {
        t.pg_create(PgId {
            pool: u32::MAX,
            seed: 0,
        });
    }));
    invalid(submit(s, |t| {
        t.dup_record(PG, vec![0u8; MAX_REQID_LEN + 1], 1, &b""[..]);
    }));
    assert!(!s.exists(&oid("o")).unwrap());
    // A read far past the end of a real object is just empty.
    assert!(s
        .read(&oid(&"n".repeat(MAX_NAME_LEN)), u64::MAX - 1, u64::MAX)
        .unwrap()
        .is_empty());
});

both!(async_concurrent_submits, |s: &Store| {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..32u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..5u64 {
                    let o = oid(&format!("t{i}"));
                    let mut t = Transaction::new();
                    t.write(&o, j * 4096, pattern(i * 100 + j, 4096))
                        .pg_log_append(PG, i * 100 + j, &b"e"[..]);
                    s.submit(t).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    for i in 0..32u64 {
        let got = s.read(&oid(&format!("t{i}")), 0, u64::MAX).unwrap();
        assert_eq!(got.len(), 5 * 4096);
        for j in 0..5u64 {
            assert!(
                got[(j * 4096) as usize..((j + 1) * 4096) as usize]
                    == pattern(i * 100 + j, 4096)[..]
            );
        }
    }
    assert_eq!(s.pg_log_scan(PG, 0, 1000).unwrap().len(), 160);
});

both!(scrub_digests_ignore_write_history, |s: &Store| {
    // Same bytes reached two ways: explicit zeros + overwrite vs sparse writes.
    let a = oid("hist-a");
    let b = oid("hist-b");
    submit(s, |t| {
        t.write(&a, 0, vec![0u8; 3 * C as usize])
            .write(&a, C + 7, &b"abc"[..])
            .setxattr(&a, "x", &b"1"[..]);
        t.write(&b, 2 * C, vec![5u8; 10])
            .zero(&b, 2 * C, 10)
            .truncate(&b, 0)
            .write(&b, C + 7, &b"abcdef"[..])
            .truncate(&b, C + 10)
            .truncate(&b, 3 * C)
            .setxattr(&b, "x", &b"1"[..]);
    })
    .unwrap();
    assert_eq!(
        s.read(&a, 0, u64::MAX).unwrap(),
        s.read(&b, 0, u64::MAX).unwrap()
    );
    let (ra, rb) = (
        s.deep_scrub_object(&a).unwrap(),
        s.deep_scrub_object(&b).unwrap(),
    );
    assert_eq!(ra.data_digest, rb.data_digest);
    assert_eq!(ra.attrs_digest, rb.attrs_digest);
    assert_eq!(ra.omap_digest, rb.omap_digest);
});

#[test]
fn both_engines_produce_identical_scrub_reports() {
    let d = tempfile::tempdir().unwrap();
    let stores = [mem_store(cfg()), rocks_store(&d, cfg())];
    let mut reports = Vec::new();
    for s in &stores {
        with_pg(s);
        run_model(s, 99, 30);
        let mut r = Vec::new();
        for o in s.list_objects(PG, None, 100).unwrap().objects {
            r.push((o.clone(), s.deep_scrub_object(&o).unwrap()));
        }
        reports.push(r);
    }
    assert_eq!(reports[0], reports[1]);
}

// -------------------------------------------------------------------------------------------
// RocksDB only: persistence.

#[test]
fn rocksdb_reopen_keeps_everything() {
    let d = tempfile::tempdir().unwrap();
    let o = oid("persist");
    {
        let s = rocks_store(&d, cfg());
        with_pg(&s);
        submit(&s, |t| {
            t.write(&o, 5, &b"data"[..])
                .setxattr(&o, "a", &b"b"[..])
                .omap_set(&o, [(&b"k"[..], &b"v"[..])])
                .pg_log_append(PG, 3, &b"e3"[..])
                .pg_info_set(PG, &b"info"[..])
                .dup_record(PG, &b"r"[..], 3, &b"ok"[..])
                .meta_set(&b"osdmap"[..], &b"epoch 7"[..]);
        })
        .unwrap();
        // Dropped without any flush: the memtables are lost, the WAL has it all.
    }
    let s = Store::open(d.path(), cfg()).unwrap();
    assert_eq!(s.superblock().fsid, "fsid-test");
    assert_eq!(s.superblock().osd_uuid, "osd-uuid-test");
    assert_eq!(&s.read(&o, 0, 100).unwrap()[..], b"\0\0\0\0\0data");
    assert_eq!(
        s.getxattr(&o, "a").unwrap().unwrap(),
        Bytes::from_static(b"b")
    );
    assert_eq!(s.omap_list(&o, None, 10).unwrap().entries.len(), 1);
    assert_eq!(s.pg_log_scan(PG, 0, 10).unwrap().len(), 1);
    assert!(s.dup_lookup(PG, b"r").unwrap().is_some());
    assert_eq!(s.list_pgs().unwrap(), vec![PG]);
    assert_eq!(
        s.meta_get(b"osdmap").unwrap().unwrap(),
        Bytes::from_static(b"epoch 7")
    );
    // "\0\0\0\0\0data" is stored as 9 bytes (only trailing zeros are trimmed) + xattr "a"="b".
    assert_eq!(s.stats().used_bytes, 9 + 2, "used bytes survive reopen");
    drop(s);
    assert!(matches!(
        Store::mkfs(d.path(), Superblock::new("f", "o"), cfg()),
        Err(StoreError::AlreadyFormatted { .. })
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(empty.path(), cfg()),
        Err(StoreError::NotFormatted { .. })
    ));
}

#[test]
fn rocksdb_capacity_accounting_survives_reopen() {
    let d = tempfile::tempdir().unwrap();
    let capped = StoreConfig {
        capacity_bytes: Some(100_000),
        ..cfg()
    };
    {
        let s = rocks_store(&d, capped.clone());
        with_pg(&s);
        submit(&s, |t| {
            t.write(&oid("a"), 0, pattern(1, 80_000));
        })
        .unwrap();
    }
    let s = Store::open(d.path(), capped).unwrap();
    assert_eq!(s.stats().used_bytes, 80_000);
    assert!(s.stats().db_bytes.is_some());
    assert!(matches!(
        submit(&s, |t| {
            t.write(&oid("b"), 0, pattern(2, 30_000));
        }),
        Err(StoreError::Full { .. })
    ));
}

const CRASH_ENV: &str = "BASALT_OSD_STORE_CRASH_DIR";

/// The crash children's store: durable commits, as an OSD runs it.
fn open_synced(dir: &str) -> Store {
    Store::open(
        dir,
        StoreConfig {
            sync: true,
            ..cfg()
        },
    )
    .unwrap()
}

/// Child half of `rocksdb_crash_keeps_acknowledged_writes`: writes until killed, printing the
/// index of every transaction whose submit returned. A no-op when run normally.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_ENV) else {
        return;
    };
    write_until_abort(&open_synced(&dir), 400);
}

/// Writes 4 KiB to eight objects in turn with a PG log entry each, printing `ACK i` for every
/// transaction whose submit returned, and aborts after the `last`.
fn write_until_abort(s: &Store, last: u64) {
    for i in 0u64.. {
        let o = oid(&format!("c{}", i % 8));
        let mut t = Transaction::new();
        t.write(&o, (i / 8) * 4096, pattern(i, 4096)).pg_log_append(
            PG,
            i,
            i.to_be_bytes().to_vec(),
        );
        s.submit_blocking(&t).unwrap();
        println!("ACK {i}");
        if i == last {
            // Die without any shutdown: no destructors, no flush, like kill -9.
            std::process::abort();
        }
    }
}

const CRASH_CHECKPOINTS_ENV: &str = "BASALT_OSD_STORE_CRASH_CHECKPOINTS_DIR";
/// A journal this small checkpoints every few hundred 4 KiB writes.
const SMALL_JOURNAL: u64 = 1 << 20;

/// Child half of `rocksdb_crash_amid_background_checkpoints_keeps_acknowledged_writes`.
#[test]
fn crash_child_checkpoints() {
    let Ok(dir) = std::env::var(CRASH_CHECKPOINTS_ENV) else {
        return;
    };
    write_until_abort(&open_synced(&dir), 3000);
}

/// Runs the test `child` of this binary in a child process on a fresh store (with `PG`) whose
/// directory it gets in `env`, until it aborts; returns the store's directory, the indices
/// the child printed as `ACK i`, and its whole output.
fn crash_child_run(child: &str, env: &str) -> (tempfile::TempDir, Vec<u64>, String) {
    crash_child_run_with(child, env, cfg())
}

/// [`crash_child_run`] on a store made with `mkfs_cfg` (its journal size is the file's).
fn crash_child_run_with(
    child: &str,
    env: &str,
    mkfs_cfg: StoreConfig,
) -> (tempfile::TempDir, Vec<u64>, String) {
    let d = tempfile::tempdir().unwrap();
    {
        let s = rocks_store(&d, mkfs_cfg);
        with_pg(&s);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--nocapture", "--test-threads=1"])
        .env(env, d.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "child should have aborted");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked = stdout
        .lines()
        // The harness may print "test <child> ... " on the same line as the first ACK.
        .filter_map(|l| l.split("ACK ").nth(1)?.trim().parse().ok())
        .collect();
    (d, acked, stdout)
}

#[test]
fn rocksdb_crash_keeps_acknowledged_writes() {
    let (d, acked, stdout) = crash_child_run("crash_child", CRASH_ENV);
    assert_eq!(acked.len(), 401, "child output: {stdout}");
    assert_acknowledged_writes_kept(&d, &acked);
}

/// A kill -9 while checkpoints run in the background (the data syncer's half in flight, or
/// finished with the engine flushed past the checkpoint position) loses nothing acknowledged:
/// replay from the recorded position onto the later engine state converges.
#[test]
fn rocksdb_crash_amid_background_checkpoints_keeps_acknowledged_writes() {
    let small = StoreConfig {
        journal_bytes: SMALL_JOURNAL,
        ..cfg()
    };
    let (d, acked, stdout) =
        crash_child_run_with("crash_child_checkpoints", CRASH_CHECKPOINTS_ENV, small);
    assert_eq!(acked.len(), 3001, "child output: {stdout}");
    assert_acknowledged_writes_kept(&d, &acked);
}

/// Reopens the store in `d` and checks every write of [`write_until_abort`] in `acked`.
fn assert_acknowledged_writes_kept(d: &tempfile::TempDir, acked: &[u64]) {
    let s = Store::open(d.path(), cfg()).unwrap();
    let log = s.pg_log_scan(PG, 0, 10_000).unwrap();
    assert!(log.len() >= acked.len());
    for &i in acked {
        let o = oid(&format!("c{}", i % 8));
        let off = (i / 8) * 4096;
        assert!(
            s.read(&o, off, 4096).unwrap() == pattern(i, 4096)[..],
            "acknowledged write {i} lost"
        );
        assert_eq!(log[i as usize], (i, Bytes::from(i.to_be_bytes().to_vec())));
    }
    for o in s.list_objects(PG, None, 100).unwrap().objects {
        assert!(s.deep_scrub_object(&o).unwrap().is_clean());
    }
}

const CRASH_SPLIT_ENV: &str = "BASALT_OSD_STORE_CRASH_SPLIT_DIR";

/// Child half of `rocksdb_crash_keeps_synced_applies`: four threads apply writes to their own
/// objects and wait for each to be durable (the op path's split commit, sharing WAL syncs),
/// printing the index of every write whose wait returned, until one thread aborts.
#[test]
fn crash_child_split_commit() {
    let Ok(dir) = std::env::var(CRASH_SPLIT_ENV) else {
        return;
    };
    let s = open_synced(&dir);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for k in 0u64.. {
                    let i = k * 4 + t;
                    let o = oid(&format!("s{t}"));
                    let mut txn = Transaction::new();
                    txn.write(&o, k * 4096, pattern(i, 4096)).pg_log_append(
                        PG,
                        i,
                        i.to_be_bytes().to_vec(),
                    );
                    let durable = s.apply_blocking(&txn).unwrap();
                    // Visible before it is durable: the next write builds on it.
                    assert_eq!(s.read(&o, k * 4096, 4096).unwrap(), pattern(i, 4096)[..]);
                    if k % 2 == 0 {
                        durable.wait().unwrap();
                    } else {
                        // Covers every earlier apply, this one included.
                        s.sync_blocking().unwrap();
                    }
                    println!("ACK {i}");
                    if i >= 400 {
                        std::process::abort();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn rocksdb_crash_keeps_synced_applies() {
    let (d, acked, stdout) = crash_child_run("crash_child_split_commit", CRASH_SPLIT_ENV);
    assert!(acked.len() >= 100, "child output: {stdout}");
    let s = Store::open(d.path(), cfg()).unwrap();
    let log: BTreeMap<u64, Bytes> = s.pg_log_scan(PG, 0, 10_000).unwrap().into_iter().collect();
    for &i in &acked {
        let (t, k) = (i % 4, i / 4);
        let o = oid(&format!("s{t}"));
        assert!(
            s.read(&o, k * 4096, 4096).unwrap() == pattern(i, 4096)[..],
            "synced write {i} lost"
        );
        assert_eq!(log.get(&i), Some(&Bytes::from(i.to_be_bytes().to_vec())));
    }
    // What survived of each object is a prefix of its writes: the WAL replays in order.
    for t in 0..4u64 {
        let mut seen_gap = false;
        for k in 0u64.. {
            let i = k * 4 + t;
            if i > 404 {
                break;
            }
            let present = log.contains_key(&i);
            assert!(
                !(present && seen_gap),
                "write {i} survived after a lost earlier one"
            );
            seen_gap |= !present;
        }
    }
}

#[test]
fn rocksdb_concurrent_submitters_agree() {
    {
        let mode = "committer";
        let d = tempfile::tempdir().unwrap();
        let s = rocks_store(&d, cfg());
        with_pg(&s);
        run_model(&s, 7, 20);
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for j in 0..20u64 {
                        submit(&s, |t| {
                            t.write(&oid(&format!("w{i}")), j * 100, pattern(i * 1000 + j, 100))
                                .pg_log_append(PG, 1000 + i * 100 + j, &b"e"[..]);
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 0..8u64 {
            let got = s.read(&oid(&format!("w{i}")), 0, u64::MAX).unwrap();
            assert_eq!(got.len(), 2000, "{mode}");
        }
        assert_eq!(s.pg_log_scan(PG, 1000, 1000).unwrap().len(), 160, "{mode}");
    }
}

/// A size-limited tmpfs mounted on a temporary directory (needs root, as CI runs), unmounted
/// on drop. A failed mount fails the test: the suite never passes by skipping.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return SmallFs { dir },
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        panic!("mounting a tmpfs failed ({why}): run the test as root (CAP_SYS_ADMIN)");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .output();
    }
}

/// Real ENOSPC on a 24 MiB tmpfs: the data area cannot grow.
#[test]
fn rocksdb_enospc_is_full_and_store_stays_readable() {
    let fs = SmallFs::mount("24m");
    let d = tempfile::tempdir_in(fs.dir.path()).unwrap();
    let small = StoreConfig {
        sync: true,
        journal_bytes: 4 << 20,
        ..StoreConfig::default()
    };
    let s = Store::mkfs(d.path(), Superblock::new("f", "o"), small.clone()).unwrap();
    with_pg(&s);
    let mut written = 0u64;
    let err = loop {
        match submit(&s, |t| {
            t.write_full(&oid(&format!("fill{written}")), pattern(written, 1 << 20));
        }) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 10_000, "filesystem never filled");
    };
    println!("after {written} MiB: {err}");
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    for i in 0..written {
        assert!(s.read(&oid(&format!("fill{i}")), 0, u64::MAX).unwrap() == pattern(i, 1 << 20)[..]);
    }
    let again = submit(&s, |t| {
        t.remove(&oid("fill0"));
    });
    println!("remove after ENOSPC: {again:?}");
    assert!(s.read(&oid("fill1"), 0, 10).is_ok(), "still readable");
    // Reopening checkpoints (a RocksDB flush), which needs a little free space: on a
    // still-full disk open either works or fails with the same clear `Full`.
    drop(s);
    match Store::open(d.path(), small) {
        Err(e) => {
            println!("reopen on the full disk: {e}");
            assert!(matches!(e, StoreError::Full { .. }), "{e:?}");
        }
        Ok(s) => {
            assert!(s.read(&oid("fill1"), 0, 10).is_ok());
            println!("reopened on the full disk");
        }
    }
}
