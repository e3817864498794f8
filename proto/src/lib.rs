//! gRPC wire contracts of basalt, generated from `proto/*.proto`.
//!
//! Owns only the service and envelope definitions; the cluster maps carried
//! inside them are encoded by `basalt-maps`.

#[allow(clippy::all, missing_docs)]
pub mod mon {
    tonic::include_proto!("basalt.mon");
}

#[allow(clippy::all, missing_docs)]
pub mod osd {
    tonic::include_proto!("basalt.osd");
}
