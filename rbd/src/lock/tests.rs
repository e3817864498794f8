//! The lock core without IO: scripted scenarios, then a seeded random-schedule
//! simulation of several clients against a model OSD.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn cfg() -> LockConfig {
    LockConfig {
        retry_delay: 100 * MS,
        release_yield: 20 * MS,
        acquire_timeout: Duration::from_secs(10),
    }
}

fn owner(client: &str, watch: u64) -> LockOwner {
    LockOwner {
        client: client.into(),
        cookie: lock_cookie(watch),
    }
}

fn w(client: &str, cookie: u64) -> Watcher {
    Watcher {
        client: client.into(),
        cookie,
    }
}

/// A core that holds the lock with write 1 admitted.
fn locked() -> LockCore {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(MS, Event::LockAcquired);
    c.handle(MS, Event::Refreshed);
    assert!(c.is_locked());
    c
}

#[test]
fn first_write_takes_the_lock_lazily() {
    let mut c = LockCore::new(cfg(), "me", 7);
    assert!(c.next_deadline().is_none());
    let a = c.handle(MS, Event::WriteWanted(1));
    assert_eq!(
        a,
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    // A second write while acquiring just waits.
    assert_eq!(c.handle(MS, Event::WriteWanted(2)), vec![]);
    assert_eq!(c.handle(MS, Event::LockAcquired), vec![Action::Refresh]);
    assert_eq!(
        c.handle(MS, Event::Refreshed),
        vec![Action::AdmitWrite(1), Action::AdmitWrite(2)]
    );
    assert_eq!(
        c.handle(MS, Event::WriteWanted(3)),
        vec![Action::AdmitWrite(3)]
    );
    assert_eq!(c.in_flight(), 3);
}

#[test]
fn busy_lock_is_requested_and_retried_when_the_holder_answers() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let h = owner("other", 3);
    let a = c.handle(
        MS,
        Event::LockBusy {
            holder: Some(h.clone()),
        },
    );
    assert_eq!(a, vec![Action::NotifyRequestLock { holder: h.clone() }]);
    let a = c.handle(
        2 * MS,
        Event::NotifyDone {
            acked: vec![w("me", 7), w("other", 3)],
            timed_out: vec![],
        },
    );
    assert_eq!(
        a,
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    assert_eq!(
        c.handle(3 * MS, Event::LockAcquired),
        vec![Action::RecordHandover, Action::Refresh]
    );
    assert_eq!(
        c.handle(3 * MS, Event::Refreshed),
        vec![Action::AdmitWrite(1)]
    );
}

#[test]
fn holder_that_answers_but_keeps_the_lock_is_not_hammered() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let h = owner("other", 3);
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(h.clone()),
        },
    );
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![w("other", 3)],
            timed_out: vec![],
        },
    );
    // Busy again by the same holder right after its answer: back off.
    assert_eq!(
        c.handle(
            MS,
            Event::LockBusy {
                holder: Some(h.clone())
            }
        ),
        vec![]
    );
    assert_eq!(c.next_deadline(), Some(101 * MS));
    assert_eq!(c.handle(50 * MS, Event::Tick), vec![]);
    assert_eq!(
        c.handle(101 * MS, Event::Tick),
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    // This time it asks again.
    assert_eq!(
        c.handle(
            102 * MS,
            Event::LockBusy {
                holder: Some(h.clone())
            }
        ),
        vec![Action::NotifyRequestLock { holder: h }]
    );
}

#[test]
fn silent_holder_with_live_watch_is_waited_for() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let h = owner("other", 3);
    c.handle(MS, Event::LockBusy { holder: Some(h) });
    let a = c.handle(
        500 * MS,
        Event::NotifyDone {
            acked: vec![w("me", 7)],
            timed_out: vec![w("other", 3)],
        },
    );
    assert_eq!(a, vec![Action::ListWatchers]);
    // Its watch is still there: alive, just slow. Never blocklist it.
    let a = c.handle(501 * MS, Event::Watchers(vec![w("me", 7), w("other", 3)]));
    assert_eq!(a, vec![]);
    assert_eq!(c.handle(550 * MS, Event::Tick), vec![]);
    assert_eq!(
        c.handle(601 * MS, Event::Tick),
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
}

#[test]
fn an_earlier_process_under_our_name_is_fenced_like_anyone() {
    // Client ids are instances (name/nonce): a restarted gateway with a fixed name meets
    // the lock of its frozen or dead predecessor, another instance, and fences it.
    let mut c = LockCore::new(cfg(), "client.gw.a/2", 7);
    c.handle(MS, Event::WriteWanted(1));
    let h = owner("client.gw.a/1", 3);
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(h.clone()),
        },
    );
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    c.handle(MS, Event::Watchers(vec![w("client.gw.a/2", 7)]));
    assert_eq!(
        c.handle(MS, Event::LockInfo(Some(h))),
        vec![Action::Blocklist {
            client: "client.gw.a/1".into()
        }]
    );
}

#[test]
fn dead_holder_is_blocklisted_before_its_lock_is_broken() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let h = owner("other", 3);
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(h.clone()),
        },
    );
    c.handle(
        500 * MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![w("other", 3)],
        },
    );
    // Same client, different watch: the holder's watch is gone.
    let a = c.handle(501 * MS, Event::Watchers(vec![w("me", 7), w("other", 4)]));
    assert_eq!(a, vec![Action::GetLocker]);
    let a = c.handle(502 * MS, Event::LockInfo(Some(h.clone())));
    assert_eq!(
        a,
        vec![Action::Blocklist {
            client: "other".into()
        }]
    );
    let a = c.handle(503 * MS, Event::BlocklistDone);
    assert_eq!(a, vec![Action::BreakLock { owner: h }]);
    let a = c.handle(504 * MS, Event::BreakDone);
    assert_eq!(
        a,
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    assert_eq!(
        c.handle(505 * MS, Event::LockAcquired),
        vec![Action::RecordHandover, Action::Refresh]
    );
}

#[test]
fn holder_that_released_meanwhile_is_not_blocklisted() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(owner("other", 3)),
        },
    );
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    c.handle(MS, Event::Watchers(vec![]));
    let a = c.handle(MS, Event::LockInfo(None));
    assert_eq!(
        a,
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    // A new holder took it meanwhile: start over with that one.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(owner("other", 3)),
        },
    );
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    c.handle(MS, Event::Watchers(vec![]));
    let a = c.handle(MS, Event::LockInfo(Some(owner("third", 9))));
    assert!(matches!(a[..], [Action::TryLock { .. }]));
}

#[test]
fn external_locker_and_own_stale_lock() {
    // A cookie that names no watch cannot be judged dead: never blocklist it.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let ext = LockOwner {
        client: "admin".into(),
        cookie: "manual".into(),
    };
    c.handle(MS, Event::LockBusy { holder: Some(ext) });
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    assert_eq!(c.handle(MS, Event::Watchers(vec![])), vec![]);
    // This very instance's stale lock (a watch it replaced): break without blocklisting
    // ourselves.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    let stale = owner("me", 2);
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(stale.clone()),
        },
    );
    c.handle(
        MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    c.handle(MS, Event::Watchers(vec![w("me", 7)]));
    assert_eq!(
        c.handle(MS, Event::LockInfo(Some(stale.clone()))),
        vec![Action::BreakLock { owner: stale }]
    );
    // Someone else broke it first: fine.
    assert!(matches!(
        c.handle(MS, Event::OpFailed(BackendError::NotFound("lock".into())))[..],
        [Action::TryLock { .. }]
    ));
}

#[test]
fn holder_drains_flushes_unlocks_then_acks() {
    let mut c = locked();
    assert_eq!(
        c.handle(MS, Event::WriteWanted(2)),
        vec![Action::AdmitWrite(2)]
    );
    // Asked to release with two writes in flight: nothing yet.
    assert_eq!(
        c.handle(2 * MS, Event::RequestLockNotified { notify_id: 40 }),
        vec![]
    );
    assert!(!c.is_locked());
    // New writes are no longer admitted.
    assert_eq!(c.handle(2 * MS, Event::WriteWanted(3)), vec![]);
    // A second requester queues its ack too.
    assert_eq!(
        c.handle(2 * MS, Event::RequestLockNotified { notify_id: 41 }),
        vec![]
    );
    assert_eq!(c.handle(3 * MS, Event::WriteFinished(1)), vec![]);
    assert_eq!(
        c.handle(4 * MS, Event::WriteFinished(2)),
        vec![Action::Flush]
    );
    assert_eq!(
        c.handle(5 * MS, Event::Flushed),
        vec![Action::Unlock {
            cookie: "auto 7".into()
        }]
    );
    assert_eq!(
        c.handle(6 * MS, Event::Unlocked),
        vec![
            Action::AckNotify { notify_id: 40 },
            Action::AckNotify { notify_id: 41 }
        ]
    );
    // Write 3 waits: give the requester a head start, then ask back.
    assert_eq!(c.next_deadline(), Some(26 * MS));
    assert_eq!(c.handle(10 * MS, Event::Tick), vec![]);
    assert!(matches!(
        c.handle(26 * MS, Event::Tick)[..],
        [Action::TryLock { .. }]
    ));
}

#[test]
fn request_when_not_holding_is_acked_at_once() {
    let mut c = LockCore::new(cfg(), "me", 7);
    assert_eq!(
        c.handle(MS, Event::RequestLockNotified { notify_id: 5 }),
        vec![Action::AckNotify { notify_id: 5 }]
    );
    // While refreshing after acquisition we hold it: admit what waits, then hand over.
    c.handle(MS, Event::WriteWanted(1));
    c.handle(MS, Event::LockAcquired);
    assert_eq!(
        c.handle(MS, Event::RequestLockNotified { notify_id: 6 }),
        vec![]
    );
    assert_eq!(c.handle(MS, Event::Refreshed), vec![Action::AdmitWrite(1)]);
    assert_eq!(c.handle(MS, Event::WriteFinished(1)), vec![Action::Flush]);
    c.handle(MS, Event::Flushed);
    assert_eq!(
        c.handle(MS, Event::Unlocked),
        vec![Action::AckNotify { notify_id: 6 }]
    );
}

#[test]
fn blocklisted_is_terminal() {
    let mut c = locked();
    c.handle(MS, Event::RequestLockNotified { notify_id: 1 });
    c.handle(MS, Event::WriteWanted(2));
    let a = c.handle(MS, Event::Blocklisted("me".into()));
    assert_eq!(
        a,
        vec![Action::FailWrite(2, Refusal::Blocklisted("me".into()))]
    );
    assert!(c.is_failed());
    assert_eq!(
        c.handle(MS, Event::WriteWanted(3)),
        vec![Action::FailWrite(3, Refusal::Blocklisted("me".into()))]
    );
    // No rewatch, no retry, whatever happens next.
    assert_eq!(c.handle(MS, Event::WatchLost), vec![]);
    assert_eq!(c.handle(10_000 * MS, Event::Tick), vec![]);
    // An acquisition step refused the same way also ends it.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    assert_eq!(
        c.handle(MS, Event::OpFailed(BackendError::Blocklisted("me".into()))),
        vec![Action::FailWrite(1, Refusal::Blocklisted("me".into()))]
    );
}

#[test]
fn transient_errors_back_off_and_writes_time_out() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    assert_eq!(
        c.handle(MS, Event::OpFailed(BackendError::Timeout("osd".into()))),
        vec![]
    );
    assert!(matches!(
        c.handle(101 * MS, Event::Tick)[..],
        [Action::TryLock { .. }]
    ));
    c.handle(
        102 * MS,
        Event::LockBusy {
            holder: Some(owner("o", 1)),
        },
    );
    c.handle(
        600 * MS,
        Event::NotifyDone {
            acked: vec![],
            timed_out: vec![],
        },
    );
    c.handle(601 * MS, Event::Watchers(vec![w("o", 1)]));
    assert_eq!(c.next_deadline(), Some(701 * MS));
    // Past acquire_timeout the write gives up (the core keeps trying for later writes).
    let a = c.handle(Duration::from_secs(11), Event::Tick);
    assert!(a.contains(&Action::FailWrite(1, Refusal::TimedOut)));
    assert_eq!(c.waiting(), 0);
}

#[test]
fn losing_the_watch_releases_and_relocks_with_the_new_cookie() {
    let mut c = locked();
    let a = c.handle(MS, Event::WatchLost);
    assert_eq!(a, vec![Action::Rewatch]);
    c.handle(MS, Event::WriteWanted(2));
    assert_eq!(c.handle(MS, Event::WriteFinished(1)), vec![Action::Flush]);
    c.handle(MS, Event::Flushed);
    // Unlocked, but no watch yet: wait.
    assert_eq!(c.handle(MS, Event::Unlocked), vec![]);
    assert_eq!(
        c.handle(MS, Event::WatchRestored { cookie: 8 }),
        vec![Action::TryLock {
            cookie: "auto 8".into()
        }]
    );
    // Watch lost again while the lock request is in flight: don't keep a stale lock.
    c.handle(MS, Event::WatchLost);
    assert_eq!(c.handle(MS, Event::LockAcquired), vec![Action::Flush]);
    assert_eq!(
        c.handle(MS, Event::Flushed),
        vec![Action::Unlock {
            cookie: "auto 8".into()
        }]
    );
    c.handle(MS, Event::Unlocked);
    // Rewatch failing transiently is retried.
    c.handle(MS, Event::RewatchFailed(BackendError::Timeout("x".into())));
    assert_eq!(c.handle(101 * MS, Event::Tick), vec![Action::Rewatch]);
}

#[test]
fn close_releases_and_refuses() {
    let mut c = locked();
    assert_eq!(c.handle(MS, Event::Close), vec![]);
    assert_eq!(
        c.handle(MS, Event::WriteWanted(2)),
        vec![Action::FailWrite(2, Refusal::Closed)]
    );
    assert_eq!(c.handle(MS, Event::WriteFinished(1)), vec![Action::Flush]);
    c.handle(MS, Event::Flushed);
    assert_eq!(c.handle(MS, Event::Unlocked), vec![Action::Closed]);
    assert!(c.is_closed());
    // Close while asking a holder: give up at once.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(
        MS,
        Event::LockBusy {
            holder: Some(owner("o", 1)),
        },
    );
    assert_eq!(
        c.handle(MS, Event::Close),
        vec![Action::FailWrite(1, Refusal::Closed), Action::Closed]
    );
    // Close idle.
    let mut c = LockCore::new(cfg(), "me", 7);
    assert_eq!(c.handle(MS, Event::Close), vec![Action::Closed]);
}

#[test]
fn lock_released_between_attempt_and_look_is_retried_at_once() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    // Busy, but by the time we read the owner there is none (a holder relinquishing).
    assert_eq!(
        c.handle(2 * MS, Event::LockBusy { holder: None }),
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    // The same again right away: back off instead of spinning.
    assert_eq!(c.handle(3 * MS, Event::LockBusy { holder: None }), vec![]);
    assert_eq!(c.next_deadline(), Some(103 * MS));
    assert!(matches!(
        c.handle(103 * MS, Event::Tick)[..],
        [Action::TryLock { .. }]
    ));
    // After the back-off, a vanished holder is retried at once again.
    assert!(matches!(
        c.handle(104 * MS, Event::LockBusy { holder: None })[..],
        [Action::TryLock { .. }]
    ));
    assert_eq!(
        c.handle(105 * MS, Event::LockAcquired),
        vec![Action::Refresh]
    );
}

#[test]
fn relinquish_releases_without_yielding_and_relocks_on_the_next_write() {
    let mut c = locked();
    // The last user went away with write 1 still in flight: drain, flush, unlock.
    assert_eq!(c.handle(MS, Event::Relinquish), vec![]);
    assert!(!c.is_locked());
    assert_eq!(
        c.handle(2 * MS, Event::WriteFinished(1)),
        vec![Action::Flush]
    );
    assert_eq!(
        c.handle(3 * MS, Event::Flushed),
        vec![Action::Unlock {
            cookie: "auto 7".into()
        }]
    );
    // Nobody asked for it, so no ack and no head start to give: idle at once.
    assert_eq!(c.handle(4 * MS, Event::Unlocked), vec![]);
    assert_eq!(c.next_deadline(), None);
    // A new user's write takes it back the usual way.
    assert_eq!(
        c.handle(5 * MS, Event::WriteWanted(2)),
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
    // Relinquish when not holding: nothing to do.
    let mut c = LockCore::new(cfg(), "me", 7);
    assert_eq!(c.handle(MS, Event::Relinquish), vec![]);
    assert_eq!(
        c.handle(MS, Event::WriteWanted(1)),
        vec![Action::TryLock {
            cookie: "auto 7".into()
        }]
    );
}

#[test]
fn relinquish_while_locking_releases_once_locked_unless_a_write_came() {
    // The user left while its write waited for the lock (the write withdrawn).
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    assert_eq!(c.handle(MS, Event::Relinquish), vec![]);
    assert_eq!(c.handle(MS, Event::WriteFinished(1)), vec![]);
    assert_eq!(c.handle(MS, Event::LockAcquired), vec![Action::Refresh]);
    assert_eq!(c.handle(MS, Event::Refreshed), vec![Action::Flush]);
    assert_eq!(
        c.handle(MS, Event::Flushed),
        vec![Action::Unlock {
            cookie: "auto 7".into()
        }]
    );
    assert_eq!(c.handle(MS, Event::Unlocked), vec![]);
    assert!(!c.is_locked());
    // A new user wrote meanwhile: the lock is kept for it.
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(MS, Event::Relinquish);
    c.handle(MS, Event::WriteFinished(1));
    assert_eq!(c.handle(MS, Event::WriteWanted(2)), vec![]);
    c.handle(MS, Event::LockAcquired);
    assert_eq!(c.handle(MS, Event::Refreshed), vec![Action::AdmitWrite(2)]);
    assert!(c.is_locked());
}

#[test]
fn relinquish_during_a_requested_release_still_acks_the_requester() {
    let mut c = locked();
    c.handle(MS, Event::RequestLockNotified { notify_id: 9 });
    assert_eq!(c.handle(MS, Event::Relinquish), vec![]);
    assert_eq!(c.handle(MS, Event::WriteFinished(1)), vec![Action::Flush]);
    c.handle(MS, Event::Flushed);
    assert_eq!(
        c.handle(MS, Event::Unlocked),
        vec![Action::AckNotify { notify_id: 9 }]
    );
}

mod sim;

/// A lock request refused for lack of space (a full pool) fails the writes waiting for it at
/// once, as the write itself would have failed, and does not end the core: the next write
/// tries again and gets the lock once there is room.
#[test]
fn a_full_pool_fails_the_waiting_writes_and_a_later_write_tries_again() {
    let mut c = LockCore::new(cfg(), "me", 7);
    c.handle(MS, Event::WriteWanted(1));
    c.handle(MS, Event::WriteWanted(2));
    let a = c.handle(
        MS,
        Event::OpFailed(BackendError::NoSpace("pool full".into())),
    );
    assert_eq!(
        a,
        vec![
            Action::FailWrite(1, Refusal::NoSpace("pool full".into())),
            Action::FailWrite(2, Refusal::NoSpace("pool full".into())),
        ]
    );
    assert_eq!(c.waiting(), 0);
    assert!(!c.is_failed());
    c.handle(200 * MS, Event::WriteWanted(3));
    let a = c.handle(300 * MS, Event::Tick);
    assert!(matches!(a[..], [Action::TryLock { .. }]), "{a:?}");
    let a = c.handle(301 * MS, Event::LockAcquired);
    assert!(a.contains(&Action::Refresh), "{a:?}");
}
