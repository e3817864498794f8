//! The auth exchange that opens every connection, after the banner and before any frame:
//!
//! ```text
//! client: len u32 LE | postcard basalt_auth::handshake::Authorizer      (≤ 64 KiB)
//! server: 0 | proof [32]                  accepted: HMAC(session key, nonce), proving the
//!                                         server opened the ticket (mutual authentication)
//!       | 1 | len u32 LE | reason (UTF-8) refused; the server closes the connection
//! ```
//!
//! The server checks the authorizer with its `basalt_auth::Guard` (the OSD's service
//! secrets; replayed or stale authorizers are refused), so every request the connection then
//! carries is from the ticket's entity with the ticket's caps.

use basalt_auth::handshake::Authorizer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::FrameError;

/// Largest authorizer accepted: a ticket is a few hundred bytes.
const MAX_AUTHORIZER: usize = 64 << 10;

pub(crate) async fn write_authorizer(
    s: &mut (impl AsyncWrite + Unpin),
    a: &Authorizer,
) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(a).map_err(std::io::Error::other)?;
    let mut out = (bytes.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&bytes);
    s.write_all(&out).await?;
    // Under TLS the bytes may wait in the session until flushed.
    s.flush().await
}

pub(crate) async fn read_authorizer(
    s: &mut (impl AsyncRead + Unpin),
) -> Result<Authorizer, FrameError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_AUTHORIZER {
        return Err(FrameError::Unauthenticated(format!(
            "a {len}-byte authorizer is larger than any ticket"
        )));
    }
    let mut bytes = vec![0u8; len];
    s.read_exact(&mut bytes).await?;
    postcard::from_bytes(&bytes)
        .map_err(|_| FrameError::Unauthenticated("the authorizer cannot be decoded".into()))
}

pub(crate) async fn write_verdict(
    s: &mut (impl AsyncWrite + Unpin),
    verdict: Result<&[u8; 32], &str>,
) -> std::io::Result<()> {
    let mut out = Vec::new();
    match verdict {
        Ok(proof) => {
            out.push(0);
            out.extend_from_slice(proof);
        }
        Err(why) => {
            out.push(1);
            out.extend_from_slice(&(why.len() as u32).to_le_bytes());
            out.extend_from_slice(why.as_bytes());
        }
    }
    s.write_all(&out).await?;
    s.flush().await
}

/// The server's verdict: its proof, or why it refused.
pub(crate) async fn read_verdict(
    s: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Result<[u8; 32], String>> {
    let mut status = [0u8; 1];
    s.read_exact(&mut status).await?;
    if status[0] == 0 {
        let mut proof = [0u8; 32];
        s.read_exact(&mut proof).await?;
        return Ok(Ok(proof));
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = (u32::from_le_bytes(len) as usize).min(MAX_AUTHORIZER);
    let mut why = vec![0u8; len];
    s.read_exact(&mut why).await?;
    Ok(Err(String::from_utf8_lossy(&why).into_owned()))
}
