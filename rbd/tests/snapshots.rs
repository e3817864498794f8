//! Snapshots and clones of images against the in-memory cluster: the image layer's
//! bookkeeping (header records, write contexts, copy-up, overlap) without OSDs.

mod common;

use basalt_rbd::{no_progress, MemCluster, Rbd, RbdError, DEFAULT_ORDER};
use bytes::Bytes;
use common::fast;

const MIB: u64 = 1 << 20;

fn bytes(b: u8, n: u64) -> Bytes {
    Bytes::from(vec![b; n as usize])
}

#[tokio::test]
async fn snapshots_keep_the_past_and_rollback_restores_it() {
    let cluster = MemCluster::new();
    let rbd = Rbd::with_options(cluster.client(), fast());
    rbd.create("vm", 12 * MIB, DEFAULT_ORDER).await.unwrap();
    let img = rbd.open("vm").await.unwrap();
    img.write(0, bytes(1, 6 * MIB)).await.unwrap();
    let s1 = img.snap_create("one").await.unwrap();
    assert!(matches!(
        img.snap_create("one").await,
        Err(RbdError::Exists(_))
    ));
    img.write(MIB, bytes(2, MIB)).await.unwrap();
    img.discard(4 * MIB, 4 * MIB).await.unwrap();
    let snaps = img.snapshots().await.unwrap();
    assert_eq!(snaps, vec![s1.clone()]);

    let at = rbd.open_snapshot("vm", "one").await.unwrap();
    assert_eq!(at.read(0, 6 * MIB).await.unwrap(), bytes(1, 6 * MIB));
    assert!(matches!(
        at.write(0, bytes(9, 10)).await,
        Err(RbdError::ReadOnly(_))
    ));
    at.close().await.unwrap();
    assert_eq!(img.read(MIB, MIB).await.unwrap(), bytes(2, MIB));
    assert_eq!(img.read(4 * MIB, MIB).await.unwrap(), bytes(0, MIB));

    img.snap_rollback("one", &no_progress).await.unwrap();
    assert_eq!(img.read(0, 6 * MIB).await.unwrap(), bytes(1, 6 * MIB));
    // Protected snapshots stay.
    img.snap_set_protected("one", true).await.unwrap();
    assert!(matches!(
        img.snap_remove("one").await,
        Err(RbdError::SnapshotProtected(_))
    ));
    img.close().await.unwrap();
    assert!(matches!(
        rbd.remove("vm", &no_progress).await,
        Err(RbdError::HasSnapshots(_, 1))
    ));
    let img = rbd.open("vm").await.unwrap();
    img.snap_set_protected("one", false).await.unwrap();
    img.snap_remove("one").await.unwrap();
    assert!(img.snapshots().await.unwrap().is_empty());
    img.close().await.unwrap();
    rbd.remove("vm", &no_progress).await.unwrap();
}

#[tokio::test]
async fn a_clone_copies_up_on_write_and_shrinking_lowers_its_overlap() {
    let cluster = MemCluster::new();
    let rbd = Rbd::with_options(cluster.client(), fast());
    rbd.create("gold", 8 * MIB, DEFAULT_ORDER).await.unwrap();
    let gold = rbd.open("gold").await.unwrap();
    gold.write(0, bytes(7, 8 * MIB)).await.unwrap();
    gold.snap_create("base").await.unwrap();
    assert!(matches!(
        rbd.clone_image(&rbd, "gold", "base", "child").await,
        Err(RbdError::InvalidArgument(_))
    ));
    gold.snap_set_protected("base", true).await.unwrap();
    let info = rbd
        .clone_image(&rbd, "gold", "base", "child")
        .await
        .unwrap();
    assert_eq!(info.parent.as_ref().map(|p| p.overlap), Some(8 * MIB));
    assert_eq!(
        rbd.children("gold", "base").await.unwrap(),
        vec![("mem".to_string(), "child".to_string())]
    );
    // Changing the parent's head does not reach the clone.
    gold.write(0, bytes(8, MIB)).await.unwrap();
    let child = rbd.open("child").await.unwrap();
    assert_eq!(child.read(0, 8 * MIB).await.unwrap(), bytes(7, 8 * MIB));
    // A 4 KiB write copies its object up: the rest of the object still reads the parent.
    child.write(4096, bytes(3, 4096)).await.unwrap();
    let mut want = vec![7u8; 4 * MIB as usize];
    want[4096..8192].fill(3);
    assert_eq!(child.read(0, 4 * MIB).await.unwrap(), Bytes::from(want));
    assert_eq!(
        cluster.object_names(&format!("rbd_data.{}", info.id)).len(),
        1
    );
    // A whole-object discard hides the parent rather than exposing it.
    child.discard(4 * MIB, 4 * MIB).await.unwrap();
    assert_eq!(
        child.read(4 * MIB, 4 * MIB).await.unwrap(),
        bytes(0, 4 * MIB)
    );
    // Shrink, grow: the regrown part reads zeros, not the parent.
    child.resize(MIB, &no_progress).await.unwrap();
    child.resize(8 * MIB, &no_progress).await.unwrap();
    assert_eq!(child.read(MIB, MIB).await.unwrap(), bytes(0, MIB));
    assert_eq!(child.parent().map(|p| p.overlap), Some(MIB));
    assert!(matches!(
        gold.snap_set_protected("base", false).await,
        Err(RbdError::SnapshotHasChildren(_, 1))
    ));
    child.flatten(&no_progress).await.unwrap();
    assert!(rbd.children("gold", "base").await.unwrap().is_empty());
    gold.snap_set_protected("base", false).await.unwrap();
    gold.snap_remove("base").await.unwrap();
    let mut want = vec![7u8; MIB as usize];
    want[4096..8192].fill(3);
    assert_eq!(child.read(0, MIB).await.unwrap(), Bytes::from(want));
    child.close().await.unwrap();
    gold.close().await.unwrap();
}

#[tokio::test]
async fn the_trash_keeps_an_image_restorable_until_it_is_removed() {
    let cluster = MemCluster::new();
    let rbd = Rbd::with_options(cluster.client(), fast());
    rbd.create("vm", 8 * MIB, DEFAULT_ORDER).await.unwrap();
    let img = rbd.open("vm").await.unwrap();
    img.write(0, bytes(5, MIB)).await.unwrap();
    // Open images cannot be trashed.
    assert!(matches!(
        rbd.trash_move("vm", 0).await,
        Err(RbdError::Busy(..))
    ));
    img.close().await.unwrap();
    let e = rbd.trash_move("vm", 3_600_000).await.unwrap();
    assert!(rbd.list().await.unwrap().is_empty());
    assert_eq!(rbd.trash_list().await.unwrap(), vec![e.clone()]);
    // The name is free again; the trashed image cannot come back under it.
    rbd.create("vm", MIB, DEFAULT_ORDER).await.unwrap();
    assert!(matches!(
        rbd.trash_restore(&e.id, None).await,
        Err(RbdError::Exists(_))
    ));
    // Within its delay it is neither purged nor removed without force.
    assert!(rbd.trash_purge(&no_progress).await.unwrap().is_empty());
    assert!(rbd.trash_remove(&e.id, false, &no_progress).await.is_err());
    assert_eq!(
        rbd.trash_restore(&e.id, Some("vm-back")).await.unwrap(),
        "vm-back"
    );
    let back = rbd.open("vm-back").await.unwrap();
    assert_eq!(back.read(0, MIB).await.unwrap(), bytes(5, MIB));
    back.close().await.unwrap();
    // Removed for good, it leaves nothing, and the other image keeps its name.
    let e = rbd.trash_move("vm-back", 3_600_000).await.unwrap();
    rbd.trash_remove(&e.id, true, &no_progress).await.unwrap();
    assert!(rbd.trash_list().await.unwrap().is_empty());
    assert!(cluster
        .object_names(&format!("rbd_data.{}", e.id))
        .is_empty());
    assert_eq!(rbd.list().await.unwrap(), vec!["vm"]);
}
