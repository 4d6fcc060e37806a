//! The durable inbox, dispatcher side (wiki/14-delivery-guarantees.md): which
//! answers are kept for repeats of a write with a `message_id`, how they are
//! stored, and how a repeat is answered from one. The records live in the
//! database the write goes to, committed with it by the adapter
//! ([`crate::namaste::NamasteCore::call_once`]); the in-process
//! [`super::dedup`] memory stays in front as a cache.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::action::Action;
use super::reply::Encoded;
use crate::error::Failure;
use crate::namaste::{Adapters, InboxKey};

/// The in-process dedup key and the inbox key of a request. The body is
/// part of both: another request reusing the id is not a repeat.
pub(crate) fn keys(user: Option<&str>, message_id: &str, body: &[u8]) -> (String, InboxKey) {
    let dedup = format!(
        "{}\u{0}{}\u{0}{}",
        user.unwrap_or(""),
        message_id,
        hex::encode(Sha256::digest(body))
    );
    let inbox = InboxKey {
        id: hex::encode(Sha256::digest(dedup.as_bytes())),
        message_id: message_id.to_string(),
    };
    (dedup, inbox)
}

/// What a repeat must get of this answer, if it is kept: the reply, and how
/// it was parked. Not kept: a retry or a hold (the request has not
/// finished), nor an answer parked after its retries ran out (a replay from
/// the DLQ runs again).
pub(crate) fn kept(action: &Action) -> Option<Arc<Encoded>> {
    let Action::Answer {
        reply,
        park,
        parked_entries,
    } = action
    else {
        return None;
    };
    match park {
        None => Some(reply.clone()),
        Some(f) if f.retryable => None,
        Some(f) => Some(Arc::new(Encoded {
            park_again: Some(f.clone()),
            parked_entries: parked_entries.clone(),
            ..(**reply).clone()
        })),
    }
}

/// A kept answer as the inbox stores it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    event_id: String,
    /// The reply body (JSON text, as it went on the wire).
    reply: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    park: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parked_entries: Option<Vec<usize>>,
}

/// The record to store for `action`, when it is kept.
pub(crate) fn record(action: &Action) -> Option<String> {
    let kept = kept(action)?;
    serde_json::to_string(&Record {
        event_id: kept.event_id.clone(),
        reply: String::from_utf8_lossy(&kept.body).into_owned(),
        park: kept.park_again.clone(),
        parked_entries: kept.parked_entries.clone(),
    })
    .ok()
}

/// The first execution's answer, from its record.
pub(crate) fn answer_from(record: &str) -> Result<Arc<Encoded>, String> {
    let r: Record =
        serde_json::from_str(record).map_err(|e| format!("unreadable inbox record: {e}"))?;
    Ok(Arc::new(Encoded {
        outline: super::reply::Outline::parse(r.reply.as_bytes()),
        event_id: r.event_id,
        body: r.reply.into_bytes(),
        park_again: r.park,
        parked_entries: r.parked_entries,
    }))
}

/// Most records one purge call removes: small steps keep its locks short.
const PURGE_BATCH: u32 = 1_000;

/// Removes records older than `retention` from every database with an
/// inbox: once a minute, in small steps, off the request path.
pub async fn purge(adapters: Adapters, retention: Duration, stop: CancellationToken) {
    let every = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for (name, a) in adapters.iter().filter(|(_, a)| a.inbox()) {
            if !a.health().is_up() {
                continue;
            }
            let mut total = 0;
            // Until a step removes less than a full batch.
            while !stop.is_cancelled() {
                match a.purge_inbox(retention, PURGE_BATCH).await {
                    Ok(n) => {
                        total += n;
                        if n < u64::from(PURGE_BATCH) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(database = %name, error = %e, "inbox purge failed; next try in a minute");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if total > 0 {
                tracing::debug!(database = %name, purged = total, "inbox records past retention removed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn a_parked_answer_survives_the_record() {
        let f = Failure {
            park: true,
            ..Failure::new(ErrorCode::Internal, "outcome unknown")
        };
        let action = Action::Answer {
            reply: Arc::new(Encoded {
                event_id: "e1".into(),
                body: br#"{"status":"error"}"#.to_vec(),
                park_again: None,
                parked_entries: None,
                outline: Default::default(),
            }),
            park: Some(f.clone()),
            parked_entries: Some(vec![2]),
        };
        let back = answer_from(&record(&action).unwrap()).unwrap();
        assert_eq!(back.event_id, "e1");
        assert_eq!(back.body, br#"{"status":"error"}"#);
        assert_eq!(back.park_again, Some(f));
        assert_eq!(back.parked_entries, Some(vec![2]));
    }

    #[test]
    fn keys_differ_by_caller_id_and_body() {
        let (a, ka) = keys(Some("u"), "m", b"x");
        let (b, kb) = keys(Some("v"), "m", b"x");
        let (_, kc) = keys(Some("u"), "m", b"y");
        assert_ne!(a, b);
        assert_ne!(ka.id, kb.id);
        assert_ne!(ka.id, kc.id);
        assert_eq!(ka.id.len(), 64);
        assert_eq!(keys(Some("u"), "m", b"x").1.id, ka.id);
    }
}
