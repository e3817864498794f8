//! Clones (layering): a child image reads through to a protected snapshot of its parent
//! until it writes.
//!
//! The child's header holds `parent` → [`ParentSpec`] (the parent's pool, image id and
//! snapshot, and the *overlap*: how much of the child still maps onto the parent). The
//! parent's header lists its children as `child_<snap id as 16 hex>_<pool>_<child id>` →
//! [`ChildRef`], so a snapshot with children can neither be unprotected nor removed.
//!
//! Reads of a child object that does not exist go to the parent's object at the snapshot
//! (clamped to the overlap). The first write to such an object copies the parent's object
//! up first, with an exclusive create (`ObjectBackend::copyup`): a copy-up never lands on
//! what the child already wrote. A discard inside the overlap leaves an empty object rather
//! than removing it, so the parent's data does not show through again. `flatten` copies
//! every object up and drops the link. Child and parent have the same object size.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The child header key of its parent link.
pub const PARENT_KEY: &str = "parent";
const CHILD_PREFIX: &str = "child_";

/// Where a clone's unwritten data comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentSpec {
    pub pool: String,
    pub image_id: String,
    /// The parent's name when the clone was made (for display; the id is what counts).
    pub image_name: String,
    pub snap_id: u64,
    pub snap_name: String,
    /// Bytes of the child that still map onto the parent (the snapshot's size, lowered by
    /// shrinking the child).
    pub overlap: u64,
}

/// A clone as its parent's header lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildRef {
    pub pool: String,
    pub image_id: String,
    pub image_name: String,
}

pub fn child_key(snap_id: u64, pool: &str, child_id: &str) -> String {
    format!("{CHILD_PREFIX}{snap_id:016x}_{pool}_{child_id}")
}

/// The children of snapshot `snap_id` among a header's omap entries.
pub fn children_in(entries: &[(String, Bytes)], snap_id: u64) -> Result<Vec<ChildRef>, String> {
    let prefix = format!("{CHILD_PREFIX}{snap_id:016x}_");
    entries
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| postcard::from_bytes(v).map_err(|e| format!("header key {k}: {e}")))
        .collect()
}

pub fn parent_in(
    m: &std::collections::BTreeMap<String, Bytes>,
) -> Result<Option<ParentSpec>, String> {
    m.get(PARENT_KEY)
        .map(|b| postcard::from_bytes(b).map_err(|e| format!("header key parent: {e}")))
        .transpose()
}
