//! The reply side of the wire contract (CONTRACT §3). The same struct is
//! what the dispatcher serializes and what `beds::client` parses.

use serde::{Deserialize, Serialize};

use crate::error::Failure;
use crate::namaste::{Outcome, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub status: Status,
    pub event_id: String,
    /// Always an array on success (empty when no rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Row>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Batches: one reply per entry, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<Reply>>,
}

impl Reply {
    pub fn ok(event_id: String, out: Outcome, elapsed_us: u64) -> Reply {
        Reply {
            status: Status::Ok,
            event_id,
            data: Some(out.rows),
            affected: Some(out.affected),
            elapsed_us: Some(elapsed_us),
            error: None,
            results: None,
        }
    }

    pub fn error(event_id: String, f: &Failure) -> Reply {
        Reply {
            status: Status::Error,
            event_id,
            data: None,
            affected: None,
            elapsed_us: None,
            error: Some(ErrorBody {
                code: f.code.as_str().to_string(),
                message: f.message.clone(),
                retryable: f.retryable,
            }),
            results: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// The error code, when this is an error reply.
    pub fn code(&self) -> Option<&str> {
        self.error.as_ref().map(|e| e.code.as_str())
    }
}

/// A reply as serialized for the wire, with its event id (for the
/// `x-beds-event-id` header) so nobody has to parse it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub event_id: String,
    pub body: Vec<u8>,
    /// Set when this answer is remembered for an unknown-outcome write: a
    /// duplicate gets the same answer and is parked too, never re-run.
    pub park_again: Option<crate::error::Failure>,
    /// With `park_again` on a batch: the entries its parked copy kept.
    pub parked_entries: Option<Vec<usize>>,
    /// What the event log keeps of it, taken before serializing.
    pub outline: Outline,
}

/// What the event log keeps of a reply: its status, error code and message,
/// and the same for each batch entry. Never the data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outline {
    pub ok: bool,
    pub code: Option<String>,
    pub message: Option<String>,
    pub entries: Vec<Outline>,
}

impl Outline {
    pub fn of(r: &Reply) -> Outline {
        Outline {
            ok: r.is_ok(),
            code: r.error.as_ref().map(|e| e.code.clone()),
            message: r.error.as_ref().map(|e| e.message.clone()),
            entries: r.results.iter().flatten().map(Outline::of).collect(),
        }
    }

    /// From a serialized reply (a repeat answered from the inbox); the data
    /// is skipped, not kept.
    pub fn parse(body: &[u8]) -> Outline {
        #[derive(Deserialize)]
        struct Wire {
            status: Status,
            #[serde(default)]
            error: Option<ErrorBody>,
            #[serde(default)]
            results: Option<Vec<Wire>>,
        }
        fn of(w: Wire) -> Outline {
            Outline {
                ok: w.status == Status::Ok,
                code: w.error.as_ref().map(|e| e.code.clone()),
                message: w.error.map(|e| e.message),
                entries: w.results.into_iter().flatten().map(of).collect(),
            }
        }
        serde_json::from_slice::<Wire>(body)
            .map(of)
            .unwrap_or_default()
    }
}
