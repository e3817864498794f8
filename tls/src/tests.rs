use std::os::unix::fs::PermissionsExt;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::gen::{CertificateAuthority, CA_CERT, CA_KEY};
use super::*;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::generate("basalt test CA").expect("CA");
        ca.write(dir.path()).expect("write CA");
        let issued = ca
            .issue("osd.0", &["127.0.0.1".into(), "localhost".into()])
            .expect("issue");
        issued
            .write(&dir.path().join("osd.pem"), &dir.path().join("osd.key"))
            .expect("write");
        Pki { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn acceptor(&self) -> Acceptor {
        Acceptor::tls(&self.path("osd.pem"), &self.path("osd.key")).expect("acceptor")
    }
    fn connector(&self) -> Connector {
        Connector::tls(&self.path(CA_CERT), None).expect("connector")
    }
}

/// An echo server on 127.0.0.1 accepting through `acceptor`; returns its address.
async fn echo(acceptor: Acceptor) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                    let _ = s.flush().await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tls_round_trip_verifies_the_server_against_the_ca() {
    let pki = Pki::new();
    let addr = echo(pki.acceptor()).await;
    let mut s = pki.connector().connect(&addr).await.expect("handshake");
    assert!(s.is_tls());
    s.write_all(b"hello").await.expect("write");
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.expect("read");
    assert_eq!(&b, b"hello");

    // Another CA's client refuses the server.
    let other = Pki::new();
    let e = other
        .connector()
        .connect(&addr)
        .await
        .expect_err("unknown issuer");
    assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
}

#[tokio::test]
async fn a_certificate_must_name_the_address_dialed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("basalt test CA").expect("CA");
    ca.write(dir.path()).expect("write CA");
    ca.issue("osd.9", &["10.9.9.9".into()])
        .expect("issue")
        .write(&dir.path().join("c.pem"), &dir.path().join("k.pem"))
        .expect("write");
    let acceptor =
        Acceptor::tls(&dir.path().join("c.pem"), &dir.path().join("k.pem")).expect("acc");
    let addr = echo(acceptor).await;
    let connector = Connector::tls(&dir.path().join(CA_CERT), None).expect("conn");
    let e = connector.connect(&addr).await.expect_err("wrong address");
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
async fn plain_text_and_tls_ends_refuse_each_other_clearly() {
    let pki = Pki::new();
    let tls_addr = echo(pki.acceptor()).await;
    let mut plain = Connector::plain().connect(&tls_addr).await.expect("tcp");
    plain.write_all(b"BASALTM1").await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(answer, PLAIN_TEXT_REFUSAL);

    // A plain-text server that speaks first (as a messenger answering a banner would).
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let plain_addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"BASALTM1 plain text here\n").await;
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        }
    });
    let e = pki
        .connector()
        .connect(&plain_addr)
        .await
        .expect_err("not TLS");
    assert!(matches!(e, TlsError::NotTls { .. }), "{e}");
}

#[tokio::test]
async fn first_byte_is_returned_again_by_the_next_read() {
    let pki = Pki::new();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let acceptor = pki.acceptor();
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.expect("accept");
        let mut s = acceptor.accept(tcp).await.expect("handshake");
        assert_eq!(s.first_byte().await.expect("peek"), Some(b'x'));
        assert_eq!(s.first_byte().await.expect("peek"), Some(b'x'));
        let (mut r, _w) = s.into_split();
        let mut b = [0u8; 3];
        r.read_exact(&mut b).await.expect("read");
        b
    });
    let mut c = pki.connector().connect(&addr).await.expect("connect");
    c.write_all(b"xyz").await.expect("write");
    c.flush().await.expect("flush");
    assert_eq!(&server.await.expect("server"), b"xyz");
}

#[test]
fn keys_are_private_and_the_ca_signs_again_after_a_reload() {
    let pki = Pki::new();
    for key in [CA_KEY, "osd.key"] {
        let mode = std::fs::metadata(pki.path(key))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let ca = CertificateAuthority::load(pki.dir.path()).expect("reload");
    let issued = ca.issue("client.admin", &[]).expect("issue");
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
    assert_eq!(common_name(der.as_ref()).as_deref(), Some("client.admin"));
    // The reloaded CA's certificates verify against the original CA file.
    let roots = files::root_store(&pki.path(CA_CERT)).expect("roots");
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier");
    let now = rustls::pki_types::UnixTime::now();
    verifier
        .verify_client_cert(&der, &[], now)
        .expect("signed by the same CA");
}

#[test]
fn server_names_come_from_the_address() {
    assert!(matches!(
        server_name("127.0.0.1:6789"),
        Ok(ServerName::IpAddress(_))
    ));
    assert!(matches!(
        server_name("[::1]:6789"),
        Ok(ServerName::IpAddress(_))
    ));
    assert!(matches!(
        server_name("mon-a:6789"),
        Ok(ServerName::DnsName(_))
    ));
    assert!(server_name("bad name:1").is_err());
}

#[test]
fn common_name_survives_garbage() {
    assert_eq!(common_name(&[]), None);
    assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(common_name(&[0x30, 0x03, 0x30, 0x01]), None);
}
