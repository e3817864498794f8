//! Metrics through the `metrics` facade (the daemon installs the exporter).

use metrics::{Counter, Histogram};

use crate::proto;

pub const REQUESTS_TOTAL: &str = "basalt_nbd_requests_total";
pub const REQUEST_ERRORS_TOTAL: &str = "basalt_nbd_request_errors_total";
pub const REQUEST_SECONDS: &str = "basalt_nbd_request_seconds";
pub const BYTES_TOTAL: &str = "basalt_nbd_bytes_total";
pub const CONNECTIONS: &str = "basalt_nbd_connections";
pub const CONNECTIONS_TOTAL: &str = "basalt_nbd_connections_total";
pub const PROTOCOL_ERRORS_TOTAL: &str = "basalt_nbd_protocol_errors_total";

/// Registers help text for every NBD metric. Call once at start-up, after
/// installing the recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "NBD requests handled, by export and op (read, write, flush, trim, cache, write_zeroes, block_status, unknown)"
    );
    describe_counter!(
        REQUEST_ERRORS_TOTAL,
        "NBD requests answered with an error, by export and op"
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time from having read an NBD request (and its payload) to its reply being queued, by export and op"
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Payload bytes moved by NBD reads (direction=read) and writes (direction=write), by export"
    );
    describe_gauge!(CONNECTIONS, "Open NBD client connections");
    describe_counter!(CONNECTIONS_TOTAL, "NBD client connections accepted");
    describe_counter!(
        PROTOCOL_ERRORS_TOTAL,
        "NBD connections closed because the client broke the protocol (bad magic, malformed option, oversized frame)"
    );
}

const OPS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "unknown",
];

fn op_index(typ: u16) -> usize {
    match typ {
        proto::CMD_READ => 0,
        proto::CMD_WRITE => 1,
        proto::CMD_FLUSH => 2,
        proto::CMD_TRIM => 3,
        proto::CMD_CACHE => 4,
        proto::CMD_WRITE_ZEROES => 5,
        proto::CMD_BLOCK_STATUS => 6,
        _ => 7,
    }
}

struct OpMetrics {
    requests: Counter,
    errors: Counter,
    seconds: Histogram,
}

/// Metric handles resolved once per connection, so the per-request cost
/// is an atomic add, not a registry lookup.
pub struct ConnMetrics {
    ops: Vec<OpMetrics>,
    bytes_read: Counter,
    bytes_written: Counter,
}

impl ConnMetrics {
    pub fn new(export: &str) -> Self {
        let ops = OPS
            .iter()
            .map(|op| {
                let labels = [("export", export.to_owned()), ("op", (*op).to_owned())];
                OpMetrics {
                    requests: metrics::counter!(REQUESTS_TOTAL, &labels),
                    errors: metrics::counter!(REQUEST_ERRORS_TOTAL, &labels),
                    seconds: metrics::histogram!(REQUEST_SECONDS, &labels),
                }
            })
            .collect();
        ConnMetrics {
            ops,
            bytes_read: metrics::counter!(BYTES_TOTAL, "export" => export.to_owned(), "direction" => "read"),
            bytes_written: metrics::counter!(BYTES_TOTAL, "export" => export.to_owned(), "direction" => "write"),
        }
    }

    pub fn record(&self, typ: u16, seconds: f64, ok: bool, read_bytes: u64, written_bytes: u64) {
        let m = &self.ops[op_index(typ)];
        m.requests.increment(1);
        m.seconds.record(seconds);
        if !ok {
            m.errors.increment(1);
        }
        if read_bytes > 0 {
            self.bytes_read.increment(read_bytes);
        }
        if written_bytes > 0 {
            self.bytes_written.increment(written_bytes);
        }
    }
}
