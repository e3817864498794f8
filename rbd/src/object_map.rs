//! The object map: which of an image's data objects exist, kept per image and per snapshot
//! so `rbd du` and diffs need not ask every object (Ceph's `object-map` and `fast-diff`
//! features).
//!
//! **Format.** Object `rbd_object_map.<image id>` (the head) and
//! `rbd_object_map.<image id>.<snap id as 16 hex>` (a snapshot) hold 2 bits per data object,
//! four objects per byte, object `n` in byte `n / 4` from the high bits down (Ceph's
//! `BitVector<2>` order), and nothing else: the length is `ceil(objects / 4)` for the size
//! the map is for, so one object's state is one byte at a known offset. Ceph's map carries
//! a header and CRCs; this one's consistency check is its length, and a map that fails it
//! is reported invalid (`flags`) and rebuilt by `rbd object-map rebuild`.
//!
//! **States** ([`ObjectState`]): `Nonexistent`; `Exists` — exists and, with fast-diff, was
//! written since the previous snapshot ("dirty"); `ExistsClean` — exists, unchanged since
//! the previous snapshot. `Pending` is in memory only (a whole-object discard in flight)
//! and is stored as `Exists`.
//!
//! **Invariant: the head map is a superset.** Every data object that exists is marked as
//! existing before its data is written (the writer waits for the map update), and a map
//! entry only becomes `Nonexistent` after the object is gone and no write to it is in
//! flight. A crash can leave an entry `Exists` for an object that is gone (du counts it,
//! a diff reads it and finds nothing), never the other way round.
//!
//! This file is the format and the pure logic; [`live`] keeps the head map of an image
//! whose exclusive lock this client holds and persists its changes.

pub mod live;
pub(crate) mod scan;

use bytes::Bytes;

use crate::backend::{BackendError, ObjectBackend};
use crate::layout;

/// RBD_FEATURE_OBJECT_MAP.
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// RBD_FEATURE_FAST_DIFF: the map also says which objects changed since the previous
/// snapshot (needs `object-map`).
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// RBD_FLAG_OBJECT_MAP_INVALID: the head map cannot be trusted until rebuilt.
pub const FLAG_OBJECT_MAP_INVALID: u64 = 1 << 0;
/// RBD_FLAG_FAST_DIFF_INVALID.
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// Both map features: this implementation turns them on and off together.
pub const FEATURES: u64 = FEATURE_OBJECT_MAP | FEATURE_FAST_DIFF;
/// Both invalid flags: a map found unusable is unusable for both.
pub const INVALID_FLAGS: u64 = FLAG_OBJECT_MAP_INVALID | FLAG_FAST_DIFF_INVALID;

/// Whether an image with these header `features` and `flags` has maps to trust.
pub fn usable(features: u64, flags: u64) -> bool {
    features & FEATURES == FEATURES && flags & INVALID_FLAGS == 0
}

/// The largest image an object map is kept for: 256 Mi objects (a 64 MiB map), Ceph's limit.
pub const MAX_OBJECTS: u64 = 256 << 20;

/// The object holding the map of the head (`snap` = `None`) or of a snapshot.
pub fn map_oid(image_id: &str, snap: Option<u64>) -> String {
    match snap {
        None => format!("rbd_object_map.{image_id}"),
        Some(s) => format!("rbd_object_map.{image_id}.{s:016x}"),
    }
}

/// One data object's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectState {
    Nonexistent = 0,
    Exists = 1,
    Pending = 2,
    ExistsClean = 3,
}

impl ObjectState {
    pub fn from_bits(b: u8) -> ObjectState {
        match b & 3 {
            0 => ObjectState::Nonexistent,
            1 => ObjectState::Exists,
            2 => ObjectState::Pending,
            _ => ObjectState::ExistsClean,
        }
    }

    /// How the state is stored: `Pending` is only ever in memory, and on disk must still
    /// say the object may exist.
    fn stored(self) -> u8 {
        match self {
            ObjectState::Pending => ObjectState::Exists as u8,
            s => s as u8,
        }
    }

    pub fn exists(self) -> bool {
        self != ObjectState::Nonexistent
    }

    /// Written since the previous snapshot (or existing, without fast-diff).
    pub fn dirty(self) -> bool {
        matches!(self, ObjectState::Exists | ObjectState::Pending)
    }
}

/// Why a stored map cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("object map {oid} holds {have} bytes where {objects} objects need {want}")]
    WrongLength {
        oid: String,
        have: usize,
        want: usize,
        objects: u64,
    },
    #[error("object map {0} is missing")]
    Missing(String),
    #[error("image of {objects} objects is larger than an object map covers ({MAX_OBJECTS})")]
    TooLarge { objects: u64 },
}

/// Bytes a map of `objects` objects takes.
pub fn encoded_len(objects: u64) -> usize {
    objects.div_ceil(4) as usize
}

/// The objects of an image of `size` bytes, or `TooLarge` when no map is kept for it.
pub fn objects_for(size: u64, order: u8) -> Result<u64, MapError> {
    let objects = layout::num_objects(size, order);
    if objects > MAX_OBJECTS {
        return Err(MapError::TooLarge { objects });
    }
    Ok(objects)
}

/// A whole map in memory, one state per object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectMap {
    states: Vec<ObjectState>,
}

impl ObjectMap {
    /// A map of `objects` objects, none existing.
    pub fn new(objects: u64) -> ObjectMap {
        ObjectMap {
            states: vec![ObjectState::Nonexistent; objects as usize],
        }
    }

    pub fn from_states(states: Vec<ObjectState>) -> ObjectMap {
        ObjectMap { states }
    }

    /// Reads a stored map of `objects` objects (`oid` names it in errors); bytes past what
    /// they need are ignored (see [`read`]).
    pub fn decode(oid: &str, bytes: &[u8], objects: u64) -> Result<ObjectMap, MapError> {
        let want = encoded_len(objects);
        if bytes.len() < want {
            return Err(MapError::WrongLength {
                oid: oid.to_string(),
                have: bytes.len(),
                want,
                objects,
            });
        }
        Ok(ObjectMap {
            states: (0..objects).map(|n| state_in(bytes, n)).collect(),
        })
    }

    pub fn encode(&self) -> Bytes {
        let mut out = vec![0u8; encoded_len(self.len())];
        for (n, s) in self.states.iter().enumerate() {
            put_state(&mut out, n as u64, *s);
        }
        Bytes::from(out)
    }

    pub fn len(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The state of object `n` (`Nonexistent` past the end).
    pub fn get(&self, n: u64) -> ObjectState {
        self.states
            .get(n as usize)
            .copied()
            .unwrap_or(ObjectState::Nonexistent)
    }

    pub fn set(&mut self, n: u64, s: ObjectState) {
        if let Some(slot) = self.states.get_mut(n as usize) {
            *slot = s;
        }
    }

    pub fn states(&self) -> &[ObjectState] {
        &self.states
    }

    /// Grows (new objects do not exist) or shrinks to `objects` objects.
    pub fn resize(&mut self, objects: u64) {
        self.states
            .resize(objects as usize, ObjectState::Nonexistent);
    }

    /// After a snapshot: everything that exists is unchanged since it.
    pub fn mark_clean(&mut self) {
        for s in &mut self.states {
            if s.exists() {
                *s = ObjectState::ExistsClean;
            }
        }
    }

    /// After a rollback or a rebuild without history: every existing object counts as
    /// changed (conservative for fast-diff).
    pub fn mark_dirty(&mut self) {
        for s in &mut self.states {
            if s.exists() {
                *s = ObjectState::Exists;
            }
        }
    }

    /// Snapshot `removed` (the map before `self`) goes away: what changed in it must show as
    /// changed in the next newer map, whose clean bits were relative to it (Ceph's
    /// object_map_snap_remove).
    pub fn absorb_removed(&mut self, removed: &ObjectMap) {
        for (n, s) in self.states.iter_mut().enumerate() {
            if *s == ObjectState::ExistsClean && removed.get(n as u64).dirty() {
                *s = ObjectState::Exists;
            }
        }
    }
}

/// Reads the stored map `oid` for an image (or snapshot) of `size` bytes: the outer error
/// is the backend's, the inner one says why the map cannot be used (missing, wrong length,
/// image too large).
pub async fn read(
    backend: &dyn ObjectBackend,
    oid: &str,
    size: u64,
    order: u8,
) -> Result<Result<ObjectMap, MapError>, BackendError> {
    let objects = match objects_for(size, order) {
        Ok(n) => n,
        Err(e) => return Ok(Err(e)),
    };
    let want = encoded_len(objects) as u64;
    // One byte more than needed: a longer map is a crash between a shrink's header and map
    // updates, and its tail (objects past the end, removed) is dropped.
    match backend.read(oid, 0, want + 1).await {
        Ok(b) => Ok(ObjectMap::decode(oid, &b, objects)),
        Err(BackendError::NotFound(_)) => Ok(Err(MapError::Missing(oid.to_string()))),
        Err(e) => Err(e),
    }
}

/// The stored maps of `points` of image `image_id`, in order; the inner error says why the
/// first unusable one cannot be used.
pub(crate) async fn read_points(
    backend: &dyn ObjectBackend,
    image_id: &str,
    order: u8,
    points: &[scan::Point],
) -> Result<Result<Vec<ObjectMap>, MapError>, BackendError> {
    let mut maps = Vec::with_capacity(points.len());
    for p in points {
        match read(backend, &map_oid(image_id, p.snap), p.size, order).await? {
            Ok(m) => maps.push(m),
            Err(why) => return Ok(Err(why)),
        }
    }
    Ok(Ok(maps))
}

/// Which objects of an image changed between snapshot `from` (`None`: nothing) and `to`
/// (`None`: the head of `head_size` bytes), from the maps of `from` and of every point after
/// it up to `to` (fast-diff): an object changed if it exists at one end and not the other, or
/// if any of those points marks it written since the point before. `None` if a map is
/// missing or unusable (then every object must be asked).
pub(crate) async fn changed_between(
    backend: &dyn ObjectBackend,
    image_id: &str,
    order: u8,
    mut snaps: Vec<crate::snap::SnapInfo>,
    from: Option<&crate::snap::SnapInfo>,
    to: Option<&crate::snap::SnapInfo>,
    head_size: u64,
) -> Result<Option<Vec<bool>>, BackendError> {
    let mut points = scan::points(&mut snaps, head_size);
    points.retain(|p| match p.snap {
        Some(s) => from.is_none_or(|f| s > f.id) && to.is_none_or(|t| s <= t.id),
        None => to.is_none(),
    });
    let Ok(maps) = read_points(backend, image_id, order, &points).await? else {
        return Ok(None);
    };
    let start = match from {
        Some(f) => match read(backend, &map_oid(image_id, Some(f.id)), f.size, order).await? {
            Ok(m) => Some(m),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let Some(end) = maps.last() else {
        return Ok(None);
    };
    let objects = maps
        .iter()
        .chain(&start)
        .map(ObjectMap::len)
        .max()
        .unwrap_or(0);
    Ok(Some(
        (0..objects)
            .map(|n| match &start {
                None => end.get(n).exists(),
                Some(s) => {
                    s.get(n).exists() != end.get(n).exists()
                        || maps.iter().any(|m| m.get(n).dirty())
                }
            })
            .collect(),
    ))
}

/// Object `n`'s state in a stored map.
pub(crate) fn state_in(bytes: &[u8], n: u64) -> ObjectState {
    let b = bytes.get((n / 4) as usize).copied().unwrap_or(0);
    ObjectState::from_bits(b >> shift(n))
}

/// Stores object `n`'s state in a map's bytes.
pub(crate) fn put_state(bytes: &mut [u8], n: u64, s: ObjectState) {
    if let Some(b) = bytes.get_mut((n / 4) as usize) {
        let sh = shift(n);
        *b = (*b & !(3 << sh)) | (s.stored() << sh);
    }
}

fn shift(n: u64) -> u32 {
    6 - 2 * (n % 4) as u32
}

/// Space an image's head and snapshots use, as `rbd du` reports it: per snapshot (oldest
/// first) and the head, the bytes of the objects written since the previous one, at object
/// granularity (what fast-diff knows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DuRow {
    /// The snapshot's name (`None`: the head).
    pub snap: Option<String>,
    /// The image size at that point.
    pub provisioned: u64,
    /// Bytes of the objects that changed since the previous point.
    pub used: u64,
}

/// Bytes object `n` covers in an image of `size` bytes.
pub fn object_bytes(n: u64, size: u64, order: u8) -> u64 {
    let os = 1u64 << order;
    size.saturating_sub(n.saturating_mul(os)).min(os)
}

/// `used` of one map: the bytes of its changed objects, or of all existing ones for the
/// `oldest` point (nothing is before it).
pub fn used_bytes(map: &ObjectMap, size: u64, order: u8, oldest: bool) -> u64 {
    map.states
        .iter()
        .enumerate()
        .filter(|(_, s)| if oldest { s.exists() } else { s.dirty() })
        .map(|(n, _)| object_bytes(n as u64, size, order))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ObjectState::*;

    #[test]
    fn encode_decode_round_trip_every_state_and_length() {
        for objects in [0u64, 1, 3, 4, 5, 9, 1024, 1027] {
            let states: Vec<_> = (0..objects)
                .map(|n| ObjectState::from_bits((n * 7 % 4) as u8))
                .collect();
            let map = ObjectMap::from_states(states.clone());
            let bytes = map.encode();
            assert_eq!(bytes.len(), encoded_len(objects));
            let back = ObjectMap::decode("m", &bytes, objects).unwrap();
            // Pending is stored as Exists.
            let want: Vec<_> = states
                .iter()
                .map(|s| if *s == Pending { Exists } else { *s })
                .collect();
            assert_eq!(back.states(), &want[..]);
        }
    }

    #[test]
    fn one_object_is_one_byte_at_a_known_offset_in_cephs_bit_order() {
        let mut m = ObjectMap::new(8);
        m.set(0, Exists);
        m.set(5, ExistsClean);
        let b = m.encode();
        assert_eq!(&b[..], &[0b0100_0000, 0b0011_0000]);
        let mut raw = b.to_vec();
        put_state(&mut raw, 5, Nonexistent);
        assert_eq!(state_in(&raw, 5), Nonexistent);
        assert_eq!(state_in(&raw, 0), Exists);
    }

    #[test]
    fn a_short_map_is_refused_and_a_long_ones_tail_dropped() {
        let e = ObjectMap::decode("rbd_object_map.x", &[0; 3], 16).unwrap_err();
        assert!(matches!(
            e,
            MapError::WrongLength {
                have: 3,
                want: 4,
                ..
            }
        ));
        let m = ObjectMap::decode("rbd_object_map.x", &[0x40, 0, 0xff], 5).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m.get(0), Exists);
        assert!(objects_for(u64::MAX, 22).is_err());
    }

    #[test]
    fn removing_a_snapshot_moves_its_changes_to_the_next_map() {
        let older = ObjectMap::from_states(vec![Exists, ExistsClean, Exists, Nonexistent]);
        let mut next = ObjectMap::from_states(vec![ExistsClean, ExistsClean, Exists, Exists]);
        next.absorb_removed(&older);
        assert_eq!(next.states(), &[Exists, ExistsClean, Exists, Exists]);
    }

    #[test]
    fn used_counts_dirty_objects_and_a_short_last_object() {
        // order 12: 4 KiB objects; a 10 KiB image's last object covers 2 KiB.
        let m = ObjectMap::from_states(vec![Exists, ExistsClean, Exists]);
        assert_eq!(used_bytes(&m, 10 << 10, 12, false), (4 << 10) + (2 << 10));
        assert_eq!(used_bytes(&m, 10 << 10, 12, true), 10 << 10);
        let mut m = m;
        m.mark_clean();
        assert_eq!(used_bytes(&m, 10 << 10, 12, false), 0);
        m.mark_dirty();
        assert_eq!(used_bytes(&m, 10 << 10, 12, false), 10 << 10);
    }
}
