//! # basalt-gw: block images over NBD
//!
//! Owns the glue between the NBD server (`basalt-nbd`) and block images (`basalt-rbd`) on a
//! real cluster (`basalt-client`): the export name `POOL/IMAGE` resolves to an open
//! [`basalt_rbd::Image`], shared by every connection to that image on this gateway, so a
//! gateway is one client of the image and takes its exclusive lock once (several connections
//! from one QEMU, or nbdcopy's four, never fight over it).
//!
//! The gateway holds no write-back cache: an image write returns once every acting replica
//! has it durably, so FLUSH and FUA have nothing left to do and a FLUSH on one connection
//! covers writes completed on all of them — hence `CAN_MULTI_CONN`. Reads are not cached
//! either, so the "drop caches when the lock is (re)acquired" rule holds trivially.
//!
//! Images opened here stay open for the gateway's life (their watch with them); a gateway
//! serving many short-lived images would want to close idle ones — not needed for VM disks,
//! which stay attached. The exclusive lock does not stay with an image nobody uses: when its
//! last NBD connection ends, the image relinquishes the lock (as librbd releases it on close)
//! before the socket is closed, so a client that moved to another gateway — a migrated VM —
//! finds the lock free there and takes it on its first try instead of asking this gateway
//! and waiting for the release.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use basalt_client::Rados;
use basalt_nbd::{Export, ExportRegistry, Extent, NbdError};
use basalt_rbd::{ExtentState, Image, ImageOptions, RadosBackend, Rbd, RbdError};
use bytes::Bytes;
use tokio::sync::Mutex;

/// Resolves `POOL/IMAGE` export names against a cluster.
pub struct ImageRegistry {
    rados: Rados,
    watch_timeout: Duration,
    options: ImageOptions,
    /// Open images by export name; an entry being opened holds the lock so two connections
    /// racing to the same image get the same instance.
    images: Mutex<HashMap<String, Arc<ImageExport>>>,
    pools: Mutex<HashMap<String, Rbd>>,
}

impl ImageRegistry {
    pub fn new(rados: Rados, watch_timeout: Duration, options: ImageOptions) -> Self {
        ImageRegistry {
            rados,
            watch_timeout,
            options,
            images: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
        }
    }

    async fn rbd(&self, pool: &str) -> Result<Rbd, NbdError> {
        let mut pools = self.pools.lock().await;
        if let Some(r) = pools.get(pool) {
            return Ok(r.clone());
        }
        let io = self
            .rados
            .ioctx(pool)
            .map_err(|e| NbdError::NotFound(format!("pool {pool}: {e}")))?;
        let backend = Arc::new(RadosBackend::new(
            self.rados.clone(),
            io,
            self.watch_timeout,
        ));
        let rbd = Rbd::with_options(backend, self.options.clone());
        pools.insert(pool.to_string(), rbd.clone());
        Ok(rbd)
    }
}

fn split_name(name: &str) -> Result<(&str, &str), NbdError> {
    match name.split_once('/') {
        Some((pool, image)) if !pool.is_empty() && !image.is_empty() && !image.contains('/') => {
            Ok((pool, image))
        }
        _ => Err(NbdError::NotFound(format!(
            "export {name:?} is not POOL/IMAGE or POOL/IMAGE@SNAP (e.g. nbd://HOST:PORT/rbd/vm1)"
        ))),
    }
}

fn nbd_error(e: RbdError) -> NbdError {
    match e {
        RbdError::NotFound(m) => NbdError::NotFound(m),
        RbdError::InvalidArgument(m) => NbdError::Invalid(m),
        e @ RbdError::Blocklisted(_) => NbdError::PermissionDenied(e.to_string()),
        RbdError::Backend(basalt_rbd::BackendError::NoSpace(m)) => NbdError::NoSpace(m),
        RbdError::Closed(m) => NbdError::Shutdown(m),
        e @ RbdError::ReadOnly(_) => NbdError::PermissionDenied(e.to_string()),
        other => NbdError::Io(other.to_string()),
    }
}

#[async_trait]
impl ExportRegistry for ImageRegistry {
    async fn open(&self, name: &str) -> Result<Arc<dyn Export>, NbdError> {
        let (pool, image) = split_name(name)?;
        let mut images = self.images.lock().await;
        // A blocklisted gateway keeps handing out its fenced instance: its writes fail
        // (EPERM) until the gateway restarts, which makes it a new client instance (the
        // blocklist fences name/nonce), even under the same --name.
        if let Some(e) = images.get(name) {
            return Ok(Arc::new(Connection::new(e.clone())));
        }
        let rbd = self.rbd(pool).await?;
        // `IMAGE@SNAP` exports the snapshot, read-only.
        let img = match image.split_once('@') {
            Some((image, snap)) => rbd.open_snapshot(image, snap).await,
            None => rbd.open(image).await,
        }
        .map_err(nbd_error)?;
        tracing::info!(export = name, size = img.size(), "image opened");
        let export = Arc::new(ImageExport {
            name: name.to_string(),
            image: img,
            connections: AtomicUsize::new(0),
        });
        images.insert(name.to_string(), export.clone());
        Ok(Arc::new(Connection::new(export)))
    }

    async fn list(&self) -> Result<Vec<String>, NbdError> {
        let map = self.rados.osdmap();
        let mut out = Vec::new();
        for pool in map.pools.values() {
            let Ok(rbd) = self.rbd(&pool.name).await else {
                continue;
            };
            match rbd.list().await {
                Ok(names) => out.extend(names.into_iter().map(|n| format!("{}/{n}", pool.name))),
                Err(e) => tracing::warn!(pool = %pool.name, error = %e, "cannot list images"),
            }
        }
        Ok(out)
    }
}

/// One open image served to NBD connections.
pub struct ImageExport {
    name: String,
    image: Image,
    /// NBD connections using the image now ([`Connection`]s alive).
    connections: AtomicUsize,
}

/// How long a disconnecting client's socket stays open while the image relinquishes its lock
/// (an unlock: one round trip to the header's primary). Past this the socket closes anyway
/// and the release finishes in the background.
const RELINQUISH_WAIT: Duration = Duration::from_secs(5);

/// One NBD connection's use of an open image. When the image's last one ends (the client
/// disconnected: after its final flush, or a migrated VM's source), the image relinquishes
/// its exclusive lock; a connection opened meanwhile just takes it again on its first write.
struct Connection {
    export: Arc<ImageExport>,
    /// Counted out of `connections` already (by `disconnect`, or else by `drop`).
    left: AtomicBool,
}

impl Connection {
    fn new(export: Arc<ImageExport>) -> Self {
        export.connections.fetch_add(1, Ordering::SeqCst);
        Connection {
            export,
            left: AtomicBool::new(false),
        }
    }

    /// Counts this connection out; true if it was the image's last.
    fn leave(&self) -> bool {
        !self.left.swap(true, Ordering::SeqCst)
            && self.export.connections.fetch_sub(1, Ordering::SeqCst) == 1
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // A connection that ended without `disconnect` (its task was aborted, or it never
        // reached the transmission phase).
        if self.leave() {
            self.export.image.relinquish_lock_in_background();
        }
    }
}

#[async_trait]
impl Export for Connection {
    fn size(&self) -> u64 {
        self.export.size()
    }

    fn read_only(&self) -> bool {
        self.export.read_only()
    }

    fn can_multi_conn(&self) -> bool {
        self.export.can_multi_conn()
    }

    fn description(&self) -> String {
        self.export.description()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.export.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        self.export.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), NbdError> {
        self.export.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        self.export.trim(offset, len, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast_zero: bool,
    ) -> Result<(), NbdError> {
        self.export
            .write_zeroes(offset, len, fua, may_trim, fast_zero)
            .await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError> {
        self.export.block_status(offset, len).await
    }

    async fn disconnect(&self) {
        if self.leave() {
            tracing::debug!(export = %self.export.name, "last connection closing: relinquishing the lock");
            if tokio::time::timeout(RELINQUISH_WAIT, self.export.image.relinquish_lock())
                .await
                .is_err()
            {
                tracing::warn!(export = %self.export.name,
                    "the lock was not released within {RELINQUISH_WAIT:?} of the disconnect; \
                     closing the connection, the release goes on");
            }
        }
    }
}

#[async_trait]
impl Export for ImageExport {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_only(&self) -> bool {
        self.image.snapshot().is_some()
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn description(&self) -> String {
        format!("basalt image {}", self.name)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        self.image
            .read(offset, u64::from(len))
            .await
            .map_err(nbd_error)
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), NbdError> {
        // Acknowledged image writes are already durable on every acting replica: FUA needs
        // nothing more.
        self.image.write(offset, data).await.map_err(nbd_error)
    }

    async fn flush(&self) -> Result<(), NbdError> {
        self.image.flush().await.map_err(nbd_error)
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> Result<(), NbdError> {
        self.image
            .discard(offset, u64::from(len))
            .await
            .map_err(nbd_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _may_trim: bool,
        _fast_zero: bool,
    ) -> Result<(), NbdError> {
        // Zeroing frees whole objects and zeroes partial ones (no data is written), which is
        // as fast as zeroing gets here, so FAST_ZERO is honoured. NO_HOLE would want the
        // range allocated; reads return zeros either way.
        self.image
            .write_zeroes(offset, u64::from(len))
            .await
            .map_err(nbd_error)
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, NbdError> {
        let extents = self
            .image
            .block_status(offset, u64::from(len))
            .await
            .map_err(nbd_error)?;
        let mut out = Vec::with_capacity(extents.len());
        for e in extents {
            // Extents never exceed the u32 request length, so this cannot truncate.
            let length = u32::try_from(e.len).unwrap_or(u32::MAX);
            if length == 0 {
                continue;
            }
            out.push(match e.state {
                ExtentState::Data => Extent::data(length),
                ExtentState::Hole => Extent::hole(length),
            });
        }
        if out.is_empty() {
            out.push(Extent::data(len));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_pool_slash_image() {
        assert_eq!(split_name("rbd/vm1").ok(), Some(("rbd", "vm1")));
        for bad in ["rbd", "/vm", "rbd/", "a/b/c", ""] {
            assert!(split_name(bad).is_err(), "{bad}");
        }
    }
}

/// Reads the gateway's export rules (`--nbd-access FILE`): TOML mapping a client
/// certificate's CN to the exports it may open, e.g.
/// `"client.vm1" = ["rbd/vm1", "vms/*"]`, `"client.admin" = ["*"]`.
pub fn load_export_rules(path: &std::path::Path) -> anyhow::Result<basalt_nbd::ExportRules> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the export rules {}", path.display()))?;
    let table: std::collections::BTreeMap<String, Vec<String>> = toml::from_str(&text)
        .with_context(|| {
            format!(
                "{} must map client names to lists of exports, e.g. \"client.vm1\" = [\"rbd/vm1\"]",
                path.display()
            )
        })?;
    let mut rules = basalt_nbd::ExportRules::new();
    for (client, patterns) in table {
        rules
            .allow(&client, patterns)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(rules)
}
