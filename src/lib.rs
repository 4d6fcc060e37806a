//! BEDS (Back End Data System): the AMQP door between applications and their
//! databases.
//!
//! The path of one message, module by module:
//! [`config`] → [`ipl`] → [`broker::dispatcher`] (with [`broker::payload`],
//! [`broker::dedup`]) → [`registry`] (templates, value validation) →
//! [`namaste`] (NamasteCore adapters) → [`broker::reply`]; errors of every
//! layer become contract codes in [`error`].

pub mod broker;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod ipl;
pub mod logging;
pub mod namaste;
pub mod registry;
pub mod shutdown;
