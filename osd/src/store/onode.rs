//! On-disk records: the onode (object metadata) and the self-verifying chunk value.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::{Result, StoreError};
use super::types::{ObjectMeta, CHUNK_SIZE};

/// First byte of every onode value, so a future format can be told apart.
const ONODE_V1: u8 = 1;

/// Per-object metadata. Its size is O(stored chunks + xattrs), not O(object size): a 4 MiB RBD
/// object has at most 64 chunk entries (a few hundred bytes), which is what a 4 KiB write
/// rewrites beside its chunk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Onode {
    pub size: u64,
    pub meta: ObjectMeta,
    pub xattrs: BTreeMap<String, Bytes>,
    /// chunk index → stored data length (1..=CHUNK_SIZE). Presence here is what distinguishes a
    /// hole (reads as zeros) from a chunk that should exist: a listed chunk missing from the
    /// data column family is reported as corruption instead of silently reading as zeros.
    pub chunks: BTreeMap<u64, u32>,
}

impl Onode {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![ONODE_V1];
        // Serialising plain structs into a Vec cannot fail.
        v.extend_from_slice(&postcard::to_stdvec(self).unwrap_or_default());
        v
    }

    pub fn decode(raw: &[u8], object: &dyn std::fmt::Display) -> Result<Onode> {
        let bad = |d: String| StoreError::corrupt_meta(format!("onode of {object}"), d);
        match raw.split_first() {
            Some((&ONODE_V1, rest)) => {
                let o: Onode = postcard::from_bytes(rest).map_err(|e| bad(e.to_string()))?;
                if o.chunks.iter().any(|(&i, &len)| {
                    len == 0 || len as u64 > CHUNK_SIZE || i * CHUNK_SIZE + len as u64 > o.size
                }) {
                    return Err(bad("chunk map inconsistent with size".into()));
                }
                Ok(o)
            }
            Some((v, _)) => Err(bad(format!("unknown onode format {v}"))),
            None => Err(bad("empty onode".into())),
        }
    }

    pub fn data_bytes(&self) -> u64 {
        self.chunks.values().map(|&l| l as u64).sum()
    }

    pub fn xattr_bytes(&self) -> u64 {
        self.xattrs
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    /// What this object charges against the store's capacity.
    pub fn charged_bytes(&self) -> u64 {
        self.data_bytes() + self.xattr_bytes()
    }
}

pub(crate) const DIGEST_LEN: usize = 32;

/// A chunk value is `blake3(data) | data`: the digest travels with the bytes it covers, so a
/// 4 KiB write rewrites one chunk value and a small onode, never a per-object digest table.
pub(crate) fn encode_chunk(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DIGEST_LEN + data.len());
    v.extend_from_slice(blake3::hash(data).as_bytes());
    v.extend_from_slice(data);
    v
}

/// Splits a stored chunk into (stored digest, data) without verifying.
pub(crate) fn split_chunk(raw: &[u8]) -> Option<([u8; 32], &[u8])> {
    if raw.len() < DIGEST_LEN {
        return None;
    }
    let (d, data) = raw.split_at(DIGEST_LEN);
    Some((d.try_into().ok()?, data))
}

/// Verified chunk data, or `Corrupt`. `expected_len` comes from the onode.
pub(crate) fn verify_chunk<'a>(
    raw: &'a [u8],
    expected_len: u32,
    object: &dyn std::fmt::Display,
    index: u64,
) -> Result<&'a [u8]> {
    let corrupt = || StoreError::Corrupt {
        object: object.to_string(),
        chunk: index,
    };
    let (stored, data) = split_chunk(raw).ok_or_else(corrupt)?;
    if data.len() != expected_len as usize || blake3::hash(data).as_bytes() != &stored {
        return Err(corrupt());
    }
    Ok(data)
}

/// Canonical form of chunk content: trailing zeros dropped, an all-zero chunk not stored at all.
/// Replicas with the same bytes therefore store the same values whatever their write history,
/// which is what makes deep-scrub digests comparable.
pub(crate) fn canonical(mut data: Vec<u8>) -> Option<Vec<u8>> {
    let keep = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    data.truncate(keep);
    (!data.is_empty()).then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onode_round_trip_and_garbage() {
        let mut o = Onode {
            size: 100_000,
            ..Default::default()
        };
        o.chunks.insert(1, 100);
        o.xattrs.insert("_".into(), Bytes::from_static(b"v"));
        assert_eq!(Onode::decode(&o.encode(), &"x").unwrap(), o);
        for raw in [&[][..], &[9, 1, 2], &[1, 0xFF, 0xFF, 0xFF]] {
            assert!(matches!(
                Onode::decode(raw, &"x"),
                Err(StoreError::CorruptMetadata { .. })
            ));
        }
        o.chunks.insert(2, 65536); // beyond size
        assert!(Onode::decode(&o.encode(), &"x").is_err());
    }

    #[test]
    fn chunk_verification() {
        let v = encode_chunk(b"hello");
        assert_eq!(verify_chunk(&v, 5, &"o", 0).unwrap(), b"hello");
        assert!(verify_chunk(&v, 4, &"o", 0).is_err());
        let mut bad = v.clone();
        bad[33] ^= 1;
        assert_eq!(
            verify_chunk(&bad, 5, &"o", 3),
            Err(StoreError::Corrupt {
                object: "o".into(),
                chunk: 3
            })
        );
        assert!(verify_chunk(&v[..10], 5, &"o", 0).is_err());
    }

    #[test]
    fn canonical_trims_zeros() {
        assert_eq!(canonical(vec![0, 0, 0]), None);
        assert_eq!(canonical(vec![1, 0, 2, 0, 0]), Some(vec![1, 0, 2]));
    }
}
