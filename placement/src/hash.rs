//! Integer hashing that every client, OSD and monitor must compute bit-for-bit alike.
//!
//! Everything here is Bob Jenkins' *lookup3* (2006, public domain), written from its published
//! description: `hashword` for CRUSH's fixed-arity integer inputs and `hashlittle` for object
//! names. Why lookup3 and not `std::hash` / SipHash / blake3:
//! - `std::hash::Hash` promises nothing across Rust versions or platforms (`usize` width, enum
//!   layout), and a placement hash that changes under a toolchain upgrade silently moves every
//!   object in the cluster.
//! - lookup3 is pure 32-bit add/xor/rotate arithmetic with wrapping semantics: no floats, no
//!   endianness (bytes are read explicitly little-endian), no tables, so it is identical on every
//!   build and target.
//! - Its `final` step is designed to avalanche all of `(a, b, c)` into `c`; straw2 only needs 16
//!   well-mixed bits per draw, and a 3-word key costs exactly one `final` (21 ALU ops), which is
//!   what keeps a 1,000-OSD mapping in the microsecond range. blake3 would add a dependency and
//!   ~10x the cost per draw for collision resistance the placement function does not need.
//!
//! The initial value [`SEED`] is basalt's own, so basalt placements are deliberately *not*
//! comparable with Ceph's (which uses a different Jenkins variant and seed).

/// Initial value for every placement hash. Changing it moves every object: never do that.
pub const SEED: u32 = 0x6261_7361; // "basa"

const GOLDEN: u32 = 0xdead_beef;

#[inline(always)]
fn final_mix(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

#[inline(always)]
fn block_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3 `hashword` of the two words `[a, b]`. Used for the PG → CRUSH input (`pps`) and for the
/// fractional-reweight "is this device out for this input" coin.
#[inline]
pub fn hash32_2(a: u32, b: u32) -> u32 {
    let init = GOLDEN.wrapping_add(2 << 2).wrapping_add(SEED);
    final_mix(a.wrapping_add(init), b.wrapping_add(init), init)
}

/// lookup3 `hashword` of the three words `[a, b, c]`. Used for straw2 draws as
/// `hash32_3(x, item, r)`.
#[inline]
pub fn hash32_3(a: u32, b: u32, c: u32) -> u32 {
    let init = GOLDEN.wrapping_add(3 << 2).wrapping_add(SEED);
    final_mix(
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    )
}

/// Straw2's inner loop evaluates `hash32_3(x, item, r)` for every item of a bucket with the same
/// `(x, r)`; precomputing the first two lanes lets the compiler keep them in registers.
#[derive(Clone, Copy)]
pub(crate) struct DrawHasher {
    a: u32,
    b: u32,
    init: u32,
}

impl DrawHasher {
    #[inline(always)]
    pub(crate) fn new(x: u32, r: u32) -> Self {
        let init = GOLDEN.wrapping_add(3 << 2).wrapping_add(SEED);
        DrawHasher {
            a: x.wrapping_add(init),
            b: init.wrapping_add(r),
            init,
        }
    }

    /// Equal to `hash32_3(x, item, r)` — note the argument order: the item is the *middle* word.
    #[inline(always)]
    pub(crate) fn hash(self, item: u32) -> u32 {
        // hash32_3(x, item, r) = final(x+init, item+init, r+init); keep that order.
        final_mix(self.a, item.wrapping_add(self.init), self.b)
    }
}

/// lookup3 `hashlittle` over arbitrary bytes, reading words little-endian explicitly so the
/// result does not depend on the host's byte order. Used for object names (→ placement seed).
pub fn hash_bytes(data: &[u8]) -> u32 {
    hashlittle(data, SEED)
}

fn hashlittle(data: &[u8], initval: u32) -> u32 {
    let init = GOLDEN.wrapping_add(data.len() as u32).wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut rest = data;
    while rest.len() > 12 {
        a = a.wrapping_add(le_word(&rest[0..4]));
        b = b.wrapping_add(le_word(&rest[4..8]));
        c = c.wrapping_add(le_word(&rest[8..12]));
        block_mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        // Only reachable for empty input: lookup3 returns the untouched state.
        return c;
    }
    let mut tail = [0u8; 12];
    tail[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(le_word(&tail[0..4]));
    b = b.wrapping_add(le_word(&tail[4..8]));
    c = c.wrapping_add(le_word(&tail[8..12]));
    final_mix(a, b, c)
}

#[inline(always)]
fn le_word(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jenkins' published self-test values for lookup3 `hashlittle`, proving this is lookup3.
    #[test]
    fn matches_lookup3_reference() {
        assert_eq!(hashlittle(b"", 0), 0xdeadbeef);
        assert_eq!(hashlittle(b"Four score and seven years ago", 0), 0x17770551);
        assert_eq!(hashlittle(b"Four score and seven years ago", 1), 0xcd628161);
    }

    #[test]
    fn draw_hasher_matches_hash32_3() {
        for x in [0u32, 1, 7, 0xdead_beef, u32::MAX] {
            for r in [0u32, 1, 2, 49, u32::MAX] {
                let h = DrawHasher::new(x, r);
                for item in [0u32, 1, 999, (-1i32) as u32, (-77i32) as u32] {
                    assert_eq!(h.hash(item), hash32_3(x, item, r));
                }
            }
        }
    }

    /// Golden values: if these change, every placement in every cluster changes.
    #[test]
    fn golden_hashes() {
        let got = [
            hash32_2(0, 0),
            hash32_2(1, 2),
            hash32_3(0, 0, 0),
            hash32_3(1, 2, 3),
            hash_bytes(b""),
            hash_bytes(b"a"),
            hash_bytes(b"rbd_data.1234.0000000000000000"),
        ];
        assert_eq!(
            got, GOLDEN_HASHES,
            "hash output changed: this is a placement-breaking change"
        );
    }
    const GOLDEN_HASHES: [u32; 7] = [
        3628441068, 3638389907, 2824525275, 2077665070, 1091514960, 2788757651, 2417273977,
    ];

    #[test]
    fn low_bits_are_uniform_over_sequential_items() {
        // straw2 uses only the low 16 bits; sequential ids are the common case.
        let mut buckets = [0u32; 16];
        for item in 0..160_000u32 {
            buckets[(hash32_3(12345, item, 0) & 0xf) as usize] += 1;
        }
        for n in buckets {
            assert!((9_500..10_500).contains(&n), "{buckets:?}");
        }
    }
}
