//! Golden vectors: fixed maps + inputs → fixed outputs, identical on every build and platform.
//!
//! If any of these change, placement changed: every existing cluster would move data (or, with
//! mixed versions, clients and OSDs would disagree on where objects live). That is a
//! placement-breaking change; do not "fix" the expected values without a migration plan.

mod common;

use basalt_placement::*;
use common::*;

fn racks_map() -> CrushMap {
    // Mixed weights, racks, an empty host and a zero-weight OSD.
    let mut m = CrushMap::new();
    let mut id = 0;
    for h in 0..6u32 {
        for i in 0..(1 + h % 3) {
            m.add_osd(id, &format!("node{h}"), WEIGHT_ONE / 2 * (1 + (h + i) % 4))
                .unwrap();
            id += 1;
        }
        m.move_host(&format!("node{h}"), Some(&format!("rack{}", h % 3)))
            .unwrap();
    }
    m.set_weight(3, 0).unwrap();
    m.add_osd(99, "spare", WEIGHT_ONE).unwrap();
    m.remove_osd(99).unwrap();
    m
}

fn snapshot(m: &CrushMap, p: &PoolPlacement, d: &impl DeviceStates, n: u32) -> Vec<Vec<OsdId>> {
    (0..n)
        .map(|seed| {
            map_pg(m, p, PgId { pool: p.id, seed }, d, None)
                .unwrap()
                .raw
        })
        .collect()
}

#[test]
fn golden_object_to_pg() {
    let p = PoolPlacement {
        id: 3,
        pg_num: 100,
        pgp_num: 100,
        size: 3,
        rule: DEFAULT_RULE,
    };
    let got: Vec<String> = [
        "",
        "a",
        "foo",
        "rbd_header.10a2",
        "rbd_data.10a2.0000000000000007",
    ]
    .iter()
    .map(|n| object_to_pg(&p, n).to_string())
    .chain(std::iter::once(
        object_to_pg_ns(&p, "ns", "foo").to_string(),
    ))
    .collect();
    println!("object_to_pg: {got:?}");
    assert_eq!(got, GOLDEN_OBJECTS, "placement-breaking change");
}

#[test]
fn golden_grid_default_rule() {
    let got = snapshot(&grid(5, 2, WEIGHT_ONE), &pool(16, 3), &AllUp, 16);
    println!("grid: {got:?}");
    assert_eq!(got, GOLDEN_GRID, "placement-breaking change");
}

#[test]
fn golden_racks_mixed_weights_and_reweights() {
    let st = States {
        reweight: [(0, 0), (5, WEIGHT_ONE / 2)].into(),
        down: [7].into(),
        ..States::default()
    };
    let p = PoolPlacement {
        id: 7,
        pg_num: 12,
        pgp_num: 8,
        size: 3,
        rule: DEFAULT_RULE,
    };
    let got = snapshot(&racks_map(), &p, &st, 12);
    println!("racks: {got:?}");
    assert_eq!(got, GOLDEN_RACKS, "placement-breaking change");
}

#[test]
fn golden_indep_with_holes() {
    let mut m = grid(4, 2, WEIGHT_ONE);
    m.set_rule(1, Rule::indep("ec")).unwrap();
    let st = States {
        reweight: [(2, 0), (3, 0)].into(),
        ..States::default()
    }; // host h1 all out
    let p = PoolPlacement {
        id: 2,
        pg_num: 8,
        pgp_num: 8,
        size: 4,
        rule: 1,
    };
    let got = snapshot(&m, &p, &st, 8);
    println!("indep: {got:?}");
    assert_eq!(got, GOLDEN_INDEP, "placement-breaking change");
}

#[test]
fn golden_large_cluster_digest() {
    // 1,000 OSDs: a digest over 4,096 PGs catches any drift in hashing, ln table or retries.
    let m = grid(100, 10, WEIGHT_ONE);
    let p = pool(4096, 3);
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    for v in snapshot(&m, &p, &AllUp, 4096) {
        for o in v {
            digest = (digest ^ o as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    println!("digest: {digest:#x}");
    assert_eq!(digest, GOLDEN_DIGEST, "placement-breaking change");
}

const GOLDEN_OBJECTS: [&str; 6] = ["3.50", "3.13", "3.3c", "3.2f", "3.20", "3.8"];
const GOLDEN_GRID: [&[OsdId]; 16] = [
    &[9, 7, 5],
    &[8, 7, 2],
    &[0, 5, 7],
    &[0, 5, 3],
    &[3, 1, 4],
    &[2, 8, 5],
    &[9, 5, 6],
    &[9, 3, 1],
    &[6, 9, 0],
    &[3, 5, 0],
    &[9, 2, 5],
    &[3, 7, 9],
    &[0, 6, 8],
    &[5, 6, 0],
    &[4, 2, 7],
    &[5, 1, 3],
];
// PGs 8..11 equal PGs 0..3: pgp_num 8 < pg_num 12 folds them onto their parents' CRUSH input.
const GOLDEN_RACKS: [&[OsdId]; 12] = [
    &[4, 10, 2],
    &[2, 9, 4],
    &[4, 1, 6],
    &[1, 6, 9],
    &[1, 8, 11],
    &[10, 6, 4],
    &[1, 4, 10],
    &[11, 1, 7],
    &[4, 10, 2],
    &[2, 9, 4],
    &[4, 1, 6],
    &[1, 6, 9],
];
const GOLDEN_INDEP: [&[OsdId]; 8] = [
    &[6, 5, 0, NONE],
    &[0, 5, 7, NONE],
    &[0, NONE, 5, 6],
    &[7, NONE, 0, 4],
    &[0, 6, NONE, 5],
    &[4, 6, NONE, 1],
    &[0, NONE, 6, 5],
    &[1, 5, 7, NONE],
];
const GOLDEN_DIGEST: u64 = 0x618383be9404880f;
