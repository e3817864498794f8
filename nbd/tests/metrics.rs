//! Metrics reach a real Prometheus recorder, and `handle_connection` works
//! on its own (without `serve`).

mod common;

use std::sync::Arc;

use basalt_nbd::proto::*;
use basalt_nbd::{describe_metrics, Limits, MemExport, MemRegistry, NbdServer};
use common::*;
use tokio::net::TcpListener;

async fn metrics_are_recorded_body() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("install recorder");
    describe_metrics();

    let reg = Arc::new(MemRegistry::new());
    reg.insert("rbd/m", Arc::new(MemExport::new(1 << 20)));
    let server = NbdServer::new(reg, Limits::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            let (stream, _) = listener.accept().await.unwrap();
            server.handle_connection(stream).await
        }
    });

    let (mut c, _) = Raw::open(addr, "rbd/m", false).await;
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[9u8; 4096]).await;
    assert_eq!(c.simple(0).await.unwrap().1, 0);
    c.request(CMD_READ, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.simple(4096).await.unwrap().2, vec![9u8; 4096]);
    c.request(CMD_READ, 0, 3, 1 << 20, 4096, &[]).await;
    assert_eq!(c.simple(0).await.unwrap().1, EINVAL);
    let text = handle.render();
    c.request(CMD_DISC, 0, 4, 0, 0, &[]).await;
    assert!(c.closed().await);
    accept.await.unwrap().expect("clean connection end");

    for needle in [
        "# HELP basalt_nbd_requests_total",
        "basalt_nbd_requests_total{export=\"rbd/m\",op=\"read\"} 2",
        "basalt_nbd_requests_total{export=\"rbd/m\",op=\"write\"} 1",
        "basalt_nbd_request_errors_total{export=\"rbd/m\",op=\"read\"} 1",
        "basalt_nbd_bytes_total{export=\"rbd/m\",direction=\"read\"} 4096",
        "basalt_nbd_bytes_total{export=\"rbd/m\",direction=\"write\"} 4096",
        "basalt_nbd_request_seconds",
        "basalt_nbd_connections 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(handle.render().contains("basalt_nbd_connections 0"));
}

bounded_tests! {
    metrics_are_recorded => metrics_are_recorded_body,
}
