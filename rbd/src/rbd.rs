//! Pool-level image management (`rbd create|ls|info|resize|rm|rename|import|export`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::backend::{BackendError, ObjectBackend};
use crate::error::{RbdError, Result};
use crate::image::{
    data_objects_in, read_header, read_id, Image, ImageOptions, OBJECT_CONCURRENCY,
};
use crate::layout::{self, Header};
use crate::object_map::{self, ObjectMap};

/// A progress callback: `(done, total)` in the operation's own unit (bytes
/// for import/export, objects for resize/remove).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// A no-op progress callback.
pub fn no_progress(_done: u64, _total: u64) {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub name: String,
    pub id: String,
    pub size: u64,
    pub order: u8,
    pub object_size: u64,
    pub object_prefix: String,
    pub num_objs: u64,
    pub features: u64,
    /// `FLAG_*` of [`crate::object_map`] (an invalid object map).
    pub flags: u64,
    /// A clone's parent.
    pub parent: Option<crate::layering::ParentSpec>,
}

/// What an import wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportStats {
    pub bytes: u64,
    /// Bytes actually written (the rest were zeros, left as holes).
    pub data_bytes: u64,
}

/// What an export read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    pub bytes: u64,
    /// Bytes written to the target (holes and zero objects were seeked over).
    pub data_bytes: u64,
}

/// Import and export detect zeros in aligned blocks of this size (as `rbd
/// import`'s sparse size does); shorter zero runs are copied as data.
const SPARSE_BLOCK: usize = 4096;

/// One pool's images.
#[derive(Clone)]
pub struct Rbd {
    backend: Arc<dyn ObjectBackend>,
    opts: ImageOptions,
}

impl Rbd {
    pub fn new(backend: Arc<dyn ObjectBackend>) -> Self {
        Self::with_options(backend, ImageOptions::default())
    }

    /// `opts` apply to the images this handle opens.
    pub fn with_options(backend: Arc<dyn ObjectBackend>, opts: ImageOptions) -> Self {
        Rbd { backend, opts }
    }

    pub fn backend(&self) -> &Arc<dyn ObjectBackend> {
        &self.backend
    }

    /// Create a thin image: metadata only, no data objects.
    ///
    /// The exclusive create of `rbd_id.<name>` is what serialises two
    /// creators of one name; a failure after it is rolled back.
    pub async fn create(&self, name: &str, size: u64, order: u8) -> Result<ImageInfo> {
        layout::check_name(name).map_err(RbdError::InvalidArgument)?;
        layout::check_order(order).map_err(RbdError::InvalidArgument)?;
        layout::check_size(size, order).map_err(RbdError::InvalidArgument)?;
        let b = self.backend.as_ref();
        let id = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        let id_oid = layout::id_oid(name);
        match b.create(&id_oid, true).await {
            Ok(()) => {}
            Err(BackendError::Exists(_)) => return Err(RbdError::Exists(name.to_string())),
            Err(e) => return Err(e.into()),
        }
        let header_oid = layout::header_oid(&id);
        // Every image that can have an object map gets one (Ceph's default features since
        // Jewel include object-map and fast-diff).
        let map_objects = object_map::objects_for(size, order).ok();
        let map_features = map_objects.map_or(0, |_| object_map::FEATURES);
        let header = Header {
            size,
            order,
            object_prefix: layout::object_prefix(&id),
            features: layout::FEATURE_EXCLUSIVE_LOCK | map_features,
            flags: 0,
            stripe_unit: 1 << order,
            stripe_count: 1,
            create_timestamp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            snapc: Default::default(),
            parent: None,
        };
        let mut dir = BTreeMap::new();
        dir.insert(layout::dir_name_key(name), Bytes::from(id.clone()));
        dir.insert(layout::dir_id_key(&id), Bytes::from(name.to_string()));
        let rest = async {
            b.write_full(&id_oid, Bytes::from(id.clone())).await?;
            if let Some(objects) = map_objects {
                b.write_full(
                    &object_map::map_oid(&id, None),
                    ObjectMap::new(objects).encode(),
                )
                .await?;
            }
            b.create(&header_oid, true).await?;
            b.omap_set(&header_oid, header.encode()).await?;
            b.omap_set(layout::DIRECTORY, dir).await
        };
        if let Err(e) = rest.await {
            let _ = b.remove(&header_oid).await;
            let _ = b.remove(&object_map::map_oid(&id, None)).await;
            let _ = b.remove(&id_oid).await;
            return Err(e.into());
        }
        tracing::info!(image = name, %id, size, order, "image created");
        Ok(info_of(name, &id, &header))
    }

    /// Image names, sorted.
    pub async fn list(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut after = "name_".to_string();
        loop {
            let (page, more) = match self
                .backend
                .omap_list(layout::DIRECTORY, &after, 1024)
                .await
            {
                Ok(p) => p,
                Err(BackendError::NotFound(_)) => return Ok(names),
                Err(e) => return Err(e.into()),
            };
            let mut past = false;
            for (k, _) in &page {
                match k.strip_prefix("name_") {
                    Some(n) => names.push(n.to_string()),
                    None => past = true,
                }
            }
            match page.last() {
                Some((k, _)) if more && !past => after = k.clone(),
                _ => return Ok(names),
            }
        }
    }

    pub async fn info(&self, name: &str) -> Result<ImageInfo> {
        let id = read_id(self.backend.as_ref(), name).await?;
        let header = read_header(self.backend.as_ref(), name, &layout::header_oid(&id)).await?;
        Ok(info_of(name, &id, &header))
    }

    /// Open an image with this handle's options.
    pub async fn open(&self, name: &str) -> Result<Image> {
        Image::open_with(self.backend.clone(), name, self.opts.clone()).await
    }

    /// Opens `name` at its snapshot `snap`, read-only.
    pub async fn open_snapshot(&self, name: &str, snap: &str) -> Result<Image> {
        Image::open_snapshot(self.backend.clone(), name, snap, self.opts.clone()).await
    }

    /// Grow or shrink. Takes the exclusive lock (asking a current writer to
    /// hand it over), as librbd does; progress counts objects trimmed.
    pub async fn resize(&self, name: &str, new_size: u64, progress: Progress<'_>) -> Result<()> {
        let img = self.open(name).await?;
        let r = img.resize(new_size, progress).await;
        img.close().await?;
        r
    }

    /// Remove an image and its data. Refused while any client has it open
    /// (watches its header), like `rbd rm`. Progress counts data objects.
    ///
    /// Not fenced against an open racing the watcher check (librbd takes the
    /// exclusive lock for that); the window is one round trip.
    pub async fn remove(&self, name: &str, progress: Progress<'_>) -> Result<()> {
        let id = read_id(self.backend.as_ref(), name).await?;
        self.remove_by_id(name, &id, true, progress).await
    }

    /// Removes image `id` (`name` for messages): its data, header and, if `listed` (it is
    /// in the directory rather than the trash), its directory entries and id object.
    pub(crate) async fn remove_by_id(
        &self,
        name: &str,
        id: &str,
        listed: bool,
        progress: Progress<'_>,
    ) -> Result<()> {
        let b = self.backend.as_ref();
        let id = id.to_string();
        let header_oid = layout::header_oid(&id);
        let header = match read_header(b, name, &header_oid).await {
            Ok(h) => Some(h),
            // Half-created or damaged: still remove what is there.
            Err(RbdError::Corrupt(..)) => None,
            Err(e) => return Err(e),
        };
        // Snapshots first: a refusal that does not depend on timing (a watch of a client
        // that just closed the image may linger for a moment).
        if header.is_some() {
            let snaps = crate::image::read_snapshots(b, name, &header_oid).await?;
            if !snaps.is_empty() {
                return Err(RbdError::HasSnapshots(name.to_string(), snaps.len()));
            }
        }
        refuse_if_open(b, name, &header_oid).await?;
        // Without a readable header the data objects are still found by their prefix.
        let (prefix, count) = match &header {
            Some(h) => (
                h.object_prefix.clone(),
                layout::num_objects(h.size, h.order),
            ),
            None => (layout::object_prefix(&id), u64::MAX),
        };
        let objects = data_objects_in(b, &prefix, 0, count).await?;
        let total = objects.len() as u64;
        let done = AtomicU64::new(0);
        let prefix = &prefix;
        futures::stream::iter(objects.into_iter().map(|n| {
            let oid = layout::data_oid(prefix, n);
            async move {
                match b.remove(&oid).await {
                    Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
                    Err(e) => Err(RbdError::from(e)),
                }
            }
        }))
        .buffer_unordered(OBJECT_CONCURRENCY)
        .try_for_each(|()| {
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
            async { Ok(()) }
        })
        .await?;
        let ignore_missing = |r: std::result::Result<(), BackendError>| match r {
            Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(RbdError::from(e)),
        };
        // A clone leaves its parent's list of children.
        if let Some(spec) = header.as_ref().and_then(|h| h.parent.as_ref()) {
            let key = crate::layering::child_key(spec.snap_id, &b.pool_name(), &id);
            let parent_pool = crate::backend::on_pool(&self.backend, &spec.pool)?;
            ignore_missing(
                parent_pool
                    .omap_rm(&layout::header_oid(&spec.image_id), &[key])
                    .await,
            )?;
        }
        if header
            .as_ref()
            .is_none_or(|h| h.features & object_map::FEATURE_OBJECT_MAP != 0)
        {
            ignore_missing(b.remove(&object_map::map_oid(&id, None)).await)?;
        }
        ignore_missing(b.remove(&header_oid).await)?;
        if listed {
            ignore_missing(
                b.omap_rm(
                    layout::DIRECTORY,
                    &[layout::dir_name_key(name), layout::dir_id_key(&id)],
                )
                .await,
            )?;
            ignore_missing(b.remove(&layout::id_oid(name)).await)?;
        }
        tracing::info!(image = name, %id, "image removed");
        Ok(())
    }

    /// Creates `child` in this pool as a clone of `parent@snap` in `parent_pool`'s pool
    /// (librbd's `clone`, layering): instant, whatever the size; the child reads the
    /// snapshot until it writes. The snapshot must be protected (so it cannot go away while
    /// the child needs it).
    pub async fn clone_image(
        &self,
        parent_pool: &Rbd,
        parent: &str,
        snap: &str,
        child: &str,
    ) -> Result<ImageInfo> {
        let pb = parent_pool.backend.as_ref();
        let parent_id = read_id(pb, parent).await?;
        let parent_header_oid = layout::header_oid(&parent_id);
        let parent_header = read_header(pb, parent, &parent_header_oid).await?;
        let snaps = crate::image::read_snapshots(pb, parent, &parent_header_oid).await?;
        let at = snaps
            .iter()
            .find(|s| s.name == snap)
            .cloned()
            .ok_or_else(|| RbdError::NotFound(format!("{parent}@{snap}")))?;
        if !at.protected {
            return Err(RbdError::InvalidArgument(format!(
                "snapshot {parent}@{snap} is not protected; protect it first (`basalt rbd snap \
                 protect`): a clone needs it to stay"
            )));
        }
        let info = self.create(child, at.size, parent_header.order).await?;
        // Listed as a child first: from here on the snapshot cannot be unprotected. A crash
        // before the link below leaves a plain empty image and a stale child entry.
        let mut kv = BTreeMap::new();
        kv.insert(
            crate::layering::child_key(at.id, &self.backend.pool_name(), &info.id),
            layout::encode(&crate::layering::ChildRef {
                pool: self.backend.pool_name(),
                image_id: info.id.clone(),
                image_name: child.to_string(),
            }),
        );
        pb.omap_set(&parent_header_oid, kv).await?;
        let spec = crate::layering::ParentSpec {
            pool: pb.pool_name(),
            image_id: parent_id,
            image_name: parent.to_string(),
            snap_id: at.id,
            snap_name: at.name,
            overlap: at.size,
        };
        let mut kv = BTreeMap::new();
        kv.insert(
            crate::layering::PARENT_KEY.to_string(),
            layout::encode(&spec),
        );
        self.backend
            .omap_set(&layout::header_oid(&info.id), kv)
            .await?;
        Ok(ImageInfo {
            parent: Some(spec),
            ..info
        })
    }

    /// The clones of `name@snap`: (pool, image name) each.
    pub async fn children(&self, name: &str, snap: &str) -> Result<Vec<(String, String)>> {
        let b = self.backend.as_ref();
        let id = read_id(b, name).await?;
        let header_oid = layout::header_oid(&id);
        let snaps = crate::image::read_snapshots(b, name, &header_oid).await?;
        let at = snaps
            .iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| RbdError::NotFound(format!("{name}@{snap}")))?;
        let refs = crate::image::read_children(b, name, &header_oid, at.id).await?;
        Ok(refs.into_iter().map(|c| (c.pool, c.image_name)).collect())
    }

    /// Rename; open images keep working (they address objects by id).
    pub async fn rename(&self, old: &str, new: &str) -> Result<()> {
        layout::check_name(new).map_err(RbdError::InvalidArgument)?;
        let b = self.backend.as_ref();
        let id = read_id(b, old).await?;
        let new_oid = layout::id_oid(new);
        match b.create(&new_oid, true).await {
            Ok(()) => {}
            Err(BackendError::Exists(_)) => return Err(RbdError::Exists(new.to_string())),
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = b.write_full(&new_oid, Bytes::from(id.clone())).await {
            let _ = b.remove(&new_oid).await;
            return Err(e.into());
        }
        let mut kv = BTreeMap::new();
        kv.insert(layout::dir_name_key(new), Bytes::from(id.clone()));
        kv.insert(layout::dir_id_key(&id), Bytes::from(new.to_string()));
        b.omap_set(layout::DIRECTORY, kv).await?;
        b.omap_rm(layout::DIRECTORY, &[layout::dir_name_key(old)])
            .await?;
        b.remove(&layout::id_oid(old)).await?;
        Ok(())
    }

    /// Create image `name` of `size` bytes from `reader`, leaving zero
    /// regions as holes: an all-zero object-sized chunk writes no object, and
    /// zero 4 KiB blocks inside a chunk are skipped. Progress counts bytes
    /// read. On failure the half-imported image is removed.
    pub async fn import<R: AsyncRead + Unpin + Send>(
        &self,
        mut reader: R,
        size: u64,
        name: &str,
        order: u8,
        progress: Progress<'_>,
    ) -> Result<ImportStats> {
        self.create(name, size, order).await?;
        let img = match self.open(name).await {
            Ok(i) => i,
            Err(e) => {
                let _ = self.remove(name, &no_progress).await;
                return Err(e);
            }
        };
        let r = import_into(&img, &mut reader, size, progress).await;
        img.close().await?;
        if r.is_err() {
            let _ = self.remove(name, &no_progress).await;
        }
        r
    }

    /// Write image `name` to `writer`, seeking over holes and zero objects
    /// so a file target stays sparse. Progress counts bytes.
    pub async fn export<W: AsyncWrite + AsyncSeek + Unpin + Send>(
        &self,
        name: &str,
        mut writer: W,
        progress: Progress<'_>,
    ) -> Result<ExportStats> {
        let img = self.open(name).await?;
        let r = export_from(&img, &mut writer, progress).await;
        img.close().await?;
        r
    }
}

/// `Busy` if a client has image `name` open (watches its header), as `rbd rm` refuses.
pub(crate) async fn refuse_if_open(
    b: &dyn ObjectBackend,
    name: &str,
    header_oid: &str,
) -> Result<()> {
    match b.list_watchers(header_oid).await {
        Ok(w) if !w.is_empty() => {
            let who: Vec<String> = w.iter().map(|w| w.client.clone()).collect();
            Err(RbdError::Busy(
                name.to_string(),
                format!("{} watcher(s): {}", w.len(), who.join(", ")),
            ))
        }
        Ok(_) | Err(BackendError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn info_of(name: &str, id: &str, h: &Header) -> ImageInfo {
    ImageInfo {
        name: name.to_string(),
        id: id.to_string(),
        size: h.size,
        order: h.order,
        object_size: 1 << h.order,
        object_prefix: h.object_prefix.clone(),
        num_objs: layout::num_objects(h.size, h.order),
        features: h.features,
        flags: h.flags,
        parent: h.parent.clone(),
    }
}

/// Maximal runs `[start, end)` of `SPARSE_BLOCK`-aligned blocks of `d` that
/// are not all zeros.
fn nonzero_runs(d: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in d.chunks(SPARSE_BLOCK).enumerate() {
        if block.iter().all(|b| *b == 0) {
            continue;
        }
        let (start, end) = (i * SPARSE_BLOCK, i * SPARSE_BLOCK + block.len());
        match runs.last_mut() {
            Some(r) if r.1 == start => r.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

fn local(e: std::io::Error) -> RbdError {
    RbdError::LocalIo(e.to_string())
}

async fn import_into<R: AsyncRead + Unpin + Send>(
    img: &Image,
    reader: &mut R,
    size: u64,
    progress: Progress<'_>,
) -> Result<ImportStats> {
    let os = img.object_size();
    let mut stats = ImportStats {
        bytes: 0,
        data_bytes: 0,
    };
    let mut buf = vec![0u8; os as usize];
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(os) as usize;
        let mut got = 0;
        while got < want {
            let n = reader.read(&mut buf[got..want]).await.map_err(local)?;
            if n == 0 {
                return Err(RbdError::LocalIo(format!(
                    "input ended at byte {} of {size}",
                    off + got as u64
                )));
            }
            got += n;
        }
        let chunk = Bytes::copy_from_slice(&buf[..want]);
        // Write maximal runs of non-zero blocks; zero blocks stay holes.
        for (start, end) in nonzero_runs(&chunk) {
            img.write(off + start as u64, chunk.slice(start..end))
                .await?;
            stats.data_bytes += (end - start) as u64;
        }
        off += want as u64;
        stats.bytes = off;
        progress(off, size);
    }
    Ok(stats)
}

async fn export_from<W: AsyncWrite + AsyncSeek + Unpin + Send>(
    img: &Image,
    writer: &mut W,
    progress: Progress<'_>,
) -> Result<ExportStats> {
    let size = img.size();
    let os = img.object_size();
    let mut stats = ExportStats {
        bytes: size,
        data_bytes: 0,
    };
    // Where the writer's cursor is; seek only when a hole moved us on.
    let mut pos = 0u64;
    let n_objs = layout::num_objects(size, img.order());
    // Read ahead a few objects while writing the current one.
    let mut reads = futures::stream::iter((0..n_objs).map(|n| {
        let len = (size - n * os).min(os);
        async move { img.read_object(n, 0, len).await.map(|d| (n, d)) }
    }))
    .buffered(4);
    while let Some(r) = reads.next().await {
        let (n, data) = r?;
        let base = n * os;
        if let Some(d) = data {
            // Write runs of non-zero blocks; seek over zero ones.
            for (start, end) in nonzero_runs(&d) {
                let at = base + start as u64;
                if pos != at {
                    writer
                        .seek(std::io::SeekFrom::Start(at))
                        .await
                        .map_err(local)?;
                }
                writer.write_all(&d[start..end]).await.map_err(local)?;
                pos = base + end as u64;
                stats.data_bytes += (end - start) as u64;
            }
        }
        progress((base + os).min(size), size);
    }
    if pos < size {
        // Trailing hole: write the last byte so the target has the full length.
        writer
            .seek(std::io::SeekFrom::Start(size - 1))
            .await
            .map_err(local)?;
        writer.write_all(&[0]).await.map_err(local)?;
    }
    writer.flush().await.map_err(local)?;
    Ok(stats)
}
