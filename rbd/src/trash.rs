//! The image trash (`rbd trash mv|ls|restore|rm|purge`): a removed VM disk can be brought
//! back until its delay ends.
//!
//! Moving an image to the trash takes its name out of the directory (`rbd_directory`,
//! `rbd_id.<name>`) and records it in the pool's `rbd_trash` object (omap `id_<id>` →
//! [`TrashEntry`]); its header and data stay, addressed by id, so nothing is copied either
//! way. Restoring puts the name back (or a new one, if the old is taken again). Removing
//! from the trash deletes the image by id, refused before its delay ends unless forced;
//! `purge` removes every entry whose delay has ended.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::BackendError;
use crate::error::{RbdError, Result};
use crate::image::{read_header, read_id};
use crate::layout;
use crate::rbd::{refuse_if_open, Progress, Rbd};

/// The pool's trash object.
pub const TRASH: &str = "rbd_trash";

/// One trashed image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
    /// Unix ms.
    pub deleted_ms: u64,
    /// Unix ms before which removing it from the trash needs `force`.
    pub deferment_end_ms: u64,
}

fn key(id: &str) -> String {
    format!("id_{id}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Rbd {
    /// Moves image `name` to the trash for at least `delay_ms`. Refused while a client has
    /// it open, like `rm`.
    pub async fn trash_move(&self, name: &str, delay_ms: u64) -> Result<TrashEntry> {
        let b = self.backend().clone();
        let id = read_id(b.as_ref(), name).await?;
        let header_oid = layout::header_oid(&id);
        read_header(b.as_ref(), name, &header_oid).await?;
        refuse_if_open(b.as_ref(), name, &header_oid).await?;
        let now = now_ms();
        let entry = TrashEntry {
            id: id.clone(),
            name: name.to_string(),
            deleted_ms: now,
            deferment_end_ms: now.saturating_add(delay_ms),
        };
        // Into the trash first: a crash in between leaves the image findable both ways,
        // never neither.
        let mut kv = BTreeMap::new();
        kv.insert(
            key(&id),
            Bytes::from(postcard::to_allocvec(&entry).unwrap_or_default()),
        );
        b.omap_set(TRASH, kv).await?;
        b.omap_rm(
            layout::DIRECTORY,
            &[layout::dir_name_key(name), layout::dir_id_key(&id)],
        )
        .await?;
        match b.remove(&layout::id_oid(name)).await {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(entry)
    }

    /// The trashed images, oldest first.
    pub async fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        let b = self.backend();
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let (page, more) = match b.omap_list(TRASH, &after, 1024).await {
                Ok(p) => p,
                Err(BackendError::NotFound(_)) => break,
                Err(e) => return Err(e.into()),
            };
            after = page.last().map(|(k, _)| k.clone()).unwrap_or_default();
            for (k, v) in &page {
                out.push(postcard::from_bytes::<TrashEntry>(v).map_err(|e| {
                    RbdError::Corrupt(TRASH.to_string(), format!("entry {k}: {e}"))
                })?);
            }
            if !more || after.is_empty() {
                break;
            }
        }
        out.sort_by_key(|e| e.deleted_ms);
        Ok(out)
    }

    async fn trash_entry(&self, id: &str) -> Result<TrashEntry> {
        let m = match self.backend().omap_get(TRASH, &[key(id)]).await {
            Ok(m) => m,
            Err(BackendError::NotFound(_)) => BTreeMap::new(),
            Err(e) => return Err(e.into()),
        };
        let v = m
            .get(&key(id))
            .ok_or_else(|| RbdError::NotFound(format!("trash entry {id}")))?;
        postcard::from_bytes(v)
            .map_err(|e| RbdError::Corrupt(TRASH.to_string(), format!("entry {id}: {e}")))
    }

    /// Brings trashed image `id` back as `name` (default: the name it had).
    pub async fn trash_restore(&self, id: &str, name: Option<&str>) -> Result<String> {
        let entry = self.trash_entry(id).await?;
        let name = name.unwrap_or(&entry.name).to_string();
        layout::check_name(&name).map_err(RbdError::InvalidArgument)?;
        let b = self.backend().clone();
        let id_oid = layout::id_oid(&name);
        match b.create(&id_oid, true).await {
            Ok(()) => {}
            Err(BackendError::Exists(_)) => return Err(RbdError::Exists(name)),
            Err(e) => return Err(e.into()),
        }
        b.write_full(&id_oid, Bytes::from(id.to_string())).await?;
        let mut kv = BTreeMap::new();
        kv.insert(layout::dir_name_key(&name), Bytes::from(id.to_string()));
        kv.insert(layout::dir_id_key(id), Bytes::from(name.clone()));
        b.omap_set(layout::DIRECTORY, kv).await?;
        b.omap_rm(TRASH, &[key(id)]).await?;
        Ok(name)
    }

    /// Deletes trashed image `id` for good; before its delay ends only with `force`.
    pub async fn trash_remove(&self, id: &str, force: bool, progress: Progress<'_>) -> Result<()> {
        let entry = self.trash_entry(id).await?;
        if !force && now_ms() < entry.deferment_end_ms {
            return Err(RbdError::InvalidArgument(format!(
                "trashed image {} ({id}) is kept until {} ms since the epoch; wait, restore \\
                 it, or force the removal",
                entry.name, entry.deferment_end_ms
            )));
        }
        self.remove_by_id(&entry.name, id, false, progress).await?;
        self.backend().omap_rm(TRASH, &[key(id)]).await?;
        Ok(())
    }

    /// Deletes every trashed image whose delay has ended; returns their names.
    pub async fn trash_purge(&self, progress: Progress<'_>) -> Result<Vec<String>> {
        let now = now_ms();
        let mut purged = Vec::new();
        for e in self.trash_list().await? {
            if e.deferment_end_ms <= now {
                self.trash_remove(&e.id, false, progress).await?;
                purged.push(e.name);
            }
        }
        Ok(purged)
    }
}
