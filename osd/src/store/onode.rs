//! The onode: an object's metadata record.

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
    /// chunk index → stored data length (1..=CHUNK_SIZE, trailing zeros trimmed). Presence here
    /// is what distinguishes a hole (reads as zeros) from a chunk that should exist: a listed
    /// chunk whose extent record is missing is reported as corruption instead of silently
    /// reading as zeros.
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
}
