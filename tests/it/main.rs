//! Integration tests: one binary, real PostgreSQL (a fresh database per test via
//! `#[sqlx::test]`), and a local wiremock server standing in for Wigzo.
mod support;

mod bad_input;
mod budget;
mod chaos;
mod cli;
mod daemon;
mod delivery;
mod edges;
mod guard;
mod ops;
mod props;
mod sync;
mod traits;
mod upgrade;
