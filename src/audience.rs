//! Audience definitions (audiences, and computed traits: the two kinds of computation): key
//! derivation, schedule parsing, query checks, value types, and keeping the `audiences` table
//! in step with the config file.

use std::str::FromStr;

use heck::ToSnakeCase;
use secrecy::SecretString;
use sqlx::{Executor, PgConnection, PgPool, Row};

/// Longest key accepted (Wigzo trait names are short; this keeps them readable).
pub const MAX_KEY_LEN: usize = 128;

/// What a computation sends: membership (`[[audience]]`) or a value (`[[trait]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Membership: the key set to `true` on entry, `false` on exit.
    #[default]
    Audience,
    /// A computed trait: the key set to the user's value.
    Trait,
}

impl Kind {
    /// As stored in `audiences.kind`, and sent as `context.personas.computation_class`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audience => "audience",
            Kind::Trait => "trait",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a trait sends for a user who leaves its result, or whose value becomes NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnMissing {
    /// The trait as JSON null, once.
    #[default]
    Null,
    /// Nothing: Wigzo keeps the last value it was sent.
    Keep,
}

impl OnMissing {
    /// As written in the config file and stored in `audiences.on_missing`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnMissing::Null => "null",
            OnMissing::Keep => "keep",
        }
    }
}

/// One audience or computed trait as the config file defines it (the code says "audience"
/// for both; `kind` tells them apart).
#[derive(Debug, Clone)]
pub struct AudienceDef {
    /// The trait name sent to Wigzo: snake_case, fixed when the audience is first stored.
    pub key: String,
    /// Audience or computed trait.
    pub kind: Kind,
    /// For a trait: what a user without a value any more is sent (audiences: always `false`).
    pub on_missing: OnMissing,
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

impl AudienceDef {
    /// "audience \"key\"" or "trait \"key\"", for messages.
    pub fn label(&self) -> String {
        format!("{} {:?}", self.kind, self.key)
    }

    /// Whether users who leave the result are sent anything (`false`, or a trait's null).
    pub fn sends_removals(&self) -> bool {
        self.kind == Kind::Audience || self.on_missing == OnMissing::Null
    }
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
    /// A key stored as one kind that the config file now defines as the other.
    #[error(
        "key {key:?} belongs to {stored} already stored, and the config file now defines {wanted} with it; keys are one namespace in Wigzo and a key keeps its kind: give the new one another key (nothing was changed)"
    )]
    KindChanged {
        /// The key.
        key: String,
        /// Its stored kind, with its article.
        stored: &'static str,
        /// The config file's kind, with its article.
        wanted: &'static str,
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
                inspect_query(&mut conn, &a.key, a.kind, &a.query).await?;
            }
            Some(url) => {
                let opts = crate::db::options(url).map_err(|e| AudienceError::Source {
                    key: a.key.clone(),
                    message: e.to_string(),
                })?;
                match crate::db::dedicated(&opts).await {
                    Ok(mut src) => {
                        inspect_query(&mut src, &a.key, a.kind, &a.query).await?;
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

/// The types a trait's `value` column may have, each sent as one JSON type. The query's
/// column is turned into canonical JSON text on the source database (`json_sql`), so that
/// two values compare as two strings in the diff (`1.50` and `1.5` are one value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// text, varchar, char: a JSON string.
    Text,
    /// smallint, integer, bigint: a JSON number.
    Integer,
    /// numeric: a JSON number when it round-trips exactly through a double, else a string.
    Numeric,
    /// real, double precision: a JSON number; NaN and infinities are refused per row.
    Float,
    /// boolean: true or false.
    Boolean,
    /// date: "YYYY-MM-DD".
    Date,
    /// timestamp: ISO 8601 without a zone.
    Timestamp,
    /// timestamptz: ISO 8601 in UTC ("...Z"), whatever the session's time zone.
    Timestamptz,
}

/// What a trait's value column may be, for messages.
const VALUE_TYPES: &str = "text, varchar, smallint, integer, bigint, numeric, real, double precision, boolean, date, timestamp or timestamptz";

impl ValueType {
    /// The type for a column type as sqlx names it (`None`: refused).
    pub fn of(pg: &str) -> Option<Self> {
        Some(match pg {
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => ValueType::Text,
            "INT2" | "INT4" | "INT8" => ValueType::Integer,
            "NUMERIC" => ValueType::Numeric,
            "FLOAT4" | "FLOAT8" => ValueType::Float,
            "BOOL" => ValueType::Boolean,
            "DATE" => ValueType::Date,
            "TIMESTAMP" => ValueType::Timestamp,
            "TIMESTAMPTZ" => ValueType::Timestamptz,
            _ => return None,
        })
    }

    /// SQL turning column `v` (never NULL here) into its canonical JSON text. A numeric is a
    /// number when it survives numeric -> double -> shortest text -> numeric unchanged
    /// (trailing zeros trimmed: `1.50` is `1.5`); outside a double's range it is not tried.
    pub fn json_sql(self, v: &str) -> String {
        match self {
            ValueType::Text => format!("to_jsonb({v}::text)::text"),
            ValueType::Integer => format!("{v}::text"),
            ValueType::Numeric => format!(
                "CASE WHEN ({v} = 0 OR abs({v}) BETWEEN 1e-300 AND 1e300)
                       AND {v}::float8::text::numeric = {v}
                      THEN trim_scale({v})::text
                      ELSE to_jsonb(trim_scale({v})::text)::text END"
            ),
            // Shortest text that reads back to the same float4 or float8.
            ValueType::Float => format!("{v}::text"),
            ValueType::Boolean => format!("CASE WHEN {v} THEN 'true' ELSE 'false' END"),
            ValueType::Date | ValueType::Timestamp => format!("to_jsonb({v})::text"),
            ValueType::Timestamptz => format!(
                "CASE WHEN isfinite({v})
                      THEN to_jsonb((to_jsonb({v} AT TIME ZONE 'UTC') #>> '{{}}') || 'Z')::text
                      ELSE to_jsonb({v}::text)::text END"
            ),
        }
    }

    /// SQL that is false for a value JSON cannot carry (NaN, infinities): its row is
    /// skipped and counted, like a row without a user id.
    pub fn usable_sql(self, v: &str) -> String {
        match self {
            // Every value in a double's range is finite; only the rest are spelled out (a
            // numeric's text form costs more than the comparison, and numeric infinities do
            // not exist before PostgreSQL 14, so they cannot be written as literals).
            ValueType::Numeric => format!(
                "({v} = 0 OR abs({v}) BETWEEN 1e-300 AND 1e300
                  OR {v}::text NOT IN ('NaN', 'Infinity', '-Infinity'))"
            ),
            ValueType::Float => {
                format!("{v} NOT IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)")
            }
            _ => "true".to_string(),
        }
    }
}

/// Which optional columns the query returns, found by preparing it (nothing is executed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryShape {
    /// It returns an `email` column.
    pub email: bool,
    /// It returns a `phone` column.
    pub phone: bool,
    /// It returns a `name` column.
    pub name: bool,
    /// A trait's `value` column and its type (`None` for an audience).
    pub value: Option<ValueType>,
}

/// Prepares the query on `conn` and checks it returns one usable `user_id` column (and, for a
/// trait, one `value` column of a type in [`ValueType`]).
pub async fn inspect_query(
    conn: &mut PgConnection,
    key: &str,
    kind: Kind,
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
    let mut values = 0;
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
            "value" if kind == Kind::Trait => {
                values += 1;
                shape.value = Some(ValueType::of(&ty).ok_or_else(|| {
                    err(format!(
                        "column value has type {}; a trait's value must be {VALUE_TYPES} (cast it, e.g. value::text)",
                        ty.to_lowercase()
                    ))
                })?);
            }
            _ => {}
        }
    }
    if kind == Kind::Trait && values != 1 {
        return Err(err(if values == 0 {
            format!(
                "a trait's query returns user_id and a value column; this one returns: {} (alias the value AS value)",
                cols.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
            )
        } else {
            "query returns more than one value column".into()
        }));
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
        // A key keeps its kind: its confirmed rows mean membership or values, not either.
        let stored: Option<String> =
            sqlx::query_scalar("SELECT kind FROM audiences WHERE key = $1 FOR UPDATE")
                .bind(&def.key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(stored) = stored.filter(|k| k != def.kind.as_str()) {
            let a = |kind: &str| {
                if kind == "audience" {
                    "an audience"
                } else {
                    "a trait"
                }
            };
            return Err(AudienceError::KindChanged {
                key: def.key.clone(),
                stored: a(&stored),
                wanted: a(def.kind.as_str()),
            });
        }
        let row = sqlx::query(
            "INSERT INTO audiences
                    (key, name, query, schedule, external_source, enabled, kind, on_missing)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (key) DO UPDATE SET
                name = EXCLUDED.name, query = EXCLUDED.query, schedule = EXCLUDED.schedule,
                external_source = EXCLUDED.external_source, enabled = EXCLUDED.enabled,
                on_missing = EXCLUDED.on_missing, updated_at = now()
             WHERE (audiences.name, audiences.query, audiences.schedule,
                    audiences.external_source, audiences.enabled, audiences.on_missing)
                IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.query, EXCLUDED.schedule,
                    EXCLUDED.external_source, EXCLUDED.enabled, EXCLUDED.on_missing)
             RETURNING id",
        )
        .bind(&def.key)
        .bind(&def.name)
        .bind(&def.query)
        .bind(&def.schedule)
        .bind(def.source_url.is_some())
        .bind(def.enabled)
        .bind(def.kind.as_str())
        .bind(def.on_missing.as_str())
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
