//! Shared helpers for the integration tests (deterministic: no RNG crate, no clock).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use basalt_placement::{
    map_pg, CrushMap, DeviceStates, OsdId, PgId, PoolPlacement, DEFAULT_RULE, WEIGHT_ONE,
};

/// Device states with explicit overrides; everything not mentioned exists, is up and fully in.
#[derive(Clone, Default)]
pub struct States {
    pub down: BTreeSet<OsdId>,
    pub missing: BTreeSet<OsdId>,
    pub reweight: BTreeMap<OsdId, u32>,
}

impl DeviceStates for States {
    fn exists(&self, osd: OsdId) -> bool {
        !self.missing.contains(&osd)
    }
    fn is_up(&self, osd: OsdId) -> bool {
        !self.down.contains(&osd)
    }
    fn reweight(&self, osd: OsdId) -> u32 {
        self.reweight.get(&osd).copied().unwrap_or(WEIGHT_ONE)
    }
}

/// xorshift64*: a fixed-seed generator so "random" maps are the same on every run.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `hosts` hosts named h0.. with `per_host` OSDs each, ids host*per_host + i.
pub fn grid(hosts: u32, per_host: u32, weight: u32) -> CrushMap {
    let mut m = CrushMap::new();
    for h in 0..hosts {
        for i in 0..per_host {
            m.add_osd(h * per_host + i, &format!("h{h}"), weight)
                .unwrap();
        }
    }
    m
}

pub fn pool(pg_num: u32, size: u32) -> PoolPlacement {
    PoolPlacement {
        id: 1,
        pg_num,
        pgp_num: pg_num,
        size,
        rule: DEFAULT_RULE,
    }
}

/// Raw CRUSH results for every PG of the pool.
pub fn all_raw(m: &CrushMap, p: &PoolPlacement, d: &impl DeviceStates) -> Vec<Vec<OsdId>> {
    (0..p.pg_num)
        .map(|seed| {
            map_pg(m, p, PgId { pool: p.id, seed }, d, None)
                .unwrap()
                .raw
        })
        .collect()
}

pub fn counts(maps: &[Vec<OsdId>]) -> BTreeMap<OsdId, u64> {
    let mut c = BTreeMap::new();
    for v in maps {
        for &o in v {
            *c.entry(o).or_insert(0) += 1;
        }
    }
    c
}
