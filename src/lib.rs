//! sse-relay: holds Server-Sent-Events streams open and POSTs their events to webhooks.
//!
//! The path of an event is the architecture: [`source`] (stream) → [`classify`] → [`routing`]
//! → [`queue`] → [`delivery`]. [`app`] wires them; ARCHITECTURE.md has the map and invariants.

pub mod admin;
pub mod app;
pub mod check;
pub mod classify;
pub mod cluster;
pub mod config;
pub(crate) mod dedup;
pub mod delivery;
pub mod dlq;
pub mod event;
pub mod queue;
pub mod retry_after;
pub mod route_test;
pub mod routing;
pub(crate) mod secret_headers;
pub mod signing;
pub mod source;
pub mod telemetry;
pub(crate) mod tls;
pub mod transport;
mod yaml;
