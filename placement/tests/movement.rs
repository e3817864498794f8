//! Data movement when the cluster changes.
//!
//! How we count: per PG we compare the *sets* of raw OSDs before and after. A replica that only
//! changes position (firstn shifts later copies up when an earlier one changes) is a role change,
//! not data movement, so positions are not compared. `gained = new \ old` is the number of
//! copies that must be written somewhere new; summed over PGs it is "moved placements". The
//! theoretical minimum is the placements the touched OSD had before (removal / out) or has after
//! (addition), or the change in its count (weight change).
//!
//! A move "between two untouched OSDs" is a PG in which an OSD other than the touched one lost
//! a copy *and* an OSD other than the touched one gained one. What CRUSH guarantees, and what is
//! asserted exactly:
//! - a PG that involves neither the touched OSD (nor, for CRUSH-weight changes, its host) before
//!   or after does not change at all;
//! - within one straw2 bucket a weight change moves inputs only onto or off that item
//!   (`mapper` unit tests).
//!
//! What CRUSH does *not* guarantee, and is measured and bounded instead of asserted zero: when
//! the touched OSD was drawn for two retry slots of one PG, `firstn` re-numbers the retries and
//! one untouched copy can move too. With 12 single-OSD hosts and size 3 that is ~5 % of the PGs
//! that involve the touched OSD (it is drawn for a second retry slot in roughly size/N of them);
//! those moves are included in the moved/minimum ratio, which stays ≤ 1.3.

mod common;

use std::collections::BTreeSet;

use basalt_placement::*;
use common::*;

#[derive(Debug, Default)]
struct Diff {
    moved: u64,
    /// PGs where an untouched OSD lost a copy and an untouched OSD gained one.
    untouched_moves: u64,
    /// PGs that changed although they involve no touched OSD before or after.
    changed_uninvolved: u64,
}

fn diff(old: &[Vec<OsdId>], new: &[Vec<OsdId>], touched: &dyn Fn(OsdId) -> bool) -> Diff {
    let mut d = Diff::default();
    for (o, n) in old.iter().zip(new) {
        let (os, ns): (BTreeSet<_>, BTreeSet<_>) = (o.iter().collect(), n.iter().collect());
        let gained: Vec<OsdId> = ns.difference(&os).map(|&&x| x).collect();
        let lost: Vec<OsdId> = os.difference(&ns).map(|&&x| x).collect();
        d.moved += gained.len() as u64;
        if gained.iter().any(|&x| !touched(x)) && lost.iter().any(|&x| !touched(x)) {
            d.untouched_moves += 1;
        }
        let involved = o.iter().chain(n).any(|&x| touched(x));
        if !involved && o != n {
            d.changed_uninvolved += 1;
        }
    }
    d
}

const PGS: u32 = 20_000;

fn check(what: &str, d: &Diff, minimum: u64, max_ratio: f64, pgs_with_touched: u64) {
    let ratio = d.moved as f64 / minimum as f64;
    println!(
        "{what}: moved {} placements, minimum {minimum}, ratio {ratio:.3}, untouched->untouched PGs {} of {pgs_with_touched} involving the OSD",
        d.moved, d.untouched_moves
    );
    assert_eq!(d.changed_uninvolved, 0, "{what}: an uninvolved PG moved");
    assert!(ratio <= max_ratio, "{what}: ratio {ratio:.3} > {max_ratio}");
    // firstn cascades (see module docs): measured 4-6 % of the involved PGs with 12 OSDs and
    // size 3, falling as N grows; bounded at 10 %. They are already included in `ratio`.
    assert!(
        d.untouched_moves * 10 <= pgs_with_touched.max(1),
        "{what}: {} untouched moves",
        d.untouched_moves
    );
}

fn involving(maps: &[Vec<OsdId>], osd: OsdId) -> u64 {
    maps.iter().filter(|v| v.contains(&osd)).count() as u64
}

/// One OSD per host: the OSD is the failure domain, so removal/addition is exactly straw2's case.
#[test]
fn remove_and_add_one_of_n_osds() {
    let p = pool(PGS, 3);
    for n in [12u32, 24, 48] {
        let full = grid(n, 1, WEIGHT_ONE);
        let before = all_raw(&full, &p, &AllUp);
        for victim in [0, n / 2, n - 1] {
            let mut m = full.clone();
            m.remove_osd(victim).unwrap();
            let after = all_raw(&m, &p, &AllUp);
            let d = diff(&before, &after, &|o| o == victim);
            let had = counts(&before)[&victim];
            check(&format!("remove osd.{victim} of {n}"), &d, had, 1.3, had);
            // And adding it back is the mirror image.
            let d = diff(&after, &before, &|o| o == victim);
            check(&format!("add osd.{victim} to {}", n - 1), &d, had, 1.3, had);
        }
        // A brand-new OSD on a brand-new host.
        let mut m = full.clone();
        m.add_osd(n, "new-host", WEIGHT_ONE).unwrap();
        let after = all_raw(&m, &p, &AllUp);
        let d = diff(&before, &after, &|o| o == n);
        let gets = counts(&after)[&n];
        check(
            &format!("add osd.{n} to {n}"),
            &d,
            gets,
            1.3,
            involving(&after, n),
        );
    }
}

/// Marking an OSD out (reweight 0) does not touch CRUSH weights, so even with several OSDs per
/// host only the PGs that used it move, and they go everywhere, not just to its host siblings.
#[test]
fn marking_out_moves_only_that_osds_pgs() {
    let p = pool(PGS, 3);
    let m = grid(8, 4, WEIGHT_ONE);
    let before = all_raw(&m, &p, &AllUp);
    for victim in [0u32, 13, 31] {
        let st = States {
            reweight: [(victim, 0)].into(),
            ..States::default()
        };
        let after = all_raw(&m, &p, &st);
        let d = diff(&before, &after, &|o| o == victim);
        let had = counts(&before)[&victim];
        check(&format!("out osd.{victim} of 32 (8x4)"), &d, had, 1.3, had);
        // Half-out: only a share of its PGs leave, and only its PGs.
        let st = States {
            reweight: [(victim, WEIGHT_ONE / 2)].into(),
            ..States::default()
        };
        let half = all_raw(&m, &p, &st);
        let d = diff(&before, &half, &|o| o == victim);
        let left = had - counts(&half)[&victim];
        assert!(
            (had / 3..had * 2 / 3).contains(&left),
            "reweight 0.5 shed {left} of {had}"
        );
        check(&format!("reweight 0.5 osd.{victim}"), &d, left, 1.3, had);
    }
}

/// CRUSH-weight change of one OSD: with one OSD per host, data moves only onto / off it.
#[test]
fn weight_change_moves_only_to_or_from_that_osd() {
    let p = pool(PGS, 3);
    let m = grid(16, 1, WEIGHT_ONE);
    let before = all_raw(&m, &p, &AllUp);
    let had = counts(&before)[&5];
    for (w, label) in [(WEIGHT_ONE * 3 / 2, "up"), (WEIGHT_ONE / 2, "down")] {
        let mut m2 = m.clone();
        m2.set_weight(5, w).unwrap();
        let after = all_raw(&m2, &p, &AllUp);
        let d = diff(&before, &after, &|o| o == 5);
        let now = counts(&after)[&5];
        let need = had.abs_diff(now);
        // Direction: weight up only ever adds copies of osd.5, weight down only removes them.
        for (o, n) in before.iter().zip(&after) {
            if label == "up" {
                assert!(!o.contains(&5) || n.contains(&5), "{o:?} -> {n:?}");
            } else {
                assert!(o.contains(&5) || !n.contains(&5), "{o:?} -> {n:?}");
            }
        }
        check(
            &format!("weight {label} osd.5"),
            &d,
            need,
            1.3,
            involving(&before, 5).max(involving(&after, 5)),
        );
    }
}

/// With several OSDs per host a CRUSH-weight change also changes the host's weight: PGs move
/// between that host and the others, so untouched OSDs of the same host move too. This is
/// CRUSH's hierarchy, not a bug; what still holds exactly is that PGs touching neither that host
/// before nor after do not change. Expected overhead: removing 1 of m equal OSDs from a host moves
/// about `(2 - 1/m)` times the minimum per replica slot (the host sheds ~1/m of its PGs, mostly
/// from the siblings, while the victim's remaining PGs refill the siblings) — ~1.7x for 8 hosts
/// x 4 — plus host-level firstn cascades, which are frequent with only 8 hosts for 3 copies.
/// Measured: 1.94x. The 1.3x bound of the other tests is therefore *not* met here; this test pins
/// the containment property and keeps the overhead from silently growing. Operators avoid it the
/// Ceph way: mark the OSD out first (reweight, exactly minimal, see above).
#[test]
fn removing_an_osd_from_a_multi_osd_host_is_contained_to_that_host() {
    let p = pool(PGS, 3);
    let m = grid(8, 4, WEIGHT_ONE);
    let before = all_raw(&m, &p, &AllUp);
    let victim = 9u32; // host h2 = osds 8..12
    let host: Vec<OsdId> = (8..12).collect();
    let mut m2 = m.clone();
    m2.remove_osd(victim).unwrap();
    let after = all_raw(&m2, &p, &AllUp);
    let d = diff(&before, &after, &|o| host.contains(&o));
    let had = counts(&before)[&victim];
    let ratio = d.moved as f64 / had as f64;
    println!(
        "remove osd.{victim} from a 4-OSD host: moved {} / minimum {had} = {ratio:.3}",
        d.moved
    );
    assert_eq!(d.changed_uninvolved, 0, "a PG not touching the host moved");
    assert!(
        ratio <= 2.1,
        "ratio {ratio:.3} above the measured CRUSH overhead"
    );
}
