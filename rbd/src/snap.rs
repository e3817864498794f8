//! Image snapshots as the header records them.
//!
//! Each snapshot is a self-managed snapshot id of the pool (allocated by the monitors), kept
//! in the header's omap as `snapshot_<id as 16 hex>` → [`SnapInfo`] (postcard), and the
//! image's write context as `snap_context` → the pool-level [`SnapContext`]: `seq` is the
//! newest id this image ever allocated and `snaps` its live snapshots, newest first. Every
//! data-object write carries that context, so the OSDs preserve what it changes for the
//! snapshots (see `basalt_osd::snaps`). A snapshot is created under the image's exclusive
//! lock: taking the lock from a writer makes it finish its in-flight writes first, so the
//! snapshot holds exactly the writes acknowledged before it (crash-consistent), and the
//! writer's next write takes the lock back and reads the new context first.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::SnapContext;

/// The header key of the image's write context.
pub const SNAP_CONTEXT_KEY: &str = "snap_context";
const SNAPSHOT_PREFIX: &str = "snapshot_";

/// One snapshot of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapInfo {
    pub id: u64,
    pub name: String,
    /// The image size when the snapshot was taken.
    pub size: u64,
    /// A protected snapshot cannot be removed (Ceph protects the parents of clones).
    pub protected: bool,
    /// Unix ms.
    pub created_ms: u64,
}

pub fn snapshot_key(id: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{id:016x}")
}

pub fn is_snapshot_key(k: &str) -> bool {
    k.starts_with(SNAPSHOT_PREFIX)
}

/// Checks a snapshot name: what `POOL/IMAGE@SNAP` can carry.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 {
        return Err("a snapshot name must be 1..=256 bytes".into());
    }
    if name.contains(['/', '@']) || name.chars().any(char::is_control) {
        return Err(format!(
            "snapshot name {name:?} must not contain '/', '@' or control characters"
        ));
    }
    Ok(())
}

/// The snapshots among a header's omap entries, oldest first.
pub fn infos_in(entries: &[(String, Bytes)]) -> Result<Vec<SnapInfo>, String> {
    let mut out: Vec<SnapInfo> = entries
        .iter()
        .filter(|(k, _)| is_snapshot_key(k))
        .map(|(k, v)| postcard::from_bytes(v).map_err(|e| format!("header key {k}: {e}")))
        .collect::<Result<_, _>>()?;
    out.sort_by_key(|s| s.id);
    Ok(out)
}

/// The write context in a header's omap values (an image never snapshotted has none).
pub fn context_in(m: &BTreeMap<String, Bytes>) -> Result<SnapContext, String> {
    match m.get(SNAP_CONTEXT_KEY) {
        Some(b) => postcard::from_bytes(b).map_err(|e| format!("header key snap_context: {e}")),
        None => Ok(SnapContext::default()),
    }
}

/// The write context for the live snapshots `infos` with `seq` the newest id allocated.
pub fn context_of(seq: u64, infos: &[SnapInfo]) -> SnapContext {
    let mut snaps: Vec<u64> = infos.iter().map(|s| s.id).collect();
    snaps.sort_unstable_by(|a, b| b.cmp(a));
    SnapContext { seq, snaps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_contexts() {
        assert!(check_name("before-upgrade").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a@b").is_err());
        assert!(check_name("a/b").is_err());
        let infos = vec![
            SnapInfo {
                id: 3,
                name: "a".into(),
                size: 1,
                protected: false,
                created_ms: 0,
            },
            SnapInfo {
                id: 9,
                name: "b".into(),
                size: 1,
                protected: false,
                created_ms: 0,
            },
        ];
        let c = context_of(9, &infos);
        assert_eq!(c.snaps, vec![9, 3]);
        assert!(c.validate().is_ok());
        let entries: Vec<(String, Bytes)> = infos
            .iter()
            .rev()
            .map(|i| (snapshot_key(i.id), crate::layout::encode(i)))
            .chain([("size".to_string(), Bytes::from_static(b"x"))])
            .collect();
        assert_eq!(infos_in(&entries).expect("decode"), infos);
    }
}
