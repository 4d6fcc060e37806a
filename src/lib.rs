//! BEDS (Back End Data System): the AMQP door between applications and their
//! databases.
//!
//! The path of one message, module by module:
//! [`config`] → [`ipl`] → [`broker::dispatcher`] (consume, pause, drain) →
//! [`broker::request`] (with [`broker::payload`], [`broker::dedup`],
//! [`registry`] for templates and value validation, and [`namaste`] for the
//! NamasteCore adapters) → [`broker::outcome`] (reply, retry, park) → ack.
//! Errors of every layer become contract codes in [`error`]. Beside the
//! message path, [`service`] serves health, readiness, metrics and reload,
//! and speaks sd_notify.

pub mod admin;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod cmdline;
pub mod config;
pub mod dlq;
pub mod error;
pub mod ipl;
pub mod logger;
pub mod logging;
pub mod namaste;
pub mod registry;
pub mod service;
pub mod supervisor;
