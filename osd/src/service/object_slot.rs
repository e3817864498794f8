//! Per-object op ordering on this OSD: an object's order lock and the writes to it still in
//! flight, which reads and resent writes wait out (see [`ObjectSlot`]). A PG keeps one slot
//! per object it has seen ops for ([`super::Pg`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

/// How ops on one object are ordered on this OSD.
///
/// A write holds `order` exclusively from its execution until its transaction is applied
/// locally (visible, not yet durable) and handed to the replicas; then the next write to the
/// object may execute on top of it while the first one's fsyncs and replica acks are still
/// pending. So sequential writes to one object overlap instead of running one at a time end
/// to end. Replicas apply them in the same order: each sub-op names the write to its object
/// still in flight before it (`after_seq`), and a replica applies it only once that one's log
/// entry is there.
///
/// Reads share `order` and wait until no write to the object is in flight: nobody sees a
/// write that could still be lost. A resent write whose first attempt is still in flight
/// waits the same way before it answers from the dup record.
pub(super) struct ObjectSlot {
    pub(super) order: Arc<tokio::sync::RwLock<()>>,
    /// Log seqs of writes applied on this OSD and not yet durable on every member.
    in_flight: watch::Sender<BTreeSet<u64>>,
}

impl ObjectSlot {
    pub(super) fn new() -> Self {
        ObjectSlot {
            order: Arc::default(),
            in_flight: watch::channel(BTreeSet::new()).0,
        }
    }

    /// Marks write `seq` in flight; returns the newest write still in flight before it.
    pub(super) fn begin(self: &Arc<Self>, seq: u64) -> (Option<u64>, InFlight) {
        let mut before = None;
        self.in_flight.send_modify(|s| {
            before = s.last().copied();
            s.insert(seq);
        });
        (
            before,
            InFlight {
                slot: self.clone(),
                seq,
            },
        )
    }

    pub(super) async fn drained(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(BTreeSet::is_empty).await;
    }
}

/// A write in flight on its object; dropping it (done, failed or abandoned) ends that.
pub(super) struct InFlight {
    slot: Arc<ObjectSlot>,
    seq: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.in_flight.send_modify(|s| {
            s.remove(&self.seq);
        });
    }
}
