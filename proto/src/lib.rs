//! gRPC wire contracts of basalt, generated from `proto/*.proto`.
//!
//! Owns the service and envelope definitions, how every endpoint's HTTP/2 transport is
//! tuned ([`transport`]), how an authorizer rides each request ([`auth`]) and how a failure's
//! kind rides each error status ([`status`]); the cluster
//! maps carried inside them are encoded by `basalt-maps`.

pub mod auth;
pub mod data_path;
pub mod status;
pub mod transport;

#[allow(clippy::all, missing_docs)]
pub mod mon {
    tonic::include_proto!("basalt.mon");
}

#[allow(clippy::all, missing_docs)]
pub mod osd {
    tonic::include_proto!("basalt.osd");
}
