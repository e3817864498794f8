//! NBD_OPT_STARTTLS over raw sockets: TLS-required refusals, the upgrade, the option state
//! reset after it, and LIST/GO filtered by the client certificate's name.

mod common;

use std::path::Path;
use std::sync::Arc;

use basalt_nbd::proto::*;
use basalt_nbd::{ExportRules, Limits, MemExport, MemRegistry, NbdServer, NbdTls, Security};
use basalt_tls::gen::{write_nbd_dir, CertificateAuthority, NbdEnd};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA with an NBD server directory and two client directories (CN client.a, client.b).
fn pki(dir: &Path) {
    let ca = CertificateAuthority::generate("nbd test CA").expect("CA");
    let server = ca.issue("gw", &["127.0.0.1".into()]).expect("server");
    write_nbd_dir(&dir.join("server"), ca.cert_pem(), &server, NbdEnd::Server).expect("server");
    for cn in ["client.a", "client.b"] {
        let c = ca.issue(cn, &[]).expect("client");
        write_nbd_dir(&dir.join(cn), ca.cert_pem(), &c, NbdEnd::Client).expect("client");
    }
}

async fn serve(security: Security) -> std::net::SocketAddr {
    let reg = MemRegistry::new();
    for name in ["rbd/a1", "rbd/b1", "vms/x"] {
        reg.insert(name, Arc::new(MemExport::new(1 << 20)));
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = NbdServer::with_security(Arc::new(reg), Limits::default(), security);
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    addr
}

fn tls_security(dir: &Path, required: bool, rules: Option<ExportRules>) -> Security {
    Security {
        tls: Some(NbdTls {
            config: basalt_tls::nbd_server_config(&dir.join("server")).expect("config"),
            required,
            client_name: basalt_tls::common_name,
        }),
        access: rules.map(|r| Arc::new(r) as Arc<dyn basalt_nbd::ExportAccess>),
    }
}

/// One option's replies, read from any stream.
async fn replies<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 20];
        tokio::time::timeout(T, s.read_exact(&mut h))
            .await
            .expect("reply in time")
            .expect("reply");
        let typ = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.expect("data");
        let end = typ == REP_ACK || typ & (1 << 31) != 0;
        out.push((typ, data));
        if end {
            return out;
        }
    }
}

async fn option<S: AsyncWriteExt + AsyncReadExt + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Vec<(u32, Vec<u8>)> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.expect("send");
    s.flush().await.expect("flush");
    replies(s).await
}

/// LIST's names.
fn names(r: &[(u32, Vec<u8>)]) -> Vec<String> {
    r.iter()
        .filter(|(t, _)| *t == REP_SERVER)
        .map(|(_, d)| String::from_utf8_lossy(&d[4..]).into_owned())
        .collect()
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Upgrades a raw connection after STARTTLS's ACK, with the client directory `client`
/// (certificate optional).
async fn upgrade(raw: Raw, dir: &Path, client: Option<&str>) -> basalt_tls::Stream {
    let (ca, identity) = match client {
        Some(cn) => (
            dir.join(cn).join("ca-cert.pem"),
            Some((
                dir.join(cn).join("client-cert.pem"),
                dir.join(cn).join("client-key.pem"),
            )),
        ),
        None => (dir.join("server").join("ca-cert.pem"), None),
    };
    let connector = basalt_tls::Connector::tls(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .expect("connector");
    let addr = raw.s.peer_addr().expect("peer").to_string();
    connector.wrap(&addr, raw.s).await.expect("TLS handshake")
}

#[tokio::test]
async fn a_tls_only_server_refuses_everything_before_starttls() {
    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    let addr = serve(tls_security(dir.path(), true, None)).await;

    let mut raw = Raw::negotiating(addr).await;
    for opt in [OPT_LIST, OPT_GO, OPT_INFO, OPT_STRUCTURED_REPLY] {
        let payload = if opt == OPT_LIST || opt == OPT_STRUCTURED_REPLY {
            Vec::new()
        } else {
            go_payload("rbd/a1")
        };
        let r = option(&mut raw.s, opt, &payload).await;
        assert_eq!(r.len(), 1, "{opt}: {r:?}");
        assert_eq!(r[0].0, REP_ERR_TLS_REQD, "option {opt}");
    }
    // EXPORT_NAME has no error reply: the server closes.
    raw.send_option(OPT_EXPORT_NAME, b"rbd/a1").await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(T, raw.s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing served before STARTTLS");

    // STARTTLS with data is invalid; without, acknowledged; then everything works inside.
    let mut raw = Raw::negotiating(addr).await;
    let r = option(&mut raw.s, OPT_STARTTLS, b"x").await;
    assert_eq!(r[0].0, REP_ERR_INVALID);
    let r = option(&mut raw.s, OPT_STARTTLS, &[]).await;
    assert_eq!(r, vec![(REP_ACK, Vec::new())]);
    let mut tls = upgrade(raw, dir.path(), None).await;
    let r = option(&mut tls, OPT_LIST, &[]).await;
    assert_eq!(names(&r), ["rbd/a1", "rbd/b1", "vms/x"]);
    let r = option(&mut tls, OPT_STARTTLS, &[]).await;
    assert_eq!(r[0].0, REP_ERR_INVALID, "TLS is already on");
    let r = option(&mut tls, OPT_GO, &go_payload("rbd/a1")).await;
    assert_eq!(r.last().map(|x| x.0), Some(REP_ACK));
}

#[tokio::test]
async fn starttls_is_unsupported_without_certificates_and_optional_serves_plain_text() {
    let addr = serve(Security::default()).await;
    let mut raw = Raw::negotiating(addr).await;
    let r = option(&mut raw.s, OPT_STARTTLS, &[]).await;
    assert_eq!(r[0].0, REP_ERR_UNSUP);

    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    let addr = serve(tls_security(dir.path(), false, None)).await;
    let mut raw = Raw::negotiating(addr).await;
    let r = option(&mut raw.s, OPT_LIST, &[]).await;
    assert_eq!(names(&r).len(), 3, "optional TLS serves plain text");
    // Structured replies negotiated in plain text do not survive the upgrade (the spec
    // resets the state): meta contexts inside TLS need STRUCTURED_REPLY again.
    let r = option(&mut raw.s, OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(r[0].0, REP_ACK);
    let r = option(&mut raw.s, OPT_STARTTLS, &[]).await;
    assert_eq!(r[0].0, REP_ACK);
    let mut tls = upgrade(raw, dir.path(), None).await;
    let mut q = go_payload("rbd/a1");
    q.truncate(4 + 6);
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    q.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    let r = option(&mut tls, OPT_SET_META_CONTEXT, &q).await;
    assert_eq!(r[0].0, REP_ERR_INVALID, "{r:?}");
}

#[tokio::test]
async fn list_and_go_follow_the_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    pki(dir.path());
    let mut rules = ExportRules::new();
    rules
        .allow("client.a", ["rbd/a1".to_string(), "vms/*".to_string()])
        .expect("rule");
    let addr = serve(tls_security(dir.path(), true, Some(rules))).await;

    let session = |client: Option<&'static str>| {
        let dir = dir.path().to_path_buf();
        async move {
            let mut raw = Raw::negotiating(addr).await;
            let r = option(&mut raw.s, OPT_STARTTLS, &[]).await;
            assert_eq!(r[0].0, REP_ACK);
            upgrade(raw, &dir, client).await
        }
    };
    let mut a = session(Some("client.a")).await;
    let r = option(&mut a, OPT_LIST, &[]).await;
    assert_eq!(names(&r), ["rbd/a1", "vms/x"]);
    let r = option(&mut a, OPT_INFO, &go_payload("rbd/b1")).await;
    assert_eq!(r[0].0, REP_ERR_POLICY, "client.a may not open rbd/b1");
    let r = option(&mut a, OPT_GO, &go_payload("rbd/a1")).await;
    assert_eq!(r.last().map(|x| x.0), Some(REP_ACK));

    // A certificate without a rule, and no certificate at all: nothing.
    for client in [Some("client.b"), None] {
        let mut s = session(client).await;
        let r = option(&mut s, OPT_LIST, &[]).await;
        assert!(names(&r).is_empty(), "{client:?} sees {r:?}");
        let r = option(&mut s, OPT_GO, &go_payload("rbd/a1")).await;
        assert_eq!(r[0].0, REP_ERR_POLICY);
    }
}
