//! The exclusive-lock hand-over between clients, end to end on the
//! in-memory cluster: cooperative hand-over, a frozen holder fenced by the
//! blocklist, and the stale holder's writes failing after it thaws.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_rbd::{MemCluster, ObjectBackend, Rbd, RbdError};
use bytes::Bytes;
use common::{fast, pattern};

const OS: u64 = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_hand_over_and_fence_a_frozen_holder() {
    let watch_timeout = Duration::from_millis(600);
    let cluster = MemCluster::with_watch_timeout(watch_timeout);
    let (b1, b2, b3) = (cluster.client(), cluster.client(), cluster.client());
    let id2 = b2.client_id();
    let rbd1 = Rbd::with_options(b1, fast());
    let rbd2 = Rbd::with_options(b2, fast());
    let rbd3 = Rbd::with_options(b3, fast());
    rbd1.create("vm", 8 * OS, 12).await.unwrap();
    let img1 = rbd1.open("vm").await.unwrap();
    let img2 = Arc::new(rbd2.open("vm").await.unwrap());
    let img3 = rbd3.open("vm").await.unwrap();

    // 1 writes objects 0-1 (takes the free lock: no hand-over).
    let d1 = pattern(1, 2 * OS as usize);
    img1.write(0, Bytes::from(d1.clone())).await.unwrap();
    assert_eq!(img1.lock_handovers(), 0);

    // 2 writes objects 1-2: it asks 1, which drains, unlocks and answers.
    let d2 = pattern(2, 2 * OS as usize);
    img2.write(OS, Bytes::from(d2.clone())).await.unwrap();
    assert_eq!(img2.lock_handovers(), 1);
    // 1's data outside 2's range is intact; a read needs no lock.
    assert_eq!(&img1.read(0, OS).await.unwrap()[..], &d1[..OS as usize]);
    assert_eq!(&img3.read(OS, 2 * OS).await.unwrap()[..], &d2[..]);

    // 1 writes again (lock comes back), then 2 again: ping-pong works both ways.
    img1.write(6 * OS, Bytes::from(vec![0x61; OS as usize]))
        .await
        .unwrap();
    img2.write(7 * OS, Bytes::from(vec![0x62; OS as usize]))
        .await
        .unwrap();
    assert_eq!(img1.lock_handovers(), 1);
    assert_eq!(img2.lock_handovers(), 2);

    // 2 hangs while holding the lock. A write it issues while hung is stuck
    // "in the network".
    cluster.freeze(&id2);
    let stale = {
        let img2 = img2.clone();
        tokio::spawn(async move {
            img2.write(3 * OS, Bytes::from(vec![0xEE; OS as usize]))
                .await
        })
    };

    // 3 writes: 2 does not answer; once 2's watch times out, 3 blocklists
    // 2, breaks its lock and proceeds.
    let t0 = Instant::now();
    let d3 = pattern(3, 2 * OS as usize);
    img3.write(2 * OS, Bytes::from(d3.clone())).await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= watch_timeout - Duration::from_millis(50),
        "3 must wait for 2's watch to time out, took {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(cluster.is_blocklisted(&id2));
    assert_eq!(img3.lock_handovers(), 1);

    // 2 thaws: its stuck write and any later write fail, never succeed.
    cluster.unfreeze(&id2);
    let r = stale.await.unwrap();
    assert!(matches!(r, Err(RbdError::Blocklisted(_))), "{r:?}");
    let r = img2.write(5 * OS, Bytes::from(vec![0xEE; 10])).await;
    assert!(matches!(r, Err(RbdError::Blocklisted(_))), "{r:?}");
    let r = img2.discard(0, OS).await;
    assert!(matches!(r, Err(RbdError::Blocklisted(_))), "{r:?}");
    assert!(matches!(img2.flush().await, Err(RbdError::Blocklisted(_))));

    // Final contents: 3's writes over 1's and 2's acknowledged writes.
    let mut want = vec![0u8; 8 * OS as usize];
    let os = OS as usize;
    want[..2 * os].copy_from_slice(&d1);
    want[os..3 * os].copy_from_slice(&d2);
    want[6 * os..7 * os].fill(0x61);
    want[7 * os..8 * os].fill(0x62);
    want[2 * os..4 * os].copy_from_slice(&d3);
    let got = img1.read(0, 8 * OS).await.unwrap();
    assert!(got[..] == want[..], "final image differs");
    // 3 keeps writing; 1 can still take over cooperatively from 3.
    img1.write(0, Bytes::from_static(b"back")).await.unwrap();
    assert_eq!(&img3.read(0, 4).await.unwrap()[..], b"back");

    img1.close().await.unwrap();
    img3.close().await.unwrap();
    drop(img2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_clients_all_complete() {
    let cluster = MemCluster::new();
    let rbd1 = Rbd::with_options(cluster.client(), fast());
    let rbd2 = Rbd::with_options(cluster.client(), fast());
    rbd1.create("vm", 64 * OS, 12).await.unwrap();
    let img1 = Arc::new(rbd1.open("vm").await.unwrap());
    let img2 = Arc::new(rbd2.open("vm").await.unwrap());
    let mut tasks = Vec::new();
    for (k, img) in [img1.clone(), img2.clone()].into_iter().enumerate() {
        for j in 0..8u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..4u64 {
                    let blk = k as u64 * 32 + j * 4 + i;
                    img.write(blk * OS, Bytes::from(vec![blk as u8 + 1; OS as usize]))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = img1.read(0, 64 * OS).await.unwrap();
    for blk in 0..64usize {
        let b = &all[blk * OS as usize..(blk + 1) * OS as usize];
        assert!(b.iter().all(|x| *x == blk as u8 + 1), "block {blk}");
    }
    assert!(img1.lock_handovers() + img2.lock_handovers() >= 1);
}

#[tokio::test]
async fn closing_hands_the_lock_back_without_a_request() {
    let cluster = MemCluster::new();
    let rbd1 = Rbd::with_options(cluster.client(), fast());
    let rbd2 = Rbd::with_options(cluster.client(), fast());
    let info = rbd1.create("vm", 4 * OS, 12).await.unwrap();
    let img1 = rbd1.open("vm").await.unwrap();
    img1.write(0, Bytes::from_static(b"one")).await.unwrap();
    let header = format!("rbd_header.{}", info.id);
    assert_eq!(
        rbd1.backend()
            .lock_info(&header, "rbd_lock")
            .await
            .unwrap()
            .len(),
        1
    );
    img1.close().await.unwrap();
    assert!(rbd1
        .backend()
        .lock_info(&header, "rbd_lock")
        .await
        .unwrap()
        .is_empty());
    assert!(cluster.watchers(&header).is_empty());
    // The next writer takes a free lock: no hand-over.
    let img2 = rbd2.open("vm").await.unwrap();
    img2.write(OS, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(img2.lock_handovers(), 0);
    img2.close().await.unwrap();
}

#[tokio::test]
async fn a_live_but_slow_holder_is_never_blocklisted() {
    // The holder is frozen for less than the watch timeout: the requester
    // keeps asking (it is thawed once it has missed two requests) and gets the
    // lock once the holder answers.
    let cluster = MemCluster::with_watch_timeout(Duration::from_secs(5));
    let (b1, b2) = (cluster.client(), cluster.client());
    let id1 = b1.client_id();
    let rbd1 = Rbd::with_options(b1, fast());
    let rbd2 = Rbd::with_options(b2, fast());
    rbd1.create("vm", 4 * OS, 12).await.unwrap();
    let img1 = rbd1.open("vm").await.unwrap();
    let img2 = rbd2.open("vm").await.unwrap();
    img1.write(0, Bytes::from_static(b"one")).await.unwrap();
    cluster.freeze(&id1);
    let c = cluster.clone();
    let id = id1.clone();
    let thaw = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while c.missed_notifies(&id) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the requester never asked the frozen holder twice"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.unfreeze(&id);
    });
    img2.write(OS, Bytes::from_static(b"two")).await.unwrap();
    thaw.await.expect("thawed after two missed requests");
    assert!(!cluster.is_blocklisted(&id1));
    // 1 still works: it asks for the lock back.
    img1.write(2 * OS, Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(&img2.read(2 * OS, 5).await.unwrap()[..], b"three");
}

#[tokio::test]
async fn a_write_waiting_for_a_stuck_lock_times_out() {
    // An external (non-watch) locker can't be judged dead: writes give up.
    let cluster = MemCluster::new();
    let admin = cluster.client();
    let mut opts = fast();
    opts.lock.acquire_timeout = Duration::from_millis(400);
    let rbd = Rbd::with_options(cluster.client(), opts);
    let info = rbd.create("vm", 4 * OS, 12).await.unwrap();
    admin
        .lock_exclusive(
            &format!("rbd_header.{}", info.id),
            "rbd_lock",
            "manual",
            "admin",
        )
        .await
        .unwrap();
    let img = rbd.open("vm").await.unwrap();
    let r = img.write(0, Bytes::from_static(b"x")).await;
    assert_eq!(r, Err(RbdError::LockTimeout("vm".into())));
    assert!(!cluster.is_blocklisted(&admin.client_id()));
    // Reads still work.
    assert_eq!(&img.read(0, 1).await.unwrap()[..], &[0]);
}

#[tokio::test]
async fn relinquishing_hands_the_lock_back_and_stays_open() {
    let cluster = MemCluster::new();
    let rbd1 = Rbd::with_options(cluster.client(), fast());
    let rbd2 = Rbd::with_options(cluster.client(), fast());
    let info = rbd1.create("vm", 4 * OS, 12).await.unwrap();
    let header = format!("rbd_header.{}", info.id);
    let img1 = rbd1.open("vm").await.unwrap();
    let img2 = rbd2.open("vm").await.unwrap();
    // Not holding: returns at once.
    img1.relinquish_lock().await;
    img1.write(0, Bytes::from_static(b"one")).await.unwrap();
    // Holding: returns once the lock is free, the image still open and watching.
    img1.relinquish_lock().await;
    assert!(rbd1
        .backend()
        .lock_info(&header, "rbd_lock")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(cluster.watchers(&header).len(), 2);
    // The other client locks on its first try: no request, no hand-over.
    img2.write(OS, Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(img2.lock_handovers(), 0);
    // The relinquished image writes again by asking for the lock back the usual way.
    img1.write(2 * OS, Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(img1.lock_handovers(), 1);
    assert_eq!(&img2.read(0, 3).await.unwrap()[..], b"one");
    assert_eq!(&img2.read(OS, 3).await.unwrap()[..], b"two");
    assert_eq!(&img2.read(2 * OS, 5).await.unwrap()[..], b"three");
    img1.close().await.unwrap();
    img2.close().await.unwrap();
}
