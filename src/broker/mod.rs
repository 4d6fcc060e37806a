//! Everything AMQP: the connection (`AmqpLink`), the topology of CONTRACT §1,
//! and the dispatchers that consume the broker queues.

pub mod action;
pub mod control;
pub mod dedup;
pub mod dispatcher;
pub mod headers;
pub mod inbox;
pub mod outcome;
pub mod payload;
pub mod reply;
pub mod request;
pub mod shared;
pub mod topology;

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::config::TlsConfig;

/// The node's AMQP connection. Dispatchers take one channel each from it; if
/// the connection drops, the next `channel()` call reconnects.
pub struct AmqpLink {
    /// Contains the password: never log it.
    uri: String,
    /// Shown in the RabbitMQ management UI.
    name: String,
    timeout: Duration,
    /// `[amqp.tls]`: the CA and client certificate files, read at each
    /// connect (a renewed certificate is picked up on reconnect).
    tls: TlsConfig,
    conn: Mutex<Option<Connection>>,
}

impl AmqpLink {
    pub async fn connect(
        uri: String,
        name: String,
        timeout: Duration,
        tls: TlsConfig,
    ) -> Result<AmqpLink, lapin::Error> {
        let link = AmqpLink {
            uri,
            name,
            timeout,
            tls,
            conn: Mutex::new(None),
        };
        link.connection().await?;
        Ok(link)
    }

    async fn open(&self) -> Result<Connection, lapin::Error> {
        let props = tokio_properties().with_connection_name(self.name.clone().into());
        let connect = async {
            let tls = tls_config(&self.tls)?;
            Connection::connect_with_config(
                &self.uri,
                props,
                tls,
                lapin::runtime::default_runtime()?,
            )
            .await
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no AMQP handshake within {:?}", self.timeout),
            )
            .into()),
        }
    }

    /// Ensures a live connection (reconnecting if needed).
    async fn connection(&self) -> Result<(), lapin::Error> {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.status().connected()) {
            return Ok(());
        }
        *guard = Some(self.open().await?);
        Ok(())
    }

    /// A fresh channel on the live connection.
    pub async fn channel(&self) -> Result<Channel, lapin::Error> {
        self.connection().await?;
        let guard = self.conn.lock().await;
        match guard.as_ref() {
            Some(c) => c.create_channel().await,
            None => {
                Err(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed).into())
            }
        }
    }

    /// Whether the connection is open now (readiness). Waits while a
    /// reconnect is under way.
    pub async fn is_connected(&self) -> bool {
        self.conn
            .lock()
            .await
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close(200, "BEDS shutting down".into()).await;
        }
    }
}

/// Closes of links dropped while open (a failed IPL drops its link);
/// [`closing_links`] waits for them.
static CLOSING: std::sync::LazyLock<tokio_util::task::TaskTracker> =
    std::sync::LazyLock::new(tokio_util::task::TaskTracker::new);

impl Drop for AmqpLink {
    /// lapin only queues the close of a dropped connection on the runtime:
    /// if the runtime ends first, the close is never sent and lapin's I/O
    /// thread is left on a socket whose reactor is shutting down. So the
    /// close runs as a task [`closing_links`] can wait for.
    fn drop(&mut self) {
        let Some(c) = self.conn.get_mut().take() else {
            return;
        };
        if !c.status().connected() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let limit = self.timeout;
            CLOSING.spawn_on(
                async move {
                    let close = c.close(200, "BEDS shutting down".into());
                    let _ = tokio::time::timeout(limit, close).await;
                },
                &rt,
            );
        }
    }
}

/// Waits (at most `limit`) until every link dropped while open is closed;
/// the binary calls it before its runtime ends.
pub async fn closing_links(limit: Duration) {
    CLOSING.close();
    let _ = tokio::time::timeout(limit, CLOSING.wait()).await;
}

/// lapin's TLS settings from `[amqp.tls]`: the CA added to the public
/// roots, and the client certificate and key (PEM) for mutual TLS. Unused
/// for an `amqp://` URI.
pub fn tls_config(tls: &TlsConfig) -> Result<OwnedTLSConfig, lapin::Error> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            lapin::Error::from(std::io::Error::new(
                e.kind(),
                format!("amqp.tls: {}: {e}", p.display()),
            ))
        })
    };
    let mut out = OwnedTLSConfig::default();
    if !tls.enabled {
        return Ok(out);
    }
    if let Some(ca) = &tls.ca_file {
        out.cert_chain = Some(String::from_utf8_lossy(&read(ca)?).into_owned());
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        out.identity = Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        });
    }
    Ok(out)
}

/// Connection properties for every BEDS connection. lapin runs on Tokio
/// through its `tokio` feature. Its automatic recovery stays off: BEDS's
/// dispatchers reconnect themselves (wiki/06), so a delivery is acked only on
/// the channel that carried it and every dispatcher redeclares its topology.
pub fn tokio_properties() -> ConnectionProperties {
    ConnectionProperties::default()
}

/// Why a publish did not end with RabbitMQ responsible for the message.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("no queue took the message ({0})")]
    Unroutable(String),
}

/// Publishes and waits for the broker's confirm: a message is only "sent"
/// once RabbitMQ has taken responsibility for it. With `mandatory`, a
/// message no queue takes (its queue was deleted) is an error, not a
/// silently confirmed loss.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Result<(), PublishError> {
    let opts = BasicPublishOptions {
        mandatory,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(exchange.into(), routing_key.into(), opts, body, props)
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(Some(ret)) => Err(PublishError::Unroutable(format!(
            "{} {}",
            ret.reply_code, ret.reply_text
        ))),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
    }
}
