//! Key encoding. See the key-layout table in the [store module docs](super).
//!
//! Every integer is big-endian so byte order is numeric order. Strings are escaped
//! (`0x00` → `0x00 0xFF`) and terminated by `0x00 0x01`: that keeps byte order equal to string
//! order and makes every object key prefix-free, so "all chunks of object X" is one key range
//! even when another object's name starts with X's name.

use basalt_placement::PgId;

use super::error::{Result, StoreError};
use super::types::ObjectId;

pub(crate) const META_SUPERBLOCK: &[u8] = &[0x01];
pub(crate) const META_USED: &[u8] = &[0x02];
pub(crate) const META_PG: u8 = 0x03;
pub(crate) const META_USER: u8 = 0x04;
pub(crate) const META_CHECKPOINT: &[u8] = &[0x05];
pub(crate) const META_BITMAP: u8 = 0x06;

pub(crate) const OMAP_HEADER: u8 = 0x00;
pub(crate) const OMAP_ENTRY: u8 = 0x01;

pub(crate) const PGLOG_INFO: u8 = 0x01;
pub(crate) const PGLOG_ENTRY: u8 = 0x02;
pub(crate) const PGLOG_DUP: u8 = 0x03;
pub(crate) const PGLOG_DUP_BY_VERSION: u8 = 0x04;

pub(crate) fn pg_prefix(pg: PgId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8);
    k.extend_from_slice(&pg.pool.to_be_bytes());
    k.extend_from_slice(&pg.seed.to_be_bytes());
    k
}

fn push_escaped(k: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        k.push(b);
        if b == 0 {
            k.push(0xFF);
        }
    }
    k.extend_from_slice(&[0x00, 0x01]);
}

/// `pool | seed | reverse_bits(hash) | esc(ns) | esc(name) | snap`.
pub(crate) fn onode_key(o: &ObjectId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 4 + o.namespace().len() + o.name().len() + 4 + 8 + 4);
    k.extend_from_slice(&pg_prefix(o.pg()));
    k.extend_from_slice(&o.hash().reverse_bits().to_be_bytes());
    push_escaped(&mut k, o.namespace().as_bytes());
    push_escaped(&mut k, o.name().as_bytes());
    k.extend_from_slice(&o.snap().to_be_bytes());
    k
}

/// `key` (an onode, extent or omap key of some PG) under `pg`'s prefix instead: where the
/// same object's record lives once a split moved the object into `pg`.
pub(crate) fn rekey_to_pg(key: &[u8], pg: PgId) -> Vec<u8> {
    let mut k = pg_prefix(pg);
    k.extend_from_slice(key.get(8..).unwrap_or_default());
    k
}

/// Chunk extent key: `onode key | chunk index (u32)`.
pub(crate) fn chunk_key(okey: &[u8], index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(okey.len() + 4);
    k.extend_from_slice(okey);
    // Fits: max_object_size / CHUNK_SIZE is checked to be < 2^32 at open.
    k.extend_from_slice(&(index as u32).to_be_bytes());
    k
}

pub(crate) fn omap_header_key(okey: &[u8]) -> Vec<u8> {
    let mut k = okey.to_vec();
    k.push(OMAP_HEADER);
    k
}

pub(crate) fn omap_entry_prefix(okey: &[u8]) -> Vec<u8> {
    let mut k = okey.to_vec();
    k.push(OMAP_ENTRY);
    k
}

pub(crate) fn omap_entry_key(okey: &[u8], user: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(okey.len() + 1 + user.len());
    k.extend_from_slice(okey);
    k.push(OMAP_ENTRY);
    k.extend_from_slice(user);
    k
}

pub(crate) fn meta_pg_key(pg: PgId) -> Vec<u8> {
    let mut k = vec![META_PG];
    k.extend_from_slice(&pg_prefix(pg));
    k
}

/// Page `page` of the allocation bitmap.
pub(crate) fn meta_bitmap_key(page: u64) -> Vec<u8> {
    let mut k = vec![META_BITMAP];
    k.extend_from_slice(&page.to_be_bytes());
    k
}

pub(crate) fn meta_user_key(key: &[u8]) -> Vec<u8> {
    let mut k = vec![META_USER];
    k.extend_from_slice(key);
    k
}

pub(crate) fn pglog_key(pg: PgId, tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = pg_prefix(pg);
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

pub(crate) fn pglog_entry_key(pg: PgId, version: u64) -> Vec<u8> {
    pglog_key(pg, PGLOG_ENTRY, &version.to_be_bytes())
}

pub(crate) fn dup_index_key(pg: PgId, version: u64, reqid: &[u8]) -> Vec<u8> {
    let mut rest = version.to_be_bytes().to_vec();
    rest.extend_from_slice(reqid);
    pglog_key(pg, PGLOG_DUP_BY_VERSION, &rest)
}

/// Smallest key greater than every key starting with `prefix`. Every prefix used here starts with
/// a pool id below `u32::MAX` (checked on input) or a tag byte below 0xFF, so it exists.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last != 0xFF {
            k.push(last + 1);
            return k;
        }
    }
    // Unreachable for the prefixes we build; an empty upper bound would match nothing.
    vec![0xFF; prefix.len() + 1]
}

fn take<'a>(k: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if k.len() < n {
        return None;
    }
    let (a, b) = k.split_at(n);
    *k = b;
    Some(a)
}

fn take_u32(k: &mut &[u8]) -> Option<u32> {
    take(k, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_escaped(k: &mut &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < k.len() {
        if k[i] == 0 {
            match k.get(i + 1)? {
                0x01 => {
                    *k = &k[i + 2..];
                    return Some(out);
                }
                0xFF => {
                    out.push(0);
                    i += 2;
                }
                _ => return None,
            }
        } else {
            out.push(k[i]);
            i += 1;
        }
    }
    None
}

/// Inverse of [`onode_key`]; anything malformed is corruption, never a panic.
pub(crate) fn decode_onode_key(key: &[u8]) -> Result<ObjectId> {
    let bad = || StoreError::corrupt_meta("onode key", format!("undecodable key {key:02x?}"));
    let mut k = key;
    let pool = take_u32(&mut k).ok_or_else(bad)?;
    let seed = take_u32(&mut k).ok_or_else(bad)?;
    let hash = take_u32(&mut k).ok_or_else(bad)?.reverse_bits();
    let ns = take_escaped(&mut k).ok_or_else(bad)?;
    let name = take_escaped(&mut k).ok_or_else(bad)?;
    let snap = take(&mut k, 8).ok_or_else(bad)?;
    if !k.is_empty() {
        return Err(bad());
    }
    let snap = u64::from_be_bytes(snap.try_into().map_err(|_| bad())?);
    let ns = String::from_utf8(ns).map_err(|_| bad())?;
    let name = String::from_utf8(name).map_err(|_| bad())?;
    ObjectId::from_parts(PgId { pool, seed }, hash, ns, name, snap).ok_or_else(bad)
}

pub(crate) fn decode_pg_key(key: &[u8]) -> Result<PgId> {
    let bad = || StoreError::corrupt_meta("pg key", format!("undecodable key {key:02x?}"));
    let mut k = key;
    if take(&mut k, 1) != Some(&[META_PG][..]) {
        return Err(bad());
    }
    let pool = take_u32(&mut k).ok_or_else(bad)?;
    let seed = take_u32(&mut k).ok_or_else(bad)?;
    if !k.is_empty() {
        return Err(bad());
    }
    Ok(PgId { pool, seed })
}

pub(crate) fn decode_u64(b: &[u8], what: &str) -> Result<u64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| {
        StoreError::corrupt_meta(what, format!("expected 8 bytes, got {}", b.len()))
    })?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg() -> PgId {
        PgId { pool: 1, seed: 7 }
    }

    #[test]
    fn onode_key_round_trips_awkward_names() {
        for (ns, name) in [("", ""), ("", "a\0b"), ("ns\0", "\0\0"), ("x", "ÿ\u{1}")] {
            let o = ObjectId::with_namespace(pg(), ns, name).at_snap(5);
            assert_eq!(decode_onode_key(&onode_key(&o)).unwrap(), o);
        }
    }

    #[test]
    fn key_order_matches_object_order_and_is_prefix_free() {
        let names = ["", "a", "a\0", "a\u{1}", "ab", "b", "\0"];
        let mut ids: Vec<ObjectId> = Vec::new();
        for ns in ["", "a", "a\0"] {
            for n in names {
                ids.push(ObjectId::with_namespace(pg(), ns, n));
                ids.push(ObjectId::with_namespace(pg(), ns, n).at_snap(0));
            }
        }
        for a in &ids {
            for b in &ids {
                let (ka, kb) = (onode_key(a), onode_key(b));
                assert_eq!(a.cmp(b), ka.cmp(&kb), "{a} vs {b}");
                if a != b {
                    assert!(!kb.starts_with(&ka), "{a} key is a prefix of {b}'s");
                }
            }
        }
    }

    #[test]
    fn garbage_keys_are_corruption_not_panics() {
        for k in [
            &[][..],
            &[0; 3],
            &[0; 12],
            &[0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 2],
        ] {
            assert!(matches!(
                decode_onode_key(k),
                Err(StoreError::CorruptMetadata { .. })
            ));
        }
    }

    #[test]
    fn prefix_end_bounds_prefix() {
        assert_eq!(prefix_end(&[1, 2, 0xFF]), vec![1, 3]);
        assert_eq!(prefix_end(&[0]), vec![1]);
    }
}
