//! Object names, header encoding and the image → object mapping (DESIGN §4).
//!
//! Striping is the default RBD layout only: stripe_unit = object size,
//! stripe_count = 1, so byte `off` of the image lives in object
//! `off >> order` at offset `off & (object_size - 1)`. "Fancy" striping
//! (stripe_unit < object size or count > 1) is not supported yet; the header
//! records unit and count so images created later with it are refused, not
//! misread.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::backend::SnapContext;

pub const DIRECTORY: &str = "rbd_directory";
/// The cls_lock name of the exclusive lock, as librbd names it.
pub const LOCK_NAME: &str = "rbd_lock";
pub const MIN_ORDER: u8 = 12;
pub const MAX_ORDER: u8 = 25;
/// 4 MiB objects.
pub const DEFAULT_ORDER: u8 = 22;

/// RBD_FEATURE_EXCLUSIVE_LOCK (every image has it). The object map's features are in
/// [`crate::object_map`].
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// Ceph's names of the feature bits an image has.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    [
        (FEATURE_EXCLUSIVE_LOCK, "exclusive-lock"),
        (crate::object_map::FEATURE_OBJECT_MAP, "object-map"),
        (crate::object_map::FEATURE_FAST_DIFF, "fast-diff"),
    ]
    .into_iter()
    .filter(|(bit, _)| features & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Ceph's names of an image's flags.
pub fn flag_names(flags: u64) -> Vec<&'static str> {
    [
        (
            crate::object_map::FLAG_OBJECT_MAP_INVALID,
            "object map invalid",
        ),
        (
            crate::object_map::FLAG_FAST_DIFF_INVALID,
            "fast diff invalid",
        ),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

pub fn id_oid(name: &str) -> String {
    format!("rbd_id.{name}")
}

pub fn header_oid(id: &str) -> String {
    format!("rbd_header.{id}")
}

pub fn object_prefix(id: &str) -> String {
    format!("rbd_data.{id}")
}

pub fn data_oid(prefix: &str, objectno: u64) -> String {
    format!("{prefix}.{objectno:016x}")
}

pub fn dir_name_key(name: &str) -> String {
    format!("name_{name}")
}

pub fn dir_id_key(id: &str) -> String {
    format!("id_{id}")
}

/// The largest image: NBD clients (QEMU, libnbd) address an export with signed 64-bit
/// offsets, so 8 EiB less one object (`2^63 - object size`) is the most they can reach.
pub fn max_size(order: u8) -> u64 {
    (i64::MAX as u64) & !((1u64 << order) - 1)
}

/// A new image's size is at least one byte and at most [`max_size`].
pub fn check_size(size: u64, order: u8) -> Result<(), String> {
    if size == 0 {
        return Err("image size must be greater than 0 (e.g. --size 10G)".into());
    }
    check_max_size(size, order)
}

/// A size (new or resized to) is at most [`max_size`].
pub fn check_max_size(size: u64, order: u8) -> Result<(), String> {
    let max = max_size(order);
    if size > max {
        return Err(format!(
            "image size {size} bytes is beyond what an image can address: at most {max} bytes \
             (8 EiB less one {} KiB object; NBD clients use signed 64-bit offsets)",
            (1u64 << order) >> 10
        ));
    }
    Ok(())
}

/// The object number of data object `oid` of an image whose objects are named
/// `prefix.<16 hex>`; `None` for any other name.
pub fn data_objectno(prefix: &str, oid: &str) -> Option<u64> {
    let hex = oid.strip_prefix(prefix)?.strip_prefix('.')?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Objects needed to hold `size` bytes.
pub fn num_objects(size: u64, order: u8) -> u64 {
    size.div_ceil(1u64 << order)
}

/// Image names: non-empty, no `/` or `@` (pool and snapshot separators),
/// printable, and short enough for an object name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "image name must be 1..=200 bytes, got {}",
            name.len()
        ));
    }
    if name.contains(['/', '@']) || name.chars().any(char::is_control) {
        return Err(format!(
            "image name {name:?} may not contain '/', '@' or control characters"
        ));
    }
    Ok(())
}

pub fn check_order(order: u8) -> Result<(), String> {
    if (MIN_ORDER..=MAX_ORDER).contains(&order) {
        Ok(())
    } else {
        Err(format!(
            "order {order} outside [{MIN_ORDER}, {MAX_ORDER}] (object size 4 KiB..32 MiB)"
        ))
    }
}

/// The header fields this layer reads and writes. Integers are stored
/// little-endian (as Ceph's encoding does), strings as raw UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub size: u64,
    pub order: u8,
    pub object_prefix: String,
    pub features: u64,
    pub flags: u64,
    pub stripe_unit: u64,
    pub stripe_count: u64,
    pub create_timestamp: u64,
    /// What writes carry for the image's snapshots ([`crate::snap`]).
    pub snapc: SnapContext,
    /// A clone's parent ([`crate::layering`]).
    pub parent: Option<crate::layering::ParentSpec>,
}

pub const HEADER_KEYS: [&str; 10] = [
    "size",
    "order",
    "object_prefix",
    "features",
    "flags",
    "stripe_unit",
    "stripe_count",
    "create_timestamp",
    crate::snap::SNAP_CONTEXT_KEY,
    crate::layering::PARENT_KEY,
];

/// A header value the image layer keeps as postcard (snapshot records, the snap context,
/// parent and child links). Encoding our own types cannot fail short of memory exhaustion.
pub fn encode<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(postcard::to_allocvec(v).unwrap_or_default())
}

pub fn u64_bytes(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}

/// A little-endian u64 header value, if it is 8 bytes.
pub fn u64_of_bytes(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

impl Header {
    pub fn encode(&self) -> BTreeMap<String, Bytes> {
        let mut m = BTreeMap::new();
        m.insert("size".into(), u64_bytes(self.size));
        m.insert("order".into(), Bytes::copy_from_slice(&[self.order]));
        m.insert(
            "object_prefix".into(),
            Bytes::copy_from_slice(self.object_prefix.as_bytes()),
        );
        m.insert("features".into(), u64_bytes(self.features));
        m.insert("flags".into(), u64_bytes(self.flags));
        m.insert("stripe_unit".into(), u64_bytes(self.stripe_unit));
        m.insert("stripe_count".into(), u64_bytes(self.stripe_count));
        m.insert("create_timestamp".into(), u64_bytes(self.create_timestamp));
        if self.snapc != SnapContext::default() {
            m.insert(crate::snap::SNAP_CONTEXT_KEY.into(), encode(&self.snapc));
        }
        if let Some(p) = &self.parent {
            m.insert(crate::layering::PARENT_KEY.into(), encode(p));
        }
        m
    }

    /// Decode and validate; the error names the bad field.
    pub fn decode(m: &BTreeMap<String, Bytes>) -> Result<Header, String> {
        let u64_of = |k: &str| -> Result<u64, String> {
            let v = m.get(k).ok_or_else(|| format!("header lacks {k}"))?;
            let a: [u8; 8] = v[..]
                .try_into()
                .map_err(|_| format!("header {k} is {} bytes, not 8", v.len()))?;
            Ok(u64::from_le_bytes(a))
        };
        let order = match m.get("order").map(|v| &v[..]) {
            Some([o]) => *o,
            _ => return Err("header order missing or not one byte".into()),
        };
        check_order(order)?;
        let object_prefix = m
            .get("object_prefix")
            .map(|v| String::from_utf8(v.to_vec()))
            .transpose()
            .map_err(|_| "header object_prefix is not UTF-8".to_string())?
            .ok_or("header lacks object_prefix")?;
        let h = Header {
            size: u64_of("size")?,
            order,
            object_prefix,
            features: u64_of("features")?,
            flags: u64_of("flags").unwrap_or(0),
            stripe_unit: u64_of("stripe_unit").unwrap_or(1 << order),
            stripe_count: u64_of("stripe_count").unwrap_or(1),
            create_timestamp: u64_of("create_timestamp").unwrap_or(0),
            snapc: crate::snap::context_in(m)?,
            parent: crate::layering::parent_in(m)?,
        };
        if h.stripe_unit != 1 << order || h.stripe_count != 1 {
            return Err(format!(
                "fancy striping (unit {}, count {}) is not supported",
                h.stripe_unit, h.stripe_count
            ));
        }
        Ok(h)
    }
}

/// One piece of an image extent, within one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectExtent {
    pub objectno: u64,
    /// Offset inside the object.
    pub offset: u64,
    pub len: u64,
    /// Offset of this piece inside the caller's buffer.
    pub buf_offset: u64,
}

/// Split the image extent `[off, off+len)` into per-object pieces, in order.
pub fn object_extents(off: u64, len: u64, order: u8) -> Vec<ObjectExtent> {
    let os = 1u64 << order;
    let mut out = Vec::new();
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let objectno = pos >> order;
        let offset = pos & (os - 1);
        let n = (os - offset).min(end - pos);
        out.push(ObjectExtent {
            objectno,
            offset,
            len: n,
            buf_offset: pos - off,
        });
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_one_byte_to_8_eib_less_one_object() {
        assert!(check_size(0, 22).unwrap_err().contains("greater than 0"));
        assert!(check_size(1, 22).is_ok());
        assert_eq!(max_size(22), (1u64 << 63) - (4 << 20));
        assert!(check_size(max_size(22), 22).is_ok());
        assert!(check_size(max_size(22) + 1, 22)
            .unwrap_err()
            .contains("beyond what an image can address"));
        assert!(check_size(1u64 << 63, 12).is_err());
        assert!(check_size(u64::MAX, 25).is_err());
    }

    #[test]
    fn data_object_numbers_parse_back() {
        let oid = data_oid("rbd_data.abc", 0x1234);
        assert_eq!(data_objectno("rbd_data.abc", &oid), Some(0x1234));
        assert_eq!(data_objectno("rbd_data.ab", &oid), None);
        assert_eq!(data_objectno("rbd_data.abc", "rbd_data.abc.12"), None);
        assert_eq!(
            data_objectno("rbd_data.abc", "rbd_data.abcd.0000000000000001"),
            None
        );
    }

    #[test]
    fn extents_split_at_object_boundaries() {
        assert_eq!(object_extents(0, 0, 12), vec![]);
        let e = object_extents(4000, 5000, 12);
        assert_eq!(
            e,
            vec![
                ObjectExtent {
                    objectno: 0,
                    offset: 4000,
                    len: 96,
                    buf_offset: 0
                },
                ObjectExtent {
                    objectno: 1,
                    offset: 0,
                    len: 4096,
                    buf_offset: 96
                },
                ObjectExtent {
                    objectno: 2,
                    offset: 0,
                    len: 808,
                    buf_offset: 4192
                },
            ]
        );
        assert_eq!(
            data_oid("rbd_data.abc", 0x2a),
            "rbd_data.abc.000000000000002a"
        );
        assert_eq!(num_objects(0, 22), 0);
        assert_eq!(num_objects(1, 22), 1);
        assert_eq!(num_objects(4 << 20, 22), 1);
        assert_eq!(num_objects((4 << 20) + 1, 22), 2);
    }

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = Header {
            size: 10 << 30,
            order: 22,
            object_prefix: "rbd_data.1f2e".into(),
            features: FEATURE_EXCLUSIVE_LOCK,
            flags: 0,
            stripe_unit: 4 << 20,
            stripe_count: 1,
            create_timestamp: 1_700_000_000,
            snapc: SnapContext::default(),
            parent: None,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let mut m = h.encode();
        m.insert("order".into(), Bytes::from_static(&[40]));
        assert!(Header::decode(&m).is_err());
        let mut m = h.encode();
        m.insert("size".into(), Bytes::from_static(&[1, 2]));
        assert!(Header::decode(&m).unwrap_err().contains("size"));
        let mut m = h.encode();
        m.insert("stripe_count".into(), u64_bytes(4));
        assert!(Header::decode(&m).unwrap_err().contains("striping"));
    }

    #[test]
    fn names_and_orders() {
        assert!(check_name("vm1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a@s").is_err());
        assert!(check_order(11).is_err());
        assert!(check_order(12).is_ok());
        assert!(check_order(25).is_ok());
        assert!(check_order(26).is_err());
    }
}
