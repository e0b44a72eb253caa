//! Audience definitions: key derivation, schedule parsing, query checks, and keeping the
//! `audiences` table in step with the config file.

use std::str::FromStr;

use heck::ToSnakeCase;
use secrecy::SecretString;
use sqlx::{Executor, PgConnection, PgPool, Row};

/// Longest key accepted (Wigzo trait names are short; this keeps them readable).
pub const MAX_KEY_LEN: usize = 128;

/// One audience as the config file defines it.
#[derive(Debug, Clone)]
pub struct AudienceDef {
    /// The trait name sent to Wigzo: snake_case, fixed when the audience is first stored.
    pub key: String,
    /// The audience's name as people read it.
    pub name: String,
    /// Cron expression (UTC) of the daemon's runs.
    pub schedule: String,
    /// The member query, trailing semicolons removed.
    pub query: String,
    /// Another Postgres to run the query on; `None` means the worker's own database.
    pub source_url: Option<SecretString>,
    /// Whether it is synced (a disabled audience keeps its history).
    pub enabled: bool,
    /// When a run of this audience is held instead of sending its removals.
    pub guard: crate::guard::Guard,
}

/// An audience as stored, joined with its definition from the config file.
#[derive(Debug, Clone)]
pub struct Audience {
    /// Its row in `audiences`.
    pub id: i64,
    /// Its definition from the config file.
    pub def: AudienceDef,
}

/// Why an audience definition or its query was refused.
#[derive(Debug, thiserror::Error)]
pub enum AudienceError {
    /// The query is not usable (not SQL, no `user_id`, a wrong type).
    #[error("audience {key:?}: {reason}")]
    Query {
        /// The audience.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Its `source_url` database cannot be reached.
    #[error("cannot connect to the source database of audience {key:?}: {message}")]
    Source {
        /// The audience.
        key: String,
        /// The connection error (never the URL).
        message: String,
    },
    /// An audience asked for by key that was never stored.
    #[error(
        "audience {key:?} is not in the database; add it to the config file and run any command"
    )]
    Unknown {
        /// The key asked for.
        key: String,
    },
    /// Storing the definitions failed.
    #[error("database error while storing audiences: {0}")]
    Db(#[from] sqlx::Error),
}

/// The key for a name: heck's snake_case, which must then be a valid key.
pub fn derive_key(name: &str) -> Result<String, String> {
    let key = name.to_snake_case();
    if key.is_empty() {
        return Err("name has no letters or digits, so no key can be derived from it".into());
    }
    validate_key(&key).map_err(|r| format!("derived key {key:?} {r}"))?;
    Ok(key)
}

/// A key is lowercase ASCII letters and digits in words joined by single underscores.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("is longer than {MAX_KEY_LEN} characters"));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(format!(
            "contains {c:?}; keys are snake_case: lowercase ASCII letters, digits and underscores"
        ));
    }
    if key.starts_with('_') || key.ends_with('_') || key.contains("__") {
        return Err("must not start or end with '_' or contain '__' (not snake_case)".into());
    }
    Ok(())
}

/// Keys the identify call already uses as a trait or a user field, or that Wigzo's own user
/// profile has: an audience flag under one of them would overwrite a contact field (or be
/// overwritten by it).
pub const RESERVED_KEYS: &[&str] = &[
    "anonymous_id",
    "computation_class",
    "computation_id",
    "computation_key",
    "context",
    "email",
    "first_name",
    "full_name",
    "fullname",
    "id",
    "is_active",
    "last_name",
    "library",
    "message_id",
    "messageid",
    "mobile",
    "name",
    "org_token",
    "personas",
    "phone",
    "source",
    "timestamp",
    "traits",
    "type",
    "user_id",
    "userid",
];

/// Refuses a key the identify call or Wigzo's user profile already uses, suggesting another.
pub fn check_not_reserved(key: &str) -> Result<(), String> {
    if RESERVED_KEYS.contains(&key) {
        return Err(format!(
            "key {key:?} is reserved: the identify call already sends it as a user trait or field, and the audience's flag would overwrite it; give the audience an explicit key, e.g. key = \"{key}_audience\""
        ));
    }
    Ok(())
}

/// Parses a cron expression in UTC. Accepts the 6- or 7-field form of the `cron` crate
/// (seconds first) and the classic 5-field form (minute first).
pub fn parse_schedule(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 {
        format!("0 {expr}")
    } else {
        expr.to_string()
    };
    cron::Schedule::from_str(&full).map_err(|e| e.to_string())
}

/// Prepares every enabled audience's query (nothing runs) so a bad query is refused before
/// any run starts or anything is stored. An unreachable external source is left to its run
/// to report.
pub async fn check_queries(pool: &PgPool, audiences: &[AudienceDef]) -> Result<(), AudienceError> {
    let mut conn = pool.acquire().await?;
    for a in audiences.iter().filter(|a| a.enabled) {
        match &a.source_url {
            None => {
                inspect_query(&mut conn, &a.key, &a.query).await?;
            }
            Some(url) => {
                let opts = crate::db::options(url).map_err(|e| AudienceError::Source {
                    key: a.key.clone(),
                    message: e.to_string(),
                })?;
                match crate::db::dedicated(&opts).await {
                    Ok(mut src) => {
                        inspect_query(&mut src, &a.key, &a.query).await?;
                    }
                    Err(e) => {
                        tracing::warn!(audience = %a.key, error = %e, "source database unreachable; its run will fail");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Column types accepted for `user_id` (sent as their text form).
const USER_ID_TYPES: &[&str] = &[
    "TEXT", "VARCHAR", "BPCHAR", "NAME", "INT2", "INT4", "INT8", "NUMERIC", "UUID", "CITEXT",
];

/// Which optional columns the query returns, found by preparing it (nothing is executed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryShape {
    /// It returns an `email` column.
    pub email: bool,
    /// It returns a `phone` column.
    pub phone: bool,
    /// It returns a `name` column.
    pub name: bool,
}

/// Prepares the query on `conn` and checks it returns one usable `user_id` column.
pub async fn inspect_query(
    conn: &mut PgConnection,
    key: &str,
    query: &str,
) -> Result<QueryShape, AudienceError> {
    let err = |reason: String| AudienceError::Query {
        key: key.to_string(),
        reason,
    };
    let wrapped = format!("SELECT * FROM (\n{query}\n) AS audience_query");
    let stmt = conn
        .prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(wrapped)))
        .await
        .map_err(|e| err(format!("query is not valid SQL: {}", db_message(&e))))?;
    use sqlx::{Column, Statement, TypeInfo};
    let cols = stmt.columns();
    let mut shape = QueryShape::default();
    let mut user_id = 0;
    for c in cols {
        let ty = c.type_info().name().to_string();
        match c.name() {
            "user_id" => {
                user_id += 1;
                if !USER_ID_TYPES.contains(&ty.as_str()) {
                    return Err(err(format!(
                        "column user_id has type {ty}; it must be text or an integer"
                    )));
                }
            }
            "email" => shape.email = true,
            "phone" => shape.phone = true,
            "name" => shape.name = true,
            _ => {}
        }
    }
    match user_id {
        0 => Err(err(format!(
            "query returns no user_id column (it returns: {}); alias the user id column AS user_id",
            cols.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
        ))),
        1 => Ok(shape),
        _ => Err(err("query returns more than one user_id column".into())),
    }
}

/// The database's own message for an error, without sqlx's wrapping.
pub fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        other => other.to_string(),
    }
}

/// Creates or updates the audiences of the config file and disables those no longer in it.
/// Keys are never changed. Returns the stored audiences of the file, in file order.
pub async fn store_definitions(
    pool: &PgPool,
    defs: &[AudienceDef],
) -> Result<Vec<Audience>, AudienceError> {
    let mut tx = pool.begin().await?;
    let mut out = Vec::with_capacity(defs.len());
    for def in defs {
        let row = sqlx::query(
            "INSERT INTO audiences (key, name, query, schedule, external_source, enabled)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (key) DO UPDATE SET
                name = EXCLUDED.name, query = EXCLUDED.query, schedule = EXCLUDED.schedule,
                external_source = EXCLUDED.external_source, enabled = EXCLUDED.enabled,
                updated_at = now()
             WHERE (audiences.name, audiences.query, audiences.schedule,
                    audiences.external_source, audiences.enabled)
                IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.query, EXCLUDED.schedule,
                    EXCLUDED.external_source, EXCLUDED.enabled)
             RETURNING id",
        )
        .bind(&def.key)
        .bind(&def.name)
        .bind(&def.query)
        .bind(&def.schedule)
        .bind(def.source_url.is_some())
        .bind(def.enabled)
        .fetch_optional(&mut *tx)
        .await?;
        let id: i64 = match row {
            Some(r) => r.get(0),
            None => {
                sqlx::query_scalar("SELECT id FROM audiences WHERE key = $1")
                    .bind(&def.key)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        out.push(Audience {
            id,
            def: def.clone(),
        });
    }
    let keys: Vec<&str> = defs.iter().map(|d| d.key.as_str()).collect();
    let disabled = sqlx::query(
        "UPDATE audiences SET enabled = false, updated_at = now()
         WHERE enabled AND key <> ALL($1)",
    )
    .bind(&keys)
    .execute(&mut *tx)
    .await?;
    if disabled.rows_affected() > 0 {
        tracing::info!(
            count = disabled.rows_affected(),
            "disabled audiences no longer in the config file"
        );
    }
    tx.commit().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_snake_case_of_names() {
        for (name, key) in [
            ("Order Completed Last 30days", "order_completed_last_30days"),
            ("High-Value Customers (EU)", "high_value_customers_eu"),
            ("CartAbandonersQ4", "cart_abandoners_q4"),
            ("Dormant Shoppers", "dormant_shoppers"),
            ("  spaced   out  ", "spaced_out"),
        ] {
            assert_eq!(derive_key(name).unwrap(), key, "name {name:?}");
        }
    }

    #[test]
    fn names_without_a_usable_key_are_refused() {
        assert!(
            derive_key("🎉🔥")
                .unwrap_err()
                .contains("no letters or digits")
        );
        assert!(derive_key("").is_err());
        assert!(
            derive_key("Clientes Fiéis")
                .unwrap_err()
                .contains("contains 'é'")
        );
    }

    #[test]
    fn explicit_keys_must_be_snake_case() {
        assert!(validate_key("dormant_shoppers").is_ok());
        assert!(validate_key("q4").is_ok());
        for bad in [
            "Dormant", "a-b", "a__b", "_a", "a_", "a'b", "a;drop", "", "a b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_key(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
    }

    #[test]
    fn schedules_accept_five_six_and_seven_fields() {
        assert!(parse_schedule("0 0 */3 * * *").is_ok());
        assert!(parse_schedule("*/15 * * * *").is_ok());
        assert!(parse_schedule("0 0 1 * * * 2030").is_ok());
        assert!(parse_schedule("every day").is_err());
        assert!(parse_schedule("61 * * * *").is_err());
    }
}
