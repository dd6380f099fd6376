//! Valkey's client-side caching, for cachefront's own in-process L1.
//!
//! One connection of cachefront's own subscribes to `__redis__:invalidate`. The shared
//! connections turn on `CLIENT TRACKING … REDIRECT <that connection> OPTIN`, and a cached
//! command's lookup is sent as `CLIENT CACHING yes` + `GET key` on the client's usual shared
//! connection — so only cachefront's lookups are tracked, and each still reaches Valkey in
//! the client's order. Valkey then reports every later change of those keys on the
//! subscribed connection.
//!
//! The tracking *generation* names the subscribed connection currently in use (0: none). A
//! shared connection re-points its tracking when the generation changes; whenever it does,
//! or the subscribed connection is lost, the L1 is flushed whole.

use bytes::Bytes;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::conn::{connect, Endpoint};
use crate::protocol::Proto;

/// What the tracking connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackingEvent {
    /// These keys changed.
    Keys(Vec<Bytes>),
    /// Anything may have changed (tracking restarted or lost, FLUSHALL, table overflow).
    Flush,
}

/// Shared between the tracking actor and the shared connections.
#[derive(Debug, Default)]
pub struct TrackingState {
    generation: AtomicU64,
    redirect: AtomicI64,
    /// Source of fresh, never reused, non-zero generations.
    counter: AtomicU64,
}

impl TrackingState {
    /// The current generation and the Valkey id to redirect to; generation 0 means down.
    pub fn current(&self) -> (u64, i64) {
        (
            self.generation.load(Ordering::Acquire),
            self.redirect.load(Ordering::Acquire),
        )
    }

    fn up(&self, redirect: i64) {
        self.redirect.store(redirect, Ordering::Release);
        let next = self.counter.fetch_add(1, Ordering::AcqRel) + 1;
        self.generation.store(next, Ordering::Release);
    }

    fn down(&self) {
        self.generation.store(0, Ordering::Release);
    }
}

/// Keeps the tracking connection up for as long as the process runs.
pub async fn run(
    ep: Arc<Endpoint>,
    state: Arc<TrackingState>,
    on_event: Arc<dyn Fn(TrackingEvent) + Send + Sync>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match subscribe(&ep).await {
            Ok(mut conn) => {
                backoff = Duration::from_millis(50);
                state.up(conn.upstream_id);
                on_event(TrackingEvent::Flush);
                loop {
                    match conn.read_frame().await {
                        Ok(frame) => {
                            if let Some(ev) = parse_invalidation(&frame) {
                                on_event(ev);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "tracking connection lost; L1 flushed");
                            break;
                        }
                    }
                }
                state.down();
                on_event(TrackingEvent::Flush);
            }
            Err(e) => tracing::debug!(error = %e, "tracking connection not available yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn subscribe(ep: &Endpoint) -> crate::error::Result<super::RawConn> {
    let mut conn = connect(ep, Proto::Resp2).await?;
    conn.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$20\r\n__redis__:invalidate\r\n")
        .await
        .map_err(|e| crate::error::Error::upstream(format!("tracking subscribe failed: {e}")))?;
    let confirm = conn.read_frame().await?;
    if !confirm.starts_with(b"*3\r\n$9\r\nsubscribe") {
        return Err(crate::error::Error::upstream("tracking subscribe refused"));
    }
    Ok(conn)
}

/// `message __redis__:invalidate [keys…]` (or a null payload: flush everything).
fn parse_invalidation(frame: &[u8]) -> Option<TrackingEvent> {
    use crate::protocol::value::{decode, Value};
    match decode(frame)?.into_array()?.as_slice() {
        [Value::Bytes(kind), _, payload] if kind.as_slice() == b"message" => match payload {
            Value::Array(keys) => Some(TrackingEvent::Keys(
                keys.iter()
                    .filter_map(|k| k.bytes().map(Bytes::copy_from_slice))
                    .collect(),
            )),
            Value::Nil => Some(TrackingEvent::Flush),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_messages() {
        assert_eq!(
            parse_invalidation(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            Some(TrackingEvent::Keys(vec![Bytes::from("a"), Bytes::from("b")]))
        );
        assert_eq!(
            parse_invalidation(b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*-1\r\n"),
            Some(TrackingEvent::Flush)
        );
        assert_eq!(parse_invalidation(b"+OK\r\n"), None);
    }
}
