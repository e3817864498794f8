//! # basalt-placement: where every object lives
//!
//! A pure, deterministic CRUSH subset shared by clients, OSDs and monitors. Given the same
//! [`CrushMap`], pool and device states, every process computes the same OSDs for an object
//! without asking anyone. This crate owns:
//!
//! - the hierarchy (root `default` → optional racks → hosts → OSDs) with 16.16 CRUSH weights,
//!   straw2 buckets only;
//! - rules (`take` / `choose[leaf] firstn|indep N type T` / `emit`) and the mapper with Ceph's
//!   "optimal" retry semantics (choose_total_tries 50, chooseleaf_descend_once, vary_r 1,
//!   stable 1);
//! - object name → PG (`hash` + `stable_mod`, so raising `pg_num` splits PGs) and PG → raw → up →
//!   acting → primary;
//! - the integer hash ([`hash`], Jenkins lookup3) and fixed-point log table ([`ln`]): no floating
//!   point reaches a placement, so results are bit-identical on every build and platform.
//!
//! It does not own device liveness or reweights (the OSDMap crate supplies them through
//! [`DeviceStates`]) nor pools (only the [`PoolPlacement`] fields placement needs).
//!
//! ## Why not `consistent_hash` / `rendezvous_hash`
//! `consistent_hash` is a flat virtual-node ring: no hierarchy, so no failure domains (nothing
//! stops two copies landing on one host), no reweight/out semantics, weights only as vnode counts,
//! and it hashes through `std::hash::Hash`, whose output Rust does not promise to keep stable
//! across versions or platforms. `rendezvous_hash` / HRW crates do the same math as one straw2
//! bucket but have no hierarchy, retries or stable-hash contract. The placement function is the
//! one piece every node must agree on forever, so it is small, owned and pinned by golden tests.
//!
//! ## Deviations from Ceph (deliberate, placement-defining)
//! - Hash: lookup3 with basalt's own seed (see [`hash`]); object names use lookup3 `hashlittle`
//!   rather than blake3 (a 32-bit seed needs no cryptographic strength; no extra dependency).
//! - straw2 draws use the midpoint `(2u+1)/2^17` of each 16-bit hash interval (see [`ln`]), and
//!   compare `neg_log2 × (u64::MAX / weight)` instead of dividing; ties go to the lower item id.
//! - A bucket whose items all have weight 0 yields nothing (Ceph would return its first item):
//!   weight 0 never wins, so "everything weight 0" is a short mapping, reported in
//!   [`PgMapping::short_by`].
//!
//! ## Movement properties (what the tests pin)
//! A straw2 draw depends only on `(x, item, r, own weight)`, so inside one bucket a weight change
//! moves inputs only onto or off that item. Two CRUSH-inherent effects on top of that are
//! measured in `tests/movement.rs` rather than hidden: changing an OSD's CRUSH weight also
//! changes its host's weight (so some PGs move between that host and others, including from the
//! host's untouched OSDs), and `firstn` retries can cascade when the touched OSD was hit twice.
//! Marking an OSD out (reweight) does not change host weights and moves only PGs that used it.

pub mod hash;
pub mod ln;
mod map;
mod mapper;
mod pg;

pub use map::{ChooseMode, CrushMap, NodeKind, Rule, RuleStep, TreeNode, ROOT_NAME};
pub use mapper::CHOOSE_TOTAL_TRIES;
pub use pg::{
    hash_to_seed, map_pg, object_hash, object_seed, object_to_pg, object_to_pg_ns, pg_crush_input,
    pg_distribution, pg_mask, split_children, split_parent, stable_mod, PgId, PgMapping,
    PoolPlacement,
};

pub type OsdId = u32;
pub type RuleId = u32;

/// 1.0 in 16.16 fixed point, for both CRUSH weight and reweight.
pub const WEIGHT_ONE: u32 = 0x10000;
/// "replicated_rule": `take default; chooseleaf firstn 0 type host; emit`.
pub const DEFAULT_RULE: RuleId = 0;
/// Hole marker in positional (`indep`) results: this position has no OSD.
pub const NONE: OsdId = 0x7fff_ffff;
/// Largest valid OSD id; the two ids above it are reserved as internal markers.
pub const MAX_OSD_ID: OsdId = NONE - 2;
/// Largest pool size a rule may be asked for; the mapper keeps working sets on the stack.
pub const MAX_POOL_SIZE: usize = 32;

/// Per-OSD state the map function needs from the OSDMap (which lives in another crate).
pub trait DeviceStates {
    fn exists(&self, osd: OsdId) -> bool;
    fn is_up(&self, osd: OsdId) -> bool;
    /// 0 = out, [`WEIGHT_ONE`] = fully in; in between keeps that fraction of the OSD's inputs.
    fn reweight(&self, osd: OsdId) -> u32;
}

/// Every OSD exists, is up and fully in: for tools and tests that only need CRUSH's view.
#[derive(Clone, Copy, Debug, Default)]
pub struct AllUp;

impl DeviceStates for AllUp {
    fn exists(&self, _: OsdId) -> bool {
        true
    }
    fn is_up(&self, _: OsdId) -> bool {
        true
    }
    fn reweight(&self, _: OsdId) -> u32 {
        WEIGHT_ONE
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("osd.{osd} is not in the CRUSH map; add it with add_osd first")]
    UnknownOsd { osd: OsdId },
    #[error("osd.{osd} is already under host {existing:?}; remove it before adding it under host {requested:?}")]
    OsdOnOtherHost {
        osd: OsdId,
        existing: String,
        requested: String,
    },
    #[error("osd id {osd} is reserved; OSD ids must be at most {max}")]
    InvalidOsdId { osd: OsdId, max: OsdId },
    #[error("bucket name {name:?} is already used by a {kind}; pick another name")]
    NameInUse { name: String, kind: NodeKind },
    #[error("no bucket named {name:?} in the CRUSH map; check `basalt osd tree`")]
    UnknownBucket { name: String },
    #[error("host {host:?} still holds {count} OSD(s); remove them first")]
    HostNotEmpty { host: String, count: usize },
    #[error("CRUSH rule {rule} does not exist; use an existing rule (default is {DEFAULT_RULE})")]
    UnknownRule { rule: RuleId },
    #[error("invalid CRUSH rule {rule:?}: {reason}")]
    InvalidRule { rule: String, reason: String },
    #[error("pool {pool} is invalid for placement: {reason}")]
    InvalidPool { pool: u32, reason: String },
    #[error("pool size {size} is larger than the supported maximum {max}; lower the pool size")]
    SizeTooLarge { size: usize, max: usize },
    #[error("pg {pg} does not belong to pool {pool}")]
    PoolMismatch { pg: PgId, pool: u32 },
    #[error("pg {pg} does not exist: pool has pg_num {pg_num}")]
    PgOutOfRange { pg: PgId, pg_num: u32 },
    #[error("total CRUSH weight would be {total:#x}, above the 16.16 limit {max:#x}; use smaller weights")]
    WeightOverflow { total: u64, max: u32 },
    #[error("invalid CRUSH map encoding: {reason}")]
    InvalidMap { reason: String },
    #[error("invalid pg id {input:?}: expected POOL.SEED with SEED in hex, e.g. 1.2f")]
    ParsePgId { input: String },
}
