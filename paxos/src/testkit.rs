//! An in-memory driver store for tests, the simulation and the model check.
//!
//! The replicated "state machine" is an append-only list of every committed
//! value, so a snapshot is the whole list and two monitors' states can be
//! compared directly. [`MemStore::apply`] applies one `Persist` batch
//! atomically and rejects batches that break the store's contract, which turns
//! contract violations of the consensus core into test failures.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::types::*;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemStore {
    pub state: PersistentState,
    /// Kept committed values, `first_committed..=last_committed` (minus the
    /// snapshot version itself right after a snapshot install).
    pub values: BTreeMap<Version, Bytes>,
    /// The state machine: every committed value in version order (index v-1).
    pub applied: Vec<Bytes>,
}

impl MemStore {
    /// Apply one atomic batch. On error the store is unchanged.
    pub fn apply(&mut self, ops: &[PersistOp]) -> Result<(), String> {
        let mut next = self.clone();
        for op in ops {
            next.apply_one(op)?;
        }
        *self = next;
        Ok(())
    }

    fn apply_one(&mut self, op: &PersistOp) -> Result<(), String> {
        let s = &mut self.state;
        match op {
            PersistOp::ElectionEpoch(e) => {
                if *e < s.election_epoch {
                    return Err(format!(
                        "election epoch went back {} -> {e}",
                        s.election_epoch
                    ));
                }
                s.election_epoch = *e;
            }
            PersistOp::LastPn(pn) => {
                if *pn <= s.last_pn {
                    return Err(format!("last_pn not increasing {} -> {pn}", s.last_pn));
                }
                s.last_pn = *pn;
            }
            PersistOp::AcceptedPn(pn) => {
                if *pn < s.accepted_pn {
                    return Err(format!("accepted_pn went back {} -> {pn}", s.accepted_pn));
                }
                s.accepted_pn = *pn;
            }
            PersistOp::Uncommitted { version, pn, value } => {
                if *version != s.last_committed + 1 {
                    return Err(format!(
                        "uncommitted v{version} but last_committed {}",
                        s.last_committed
                    ));
                }
                if *pn > s.accepted_pn {
                    return Err(format!("accepting pn {pn} above promise {}", s.accepted_pn));
                }
                s.uncommitted = Some((*version, *pn, value.clone()));
            }
            PersistOp::ClearUncommitted => s.uncommitted = None,
            PersistOp::Commit { version, value } => {
                if *version != s.last_committed + 1 {
                    return Err(format!(
                        "commit v{version} but last_committed {}",
                        s.last_committed
                    ));
                }
                s.last_committed = *version;
                if s.first_committed == 0 {
                    s.first_committed = *version;
                }
                self.values.insert(*version, value.clone());
                self.applied.push(value.clone());
            }
            PersistOp::InstallSnapshot { version, data } => {
                let list = decode_list(data).ok_or("undecodable snapshot")?;
                if list.len() as u64 != *version {
                    return Err(format!(
                        "snapshot at v{version} holds {} values",
                        list.len()
                    ));
                }
                if *version < s.last_committed {
                    return Err(format!(
                        "snapshot v{version} older than last_committed {}",
                        s.last_committed
                    ));
                }
                s.first_committed = *version;
                s.last_committed = *version;
                self.values.clear();
                self.applied = list;
            }
            PersistOp::Trim { first_committed } => {
                if *first_committed > s.last_committed || *first_committed < s.first_committed {
                    return Err(format!(
                        "trim to {first_committed} outside {}..={}",
                        s.first_committed, s.last_committed
                    ));
                }
                s.first_committed = *first_committed;
                self.values = self.values.split_off(first_committed);
            }
        }
        Ok(())
    }
}

impl CommittedLog for MemStore {
    fn committed_value(&self, v: Version) -> Option<Bytes> {
        self.values.get(&v).cloned()
    }
    fn snapshot(&self) -> (Version, Bytes) {
        (self.state.last_committed, encode_list(&self.applied))
    }
}

/// Length-prefixed encoding of a list of values.
pub fn encode_list(list: &[Bytes]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(list.len() as u32);
    for v in list {
        b.put_u32(v.len() as u32);
        b.put_slice(v);
    }
    b.freeze()
}

pub fn decode_list(data: &Bytes) -> Option<Vec<Bytes>> {
    let mut b = data.clone();
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        if b.remaining() < 4 {
            return None;
        }
        let len = b.get_u32() as usize;
        if b.remaining() < len {
            return None;
        }
        out.push(b.split_to(len));
    }
    Some(out)
}

/// Check the persist-before-send discipline of one output Vec: every Persist
/// op that a later Send relies on must appear before it. Concretely, any
/// promise/accept/commit a message announces must already be in a Persist
/// earlier in the same Vec or in `durable` (the state before the call).
pub fn check_persist_before_send(durable: &PersistentState, out: &[Output]) -> Result<(), String> {
    let mut st = durable.clone();
    for o in out {
        match o {
            Output::Persist(ops) => {
                for op in ops {
                    st.apply(op);
                }
            }
            Output::Send { msg, .. } => {
                let ok = match msg {
                    Message::Propose { epoch } | Message::Ack { epoch } => {
                        st.election_epoch == *epoch
                    }
                    Message::Victory { epoch, .. } => st.election_epoch == *epoch,
                    Message::Collect { epoch, pn, .. } => {
                        st.election_epoch == *epoch && st.last_pn == *pn && st.accepted_pn >= *pn
                    }
                    Message::Last {
                        pn, accepted_pn, ..
                    } => {
                        st.accepted_pn == *accepted_pn
                            && (*accepted_pn > *pn || st.accepted_pn >= *pn)
                    }
                    Message::Begin {
                        pn, version, value, ..
                    } => st.uncommitted == Some((*version, *pn, value.clone())),
                    Message::Accept { pn, version, .. } => st
                        .uncommitted
                        .as_ref()
                        .is_some_and(|u| u.0 == *version && u.1 == *pn),
                    Message::Commit { values, .. } => {
                        values.last().is_none_or(|(v, _)| *v <= st.last_committed)
                    }
                    Message::Snapshot { version, .. } => *version <= st.last_committed,
                    Message::Lease { last_committed, .. } => *last_committed <= st.last_committed,
                    Message::LeaseAck { .. } => true,
                };
                if !ok {
                    return Err(format!("send before persist: {msg:?} with durable {st:?}"));
                }
            }
            Output::ProposalDone { result: Ok(v), .. } if *v > st.last_committed => {
                return Err(format!("acknowledged v{v} before committing it"));
            }
            _ => {}
        }
    }
    Ok(())
}
