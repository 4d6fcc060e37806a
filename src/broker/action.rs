//! The decision about one delivery, as data: what `request::decide`
//! returns and `outcome::finish` carries out. Its own module so the
//! deciding and the publishing side both depend on it and not on each other.

use std::sync::Arc;

use super::reply::Encoded;
use crate::error::Failure;

/// What finishing a delivery requires, decided before anything is sent.
pub enum Action {
    /// Reply (when there is a `reply_to`); park the message first when
    /// `park` holds the reason.
    Answer {
        reply: Arc<Encoded>,
        park: Option<Failure>,
        /// Batches: the entries the parked copy keeps (those a replay
        /// should run), so a replay never re-runs finished entries.
        parked_entries: Option<Vec<usize>>,
    },
    /// Move to the hold queue of `database`, which is down: the request
    /// waits there (not failed, not parked) until it answers again.
    Hold {
        database: String,
        /// Batches: the results of entries already run, kept with the copy.
        batch_done: Option<String>,
        /// Until the request's deadline; a held copy past it goes back to
        /// the work queue and is answered EXPIRED.
        expires_in_ms: Option<i64>,
    },
    /// Republish to retry tier `tier` (1-based).
    Retry {
        tier: usize,
        failure: Failure,
        batch_done: Option<String>,
    },
}
