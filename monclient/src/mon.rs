use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt_auth::{EntityName, TicketCell};
use basalt_config::ClusterConfig;
use basalt_maps::{decode, Epoch, Incremental, MonMap, OsdMap};
use basalt_proto::auth::AuthChannel;
use basalt_proto::mon::{
    auth_request, command_request::Command, map_update, monitor_client::MonitorClient, AuthReply,
    AuthRequest, BlocklistAdd, BlocklistRm, CommandReply, CommandRequest, GetMapRequest, MapKind,
    OsdBeaconRequest, OsdBootRequest, OsdFailureRequest, OsdId, OsdReweight, PoolCreate, PoolRm,
    PoolSet, SetFullRatio, StatusReply, StatusRequest, SubscribeRequest,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::{Credentials, Session};
use crate::ClientError;

const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A handle on the monitors. Cheap to clone; all clones share connections.
#[derive(Clone)]
pub struct MonClient {
    inner: Arc<Inner>,
}

struct Inner {
    mons: Vec<(u32, MonitorClient<AuthChannel>)>,
    /// The tickets every request (to monitors and OSDs) is authenticated with.
    session: Arc<Session>,
    /// Index of the monitor that answered last: asked first next time.
    preferred: AtomicUsize,
    op_timeout: Duration,
    /// How this client dials monitors and OSDs (TLS or plain text, from `[tls]`).
    connector: basalt_tls::Connector,
}

impl MonClient {
    /// A client for the monitors in `config`, authenticated with the config's keyring
    /// ([`Credentials::from_config`]). Connections are made lazily and driven by the tokio
    /// runtime, so call this inside one.
    pub fn new(config: ClusterConfig) -> Result<Self, ClientError> {
        let op_timeout = Duration::from_millis(config.timeouts.client_op_timeout_ms);
        Self::with_timeout(config, op_timeout)
    }

    /// As [`MonClient::new`], with an explicit bound on each operation.
    pub fn with_timeout(config: ClusterConfig, op_timeout: Duration) -> Result<Self, ClientError> {
        let creds = Credentials::from_config(&config, config.client.name.as_deref())?;
        Self::with_credentials(config, op_timeout, creds)
    }

    /// As [`MonClient::with_timeout`], authenticated as `creds`.
    pub fn with_credentials(
        config: ClusterConfig,
        op_timeout: Duration,
        creds: Credentials,
    ) -> Result<Self, ClientError> {
        let connector = crate::connector_for(&config)?;
        let mut mons = Vec::new();
        let mut channels = Vec::new();
        for m in &config.mons {
            let channel =
                crate::lazy_channel(&m.addr.to_string(), &connector, Duration::from_millis(500))
                    .map_err(|e| ClientError::Config(format!("mon.{}: {e}", m.rank)))?;
            channels.push(channel.clone());
            mons.push((m.rank, channel));
        }
        if mons.is_empty() {
            return Err(ClientError::Config("the config lists no monitors".into()));
        }
        let session = Session::start(creds, channels);
        let mons = mons
            .into_iter()
            .map(|(rank, channel)| {
                let client = MonitorClient::new(basalt_proto::auth::authorized(
                    channel,
                    session.mon.clone(),
                ))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
                (rank, client)
            })
            .collect();
        Ok(MonClient {
            inner: Arc::new(Inner {
                mons,
                session,
                preferred: AtomicUsize::new(0),
                op_timeout,
                connector,
            }),
        })
    }

    pub fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// The entity this client authenticates as.
    pub fn entity(&self) -> &EntityName {
        &self.inner.session.entity
    }

    /// This client's ticket for the OSDs (what its OSD requests and connections present).
    pub fn osd_ticket(&self) -> Arc<TicketCell> {
        self.inner.session.osd.clone()
    }

    /// How this client dials (TLS against the cluster CA, or plain text): OSD connections
    /// made on its behalf use the same.
    pub fn connector(&self) -> &basalt_tls::Connector {
        &self.inner.connector
    }

    /// Runs `op` against monitors in turn until one answers with something
    /// other than "no quorum / unreachable", or the op timeout passes.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(MonitorClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.op_timeout;
        self.inner.session.ready(deadline).await?;
        let n = self.inner.mons.len();
        let mut last = None;
        // Set once an attempt may have been applied (a monitor's connection broke mid-request
        // or leadership changed mid-commit): the request goes to the next monitor, but a later
        // refusal (say "already exists") may be the first attempt's own effect, so it is
        // reported as ambiguous rather than as a plain error.
        let mut ambiguous: Option<String> = None;
        loop {
            let start = self.inner.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let idx = (start + i) % n;
                let client = self.inner.mons[idx].1.clone();
                match tokio::time::timeout_at(deadline, op(client)).await {
                    Err(_) => return Err(self.exhausted(last, ambiguous)),
                    Ok(Ok(v)) => {
                        self.inner.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(status)) => {
                        let err = ClientError::from(status);
                        if let ClientError::Ambiguous(first) = &err {
                            ambiguous.get_or_insert_with(|| first.clone());
                        } else if !err.is_retryable() {
                            return Err(match ambiguous {
                                Some(first) => ClientError::Ambiguous(format!(
                                    "{first}; the retry on another monitor answered: {err} (which may be the first attempt's own effect)"
                                )),
                                None => err,
                            });
                        }
                        tracing::debug!(mon = self.inner.mons[idx].0, error = %err, "monitor cannot answer; trying the next");
                        last = Some(err);
                    }
                }
            }
            if Instant::now() + Duration::from_millis(100) >= deadline {
                return Err(self.exhausted(last, ambiguous));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exhausted(&self, last: Option<ClientError>, ambiguous: Option<String>) -> ClientError {
        if let Some(first) = ambiguous {
            return ClientError::Ambiguous(format!(
                "{first}; no monitor confirmed the outcome within {:?}",
                self.inner.op_timeout
            ));
        }
        let why = match last {
            Some(ClientError::NoQuorum(m)) => m,
            Some(e) => e.to_string(),
            None => "no monitor answered".into(),
        };
        ClientError::NoQuorum(format!(
            "no monitor could serve the request within {:?} ({why})",
            self.inner.op_timeout
        ))
    }

    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        self.call(|mut c| async move { Ok(c.status(StatusRequest {}).await?.into_inner()) })
            .await
    }

    /// The latest committed OSDMap.
    pub async fn osdmap(&self) -> Result<OsdMap, ClientError> {
        self.osdmap_at(0).await
    }

    /// The OSDMap at `epoch` (0 = latest).
    pub async fn osdmap_at(&self, epoch: Epoch) -> Result<OsdMap, ClientError> {
        let reply = self
            .call(|mut c| async move {
                Ok(c.get_map(GetMapRequest {
                    kind: MapKind::Osdmap as i32,
                    epoch,
                })
                .await?
                .into_inner())
            })
            .await?;
        Ok(decode(&reply.full, "osdmap")?)
    }

    pub async fn monmap(&self) -> Result<MonMap, ClientError> {
        let reply = self
            .call(|mut c| async move {
                Ok(c.get_map(GetMapRequest {
                    kind: MapKind::Monmap as i32,
                    epoch: 0,
                })
                .await?
                .into_inner())
            })
            .await?;
        Ok(decode(&reply.full, "monmap")?)
    }

    /// Sends one operator command; returns the epoch holding the change and a message.
    pub async fn command(&self, command: Command) -> Result<CommandReply, ClientError> {
        let req = CommandRequest {
            command: Some(command),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { Ok(c.command(req).await?.into_inner()) }
        })
        .await
    }

    /// One `auth` command (keys and caps); mutations return after they commit.
    pub async fn auth(&self, command: auth_request::Command) -> Result<AuthReply, ClientError> {
        let req = AuthRequest {
            command: Some(command),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { Ok(c.auth(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn pool_create(
        &self,
        name: &str,
        size: u32,
        min_size: u32,
        pg_num: u32,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::PoolCreate(PoolCreate {
            name: name.into(),
            size,
            min_size,
            pg_num,
        }))
        .await
    }

    pub async fn pool_rm(&self, name: &str) -> Result<CommandReply, ClientError> {
        self.command(Command::PoolRm(PoolRm { name: name.into() }))
            .await
    }

    pub async fn pool_set(
        &self,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::PoolSet(PoolSet {
            name: name.into(),
            key: key.into(),
            value: value.into(),
        }))
        .await
    }

    pub async fn osd_out(&self, id: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdOut(OsdId { id })).await
    }

    pub async fn osd_in(&self, id: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdIn(OsdId { id })).await
    }

    pub async fn osd_down(&self, id: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdDown(OsdId { id })).await
    }

    pub async fn osd_rm(&self, id: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdRm(OsdId { id })).await
    }

    /// Declares a down OSD's data gone for good, so PGs that wait for it go active without it
    /// (acknowledged writes only it held are lost).
    pub async fn osd_lost(&self, id: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdLost(OsdId { id })).await
    }

    /// Records that `pg` went active in the interval that began at `interval` (OSD use).
    pub async fn pg_activated(
        &self,
        pg: basalt_placement::PgId,
        interval: Epoch,
        acting: Vec<u32>,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::PgActivated(basalt_proto::mon::PgActivated {
            pool: pg.pool,
            seed: pg.seed,
            interval,
            acting,
        }))
        .await
    }

    /// Asks for `acting` as `pg`'s temporary acting set (empty: back to CRUSH's); OSD use.
    pub async fn pg_temp(
        &self,
        pg: basalt_placement::PgId,
        acting: Vec<u32>,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::PgTemp(basalt_proto::mon::PgTemp {
            pool: pg.pool,
            seed: pg.seed,
            acting,
        }))
        .await
    }

    /// Sets an OSD's in-weight (16.16 fixed point, 0..=0x10000).
    pub async fn osd_reweight(&self, id: u32, weight: u32) -> Result<CommandReply, ClientError> {
        self.command(Command::OsdReweight(OsdReweight { id, weight }))
            .await
    }

    /// Fences `entity` for `expire_secs` (0 = one hour).
    pub async fn blocklist_add(
        &self,
        entity: &str,
        expire_secs: u64,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::BlocklistAdd(BlocklistAdd {
            entity: entity.into(),
            expire_secs,
        }))
        .await
    }

    pub async fn blocklist_rm(&self, entity: &str) -> Result<CommandReply, ClientError> {
        self.command(Command::BlocklistRm(BlocklistRm {
            entity: entity.into(),
        }))
        .await
    }

    pub async fn set_flag(&self, flag: &str) -> Result<CommandReply, ClientError> {
        self.command(Command::SetFlag(flag.into())).await
    }

    pub async fn unset_flag(&self, flag: &str) -> Result<CommandReply, ClientError> {
        self.command(Command::UnsetFlag(flag.into())).await
    }

    /// `osd set-nearfull-ratio|set-backfillfull-ratio|set-full-ratio`: `ratio` in units of
    /// 1/10000 (`basalt_maps::parse_ratio`). The monitor keeps nearfull <= backfillfull <=
    /// full <= 1.
    pub async fn set_full_ratio(
        &self,
        kind: basalt_maps::RatioKind,
        ratio: u32,
    ) -> Result<CommandReply, ClientError> {
        self.command(Command::SetFullRatio(SetFullRatio {
            which: kind.name().into(),
            ratio,
        }))
        .await
    }

    /// Registers an OSD daemon (by its data directory's uuid); returns its id and the epoch it is up in.
    /// Boots OSD `osd_id` (the id this client authenticated as, `osd.N`).
    pub async fn osd_boot(
        &self,
        osd_id: u32,
        uuid: &str,
        addr: &str,
        host: &str,
        crush_weight: u32,
    ) -> Result<(u32, Epoch), ClientError> {
        let req = OsdBootRequest {
            osd_id,
            uuid: uuid.into(),
            addr: addr.into(),
            host: host.into(),
            crush_weight,
        };
        let reply = self
            .call(|mut c| {
                let req = req.clone();
                async move { Ok(c.osd_boot(req).await?.into_inner()) }
            })
            .await?;
        Ok((reply.osd_id, reply.epoch))
    }

    /// The osd service's current secrets, for an OSD daemon (authenticated as `osd.N`) to
    /// check its clients' tickets with; sealed by the monitor with this client's session key.
    pub async fn service_keys(&self) -> Result<basalt_auth::handshake::ServiceKeys, ClientError> {
        let reply = self
            .call(|mut c| async move {
                Ok(c.service_keys(basalt_proto::mon::ServiceKeysRequest {})
                    .await?
                    .into_inner())
            })
            .await?;
        let nonce: [u8; 12] =
            reply.nonce.as_ref().try_into().map_err(|_| {
                ClientError::Decode("the service keys' nonce is not 12 bytes".into())
            })?;
        let key = self.inner.session.mon.session_key().ok_or_else(|| {
            ClientError::Unauthenticated("no mon ticket to open the service keys with".into())
        })?;
        // A ticket renewed between request and reply has another session key: the caller
        // retries.
        let plain = basalt_auth::handshake::open(&key, nonce, &reply.sealed).ok_or_else(|| {
            ClientError::Unavailable(
                "the service keys do not open with the current session key (the ticket was just renewed); retry".into(),
            )
        })?;
        postcard::from_bytes(&plain).map_err(|e| ClientError::Decode(format!("service keys: {e}")))
    }

    /// A beacon: OSD `osd_id` is alive at map `epoch`, and its store uses `usage` (if it
    /// could measure it).
    pub async fn osd_beacon(
        &self,
        osd_id: u32,
        epoch: Epoch,
        usage: Option<basalt_maps::OsdUsage>,
    ) -> Result<Epoch, ClientError> {
        let (used_bytes, total_bytes) = usage.map_or((0, 0), |u| (u.used_bytes, u.total_bytes));
        self.call(|mut c| async move {
            Ok(c.osd_beacon(OsdBeaconRequest {
                osd_id,
                epoch,
                used_bytes,
                total_bytes,
            })
            .await?
            .into_inner()
            .epoch)
        })
        .await
    }

    /// Reports that `reporter`, whose newest map is `epoch`, cannot reach `target` (or, with
    /// `still_failed` false, can again).
    pub async fn osd_failure(
        &self,
        reporter: u32,
        target: u32,
        failed_for_ms: u64,
        epoch: Epoch,
        still_failed: bool,
    ) -> Result<Epoch, ClientError> {
        self.call(|mut c| async move {
            Ok(c.osd_failure(OsdFailureRequest {
                reporter,
                target,
                failed_for_ms,
                epoch,
                still_failed,
            })
            .await?
            .into_inner()
            .epoch)
        })
        .await
    }

    /// Keeps an always-current OSDMap: the first map is fetched before this
    /// returns; then a background task applies incrementals in order,
    /// re-subscribing to another monitor when a stream breaks.
    pub async fn subscribe(&self) -> Result<MapSubscription, ClientError> {
        let first = self.osdmap().await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let client = self.clone();
        let task = tokio::spawn(async move { client.follow(tx).await });
        Ok(MapSubscription {
            rx,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    async fn follow(&self, tx: watch::Sender<Arc<OsdMap>>) {
        let n = self.inner.mons.len();
        let mut idx = self.inner.preferred.load(Ordering::Relaxed);
        loop {
            if tx.is_closed() {
                return;
            }
            let start = tx.borrow().epoch + 1;
            let mut client = self.inner.mons[idx % n].1.clone();
            match client
                .subscribe(SubscribeRequest { start_epoch: start })
                .await
            {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(update)) => {
                                if let Err(e) = apply_update(&tx, update) {
                                    tracing::warn!(error = %e, "bad map update; re-subscribing");
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "subscribe failed; trying another monitor"),
            }
            idx += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn apply_update(
    tx: &watch::Sender<Arc<OsdMap>>,
    update: basalt_proto::mon::MapUpdate,
) -> Result<(), ClientError> {
    let current = tx.borrow().clone();
    let next = match update.update {
        Some(map_update::Update::Full(b)) => decode::<OsdMap>(&b, "osdmap")?,
        Some(map_update::Update::Incremental(b)) => {
            let inc: Incremental = decode(&b, "incremental")?;
            if inc.epoch <= current.epoch {
                return Ok(());
            }
            let mut map = (*current).clone();
            map.apply(&inc)?;
            map
        }
        None => return Err(ClientError::Decode("empty map update".into())),
    };
    if next.epoch > current.epoch {
        tx.send_replace(Arc::new(next));
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The latest OSDMap, kept current in the background while held.
#[derive(Clone)]
pub struct MapSubscription {
    rx: watch::Receiver<Arc<OsdMap>>,
    _task: Arc<AbortOnDrop>,
}

impl MapSubscription {
    pub fn current(&self) -> Arc<OsdMap> {
        self.rx.borrow().clone()
    }

    /// Waits for a map newer than `epoch`; None once the subscription has ended.
    pub async fn newer_than(&mut self, epoch: Epoch) -> Option<Arc<OsdMap>> {
        self.rx
            .wait_for(|m| m.epoch > epoch)
            .await
            .ok()
            .map(|m| m.clone())
    }

    /// Waits (bounded) until the map reaches `epoch`.
    pub async fn wait_for_epoch(
        &mut self,
        epoch: Epoch,
        timeout: Duration,
    ) -> Result<Arc<OsdMap>, ClientError> {
        match tokio::time::timeout(timeout, self.rx.wait_for(|m| m.epoch >= epoch)).await {
            Ok(Ok(m)) => Ok(m.clone()),
            Ok(Err(_)) => Err(ClientError::Internal("map subscription ended".into())),
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }
}
