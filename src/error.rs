//! The contract's error vocabulary (CONTRACT §3) and the one place where each
//! layer's error enum is mapped to it.
//!
//! Every layer (payload parsing, template registry, value validation,
//! NamasteCore adapters) has its own `thiserror` enum that says what went
//! wrong in that layer's terms. The dispatcher never matches on those enums;
//! it asks for a [`Failure`], which carries the stable code a client sees.

use serde::{Deserialize, Serialize};

use crate::broker::payload::PayloadError;
use crate::namaste::AdapterError;
use crate::registry::RequestError;

/// The stable error codes of CONTRACT §3. The strings are part of the wire
/// contract: never rename them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadPayload,
    UnknownTemplate,
    UnknownOperation,
    WrongBroker,
    Validation,
    Forbidden,
    Conflict,
    NotFound,
    Unavailable,
    Expired,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadPayload => "BAD_PAYLOAD",
            ErrorCode::UnknownTemplate => "UNKNOWN_TEMPLATE",
            ErrorCode::UnknownOperation => "UNKNOWN_OPERATION",
            ErrorCode::WrongBroker => "WRONG_BROKER",
            ErrorCode::Validation => "VALIDATION",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Expired => "EXPIRED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl ErrorCode {
    /// All codes, for parsing and tests.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadPayload,
        ErrorCode::UnknownTemplate,
        ErrorCode::UnknownOperation,
        ErrorCode::WrongBroker,
        ErrorCode::Validation,
        ErrorCode::Forbidden,
        ErrorCode::Conflict,
        ErrorCode::NotFound,
        ErrorCode::Unavailable,
        ErrorCode::Expired,
        ErrorCode::Internal,
    ];

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request's failure looks like on the wire, plus how the dispatcher
/// must treat it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: ErrorCode,
    /// Human-readable, safe to show a client: never SQL text of ours, a
    /// stack trace or a credential.
    pub message: String,
    /// True when the same request may succeed later (database or network
    /// trouble). Retryable failures go through the retry tiers.
    pub retryable: bool,
    /// Park the request in the DLQ even though it is answered: an operator
    /// must look at it (e.g. a write whose outcome is unknown).
    pub park: bool,
}

/// Longest message a failure carries. Messages echo client input (names,
/// keys) and travel in AMQP headers of parked copies, which must fit one
/// frame.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: clip(message.into(), MAX_MESSAGE_BYTES),
            retryable: false,
            park: false,
        }
    }
}

impl From<&PayloadError> for Failure {
    fn from(e: &PayloadError) -> Self {
        let code = match e {
            PayloadError::Expired { .. } => ErrorCode::Expired,
            _ => ErrorCode::BadPayload,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<&RequestError> for Failure {
    fn from(e: &RequestError) -> Self {
        let code = match e {
            RequestError::UnknownTemplate(_) => ErrorCode::UnknownTemplate,
            RequestError::UnknownOperation { .. } => ErrorCode::UnknownOperation,
            RequestError::WrongBroker { .. } | RequestError::TemplateElsewhere { .. } => {
                ErrorCode::WrongBroker
            }
            RequestError::Forbidden { .. } => ErrorCode::Forbidden,
            RequestError::Validation(_) => ErrorCode::Validation,
            RequestError::AtomicBatch(_) => ErrorCode::Validation,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<&AdapterError> for Failure {
    fn from(e: &AdapterError) -> Self {
        // Pausing on an outage is the adapter's own business (its Health);
        // here only the client-visible code and retryability matter.
        let (code, retryable, park) = match e {
            AdapterError::Unreachable(_) | AdapterError::Transient(_) => {
                (ErrorCode::Unavailable, true, false)
            }
            AdapterError::Conflict(_) => (ErrorCode::Conflict, false, false),
            AdapterError::NotFound => (ErrorCode::NotFound, false, false),
            AdapterError::Invalid(_) => (ErrorCode::Validation, false, false),
            AdapterError::Indeterminate(_) => (ErrorCode::Internal, false, true),
            AdapterError::Rejected(_) | AdapterError::Internal(_) => {
                (ErrorCode::Internal, false, false)
            }
        };
        Failure {
            code,
            message: clip(e.to_string(), MAX_MESSAGE_BYTES),
            retryable,
            park,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_contract_strings() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
    }
}
