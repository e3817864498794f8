//! Watch/notify: watches registered on an object's primary (kept while pings arrive and the
//! PG's interval lasts, ended for fenced clients), and notifies sent to an object's watchers
//! that complete when every watcher acked or the timeout passed.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use basalt_auth::{Authenticated, Perm};
use basalt_maps::OsdMap;
use basalt_ops::{encode, NotifyResult, OpError, WatcherInfo};
use basalt_placement::PgId;
use basalt_proto::osd as pb;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Status, Streaming};

use super::{lock, now_ms, OsdCore};
use crate::store::ObjectId;

pub(super) struct WatchEntry {
    client: String,
    cookie: u64,
    events: mpsc::Sender<Result<pb::WatchEvent, Status>>,
}

pub(super) struct PendingNotify {
    waiting: BTreeSet<(String, u64)>,
    acks: Vec<(WatcherInfo, Bytes)>,
    done: Option<oneshot::Sender<()>>,
}

pub(super) type WatchKey = (PgId, String, String);

impl OsdCore {
    pub(super) fn watchers_of(&self, key: &WatchKey) -> Vec<WatcherInfo> {
        lock(&self.watches)
            .get(key)
            .map(|v| {
                v.iter()
                    .map(|w| WatcherInfo {
                        client: w.client.clone(),
                        cookie: w.cookie,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn unwatch(&self, key: &WatchKey, client: &str, cookie: u64) {
        let mut w = lock(&self.watches);
        if let Some(v) = w.get_mut(key) {
            v.retain(|e| !(e.client == client && e.cookie == cookie));
            if v.is_empty() {
                w.remove(key);
            }
        }
        // A notify waiting for this watcher gives up on it now.
        let mut n = lock(&self.notifies);
        for p in n.values_mut() {
            if p.waiting.remove(&(client.to_string(), cookie)) && p.waiting.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    pub(super) fn expire_blocklisted_watches(&self, map: &OsdMap) {
        let now = now_ms();
        let mut w = lock(&self.watches);
        for v in w.values_mut() {
            v.retain(|e| {
                let fenced = map.is_blocklisted(&e.client, now);
                if fenced {
                    let err = encode(&OpError::Blocklisted(e.client.clone()));
                    let _ = e.events.try_send(Ok(pb::WatchEvent {
                        error: err,
                        ..Default::default()
                    }));
                }
                !fenced
            });
        }
        w.retain(|_, v| !v.is_empty());
    }

    /// Serves one watch: registers it, then keeps it while pings arrive within the timeout and
    /// the PG keeps this OSD as primary.
    pub async fn handle_watch(
        self: &Arc<Self>,
        peer: &Authenticated,
        mut pings: Streaming<pb::WatchPing>,
    ) -> Result<mpsc::Receiver<Result<pb::WatchEvent, Status>>, Status> {
        let first = tokio::time::timeout(Duration::from_secs(10), pings.message())
            .await
            .map_err(|_| basalt_proto::status::deadline_exceeded("no watch request within 10 s"))??
            .ok_or_else(|| {
                basalt_proto::status::invalid_argument("watch stream closed before its request")
            })?;
        let (tx, rx) = mpsc::channel(64);
        let refuse = |e: OpError| {
            let _ = tx.try_send(Ok(pb::WatchEvent {
                error: encode(&e),
                ..Default::default()
            }));
        };
        if let Err(e) = self
            .check_pool(peer, first.pool, first.epoch, Perm::R.union(Perm::X))
            .await
        {
            refuse(e);
            return Ok(rx);
        }
        if first.object.is_empty() {
            refuse(OpError::InvalidArgument("empty object name".into()));
            return Ok(rx);
        }
        let (_, pg) = match self
            .primary_pg(
                first.epoch,
                first.pool,
                first.pg_seed,
                &first.namespace,
                Some(&first.object),
                &first.client,
            )
            .await
        {
            Ok(x) => x,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        let generation = match self
            .wait_active(&pg, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        // Watches need the object (as in Ceph).
        let gate = match self
            .read_gate(&pg, generation, Some((&first.namespace, &first.object)))
            .await
        {
            Ok(g) => g,
            Err(e) => {
                refuse(e);
                return Ok(rx);
            }
        };
        let obj = ObjectId::with_namespace(pg.id, first.namespace.clone(), first.object.clone());
        let exists = self
            .on_store(move |store| Ok(store.exists(&obj).unwrap_or(false)))
            .await
            .unwrap_or(false);
        drop(gate);
        if !exists {
            refuse(OpError::NotFound);
            return Ok(rx);
        }
        let key: WatchKey = (pg.id, first.namespace.clone(), first.object.clone());
        let client = first.client.clone();
        let cookie = first.cookie;
        let timeout = Duration::from_millis(u64::from(first.timeout_ms.clamp(1_000, 3_600_000)));
        {
            let mut w = lock(&self.watches);
            let v = w.entry(key.clone()).or_default();
            v.retain(|e| !(e.client == client && e.cookie == cookie));
            v.push(WatchEntry {
                client: client.clone(),
                cookie,
                events: tx.clone(),
            });
        }
        let _ = tx.try_send(Ok(pb::WatchEvent::default()));
        metrics::gauge!("basalt_osd_watches").increment(1.0);
        let core = self.clone();
        tokio::spawn(async move {
            let mut changed = pg.changed.subscribe();
            let end = loop {
                tokio::select! {
                    m = tokio::time::timeout(timeout, pings.message()) => match m {
                        Ok(Ok(Some(_))) => continue,
                        Ok(_) => break None, // the client closed the stream
                        Err(_) => break Some(OpError::Io(format!(
                            "watch timed out: no ping for {} ms", timeout.as_millis()))),
                    },
                    _ = changed.changed() => {
                        let (g, _, epoch) = pg.snapshot();
                        if g != generation {
                            break Some(OpError::IntervalChanged { pg: pg.id.to_string(), epoch });
                        }
                    }
                    _ = tx.closed() => break None,
                }
            };
            core.unwatch(&key, &client, cookie);
            metrics::gauge!("basalt_osd_watches").decrement(1.0);
            if let Some(e) = end {
                tracing::info!(client = %client, cookie, object = %key.2, error = %e, "watch ended");
                let _ = tx
                    .send(Ok(pb::WatchEvent {
                        error: encode(&e),
                        ..Default::default()
                    }))
                    .await;
            }
        });
        Ok(rx)
    }

    pub async fn handle_notify(&self, req: pb::NotifyRequest) -> Result<NotifyResult, OpError> {
        let (_, pg) = self
            .primary_pg(
                req.epoch,
                req.pool,
                req.pg_seed,
                &req.namespace,
                Some(&req.object),
                &req.client,
            )
            .await?;
        let timeout = Duration::from_millis(u64::from(req.timeout_ms.clamp(100, 600_000)));
        self.wait_active(&pg, Instant::now() + timeout).await?;
        // Watches of an object that a split moved live under its new PG.
        self.check_still_maps(&pg, &req.namespace, &req.object)?;
        let key: WatchKey = (pg.id, req.namespace.clone(), req.object.clone());
        let id = self.next_notify.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let targets: Vec<(String, u64, mpsc::Sender<_>)> = lock(&self.watches)
            .get(&key)
            .map(|v| {
                v.iter()
                    .map(|w| (w.client.clone(), w.cookie, w.events.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() {
            return Ok(NotifyResult::default());
        }
        lock(&self.notifies).insert(
            id,
            PendingNotify {
                waiting: targets.iter().map(|(c, k, _)| (c.clone(), *k)).collect(),
                acks: vec![],
                done: Some(done_tx),
            },
        );
        for (_, _, events) in &targets {
            let _ = events.try_send(Ok(pb::WatchEvent {
                notify_id: id,
                notifier: req.client.clone(),
                payload: req.payload.clone(),
                error: Bytes::new(),
            }));
        }
        let _ = tokio::time::timeout(timeout, done_rx).await;
        let p = lock(&self.notifies).remove(&id);
        let Some(p) = p else {
            return Ok(NotifyResult::default());
        };
        Ok(NotifyResult {
            acks: p.acks,
            timed_out: p
                .waiting
                .into_iter()
                .map(|(client, cookie)| WatcherInfo { client, cookie })
                .collect(),
        })
    }

    pub fn handle_notify_ack(&self, req: pb::NotifyAckRequest) {
        let mut n = lock(&self.notifies);
        if let Some(p) = n.get_mut(&req.notify_id) {
            if p.waiting.remove(&(req.client.clone(), req.cookie)) {
                p.acks.push((
                    WatcherInfo {
                        client: req.client,
                        cookie: req.cookie,
                    },
                    req.reply,
                ));
            }
            if p.waiting.is_empty() {
                if let Some(done) = p.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }
}
