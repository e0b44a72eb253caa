#![forbid(unsafe_code)]
#![warn(missing_docs)]
//! audience-sync: keeps Wigzo in step with audience membership computed by SQL queries.
//!
//! Data path: [`audience`] (definitions) -> [`snapshot`] (capture) -> [`diff`] -> [`outbox`]
//! -> [`delivery`] -> [`wigzo`] (client). [`sync`] runs that path for one audience; [`guard`]
//! holds a run whose diff would remove most of an audience before anything is written;
//! [`budget`] is the rate and 429 pause every run of the process shares.
pub mod audience;
pub mod budget;
pub mod cli;
pub mod config;
pub mod db;
pub mod delivery;
pub mod demo;
pub mod diff;
pub mod guard;
pub mod lock;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod run;
pub mod scheduler;
pub mod snapshot;
pub mod sql;
pub mod status;
pub mod sync;
pub mod telemetry;
pub mod wigzo;
