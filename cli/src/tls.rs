//! `basalt tls ca|issue`: the cluster CA and the certificates it signs, offline (no cluster
//! needed), for hosts `basalt cluster up` does not set up (deploy/README.md), and the
//! certificates `cluster up` makes for its own daemons.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use basalt_tls::gen::{write_nbd_dir, CertificateAuthority, NbdEnd, CA_CERT, CA_KEY};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum TlsCmd {
    /// Create a cluster CA: DIR/ca-cert.pem (copy it to every host) and DIR/ca-key.pem (keep
    /// it where certificates are made). Refuses to replace an existing CA.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "basalt cluster CA")]
        name: String,
    },
    /// Sign a certificate for NAME (e.g. `mon.a`, `osd.3`, `host1`, `client.vm1`) with the CA
    /// in --ca-dir. Daemons: --cert/--key, with an --addr for every IP address or DNS name
    /// peers dial. NBD: --nbd-server DIR (a gateway's `--nbd-tls-dir`) or --nbd-client DIR
    /// (QEMU's `tls-creds-x509 dir=`, libnbd's `tls-certificates=`); the CN is NAME, which the
    /// gateway's `--nbd-access` rules name.
    Issue {
        name: String,
        #[arg(long)]
        ca_dir: PathBuf,
        /// An IP address or DNS name the certificate is valid for as a server (repeatable).
        #[arg(long = "addr")]
        addrs: Vec<String>,
        #[arg(long, requires = "key", conflicts_with_all = ["nbd_server", "nbd_client"])]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        #[arg(long, conflicts_with = "nbd_client")]
        nbd_server: Option<PathBuf>,
        #[arg(long)]
        nbd_client: Option<PathBuf>,
    },
}

pub fn run(cmd: TlsCmd) -> anyhow::Result<()> {
    match cmd {
        TlsCmd::Ca { dir, name } => {
            if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
                bail!(
                    "{} already holds a CA; certificates it signed would stop verifying if it \
                     were replaced (remove it first if that is what you want)",
                    dir.display()
                );
            }
            CertificateAuthority::generate(&name)?.write(&dir)?;
            println!(
                "created {} and {} (mode 0600)",
                dir.join(CA_CERT).display(),
                dir.join(CA_KEY).display()
            );
            Ok(())
        }
        TlsCmd::Issue {
            name,
            ca_dir,
            addrs,
            cert,
            key,
            nbd_server,
            nbd_client,
        } => {
            let ca = CertificateAuthority::load(&ca_dir).with_context(|| {
                format!(
                    "cannot load the CA from {} (create one with `basalt tls ca --dir DIR`)",
                    ca_dir.display()
                )
            })?;
            let issued = ca.issue(&name, &addrs)?;
            match (cert, key, nbd_server, nbd_client) {
                (Some(c), Some(k), None, None) => {
                    issued.write(&c, &k)?;
                    println!("wrote {} and {} (mode 0600)", c.display(), k.display());
                }
                (None, None, Some(d), None) => {
                    write_nbd_dir(&d, ca.cert_pem(), &issued, NbdEnd::Server)?;
                    println!("wrote the NBD server directory {}", d.display());
                }
                (None, None, None, Some(d)) => {
                    write_nbd_dir(&d, ca.cert_pem(), &issued, NbdEnd::Client)?;
                    println!("wrote the NBD client directory {}", d.display());
                }
                _ => bail!("say where the certificate goes: --cert FILE --key FILE, --nbd-server DIR or --nbd-client DIR"),
            }
            Ok(())
        }
    }
}

/// What `basalt cluster up` makes under DIR/tls, each only if missing (so a restart keeps
/// them): the CA; `NAME-cert.pem`/`NAME-key.pem` for each monitor and OSD (NAME as its pid
/// file, valid for 127.0.0.1 and localhost); `gwN/` (the gateways' NBD server directories);
/// `client.admin/` (an NBD client directory for QEMU and libnbd, CN `client.admin`).
pub fn cluster_certificates(tls: &Path, daemons: &[String], gateways: u32) -> anyhow::Result<()> {
    let ca = if tls.join(CA_CERT).exists() {
        CertificateAuthority::load(tls)?
    } else {
        let ca = CertificateAuthority::generate("basalt cluster CA")?;
        ca.write(tls)?;
        eprintln!("created the cluster CA {}", tls.join(CA_CERT).display());
        ca
    };
    let local = ["127.0.0.1".to_string(), "localhost".to_string()];
    for name in daemons {
        let (cert, key) = daemon_cert_paths(tls, name);
        if !cert.exists() || !key.exists() {
            ca.issue(name, &local)?.write(&cert, &key)?;
        }
    }
    for g in 0..gateways {
        let dir = tls.join(format!("gw{g}"));
        if !dir.join(basalt_tls::gen::SERVER_CERT).exists() {
            let issued = ca.issue(&format!("client.gw{g}"), &local)?;
            write_nbd_dir(&dir, ca.cert_pem(), &issued, NbdEnd::Server)?;
        }
    }
    let admin = tls.join("client.admin");
    if !admin.join(basalt_tls::gen::CLIENT_CERT).exists() {
        let issued = ca.issue("client.admin", &[])?;
        write_nbd_dir(&admin, ca.cert_pem(), &issued, NbdEnd::Client)?;
    }
    Ok(())
}

/// Where `cluster up` keeps a monitor's or an OSD's certificate and key.
pub fn daemon_cert_paths(tls: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        tls.join(format!("{name}-cert.pem")),
        tls.join(format!("{name}-key.pem")),
    )
}
