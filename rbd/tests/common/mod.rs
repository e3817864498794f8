#![allow(dead_code)]

use std::time::Duration;

use basalt_rbd::{ImageOptions, LockConfig};

/// Short timers so hand-overs and timeouts happen in test time.
pub fn fast() -> ImageOptions {
    ImageOptions {
        lock: LockConfig {
            retry_delay: Duration::from_millis(50),
            release_yield: Duration::from_millis(20),
            acquire_timeout: Duration::from_secs(20),
        },
        notify_timeout: Duration::from_millis(200),
        blocklist_expire: Duration::from_secs(3600),
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}
