//! Fixed-point logarithm table for straw2, derived once per process by an integer algorithm.
//!
//! straw2 needs `-ln(U)` for a uniform `U` in (0, 1) to turn a hash into an exponential draw.
//! `f64::ln` is not guaranteed bit-identical across libm implementations, and one differing bit
//! can flip which OSD wins, so the table is built with integers only: `log2` by repeated squaring
//! of a 62-bit fixed-point mantissa (each squaring yields one fractional bit). The base does not
//! matter — every draw is scaled by the same constant — so log2 is used.
//!
//! Deviation from Ceph's `crush_ln(u) - 2^48` (documented in the crate docs): the 16-bit hash `u`
//! is mapped to the *midpoint* `(2u + 1) / 2^17` of its interval instead of `(u + 1) / 2^16`.
//! With the latter, `u = 0xffff` gives a draw of exactly 0 which beats every other item whatever
//! its weight (weight stops mattering for 1 in 65,536 draws); with midpoints every draw is
//! strictly positive and still a faithful quantised exponential.

use std::sync::LazyLock;

/// Fractional bits of the table entries.
pub const LN_FRAC_BITS: u32 = 27;

/// `floor(log2(v) * 2^27)` for `1 <= v <= 2^17`, integers only.
pub const fn log2_fixed(v: u32) -> u32 {
    let k = 31 - v.leading_zeros();
    // mantissa v / 2^k in [1, 2) as Q1.62
    let mut m: u64 = (v as u64) << (62 - k);
    let mut frac: u32 = 0;
    let mut i = 0;
    while i < LN_FRAC_BITS {
        let sq = ((m as u128) * (m as u128)) >> 62;
        frac <<= 1;
        if sq >= (2u128 << 62) {
            frac |= 1;
            m = (sq >> 1) as u64;
        } else {
            m = sq as u64;
        }
        i += 1;
    }
    (k << LN_FRAC_BITS) | frac
}

fn build_table() -> Box<[u32; 1 << 16]> {
    let mut t = Box::new([0u32; 1 << 16]);
    for (u, slot) in t.iter_mut().enumerate() {
        *slot = (17u32 << LN_FRAC_BITS) - log2_fixed(2 * u as u32 + 1);
    }
    t
}

/// `NEG_LOG2[u] = -log2((2u + 1) / 2^17) * 2^27`, all strictly positive and strictly decreasing.
/// 256 KiB: fits in L2 next to the bucket arrays, and one load beats Ceph-style interpolation.
/// Built at first use (~2 ms) rather than in const eval, which would add seconds to every build
/// of every crate depending on this one; the integer algorithm makes both equally deterministic.
pub static NEG_LOG2: LazyLock<Box<[u32; 1 << 16]>> = LazyLock::new(build_table);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_strictly_decreasing_and_positive() {
        for u in 1..NEG_LOG2.len() {
            assert!(NEG_LOG2[u] < NEG_LOG2[u - 1], "u={u}");
        }
        assert!(NEG_LOG2[0xffff] > 0);
        assert_eq!(NEG_LOG2[0], 17 << LN_FRAC_BITS);
    }

    #[test]
    fn table_matches_float_log_closely() {
        // Floats only check the integer derivation; they never feed a placement.
        for v in [1u32, 2, 3, 5, 1000, 65535, 65536, 131071] {
            let exact = (v as f64).log2() * (1u64 << LN_FRAC_BITS) as f64;
            let got = log2_fixed(v) as f64;
            assert!((exact - got).abs() <= 2.0, "v={v} exact={exact} got={got}");
        }
        for u in (0..65536u32).step_by(97) {
            let exact = -(((2 * u + 1) as f64) / 131072.0).log2() * (1u64 << LN_FRAC_BITS) as f64;
            assert!((exact - NEG_LOG2[u as usize] as f64).abs() <= 2.0, "u={u}");
        }
    }
}
