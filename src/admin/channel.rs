//! What every long-lived admin task does with its AMQP channel: open it,
//! take the next delivery, and start over after a loss, each yielding to
//! the node's stop (a half-open connection must not hold a stop up).

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Channel;
use tokio_util::sync::CancellationToken;

use crate::broker::AmqpLink;
use crate::supervisor::Backoff;

/// Runs `serve` until it returns `Ok` or `stop`, starting it over with
/// jittered backoff after each error.
pub async fn forever<F, Fut>(what: &str, stop: &CancellationToken, serve: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let mut backoff = Backoff::default();
    while !stop.is_cancelled() {
        match serve().await {
            Ok(()) => return,
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, ?wait, "admin: {what} lost; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// A channel of the node's link; `None` when the node stops first.
pub async fn open(
    link: &AmqpLink,
    stop: &CancellationToken,
) -> Result<Option<Channel>, lapin::Error> {
    tokio::select! {
        _ = stop.cancelled() => Ok(None),
        c = link.channel() => c.map(Some),
    }
}

/// A consumer of `queue` with a server-made tag.
pub async fn consume(
    ch: &Channel,
    queue: &str,
    no_ack: bool,
) -> Result<lapin::Consumer, lapin::Error> {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// The next delivery; `None` when the node stops first, an error when the
/// consumer failed or ended.
pub async fn next(
    stop: &CancellationToken,
    consumer: &mut lapin::Consumer,
) -> Result<Option<Delivery>, lapin::Error> {
    tokio::select! {
        _ = stop.cancelled() => Ok(None),
        d = consumer.next() => match d {
            Some(d) => d.map(Some),
            None => Err(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "consumer ended").into()),
        },
    }
}
