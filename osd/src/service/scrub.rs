//! Scrubs: every acting member's scrub map (deep: with each chunk's checksum) compared chunk
//! by chunk, inconsistent copies repaired from a good one, the scrub stamps a PG's schedule
//! runs from, the schedule itself, the `pg scrub` / `deep-scrub` / `repair` command, and a
//! member's answer to its primary's scrub map request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use basalt_ops::{decode, encode, OpError};
use basalt_placement::PgId;
use basalt_proto::osd as pb;
use tokio::time::Instant;
use tonic::Response;

use super::{lock, now_ms, OsdCore, Pg, PgStatus};
use crate::peer_msg::PeerHeader;
use crate::pg::{self, ObjectName, Push};
use crate::store::Transaction;

/// Objects per scrub chunk (Ceph's `osd_scrub_chunk_max`): writes to a PG wait at most for
/// the mapping of this many objects on every member.
const SCRUB_CHUNK: usize = 25;

/// Wall-clock times (unix ms) of a PG's last scrub and deep scrub on this OSD.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ScrubStamps {
    shallow_ms: u64,
    deep_ms: u64,
}

fn scrub_stamps_key(pg: PgId) -> Vec<u8> {
    format!("scrub_stamps.{pg}").into_bytes()
}

impl OsdCore {
    /// Scrub, deep scrub or repair of a PG this OSD is primary of (see [`Self::scrub_pg`]).
    pub async fn handle_pg_command(
        self: &Arc<Self>,
        req: pb::PgCommandRequest,
    ) -> Result<basalt_ops::ScrubResult, OpError> {
        let command: basalt_ops::PgCommand = decode(&req.command, "PG command")?;
        let (_, pg) = self
            .primary_pg(req.epoch, req.pool, req.pg_seed, "", None, "")
            .await?;
        let generation = self
            .wait_active(&pg, Instant::now() + Duration::from_secs(30))
            .await?;
        let deep = command != basalt_ops::PgCommand::Scrub;
        self.scrub_pg(
            &pg,
            generation,
            deep,
            command == basalt_ops::PgCommand::Repair,
        )
        .await
    }

    /// Scrubs, one PG at a time (Ceph's `osd_max_scrubs` 1), every active PG this OSD is
    /// primary of whose last scrub or deep scrub is older than its interval; repairs what
    /// it finds when `scrub_auto_repair` is set. Runs until the process ends.
    pub async fn run_scrub_schedule(self: Arc<Self>) {
        let (shallow, deep) = (
            self.tuning.scrub_interval_secs * 1000,
            self.tuning.deep_scrub_interval_secs * 1000,
        );
        let Some(shortest) = [shallow, deep].into_iter().filter(|i| *i > 0).min() else {
            tracing::info!("scheduled scrubs are off (both intervals are 0)");
            return;
        };
        let tick = Duration::from_millis((shortest / 4).clamp(500, 60_000));
        loop {
            tokio::time::sleep(tick).await;
            let me = self.me();
            let pgs: Vec<Arc<Pg>> = lock(&self.pgs).values().cloned().collect();
            for pg in pgs {
                let (generation, due_deep, due_shallow) = {
                    let mut s = lock(&pg.state);
                    let recovering = s.healing();
                    if s.primary.is_none()
                        || s.primary != me
                        || s.status != PgStatus::Active
                        || recovering
                    {
                        continue;
                    }
                    let now = now_ms();
                    // Stamps persisted by an earlier run; a PG never scrubbed here counts
                    // from now, so a new cluster (or a new primary) does not scrub at once.
                    let st = *s.scrub_stamps.get_or_insert_with(|| {
                        self.store
                            .meta_get(&scrub_stamps_key(pg.id))
                            .ok()
                            .flatten()
                            .and_then(|b| decode(&b, "scrub stamps").ok())
                            .unwrap_or(ScrubStamps {
                                shallow_ms: now,
                                deep_ms: now,
                            })
                    });
                    let due =
                        |last: u64, every: u64| every > 0 && now.saturating_sub(last) >= every;
                    (
                        s.generation,
                        due(st.deep_ms, deep),
                        due(st.shallow_ms, shallow),
                    )
                };
                if !due_deep && !due_shallow {
                    continue;
                }
                match self
                    .scrub_pg(&pg, generation, due_deep, self.tuning.scrub_auto_repair)
                    .await
                {
                    Ok(r) => tracing::info!(
                        pg = %pg.id,
                        deep = due_deep,
                        objects = r.objects,
                        inconsistent = r.inconsistent.len(),
                        repaired = r.repaired,
                        "scheduled scrub done"
                    ),
                    Err(e) => {
                        tracing::info!(pg = %pg.id, error = %e, "scheduled scrub did not finish")
                    }
                }
            }
        }
    }

    /// Scrubs (deep: every chunk's checksum) one active PG this OSD is primary of, repairs
    /// what it found from a good copy when `repair`, and records the outcome (state, health,
    /// metrics, the scrub stamps the schedule runs from).
    async fn scrub_pg(
        &self,
        pg: &Arc<Pg>,
        generation: u64,
        deep: bool,
        repair: bool,
    ) -> Result<basalt_ops::ScrubResult, OpError> {
        if lock(&pg.state).healing() {
            return Err(OpError::Busy(format!(
                "PG {} is recovering or backfilling; scrub it once it is clean",
                pg.id
            )));
        }
        let mut repaired = 0;
        let (objects, mut found) = self.scrub(pg, generation, deep).await?;
        metrics::counter!("basalt_osd_scrub_errors_total").increment(found.len() as u64);
        if repair && !found.is_empty() {
            for inc in &found {
                if self.repair_copies(pg, inc).await? {
                    repaired += 1;
                }
            }
            found = self.scrub(pg, generation, deep).await?.1;
        }
        let lines: Vec<String> = found
            .iter()
            .map(|i| format!("{}: {}", i.name, i.why))
            .collect();
        let now = now_ms();
        let stamps = {
            let mut s = lock(&pg.state);
            if s.generation == generation {
                s.inconsistent = lines.clone();
            }
            let st = s.scrub_stamps.get_or_insert(ScrubStamps {
                shallow_ms: now,
                deep_ms: now,
            });
            st.shallow_ms = now;
            if deep {
                st.deep_ms = now;
            }
            *st
        };
        let mut txn = Transaction::new();
        txn.meta_set(scrub_stamps_key(pg.id), encode(&stamps));
        if let Err(e) = self.store.submit(txn).await {
            tracing::warn!(pg = %pg.id, error = %e, "cannot persist the scrub stamps");
        }
        metrics::counter!("basalt_osd_scrubs_total", "kind" => if deep { "deep" } else { "shallow" })
            .increment(1);
        metrics::counter!("basalt_osd_scrub_repairs_total").increment(repaired);
        if !found.is_empty() {
            tracing::warn!(pg = %pg.id, inconsistent = found.len(), "scrub found inconsistent objects");
        }
        Ok(basalt_ops::ScrubResult {
            pgid: pg.id.to_string(),
            deep,
            objects,
            inconsistent: lines,
            repaired,
        })
    }

    /// Builds every acting member's scrub map and compares them, SCRUB_CHUNK objects at a
    /// time: writes to the PG wait only while one chunk is mapped (Ceph's chunky scrub).
    /// Returns the objects seen and the inconsistencies found.
    async fn scrub(
        &self,
        pg: &Arc<Pg>,
        generation: u64,
        deep: bool,
    ) -> Result<(u64, Vec<pg::Inconsistency>), OpError> {
        let me = self.me().ok_or_else(|| OpError::Io("not booted".into()))?;
        let id = pg.id;
        let (mut objects, mut found) = (0u64, Vec::new());
        let mut after: Option<ObjectName> = None;
        loop {
            let _quiet = pg.gate.write().await;
            let (acting, interval_epoch) = {
                let s = lock(&pg.state);
                if s.generation != generation {
                    return Err(OpError::IntervalChanged {
                        pg: pg.id.to_string(),
                        epoch: s.interval_epoch,
                    });
                }
                (s.acting.clone(), s.interval_epoch)
            };
            // This primary's next SCRUB_CHUNK objects fix the chunk's end; the replicas map
            // the same name range, however many objects they hold in it.
            let first = pg::NameRange {
                after: after.clone(),
                until: None,
            };
            let own = self
                .on_store(move |store| pg::scrub_map(store, id, deep, &first, SCRUB_CHUNK))
                .await?;
            let until = (own.len() >= SCRUB_CHUNK)
                .then(|| own.keys().max_by_key(|n| pg::listing_key(id, n)).cloned())
                .flatten();
            let range = encode(&pg::NameRange {
                after: after.clone(),
                until: until.clone(),
            });
            let mut maps = BTreeMap::new();
            maps.insert(me, own);
            for &osd in acting.iter().filter(|o| **o != me) {
                let range = range.clone();
                let header = Some(self.peer_header(id, interval_epoch).to_pb());
                let m: pg::ScrubMap = self
                    .peer_rpc(osd, "scrub map", |mut c| async move {
                        let r = c
                            .pg_scrub_map(pb::PgScrubMapRequest {
                                header,
                                deep,
                                range,
                            })
                            .await?;
                        Ok(Response::new(r.into_inner().result))
                    })
                    .await?;
                maps.insert(osd, m);
            }
            objects += maps.values().map(|m| m.len()).max().unwrap_or(0) as u64;
            found.extend(pg::compare_scrub_maps(me, &maps));
            match until {
                Some(u) => after = Some(u),
                None => return Ok((objects, found)),
            }
        }
    }

    /// Copies the good copy of one inconsistent object over every bad one; false when no
    /// member holds a good copy.
    pub(super) async fn repair_copies(
        &self,
        pg: &Arc<Pg>,
        inc: &pg::Inconsistency,
    ) -> Result<bool, OpError> {
        let Some(good) = inc.good else {
            return Ok(false);
        };
        let interval_epoch = lock(&pg.state).interval_epoch;
        let name = (inc.namespace.clone(), inc.name.clone());
        let Some(state) = self.fetch(pg.id, interval_epoch, good, &name).await? else {
            return Err(OpError::Io(format!(
                "osd.{good} no longer holds {}",
                inc.name
            )));
        };
        let push = Push {
            objects: vec![state],
            ..Push::default()
        };
        for &osd in &inc.bad {
            self.deliver(pg.id, interval_epoch, osd, &push).await?;
        }
        tracing::info!(pg = %pg.id, object = %inc.name, from = good, to = ?inc.bad, "repaired");
        Ok(true)
    }

    pub async fn handle_pg_scrub_map(
        &self,
        header: PeerHeader,
        req: pb::PgScrubMapRequest,
    ) -> Result<pg::ScrubMap, OpError> {
        let pg = self.check_peer_request(&header).await?;
        let range: pg::NameRange = decode(&req.range, "scrub range")?;
        let (id, deep) = (pg.id, req.deep);
        self.on_store(move |store| pg::scrub_map(store, id, deep, &range, usize::MAX))
            .await
    }
}
