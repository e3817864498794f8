//! [`ObjectBackend`] over the real cluster: a `basalt_client::IoCtx`.
//!
//! A thin translation: errors to [`BackendError`], omap keys to strings, watches to the
//! event channel the lock driver reads. The client library already routes, resends with the
//! same request id and waits through failures (bounded only when `osd_op_timeout_ms` is set),
//! so nothing here retries.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use basalt_client::ops::{LockKind, ObjOp, OpOutput};
use basalt_client::{ClientError, IoCtx, Rados};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::backend::{
    BackendError, Locker, NotifyAck, NotifyEvent, NotifyResult, ObjectBackend, SnapContext,
    SnapListing, WatchEvent, Watcher,
};

/// One pool of a real cluster as the image layer's backend.
pub struct RadosBackend {
    rados: Rados,
    io: IoCtx,
    watch_timeout: Duration,
    /// Live watches by cookie; dropping one ends it.
    watches: Mutex<HashMap<u64, basalt_client::Watch>>,
}

impl RadosBackend {
    pub fn new(rados: Rados, io: IoCtx, watch_timeout: Duration) -> Self {
        RadosBackend {
            rados,
            io,
            watch_timeout,
            watches: Mutex::new(HashMap::new()),
        }
    }
}

fn err(e: ClientError) -> BackendError {
    match e {
        ClientError::NotFound(m) => BackendError::NotFound(m),
        ClientError::Exists(m) => BackendError::Exists(m),
        ClientError::Busy(m) => BackendError::Busy(m),
        ClientError::Blocklisted(m) => BackendError::Blocklisted(m),
        ClientError::Timeout(d) => BackendError::Timeout(format!("no answer within {d:?}")),
        ClientError::InvalidArgument(m) => BackendError::InvalidArgument(m),
        ClientError::NoSpace(m) | ClientError::PoolFull(m) => BackendError::NoSpace(m),
        ClientError::Unavailable(m) | ClientError::NoQuorum(m) => BackendError::Timeout(m),
        other => BackendError::Io(other.to_string()),
    }
}

fn key_bytes(k: &str) -> Bytes {
    Bytes::copy_from_slice(k.as_bytes())
}

fn key_string(k: &[u8]) -> Result<String, BackendError> {
    String::from_utf8(k.to_vec()).map_err(|_| BackendError::Io("an omap key is not UTF-8".into()))
}

#[async_trait]
impl ObjectBackend for RadosBackend {
    fn client_id(&self) -> String {
        // The instance, not the name: a breaker must fence exactly the process holding the
        // lock, never a restart of it under the same name.
        self.rados.instance().to_string()
    }

    fn with_snap_context(
        &self,
        snapc: SnapContext,
    ) -> Result<Arc<dyn ObjectBackend>, BackendError> {
        let mut io = self.io.clone();
        io.set_snap_context(snapc).map_err(err)?;
        Ok(Arc::new(RadosBackend::new(
            self.rados.clone(),
            io,
            self.watch_timeout,
        )))
    }

    fn at_snap(&self, snap: u64) -> Arc<dyn ObjectBackend> {
        Arc::new(RadosBackend::new(
            self.rados.clone(),
            self.io.at_snap(snap),
            self.watch_timeout,
        ))
    }

    fn pool_name(&self) -> String {
        self.io.pool_name().to_string()
    }

    fn other_pool(&self, pool: &str) -> Result<Arc<dyn ObjectBackend>, BackendError> {
        let io = self.rados.ioctx(pool).map_err(err)?;
        Ok(Arc::new(RadosBackend::new(
            self.rados.clone(),
            io,
            self.watch_timeout,
        )))
    }

    async fn copyup(&self, oid: &str, data: Bytes) -> Result<bool, BackendError> {
        match self
            .io
            .operate(
                oid,
                vec![ObjOp::Create { exclusive: true }, ObjOp::WriteFull { data }],
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ClientError::Exists(_)) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    async fn list_snaps(&self, oid: &str) -> Result<SnapListing, BackendError> {
        self.io.list_snaps(oid).await.map_err(err)
    }

    async fn snap_alloc(&self) -> Result<u64, BackendError> {
        self.io.selfmanaged_snap_create().await.map_err(err)
    }

    async fn snap_release(&self, snap: u64) -> Result<(), BackendError> {
        self.io.selfmanaged_snap_remove(snap).await.map_err(err)
    }

    async fn rollback(&self, oid: &str, snap: u64) -> Result<(), BackendError> {
        self.io.rollback(oid, snap).await.map_err(err)
    }

    async fn read(&self, oid: &str, off: u64, len: u64) -> Result<Bytes, BackendError> {
        self.io.read(oid, off, len).await.map_err(err)
    }

    async fn write(&self, oid: &str, off: u64, data: Bytes) -> Result<(), BackendError> {
        self.io.write(oid, off, data).await.map_err(err)
    }

    async fn write_full(&self, oid: &str, data: Bytes) -> Result<(), BackendError> {
        self.io.write_full(oid, data).await.map_err(err)
    }

    async fn zero(&self, oid: &str, off: u64, len: u64) -> Result<(), BackendError> {
        // The trait's zero never extends the object and wants NotFound for a missing one;
        // the OSD's zero is a no-op on a missing object, so guard it.
        let size = self.io.stat(oid).await.map_err(err)?.size;
        if off >= size {
            return Ok(());
        }
        let len = len.min(size - off);
        self.io
            .operate(
                oid,
                vec![ObjOp::AssertExists, ObjOp::Zero { offset: off, len }],
            )
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn truncate(&self, oid: &str, size: u64) -> Result<(), BackendError> {
        self.io.truncate(oid, size).await.map_err(err)
    }

    async fn remove(&self, oid: &str) -> Result<(), BackendError> {
        self.io.remove(oid).await.map_err(err)
    }

    async fn stat(&self, oid: &str) -> Result<u64, BackendError> {
        self.io.stat(oid).await.map(|s| s.size).map_err(err)
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let mut names = self.io.list_objects().await.map_err(err)?;
        names.retain(|n| n.starts_with(prefix));
        Ok(names)
    }

    async fn create(&self, oid: &str, exclusive: bool) -> Result<(), BackendError> {
        self.io.create(oid, exclusive).await.map_err(err)
    }

    async fn omap_get(
        &self,
        oid: &str,
        keys: &[String],
    ) -> Result<BTreeMap<String, Bytes>, BackendError> {
        let wanted: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let found = self
            .io
            .omap_get_vals_by_keys(oid, &wanted)
            .await
            .map_err(err)?;
        found
            .into_iter()
            .map(|(k, v)| Ok((key_string(&k)?, v)))
            .collect()
    }

    async fn omap_list(
        &self,
        oid: &str,
        start_after: &str,
        max: usize,
    ) -> Result<(Vec<(String, Bytes)>, bool), BackendError> {
        let after = (!start_after.is_empty()).then_some(start_after.as_bytes());
        let max = max.clamp(1, 10_000) as u32;
        let (entries, more) = self.io.omap_get_vals(oid, after, max).await.map_err(err)?;
        let entries = entries
            .into_iter()
            .map(|(k, v)| Ok((key_string(&k)?, v)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok((entries, more))
    }

    async fn omap_set(&self, oid: &str, kv: BTreeMap<String, Bytes>) -> Result<(), BackendError> {
        let entries = kv.into_iter().map(|(k, v)| (key_bytes(&k), v)).collect();
        // One compound op: the object is created if missing, atomically with the keys.
        self.io
            .operate(
                oid,
                vec![
                    ObjOp::Create { exclusive: false },
                    ObjOp::OmapSet { entries },
                ],
            )
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn omap_rm(&self, oid: &str, keys: &[String]) -> Result<(), BackendError> {
        let keys = keys.iter().map(|k| key_bytes(k)).collect();
        self.io.omap_rm_keys(oid, keys).await.map_err(err)
    }

    async fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
    ) -> Result<(), BackendError> {
        self.io
            .lock(oid, name, LockKind::Exclusive, cookie, "", description)
            .await
            .map_err(err)
    }

    async fn lock_exclusive_then_omap_get(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        description: &str,
        keys: &[String],
    ) -> Result<BTreeMap<String, Bytes>, BackendError> {
        // One atomic request: the read step sees the object as the lock step found it, and
        // nothing that needs the lock can have changed it in between.
        let ops = vec![
            ObjOp::Lock {
                name: name.into(),
                kind: LockKind::Exclusive,
                cookie: cookie.into(),
                tag: String::new(),
                description: description.into(),
            },
            ObjOp::OmapGetValsByKeys {
                keys: keys.iter().map(|k| key_bytes(k)).collect(),
            },
        ];
        let r = self.io.operate(oid, ops).await.map_err(err)?;
        match r.outputs.into_iter().nth(1) {
            Some(OpOutput::Omap { entries, .. }) => entries
                .into_iter()
                .map(|(k, v)| Ok((key_string(&k)?, v)))
                .collect(),
            other => Err(BackendError::Io(format!(
                "{oid}: lock-and-read answered {other:?} for its read"
            ))),
        }
    }

    async fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), BackendError> {
        self.io.unlock(oid, name, cookie).await.map_err(err)
    }

    async fn lock_info(&self, oid: &str, name: &str) -> Result<Vec<Locker>, BackendError> {
        let st = self.io.lock_info(oid, name).await.map_err(err)?;
        Ok(st
            .lockers
            .into_iter()
            .map(|l| Locker {
                client: l.client,
                cookie: l.cookie,
                description: l.description,
            })
            .collect())
    }

    async fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), BackendError> {
        self.io
            .break_lock(oid, name, client, cookie)
            .await
            .map_err(err)
    }

    async fn watch(&self, oid: &str) -> Result<(u64, mpsc::Receiver<WatchEvent>), BackendError> {
        let mut w = self.io.watch(oid, self.watch_timeout).await.map_err(err)?;
        let cookie = w.cookie;
        let (tx, rx) = mpsc::channel(64);
        let mut events = std::mem::replace(&mut w.events, mpsc::channel(1).1);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                let out = match ev {
                    basalt_client::WatchEvent::Notify {
                        notify_id,
                        notifier,
                        payload,
                    } => WatchEvent::Notify(NotifyEvent {
                        notify_id,
                        cookie,
                        notifier,
                        payload,
                    }),
                    basalt_client::WatchEvent::Lost(_) => WatchEvent::Disconnected,
                };
                let lost = out == WatchEvent::Disconnected;
                if tx.send(out).await.is_err() || lost {
                    return;
                }
            }
            let _ = tx.send(WatchEvent::Disconnected).await;
        });
        self.watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, w);
        Ok((cookie, rx))
    }

    async fn unwatch(&self, _oid: &str, cookie: u64) -> Result<(), BackendError> {
        let w = self
            .watches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie);
        match w {
            Some(w) => {
                w.unwatch();
                Ok(())
            }
            None => Err(BackendError::NotFound(format!("watch {cookie}"))),
        }
    }

    async fn list_watchers(&self, oid: &str) -> Result<Vec<Watcher>, BackendError> {
        let w = self.io.list_watchers(oid).await.map_err(err)?;
        Ok(w.into_iter()
            .map(|w| Watcher {
                client: w.client,
                cookie: w.cookie,
            })
            .collect())
    }

    async fn notify(
        &self,
        oid: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<NotifyResult, BackendError> {
        let r = self.io.notify(oid, payload, timeout).await.map_err(err)?;
        Ok(NotifyResult {
            acks: r
                .acks
                .into_iter()
                .map(|(w, reply)| NotifyAck {
                    client: w.client,
                    cookie: w.cookie,
                    reply,
                })
                .collect(),
            timed_out: r
                .timed_out
                .into_iter()
                .map(|w| Watcher {
                    client: w.client,
                    cookie: w.cookie,
                })
                .collect(),
        })
    }

    async fn notify_ack(
        &self,
        oid: &str,
        notify_id: u64,
        cookie: u64,
        reply: Bytes,
    ) -> Result<(), BackendError> {
        self.io
            .notify_ack(oid, notify_id, cookie, reply)
            .await
            .map_err(err)
    }

    async fn blocklist_add(&self, client: &str, expire: Duration) -> Result<(), BackendError> {
        self.rados
            .blocklist_add(client, expire)
            .await
            .map(|_| ())
            .map_err(err)
    }
}
