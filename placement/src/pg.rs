//! Object → PG → up/acting sets.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hash::{hash32_2, hash_bytes};
use crate::{CrushMap, DeviceStates, OsdId, PlacementError, RuleId, MAX_POOL_SIZE, NONE};

/// A placement group: `seed` is the PG's index within its pool (`< pg_num`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PgId {
    pub pool: u32,
    pub seed: u32,
}

impl fmt::Display for PgId {
    /// Ceph's spelling, `{pool}.{seed:x}`, so operators can paste ids between tools.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:x}", self.pool, self.seed)
    }
}

impl FromStr for PgId {
    type Err = PlacementError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlacementError::ParsePgId {
            input: s.to_string(),
        };
        let (pool, seed) = s.split_once('.').ok_or_else(err)?;
        // from_str_radix accepts a leading '+', which Display never produces.
        if pool.is_empty() || seed.is_empty() || pool.starts_with('+') || seed.starts_with('+') {
            return Err(err());
        }
        Ok(PgId {
            pool: pool.parse().map_err(|_| err())?,
            seed: u32::from_str_radix(seed, 16).map_err(|_| err())?,
        })
    }
}

/// The pool fields placement needs (the full pool record lives in the OSDMap crate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPlacement {
    pub id: u32,
    /// Number of PGs objects are hashed into.
    pub pg_num: u32,
    /// Number of distinct CRUSH inputs; lags `pg_num` during a split so new PGs first map to
    /// their parent's OSDs and can be moved later.
    pub pgp_num: u32,
    pub size: u32,
    pub rule: RuleId,
}

/// Mask that covers `n`: next power of two ≥ n, minus one.
pub fn pg_mask(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::MAX >> (n - 1).leading_zeros()
    }
}

/// Ceph's stable_mod: like `x % b`, except that growing `b` only ever moves an input from seed
/// `s` to seed `s + 2^k`, i.e. PGs split, they never reshuffle.
pub fn stable_mod(x: u32, b: u32, bmask: u32) -> u32 {
    if x & bmask < b {
        x & bmask
    } else {
        x & (bmask >> 1)
    }
}

/// The PG that seed `seed` (of a pool grown to more than `old_pg_num` PGs) split from: the
/// seed its objects belonged to while the pool had `old_pg_num` PGs. A seed below
/// `old_pg_num` is its own parent.
pub fn split_parent(seed: u32, old_pg_num: u32) -> u32 {
    hash_to_seed(seed, old_pg_num)
}

/// The seed (PG number) placement hash `hash` maps to in a pool of `pg_num` PGs.
pub fn hash_to_seed(hash: u32, pg_num: u32) -> u32 {
    stable_mod(hash, pg_num, pg_mask(pg_num))
}

/// The seed of object `name` in `namespace` in a pool of `pg_num` PGs.
pub fn object_seed(namespace: &str, name: &str, pg_num: u32) -> u32 {
    hash_to_seed(object_hash(namespace, name), pg_num)
}

/// The new seeds `parent` splits into when its pool grows from `old_pg_num` to `new_pg_num`
/// PGs (ascending; empty when it does not split). Every object of `parent` maps, under
/// `new_pg_num`, either to `parent` itself or to one of these, because `stable_mod` only
/// ever moves an input from seed `s` to `s + 2^k`.
pub fn split_children(parent: u32, old_pg_num: u32, new_pg_num: u32) -> Vec<u32> {
    (old_pg_num..new_pg_num)
        .filter(|&s| split_parent(s, old_pg_num) == parent)
        .collect()
}

/// Placement hash of an object name in a namespace. An empty namespace hashes the bare name; a
/// non-empty one hashes `ns 0x1f name` so `("a", "bc")` and `("ab", "c")` differ.
pub fn object_hash(namespace: &str, name: &str) -> u32 {
    if namespace.is_empty() {
        hash_bytes(name.as_bytes())
    } else {
        let mut key = Vec::with_capacity(namespace.len() + 1 + name.len());
        key.extend_from_slice(namespace.as_bytes());
        key.push(0x1f);
        key.extend_from_slice(name.as_bytes());
        hash_bytes(&key)
    }
}

/// PG of object `name` (empty namespace). A pool with `pg_num` 0 is invalid; everything lands in
/// seed 0 and [`map_pg`] reports the pool error.
pub fn object_to_pg(pool: &PoolPlacement, name: &str) -> PgId {
    object_to_pg_ns(pool, "", name)
}

/// PG of object `name` in `namespace`.
pub fn object_to_pg_ns(pool: &PoolPlacement, namespace: &str, name: &str) -> PgId {
    PgId {
        pool: pool.id,
        seed: object_seed(namespace, name, pool.pg_num),
    }
}

/// The CRUSH input for a PG: PGs beyond `pgp_num` fold onto their parent's input, and the pool
/// id is mixed in so two pools do not put their PG n on the same OSDs.
pub fn pg_crush_input(pool: &PoolPlacement, pg: PgId) -> u32 {
    hash32_2(
        stable_mod(pg.seed, pool.pgp_num, pg_mask(pool.pgp_num)),
        pool.id,
    )
}

/// Where a PG lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PgMapping {
    /// CRUSH's answer, including down OSDs (they still "own" the data; marking them out moves it).
    pub raw: Vec<OsdId>,
    /// `raw` minus down OSDs (positional rules keep a [`NONE`] hole instead).
    pub up: Vec<OsdId>,
    pub up_primary: Option<OsdId>,
    /// `pg_temp` (its up members) if given and non-empty, else `up`.
    pub acting: Vec<OsdId>,
    pub acting_primary: Option<OsdId>,
    /// `size` minus the copies CRUSH could place: non-zero means the map cannot satisfy the pool
    /// (too few hosts, everything out or weight 0). Down OSDs do not count here; compare
    /// `up` with `raw` for that.
    pub short_by: u32,
}

fn validate_pool(crush: &CrushMap, pool: &PoolPlacement) -> Result<(), PlacementError> {
    let bad = |reason: &str| {
        Err(PlacementError::InvalidPool {
            pool: pool.id,
            reason: reason.to_string(),
        })
    };
    if pool.pg_num == 0 {
        return bad("pg_num is 0; set pg_num >= 1");
    }
    if pool.pgp_num == 0 || pool.pgp_num > pool.pg_num {
        return bad("pgp_num must be between 1 and pg_num");
    }
    if pool.size as usize > MAX_POOL_SIZE {
        return Err(PlacementError::SizeTooLarge {
            size: pool.size as usize,
            max: MAX_POOL_SIZE,
        });
    }
    if !crush.contains_rule(pool.rule) {
        return Err(PlacementError::UnknownRule { rule: pool.rule });
    }
    Ok(())
}

/// Map `pg` of `pool`: CRUSH → raw → up (drop down) → acting (`pg_temp`) → primaries.
pub fn map_pg(
    crush: &CrushMap,
    pool: &PoolPlacement,
    pg: PgId,
    devices: &impl DeviceStates,
    pg_temp: Option<&[OsdId]>,
) -> Result<PgMapping, PlacementError> {
    validate_pool(crush, pool)?;
    if pg.pool != pool.id {
        return Err(PlacementError::PoolMismatch { pg, pool: pool.id });
    }
    if pg.seed >= pool.pg_num {
        return Err(PlacementError::PgOutOfRange {
            pg,
            pg_num: pool.pg_num,
        });
    }
    let positional = crush.rule(pool.rule).is_some_and(|r| r.is_positional());
    let mut raw = Vec::with_capacity(pool.size as usize);
    crush.do_rule(
        pool.rule,
        pg_crush_input(pool, pg),
        pool.size as usize,
        devices,
        &mut raw,
    )?;
    let placed = raw.iter().filter(|&&o| o != NONE).count() as u32;
    let is_up = |o: OsdId| o != NONE && devices.exists(o) && devices.is_up(o);
    let up: Vec<OsdId> = if positional {
        raw.iter()
            .map(|&o| if is_up(o) { o } else { NONE })
            .collect()
    } else {
        raw.iter().copied().filter(|&o| is_up(o)).collect()
    };
    let first = |v: &[OsdId]| v.iter().copied().find(|&o| o != NONE);
    let up_primary = first(&up);
    // A pg_temp member that is down or gone cannot serve; Ceph drops those too.
    let acting = match pg_temp {
        Some(t) if !t.is_empty() => {
            let v: Vec<OsdId> = if positional {
                t.iter().map(|&o| if is_up(o) { o } else { NONE }).collect()
            } else {
                t.iter().copied().filter(|&o| is_up(o)).collect()
            };
            if v.iter().all(|&o| o == NONE) {
                up.clone()
            } else {
                v
            }
        }
        _ => up.clone(),
    };
    let acting_primary = first(&acting);
    Ok(PgMapping {
        short_by: pool.size.saturating_sub(placed),
        raw,
        up,
        up_primary,
        acting,
        acting_primary,
    })
}

/// PGs per OSD over the whole pool, counting `up` membership (what `basalt osd df` shows as PGS
/// before any pg_temp). Every OSD in the CRUSH map appears, with 0 if it holds nothing.
pub fn pg_distribution(
    crush: &CrushMap,
    pool: &PoolPlacement,
    devices: &impl DeviceStates,
) -> Result<BTreeMap<OsdId, u32>, PlacementError> {
    validate_pool(crush, pool)?;
    let mut counts: BTreeMap<OsdId, u32> = crush.osds().map(|o| (o, 0)).collect();
    for seed in 0..pool.pg_num {
        let m = map_pg(
            crush,
            pool,
            PgId {
                pool: pool.id,
                seed,
            },
            devices,
            None,
        )?;
        for o in m.up.into_iter().filter(|&o| o != NONE) {
            *counts.entry(o).or_insert(0) += 1;
        }
    }
    Ok(counts)
}
