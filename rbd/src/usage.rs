//! `rbd du`: how much of an image and of each of its snapshots is stored.
//!
//! With valid object maps (`object-map` + `fast-diff`), it reads one small map per snapshot
//! and the head — a 10 GiB image's map is 640 bytes — and counts, per point, the objects
//! written since the previous point (Ceph's fast-diff `du`). Without them it computes the
//! same maps from every object's snapshot records ([`crate::object_map::scan`]) and says so.

use serde::Serialize;

use crate::error::{RbdError, Result};
use crate::image::{read_header, read_id, read_snapshots};
use crate::layout;
use crate::object_map::scan::{self, scan};
use crate::object_map::{self, DuRow, ObjectMap};
use crate::rbd::{Progress, Rbd};

/// What `rbd du` reports for one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskUsage {
    pub image: String,
    /// Each snapshot, oldest first, then the head.
    pub rows: Vec<DuRow>,
    /// Whether the kept object maps answered (else every object was asked).
    pub from_object_map: bool,
}

impl DiskUsage {
    /// The image's provisioned size (the head's) and the bytes all its rows use.
    pub fn total(&self) -> (u64, u64) {
        let provisioned = self.rows.last().map_or(0, |r| r.provisioned);
        (provisioned, self.rows.iter().map(|r| r.used).sum())
    }
}

impl Rbd {
    /// Space image `name` and its snapshots use. `progress` is called only when the object
    /// maps cannot answer and every object is asked.
    pub async fn du(&self, name: &str, progress: Progress<'_>) -> Result<DiskUsage> {
        let b = self.backend().as_ref();
        let id = read_id(b, name).await?;
        let header_oid = layout::header_oid(&id);
        let header = read_header(b, name, &header_oid).await?;
        let mut snaps = read_snapshots(b, name, &header_oid).await?;
        let points = scan::points(&mut snaps, header.size);
        let mut maps = None;
        if object_map::usable(header.features, header.flags) {
            match object_map::read_points(b, &id, header.order, &points).await? {
                Ok(read) => maps = Some(read),
                Err(why) => {
                    tracing::info!(image = name, %why, "object map unusable: asking every object")
                }
            }
        }
        let from_object_map = maps.is_some();
        let maps: Vec<ObjectMap> = match maps {
            Some(m) => m,
            None => scan(b, &header.object_prefix, header.order, &points, progress)
                .await
                .map_err(RbdError::from)?,
        };
        let rows = points
            .iter()
            .zip(&maps)
            .enumerate()
            .map(|(k, (p, m))| DuRow {
                snap: p
                    .snap
                    .and_then(|id| snaps.iter().find(|s| s.id == id))
                    .map(|s| s.name.clone()),
                provisioned: p.size,
                used: object_map::used_bytes(m, p.size, header.order, k == 0),
            })
            .collect();
        Ok(DiskUsage {
            image: name.to_string(),
            rows,
            from_object_map,
        })
    }
}
