//! Runs a private, throwaway PostgreSQL cluster (initdb + pg_ctl in a temp folder, Unix socket only) for `audience-sync demo` and tests.
//!
//! The cluster listens on no TCP port: clients reach it through a Unix socket in
//! its own temp folder, so it cannot clash with a server already running on the
//! machine. It is tuned for speed over durability (`fsync=off` and friends),
//! which is fine because everything is deleted when the value is dropped.
//!
//! PostgreSQL refuses to run as root; when this process is root, `initdb` and
//! `pg_ctl` are run as the `postgres` system user through `runuser` (or `su`).
//!
//! Why not the `pgtemp` crate (read at its current source): it also listens on a TCP port
//! (random, so it can clash), runs `initdb`/`postgres` from `PATH` (Debian installs them under
//! `/usr/lib/postgresql/<version>/bin`, which is not on it), needs `sudo` when root (minimal
//! images have `runuser` but not `sudo`: the machine CI runs on, as root, has no `sudo`, so
//! pgtemp could not start a cluster there at all), shells out to `createdb`, and panics
//! instead of returning errors. Each of those would break `demo` on a fresh Debian machine,
//! which this module handles.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::Command as TokioCommand;

/// The port number only names the socket file (`.s.PGSQL.<port>`); with
/// `listen_addresses=''` nothing listens on TCP, so a fixed value is safe.
const PORT: u16 = 5432;
/// How long `pg_ctl` may wait for the server to accept connections or stop.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Unix socket paths are limited to 107 bytes on Linux; keep a margin.
const MAX_SOCKET_PATH: usize = 100;
/// The system user the server runs as when this process is root.
const PG_SYSTEM_USER: &str = "postgres";

/// Why a throwaway cluster could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error(
        "PostgreSQL server programs (initdb, pg_ctl) not found; looked in {searched}. \
         Install PostgreSQL (e.g. `apt-get install postgresql`) or set DATABASE_URL to an existing server"
    )]
    /// PostgreSQL's server programs are not installed.
    NotInstalled {
        /// Where they were looked for.
        searched: String,
    },

    #[error(
        "running as root, but there is no `{user}` system user to run PostgreSQL as \
         (PostgreSQL refuses to run as root); run as a normal user, create the user \
         (e.g. by installing the `postgresql` package), or set DATABASE_URL"
    )]
    /// Running as root with no system user to run PostgreSQL as.
    NoPostgresUser {
        /// The system user looked for.
        user: String,
    },

    /// A program could not be started.
    #[error("could not run `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },

    /// initdb failed.
    #[error("initdb failed ({status}) in {data_dir}:\n{output}")]
    InitdbFailed {
        /// The cluster's folder.
        data_dir: PathBuf,
        /// initdb's exit status.
        status: String,
        /// What it printed.
        output: String,
    },

    #[error(
        "PostgreSQL did not start ({reason}); pg_ctl said:\n{output}\nserver log ({log_file}):\n{log}"
    )]
    /// The server did not start.
    StartFailed {
        /// Why it is taken as failed.
        reason: String,
        /// What pg_ctl printed.
        output: String,
        /// The server's log file.
        log_file: PathBuf,
        /// Its last lines.
        log: String,
    },

    /// The server did not stop.
    #[error("pg_ctl stop failed ({status}):\n{output}")]
    StopFailed {
        /// pg_ctl's exit status.
        status: String,
        /// What it printed.
        output: String,
    },

    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A running throwaway PostgreSQL cluster. Dropping it stops the server and
/// deletes its folder, unless [`EmbeddedPostgres::keep`] was called.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    /// The temp folder holding everything: `data/`, the socket, `log`.
    base_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    /// `Some(user)` when commands must run as another user (we are root).
    run_as: Option<String>,
    /// The server was started, so it must be stopped.
    running: bool,
    /// Nothing left to do on drop (stopped already, or kept on purpose).
    done: bool,
}

impl EmbeddedPostgres {
    /// Finds initdb/pg_ctl (PATH first, then /usr/lib/postgresql/*/bin picking the highest version,
    /// then /usr/local/pgsql/bin), creates a temp folder, runs initdb (auth trust, UTF8, -U postgres),
    /// starts the server listening on a Unix socket only (listen_addresses='', unix_socket_directories=<tempdir>),
    /// waits until it accepts connections (poll with a deadline, no fixed sleeps), creates nothing else.
    pub async fn start() -> Result<Self, EmbeddedPgError> {
        let started_at = Instant::now();
        let bin_dir = find_bin_dir(&candidate_bin_dirs())?;
        let run_as = if is_root() {
            if !system_user_exists(PG_SYSTEM_USER) {
                return Err(EmbeddedPgError::NoPostgresUser {
                    user: PG_SYSTEM_USER.to_owned(),
                });
            }
            Some(PG_SYSTEM_USER.to_owned())
        } else {
            None
        };

        let base_dir = create_base_dir(run_as.is_some())?;
        // From here on, dropping `pg` removes the folder (and stops the
        // server once `running` is set), so every early return cleans up.
        let mut pg = EmbeddedPostgres {
            data_dir: base_dir.join("data"),
            log_file: base_dir.join("log"),
            base_dir,
            bin_dir,
            run_as,
            running: false,
            done: false,
        };
        if let Some(user) = &pg.run_as {
            chown_recursive(&pg.base_dir, user).await?;
        }
        tracing::debug!(
            base_dir = %pg.base_dir.display(),
            bin_dir = %pg.bin_dir.display(),
            run_as = pg.run_as.as_deref().unwrap_or("-"),
            "creating embedded PostgreSQL cluster"
        );

        pg.initdb().await?;
        let initdb_ms = started_at.elapsed().as_millis();
        pg.pg_ctl_start().await?;
        pg.running = true;

        tracing::info!(
            data_dir = %pg.data_dir.display(),
            socket_dir = %pg.base_dir.display(),
            initdb_ms,
            total_ms = started_at.elapsed().as_millis(),
            "embedded PostgreSQL started"
        );
        Ok(pg)
    }

    /// A sqlx-compatible URL, e.g. postgres://postgres@localhost/postgres?host=/tmp/xyz  (socket dir as host param)
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost:{PORT}/postgres?host={}",
            percent_encode_path(&self.base_dir)
        )
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Keep the cluster after drop (for `demo --keep`): returns human instructions (psql command, DATABASE_URL) and does not remove it.
    pub fn keep(mut self) -> String {
        self.done = true;
        let as_user = match &self.run_as {
            Some(user) => format!("runuser -u {user} -- "),
            None => String::new(),
        };
        let mut text = String::new();
        let _ = writeln!(
            text,
            "The PostgreSQL cluster is still running in {}",
            self.base_dir.display()
        );
        let _ = writeln!(
            text,
            "  connect:  psql -h {} -p {PORT} -U postgres postgres",
            shell_quote(self.base_dir.as_os_str())
        );
        let _ = writeln!(text, "  export DATABASE_URL='{}'", self.url());
        let _ = writeln!(
            text,
            "  stop and remove it:  {as_user}{} -D {} stop -m fast && rm -rf {}",
            shell_quote(self.bin_dir.join("pg_ctl").as_os_str()),
            shell_quote(self.data_dir.as_os_str()),
            shell_quote(self.base_dir.as_os_str())
        );
        tracing::info!(base_dir = %self.base_dir.display(), "keeping embedded PostgreSQL cluster");
        text
    }

    /// Stop (pg_ctl stop -m fast) and remove the folder. Also done (synchronously, best effort) in Drop.
    ///
    /// This blocks the calling thread for as long as the server takes to shut
    /// down (typically well under a second).
    pub fn stop(mut self) -> Result<(), EmbeddedPgError> {
        self.done = true;
        self.shutdown()
    }

    async fn initdb(&self) -> Result<(), EmbeddedPgError> {
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
            "--encoding=UTF8".into(),
            // The C locale works with any encoding and does not depend on
            // which locales the machine has generated.
            "--no-locale".into(),
            // Throwaway cluster: no need to fsync the fresh files.
            "--no-sync".into(),
        ];
        let output = self.run_tokio("initdb", &args).await?;
        if !output.status.success() {
            return Err(EmbeddedPgError::InitdbFailed {
                data_dir: self.data_dir.clone(),
                status: output.status.to_string(),
                output: combined_output(&output),
            });
        }
        Ok(())
    }

    async fn pg_ctl_start(&self) -> Result<(), EmbeddedPgError> {
        // Nothing in the socket path needs quoting for PostgreSQL's option
        // parser as long as it has no spaces or quotes; our own names never
        // do, and `create_base_dir` rejects a temp dir that would.
        let server_options = format!(
            "-c listen_addresses='' -c port={PORT} -c unix_socket_directories='{}' \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            self.base_dir.display()
        );
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log_file.clone().into(),
            "-o".into(),
            server_options.into(),
            // pg_ctl polls the server until it accepts connections, giving
            // up after the timeout.
            "-w".into(),
            "-t".into(),
            START_TIMEOUT.as_secs().to_string().into(),
            "start".into(),
        ];
        let output = self.run_tokio("pg_ctl", &args).await?;
        if !output.status.success() {
            // pg_ctl may have left a server behind (e.g. on timeout).
            let _ = self.pg_ctl_stop("immediate");
            return Err(EmbeddedPgError::StartFailed {
                reason: format!("pg_ctl start: {}", output.status),
                output: combined_output(&output),
                log_file: self.log_file.clone(),
                log: read_log_tail(&self.log_file),
            });
        }
        let socket = self.base_dir.join(format!(".s.PGSQL.{PORT}"));
        if !socket.exists() {
            let _ = self.pg_ctl_stop("immediate");
            return Err(EmbeddedPgError::StartFailed {
                reason: format!("socket {} missing after start", socket.display()),
                output: combined_output(&output),
                log_file: self.log_file.clone(),
                log: read_log_tail(&self.log_file),
            });
        }
        Ok(())
    }

    /// Stops the server (if running) and removes the folder.
    fn shutdown(&mut self) -> Result<(), EmbeddedPgError> {
        let mut result = Ok(());
        if self.running {
            self.running = false;
            let started = Instant::now();
            if let Err(err) = self.pg_ctl_stop("fast") {
                tracing::warn!(error = %err, "fast shutdown failed, trying immediate");
                let _ = self.pg_ctl_stop("immediate");
                result = Err(err);
            } else {
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis(),
                    "embedded PostgreSQL stopped"
                );
            }
        }
        match std::fs::remove_dir_all(&self.base_dir) {
            Ok(()) => {
                tracing::debug!(base_dir = %self.base_dir.display(), "removed embedded PostgreSQL folder");
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(base_dir = %self.base_dir.display(), error = %err, "could not remove embedded PostgreSQL folder");
                if result.is_ok() {
                    result = Err(err.into());
                }
            }
        }
        result
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), EmbeddedPgError> {
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            "-m".into(),
            mode.into(),
            "-w".into(),
            "-t".into(),
            STOP_TIMEOUT.as_secs().to_string().into(),
            "stop".into(),
        ];
        let (program, full_args) = self.command_line("pg_ctl", &args);
        let output = StdCommand::new(&program)
            .args(&full_args)
            .current_dir(&self.base_dir)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| EmbeddedPgError::Spawn {
                program: program.to_string_lossy().into_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(EmbeddedPgError::StopFailed {
                status: output.status.to_string(),
                output: combined_output(&output),
            });
        }
        Ok(())
    }

    async fn run_tokio(&self, tool: &str, args: &[OsString]) -> Result<Output, EmbeddedPgError> {
        let (program, full_args) = self.command_line(tool, args);
        tracing::debug!(program = %program.to_string_lossy(), args = ?full_args, "running");
        TokioCommand::new(&program)
            .args(&full_args)
            // The server user may not be able to read our working directory.
            .current_dir(&self.base_dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| EmbeddedPgError::Spawn {
                program: program.to_string_lossy().into_owned(),
                source,
            })
    }

    /// The program and arguments that run `tool` from `bin_dir`, as the
    /// server user when we are root.
    fn command_line(&self, tool: &str, args: &[OsString]) -> (OsString, Vec<OsString>) {
        let tool_path = self.bin_dir.join(tool);
        match &self.run_as {
            None => (tool_path.into_os_string(), args.to_vec()),
            Some(user) => {
                if let Some(runuser) = find_runuser() {
                    let mut full: Vec<OsString> =
                        vec!["-u".into(), user.into(), "--".into(), tool_path.into()];
                    full.extend(args.iter().cloned());
                    (runuser.into_os_string(), full)
                } else {
                    let mut script = shell_quote(tool_path.as_os_str());
                    for arg in args {
                        script.push(' ');
                        script.push_str(&shell_quote(arg));
                    }
                    (
                        "su".into(),
                        vec![
                            user.into(),
                            "-s".into(),
                            "/bin/sh".into(),
                            "-c".into(),
                            script.into(),
                        ],
                    )
                }
            }
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Err(err) = self.shutdown() {
            tracing::warn!(base_dir = %self.base_dir.display(), error = %err, "could not clean up embedded PostgreSQL");
        }
    }
}

/// Directories that may hold `initdb` and `pg_ctl`, in order of preference.
fn candidate_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();

    let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    versioned.sort_by(|a, b| b.0.cmp(&a.0)); // highest version first
    dirs.extend(versioned.into_iter().map(|(_, dir)| dir));

    dirs.push(PathBuf::from("/usr/local/pgsql/bin"));
    dirs
}

/// The first directory holding both `initdb` and `pg_ctl`.
fn find_bin_dir(candidates: &[PathBuf]) -> Result<PathBuf, EmbeddedPgError> {
    candidates
        .iter()
        .find(|dir| is_executable(&dir.join("initdb")) && is_executable(&dir.join("pg_ctl")))
        .cloned()
        .ok_or_else(|| EmbeddedPgError::NotInstalled {
            searched: "PATH, /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin".to_owned(),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether the effective user id is 0, read from `/proc/self/status`
/// (falling back to `id -u`).
fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(euid) = parse_euid(&status)
    {
        return euid == 0;
    }
    StdCommand::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .is_some_and(|uid| uid.trim() == "0")
}

/// The effective uid from the `Uid:` line of `/proc/<pid>/status`
/// (real, effective, saved, filesystem).
fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn system_user_exists(user: &str) -> bool {
    StdCommand::new("id")
        .arg("-u")
        .arg(user)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn find_runuser() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join("runuser"))
        .find(|p| is_executable(p))
}

/// Creates a fresh, uniquely named folder (mode 0755) for the cluster.
fn create_base_dir(as_other_user: bool) -> Result<PathBuf, EmbeddedPgError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!(
        "audience-sync-pg-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );

    // The server user must be able to reach the folder, and the socket path
    // must stay short and free of characters needing quoting; /tmp always
    // qualifies.
    let temp = std::env::temp_dir();
    let socket_len = temp.join(&name).join(".s.PGSQL.5432").as_os_str().len();
    let plain = temp.to_str().is_some_and(|s| {
        !s.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"' || c == '\\')
    });
    let parent = if as_other_user || socket_len > MAX_SOCKET_PATH || !plain {
        PathBuf::from("/tmp")
    } else {
        temp
    };

    let dir = parent.join(name);
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    // The umask may have narrowed the mode.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

async fn chown_recursive(dir: &Path, user: &str) -> Result<(), EmbeddedPgError> {
    let output = TokioCommand::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .output()
        .await
        .map_err(|source| EmbeddedPgError::Spawn {
            program: "chown".to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(EmbeddedPgError::Io(std::io::Error::other(format!(
            "chown -R {user}:{user} {} failed: {}",
            dir.display(),
            combined_output(&output)
        ))));
    }
    Ok(())
}

fn combined_output(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stdout = stdout.trim();
    if !stdout.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout);
    }
    text
}

/// The last lines of the server log, for error messages.
fn read_log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(err) => format!("(could not read: {err})"),
    }
}

/// Percent-encodes a path for use as a URL query value, keeping `/`.
fn percent_encode_path(path: &Path) -> String {
    let mut out = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(*byte as char);
            }
            _ => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// Quotes a word for a POSIX shell.
fn shell_quote(word: &std::ffi::OsStr) -> String {
    let word = word.to_string_lossy();
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_answers_queries_and_cleans_up_on_stop() {
        let started = Instant::now();
        let pg = EmbeddedPostgres::start()
            .await
            .expect("start embedded PostgreSQL");
        eprintln!("embedded PostgreSQL started in {:?}", started.elapsed());
        let base = pg.socket_dir().to_path_buf();
        assert!(pg.data_dir().join("PG_VERSION").exists());
        assert!(
            pg.url()
                .starts_with("postgres://postgres@localhost:5432/postgres?host=/")
        );

        let pool = sqlx::PgPool::connect(&pg.url()).await.expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(one, 1);
        let encoding: String = sqlx::query_scalar("SHOW server_encoding")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(encoding, "UTF8");
        let listen: String = sqlx::query_scalar("SHOW listen_addresses")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(listen, "");
        pool.close().await;

        pg.stop().expect("stop");
        assert!(!base.exists(), "{} should be gone", base.display());
    }

    #[tokio::test]
    async fn drop_stops_the_server_and_removes_the_folder() {
        let pg = EmbeddedPostgres::start()
            .await
            .expect("start embedded PostgreSQL");
        let base = pg.socket_dir().to_path_buf();
        let pid_file = pg.data_dir().join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file).expect("postmaster.pid");
        let pid = pid.lines().next().expect("pid line").trim().to_owned();
        drop(pg);
        assert!(!base.exists(), "{} should be gone", base.display());
        // pg_ctl stop returns once postmaster.pid is gone, a moment before
        // the process itself has finished exiting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while postmaster_alive(&pid) {
            assert!(
                Instant::now() < deadline,
                "postmaster {pid} should have exited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process exists and is not a zombie.
    fn postmaster_alive(pid: &str) -> bool {
        std::fs::read_to_string(Path::new("/proc").join(pid).join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state != "Z" && state != "X")
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn keep_leaves_a_usable_cluster_behind() {
        let pg = EmbeddedPostgres::start()
            .await
            .expect("start embedded PostgreSQL");
        let url = pg.url();
        let base = pg.socket_dir().to_path_buf();
        let data = pg.data_dir().to_path_buf();
        let bin_dir = pg.bin_dir.clone();
        let run_as = pg.run_as.clone();
        let text = pg.keep();
        assert!(text.contains("psql -h"), "{text}");
        assert!(text.contains(&format!("DATABASE_URL='{url}'")), "{text}");

        // Still reachable after the value is gone.
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(one, 1);
        pool.close().await;

        // Clean up by re-adopting the cluster.
        let adopted = EmbeddedPostgres {
            log_file: base.join("log"),
            base_dir: base.clone(),
            data_dir: data,
            bin_dir,
            run_as,
            running: true,
            done: false,
        };
        adopted.stop().expect("stop");
        assert!(!base.exists());
    }

    #[test]
    fn missing_binaries_give_install_advice() {
        let empty = std::env::temp_dir().join(format!(
            "audience-sync-pg-test-empty-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&empty).unwrap();
        let err = find_bin_dir(std::slice::from_ref(&empty)).unwrap_err();
        std::fs::remove_dir_all(&empty).unwrap();
        let message = err.to_string();
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("DATABASE_URL"), "{message}");
    }

    #[test]
    fn parses_effective_uid() {
        let status = "Name:\tx\nUid:\t1000\t0\t1000\t1000\nGid:\t1\t1\t1\t1\n";
        assert_eq!(parse_euid(status), Some(0));
        assert_eq!(parse_euid("Name:\tx\n"), None);
    }

    #[test]
    fn encodes_and_quotes() {
        assert_eq!(percent_encode_path(Path::new("/tmp/a b")), "/tmp/a%20b");
        assert_eq!(shell_quote("/tmp/x".as_ref()), "/tmp/x");
        assert_eq!(shell_quote("it's".as_ref()), r"'it'\''s'");
    }
}
