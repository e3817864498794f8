//! Decoding that shares payloads with the received buffer instead of copying them.
//!
//! A reply or request arrives as one `Bytes` (the messenger hands out each frame's payload
//! without a copy, and prost's `bytes` fields slice it). postcard, given that buffer as a
//! slice, would copy every `Bytes` field out of it: for a 1 MiB read that is a second copy of
//! the data in the gateway. [`decode_shared`] instead makes the fields marked
//! `#[serde(with = "crate::shared::payload")]` slices of the buffer (`Bytes::slice_ref`):
//! same bytes, same encoding, no copy. Other decoders (`decode`, JSON) copy as before.
//!
//! How the field's deserializer finds the buffer: a thread-local set for the duration of one
//! synchronous `decode_shared` call. serde offers no other way to pass context to a field,
//! and postcard decodes on the calling thread without yielding, so the value cannot leak into
//! another decode.

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serializer};

use crate::OpError;

thread_local! {
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Restores the previous source when a decode ends (or unwinds).
struct Restore(Option<Bytes>);

impl Drop for Restore {
    fn drop(&mut self) {
        let prev = self.0.take();
        SOURCE.with(|s| *s.borrow_mut() = prev);
    }
}

/// [`crate::decode`], with the payload fields of the result sharing `b`'s memory.
pub fn decode_shared<T: for<'de> Deserialize<'de>>(b: &Bytes, what: &str) -> Result<T, OpError> {
    let prev = SOURCE.with(|s| s.replace(Some(b.clone())));
    let _restore = Restore(prev);
    crate::decode(b, what)
}

/// A slice of the current source if `v` lies inside it, else a copy.
fn share(v: &[u8]) -> Bytes {
    SOURCE.with(|s| match s.borrow().as_ref() {
        Some(src) if !v.is_empty() && contains(src, v) => src.slice_ref(v),
        _ => Bytes::copy_from_slice(v),
    })
}

fn contains(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
}

/// `#[serde(with = "crate::shared::payload")]`: a `Bytes` field encoded as serde bytes (as
/// `Bytes`' own impl does, so the wire format is unchanged) and decoded by sharing.
pub mod payload {
    use super::*;

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        d.deserialize_bytes(PayloadVisitor)
    }

    struct PayloadVisitor;

    impl<'de> Visitor<'de> for PayloadVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(share(v))
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(Bytes::from(v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, ObjOp, OpOutput, OpResult};

    #[test]
    fn payloads_share_the_buffer_and_decode_as_before() {
        let data = Bytes::from(vec![7u8; 4096]);
        let reply = encode(&Ok::<_, OpError>(OpResult {
            version: Default::default(),
            outputs: vec![OpOutput::Data(data.clone()), OpOutput::None],
        }));
        let shared: Result<OpResult, OpError> = decode_shared(&reply, "reply").unwrap();
        let copied: Result<OpResult, OpError> = decode(&reply, "reply").unwrap();
        assert_eq!(shared, copied);
        let OpOutput::Data(got) = &shared.unwrap().outputs[0] else {
            panic!("not data");
        };
        assert_eq!(got, &data);
        assert!(contains(&reply, got), "the payload was copied");
        let OpOutput::Data(got) = &copied.unwrap().outputs[0] else {
            panic!("not data");
        };
        assert!(
            !contains(&reply, got),
            "a plain decode must not depend on the source"
        );

        // Requests too, and the source does not outlive the call.
        let ops = encode(&vec![ObjOp::Write {
            offset: 4096,
            data: data.clone(),
        }]);
        let got: Vec<ObjOp> = decode_shared(&ops, "ops").unwrap();
        let ObjOp::Write { data: d, .. } = &got[0] else {
            panic!("not a write");
        };
        assert!(contains(&ops, d) && d == &data);
        assert!(SOURCE.with(|s| s.borrow().is_none()));
    }
}
