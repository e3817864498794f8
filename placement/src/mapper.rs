//! The CRUSH mapping function: straw2 selection, `firstn` / `indep` choose with retries, and the
//! rule interpreter. Pure and allocation-free: working sets live in fixed stack arrays.

use crate::hash::{hash32_2, DrawHasher};
use crate::ln::NEG_LOG2;
use crate::map::{ChooseMode, CrushMap, RuleStep};
use crate::{DeviceStates, OsdId, PlacementError, RuleId, MAX_POOL_SIZE, NONE, WEIGHT_ONE};

/// Descents from the root per replica before giving up on it (Ceph "choose_total_tries" 50,
/// the "optimal" tunable): enough for a map with one usable host in ~20 to still fill, while a
/// map that really cannot place a copy fails in bounded time.
pub const CHOOSE_TOTAL_TRIES: u32 = 50;
/// Attempts at the leaf level per descent (Ceph "chooseleaf_descend_once" = 1): a rejected leaf
/// restarts from the root with a new `r` instead of retrying inside the same host, which is what
/// keeps an out OSD's data spread over the whole cluster rather than piled onto its siblings.
const LEAF_TRIES: u32 = 1;

const UNDEF: i32 = i32::MAX - 1;
const NONE_ITEM: i32 = NONE as i32;

/// straw2: every item draws `-log2(U)/weight` (an exponential with rate ∝ weight) and the
/// smallest wins, so `P(item) = w / Σw` and each draw depends only on `(x, item, r, own weight)`
/// — changing one item's weight only moves inputs onto or off that item. Computed as
/// `neg_log2 * (u64::MAX / w)` in 128-bit integers. Ties (same 16-bit hash and weight) go to the
/// lower id because items are stored sorted. `None` if no item has positive weight.
#[inline]
pub(crate) fn straw2_choose(
    table: &[u32; 1 << 16],
    b: &StrawView<'_>,
    x: u32,
    r: u32,
) -> Option<i32> {
    let h = DrawHasher::new(x, r);
    if b.uniform {
        return straw2_uniform(b.items, h);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked; same integer code, bit-identical results.
        return unsafe { straw2_general_avx2(table, b.items, b.recips, h) };
    }
    straw2_general(table, b.items, b.recips, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn straw2_general_avx2(
    table: &[u32; 1 << 16],
    items: &[i32],
    recips: &[u64],
    h: DrawHasher,
) -> Option<i32> {
    straw2_general(table, items, recips, h)
}

/// Hashes a chunk of items first (a pure u32 loop the compiler vectorises), then scores them.
#[inline(always)]
fn straw2_general(
    table: &[u32; 1 << 16],
    items: &[i32],
    recips: &[u64],
    h: DrawHasher,
) -> Option<i32> {
    const CHUNK: usize = 16;
    let mut best = u128::MAX;
    let mut best_item = None;
    for (ci, ri) in items.chunks(CHUNK).zip(recips.chunks(CHUNK)) {
        let mut us = [0u32; CHUNK];
        for (u, &item) in us.iter_mut().zip(ci) {
            *u = h.hash(item as u32) & 0xffff;
        }
        for ((&u, &item), &recip) in us.iter().zip(ci).zip(ri) {
            if recip == 0 {
                continue;
            }
            let score = table[u as usize] as u128 * recip as u128;
            if score < best {
                best = score;
                best_item = Some(item);
            }
        }
    }
    best_item
}

/// Fast path for buckets whose items all have the same positive weight (the usual host, and the
/// root of a homogeneous cluster). Exactly equivalent to the general path: with one shared
/// reciprocal the smallest `table[u] * recip` is the smallest `table[u]`, and the table is
/// strictly decreasing, so the winner is the largest `u`, ties to the lowest index. Packing
/// `(u, !index)` into one word makes that a plain max-reduction the compiler vectorises, and
/// skips the table and the 128-bit multiply.
#[inline]
fn straw2_uniform(items: &[i32], h: DrawHasher) -> Option<i32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above). The body is the same integer code,
        // only compiled with wider vectors, so results are bit-identical to the portable path.
        return unsafe { straw2_uniform_avx2(items, h) };
    }
    straw2_uniform_portable(items, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn straw2_uniform_avx2(items: &[i32], h: DrawHasher) -> Option<i32> {
    straw2_uniform_portable(items, h)
}

#[inline(always)]
fn straw2_uniform_portable(items: &[i32], h: DrawHasher) -> Option<i32> {
    let mut best = 0u32;
    for (i, &item) in items.iter().enumerate() {
        let key = ((h.hash(item as u32) & 0xffff) << 16) | (0xffff - i as u32);
        best = best.max(key);
    }
    items.get((0xffff - (best & 0xffff)) as usize).copied()
}

/// The per-bucket arrays straw2 reads.
pub(crate) struct StrawView<'a> {
    pub(crate) items: &'a [i32],
    pub(crate) recips: &'a [u64],
    /// All weights equal and positive, and at most 65,536 items (the packed index is 16 bits).
    pub(crate) uniform: bool,
}

/// What one descent produced.
enum Attempt {
    Accept(i32),
    /// Collision, out device, empty bucket: retry from the root with the next `r`.
    Reject,
    /// The hierarchy cannot produce the wanted type on this path (a device where a bucket was
    /// expected, a dangling id): retrying cannot help.
    Skip,
}

struct Ctx<'a, D: DeviceStates> {
    map: &'a CrushMap,
    devices: &'a D,
    table: &'a [u32; 1 << 16],
    x: u32,
}

impl<D: DeviceStates> Ctx<'_, D> {
    fn choose(&self, bucket: i32, r: u32) -> Option<i32> {
        let b = self.map.bucket(bucket)?;
        straw2_choose(self.table, &b.view(), self.x, r)
    }

    /// CRUSH type of an item: 0 for devices; `None` for a dangling bucket id.
    fn type_of(&self, item: i32) -> Option<u8> {
        if item >= 0 {
            Some(0)
        } else {
            self.map.bucket(item).map(|b| b.kind.type_id())
        }
    }

    /// OSDMap "in/out" filter. Fractional reweights keep the device for the fraction of inputs
    /// whose `hash32_2(x, osd)` coin falls under the reweight, so lowering a reweight sheds
    /// exactly that share and nothing else. Nonexistent OSDs are out, so they never reach `raw`.
    fn is_out(&self, osd: i32) -> bool {
        let id = osd as OsdId;
        if !self.devices.exists(id) {
            return true;
        }
        let w = self.devices.reweight(id);
        if w >= WEIGHT_ONE {
            return false;
        }
        if w == 0 {
            return true;
        }
        (hash32_2(self.x, id) & 0xffff) >= w
    }

    /// Walk down from `bucket` with a fixed `r` until an item of `want` type appears.
    fn descend(&self, mut bucket: i32, want: u8, r: u32) -> Result<(i32, u8), Attempt> {
        loop {
            let item = self.choose(bucket, r).ok_or(Attempt::Reject)?;
            let t = self.type_of(item).ok_or(Attempt::Skip)?;
            if t == want {
                return Ok((item, t));
            }
            if item >= 0 || t < want {
                return Err(Attempt::Skip);
            }
            bucket = item;
        }
    }

    /// One leaf under `bucket` (chooseleaf's inner step, "stable" form: one replica with
    /// `r = parent_r + ftotal`, so a leaf's choice does not depend on how many copies precede it).
    fn leaf_firstn(&self, bucket: i32, parent_r: u32, taken: &[i32]) -> Option<i32> {
        for ftotal in 0..LEAF_TRIES {
            let r = parent_r.wrapping_add(ftotal);
            match self.descend(bucket, 0, r) {
                Ok((leaf, _)) if !taken.contains(&leaf) && !self.is_out(leaf) => return Some(leaf),
                Ok(_) | Err(Attempt::Reject) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// `firstn`: replica `rep` tries `r = rep + ftotal`, re-descending from `bucket` on every
    /// rejection, until it sticks or `CHOOSE_TOTAL_TRIES` run out (then the replica is skipped and
    /// the result is short). Returns how many were placed into `out` (and `leaves` if given).
    fn choose_firstn(
        &self,
        bucket: i32,
        numrep: usize,
        want: u8,
        out: &mut [i32],
        mut leaves: Option<&mut [i32]>,
    ) -> usize {
        let mut outpos = 0;
        for rep in 0..numrep {
            if outpos >= out.len() {
                break;
            }
            let mut ftotal = 0u32;
            loop {
                let r = (rep as u32).wrapping_add(ftotal);
                let attempt = match self.descend(bucket, want, r) {
                    Err(a) => a,
                    Ok((item, _)) if out[..outpos].contains(&item) => Attempt::Reject,
                    Ok((item, t)) => match leaves.as_deref_mut() {
                        Some(lv) if item < 0 => {
                            // chooseleaf_vary_r=1: the leaf descent reuses this r.
                            match self.leaf_firstn(item, r, &lv[..outpos]) {
                                Some(leaf) => {
                                    lv[outpos] = leaf;
                                    Attempt::Accept(item)
                                }
                                None => Attempt::Reject,
                            }
                        }
                        lv => {
                            if let Some(lv) = lv {
                                lv[outpos] = item;
                            }
                            if t == 0 && self.is_out(item) {
                                Attempt::Reject
                            } else {
                                Attempt::Accept(item)
                            }
                        }
                    },
                };
                match attempt {
                    Attempt::Accept(item) => {
                        out[outpos] = item;
                        outpos += 1;
                        break;
                    }
                    Attempt::Skip => break,
                    Attempt::Reject => {
                        ftotal += 1;
                        if ftotal >= CHOOSE_TOTAL_TRIES {
                            break;
                        }
                    }
                }
            }
        }
        outpos
    }

    /// `indep`: every position keeps its own `r = rep + numrep * ftotal` sequence, and all
    /// still-empty positions are retried round by round, so losing one position's device never
    /// shifts the others (erasure-code shards must stay put). Unfillable positions become
    /// [`NONE`].
    fn choose_indep(
        &self,
        bucket: i32,
        numrep: usize,
        want: u8,
        out: &mut [i32],
        mut leaves: Option<&mut [i32]>,
    ) {
        let n = out.len();
        out.fill(UNDEF);
        if let Some(lv) = leaves.as_deref_mut() {
            lv.fill(UNDEF);
        }
        let mut left = n;
        let mut ftotal = 0u32;
        while left > 0 && ftotal < CHOOSE_TOTAL_TRIES {
            for rep in 0..n {
                if out[rep] != UNDEF {
                    continue;
                }
                let r = (rep as u32).wrapping_add((numrep as u32).wrapping_mul(ftotal));
                let (item, t) = match self.descend(bucket, want, r) {
                    Ok(v) => v,
                    Err(Attempt::Skip) => {
                        out[rep] = NONE_ITEM;
                        if let Some(lv) = leaves.as_deref_mut() {
                            lv[rep] = NONE_ITEM;
                        }
                        left -= 1;
                        continue;
                    }
                    Err(_) => continue,
                };
                if out.contains(&item) {
                    continue;
                }
                if let Some(lv) = leaves.as_deref_mut() {
                    if item < 0 {
                        match self.leaf_indep(item, r, numrep as u32) {
                            Some(leaf) => lv[rep] = leaf,
                            None => continue,
                        }
                    } else {
                        lv[rep] = item;
                    }
                }
                if t == 0 && self.is_out(item) {
                    continue;
                }
                out[rep] = item;
                left -= 1;
            }
            ftotal += 1;
        }
        for slot in out.iter_mut() {
            if *slot == UNDEF {
                *slot = NONE_ITEM;
            }
        }
        if let Some(lv) = leaves {
            for (slot, o) in lv.iter_mut().zip(out.iter()) {
                if *slot == UNDEF || *o == NONE_ITEM {
                    *slot = NONE_ITEM;
                }
            }
        }
    }

    fn leaf_indep(&self, bucket: i32, parent_r: u32, numrep: u32) -> Option<i32> {
        for ftotal in 0..LEAF_TRIES {
            let r = parent_r.wrapping_add(numrep.wrapping_mul(ftotal));
            match self.descend(bucket, 0, r) {
                Ok((leaf, _)) if !self.is_out(leaf) => return Some(leaf),
                Ok(_) | Err(Attempt::Reject) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

/// Fixed-capacity working set; rules never produce more than `MAX_POOL_SIZE` items.
struct Set {
    items: [i32; MAX_POOL_SIZE],
    len: usize,
}

impl Set {
    const fn new() -> Self {
        Set {
            items: [0; MAX_POOL_SIZE],
            len: 0,
        }
    }
    fn as_slice(&self) -> &[i32] {
        &self.items[..self.len]
    }
}

impl CrushMap {
    /// Run rule `rule` for CRUSH input `x` wanting `size` results, appending OSD ids to `out`
    /// (cleared first). `firstn` results are compact and may be shorter than `size`; `indep`
    /// results are positional with [`NONE`] holes. Never allocates beyond `out`.
    pub fn do_rule(
        &self,
        rule: RuleId,
        x: u32,
        size: usize,
        devices: &impl DeviceStates,
        out: &mut Vec<OsdId>,
    ) -> Result<(), PlacementError> {
        out.clear();
        let r = self
            .rules
            .get(&rule)
            .ok_or(PlacementError::UnknownRule { rule })?;
        if size > MAX_POOL_SIZE {
            return Err(PlacementError::SizeTooLarge {
                size,
                max: MAX_POOL_SIZE,
            });
        }
        let ctx = Ctx {
            map: self,
            devices,
            table: &NEG_LOG2,
            x,
        };
        let mut w = Set::new();
        let mut o = Set::new();
        let mut c = Set::new();
        for step in &r.steps {
            match step {
                RuleStep::Take(name) => {
                    let id = self
                        .bucket_id(name)
                        .ok_or_else(|| PlacementError::UnknownBucket { name: name.clone() })?;
                    w.items[0] = id;
                    w.len = 1;
                }
                RuleStep::Choose { mode, count, kind }
                | RuleStep::ChooseLeaf { mode, count, kind } => {
                    let leaf = matches!(step, RuleStep::ChooseLeaf { .. });
                    let numrep = if *count > 0 {
                        *count as usize
                    } else {
                        (size as i64 + *count as i64).max(0) as usize
                    };
                    if numrep == 0 {
                        continue;
                    }
                    o.len = 0;
                    c.len = 0;
                    for i in 0..w.len {
                        let bucket = w.items[i];
                        let room = MAX_POOL_SIZE.min(size) - o.len;
                        if bucket >= 0 || room == 0 {
                            continue;
                        }
                        let (os, cs) = (&mut o.items[o.len..], &mut c.items[o.len..]);
                        let placed = match mode {
                            ChooseMode::FirstN => ctx.choose_firstn(
                                bucket,
                                numrep,
                                kind.type_id(),
                                &mut os[..room.min(numrep)],
                                leaf.then_some(cs),
                            ),
                            ChooseMode::Indep => {
                                let n = room.min(numrep);
                                ctx.choose_indep(
                                    bucket,
                                    numrep,
                                    kind.type_id(),
                                    &mut os[..n],
                                    leaf.then_some(&mut cs[..n]),
                                );
                                n
                            }
                        };
                        o.len += placed;
                    }
                    if leaf {
                        w.items[..o.len].copy_from_slice(&c.items[..o.len]);
                    } else {
                        w.items[..o.len].copy_from_slice(&o.items[..o.len]);
                    }
                    w.len = o.len;
                }
                RuleStep::Emit => {
                    for &item in w.as_slice() {
                        if out.len() >= size {
                            break;
                        }
                        // A non-device here means the rule stopped above the leaves; it cannot
                        // be stored in an OSD list, so it is reported as a hole.
                        out.push(if item >= 0 { item as OsdId } else { NONE });
                    }
                    w.len = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Rule;
    use crate::{AllUp, WEIGHT_ONE};

    fn view<'a>(items: &'a [i32], recips: &'a [u64], uniform: bool) -> StrawView<'a> {
        StrawView {
            items,
            recips,
            uniform,
        }
    }

    fn recips(w: &[u32]) -> Vec<u64> {
        w.iter()
            .map(|&w| if w == 0 { 0 } else { u64::MAX / w as u64 })
            .collect()
    }

    /// straw2's defining property, exactly: changing one item's weight only moves inputs onto
    /// (weight up) or off (weight down) that item; removing it only moves its own inputs.
    #[test]
    fn straw2_weight_change_moves_only_that_item() {
        let items: Vec<i32> = (0..20).collect();
        let w: Vec<u32> = (0..20).map(|i| WEIGHT_ONE / 4 * (1 + i % 7)).collect();
        let base = recips(&w);
        let t = &*NEG_LOG2;
        for (new_w, up) in [(w[7] * 3, true), (w[7] / 3, false), (0, false)] {
            let mut w2 = w.clone();
            w2[7] = new_w;
            let changed = recips(&w2);
            let mut moved = 0;
            for x in 0..100_000u32 {
                let a = straw2_choose(t, &view(&items, &base, false), x, 0).unwrap();
                let b = straw2_choose(t, &view(&items, &changed, false), x, 0).unwrap();
                if a != b {
                    moved += 1;
                    if up {
                        assert_eq!(b, 7, "x={x}: {a} -> {b}");
                    } else {
                        assert_eq!(a, 7, "x={x}: {a} -> {b}");
                    }
                }
            }
            assert!(moved > 0);
        }
    }

    #[test]
    fn straw2_uniform_fast_path_equals_general_path() {
        let t = &*NEG_LOG2;
        for n in [1usize, 2, 3, 10, 100] {
            let items: Vec<i32> = (0..n as i32).map(|i| i * 3 - 40).collect();
            let rc = recips(&vec![WEIGHT_ONE * 2; n]);
            for x in 0..20_000u32 {
                for r in [0u32, 1, 7] {
                    let general = straw2_choose(t, &view(&items, &rc, false), x, r);
                    assert_eq!(straw2_choose(t, &view(&items, &rc, true), x, r), general);
                    // The non-AVX2 build of the fast path too (other machines run it).
                    let portable = straw2_uniform_portable(&items, DrawHasher::new(x, r));
                    assert_eq!(portable, general);
                }
            }
        }
    }

    #[test]
    fn straw2_weight_zero_never_wins() {
        let t = &*NEG_LOG2;
        let items = [0, 1, 2];
        let rc = recips(&[WEIGHT_ONE, 0, 1]);
        for x in 0..50_000 {
            assert_ne!(straw2_choose(t, &view(&items, &rc, false), x, 0), Some(1));
        }
        assert_eq!(
            straw2_choose(t, &view(&items, &recips(&[0, 0, 0]), false), 1, 0),
            None
        );
        assert_eq!(straw2_choose(t, &view(&[], &[], false), 1, 0), None);
    }

    struct Out(OsdId);
    impl DeviceStates for Out {
        fn exists(&self, _: OsdId) -> bool {
            true
        }
        fn is_up(&self, _: OsdId) -> bool {
            true
        }
        fn reweight(&self, osd: OsdId) -> u32 {
            if osd == self.0 {
                0
            } else {
                WEIGHT_ONE
            }
        }
    }

    /// indep keeps positions: losing one OSD refills only its own position from a spare host —
    /// other positions keep their OSD except where the refilling position wins a retry race for a
    /// host another position was about to take (Ceph's indep has the same race); counted and
    /// bounded. With no spare host there is exactly one NONE hole, but the race means it is not
    /// always at the lost OSD's position (measured ~40 % of PGs with 4 hosts for 4 shards). A
    /// tighter guarantee would need a different algorithm than CRUSH's round-robin retries.
    #[test]
    fn indep_positions_are_stable_and_holes_are_marked() {
        for hosts in [4u32, 5, 8] {
            let mut m = CrushMap::new();
            for h in 0..hosts {
                m.add_osd(h, &format!("h{h}"), WEIGHT_ONE).unwrap();
            }
            m.set_rule(1, Rule::indep("ec")).unwrap();
            let (mut before, mut after) = (Vec::new(), Vec::new());
            let (mut holes, mut shifted) = (0, 0);
            const N: u32 = 5_000;
            for x in 0..N {
                m.do_rule(1, x, 4, &AllUp, &mut before).unwrap();
                assert_eq!(before.len(), 4);
                assert!(before.iter().all(|&o| o != NONE), "{before:?}");
                let victim = before[(x % 4) as usize];
                m.do_rule(1, x, 4, &Out(victim), &mut after).unwrap();
                assert_eq!(after.len(), 4, "positional output keeps its length");
                assert!(!after.contains(&victim));
                let filled = after.iter().filter(|&&o| o != NONE).count();
                assert!(filled <= 4.min(hosts as usize - 1), "x={x}: {after:?}");
                holes += 4 - filled;
                let others_moved = before
                    .iter()
                    .zip(&after)
                    .any(|(&b, &a)| b != victim && a != b);
                shifted += others_moved as u32;
            }
            if hosts == 4 {
                assert_eq!(holes, N as usize, "exactly one hole per PG");
            }
            println!("{hosts} hosts: {holes} holes, {shifted} PGs with another position moved");
            if hosts > 4 {
                // 50 rounds can (very rarely) miss the one spare host; reported as a hole.
                assert!(
                    holes * 1000 <= N as usize,
                    "{holes} holes despite a spare host"
                );
                // Measured: 5 hosts ~20 % (one spare host, heavy contention), 8 hosts ~6 %.
                let bound = if hosts == 5 { N / 4 } else { N / 10 };
                assert!(shifted <= bound, "{hosts} hosts: {shifted} PGs shifted");
            }
        }
    }

    #[test]
    fn firstn_with_racks_respects_host_domain() {
        let mut m = CrushMap::new();
        for h in 0..6u32 {
            m.add_osd(h * 2, &format!("h{h}"), WEIGHT_ONE).unwrap();
            m.add_osd(h * 2 + 1, &format!("h{h}"), WEIGHT_ONE).unwrap();
            m.move_host(&format!("h{h}"), Some(&format!("r{}", h % 2)))
                .unwrap();
        }
        // Two racks, one copy per rack: take default; chooseleaf firstn 0 type rack; emit.
        let mut rack_rule = Rule::replicated("per-rack");
        rack_rule.steps[1] = RuleStep::ChooseLeaf {
            mode: ChooseMode::FirstN,
            count: 0,
            kind: crate::NodeKind::Rack,
        };
        m.set_rule(2, rack_rule).unwrap();
        let mut out = Vec::new();
        for x in 0..5_000 {
            m.do_rule(2, x, 3, &AllUp, &mut out).unwrap();
            assert_eq!(out.len(), 2, "only two racks exist");
            // hosts h0,h2,h4 are in r0 → their OSDs are 0,1,4,5,8,9
            let rack = |o: OsdId| (o / 2) % 2;
            assert_ne!(rack(out[0]), rack(out[1]));
        }
    }
}
