//! Logging, metrics set-up and the shutdown signal shared by every basalt daemon: `tracing` to
//! stderr (text or JSON, filtered by `RUST_LOG`) and a Prometheus `/metrics`
//! endpoint with histogram buckets, so latencies aggregate across daemons.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags every daemon takes.
#[derive(Clone, Debug, clap::Args)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Latency buckets in seconds: 50 µs .. 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Initialises logging and, if asked, the metrics endpoint. Call inside a tokio runtime.
pub fn init(args: &TelemetryArgs, default_filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))?;
    if let Some(addr) = args.metrics {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .context("invalid metrics buckets")?
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}; is the address free?"))?;
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C, the signals every daemon stops cleanly on; never, if the
/// SIGTERM handler cannot be installed (a daemon must not stop on its own).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
