//! One connection of cachefront's own subscribed to one pub/sub channel, kept up for as long
//! as its task runs: how instances sharing a Valkey tell each other that a fill landed (see
//! `cache::fleet`).
//!
//! A message can be lost (the connection drops, Valkey restarts), so nothing may depend on
//! one arriving: every (re)subscription is reported as [`Heard::Subscribed`], after which a
//! listener should assume it missed something. In a cluster the connection goes to any one
//! node: Valkey Cluster forwards `PUBLISH` to every node.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use super::cluster::Cluster;
use super::conn::{connect, Endpoint, RawConn};
use crate::error::{Error, Result};
use crate::protocol::request::encode_multibulk;
use crate::protocol::Proto;

/// What the subscribed connection reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// (Re)subscribed: messages sent while it was down are lost.
    Subscribed,
    /// A message's payload.
    Message(Bytes),
}

/// Where the subscription connects.
pub enum Target {
    Single(Arc<Endpoint>),
    /// Any node of the cluster, as its map knows them now.
    Cluster(Arc<Cluster>),
}

impl Target {
    /// Where attempt number `attempt` connects: in a cluster, each attempt tries the next
    /// node, so a node that is down is not tried forever.
    fn endpoint(&self, attempt: usize) -> Option<Endpoint> {
        match self {
            Target::Single(ep) => Some((**ep).clone()),
            Target::Cluster(c) => {
                let nodes = c.nodes();
                let node = nodes.get(attempt % nodes.len().max(1))?;
                Some((*node.endpoint).clone())
            }
        }
    }
}

/// Keeps a subscription to `channel` up, reporting to `on` what it hears, until the task is
/// aborted. Reconnects with a backoff of up to 2 s.
pub async fn run(target: Target, channel: String, on: Arc<dyn Fn(Heard) + Send + Sync>) {
    let mut backoff = Duration::from_millis(50);
    for attempt in 0usize.. {
        let subscribed = match target.endpoint(attempt) {
            Some(ep) => subscribe(&ep, &channel).await,
            None => Err(Error::upstream("no cluster node known yet")),
        };
        match subscribed {
            Ok(mut conn) => {
                backoff = Duration::from_millis(50);
                on(Heard::Subscribed);
                loop {
                    match conn.read_frame().await {
                        Ok(frame) => {
                            if let Some(payload) = parse_message(&frame) {
                                on(Heard::Message(payload));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, channel = %channel, "subscription lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, channel = %channel, "subscription not available yet")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A connection subscribed to `channel`, once Valkey confirmed it.
async fn subscribe(ep: &Endpoint, channel: &str) -> Result<RawConn> {
    let mut conn = connect(ep, Proto::Resp2).await?;
    let request = encode_multibulk(&[
        Bytes::from_static(b"SUBSCRIBE"),
        Bytes::copy_from_slice(channel.as_bytes()),
    ]);
    conn.write_all(&request)
        .await
        .map_err(|e| Error::upstream(format!("subscribe failed: {e}")))?;
    let confirm = tokio::time::timeout(ep.command_timeout, conn.read_frame())
        .await
        .map_err(|_| Error::upstream("subscribe not confirmed in time"))??;
    if !confirm.starts_with(b"*3\r\n$9\r\nsubscribe") {
        return Err(Error::upstream("subscribe refused"));
    }
    Ok(conn)
}

/// The payload of `message <channel> <payload>`; anything else is ignored.
fn parse_message(frame: &[u8]) -> Option<Bytes> {
    use crate::protocol::value::{decode, Value};
    match decode(frame)?.into_array()?.as_slice() {
        [Value::Bytes(kind), _, Value::Bytes(payload)] if kind.as_slice() == b"message" => {
            Some(Bytes::copy_from_slice(payload))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_give_their_payload() {
        assert_eq!(
            parse_message(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$10\r\nemployee:1\r\n"),
            Some(Bytes::from_static(b"employee:1"))
        );
        assert_eq!(
            parse_message(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"),
            None
        );
        assert_eq!(parse_message(b"+OK\r\n"), None);
    }
}
