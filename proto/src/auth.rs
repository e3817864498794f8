//! How authentication rides gRPC: every request to a monitor or an OSD carries a fresh
//! authorizer (`basalt_auth::handshake::Authorizer`, postcard) in the binary metadata entry
//! [`AUTHORIZER_KEY`]. Clients add it with [`Authorize`] (an interceptor on the channel);
//! services check it with [`Verify`] (an interceptor on the server), which refuses a
//! request without a valid one (`Unauthenticated`, nothing runs) and hands the handler the
//! peer ([`Authenticated`]) in the request's extensions, read with [`peer`].
//!
//! Each request's authorizer is new (timestamp + random nonce), so the service's replay
//! memory refuses a recorded request sent again. The service's proof back to the client is
//! on the data path's messenger and in the monitors' handshake; on gRPC the client relies on
//! having authenticated the monitors in the handshake (TLS, issue 20 part B, authenticates
//! the server's end of each connection).

use std::sync::Arc;

use basalt_auth::handshake::Authorizer;
use basalt_auth::{Authenticated, Guard, PermissionDenied, TicketCell};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The gRPC metadata entry holding the authorizer.
pub const AUTHORIZER_KEY: &str = "x-basalt-auth-bin";

/// A channel whose every request carries an authorizer for one service.
pub type AuthChannel = InterceptedService<Channel, Authorize>;

/// Adds a fresh authorizer from the held ticket to each request. Without a ticket (not yet
/// authenticated) the request goes without, and the service refuses it.
#[derive(Clone)]
pub struct Authorize(pub Arc<TicketCell>);

impl Interceptor for Authorize {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some((authorizer, _)) = self.0.authorizer() else {
            return Err(crate::status::unauthenticated(
                "not authenticated yet: no ticket from the monitors (is the keyring right, and do the monitors have quorum?)",
            ));
        };
        let bytes = postcard::to_stdvec(&authorizer)
            .map_err(|e| crate::status::internal(format!("cannot encode the authorizer: {e}")))?;
        request
            .metadata_mut()
            .insert_bin(AUTHORIZER_KEY, MetadataValue::from_bytes(&bytes));
        Ok(request)
    }
}

/// `channel` with every request carrying an authorizer from `ticket`.
pub fn authorized(channel: Channel, ticket: Arc<TicketCell>) -> AuthChannel {
    InterceptedService::new(channel, Authorize(ticket))
}

/// Checks each request's authorizer against the service's secrets; a request without a
/// valid one is refused before its handler runs.
#[derive(Clone)]
pub struct Verify(pub Arc<Guard>);

impl Interceptor for Verify {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(value) = request.metadata().get_bin(AUTHORIZER_KEY) else {
            return Err(crate::status::unauthenticated(
                "no authorizer: this cluster requires authentication; pass a keyring (--keyring) holding a key the monitors know",
            ));
        };
        let bytes = value
            .to_bytes()
            .map_err(|_| crate::status::unauthenticated("the authorizer is not valid base64"))?;
        let authorizer: Authorizer = postcard::from_bytes(&bytes)
            .map_err(|_| crate::status::unauthenticated("the authorizer cannot be decoded"))?;
        let (peer, _proof) = self
            .0
            .verify(&authorizer)
            .map_err(|e| crate::status::unauthenticated(format!("authentication refused: {e}")))?;
        request.extensions_mut().insert(Arc::new(peer));
        Ok(request)
    }
}

/// The authenticated peer of a request that passed [`Verify`].
pub fn peer<T>(request: &Request<T>) -> Result<Arc<Authenticated>, Status> {
    request
        .extensions()
        .get::<Arc<Authenticated>>()
        .cloned()
        .ok_or_else(|| crate::status::unauthenticated("the request was not authenticated"))
}

/// A refused request as gRPC reports it: `PermissionDenied`, the text naming the missing cap.
pub fn denied(e: PermissionDenied) -> Status {
    crate::status::permission_denied(e.to_string())
}
