//! Integration tests against real `redis-server` 7.0 and `valkey-server` 9.1 processes.
//! One test binary (one link step); each test starts its own server(s) through `harness`.

mod harness;

mod application_user;
mod cluster;
mod commands;
mod differential;
mod docs_examples;
mod drain;
mod ecosystem;
mod enforcement;
mod faults;
mod hardening;
mod lifecycle;
mod notices;
mod operations;
mod self_request;
