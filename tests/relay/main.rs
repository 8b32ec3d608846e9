//! End-to-end tests: SSE bytes from the emulated upstreams in, HTTP requests at a real webhook
//! sink out, all on 127.0.0.1 with ephemeral ports; and the binary run as a child process.

mod admin;
mod config;
mod delivery;
mod durability;
mod encoding;
mod faults;
mod logs;
mod operations;
mod process;
mod properties;
mod reload;
mod replicas;
mod rotated_secrets;
mod rotation;
mod secrets;
mod streams;
mod support;
mod templates;
mod tls;
