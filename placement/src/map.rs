//! The CRUSH hierarchy and rules: root "default" → (rack →) host → osd, straw2 buckets only.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{OsdId, PlacementError, RuleId, DEFAULT_RULE, MAX_OSD_ID};

/// Name of the root bucket every map has.
pub const ROOT_NAME: &str = "default";
const ROOT_ID: i32 = -1;

/// Kind (CRUSH "type") of a node in the hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeKind {
    Root,
    Rack,
    Host,
    Osd,
}

impl NodeKind {
    /// CRUSH type number; devices are 0 as in Ceph, and a parent's type is always greater.
    pub(crate) const fn type_id(self) -> u8 {
        match self {
            NodeKind::Osd => 0,
            NodeKind::Host => 1,
            NodeKind::Rack => 2,
            NodeKind::Root => 3,
        }
    }
}

impl std::fmt::Display for NodeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeKind::Root => "root",
            NodeKind::Rack => "rack",
            NodeKind::Host => "host",
            NodeKind::Osd => "osd",
        })
    }
}

/// One line of `basalt osd tree`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeNode {
    pub depth: usize,
    pub kind: NodeKind,
    pub name: String,
    /// Buckets are negative (root is -1), OSDs are their OSD id.
    pub id: i64,
    /// 16.16 fixed point; a bucket's weight is the sum of its children.
    pub weight: u32,
}

/// How a choose step fills its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChooseMode {
    /// Ordered list, first is primary; a failed replica is skipped and later ones shift up.
    FirstN,
    /// Position-stable (erasure coding): a failed position stays as a [`crate::NONE`] hole.
    Indep,
}

/// One instruction of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleStep {
    /// Start from the named bucket.
    Take(String),
    /// Choose `count` distinct buckets of `kind` (0 = pool size, negative = size minus that many).
    Choose {
        mode: ChooseMode,
        count: i32,
        kind: NodeKind,
    },
    /// Choose `count` distinct buckets of `kind`, then one OSD under each.
    ChooseLeaf {
        mode: ChooseMode,
        count: i32,
        kind: NodeKind,
    },
    /// Append the working set to the result.
    Emit,
}

/// A placement rule: a tiny program over the hierarchy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub steps: Vec<RuleStep>,
}

impl Rule {
    /// `take default; chooseleaf firstn 0 type host; emit`.
    pub fn replicated(name: &str) -> Rule {
        Rule {
            name: name.to_string(),
            steps: vec![
                RuleStep::Take(ROOT_NAME.to_string()),
                RuleStep::ChooseLeaf {
                    mode: ChooseMode::FirstN,
                    count: 0,
                    kind: NodeKind::Host,
                },
                RuleStep::Emit,
            ],
        }
    }

    /// Position-stable variant for erasure-coded pools: `chooseleaf indep 0 type host`.
    pub fn indep(name: &str) -> Rule {
        let mut r = Rule::replicated(name);
        r.steps[1] = RuleStep::ChooseLeaf {
            mode: ChooseMode::Indep,
            count: 0,
            kind: NodeKind::Host,
        };
        r
    }

    /// True when results are positional (holes instead of shifting), i.e. any step is `indep`.
    pub fn is_positional(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s,
                RuleStep::Choose {
                    mode: ChooseMode::Indep,
                    ..
                } | RuleStep::ChooseLeaf {
                    mode: ChooseMode::Indep,
                    ..
                }
            )
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub(crate) id: i32,
    pub(crate) name: String,
    pub(crate) kind: NodeKind,
    pub(crate) parent: Option<i32>,
    /// Sorted ascending so that straw2's "first strictly best wins" tie-break is by id and does
    /// not depend on insertion history.
    pub(crate) items: Vec<i32>,
    pub(crate) weights: Vec<u32>,
    /// `u64::MAX / weight` (0 for weight 0): straw2 compares `neg_log * recip` instead of dividing,
    /// which is several times cheaper and still depends only on the item's own weight.
    pub(crate) recips: Vec<u64>,
    pub(crate) weight: u32,
    pub(crate) uniform: bool,
}

impl Bucket {
    pub(crate) fn view(&self) -> crate::mapper::StrawView<'_> {
        crate::mapper::StrawView {
            items: &self.items,
            recips: &self.recips,
            uniform: self.uniform,
        }
    }

    fn refresh(&mut self) {
        self.recips = self
            .weights
            .iter()
            .map(|&w| if w == 0 { 0 } else { u64::MAX / w as u64 })
            .collect();
        // Fits: every bucket's sum is bounded by the root's, which add/set_weight keep <= u32::MAX.
        self.weight = self.weights.iter().map(|&w| w as u64).sum::<u64>() as u32;
        self.uniform = !self.weights.is_empty()
            && self.weights.len() <= 1 << 16
            && self.weights[0] > 0
            && self.weights.iter().all(|&w| w == self.weights[0]);
    }

    fn insert(&mut self, item: i32, weight: u32) {
        let pos = self.items.partition_point(|&i| i < item);
        self.items.insert(pos, item);
        self.weights.insert(pos, weight);
    }

    fn remove(&mut self, item: i32) {
        if let Some(pos) = self.items.iter().position(|&i| i == item) {
            self.items.remove(pos);
            self.weights.remove(pos);
        }
    }
}

/// The CRUSH map: hierarchy of straw2 buckets plus rules. Pure data; see [`crate::map_pg`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CrushMapRepr", into = "CrushMapRepr")]
pub struct CrushMap {
    /// Indexed by `-1 - bucket_id`; `None` slots are freed ids, reused lowest first like Ceph.
    pub(crate) buckets: Vec<Option<Bucket>>,
    names: BTreeMap<String, i32>,
    /// OSD → host bucket id.
    osds: BTreeMap<OsdId, i32>,
    pub(crate) rules: BTreeMap<RuleId, Rule>,
}

impl Default for CrushMap {
    fn default() -> Self {
        Self::new()
    }
}

impl CrushMap {
    /// Root "default" and [`DEFAULT_RULE`] ("replicated_rule").
    pub fn new() -> Self {
        let mut m = CrushMap {
            buckets: Vec::new(),
            names: BTreeMap::new(),
            osds: BTreeMap::new(),
            rules: BTreeMap::new(),
        };
        m.create_bucket(ROOT_NAME, NodeKind::Root, None);
        m.rules
            .insert(DEFAULT_RULE, Rule::replicated("replicated_rule"));
        m
    }

    pub(crate) fn bucket(&self, id: i32) -> Option<&Bucket> {
        if id >= 0 {
            return None;
        }
        self.buckets.get((-1 - id) as usize)?.as_ref()
    }

    fn bucket_mut(&mut self, id: i32) -> &mut Bucket {
        self.buckets[(-1 - id) as usize]
            .as_mut()
            .expect("internal bucket id is live")
    }

    pub(crate) fn bucket_id(&self, name: &str) -> Option<i32> {
        self.names.get(name).copied()
    }

    fn create_bucket(&mut self, name: &str, kind: NodeKind, parent: Option<i32>) -> i32 {
        let slot = match self.buckets.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.buckets.push(None);
                self.buckets.len() - 1
            }
        };
        let id = -1 - slot as i32;
        self.buckets[slot] = Some(Bucket {
            id,
            name: name.to_string(),
            kind,
            parent,
            items: Vec::new(),
            weights: Vec::new(),
            recips: Vec::new(),
            weight: 0,
            uniform: false,
        });
        self.names.insert(name.to_string(), id);
        if let Some(p) = parent {
            self.bucket_mut(p).insert(id, 0);
            self.refresh_upwards(p);
        }
        id
    }

    /// Recompute sums/reciprocals from `id` up to the root after a child's weight changed.
    fn refresh_upwards(&mut self, mut id: i32) {
        loop {
            let b = self.bucket_mut(id);
            b.refresh();
            let (w, parent) = (b.weight, b.parent);
            let Some(p) = parent else { break };
            let pb = self.bucket_mut(p);
            if let Some(pos) = pb.items.iter().position(|&i| i == id) {
                pb.weights[pos] = w;
            }
            id = p;
        }
    }

    fn root_weight_after(&self, old: u32, new: u32) -> Result<(), PlacementError> {
        let total = self.bucket(ROOT_ID).map_or(0, |b| b.weight as u64) - old as u64 + new as u64;
        if total > u32::MAX as u64 {
            return Err(PlacementError::WeightOverflow {
                total,
                max: u32::MAX,
            });
        }
        Ok(())
    }

    fn ensure_bucket(
        &mut self,
        name: &str,
        kind: NodeKind,
        parent: i32,
    ) -> Result<i32, PlacementError> {
        match self.names.get(name) {
            Some(&id) => {
                let existing = self.bucket(id).map(|b| b.kind).unwrap_or(NodeKind::Root);
                if existing != kind {
                    return Err(PlacementError::NameInUse {
                        name: name.to_string(),
                        kind: existing,
                    });
                }
                Ok(id)
            }
            None => Ok(self.create_bucket(name, kind, Some(parent))),
        }
    }

    /// Add `osd` with CRUSH `weight` (16.16) under `host`, creating the host under the root if
    /// absent. Repeating the call for the same host is fine (the weight is updated); an OSD that
    /// already lives under another host is an error — move it by removing it first.
    pub fn add_osd(&mut self, osd: OsdId, host: &str, weight: u32) -> Result<(), PlacementError> {
        if osd > MAX_OSD_ID {
            return Err(PlacementError::InvalidOsdId {
                osd,
                max: MAX_OSD_ID,
            });
        }
        if let Some(&h) = self.osds.get(&osd) {
            let existing = self.bucket(h).map(|b| b.name.clone()).unwrap_or_default();
            if existing != host {
                return Err(PlacementError::OsdOnOtherHost {
                    osd,
                    existing,
                    requested: host.to_string(),
                });
            }
            return self.set_weight(osd, weight);
        }
        self.root_weight_after(0, weight)?;
        let h = self.ensure_bucket(host, NodeKind::Host, ROOT_ID)?;
        self.bucket_mut(h).insert(osd as i32, weight);
        self.osds.insert(osd, h);
        self.refresh_upwards(h);
        Ok(())
    }

    /// Remove `osd` from the hierarchy. Its (possibly now empty) host stays, as in Ceph, so that
    /// re-adding a disk keeps the host's bucket id and therefore its placements.
    pub fn remove_osd(&mut self, osd: OsdId) -> Result<(), PlacementError> {
        let h = self
            .osds
            .remove(&osd)
            .ok_or(PlacementError::UnknownOsd { osd })?;
        self.bucket_mut(h).remove(osd as i32);
        self.refresh_upwards(h);
        Ok(())
    }

    /// Set the CRUSH weight (capacity, 16.16) of `osd`. 0 keeps the OSD in the tree but it never
    /// receives data.
    pub fn set_weight(&mut self, osd: OsdId, weight: u32) -> Result<(), PlacementError> {
        let old = self
            .osd_weight(osd)
            .ok_or(PlacementError::UnknownOsd { osd })?;
        self.root_weight_after(old, weight)?;
        let h = self.osds[&osd];
        let b = self.bucket_mut(h);
        if let Some(pos) = b.items.iter().position(|&i| i == osd as i32) {
            b.weights[pos] = weight;
        }
        self.refresh_upwards(h);
        Ok(())
    }

    /// CRUSH weight of `osd`, `None` if it is not in the map.
    pub fn osd_weight(&self, osd: OsdId) -> Option<u32> {
        let b = self.bucket(*self.osds.get(&osd)?)?;
        let pos = b.items.iter().position(|&i| i == osd as i32)?;
        Some(b.weights[pos])
    }

    /// Host name of `osd`, `None` if it is not in the map.
    pub fn osd_host(&self, osd: OsdId) -> Option<&str> {
        Some(&self.bucket(*self.osds.get(&osd)?)?.name)
    }

    /// All OSDs in the map, ascending.
    pub fn osds(&self) -> impl Iterator<Item = OsdId> + '_ {
        self.osds.keys().copied()
    }

    /// Number of OSDs in the map.
    pub fn num_osds(&self) -> usize {
        self.osds.len()
    }

    /// Create rack `rack` under the root (no-op if it exists).
    pub fn add_rack(&mut self, rack: &str) -> Result<(), PlacementError> {
        self.ensure_bucket(rack, NodeKind::Rack, ROOT_ID)
            .map(|_| ())
    }

    /// Move `host` (with its OSDs) under `rack` (created if absent), or back under the root with
    /// `None`. Moving a host moves its data only if a rule's failure domain is above host.
    pub fn move_host(&mut self, host: &str, rack: Option<&str>) -> Result<(), PlacementError> {
        let h = self.host_id(host)?;
        let new_parent = match rack {
            Some(r) => self.ensure_bucket(r, NodeKind::Rack, ROOT_ID)?,
            None => ROOT_ID,
        };
        let b = self.bucket(h).expect("host exists");
        let (old_parent, w) = (b.parent.unwrap_or(ROOT_ID), b.weight);
        if old_parent == new_parent {
            return Ok(());
        }
        self.bucket_mut(old_parent).remove(h);
        self.refresh_upwards(old_parent);
        self.bucket_mut(new_parent).insert(h, w);
        self.bucket_mut(h).parent = Some(new_parent);
        self.refresh_upwards(new_parent);
        Ok(())
    }

    /// Remove an empty host bucket.
    pub fn remove_host(&mut self, host: &str) -> Result<(), PlacementError> {
        let h = self.host_id(host)?;
        let b = self.bucket(h).expect("host exists");
        if !b.items.is_empty() {
            return Err(PlacementError::HostNotEmpty {
                host: host.to_string(),
                count: b.items.len(),
            });
        }
        let parent = b.parent.unwrap_or(ROOT_ID);
        self.bucket_mut(parent).remove(h);
        self.refresh_upwards(parent);
        self.names.remove(host);
        self.buckets[(-1 - h) as usize] = None;
        Ok(())
    }

    fn host_id(&self, host: &str) -> Result<i32, PlacementError> {
        match self.names.get(host) {
            Some(&id) if self.bucket(id).map(|b| b.kind) == Some(NodeKind::Host) => Ok(id),
            _ => Err(PlacementError::UnknownBucket {
                name: host.to_string(),
            }),
        }
    }

    /// Install or replace rule `id`. Steps are validated so the mapper never meets a rule it
    /// cannot run.
    pub fn set_rule(&mut self, id: RuleId, rule: Rule) -> Result<(), PlacementError> {
        validate_rule(&rule)?;
        self.rules.insert(id, rule);
        Ok(())
    }

    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        self.rules.get(&id)
    }

    pub fn contains_rule(&self, rule: RuleId) -> bool {
        self.rules.contains_key(&rule)
    }

    /// Depth-first listing for `basalt osd tree`: buckets in creation order, then OSDs by id.
    pub fn tree(&self) -> Vec<TreeNode> {
        let mut out = Vec::new();
        self.tree_walk(ROOT_ID, 0, &mut out);
        out
    }

    fn tree_walk(&self, id: i32, depth: usize, out: &mut Vec<TreeNode>) {
        let Some(b) = self.bucket(id) else { return };
        out.push(TreeNode {
            depth,
            kind: b.kind,
            name: b.name.clone(),
            id: id as i64,
            weight: b.weight,
        });
        let mut children: Vec<(i32, u32)> = b
            .items
            .iter()
            .copied()
            .zip(b.weights.iter().copied())
            .collect();
        // Buckets (negative) first in creation order (-2, -3, …), then OSDs ascending.
        children.sort_by_key(|&(i, _)| {
            if i < 0 {
                (0, -(i as i64))
            } else {
                (1, i as i64)
            }
        });
        for (item, w) in children {
            if item < 0 {
                self.tree_walk(item, depth + 1, out);
            } else {
                out.push(TreeNode {
                    depth: depth + 1,
                    kind: NodeKind::Osd,
                    name: format!("osd.{item}"),
                    id: item as i64,
                    weight: w,
                });
            }
        }
    }
}

fn validate_rule(rule: &Rule) -> Result<(), PlacementError> {
    let bad = |why: &str| {
        Err(PlacementError::InvalidRule {
            rule: rule.name.clone(),
            reason: why.to_string(),
        })
    };
    if !matches!(rule.steps.first(), Some(RuleStep::Take(_))) {
        return bad("the first step must be `take`");
    }
    if !matches!(rule.steps.last(), Some(RuleStep::Emit)) {
        return bad("the last step must be `emit`");
    }
    for s in &rule.steps {
        match s {
            RuleStep::Choose { kind, .. } | RuleStep::ChooseLeaf { kind, .. }
                if *kind == NodeKind::Root =>
            {
                return bad("cannot choose buckets of type root");
            }
            RuleStep::ChooseLeaf {
                kind: NodeKind::Osd,
                ..
            } => return bad("chooseleaf needs a bucket type (e.g. host); use choose for osds"),
            _ => {}
        }
    }
    Ok(())
}

/// On-the-wire form: only authoritative facts (bucket tree, OSD weights, rules); sums and
/// reciprocals are recomputed on load so a decoded map can never carry inconsistent caches.
#[derive(Serialize, Deserialize)]
struct CrushMapRepr {
    buckets: Vec<BucketRepr>,
    osds: Vec<OsdRepr>,
    rules: Vec<(RuleId, Rule)>,
}

#[derive(Serialize, Deserialize)]
struct BucketRepr {
    id: i32,
    name: String,
    kind: NodeKind,
    parent: Option<i32>,
}

#[derive(Serialize, Deserialize)]
struct OsdRepr {
    id: OsdId,
    host: i32,
    weight: u32,
}

impl From<CrushMap> for CrushMapRepr {
    fn from(m: CrushMap) -> Self {
        let buckets = m
            .buckets
            .iter()
            .flatten()
            .map(|b| BucketRepr {
                id: b.id,
                name: b.name.clone(),
                kind: b.kind,
                parent: b.parent,
            })
            .collect();
        let osds = m
            .osds
            .iter()
            .map(|(&id, &host)| OsdRepr {
                id,
                host,
                weight: m.osd_weight(id).unwrap_or(0),
            })
            .collect();
        CrushMapRepr {
            buckets,
            osds,
            rules: m.rules.into_iter().collect(),
        }
    }
}

impl TryFrom<CrushMapRepr> for CrushMap {
    type Error = PlacementError;

    fn try_from(r: CrushMapRepr) -> Result<Self, PlacementError> {
        let bad = |why: String| PlacementError::InvalidMap { reason: why };
        let mut m = CrushMap {
            buckets: Vec::new(),
            names: BTreeMap::new(),
            osds: BTreeMap::new(),
            rules: BTreeMap::new(),
        };
        for b in &r.buckets {
            if b.id >= 0 || b.id < -(1 << 20) {
                return Err(bad(format!("bucket id {} out of range", b.id)));
            }
            let slot = (-1 - b.id) as usize;
            if m.buckets.len() <= slot {
                m.buckets.resize(slot + 1, None);
            }
            if m.buckets[slot].is_some() || m.names.contains_key(&b.name) {
                return Err(bad(format!("duplicate bucket {} / {:?}", b.id, b.name)));
            }
            m.names.insert(b.name.clone(), b.id);
            m.buckets[slot] = Some(Bucket {
                id: b.id,
                name: b.name.clone(),
                kind: b.kind,
                parent: b.parent,
                items: Vec::new(),
                weights: Vec::new(),
                recips: Vec::new(),
                weight: 0,
                uniform: false,
            });
        }
        match m.bucket(ROOT_ID) {
            Some(b) if b.kind == NodeKind::Root && b.name == ROOT_NAME && b.parent.is_none() => {}
            _ => return Err(bad("bucket -1 must be root \"default\"".into())),
        }
        for b in &r.buckets {
            if b.id == ROOT_ID {
                continue;
            }
            let ok = b
                .parent
                .and_then(|p| m.bucket(p))
                .is_some_and(|p| p.kind.type_id() > b.kind.type_id() && b.kind != NodeKind::Root);
            if !ok {
                return Err(bad(format!("bucket {:?} has an invalid parent", b.name)));
            }
            m.bucket_mut(b.parent.unwrap_or(ROOT_ID)).insert(b.id, 0);
        }
        let mut total: u64 = 0;
        for o in &r.osds {
            let ok = o.id <= MAX_OSD_ID
                && m.bucket(o.host).is_some_and(|h| h.kind == NodeKind::Host)
                && !m.osds.contains_key(&o.id);
            if !ok {
                return Err(bad(format!("osd.{} is invalid or duplicated", o.id)));
            }
            total += o.weight as u64;
            m.osds.insert(o.id, o.host);
            m.bucket_mut(o.host).insert(o.id as i32, o.weight);
        }
        if total > u32::MAX as u64 {
            return Err(bad("total weight overflows 16.16".into()));
        }
        // Children before parents: deepest kinds (largest depth) first, so sums propagate.
        for kind in [NodeKind::Host, NodeKind::Rack, NodeKind::Root] {
            let ids: Vec<i32> = m
                .buckets
                .iter()
                .flatten()
                .filter(|b| b.kind == kind)
                .map(|b| b.id)
                .collect();
            for id in ids {
                m.bucket_mut(id).refresh();
                let (w, parent) = {
                    let b = m.bucket(id).expect("live");
                    (b.weight, b.parent)
                };
                if let Some(p) = parent {
                    let pb = m.bucket_mut(p);
                    if let Some(pos) = pb.items.iter().position(|&i| i == id) {
                        pb.weights[pos] = w;
                    }
                }
            }
        }
        for (id, rule) in r.rules {
            validate_rule(&rule)?;
            m.rules.insert(id, rule);
        }
        Ok(m)
    }
}
