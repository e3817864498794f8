//! Object maps computed from the objects instead of kept: what `rbd object-map rebuild`
//! stores, and what `rbd du` counts for an image without valid maps.
//!
//! Each data object's snapshot records (`list_snaps`) say which version of it every
//! snapshot and the head read; a point's state is `Nonexistent` without a version, `Exists`
//! (changed) when its version differs from the previous point's, `ExistsClean` otherwise —
//! exactly the bits fast-diff keeps as writes happen.

use futures::{StreamExt, TryStreamExt};

use super::{ObjectMap, ObjectState};
use crate::backend::{BackendError, ObjectBackend};
use crate::diff::version_at;
use crate::image::{data_objects_in, OBJECT_CONCURRENCY};
use crate::layout;
use crate::rbd::Progress;
use crate::snap::SnapInfo;

/// One point in an image's history: a snapshot (`Some(id)`) or the head, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Point {
    pub snap: Option<u64>,
    pub size: u64,
}

/// An image's points, oldest first: its snapshots (`snaps`, sorted here by id) and the
/// head of `head_size` bytes.
pub(crate) fn points(snaps: &mut [SnapInfo], head_size: u64) -> Vec<Point> {
    snaps.sort_by_key(|s| s.id);
    snaps
        .iter()
        .map(|s| Point {
            snap: Some(s.id),
            size: s.size,
        })
        .chain([Point {
            snap: None,
            size: head_size,
        }])
        .collect()
}

/// The maps of `points` (oldest first, the head last if present) of the image whose data
/// objects are `prefix.<n>`, read through `data` (the pool, at no snapshot).
pub(crate) async fn scan(
    data: &dyn ObjectBackend,
    prefix: &str,
    order: u8,
    points: &[Point],
    progress: Progress<'_>,
) -> Result<Vec<ObjectMap>, BackendError> {
    let count = |p: &Point| layout::num_objects(p.size, order);
    let objects = points.iter().map(count).max().unwrap_or(0);
    // Listing the pool misses objects whose head is gone but whose clones a snapshot
    // still reads, so with snapshots every object number is asked.
    let candidates = if points.iter().any(|p| p.snap.is_some()) {
        (0..objects).collect()
    } else {
        data_objects_in(data, prefix, 0, objects).await?
    };
    let total = candidates.len() as u64;
    let mut maps: Vec<ObjectMap> = points.iter().map(|p| ObjectMap::new(count(p))).collect();
    let mut done = 0;
    let mut listings = futures::stream::iter(candidates.into_iter().map(|n| async move {
        match data.list_snaps(&layout::data_oid(prefix, n)).await {
            Ok(l) => Ok((n, Some(l))),
            Err(BackendError::NotFound(_)) => Ok((n, None)),
            Err(e) => Err(e),
        }
    }))
    .buffer_unordered(OBJECT_CONCURRENCY);
    while let Some((n, listing)) = listings.try_next().await? {
        let mut previous = None;
        for (k, p) in points.iter().enumerate() {
            let version = listing.as_ref().and_then(|l| version_at(l, p.snap));
            let state = match version {
                None => ObjectState::Nonexistent,
                Some(_) if k > 0 && version == previous => ObjectState::ExistsClean,
                Some(_) => ObjectState::Exists,
            };
            maps[k].set(n, state);
            previous = version;
        }
        done += 1;
        progress(done, total);
    }
    Ok(maps)
}
