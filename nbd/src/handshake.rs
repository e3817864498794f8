//! Fixed-newstyle negotiation: greeting, then options until the client
//! picks an export (EXPORT_NAME / GO), asks for TLS (STARTTLS) or leaves.
//!
//! STARTTLS (NBD `doc/proto.md`, "TLS support"): after the ACK the caller runs the TLS
//! handshake on the socket and calls [`options`] again on the encrypted stream with fresh
//! state (the spec discards everything negotiated before). On a server that requires TLS,
//! every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` until then, and
//! EXPORT_NAME (which has no error reply) closes the connection.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::proto::{self, *};
use crate::{Export, ExportAccess, ExportRegistry, Limits, NbdError};

/// Where TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsState {
    /// The server has no certificate: STARTTLS is unsupported.
    NotOffered,
    /// Plain text so far; STARTTLS upgrades. `required`: nothing else is served before it.
    Offered { required: bool },
    /// The connection is encrypted.
    Active,
}

/// What the negotiation knows about the connection besides the options.
pub(crate) struct Ctx<'a> {
    pub tls: TlsState,
    /// The client's name from its TLS certificate (subject CN).
    pub client: Option<&'a str>,
    /// Which exports the client may see and open; `None`: all.
    pub access: Option<&'a dyn ExportAccess>,
}

impl Ctx<'_> {
    fn may_open(&self, name: &str) -> Result<(), NbdError> {
        match self.access {
            Some(a) if !a.allows(self.client, name) => {
                Err(NbdError::PermissionDenied(match self.client {
                    Some(c) => format!("{c} may not open export {name:?}"),
                    None => format!(
                        "export {name:?} needs a TLS client certificate that is allowed to open it"
                    ),
                }))
            }
            _ => Ok(()),
        }
    }
}

/// How a round of options ended.
pub(crate) enum Step {
    /// An export was chosen: transmission follows.
    Export(Negotiated),
    /// STARTTLS was acknowledged: the caller runs the TLS handshake, then options again.
    StartTls,
}

/// What the negotiation settled on.
pub(crate) struct Negotiated {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// `base:allocation` was selected (by SET_META_CONTEXT for this export).
    pub base_allocation: bool,
}

/// Transmission flags for an export.
pub(crate) fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_SEND_FAST_ZERO
        | TFLAG_SEND_CACHE;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if export.read_only() {
        f |= TFLAG_READ_ONLY;
    }
    if export.can_multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

struct State {
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether `base:allocation` was selected for it.
    meta: Option<(String, bool)>,
    /// The last export opened (by INFO or META_CONTEXT), reused by GO so a
    /// typical negotiation opens an image once.
    opened: Option<(String, Arc<dyn Export>)>,
}

impl State {
    async fn open(
        &mut self,
        registry: &dyn ExportRegistry,
        ctx: &Ctx<'_>,
        name: &str,
    ) -> Result<Arc<dyn Export>, NbdError> {
        ctx.may_open(name)?;
        if let Some((n, e)) = &self.opened {
            if n == name {
                return Ok(e.clone());
            }
        }
        let e = registry.open(name).await?;
        self.opened = Some((name.to_owned(), e.clone()));
        Ok(e)
    }
}

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, buf: &mut BytesMut) -> Result<(), NbdError> {
    w.write_all(buf).await?;
    w.flush().await?;
    buf.clear();
    Ok(())
}

fn rep_err(out: &mut BytesMut, option: u32, code: u32, msg: &str) {
    encode_option_reply(
        out,
        option,
        code,
        proto::truncate_str(msg, MAX_STRING_LEN).as_bytes(),
    );
}

/// Sends the greeting and reads the client's flags. `Ok(None)`: the client left.
pub(crate) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<Option<u32>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    w.flush().await?;
    let client_flags = match r.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(Some(client_flags))
}

/// Runs the option haggling after [`greet`]. `Ok(None)`: the client aborted or disconnected
/// cleanly. `Err`: a protocol violation or I/O error (the caller closes).
pub(crate) async fn options<R, W>(
    r: &mut R,
    w: &mut W,
    registry: &dyn ExportRegistry,
    limits: &Limits,
    ctx: &Ctx<'_>,
    client_flags: u32,
) -> Result<Option<Step>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut st = State {
        fixed: client_flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & CLIENT_FLAG_NO_ZEROES != 0,
        structured: false,
        meta: None,
        opened: None,
    };
    let mut out = BytesMut::with_capacity(4096);

    loop {
        let mut hdr = [0u8; 16];
        match r.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let (magic, option, len) = parse_option_header(&hdr);
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        // We cannot skip an oversized option without reading it all, and no
        // option we know needs more than a few KiB: close.
        if len > limits.max_option_len {
            return Err(protocol(format!(
                "option {option} has {len} bytes of data (limit {})",
                limits.max_option_len
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        if !st.fixed && option != OPT_EXPORT_NAME {
            // Without fixed newstyle there is no way to send an error.
            return Err(protocol(format!(
                "option {option} from a client without fixed newstyle"
            )));
        }

        if ctx.tls == (TlsState::Offered { required: true })
            && !matches!(option, OPT_STARTTLS | OPT_ABORT)
        {
            if option == OPT_EXPORT_NAME {
                // No error reply exists for it.
                return Err(protocol(
                    "EXPORT_NAME before STARTTLS on a server that requires TLS",
                ));
            }
            rep_err(
                &mut out,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: negotiate NBD_OPT_STARTTLS first",
            );
            send(w, &mut out).await?;
            continue;
        }

        match option {
            OPT_STARTTLS => match ctx.tls {
                TlsState::NotOffered => rep_err(
                    &mut out,
                    option,
                    REP_ERR_UNSUP,
                    "TLS is not configured on this server",
                ),
                TlsState::Active => rep_err(
                    &mut out,
                    option,
                    REP_ERR_INVALID,
                    "TLS is already active on this connection",
                ),
                TlsState::Offered { .. } if !data.is_empty() => rep_err(
                    &mut out,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STARTTLS takes no data",
                ),
                TlsState::Offered { .. } => {
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                    send(w, &mut out).await?;
                    return Ok(Some(Step::StartTls));
                }
            },
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| protocol("export name is not UTF-8"))?
                    .to_owned();
                // No error path exists for EXPORT_NAME: unknown → close.
                let export = st
                    .open(registry, ctx, &name)
                    .await
                    .map_err(|e| protocol(format!("EXPORT_NAME {name:?}: {e}")))?;
                let flags = transmission_flags(export.as_ref(), st.structured);
                let size = export.size();
                w.write_all(&encode_export_name_reply(size, flags, st.no_zeroes))
                    .await?;
                w.flush().await?;
                return Ok(Some(Step::Export(finish(st, name, export, size, flags))));
            }
            OPT_ABORT => {
                encode_option_reply(&mut out, option, REP_ACK, &[]);
                // The client may already have closed; ignore write errors.
                let _ = send(w, &mut out).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    rep_err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    match registry.list().await {
                        Ok(names) => {
                            // Only what this client may open.
                            for n in names.into_iter().filter(|n| ctx.may_open(n).is_ok()) {
                                encode_option_reply(
                                    &mut out,
                                    option,
                                    REP_SERVER,
                                    &rep_server_payload(&n),
                                );
                                if out.len() > 64 * 1024 {
                                    send(w, &mut out).await?;
                                }
                            }
                            encode_option_reply(&mut out, option, REP_ACK, &[]);
                        }
                        Err(e) => rep_err(&mut out, option, e.rep_error(), &e.to_string()),
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let Some(req) = parse_info_request(&data) else {
                    rep_err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "malformed NBD_OPT_INFO/GO payload",
                    );
                    send(w, &mut out).await?;
                    continue;
                };
                let export = match st.open(registry, ctx, &req.name).await {
                    Ok(e) => e,
                    Err(e) => {
                        debug!(export = %req.name, error = %e, "INFO/GO refused");
                        rep_err(&mut out, option, e.rep_error(), &e.to_string());
                        send(w, &mut out).await?;
                        continue;
                    }
                };
                let flags = transmission_flags(export.as_ref(), st.structured);
                let size = export.size();
                encode_option_reply(
                    &mut out,
                    option,
                    REP_INFO,
                    &info_export_payload(size, flags),
                );
                if req.requests.contains(&INFO_NAME) {
                    encode_option_reply(
                        &mut out,
                        option,
                        REP_INFO,
                        &info_string_payload(INFO_NAME, &req.name),
                    );
                }
                if req.requests.contains(&INFO_DESCRIPTION) {
                    let d = export.description();
                    if !d.is_empty() {
                        let d = proto::truncate_str(&d, MAX_STRING_LEN);
                        encode_option_reply(
                            &mut out,
                            option,
                            REP_INFO,
                            &info_string_payload(INFO_DESCRIPTION, d),
                        );
                    }
                }
                // Always sent: QEMU asks for it, and other clients may use it.
                encode_option_reply(
                    &mut out,
                    option,
                    REP_INFO,
                    &info_block_size_payload(
                        limits.min_block_size,
                        limits.preferred_block_size,
                        limits.max_payload,
                    ),
                );
                encode_option_reply(&mut out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    send(w, &mut out).await?;
                    return Ok(Some(Step::Export(finish(
                        st, req.name, export, size, flags,
                    ))));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    rep_err(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    st.structured = true;
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // SET replaces the selection even when it fails.
                    st.meta = None;
                }
                meta_context(&mut st, registry, ctx, &mut out, option, set, &data).await;
            }
            // EXTENDED_HEADERS: not yet (phase 3 in DESIGN §5); clients fall back to
            // compact headers.
            _ => {
                rep_err(
                    &mut out,
                    option,
                    REP_ERR_UNSUP,
                    &format!("option {option} is not supported by this server"),
                );
            }
        }
        send(w, &mut out).await?;
    }
}

fn finish(st: State, name: String, export: Arc<dyn Export>, size: u64, flags: u16) -> Negotiated {
    let base_allocation = st.structured && matches!(&st.meta, Some((n, true)) if *n == name);
    Negotiated {
        name,
        export,
        size,
        flags,
        structured: st.structured,
        base_allocation,
    }
}

async fn meta_context(
    st: &mut State,
    registry: &dyn ExportRegistry,
    ctx: &Ctx<'_>,
    out: &mut BytesMut,
    option: u32,
    set: bool,
    data: &[u8],
) {
    if !st.structured {
        rep_err(
            out,
            option,
            REP_ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts",
        );
        return;
    }
    let Some(req) = parse_meta_context_request(data) else {
        rep_err(
            out,
            option,
            REP_ERR_INVALID,
            "malformed meta context request",
        );
        return;
    };
    if let Err(e) = st.open(registry, ctx, &req.name).await {
        rep_err(out, option, e.rep_error(), &e.to_string());
        return;
    }
    let mut selected = false;
    if req.queries.is_empty() {
        // LIST with no query lists everything; SET with none selects nothing.
        selected = !set;
    }
    for q in &req.queries {
        let Some((ns, leaf)) = q.split_once(':') else {
            rep_err(
                out,
                option,
                REP_ERR_INVALID,
                &format!("query {q:?} lacks a namespace"),
            );
            return;
        };
        // Unknown namespaces are ignored; "base:" lists (not selects) all.
        if ns == "base" && (leaf == "allocation" || (!set && leaf.is_empty())) {
            selected = true;
        }
    }
    if selected {
        let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
        encode_option_reply(
            out,
            option,
            REP_META_CONTEXT,
            &meta_context_payload(id, META_BASE_ALLOCATION),
        );
    }
    if set {
        st.meta = Some((req.name, selected));
    }
    encode_option_reply(out, option, REP_ACK, &[]);
}
