//! Image management and data IO against the in-memory cluster.

mod common;

use std::io::Cursor;
use std::sync::Arc;
use std::sync::Mutex;

use basalt_rbd::{
    no_progress, Extent, ExtentState, MemCluster, ObjectBackend, Rbd, RbdError, DEFAULT_ORDER,
};
use bytes::Bytes;
use common::{fast, pattern};

const MIB: u64 = 1 << 20;

fn setup() -> (MemCluster, Rbd) {
    let cluster = MemCluster::new();
    let rbd = Rbd::with_options(cluster.client(), fast());
    (cluster, rbd)
}

#[tokio::test]
async fn create_list_info_and_thin_provisioning() {
    let (cluster, rbd) = setup();
    assert_eq!(rbd.list().await.unwrap(), Vec::<String>::new());
    let info = rbd.create("vm1", 10 * MIB, DEFAULT_ORDER).await.unwrap();
    assert_eq!(info.size, 10 * MIB);
    assert_eq!(info.order, 22);
    assert_eq!(info.object_size, 4 * MIB);
    assert_eq!(info.num_objs, 3);
    assert_eq!(info.object_prefix, format!("rbd_data.{}", info.id));
    assert_eq!(rbd.info("vm1").await.unwrap(), info);
    rbd.create("other", 1, 12).await.unwrap();
    assert_eq!(rbd.list().await.unwrap(), vec!["other", "vm1"]);
    // Thin: metadata only.
    assert!(cluster.object_names("rbd_data.").is_empty());
    let ids = cluster.object_names("rbd_id.");
    assert_eq!(ids, vec!["rbd_id.other", "rbd_id.vm1"]);
    assert!(cluster
        .object_names("rbd_header.")
        .contains(&format!("rbd_header.{}", info.id)));

    assert_eq!(
        rbd.create("vm1", MIB, 22).await.unwrap_err(),
        RbdError::Exists("vm1".into())
    );
    for bad in [11, 26] {
        assert!(matches!(
            rbd.create("x", MIB, bad).await.unwrap_err(),
            RbdError::InvalidArgument(_)
        ));
    }
    assert!(matches!(
        rbd.create("a/b", MIB, 22).await.unwrap_err(),
        RbdError::InvalidArgument(_)
    ));
    assert_eq!(
        rbd.info("nope").await.unwrap_err(),
        RbdError::NotFound("nope".into())
    );
    assert!(matches!(
        rbd.open("nope").await.err().unwrap(),
        RbdError::NotFound(_)
    ));
}

#[tokio::test]
async fn list_pages_through_many_images() {
    let (_c, rbd) = setup();
    let mut want: Vec<String> = (0..1500).map(|i| format!("img{i:05}")).collect();
    for n in &want {
        rbd.create(n, 4096, 12).await.unwrap();
    }
    want.sort();
    assert_eq!(rbd.list().await.unwrap(), want);
}

#[tokio::test]
async fn writes_and_reads_cross_objects() {
    let (cluster, rbd) = setup();
    let info = rbd.create("img", 64 * 1024, 12).await.unwrap();
    let img = rbd.open("img").await.unwrap();
    assert_eq!(img.size(), 64 * 1024);
    let data = pattern(7, 10_000);
    img.write(3000, Bytes::from(data.clone())).await.unwrap();
    // 3000..13000 touches objects 0..=3 (4 KiB each).
    let objs = cluster.object_names(&info.object_prefix);
    assert_eq!(
        objs,
        (0..4)
            .map(|n| format!("{}.{n:016x}", info.object_prefix))
            .collect::<Vec<_>>()
    );
    assert_eq!(&img.read(3000, 10_000).await.unwrap()[..], &data[..]);
    // Surrounding bytes and untouched objects are zeros.
    let all = img.read(0, 64 * 1024).await.unwrap();
    assert!(all[..3000].iter().all(|b| *b == 0));
    assert_eq!(&all[3000..13_000], &data[..]);
    assert!(all[13_000..].iter().all(|b| *b == 0));
    // Out of range.
    for (off, len) in [(64 * 1024 - 1, 2), (64 * 1024, 1), (u64::MAX, 2)] {
        assert!(matches!(
            img.read(off, len).await.unwrap_err(),
            RbdError::InvalidArgument(_)
        ));
        assert!(matches!(
            img.write(off, Bytes::from(vec![1u8; len as usize]))
                .await
                .unwrap_err(),
            RbdError::InvalidArgument(_)
        ));
    }
    assert_eq!(img.read(64 * 1024, 0).await.unwrap().len(), 0);
    img.flush().await.unwrap();

    // Block status: objects 0..=3 data (object 3 only up to its end), rest holes.
    let st = img.block_status(0, 64 * 1024).await.unwrap();
    assert_eq!(
        st,
        vec![
            Extent {
                offset: 0,
                len: 13_000,
                state: ExtentState::Data
            },
            Extent {
                offset: 13_000,
                len: 64 * 1024 - 13_000,
                state: ExtentState::Hole
            },
        ]
    );

    // Discard: the whole object 1 goes away, object 2 partially zeroed.
    img.discard(4096, 4096 + 100).await.unwrap();
    let objs = cluster.object_names(&info.object_prefix);
    assert!(!objs.contains(&format!("{}.{:016x}", info.object_prefix, 1)));
    assert!(objs.contains(&format!("{}.{:016x}", info.object_prefix, 2)));
    let all = img.read(0, 64 * 1024).await.unwrap();
    assert!(all[4096..8192 + 100].iter().all(|b| *b == 0));
    assert_eq!(&all[8192 + 100..13_000], &data[8192 + 100 - 3000..]);
    assert_eq!(&all[3000..4096], &data[..4096 - 3000]);
    // write_zeroes over a hole creates nothing.
    img.write_zeroes(32 * 1024, 8192).await.unwrap();
    assert_eq!(cluster.object_names(&info.object_prefix).len(), 3);
    img.close().await.unwrap();
}

#[tokio::test]
async fn resize_grow_and_shrink() {
    let (cluster, rbd) = setup();
    let info = rbd.create("r", 4 * 4096, 12).await.unwrap();
    let img = rbd.open("r").await.unwrap();
    img.write(0, Bytes::from(pattern(1, 4 * 4096)))
        .await
        .unwrap();
    img.close().await.unwrap();

    rbd.resize("r", 10 * 4096, &no_progress).await.unwrap();
    assert_eq!(rbd.info("r").await.unwrap().size, 10 * 4096);
    let img = rbd.open("r").await.unwrap();
    img.write(9 * 4096, Bytes::from(vec![9u8; 4096]))
        .await
        .unwrap();
    img.close().await.unwrap();
    assert_eq!(cluster.object_names(&info.object_prefix).len(), 5);

    // Shrink into the middle of object 1: objects 2.. gone, object 1's tail zeroed.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    let progress = move |d: u64, t: u64| c2.lock().unwrap().push((d, t));
    rbd.resize("r", 4096 + 100, &progress).await.unwrap();
    let p = calls.lock().unwrap().clone();
    assert_eq!(p.last(), Some(&(9, 9)), "{p:?}");
    assert_eq!(cluster.object_names(&info.object_prefix).len(), 2);
    let img = rbd.open("r").await.unwrap();
    assert_eq!(img.size(), 4096 + 100);
    assert_eq!(
        &img.read(0, 4096 + 100).await.unwrap()[..],
        &pattern(1, 4 * 4096)[..4196]
    );
    assert!(img
        .write(4096 + 100, Bytes::from_static(b"x"))
        .await
        .is_err());
    // Grow again: the old tail must read as zeros, not stale data.
    img.resize(3 * 4096, &no_progress).await.unwrap();
    let r = img.read(4096, 2 * 4096).await.unwrap();
    assert_eq!(&r[..100], &pattern(1, 4 * 4096)[4096..4196]);
    assert!(r[100..].iter().all(|b| *b == 0));
    img.close().await.unwrap();
}

#[tokio::test]
async fn resize_is_seen_by_other_open_images() {
    let cluster = MemCluster::new();
    let rbd1 = Rbd::with_options(cluster.client(), fast());
    let rbd2 = Rbd::with_options(cluster.client(), fast());
    rbd1.create("img", 8192, 12).await.unwrap();
    let img1 = rbd1.open("img").await.unwrap();
    img1.write(0, Bytes::from_static(b"hello")).await.unwrap();
    // rbd2 resizes: it must get the lock from img1, and img1 learns the size.
    rbd2.resize("img", 16384, &no_progress).await.unwrap();
    // The notify reaches img1 asynchronously: wait for it (bounded).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while img1.size() != 16384 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(img1.size(), 16384);
    img1.write(12288, Bytes::from_static(b"tail"))
        .await
        .unwrap();
    assert_eq!(&img1.read(0, 5).await.unwrap()[..], b"hello");
    img1.close().await.unwrap();
}

#[tokio::test]
async fn rename_and_remove() {
    let (cluster, rbd) = setup();
    let info = rbd.create("old", 3 * 4096, 12).await.unwrap();
    rbd.create("taken", 4096, 12).await.unwrap();
    let img = rbd.open("old").await.unwrap();
    img.write(0, Bytes::from(pattern(3, 3 * 4096)))
        .await
        .unwrap();

    assert_eq!(
        rbd.rename("old", "taken").await.unwrap_err(),
        RbdError::Exists("taken".into())
    );
    rbd.rename("old", "new").await.unwrap();
    assert_eq!(rbd.list().await.unwrap(), vec!["new", "taken"]);
    assert!(matches!(
        rbd.info("old").await.unwrap_err(),
        RbdError::NotFound(_)
    ));
    assert_eq!(rbd.info("new").await.unwrap().id, info.id);
    // The open image keeps working across the rename.
    img.write(0, Bytes::from_static(b"still")).await.unwrap();

    // Open somewhere: refused.
    assert!(matches!(
        rbd.remove("new", &no_progress).await.unwrap_err(),
        RbdError::Busy(..)
    ));
    img.close().await.unwrap();
    let done = Arc::new(Mutex::new((0, 0)));
    let d2 = done.clone();
    rbd.remove("new", &move |d, t| *d2.lock().unwrap() = (d, t))
        .await
        .unwrap();
    assert_eq!(*done.lock().unwrap(), (3, 3));
    assert_eq!(rbd.list().await.unwrap(), vec!["taken"]);
    assert!(cluster.object_names(&info.object_prefix).is_empty());
    assert!(cluster
        .object_names(&format!("rbd_header.{}", info.id))
        .is_empty());
    assert!(cluster.object_names("rbd_id.new").is_empty());
    assert!(matches!(
        rbd.remove("new", &no_progress).await.unwrap_err(),
        RbdError::NotFound(_)
    ));
    // The name is free again.
    rbd.create("new", 4096, 12).await.unwrap();
}

#[tokio::test]
async fn import_export_round_trip_is_sparse() {
    let (cluster, rbd) = setup();
    let os = 4 * MIB as usize;
    let size = 5 * os + 12_345;
    let mut input = vec![0u8; size];
    // Object 0: 100 KiB of data then zeros; objects 1, 2 zero; object 3: data
    // with a zero 4 KiB-aligned gap; object 4 zero; the tail object has data.
    input[..100 * 1024].copy_from_slice(&pattern(1, 100 * 1024));
    input[3 * os..3 * os + 8192].copy_from_slice(&pattern(2, 8192));
    input[3 * os + 3 * 8192..3 * os + 4 * 8192].copy_from_slice(&pattern(3, 8192));
    input[size - 10..].copy_from_slice(&pattern(4, 10));

    let last = Arc::new(Mutex::new((0, 0)));
    let l2 = last.clone();
    let st = rbd
        .import(
            Cursor::new(input.clone()),
            size as u64,
            "imp",
            22,
            &move |d, t| *l2.lock().unwrap() = (d, t),
        )
        .await
        .unwrap();
    assert_eq!(*last.lock().unwrap(), (size as u64, size as u64));
    assert_eq!(st.bytes, size as u64);
    assert!(st.data_bytes < 200 * 1024, "{st:?}");
    let info = rbd.info("imp").await.unwrap();
    let objs = cluster.object_names(&info.object_prefix);
    let want: Vec<String> = [0u64, 3, 5]
        .iter()
        .map(|n| format!("{}.{n:016x}", info.object_prefix))
        .collect();
    assert_eq!(objs, want, "zero objects must not be written");
    // Inside object 0 only the data blocks were written.
    assert_eq!(cluster.object_data(&want[0]).unwrap().len(), 100 * 1024);

    let mut out = Cursor::new(Vec::new());
    let st = rbd.export("imp", &mut out, &no_progress).await.unwrap();
    assert_eq!(st.bytes, size as u64);
    let out = out.into_inner();
    assert_eq!(out.len(), input.len());
    assert!(out == input, "export differs from the imported input");

    // A trailing hole still gives the full length.
    rbd.create("holey", 3 * 4096, 12).await.unwrap();
    let img = rbd.open("holey").await.unwrap();
    img.write(0, Bytes::from_static(b"head")).await.unwrap();
    img.close().await.unwrap();
    let mut out = Cursor::new(Vec::new());
    rbd.export("holey", &mut out, &no_progress).await.unwrap();
    let out = out.into_inner();
    assert_eq!(out.len(), 3 * 4096);
    assert_eq!(&out[..4], b"head");
    assert!(out[4..].iter().all(|b| *b == 0));

    // A short input fails and leaves no image behind.
    let err = rbd
        .import(Cursor::new(vec![1u8; 100]), 8192, "short", 12, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RbdError::LocalIo(_)), "{err}");
    assert!(!rbd.list().await.unwrap().contains(&"short".to_string()));
}

#[tokio::test]
async fn export_to_a_real_file_is_sparse_and_equal() {
    let (_c, rbd) = setup();
    let size = 3 * 4 * MIB;
    let mut input = vec![0u8; size as usize];
    input[5 * MIB as usize..5 * MIB as usize + 4096].copy_from_slice(&pattern(9, 4096));
    rbd.import(Cursor::new(input.clone()), size, "f", 22, &no_progress)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("basalt-rbd-export-{}", std::process::id()));
    let file = tokio::fs::File::create(&dir).await.unwrap();
    let st = rbd.export("f", file, &no_progress).await.unwrap();
    assert_eq!(st.data_bytes, 4096);
    let got = std::fs::read(&dir).unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(got == input);
}

#[tokio::test]
async fn client_ids_are_distinct() {
    let c = MemCluster::new();
    let a = c.client().client_id();
    let b = c.client().client_id();
    assert_ne!(a, b);
    assert!(a.starts_with("client."));
}

#[tokio::test]
async fn sizes_of_zero_and_beyond_8_eib_are_refused() {
    let (cluster, rbd) = setup();
    let max = basalt_rbd::layout::max_size(DEFAULT_ORDER);
    for size in [0, max + 1, 1 << 63, u64::MAX] {
        match rbd.create("bad", size, DEFAULT_ORDER).await {
            Err(RbdError::InvalidArgument(m)) => assert!(
                m.contains("greater than 0") || m.contains("beyond what an image can address"),
                "size {size}: {m}"
            ),
            other => panic!("size {size}: {other:?}"),
        }
    }
    // Nothing was left behind by the refusals.
    assert!(rbd.list().await.unwrap().is_empty());
    assert!(cluster.object_names("rbd_").is_empty());
    rbd.create("big", max, DEFAULT_ORDER).await.unwrap();
    let img = rbd.open("big").await.unwrap();
    let r = img.resize(max + 1, &no_progress).await;
    assert!(matches!(r, Err(RbdError::InvalidArgument(_))), "{r:?}");
    assert_eq!(img.size(), max);
    img.close().await.unwrap();
}

/// A thin image as large as the layout allows (2^41 objects of 4 MiB) costs what it holds
/// to shrink and to remove: a removal per existing object, not per possible one.
#[tokio::test]
async fn shrink_and_remove_cost_what_exists() {
    let (cluster, rbd) = setup();
    let max = basalt_rbd::layout::max_size(DEFAULT_ORDER);
    let info = rbd.create("thin", max, DEFAULT_ORDER).await.unwrap();
    let img = rbd.open("thin").await.unwrap();
    let far = max - 4 * MIB;
    for off in [0, 8 * MIB, 1 << 40, far] {
        img.write(off, Bytes::from_static(b"data")).await.unwrap();
    }
    let prefix = format!("{}.", info.object_prefix);
    assert_eq!(cluster.object_names(&prefix).len(), 4);

    // Shrink to 1 TiB + 4 MiB: the objects at 1 TiB and beyond the end go, the rest stay.
    let before = cluster.remove_ops();
    let done = std::sync::atomic::AtomicU64::new(0);
    let progress = |d: u64, _total: u64| {
        done.store(d, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        img.resize((1 << 40) + 4 * MIB, &progress),
    )
    .await
    .expect("shrinking a thin 8 EiB image is quick")
    .unwrap();
    assert_eq!(
        cluster.remove_ops() - before,
        1,
        "only the one object past the end"
    );
    assert_eq!(cluster.object_names(&prefix).len(), 3);
    assert_eq!(&img.read(1 << 40, 4).await.unwrap()[..], b"data");
    assert_eq!(&img.read(8 * MIB, 4).await.unwrap()[..], b"data");
    img.close().await.unwrap();

    // Grow back to the maximum, and remove: one remove per existing data object.
    rbd.resize("thin", max, &no_progress).await.unwrap();
    let before = cluster.remove_ops();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        rbd.remove("thin", &no_progress),
    )
    .await
    .expect("removing a thin 8 EiB image is quick")
    .unwrap();
    // 3 data objects, then the header and the id object.
    assert_eq!(cluster.remove_ops() - before, 5);
    assert!(cluster.object_names("rbd_data.").is_empty());
    assert!(rbd.list().await.unwrap().is_empty());
}

/// An image whose header is unreadable is still removed with its data objects.
#[tokio::test]
async fn remove_without_a_header_finds_the_data_by_prefix() {
    let (cluster, rbd) = setup();
    let info = rbd.create("half", 64 * MIB, DEFAULT_ORDER).await.unwrap();
    let img = rbd.open("half").await.unwrap();
    img.write(20 * MIB, Bytes::from_static(b"x")).await.unwrap();
    img.close().await.unwrap();
    let admin = cluster.client();
    admin
        .remove(&format!("rbd_header.{}", info.id))
        .await
        .unwrap();
    admin
        .create(&format!("rbd_header.{}", info.id), true)
        .await
        .unwrap();
    rbd.remove("half", &no_progress).await.unwrap();
    assert!(cluster.object_names("rbd_data.").is_empty());
    assert!(rbd.list().await.unwrap().is_empty());
}
