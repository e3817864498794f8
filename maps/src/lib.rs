//! The cluster maps every basalt daemon and client agrees on: the [`MonMap`]
//! and the [`OsdMap`] (OSDs with their reported use, CRUSH hierarchy, pools,
//! client blocklist, flags, the nearfull/backfillfull/full ratios), and the
//! [`Incremental`]s that move an `OsdMap` from one epoch to the next. Health
//! checks and every OSD's fullness are derived from a map alone.
//!
//! Owns the map data model, its encoding and the deterministic `apply` of an
//! incremental. It does not decide *when* maps change (that is the monitor's
//! policy) and does no IO. `apply` is total: a change naming something that no
//! longer exists is a no-op, so every monitor that applies the same committed
//! incremental reaches the same map, whatever the leader validated against.

mod health;
mod osdmap;

pub use health::{HealthCheck, HealthStatus, Severity};
pub use osdmap::*;

use serde::{de::DeserializeOwned, Serialize};

/// Map epoch: every committed change to a map is a new epoch.
pub type Epoch = u64;
pub use basalt_placement::OsdId;
pub type PoolId = u32;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MapError {
    #[error("pool '{0}' already exists")]
    PoolExists(String),
    #[error("pool '{0}' does not exist; list pools with `basalt pool ls`")]
    PoolNotFound(String),
    #[error("osd.{0} does not exist; list OSDs with `basalt osd tree`")]
    OsdNotFound(OsdId),
    #[error("osd.{0} is up; mark it down (stop the daemon) before removing it")]
    OsdStillUp(OsdId),
    #[error(
        "osd.{id} is named in the last activation of PG {pgs} (it may hold their only \
         complete copy, which peering waits for); wait until they are active+clean without it, \
         or give up its data with `basalt osd lost {id}`, then remove it"
    )]
    OsdStillNeeded { id: OsdId, pgs: String },
    #[error("invalid pool setting: {0}")]
    InvalidPool(String),
    #[error("unknown flag '{0}'; known flags: {known}", known = KNOWN_FLAGS.join(", "))]
    UnknownFlag(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("incremental for epoch {got} cannot apply to map epoch {have}")]
    EpochGap { have: Epoch, got: Epoch },
    #[error("cannot decode {what}: {message}")]
    Decode { what: &'static str, message: String },
}

/// Encodes a map, incremental or monitor value in basalt's wire/store format (postcard).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails on types serde cannot represent; our maps are plain data.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes bytes produced by [`encode`]; `what` names the thing in the error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, MapError> {
    postcard::from_bytes(bytes).map_err(|e| MapError::Decode {
        what,
        message: e.to_string(),
    })
}

/// The monitors of the cluster. Static for now: it comes from `cluster.toml`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MonMap {
    pub epoch: Epoch,
    pub fsid: String,
    pub mons: Vec<MonInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MonInfo {
    pub rank: u32,
    pub addr: String,
}
