//! Database access: connection pools, dedicated connections, and migrations.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the database URL is not valid: {0}")]
    Url(String),
    #[error(
        "cannot connect to the database: {0}; check DATABASE_URL and that PostgreSQL is running"
    )]
    Connect(String),
    #[error("cannot apply database migrations: {0}")]
    Migrate(String),
}

/// Parses a URL, keeping sqlx's statement logging quiet (queries can be long).
pub fn options(url: &SecretString) -> Result<PgConnectOptions, DbError> {
    // Never echo the URL: it may hold a password.
    let opts = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|e| DbError::Url(redact_url_error(&e.to_string(), url)))?;
    Ok(opts
        .application_name("audience-sync")
        .disable_statement_logging())
}

fn redact_url_error(msg: &str, url: &SecretString) -> String {
    msg.replace(url.expose_secret(), "[url]")
}

/// A pool on the worker's database, migrated.
pub async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect_with(options(url)?)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    Ok(pool)
}

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the migrations in `migrations/` (embedded at build time).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| DbError::Migrate(e.to_string()))
}

/// A connection of its own (not pooled): closing it releases its advisory locks and
/// temporary tables, even if the process dies.
pub async fn dedicated(opts: &PgConnectOptions) -> Result<PgConnection, DbError> {
    opts.connect()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))
}
