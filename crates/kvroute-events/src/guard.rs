//! A relay between kvroute's ZMQ sockets and one pod's, that reads the frame lengths the pod
//! announces and cuts the connection at the first one above a limit.
//!
//! The `zeromq` crate reserves whatever length a frame header announces before the bytes
//! arrive: a pod (or anything listening on its events port) that announces a 1 TiB frame
//! made kvroute abort ("memory allocation of 1099511693321 bytes failed"). The crate has no
//! option to bound it, so kvroute's sockets connect to this relay on 127.0.0.1 instead, and
//! the relay forwards the pod's bytes only after checking each frame header (ZMTP 3: a
//! 64-byte greeting, then frames of a flags byte, a 1- or 8-byte length and the body).
//! What kvroute sends goes through untouched. A cut connection looks to the socket like the
//! pod going away: it reconnects with its own backoff, and the subscriber's sequence checks
//! decide what to trust.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Frames above this are refused unless configured otherwise: far above any batch of KV
/// events vLLM publishes (a 64 KiB-token prompt stored at once is ~1 MiB of msgpack).
pub const DEFAULT_MAX_FRAME_BYTES: u64 = 64 << 20;

/// How long the relay waits to reach the pod.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// ZMTP 3's greeting length.
const GREETING: usize = 64;

/// A frame announced a length above the limit.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the peer announced a {len}-byte ZMQ frame, over the {max}-byte limit")]
pub struct FrameTooLarge {
    /// What it announced.
    pub len: u64,
    /// The limit.
    pub max: u64,
}

/// Where the reader is in the peer's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Greeting bytes still to skip.
    Greeting(usize),
    /// The next byte is a frame's flags.
    Header,
    /// Length bytes read so far (8 of them for a long frame, 1 for a short one).
    Length { long: bool, read: u8, value: u64 },
    /// Body bytes still to skip.
    Body(u64),
}

/// Follows ZMTP framing over a byte stream fed in arbitrary pieces, checking each length.
#[derive(Debug)]
pub(crate) struct FrameScanner {
    state: State,
    max: u64,
}

impl FrameScanner {
    /// A scanner expecting a greeting first.
    pub(crate) fn new(max: u64) -> Self {
        Self {
            state: State::Greeting(GREETING),
            max,
        }
    }

    /// Reads `bytes`, the next piece of the stream; an error means the stream must be cut
    /// before these bytes are passed on.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameTooLarge> {
        while !bytes.is_empty() {
            self.state = match self.state {
                State::Greeting(left) => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    if left == n {
                        State::Header
                    } else {
                        State::Greeting(left - n)
                    }
                }
                State::Header => {
                    let flags = bytes[0];
                    bytes = &bytes[1..];
                    State::Length {
                        long: flags & 0b10 != 0,
                        read: 0,
                        value: 0,
                    }
                }
                State::Length { long, read, value } => {
                    let value = (value << 8) | u64::from(bytes[0]);
                    bytes = &bytes[1..];
                    let read = read + 1;
                    if read < if long { 8 } else { 1 } {
                        State::Length { long, read, value }
                    } else if value > self.max {
                        return Err(FrameTooLarge {
                            len: value,
                            max: self.max,
                        });
                    } else if value == 0 {
                        State::Header
                    } else {
                        State::Body(value)
                    }
                }
                State::Body(left) => {
                    let n = usize::try_from(left).map_or(bytes.len(), |l| l.min(bytes.len()));
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    if left == 0 {
                        State::Header
                    } else {
                        State::Body(left)
                    }
                }
            };
        }
        Ok(())
    }
}

/// Starts a relay to `target` on an ephemeral 127.0.0.1 port, until `stop`; returns that
/// port's address. `oversized` is called for each connection cut for a frame too large.
pub(crate) async fn start(
    target: SocketAddr,
    max_frame: u64,
    oversized: impl Fn() + Send + Sync + 'static,
    stop: CancellationToken,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let local = listener.local_addr()?;
    let oversized = std::sync::Arc::new(oversized);
    tokio::spawn(async move {
        let mut relays = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                Some(_) = relays.join_next(), if !relays.is_empty() => continue,
                a = listener.accept() => a,
            };
            let inner = match accepted {
                Ok((inner, _)) => inner,
                Err(e) => {
                    debug!(error = %e, "KV-event relay accept failed");
                    continue;
                }
            };
            let oversized = std::sync::Arc::clone(&oversized);
            relays.spawn(async move {
                match relay(inner, target, max_frame).await {
                    Ok(()) => {}
                    Err(RelayError::TooLarge(e)) => {
                        warn!(%target, error = %e, "KV-event connection cut");
                        oversized();
                    }
                    Err(RelayError::Io(e)) => debug!(%target, error = %e, "KV-event relay ended"),
                }
            });
        }
        relays.abort_all();
    });
    Ok(local)
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    TooLarge(#[from] FrameTooLarge),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Carries one connection both ways until either side ends, checking the pod's frames.
async fn relay(inner: TcpStream, target: SocketAddr, max: u64) -> Result<(), RelayError> {
    let outer = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to the pod"))??;
    let (mut inner_read, mut inner_write) = inner.into_split();
    let (mut outer_read, mut outer_write) = outer.into_split();
    let up = async {
        tokio::io::copy(&mut inner_read, &mut outer_write).await?;
        outer_write.shutdown().await?;
        Ok::<(), RelayError>(())
    };
    let down = async {
        let mut scanner = FrameScanner::new(max);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = outer_read.read(&mut buf).await?;
            if n == 0 {
                inner_write.shutdown().await?;
                return Ok::<(), RelayError>(());
            }
            scanner.feed(&buf[..n])?;
            inner_write.write_all(&buf[..n]).await?;
        }
    };
    // Either side ending ends both: the other half is dropped, closing its connection.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(body: &[u8], long: bool) -> Vec<u8> {
        let mut out = vec![if long { 0b10 } else { 0 }];
        if long {
            out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            out.push(u8::try_from(body.len()).unwrap());
        }
        out.extend_from_slice(body);
        out
    }

    fn stream(frames: &[(Vec<u8>, bool)]) -> Vec<u8> {
        let mut out = vec![0xff; GREETING];
        for (body, long) in frames {
            out.extend(frame(body, *long));
        }
        out
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_its_length_is_passed_on() {
        let mut s = FrameScanner::new(1 << 20);
        let mut bytes = vec![0xff; GREETING];
        bytes.push(0b10);
        bytes.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            s.feed(&bytes),
            Err(FrameTooLarge {
                len: 1 << 40,
                max: 1 << 20
            })
        );
    }

    proptest! {
        /// Whatever the pieces the stream arrives in, frames within the limit pass and the
        /// first one over it is refused.
        #[test]
        fn any_split_reads_the_same(
            sizes in proptest::collection::vec((0usize..600, any::<bool>()), 0..8),
            cuts in proptest::collection::vec(1usize..97, 1..20),
            max in 0u64..700,
        ) {
            let frames: Vec<(Vec<u8>, bool)> = sizes
                .iter()
                .map(|&(n, long)| (vec![7u8; n], long || n > 255))
                .collect();
            let bytes = stream(&frames);
            let want_ok = frames.iter().all(|(b, _)| b.len() as u64 <= max);
            let mut s = FrameScanner::new(max);
            let mut at = 0;
            let mut ok = true;
            for c in cuts.iter().cycle() {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + c).min(bytes.len());
                if s.feed(&bytes[at..end]).is_err() {
                    ok = false;
                    break;
                }
                at = end;
            }
            prop_assert_eq!(ok, want_ok);
            if ok {
                prop_assert_eq!(s.state, State::Header);
            }
        }
    }
}
