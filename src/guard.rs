//! Removal guard: before a run writes or sends anything, it compares the removals its diff
//! would send with the audience's confirmed members, and holds the run for a person when the
//! query returned nothing or lost most of them (a truncated table, a renamed column, an empty
//! replica): "left the audience" calls cannot be recalled.

use sqlx::PgConnection;

/// When a run is held. Defaults from `[guard]`, overridable per audience.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guard {
    /// Hold when the removals exceed this share of the confirmed members (0-100; 100 never
    /// holds on share)...
    pub max_removed_percent: f64,
    /// ...and number at least this many (so small audiences are not held for small moves).
    pub min_removed: i64,
    /// Hold when the query returned no usable row while the audience has confirmed members.
    pub hold_empty: bool,
}

impl Default for Guard {
    fn default() -> Self {
        Self {
            max_removed_percent: 20.0,
            min_removed: 100,
            hold_empty: true,
        }
    }
}

/// What a run's query and diff would do to an audience, as the guard weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Users Wigzo has, or may have, as members: confirmed `true`, or owed a `true` that may
    /// already have reached it (a first sync whose calls timed out counts here).
    pub confirmed: i64,
    /// Of those, users the query no longer returns: the run would send each a `false`.
    pub removing: i64,
    /// Usable rows the query returned (distinct user ids).
    pub rows: i64,
    /// Rows skipped for an unusable user id.
    pub skipped: i64,
}

impl Guard {
    /// Why the run must be held, or `None` to let it through.
    pub fn verdict(&self, seen: &Seen) -> Option<String> {
        if seen.confirmed == 0 {
            return None;
        }
        let share = 100.0 * seen.removing as f64 / seen.confirmed as f64;
        let what = format!(
            "would remove {} of {} confirmed members ({share:.0}%, limit {}%)",
            seen.removing, seen.confirmed, self.max_removed_percent
        );
        let query = if seen.rows == 0 && seen.skipped > 0 {
            format!(
                "the query returned {} rows, all skipped for a NULL, empty or over-long user_id",
                seen.skipped
            )
        } else {
            format!("the query returned {} rows", seen.rows)
        };
        if self.hold_empty && seen.rows == 0 {
            return Some(format!("{what}; {query}"));
        }
        if share > self.max_removed_percent && seen.removing >= self.min_removed {
            return Some(format!("{what}; {query}"));
        }
        None
    }
}

/// Counts the users Wigzo has or may have as the audience's members, and those the captured
/// snapshot (`pg_temp.audience_capture`) no longer has.
pub async fn measure(conn: &mut PgConnection, audience_id: i64) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(crate::sql::GUARD_MEASURE)
        .bind(audience_id)
        .fetch_one(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(confirmed: i64, removing: i64, rows: i64, skipped: i64) -> Seen {
        Seen {
            confirmed,
            removing,
            rows,
            skipped,
        }
    }

    #[test]
    fn holds_an_empty_result_and_large_drops_only() {
        let g = Guard::default();
        let empty = g.verdict(&seen(49, 49, 0, 0)).unwrap();
        assert_eq!(
            empty,
            "would remove 49 of 49 confirmed members (100%, limit 20%); the query returned 0 rows"
        );
        let skipped = g.verdict(&seen(49, 49, 0, 49)).unwrap();
        assert!(skipped.contains("49 rows, all skipped"), "{skipped}");
        // 5% churn, 25% of 1000, 25% of 40 (under min_removed).
        assert_eq!(g.verdict(&seen(1000, 50, 950, 0)), None);
        assert!(g.verdict(&seen(1000, 250, 750, 0)).is_some());
        assert_eq!(g.verdict(&seen(40, 10, 30, 0)), None);
        // Nothing confirmed yet: nothing to lose.
        assert_eq!(g.verdict(&seen(0, 0, 0, 0)), None);
        let off = Guard {
            hold_empty: false,
            max_removed_percent: 100.0,
            ..g
        };
        assert_eq!(off.verdict(&seen(49, 49, 0, 0)), None);
    }
}
