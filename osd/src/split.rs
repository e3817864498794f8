//! PG splitting: what one OSD does to its copy of a PG when the PG's pool grows `pg_num`.
//!
//! Ceph's way, kept: every member splits its own copy locally when it applies the map epoch
//! in which `pg_num` grew, before it serves that epoch, so no object crosses the network.
//! Placement's `stable_mod` only ever moves an object from seed `s` to a seed `s + 2^k`
//! (its [`split_children`]), and while `pgp_num` lags the children map to their parent's
//! OSDs, so every member of the parent holds a copy of each child right after the split, and
//! the children peer among the same members without a backfill. Raising `pgp_num` later moves
//! them through ordinary peering and backfill.
//!
//! What a split of one parent PG does, in **one store transaction** (atomic: a crash leaves
//! the copy either whole or split, and the layout record below says which):
//! - creates the children (where this OSD lacks them);
//! - moves each object whose hash now maps to a child into it — RocksDB keys only (onode,
//!   extent records, omap; xattrs live in the onode); the data blocks stay where they are
//!   ([`crate::store::Transaction::pg_split`]);
//! - moves each log entry to the PG of its object, and copies the dups to every child (a
//!   resent request is looked up in its object's PG);
//! - gives each child the parent's peering history: the same `les`, its share of the
//!   parent's `missing` list and backfill progress, and a `last_update_floor` of the
//!   parent's `last_update`, so the child's versions continue from the parent's (its log is a
//!   sparse share of the parent's, and the store orders a PG's log by sequence number);
//! - records, for the parent and each child, the `pg_num` the copy is laid out for
//!   ([`layout_key`]).
//!
//! The layout record, not the map epoch, drives splitting: an OSD that was down while
//! `pg_num` grew (once or several times) splits straight to the `pg_num` of the map it
//! comes back to, and one that crashed mid-way redoes just the parents not yet split.
//! A store written before splitting existed has no layout records; such a PG is taken to be
//! laid out for its pool's `pg_num` in the first map this OSD applies, which holds unless the
//! OSD was down across both its upgrade and a `pg_num` change.
//!
//! Stats: basalt keeps no per-PG object or byte counters (PG stats are derived from live
//! state, and the store's charged bytes are per OSD), so a split has none to divide.
//!
//! Cost and limit: the moved keys form one journal record, which may use at most half the
//! journal (64 MiB of the default 128 MiB): about 10,000 fully written 4 MiB objects move
//! per parent PG. A parent with more than that fails to split with a typed store error
//! and the OSD keeps the previous map (it serves nothing of the new epoch) rather than
//! serve a half-split PG; keeping PGs below that size is the operator's part for now.

use std::collections::BTreeMap;

use basalt_ops::{Eversion, LogEntry, OpError};
use basalt_placement::{object_seed, split_children, PgId};

use crate::peering::PgInfo;
use crate::pg::{self, ObjectName};
use crate::store::{Store, Transaction};

/// Meta key of the `pg_num` this OSD's copy of `pg` is laid out for (u32, big-endian).
pub fn layout_key(pg: PgId) -> Vec<u8> {
    format!("pg_num.{pg}").into_bytes()
}

/// The `pg_num` this OSD's copy of `pg` is laid out for, if recorded.
pub fn read_layout(store: &Store, pg: PgId) -> Result<Option<u32>, OpError> {
    let Some(v) = store.meta_get(&layout_key(pg)).map_err(pg::store_error)? else {
        return Ok(None);
    };
    let bytes: [u8; 4] = v[..].try_into().map_err(|_| {
        OpError::Io(format!(
            "pg {pg}: layout record of {} bytes, expected 4; the store's metadata is damaged",
            v.len()
        ))
    })?;
    Ok(Some(u32::from_be_bytes(bytes)))
}

/// Adds the layout record of `pg` to `txn`.
pub fn record_layout(txn: &mut Transaction, pg: PgId, pg_num: u32) {
    txn.meta_set(layout_key(pg), pg_num.to_be_bytes().to_vec());
}

/// Seed of object `name` when its pool has `pg_num` PGs.
fn seed_of(name: &ObjectName, pg_num: u32) -> u32 {
    object_seed(&name.0, &name.1, pg_num)
}

/// How one parent's log and info divide among it and its children. Pure.
#[derive(Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Child seeds, ascending.
    pub children: Vec<u32>,
    /// Log entries (by sequence) that move, and the child seed each goes to.
    pub log_moves: Vec<(u64, u32)>,
    /// The info each PG (parent included) has after the split, by seed.
    pub infos: BTreeMap<u32, PgInfo>,
}

/// Plans the split of `parent` (laid out for `old_pg_num` PGs) for `new_pg_num` PGs, from
/// its log and info.
pub fn plan(
    parent: PgId,
    old_pg_num: u32,
    new_pg_num: u32,
    log: &[LogEntry],
    info: &PgInfo,
) -> SplitPlan {
    let children = split_children(parent.seed, old_pg_num, new_pg_num);
    let log_moves = log
        .iter()
        .filter_map(|e| {
            let seed = object_seed(&e.namespace, &e.object, new_pg_num);
            (seed != parent.seed).then_some((e.version.seq, seed))
        })
        .collect();
    let last_update = log
        .last()
        .map_or(Eversion::ZERO, |e| e.version)
        .max(info.last_update_floor);
    let infos = std::iter::once(parent.seed)
        .chain(children.iter().copied())
        .map(|seed| {
            let mine = |name: &ObjectName| seed_of(name, new_pg_num) == seed;
            let child_info = PgInfo {
                les: info.les,
                // A cursor bounds a listing-order range the copy already equals the
                // authority's in; the child's objects in it are a subset, so it still holds.
                backfill: info.backfill.clone(),
                missing: info.missing.iter().filter(|n| mine(n)).cloned().collect(),
                last_update_floor: last_update,
            };
            (seed, child_info)
        })
        .collect();
    SplitPlan {
        children,
        log_moves,
        infos,
    }
}

/// The transaction that splits this OSD's copy of `parent` from `old_pg_num` to
/// `new_pg_num` PGs (see the module docs). The caller makes sure nothing else writes to the
/// parent meanwhile.
pub fn split_txn(
    store: &Store,
    parent: PgId,
    old_pg_num: u32,
    new_pg_num: u32,
) -> Result<Transaction, OpError> {
    let log = pg::read_log(store, parent)?;
    let info = pg::read_info(store, parent)?;
    let SplitPlan {
        children,
        log_moves,
        infos,
    } = plan(parent, old_pg_num, new_pg_num, &log, &info);
    let mut txn = Transaction::new();
    for &seed in &children {
        let child = PgId {
            pool: parent.pool,
            seed,
        };
        if !store.pg_exists(child).map_err(pg::store_error)? {
            txn.pg_create(child);
        }
    }
    txn.pg_split(parent, new_pg_num, children, log_moves);
    for (seed, info) in &infos {
        let id = PgId {
            pool: parent.pool,
            seed: *seed,
        };
        txn.pg_info_set(id, basalt_ops::encode(info));
        record_layout(&mut txn, id, new_pg_num);
    }
    Ok(txn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peering::tests::entry;

    #[test]
    fn the_plan_routes_each_entry_to_its_objects_pg_and_keeps_the_history() {
        let parent = PgId { pool: 1, seed: 2 };
        let names: Vec<String> = (0..)
            .map(|i| format!("o{i}"))
            .filter(|n| seed_of(&(String::new(), n.clone()), 4) == 2)
            .take(40)
            .collect();
        let log: Vec<LogEntry> = names
            .iter()
            .enumerate()
            .map(|(i, n)| entry(4, 100 + i as u64, n))
            .collect();
        let info = PgInfo {
            les: 7,
            backfill: None,
            missing: names
                .iter()
                .take(10)
                .map(|n| (String::new(), n.clone()))
                .collect(),
            last_update_floor: Eversion::ZERO,
        };
        let p = plan(parent, 4, 16, &log, &info);
        assert_eq!(p.children, vec![6, 10, 14]);
        for e in &log {
            let seed = object_seed("", &e.object, 16);
            let moved = p.log_moves.iter().find(|(v, _)| *v == e.version.seq);
            assert_eq!(moved.map(|(_, s)| *s), (seed != 2).then_some(seed));
        }
        let last = log.last().map(|e| e.version).unwrap();
        let mut missing = 0;
        for (seed, i) in &p.infos {
            assert_eq!(i.les, 7, "pg {seed} keeps the parent's les");
            assert_eq!(
                i.last_update_floor, last,
                "versions continue from the parent's"
            );
            assert!(i.missing.iter().all(|n| seed_of(n, 16) == *seed));
            missing += i.missing.len();
        }
        assert_eq!(
            missing, 10,
            "each missing object is listed in exactly one PG"
        );
    }
}
