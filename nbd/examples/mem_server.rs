//! Serves in-memory exports over NBD, for trying clients and benchmarking
//! the NBD layer alone.
//!
//! ```text
//! cargo run --release -p basalt-nbd --example mem_server -- [ADDR] [SIZE_MIB] [NAME...]
//! # defaults: 127.0.0.1:10809, 1024 MiB, one export "rbd/mem"
//! qemu-img info nbd://127.0.0.1:10809/rbd/mem
//! ```
//! Prints the bound address on stdout (use port 0 for any free port); stops
//! on Ctrl-C.

use std::sync::Arc;

use basalt_nbd::{Limits, MemExport, MemRegistry, NbdServer};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let size_mib: u64 = match args.next() {
        Some(s) => s.parse()?,
        None => 1024,
    };
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names.push("rbd/mem".into());
    }
    let registry = Arc::new(MemRegistry::new());
    for n in &names {
        registry.insert(n.clone(), Arc::new(MemExport::new(size_mib << 20)));
    }
    let listener = TcpListener::bind(&addr).await?;
    println!("{}", listener.local_addr()?);
    let server = NbdServer::new(registry, Limits::default());
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
