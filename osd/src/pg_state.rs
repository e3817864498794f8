//! A primary's PG state flags: derived from the PG's [`PgStatus`] and what else the primary
//! knows of it, in this one place (the CLI, health checks and tests test the flags; only
//! `basalt_ops::PgStateFlags`' `Display` turns them into Ceph's `active+clean` text).

use basalt_ops::{PgStateFlag, PgStateFlags};

use crate::service::PgStatus;

/// What a primary knows of a PG besides its [`PgStatus`], for its state flags.
pub struct PgConditions {
    /// Fewer acting members than the pool's size.
    pub undersized: bool,
    /// Some acting member still lacks objects (recovery while active).
    pub recovering: bool,
    /// Recovery while active waits for room on every member it must fill.
    pub recovery_toofull: bool,
    /// Some member is being backfilled while the PG serves.
    pub backfilling: bool,
    /// That backfill waits: its target is backfillfull.
    pub backfill_toofull: bool,
    /// Served by a temporary acting set (`pg_temp`) while the CRUSH primary catches up.
    pub remapped: bool,
    /// The last scrub found differences repair could not fix.
    pub inconsistent: bool,
    pub snaptrim: bool,
}

/// A primary's PG state flags (`basalt pg ls`, health): the one place they are derived;
/// `PgStateFlags`' `Display` is the one place they become text.
pub fn pg_state_flags(status: &PgStatus, c: &PgConditions) -> PgStateFlags {
    use PgStateFlag::*;
    let mut f = PgStateFlags::new();
    match status {
        PgStatus::Active => {
            f.insert(Active);
            if c.recovering {
                f.insert(if c.recovery_toofull {
                    RecoveryToofull
                } else {
                    Recovering
                })
                .insert(Degraded);
            }
            if c.backfilling {
                f.insert(if c.backfill_toofull {
                    BackfillToofull
                } else {
                    Backfilling
                })
                .insert(Degraded);
            }
            f.insert_if(c.remapped, Remapped);
            f.insert_if(!c.recovering && !c.undersized && !c.backfilling, Clean);
        }
        PgStatus::Peering => {
            f.insert(Peering);
        }
        PgStatus::Recovering => {
            f.insert(Recovering).insert(Degraded);
        }
        PgStatus::Backfilling => {
            f.insert(Backfilling).insert(Degraded);
        }
        PgStatus::BackfillToofull(_) => {
            f.insert(BackfillToofull).insert(Degraded);
        }
        PgStatus::Down(_) => {
            f.insert(Down);
        }
        PgStatus::Incomplete(_) => {
            f.insert(Incomplete);
        }
        PgStatus::Inactive(_) => {
            f.insert(Undersized).insert(Peered);
        }
        PgStatus::Stray => {
            f.insert(Stray);
        }
        // A primary whose status says replica has not applied the map that made it primary.
        PgStatus::Replica => {
            f.insert(Unknown);
        }
    }
    // Short of members: undersized, and degraded wherever the PG holds data for them.
    let holds_data = matches!(
        status,
        PgStatus::Active
            | PgStatus::Recovering
            | PgStatus::Backfilling
            | PgStatus::BackfillToofull(_)
    );
    if c.undersized && holds_data {
        f.insert(Undersized).insert(Degraded);
    }
    f.insert_if(c.snaptrim, Snaptrim)
        .insert_if(c.inconsistent, Inconsistent);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(status: PgStatus, c: PgConditions) -> String {
        pg_state_flags(&status, &c).to_string()
    }

    fn healthy() -> PgConditions {
        PgConditions {
            undersized: false,
            recovering: false,
            recovery_toofull: false,
            backfilling: false,
            backfill_toofull: false,
            remapped: false,
            inconsistent: false,
            snaptrim: false,
        }
    }

    #[test]
    fn the_flags_render_the_states_basalt_has_always_shown() {
        let c = healthy;
        assert_eq!(render(PgStatus::Active, c()), "active+clean");
        assert!(pg_state_flags(&PgStatus::Active, &c()).is_active_clean());
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    undersized: true,
                    ..c()
                }
            ),
            "active+undersized+degraded"
        );
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    recovering: true,
                    ..c()
                }
            ),
            "active+recovering+degraded"
        );
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    recovering: true,
                    undersized: true,
                    ..c()
                }
            ),
            "active+recovering+undersized+degraded"
        );
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    recovering: true,
                    recovery_toofull: true,
                    undersized: true,
                    inconsistent: true,
                    snaptrim: true,
                    ..c()
                }
            ),
            "active+recovery_toofull+undersized+degraded+snaptrim+inconsistent"
        );
        // Backfill while active, and a PG served by its pg_temp: never clean.
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    backfilling: true,
                    remapped: true,
                    ..c()
                }
            ),
            "active+backfilling+degraded+remapped"
        );
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    backfilling: true,
                    backfill_toofull: true,
                    undersized: true,
                    ..c()
                }
            ),
            "active+backfill_toofull+undersized+degraded"
        );
        assert!(!pg_state_flags(
            &PgStatus::Active,
            &PgConditions {
                remapped: true,
                ..c()
            }
        )
        .is_active_clean());
        assert_eq!(
            render(
                PgStatus::Active,
                PgConditions {
                    inconsistent: true,
                    ..c()
                }
            ),
            "active+clean+inconsistent"
        );
        assert_eq!(render(PgStatus::Peering, c()), "peering");
        assert_eq!(
            render(
                PgStatus::Backfilling,
                PgConditions {
                    undersized: true,
                    ..c()
                }
            ),
            "backfilling+undersized+degraded"
        );
        assert_eq!(
            render(PgStatus::BackfillToofull("osd.2 is 91% full".into()), c()),
            "backfill_toofull+degraded"
        );
        assert_eq!(render(PgStatus::Recovering, c()), "recovering+degraded");
        assert_eq!(render(PgStatus::Down("none answered".into()), c()), "down");
        assert_eq!(
            render(PgStatus::Incomplete("mid-backfill".into()), c()),
            "incomplete"
        );
        assert_eq!(
            render(
                PgStatus::Inactive("below min_size".into()),
                PgConditions {
                    undersized: true,
                    ..c()
                }
            ),
            "undersized+peered"
        );
    }

    #[test]
    fn callers_branch_on_flags_not_text() {
        let f = pg_state_flags(
            &PgStatus::Active,
            &PgConditions {
                undersized: true,
                inconsistent: true,
                ..healthy()
            },
        );
        assert!(f.is_active());
        assert!(f.contains(PgStateFlag::Degraded));
        assert!(f.contains(PgStateFlag::Inconsistent));
        assert!(!f.contains(PgStateFlag::Clean));
        assert!(!f.is_active_clean());
    }
}
