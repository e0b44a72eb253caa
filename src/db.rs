//! Database access: connection pools, dedicated connections, and migrations.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool};

/// Why the database could not be reached or prepared. No message quotes the URL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL does not parse.
    #[error("the database URL is not valid: {0}")]
    Url(String),
    /// No connection.
    #[error(
        "cannot connect to the database: {0}; check DATABASE_URL and that PostgreSQL is running"
    )]
    Connect(String),
    /// A migration failed.
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

/// Pool options every pool of ours starts from: each new connection gets TCP_NODELAY.
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new().after_connect(|conn, _meta| Box::pin(set_nodelay(conn)))
}

/// A pool on the worker's database, migrated.
pub async fn connect(url: &SecretString, max_connections: u32) -> Result<PgPool, DbError> {
    let pool = pool_options()
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
    let mut conn = opts
        .connect()
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    set_nodelay(&mut conn)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    Ok(conn)
}

/// Turns off Nagle's algorithm on a connection's TCP socket, as libpq always does.
///
/// sqlx 0.9.0 connects without TCP_NODELAY (launchbadge/sqlx#4335; the fix, #4336, is merged
/// but not released). A write larger than one segment, such as a confirmation of a few hundred
/// results, then waits for the server's delayed ACK, many times the statement's own time
/// (BENCHMARKS.md has the figures). sqlx does not hand out its socket, so the socket is found among the process's open
/// files by the ports the server reports for this session. Over a Unix socket, or where the
/// server sees other ports (a proxy in between), nothing matches and nothing changes.
/// It is an optimisation: a server that cannot report the ports (a PostgreSQL-compatible
/// one without `inet_client_port()`) leaves the connection as it was. Only a lost connection
/// is an error. Remove this once sqlx sets TCP_NODELAY itself.
pub async fn set_nodelay(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (local, peer) = match tcp_ports(conn).await {
        Ok(Some(ports)) => ports,
        Ok(None) => return Ok(()),
        Err(sqlx::Error::Database(e)) => {
            tracing::debug!(error = %e, "cannot read the session's ports; Nagle's algorithm stays on");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if on_tcp_socket(local, peer, |s| s.set_tcp_nodelay(true)).is_none() {
        tracing::debug!(
            local_port = local,
            "TCP socket of a database connection not found; Nagle's algorithm stays on for it"
        );
    }
    Ok(())
}

/// Whether TCP_NODELAY is set on a connection's socket; None where it is not found (not TCP,
/// or behind a proxy).
pub async fn tcp_nodelay(conn: &mut PgConnection) -> Result<Option<bool>, sqlx::Error> {
    Ok(match tcp_ports(conn).await? {
        Some((local, peer)) => on_tcp_socket(local, peer, |s| s.tcp_nodelay()),
        None => None,
    })
}

/// The session's (client, server) TCP ports as the server sees them; None over a Unix socket.
async fn tcp_ports(conn: &mut PgConnection) -> Result<Option<(u16, u16)>, sqlx::Error> {
    let (client, server): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
            .fetch_one(conn)
            .await?;
    Ok(client
        .zip(server)
        .and_then(|(c, s)| Some((u16::try_from(c).ok()?, u16::try_from(s).ok()?))))
}

/// Runs `f` on this process's TCP socket with these local and peer ports; None if there is
/// none, `f` failed, or the platform has no `/proc/self/fd` or `pidfd_getfd` (Linux 5.6; a
/// seccomp profile may refuse it, and then nothing changes).
///
/// Each candidate is looked at through a duplicate of its descriptor that this function owns
/// (`pidfd_getfd` on our own process), never through a borrowed raw number: a descriptor closed
/// meanwhile cannot be misused, and one reused meanwhile is only acted on if its ports match
/// too. Socket options set on the duplicate apply to the socket itself.
#[cfg(target_os = "linux")]
fn on_tcp_socket<T>(
    local: u16,
    peer: u16,
    f: impl FnOnce(socket2::SockRef<'_>) -> std::io::Result<T>,
) -> Option<T> {
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
    let port = |a: std::io::Result<socket2::SockAddr>| {
        a.ok().and_then(|a| a.as_socket()).map(|a| a.port())
    };
    let me = pidfd_open(getpid(), PidfdFlags::empty()).ok()?;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let sock = socket2::SockRef::from(&dup);
        if port(sock.local_addr()) == Some(local) && port(sock.peer_addr()) == Some(peer) {
            return f(sock).ok();
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn on_tcp_socket<T>(
    _local: u16,
    _peer: u16,
    _f: impl FnOnce(socket2::SockRef<'_>) -> std::io::Result<T>,
) -> Option<T> {
    None
}
