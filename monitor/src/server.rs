//! gRPC front of a monitor: the `Monitor` service for clients and OSDs, and
//! the `MonPeer` service for consensus traffic. Handlers never touch state
//! directly: reads come from the published [`NodeView`] and map history,
//! mutations go to the leader's state owner (forwarded over gRPC when this
//! monitor is a peon). Every wait is bounded, so a monitor without quorum
//! answers "no quorum" instead of hanging.
//!
//! Authentication: `MonAuth` (the handshake) is the only service served without an
//! authorizer; `Monitor` and `MonPeer` sit behind `basalt_proto::auth::Verify`, and each
//! handler checks the peer's caps ([`MonAccess`]) and, for what OSDs send, that the id in the
//! message is the peer's own. A peon forwards a checked mutation to the leader as `mon.`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use basalt_auth::handshake::{Hello, Proof, ServerHandshake, Service};
use basalt_auth::live::{now_ms, random, random_secret};
use basalt_auth::{Authenticated, MonAccess, PermissionDenied};
use basalt_config::ClusterConfig;
use basalt_maps::{decode, encode, MapError, MonInfo, MonMap};
use basalt_paxos::{Rank, Role};
use basalt_proto::auth::{denied, peer, AuthChannel};
use basalt_proto::mon::{
    auth_request, command_request, map_update, mon_auth_server::MonAuth, mon_peer_server::MonPeer,
    monitor_client::MonitorClient, monitor_server::Monitor, Ack, AuthChallenge, AuthEntity,
    AuthGranted, AuthHello, AuthProve, AuthReply, AuthRequest, CommandReply, CommandRequest,
    EpochReply, GetMapRequest, MapKind, MapReply, MapUpdate, MonMember, OsdBeaconRequest,
    OsdBootReply, OsdBootRequest, OsdFailureRequest, PeerEnvelope, ServiceKeysReply,
    ServiceKeysRequest, StatusReply, StatusRequest, SubscribeRequest,
};
use basalt_proto::status::{self, ErrorKind};
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic::{Code, Request as GrpcRequest, Response, Status};

use crate::auth::{AuthCmdError, AuthCommand};
use crate::gate::{Handshakes, MonKeys};
use crate::node::{MonError, NodeView, Request};
use crate::service::{Boot, Command, Outcome};
use crate::store::MapHistory;

/// Marks a request already forwarded once, so monitors never forward in a loop.
const FORWARDED: &str = "x-basalt-forwarded";

pub struct MonServer {
    rank: Rank,
    config: Arc<ClusterConfig>,
    requests: mpsc::Sender<Request>,
    view: watch::Receiver<NodeView>,
    history: MapHistory,
    /// Upper bound on how long one request waits for quorum or a commit.
    wait: Duration,
    leaders: Mutex<HashMap<Rank, MonitorClient<AuthChannel>>>,
    keys: Arc<MonKeys>,
    handshakes: Handshakes,
    /// How this monitor dials the leader (TLS or plain text, from `[tls]`).
    connector: basalt_tls::Connector,
}

impl MonServer {
    pub fn new(
        rank: Rank,
        config: Arc<ClusterConfig>,
        requests: mpsc::Sender<Request>,
        view: watch::Receiver<NodeView>,
        history: MapHistory,
        keys: Arc<MonKeys>,
        connector: basalt_tls::Connector,
    ) -> Self {
        let t = &config.timeouts;
        // Long enough for a whole leader change: lease loss noticed (2 × lease),
        // an election (up to 3 × its timeout with retries) and a new leader's
        // wait for old leases to lapse (2 × lease). Beyond it there is no quorum.
        let wait = Duration::from_millis(
            (4 * t.lease_ms + 3 * t.election_timeout_ms).min(t.client_op_timeout_ms),
        );
        MonServer {
            rank,
            config,
            requests,
            view,
            history,
            wait,
            leaders: Mutex::new(HashMap::new()),
            keys,
            handshakes: Handshakes::default(),
            connector,
        }
    }

    fn monmap(&self) -> MonMap {
        MonMap {
            epoch: 1,
            fsid: self.config.cluster.fsid.clone(),
            mons: self
                .config
                .mons
                .iter()
                .map(|m| MonInfo {
                    rank: m.rank,
                    addr: m.addr.to_string(),
                })
                .collect(),
        }
    }

    /// Waits (bounded) until this monitor may serve reads.
    async fn readable_view(&self) -> Result<NodeView, Status> {
        let mut view = self.view.clone();
        let wait = async move { view.wait_for(|v| v.readable).await.map(|v| v.clone()) };
        match tokio::time::timeout(self.wait, wait).await {
            Ok(Ok(v)) => Ok(v),
            _ => Err(no_quorum()),
        }
    }

    /// Waits (bounded) until some monitor is known to lead; returns its rank.
    async fn leader(&self, deadline: Instant) -> Result<Rank, Status> {
        let mut view = self.view.clone();
        let wait = async move {
            view.wait_for(|v| v.leader.is_some() && (v.role != Role::Leader || v.readable))
                .await
                .map(|v| v.leader)
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(Ok(leader)) => leader.ok_or_else(no_quorum),
            _ => Err(no_quorum()),
        }
    }

    async fn leader_client(&self, rank: Rank) -> Result<MonitorClient<AuthChannel>, Status> {
        let mut leaders = self.leaders.lock().await;
        if let Some(c) = leaders.get(&rank) {
            return Ok(c.clone());
        }
        let mon = self
            .config
            .mon(rank)
            .ok_or_else(|| status::internal(format!("mon.{rank} is not in the monmap")))?;
        let endpoint = Endpoint::from_shared(format!("http://{}", mon.addr))
            .map_err(|e| status::internal(e.to_string()))?
            .connect_timeout(Duration::from_millis(500))
            .timeout(self.wait);
        let channel = basalt_tls::channel(endpoint, &self.connector);
        let client = MonitorClient::new(basalt_proto::auth::authorized(
            channel,
            self.keys.own_ticket.clone(),
        ));
        leaders.insert(rank, client.clone());
        Ok(client)
    }

    /// Runs a mutation on the leader: locally if this monitor leads, else
    /// forwarded once. Retries (bounded) while the leader is unknown or unreachable.
    async fn on_leader<Req, T, Local, Fwd, FwdFut>(
        &self,
        request: GrpcRequest<Req>,
        local: Local,
        forward: Fwd,
    ) -> Result<T, Status>
    where
        Req: Clone,
        Local: Fn(Req, oneshot::Sender<Result<T, MonError>>) -> Request,
        Fwd: Fn(MonitorClient<AuthChannel>, GrpcRequest<Req>) -> FwdFut,
        FwdFut: std::future::Future<Output = Result<T, Status>>,
    {
        // Only a monitor forwards: it checked the original sender's caps itself.
        let forwarded = request.metadata().contains_key(FORWARDED) && peer(&request)?.is_mon();
        let body = request.into_inner();
        let deadline = Instant::now() + self.wait;
        loop {
            let leader = self.leader(deadline).await?;
            let result = if leader == self.rank {
                let (tx, rx) = oneshot::channel();
                self.requests
                    .send(local(body.clone(), tx))
                    .await
                    .map_err(|_| status::unavailable("monitor is shutting down"))?;
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok(r)) => r.map_err(to_status),
                    Ok(Err(_)) => Err(status::unavailable("monitor is shutting down")),
                    Err(_) => Err(status::ambiguous(
                        "timed out waiting for the change to commit; it may or may not have been applied — check, then retry",
                    )),
                }
            } else if forwarded {
                Err(status::unavailable(format!(
                    "mon.{} is not the leader (mon.{leader} is); retry there",
                    self.rank
                )))
            } else {
                let client = self.leader_client(leader).await?;
                let mut req = GrpcRequest::new(body.clone());
                req.metadata_mut()
                    .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
                forward(client, req).await
            };
            match result {
                Err(s)
                    if s.code() == Code::Unavailable && !forwarded && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }
}

/// The request's authenticated peer, if its caps allow `access`.
fn allowed<T>(request: &GrpcRequest<T>, access: MonAccess) -> Result<Arc<Authenticated>, Status> {
    let who = peer(request)?;
    who.check_mon(access).map_err(denied)?;
    Ok(who)
}

/// What an OSD daemon sends (boot, beacons, failure reports): the peer must be `osd.N` with
/// `mon 'allow profile osd'` and the message must be about N, or the peer is a monitor
/// forwarding it.
fn from_osd<T>(request: &GrpcRequest<T>, claimed: u32) -> Result<(), Status> {
    let who = peer(request)?;
    if who.is_mon() {
        return Ok(());
    }
    who.check_mon(MonAccess::OsdDaemon).map_err(denied)?;
    who.check_is_osd(Some(claimed)).map_err(denied)?;
    Ok(())
}

/// What a command asks of the monitors.
fn command_access(cmd: &Command, who: &Authenticated) -> MonAccess {
    match cmd {
        Command::PgActivated { .. } | Command::PgTemp { .. } => MonAccess::OsdDaemon,
        Command::BlocklistAdd { .. } | Command::BlocklistRm { .. } => MonAccess::Blocklist,
        Command::SnapCreate { .. } | Command::SnapRemove { .. } => MonAccess::Snapshots,
        // An OSD marks itself down when it stops.
        Command::OsdDown(id) if who.osd_id() == Some(*id) => MonAccess::OsdDaemon,
        _ => MonAccess::Write,
    }
}

fn no_quorum() -> Status {
    status::unavailable(
        "no quorum: too few monitors are up and talking to each other; start the stopped monitors",
    )
}

pub fn to_status(e: MonError) -> Status {
    match e {
        MonError::Unavailable(m) => status::unavailable(m),
        MonError::Ambiguous => status::ambiguous(e.to_string()),
        MonError::Store(m) => status::internal(m),
        MonError::Auth(a) => {
            let kind = match &a {
                AuthCmdError::NotFound(_) => ErrorKind::NotFound,
                AuthCmdError::Exists(_) => ErrorKind::Exists,
                AuthCmdError::Random(_) => ErrorKind::Internal,
            };
            kind.status(a.to_string())
        }
        MonError::Map(m) => {
            let kind = match &m {
                MapError::PoolExists(_) => ErrorKind::Exists,
                MapError::PoolNotFound(_) | MapError::OsdNotFound(_) => ErrorKind::NotFound,
                MapError::OsdStillUp(_) | MapError::OsdStillNeeded { .. } => {
                    ErrorKind::FailedPrecondition
                }
                _ => ErrorKind::InvalidArgument,
            };
            kind.status(m.to_string())
        }
    }
}

fn command_from(req: CommandRequest) -> Result<Command, Status> {
    use command_request::Command as C;
    let cmd = req
        .command
        .ok_or_else(|| status::invalid_argument("empty command"))?;
    Ok(match cmd {
        C::PoolCreate(p) => Command::PoolCreate {
            name: p.name,
            size: p.size,
            min_size: p.min_size,
            pg_num: p.pg_num,
        },
        C::PoolRm(p) => Command::PoolRm { name: p.name },
        C::PoolSet(p) => Command::PoolSet {
            name: p.name,
            key: p.key,
            value: p.value,
        },
        C::OsdOut(o) => Command::OsdOut(o.id),
        C::OsdIn(o) => Command::OsdIn(o.id),
        C::OsdDown(o) => Command::OsdDown(o.id),
        C::OsdReweight(o) => Command::OsdReweight {
            id: o.id,
            weight: o.weight,
        },
        C::OsdRm(o) => Command::OsdRm(o.id),
        C::OsdLost(o) => Command::OsdLost(o.id),
        C::PgActivated(a) => Command::PgActivated {
            pg: basalt_placement::PgId {
                pool: a.pool,
                seed: a.seed,
            },
            interval: a.interval,
            acting: a.acting,
        },
        C::PgTemp(t) => Command::PgTemp {
            pg: basalt_placement::PgId {
                pool: t.pool,
                seed: t.seed,
            },
            acting: t.acting,
        },
        C::BlocklistAdd(b) => Command::BlocklistAdd {
            entity: b.entity,
            expire_secs: b.expire_secs,
        },
        C::BlocklistRm(b) => Command::BlocklistRm { entity: b.entity },
        C::SetFlag(f) => Command::SetFlag(f),
        C::UnsetFlag(f) => Command::UnsetFlag(f),
        C::SnapCreate(pool) => Command::SnapCreate { pool },
        C::SnapRemove(r) => Command::SnapRemove {
            pool: r.pool,
            snap: r.snap,
        },
        C::SetFullRatio(r) => Command::SetFullRatio {
            kind: basalt_maps::RatioKind::parse(&r.which)
                .map_err(|e| status::invalid_argument(e.to_string()))?,
            ratio: r.ratio,
        },
    })
}

fn entity_from(text: &str) -> Result<basalt_auth::EntityName, Status> {
    text.parse()
        .map_err(|e: basalt_auth::EntityError| status::invalid_argument(e.to_string()))
}

fn caps_from(caps: std::collections::HashMap<String, String>) -> Result<basalt_auth::Caps, Status> {
    let mut pairs: Vec<(String, String)> = caps.into_iter().collect();
    pairs.sort();
    let words: Vec<String> = pairs.into_iter().flat_map(|(s, c)| [s, c]).collect();
    basalt_auth::Caps::from_pairs(&words).map_err(|e| status::invalid_argument(e.to_string()))
}

fn auth_entity(entity: &basalt_auth::EntityName, entry: &basalt_auth::AuthEntry) -> AuthEntity {
    AuthEntity {
        entity: entity.to_string(),
        key: entry.key.to_base64(),
        caps: entry
            .caps
            .iter()
            .map(|(s, c)| (s.to_string(), c.to_string()))
            .collect(),
    }
}

/// A forwarded mutation's reply, back in the form the state owner gives it.
fn outcome_from_reply(reply: AuthReply) -> Result<crate::node::AuthOutcome, Status> {
    let bad = |what: String| status::internal(format!("the leader's auth reply {what}"));
    let entity = reply
        .entity
        .parse()
        .map_err(|err| bad(format!("names no entity: {err}")))?;
    let entry = match reply.entities.into_iter().next() {
        Some(e) => Some(basalt_auth::AuthEntry {
            key: basalt_auth::Secret::from_base64(&e.key)
                .map_err(|err| bad(format!("holds a bad key: {err}")))?,
            caps: caps_from(e.caps)?,
        }),
        // A removal.
        None => None,
    };
    Ok((entity, entry, reply.version))
}

/// An `auth` request: a read of the committed database, or a mutation for the leader.
enum AuthOp {
    Get(basalt_auth::EntityName),
    Ls,
    Change(AuthCommand),
}

fn auth_op_from(req: AuthRequest) -> Result<AuthOp, Status> {
    use auth_request::Command as C;
    let cmd = req
        .command
        .ok_or_else(|| status::invalid_argument("empty auth command"))?;
    Ok(match cmd {
        C::Add(a) => AuthOp::Change(AuthCommand::Add {
            entity: entity_from(&a.entity)?,
            key: if a.key.is_empty() {
                None
            } else {
                Some(
                    basalt_auth::Secret::from_base64(&a.key)
                        .map_err(|e| status::invalid_argument(e.to_string()))?,
                )
            },
            caps: caps_from(a.caps)?,
        }),
        C::GetOrCreate(g) => AuthOp::Change(AuthCommand::GetOrCreate {
            entity: entity_from(&g.entity)?,
            caps: caps_from(g.caps)?,
        }),
        C::Get(e) => AuthOp::Get(entity_from(&e)?),
        C::Ls(_) => AuthOp::Ls,
        C::Rm(e) => AuthOp::Change(AuthCommand::Remove {
            entity: entity_from(&e)?,
        }),
        C::Caps(c) => AuthOp::Change(AuthCommand::SetCaps {
            entity: entity_from(&c.entity)?,
            caps: caps_from(c.caps)?,
        }),
    })
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<MapUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Monitor for MonServer {
    async fn get_map(
        &self,
        request: GrpcRequest<GetMapRequest>,
    ) -> Result<Response<MapReply>, Status> {
        allowed(&request, MonAccess::Read)?;
        let req = request.into_inner();
        if req.kind == MapKind::Monmap as i32 {
            let monmap = self.monmap();
            return Ok(Response::new(MapReply {
                epoch: monmap.epoch,
                full: encode(&monmap).into(),
            }));
        }
        let view = self.readable_view().await?;
        if req.epoch == 0 || req.epoch == view.osdmap.epoch {
            return Ok(Response::new(MapReply {
                epoch: view.osdmap.epoch,
                full: encode(&*view.osdmap).into(),
            }));
        }
        if req.epoch > view.osdmap.epoch {
            return Err(status::not_found(format!(
                "osdmap epoch {} does not exist yet (latest is {})",
                req.epoch, view.osdmap.epoch
            )));
        }
        match self.history.full_map(req.epoch) {
            Ok(Some(map)) => Ok(Response::new(MapReply {
                epoch: map.epoch,
                full: encode(&map).into(),
            })),
            Ok(None) => Err(status::not_found(format!(
                "osdmap epoch {} was trimmed (oldest kept is {})",
                req.epoch, view.first_epoch
            ))),
            Err(e) => Err(status::internal(e.to_string())),
        }
    }

    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: GrpcRequest<SubscribeRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        allowed(&request, MonAccess::Read)?;
        let start = request.into_inner().start_epoch;
        let view = self.readable_view().await?;
        let (tx, rx) = mpsc::channel(64);
        let mut watch = self.view.clone();
        let history = self.history.clone();
        tokio::spawn(async move {
            let full = |map: &basalt_maps::OsdMap| MapUpdate {
                epoch: map.epoch,
                update: Some(map_update::Update::Full(encode(map).into())),
            };
            let mut sent =
                if start == 0 || start < view.first_epoch.max(1) || start > view.osdmap.epoch + 1 {
                    if tx.send(Ok(full(&view.osdmap))).await.is_err() {
                        return;
                    }
                    view.osdmap.epoch
                } else {
                    start - 1
                };
            loop {
                let latest = watch.borrow_and_update().osdmap.clone();
                while sent < latest.epoch {
                    let next = match history.incremental(sent + 1) {
                        Ok(Some(inc)) => MapUpdate {
                            epoch: inc.epoch,
                            update: Some(map_update::Update::Incremental(encode(&inc).into())),
                        },
                        // Trimmed under us: jump to the latest full map.
                        _ => full(&latest),
                    };
                    sent = next.epoch;
                    if tx.send(Ok(next)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn osd_boot(
        &self,
        request: GrpcRequest<OsdBootRequest>,
    ) -> Result<Response<OsdBootReply>, Status> {
        from_osd(&request, request.get_ref().osd_id)?;
        let (osd_id, epoch) = self
            .on_leader(
                request,
                |r: OsdBootRequest, reply| Request::Boot {
                    boot: Boot {
                        id: r.osd_id,
                        uuid: r.uuid,
                        addr: r.addr,
                        host: r.host,
                        crush_weight: r.crush_weight,
                    },
                    reply,
                },
                |mut c, r| async move {
                    let rep = c.osd_boot(r).await?.into_inner();
                    Ok((rep.osd_id, rep.epoch))
                },
            )
            .await?;
        Ok(Response::new(OsdBootReply { osd_id, epoch }))
    }

    async fn osd_beacon(
        &self,
        request: GrpcRequest<OsdBeaconRequest>,
    ) -> Result<Response<EpochReply>, Status> {
        from_osd(&request, request.get_ref().osd_id)?;
        let epoch = self
            .on_leader(
                request,
                |r: OsdBeaconRequest, reply| Request::Beacon {
                    id: r.osd_id,
                    // total 0: the OSD could not measure its use this time.
                    usage: (r.total_bytes > 0).then_some(basalt_maps::OsdUsage {
                        used_bytes: r.used_bytes,
                        total_bytes: r.total_bytes,
                    }),
                    reply,
                },
                |mut c, r| async move { Ok(c.osd_beacon(r).await?.into_inner().epoch) },
            )
            .await?;
        Ok(Response::new(EpochReply { epoch }))
    }

    async fn osd_failure(
        &self,
        request: GrpcRequest<OsdFailureRequest>,
    ) -> Result<Response<EpochReply>, Status> {
        from_osd(&request, request.get_ref().reporter)?;
        let epoch = self
            .on_leader(
                request,
                |r: OsdFailureRequest, reply| Request::Failure {
                    reporter: r.reporter,
                    target: r.target,
                    epoch: r.epoch,
                    still_failed: r.still_failed,
                    reply,
                },
                |mut c, r| async move { Ok(c.osd_failure(r).await?.into_inner().epoch) },
            )
            .await?;
        Ok(Response::new(EpochReply { epoch }))
    }

    async fn command(
        &self,
        request: GrpcRequest<CommandRequest>,
    ) -> Result<Response<CommandReply>, Status> {
        // Decode before any waiting, so malformed commands fail fast.
        let cmd = command_from(request.get_ref().clone())?;
        let who = peer(&request)?;
        let access = command_access(&cmd, &who);
        who.check_mon(access).map_err(denied)?;
        if access == MonAccess::OsdDaemon && !who.is_mon() {
            // PG activations and self mark-downs come from OSD daemons only.
            who.check_is_osd(None).map_err(denied)?;
        }
        let (epoch, outcome) = self
            .on_leader(
                request,
                |_: CommandRequest, reply| Request::Command {
                    cmd: cmd.clone(),
                    reply,
                },
                |mut c, r| async move {
                    let rep = c.command(r).await?.into_inner();
                    let outcome = Outcome {
                        message: rep.message,
                        snap_id: (rep.snap_id != 0).then_some(rep.snap_id),
                    };
                    Ok((rep.epoch, outcome))
                },
            )
            .await?;
        Ok(Response::new(CommandReply {
            epoch,
            message: outcome.message,
            snap_id: outcome.snap_id.unwrap_or(0),
        }))
    }

    async fn auth(&self, request: GrpcRequest<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        // Keys are secrets: reading them is as privileged as changing them.
        allowed(&request, MonAccess::AuthAdmin)?;
        // Decode before any waiting, so malformed commands fail fast.
        let cmd = match auth_op_from(request.get_ref().clone())? {
            AuthOp::Get(entity) => {
                let view = self.readable_view().await?;
                let entry = view.auth.get(&entity).ok_or_else(|| {
                    status::not_found(AuthCmdError::NotFound(entity.clone()).to_string())
                })?;
                return Ok(Response::new(AuthReply {
                    version: view.auth.version,
                    entities: vec![auth_entity(&entity, entry)],
                    message: String::new(),
                    entity: entity.to_string(),
                }));
            }
            AuthOp::Ls => {
                let view = self.readable_view().await?;
                return Ok(Response::new(AuthReply {
                    version: view.auth.version,
                    entities: view.auth.iter().map(|(n, e)| auth_entity(n, e)).collect(),
                    message: String::new(),
                    entity: String::new(),
                }));
            }
            AuthOp::Change(cmd) => cmd,
        };
        let removal = matches!(cmd, AuthCommand::Remove { .. });
        let (entity, entry, version) = self
            .on_leader(
                request,
                |_: AuthRequest, reply| Request::Auth {
                    cmd: cmd.clone(),
                    reply,
                },
                |mut c, r| async move { outcome_from_reply(c.auth(r).await?.into_inner()) },
            )
            .await?;
        let message = if removal {
            format!("removed {entity}")
        } else {
            format!("{entity} as of auth version {version}")
        };
        Ok(Response::new(AuthReply {
            version,
            entities: entry.iter().map(|e| auth_entity(&entity, e)).collect(),
            message,
            entity: entity.to_string(),
        }))
    }

    async fn service_keys(
        &self,
        request: GrpcRequest<ServiceKeysRequest>,
    ) -> Result<Response<ServiceKeysReply>, Status> {
        let who = allowed(&request, MonAccess::OsdDaemon)?;
        who.check_is_osd(None).map_err(denied)?;
        let session_key = who.session_key.clone();
        let keys = self.keys.accepting(Service::Osd);
        if keys.is_empty() {
            return Err(status::unavailable(
                "the osd service's secrets are not committed yet (a new cluster's first commit); retry",
            ));
        }
        let plain =
            postcard::to_stdvec(&keys).map_err(|e| status::internal(format!("encode: {e}")))?;
        let nonce = random::<12>().map_err(|e| status::internal(e.to_string()))?;
        Ok(Response::new(ServiceKeysReply {
            nonce: nonce.to_vec().into(),
            sealed: basalt_auth::handshake::seal(&session_key, nonce, &plain).into(),
        }))
    }

    async fn status(
        &self,
        request: GrpcRequest<StatusRequest>,
    ) -> Result<Response<StatusReply>, Status> {
        allowed(&request, MonAccess::Read)?;
        let view = self.readable_view().await?;
        Ok(Response::new(StatusReply {
            fsid: self.config.cluster.fsid.clone(),
            leader: view.leader.unwrap_or(u32::MAX),
            mons: self
                .config
                .mons
                .iter()
                .map(|m| MonMember {
                    rank: m.rank,
                    addr: m.addr.to_string(),
                    in_quorum: view.quorum.contains(&m.rank),
                })
                .collect(),
            election_epoch: view.election_epoch,
            first_committed: view.first_committed,
            last_committed: view.last_committed,
            osdmap_epoch: view.osdmap.epoch,
            answered_by: self.rank,
        }))
    }
}

#[tonic::async_trait]
impl MonPeer for MonServer {
    async fn deliver(&self, request: GrpcRequest<PeerEnvelope>) -> Result<Response<Ack>, Status> {
        // Consensus traffic only from holders of the monitors' key.
        let who = peer(&request)?;
        if !who.is_mon() {
            return Err(denied(PermissionDenied {
                entity: who.entity.clone(),
                missing: "the monitors' key (mon.) to send Paxos messages".into(),
            }));
        }
        let env = request.into_inner();
        if env.fsid != self.config.cluster.fsid {
            return Err(status::permission_denied(format!(
                "message from cluster {} dropped: this is cluster {}",
                env.fsid, self.config.cluster.fsid
            )));
        }
        if env.from as usize >= self.config.mons.len() || env.from == self.rank {
            return Err(status::invalid_argument(format!(
                "mon.{} is not a peer of mon.{}",
                env.from, self.rank
            )));
        }
        let msg = decode(&env.message, "paxos message")
            .map_err(|e| status::invalid_argument(e.to_string()))?;
        // A full queue means the state owner is behind; dropping is what the network would do.
        let _ = self.requests.try_send(Request::Peer {
            from: env.from,
            msg,
        });
        Ok(Response::new(Ack {}))
    }
}

#[tonic::async_trait]
impl MonAuth for MonServer {
    async fn hello(
        &self,
        request: GrpcRequest<AuthHello>,
    ) -> Result<Response<AuthChallenge>, Status> {
        let hello: Hello = postcard::from_bytes(&request.get_ref().hello)
            .map_err(|_| status::invalid_argument("the Hello cannot be decoded"))?;
        let view = self.readable_view().await?;
        if view.auth.version == 0 {
            // A new cluster whose first leader has not committed the bootstrap keyring yet.
            return Err(status::unavailable(
                "the auth database is not seeded yet (a new cluster's first commit); retry",
            ));
        }
        let entry = view.auth.get(&hello.entity);
        let server_challenge = random::<16>().map_err(|e| status::internal(e.to_string()))?;
        let (handshake, challenge) =
            ServerHandshake::on_hello(&hello, entry.map(|e| (&e.key, &e.caps)), server_challenge)
                .map_err(|e| status::unauthenticated(e.to_string()))?;
        let handshake_id = self
            .handshakes
            .insert(handshake)
            .ok_or_else(|| status::internal("no randomness from the OS"))?;
        Ok(Response::new(AuthChallenge {
            handshake_id,
            challenge: postcard::to_stdvec(&challenge)
                .map_err(|e| status::internal(e.to_string()))?
                .into(),
        }))
    }

    async fn prove(
        &self,
        request: GrpcRequest<AuthProve>,
    ) -> Result<Response<AuthGranted>, Status> {
        let req = request.into_inner();
        let proof: Proof = postcard::from_bytes(&req.proof)
            .map_err(|_| status::invalid_argument("the Proof cannot be decoded"))?;
        let handshake = self.handshakes.take(req.handshake_id).ok_or_else(|| {
            status::unauthenticated(
                "no such handshake on this monitor (expired, already used, or begun on another monitor); start again",
            )
        })?;
        let rnd = |_| random::<12>().map_err(|e| status::internal(e.to_string()));
        let now = now_ms();
        let not_yet = || {
            status::unavailable(
                "the service secrets are not committed yet (a new cluster's first commit); retry",
            )
        };
        let mon_keys = self.keys.sealing(Service::Mon, now).ok_or_else(not_yet)?;
        let osd_keys = self.keys.sealing(Service::Osd, now).ok_or_else(not_yet)?;
        let secret = || random_secret().map_err(|e| status::internal(e.to_string()));
        let grants = vec![
            (Service::Mon, &mon_keys, secret()?, rnd(0)?, rnd(1)?),
            (Service::Osd, &osd_keys, secret()?, rnd(2)?, rnd(3)?),
        ];
        let (entity, granted) = handshake
            .on_proof(&proof, now, self.keys.ttl_ms(), grants)
            .map_err(|e| status::unauthenticated(e.to_string()))?;
        tracing::debug!(%entity, "authenticated");
        Ok(Response::new(AuthGranted {
            granted: postcard::to_stdvec(&granted)
                .map_err(|e| status::internal(e.to_string()))?
                .into(),
        }))
    }
}
