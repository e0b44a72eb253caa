//! Configuration: the TOML file, environment overrides, and validation of everything that can be
//! checked without a database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::audience::{AudienceDef, Kind, OnMissing, derive_key, validate_key};
use crate::guard::Guard;

/// Default Wigzo host.
pub const DEFAULT_BASE_URL: &str = "https://app.wigzo.com";
/// Shortest `[ops] trigger_token` accepted: it guards run triggers on the ops port.
pub const MIN_TRIGGER_TOKEN_LEN: usize = 16;
/// Default schedule: every three hours, on the hour (UTC).
pub const DEFAULT_SCHEDULE: &str = "0 0 */3 * * *";

/// Why a configuration was refused. No message quotes a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("config file {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what (line, column, key), never the source line.
        message: String,
    },
    /// No database URL anywhere.
    #[error("no database configured: set DATABASE_URL or [database] url in the config file")]
    NoDatabase,
    /// No organization token anywhere.
    #[error(
        "no Wigzo organization token configured: set WIGZO_ORG_TOKEN or [wigzo] org_token in the config file"
    )]
    NoToken,
    /// A setting out of its range.
    #[error("invalid setting {setting}: {reason}")]
    Setting {
        /// Its path, e.g. `wigzo.concurrency`.
        setting: String,
        /// What is allowed.
        reason: String,
    },
    /// An audience (or trait) definition that cannot be used.
    #[error("{kind} {audience:?}: {reason}")]
    Audience {
        /// Audience or trait.
        kind: Kind,
        /// The audience's name (or key).
        audience: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// The org token: never printed by Debug, Display or serde.
pub type OrgToken = SecretString;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    wigzo: RawWigzo,
    #[serde(default)]
    ops: RawOps,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default, rename = "audience")]
    audiences: Vec<RawAudience>,
    #[serde(default, rename = "trait")]
    traits: Vec<RawAudience>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<SecretString>,
    max_connections: Option<u32>,
    statement_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWigzo {
    org_token: Option<SecretString>,
    base_url: Option<String>,
    requests_per_second: Option<u32>,
    concurrency: Option<usize>,
    timeout_secs: Option<u64>,
    max_attempts: Option<u32>,
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    batch_size: Option<i64>,
    lease_secs: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOps {
    listen: Option<String>,
    trigger_token: Option<SecretString>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    grace_period_secs: Option<u64>,
    max_concurrent_runs: Option<usize>,
    poll_interval_secs: Option<u64>,
    retry_failed_secs: Option<u64>,
}

/// `[guard]`, and an audience's `guard = { ... }` (which overrides it field by field).
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    max_removed_percent: Option<f64>,
    min_removed: Option<i64>,
    hold_empty: Option<bool>,
}

impl RawGuard {
    /// `self` over `base`, validated; `place` names the setting in errors.
    fn over(self, base: Guard, place: &str) -> Result<Guard, ConfigError> {
        let g = Guard {
            max_removed_percent: self.max_removed_percent.unwrap_or(base.max_removed_percent),
            min_removed: self.min_removed.unwrap_or(base.min_removed),
            hold_empty: self.hold_empty.unwrap_or(base.hold_empty),
        };
        if !(0.0..=100.0).contains(&g.max_removed_percent) {
            return Err(ConfigError::Setting {
                setting: format!("{place}.max_removed_percent"),
                reason: "must be between 0 and 100 (100: never hold on the share removed)".into(),
            });
        }
        if g.min_removed < 0 {
            return Err(ConfigError::Setting {
                setting: format!("{place}.min_removed"),
                reason: "must be 0 or more".into(),
            });
        }
        Ok(g)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    name: String,
    key: Option<String>,
    schedule: Option<String>,
    query: String,
    source_url: Option<SecretString>,
    enabled: Option<bool>,
    guard: Option<RawGuard>,
    /// `[[trait]]` only.
    on_missing: Option<String>,
}

/// Everything a command needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[database]`.
    pub database: DatabaseConfig,
    /// `[wigzo]`.
    pub wigzo: WigzoConfig,
    /// `[ops]`.
    pub ops: OpsConfig,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// The `[[audience]]` entries, then the `[[trait]]` entries (`kind` tells them apart),
    /// validated, with their guards resolved.
    pub audiences: Vec<AudienceDef>,
    /// The file it was read from, if any (the daemon re-reads it on SIGHUP).
    pub path: Option<PathBuf>,
}

/// `[database]`.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// The worker's database (a secret: it may hold a password).
    pub url: Option<SecretString>,
    /// Pool size.
    pub max_connections: u32,
    /// Statement timeout for audience queries.
    pub statement_timeout: Duration,
}

/// `[wigzo]`: the destination and how calls are made.
#[derive(Debug, Clone)]
pub struct WigzoConfig {
    /// The organization token (a secret).
    pub org_token: Option<OrgToken>,
    /// Where calls go, without a trailing slash.
    pub base_url: String,
    /// 0 turns the client-side rate limit off.
    pub requests_per_second: u32,
    /// Calls in flight.
    pub concurrency: usize,
    /// Longest wait for one call.
    pub timeout: Duration,
    /// Calls per change within one run, 429s not counted.
    pub max_attempts: u32,
    /// First backoff.
    pub retry_base: Duration,
    /// Longest backoff.
    pub retry_max: Duration,
    /// Changes claimed from the outbox at once.
    pub batch_size: i64,
    /// How long a claim keeps other workers off a change; renewed while the change is being
    /// worked on, so it only matters when a worker dies holding it.
    pub lease: Duration,
}

impl WigzoConfig {
    /// Defaults for a given destination (tests and the demo use this).
    pub fn new(base_url: impl Into<String>, org_token: impl Into<String>) -> Self {
        Self {
            org_token: Some(SecretString::from(org_token.into())),
            base_url: base_url.into(),
            requests_per_second: 50,
            concurrency: 8,
            timeout: Duration::from_secs(10),
            max_attempts: 8,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            batch_size: 500,
            lease: Duration::from_secs(900),
        }
    }
}

/// `[ops]`: the daemon's HTTP server.
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// Address it listens on.
    pub listen: String,
    /// Bearer token that enables run triggers (a secret, at least 16 characters).
    pub trigger_token: Option<SecretString>,
}

/// The scheduled worker (`audience-sync run`).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// On SIGTERM/SIGINT: how long in-flight calls may take to finish before the process exits.
    pub grace_period: Duration,
    /// Audiences this process syncs at the same time.
    pub max_concurrent_runs: usize,
    /// How often the schedule and the database are checked for due or stuck runs.
    pub poll_interval: Duration,
    /// A failed run is tried again this long after it finished, or at its next cron tick if
    /// that is sooner.
    pub retry_failed: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(30),
            max_concurrent_runs: 2,
            poll_interval: Duration::from_secs(15),
            retry_failed: Duration::from_secs(300),
        }
    }
}

/// A TOML error as "line L, column C (in [table], key `k`): problem". The source line is never
/// quoted, double-quoted values in the problem are elided, and every value the file holds is
/// blanked out of what remains: the offending value may be a secret under a misspelt key, in an
/// inline table, or anywhere else.
fn describe_parse_error(text: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if let Some(span) = e.span() {
        let mut at = span.start.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let before = &text[..at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        out.push_str(&format!("line {line}, column {column}"));
        if let Some(table) = enclosing_table(before) {
            out.push_str(&format!(" in [{table}]"));
        }
        if let Some(key) = key_at(&text[line_start..], at - line_start) {
            out.push_str(&format!(", key `{key}`"));
        }
        out.push_str(": ");
    }
    out.push_str(&scrub(e.message(), text));
    out
}

/// The last `[table]` or `[[table]]` header before the error, if it is a plain one.
fn enclosing_table(before: &str) -> Option<&str> {
    before.lines().rev().find_map(|l| {
        let l = l.trim();
        let name = l.strip_prefix('[')?.trim_start_matches('[');
        let name = name.split(']').next()?.trim();
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            .then_some(name)
    })
}

/// The bare key the error points into or after on its line (`key = value`), if any.
fn key_at(line: &str, at: usize) -> Option<&str> {
    let line = line.split('\n').next().unwrap_or_default();
    let is_key = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.';
    let before = &line[..at.min(line.len())];
    let candidate = match before.rfind('=') {
        // The error is in a value: its key is the bare word before the last '='.
        Some(eq) => {
            let k = before[..eq].trim_end();
            let tail: usize = k
                .chars()
                .rev()
                .take_while(|c| is_key(*c))
                .map(char::len_utf8)
                .sum();
            &k[k.len() - tail..]
        }
        // The error is at a key: the bare word there, if an '=' follows it.
        None => {
            let rest = &line[before.len()..];
            let end = rest.find(|c: char| !is_key(c)).unwrap_or(rest.len());
            if !rest[end..].trim_start().starts_with('=') {
                return None;
            }
            &rest[..end]
        }
    };
    (!candidate.is_empty()).then_some(candidate)
}

/// `message` with double-quoted parts elided and every value of `text` blanked out.
fn scrub(message: &str, text: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    if quoted {
        out.push('"');
    }
    let mut values = values_of(text);
    // Longest first, so a value that contains another is blanked whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in values {
        if v.chars().count() >= 3 && out.contains(v) {
            out = out.replace(v, "[redacted]");
        }
    }
    out
}

/// Every string literal's contents, and every bare value after an '=', in a TOML text that
/// may not parse.
fn values_of(text: &str) -> Vec<&str> {
    let mut values = Vec::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' => {
                let start = i + 1;
                let mut end = text.len();
                let mut escaped = false;
                for (j, d) in chars.by_ref() {
                    if d == '\n' || (d == c && !escaped) {
                        end = j;
                        break;
                    }
                    escaped = c == '"' && d == '\\' && !escaped;
                }
                values.push(&text[start..end]);
            }
            '=' => {
                let rest = &text[i + 1..];
                let end = rest
                    .find(['\n', ',', '}', ']', '#', '"', '\''])
                    .unwrap_or(rest.len());
                values.push(rest[..end].trim());
            }
            _ => {}
        }
    }
    values
}

/// Where the config file comes from: `--config`, else `$AUDIENCE_SYNC_CONFIG`, else
/// `./audience-sync.toml` if present, else none (environment only).
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("AUDIENCE_SYNC_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from("audience-sync.toml");
    local.exists().then_some(local)
}

/// Environment overrides, read once so tests can pass their own.
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    /// `DATABASE_URL`.
    pub database_url: Option<String>,
    /// `WIGZO_ORG_TOKEN`.
    pub org_token: Option<String>,
    /// `WIGZO_BASE_URL`.
    pub base_url: Option<String>,
}

impl EnvOverrides {
    /// Reads the overrides from the process environment (empty values count as unset).
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            database_url: get("DATABASE_URL"),
            org_token: get("WIGZO_ORG_TOKEN"),
            base_url: get("WIGZO_BASE_URL"),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path` (if any) with `env` applied on top.
    pub fn load(path: Option<&Path>, env: &EnvOverrides) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let mut cfg = Self::parse(&text, path.unwrap_or(Path::new("<none>")), env)?;
        cfg.path = path.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, path: &Path, env: &EnvOverrides) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_parse_error(text, &e),
        })?;
        Ok(Config {
            database: database(raw.database, env)?,
            wigzo: wigzo(raw.wigzo, env)?,
            ops: ops(raw.ops)?,
            daemon: daemon(raw.daemon)?,
            audiences: audiences(raw.audiences, raw.traits, raw.guard)?,
            path: None,
        })
    }

    /// The database URL, or an error saying where to set it.
    pub fn database_url(&self) -> Result<&SecretString, ConfigError> {
        self.database.url.as_ref().ok_or(ConfigError::NoDatabase)
    }

    /// The organization token, or an error saying where to set it.
    pub fn org_token(&self) -> Result<&OrgToken, ConfigError> {
        self.wigzo.org_token.as_ref().ok_or(ConfigError::NoToken)
    }

    /// The audience (or trait, as `kind` says) with this key, or an error listing the known
    /// keys of that kind, or saying the key is the other kind's.
    pub fn lookup(&self, key: &str, kind: Kind) -> Result<&AudienceDef, ConfigError> {
        let found = self.audiences.iter().find(|a| a.key == key);
        if let Some(def) = found.filter(|a| a.kind == kind) {
            return Ok(def);
        }
        let reason = match found {
            Some(other) => format!(
                "{key:?} is a {} in the config file; name it with --{} {key}",
                other.kind, other.kind
            ),
            None => {
                let known: Vec<&str> = self
                    .audiences
                    .iter()
                    .filter(|a| a.kind == kind)
                    .map(|a| a.key.as_str())
                    .collect();
                format!(
                    "no {kind} with this key in the config file (known keys: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }
        };
        Err(ConfigError::Audience {
            kind,
            audience: key.to_string(),
            reason,
        })
    }
}

/// An out-of-range setting.
fn setting(setting: &str, reason: &str) -> ConfigError {
    ConfigError::Setting {
        setting: setting.to_string(),
        reason: reason.to_string(),
    }
}

/// `[database]`, with `DATABASE_URL` over it.
fn database(raw: RawDatabase, env: &EnvOverrides) -> Result<DatabaseConfig, ConfigError> {
    let database = DatabaseConfig {
        url: env.database_url.clone().map(SecretString::from).or(raw.url),
        max_connections: raw.max_connections.unwrap_or(10),
        statement_timeout: Duration::from_secs(raw.statement_timeout_secs.unwrap_or(300)),
    };
    if database.max_connections < 2 {
        return Err(setting(
            "database.max_connections",
            "must be at least 2 (one run holds a connection while it delivers)",
        ));
    }
    if database.statement_timeout.is_zero() {
        return Err(setting(
            "database.statement_timeout_secs",
            "must be greater than 0",
        ));
    }

    Ok(database)
}

/// `[wigzo]`, with `WIGZO_ORG_TOKEN` and `WIGZO_BASE_URL` over it.
fn wigzo(w: RawWigzo, env: &EnvOverrides) -> Result<WigzoConfig, ConfigError> {
    let base_url = env
        .base_url
        .clone()
        .or(w.base_url)
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_string());
    // The value is not quoted back: a token pasted into the wrong setting must not show.
    let parsed = reqwest::Url::parse(&base_url)
        .map_err(|e| setting("wigzo.base_url", &format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.query().is_some() {
        return Err(setting(
            "wigzo.base_url",
            "must be an http(s) URL without a query string, e.g. https://app.wigzo.com",
        ));
    }
    let defaults = WigzoConfig::new(String::new(), String::new());
    let wigzo = WigzoConfig {
        org_token: env
            .org_token
            .clone()
            .map(SecretString::from)
            .or(w.org_token)
            .filter(|t| !t.expose_secret().trim().is_empty()),
        base_url: base_url.trim_end_matches('/').to_string(),
        requests_per_second: w
            .requests_per_second
            .unwrap_or(defaults.requests_per_second),
        concurrency: w.concurrency.unwrap_or(defaults.concurrency),
        timeout: w
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(defaults.timeout),
        max_attempts: w.max_attempts.unwrap_or(defaults.max_attempts),
        retry_base: w
            .retry_base_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.retry_base),
        retry_max: w
            .retry_max_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.retry_max),
        batch_size: w.batch_size.unwrap_or(defaults.batch_size),
        lease: w
            .lease_secs
            .map(Duration::from_secs)
            .unwrap_or(defaults.lease),
    };
    if wigzo.concurrency == 0 || wigzo.concurrency > 1024 {
        return Err(setting("wigzo.concurrency", "must be between 1 and 1024"));
    }
    if wigzo.timeout.is_zero() {
        return Err(setting("wigzo.timeout_secs", "must be greater than 0"));
    }
    if wigzo.max_attempts == 0 {
        return Err(setting("wigzo.max_attempts", "must be at least 1"));
    }
    if !(1..=100_000).contains(&wigzo.batch_size) {
        return Err(setting("wigzo.batch_size", "must be between 1 and 100000"));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&wigzo.lease) {
        return Err(setting("wigzo.lease_secs", "must be between 1 and 86400"));
    }

    Ok(wigzo)
}

/// `[ops]`.
fn ops(raw: RawOps) -> Result<OpsConfig, ConfigError> {
    let ops = OpsConfig {
        listen: raw.listen.unwrap_or_else(|| "127.0.0.1:9187".into()),
        trigger_token: raw.trigger_token,
    };
    if let Some(token) = &ops.trigger_token {
        let token = token.expose_secret();
        if token.trim().is_empty() {
            return Err(setting(
                "ops.trigger_token",
                "is empty; remove the setting to keep run triggers off, or set a random token of at least 16 characters",
            ));
        }
        if token.chars().count() < MIN_TRIGGER_TOKEN_LEN {
            return Err(setting(
                "ops.trigger_token",
                "is shorter than 16 characters; use a random one, e.g. from `openssl rand -hex 24`",
            ));
        }
    }

    Ok(ops)
}

/// `[daemon]`.
fn daemon(raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
    let dd = DaemonConfig::default();
    let daemon = DaemonConfig {
        grace_period: raw
            .grace_period_secs
            .map(Duration::from_secs)
            .unwrap_or(dd.grace_period),
        max_concurrent_runs: raw.max_concurrent_runs.unwrap_or(dd.max_concurrent_runs),
        poll_interval: raw
            .poll_interval_secs
            .map(Duration::from_secs)
            .unwrap_or(dd.poll_interval),
        retry_failed: raw
            .retry_failed_secs
            .map(Duration::from_secs)
            .unwrap_or(dd.retry_failed),
    };
    if !(1..=64).contains(&daemon.max_concurrent_runs) {
        return Err(setting(
            "daemon.max_concurrent_runs",
            "must be between 1 and 64",
        ));
    }
    if daemon.poll_interval.is_zero() {
        return Err(setting(
            "daemon.poll_interval_secs",
            "must be greater than 0",
        ));
    }

    Ok(daemon)
}

/// The `[[audience]]` and `[[trait]]` entries, with `[guard]` under each one's own `guard`.
/// Keys are one namespace across both (Wigzo has one set of user traits).
fn audiences(
    raw: Vec<RawAudience>,
    traits: Vec<RawAudience>,
    guard: RawGuard,
) -> Result<Vec<AudienceDef>, ConfigError> {
    let guard = guard.over(Guard::default(), "guard")?;
    let mut audiences: Vec<AudienceDef> = Vec::with_capacity(raw.len() + traits.len());
    let all = raw
        .into_iter()
        .map(|a| (Kind::Audience, a))
        .chain(traits.into_iter().map(|t| (Kind::Trait, t)));
    for (kind, a) in all {
        let err = |reason: String| ConfigError::Audience {
            kind,
            audience: a.name.clone(),
            reason,
        };
        let on_missing = match (kind, a.on_missing.as_deref()) {
            (_, None) => OnMissing::Null,
            (Kind::Trait, Some("null")) => OnMissing::Null,
            (Kind::Trait, Some("keep")) => OnMissing::Keep,
            (Kind::Trait, Some(_)) => {
                return Err(err(
                    "on_missing must be \"null\" (send null once) or \"keep\" (send nothing)"
                        .into(),
                ));
            }
            (Kind::Audience, Some(_)) => {
                return Err(err(
                    "on_missing is a [[trait]] setting; an audience always sends false to users who leave".into(),
                ));
            }
        };
        if a.name.trim().is_empty() {
            return Err(ConfigError::Audience {
                kind,
                audience: a.name.clone(),
                reason: "name is empty".into(),
            });
        }
        let key = match &a.key {
            Some(k) => {
                validate_key(k).map_err(|r| err(format!("key is not valid: it {r}")))?;
                k.clone()
            }
            None => derive_key(&a.name).map_err(|r| {
                err(format!(
                    "{r}; give the audience an explicit key = \"snake_case_key\""
                ))
            })?,
        };
        crate::audience::check_not_reserved(&key).map_err(err)?;
        let schedule = a.schedule.unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
        // Neither the value nor the parser's message (which quotes it) is echoed: a value
        // under the wrong setting can be a secret.
        crate::audience::parse_schedule(&schedule).map_err(|_| {
            err(format!(
                "schedule is not a valid cron expression: use 6 fields (seconds first, e.g. {DEFAULT_SCHEDULE:?}) or the classic 5"
            ))
        })?;
        let query = a.query.trim().trim_end_matches(';').trim().to_string();
        if query.is_empty() {
            return Err(err("query is empty".into()));
        }
        if let Some(other) = audiences.iter().find(|o| o.key == key) {
            return Err(err(format!(
                "its key {key:?} is already used by {} {:?} (audiences and traits share one namespace in Wigzo); give one of them an explicit key",
                other.kind, other.name
            )));
        }
        let guard = match a.guard {
            Some(g) => g.over(guard, "guard").map_err(|e| err(e.to_string()))?,
            None => guard,
        };
        audiences.push(AudienceDef {
            key,
            kind,
            on_missing,
            name: a.name.trim().to_string(),
            schedule,
            query,
            source_url: a.source_url,
            enabled: a.enabled.unwrap_or(true),
            guard,
        });
    }

    Ok(audiences)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &EnvOverrides::default())
    }

    #[test]
    fn full_example_parses_with_defaults() {
        let cfg = parse(
            r#"
            [database]
            url = "postgres://localhost/x"
            [wigzo]
            org_token = "tok"
            requests_per_second = 10
            [[audience]]
            name = "Order Completed Last 30days"
            query = "SELECT 1 AS user_id;"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.audiences[0].key, "order_completed_last_30days");
        assert_eq!(cfg.audiences[0].query, "SELECT 1 AS user_id");
        assert_eq!(cfg.audiences[0].schedule, DEFAULT_SCHEDULE);
        assert_eq!(cfg.wigzo.base_url, DEFAULT_BASE_URL);
        assert_eq!(cfg.wigzo.requests_per_second, 10);
        assert_eq!(cfg.wigzo.concurrency, 8);
    }

    #[test]
    fn env_overrides_file() {
        let env = EnvOverrides {
            database_url: Some("postgres://env/db".into()),
            org_token: Some("envtok".into()),
            base_url: Some("http://127.0.0.1:1/".into()),
        };
        let cfg =
            Config::parse("[wigzo]\norg_token = \"filetok\"\n", Path::new("t"), &env).unwrap();
        assert_eq!(cfg.org_token().unwrap().expose_secret(), "envtok");
        assert_eq!(cfg.wigzo.base_url, "http://127.0.0.1:1");
        assert_eq!(
            cfg.database_url().unwrap().expose_secret(),
            "postgres://env/db"
        );
    }

    #[test]
    fn rejects_bad_input_with_named_reasons() {
        let cases = [
            ("[wigzo]\nbogus = 1\n", "unknown field `bogus`"),
            ("[wigzo]\nconcurrency = \"eight\"\n", "invalid type"),
            (
                "[[audience]]\nname = \"🎉🎉\"\nquery = \"select 1 as user_id\"\n",
                "audience \"🎉🎉\": name has no letters or digits",
            ),
            (
                "[[audience]]\nname = \"A B\"\nquery = \"q\"\n[[audience]]\nname = \"a-b\"\nquery = \"q\"\n",
                "its key \"a_b\" is already used by audience \"A B\"",
            ),
            (
                "[[audience]]\nname = \"x\"\nkey = \"x'; DROP TABLE t;--\"\nquery = \"q\"\n",
                "is not valid",
            ),
            (
                "[[audience]]\nname = \"x\"\nschedule = \"every day\"\nquery = \"q\"\n",
                "not a valid cron expression",
            ),
            (
                "[[audience]]\nname = \"x\"\nquery = \"  ;\"\n",
                "query is empty",
            ),
            ("[wigzo]\nbase_url = \"ftp://x\"\n", "wigzo.base_url"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "config {text:?}: error {err:?} lacks {want:?}"
            );
        }
    }

    #[test]
    fn parse_errors_name_the_place_and_never_quote_the_line() {
        let text = "[wigzo]\norg_tokn = \"SECRET-1\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("line 2, column 1 in [wigzo], key `org_tokn`: unknown field `org_tokn`"),
            "{err}"
        );
        let text = "wigzo = { org_token = \"SECRET-2\", concurrency = \"x\" }\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("line 1, column ") && err.contains("key `concurrency`"),
            "{err}"
        );
        assert!(err.contains("invalid type: string \"…\""), "{err}");
        for text in [
            "[wigzo]\norg_tokn = \"SECRET-1\"\n",
            "wigzo = { org_token = \"SECRET-1\", concurrency = \"x\" }\n",
            "wigzo.org_tokn = \"SECRET-1\"\n",
            "[wigzo]\nconcurrency = \"SECRET-1\"\n",
            "[wigzo]\norg_token = SECRET-1\n",
            "[wigzo]\nbase_url = \"SECRET-1\"\n",
            "[[audience]]\nname = \"A\"\nquery = \"SELECT 1 AS user_id\"\nschedule = \"SECRET-1\"\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{text:?}: {err}");
        }
    }

    #[test]
    fn trigger_tokens_must_be_set_and_long() {
        for token in ["", "   ", "short-s3cret"] {
            let text = format!("[ops]\ntrigger_token = \"{token}\"\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("ops.trigger_token"), "{err}");
            assert!(token.trim().is_empty() || !err.contains(token), "{err}");
        }
        let cfg = parse("[ops]\ntrigger_token = \"0123456789abcdef\"\n").unwrap();
        assert!(cfg.ops.trigger_token.is_some());
    }

    #[test]
    fn keys_the_identify_call_uses_are_refused_with_a_suggestion() {
        for (name, key) in [
            ("Email", "email"),
            ("Phone", "phone"),
            ("User ID", "user_id"),
        ] {
            let text = format!("[[audience]]\nname = \"{name}\"\nquery = \"q\"\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("key \"{key}\" is reserved"))
                    && err.contains(&format!("key = \"{key}_audience\"")),
                "{err}"
            );
        }
        let text = "[[audience]]\nname = \"Email\"\nkey = \"email\"\nquery = \"q\"\n";
        assert!(parse(text).unwrap_err().to_string().contains("reserved"));
        let text = "[[audience]]\nname = \"Email\"\nkey = \"email_openers\"\nquery = \"q\"\n";
        assert_eq!(parse(text).unwrap().audiences[0].key, "email_openers");
    }

    #[test]
    fn guard_defaults_and_overrides_and_bad_values() {
        let cfg = parse(
            "[guard]\nmin_removed = 10\n[[audience]]\nname = \"A\"\nquery = \"q\"\n\
             [[audience]]\nname = \"Churn Risk\"\nquery = \"q\"\nguard = { max_removed_percent = 60 }\n",
        )
        .unwrap();
        let (a, churn) = (&cfg.audiences[0].guard, &cfg.audiences[1].guard);
        assert_eq!(
            (a.max_removed_percent, a.min_removed, a.hold_empty),
            (20.0, 10, true)
        );
        assert_eq!(
            (
                churn.max_removed_percent,
                churn.min_removed,
                churn.hold_empty
            ),
            (60.0, 10, true),
            "an audience overrides field by field over [guard]"
        );
        for (text, want) in [
            (
                "[guard]\nmax_removed_percent = 120\n",
                "guard.max_removed_percent",
            ),
            (
                "[guard]\nmax_removed_percent = -1\n",
                "guard.max_removed_percent",
            ),
            ("[guard]\nmin_removed = -5\n", "guard.min_removed"),
            ("[guard]\nhold_empty = \"yes\"\n", "invalid type"),
            ("[guard]\nmax_removd_percent = 1\n", "unknown field"),
            (
                "[[audience]]\nname = \"A\"\nquery = \"q\"\nguard = { max_removed_percent = 101 }\n",
                "audience \"A\": invalid setting guard.max_removed_percent",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn empty_file_is_valid_but_has_no_token() {
        let cfg = parse("").unwrap();
        assert!(cfg.audiences.is_empty());
        assert!(
            cfg.org_token()
                .unwrap_err()
                .to_string()
                .contains("WIGZO_ORG_TOKEN")
        );
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cfg = parse(
            "[database]\nurl = \"postgres://u:dbpass@h/db\"\n[wigzo]\norg_token = \"SUPERSECRET\"\n",
        )
        .unwrap();
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("SUPERSECRET") && !dbg.contains("dbpass"),
            "{dbg}"
        );
    }
}
