//! Prometheus metrics: run and change counts read from the database at scrape time (the same
//! on every replica, and always equal to the runs table), plus this process's delivery latency.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the delivery latency buckets, in seconds (5 ms .. 30 s; the client's
/// timeout is 10 s by default).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];

/// Time of one identify call, request to response.
static DELIVERY_LATENCY: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(LATENCY_BUCKETS));

/// Records one identify call's duration (any outcome).
pub fn observe_delivery_latency(seconds: f64) {
    DELIVERY_LATENCY.observe(seconds);
}

type Labels = Vec<(String, String)>;

/// Every per-audience series is labelled with the key (`audience`, for audiences and traits
/// alike, so dashboards and alerts written for audiences cover traits) and
/// `computation_class` (`audience` or `trait`, as the identify call names it).
fn audience(key: &str, class: &str) -> Labels {
    vec![
        ("audience".to_string(), key.to_string()),
        ("computation_class".to_string(), class.to_string()),
    ]
}

/// Renders every metric in the OpenMetrics text format.
pub async fn render(pool: &PgPool) -> Result<String, sqlx::Error> {
    let mut registry = Registry::default();
    register_runs(&mut registry, pool).await?;
    register_changes(&mut registry, pool).await?;
    register_audiences(&mut registry, pool).await?;
    registry.register(
        "audience_sync_delivery_latency_seconds",
        "Duration of identify calls made by this process",
        DELIVERY_LATENCY.clone(),
    );

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    Ok(out)
}

/// `audience_sync_runs`: runs by audience, kind and final status.
async fn register_runs(registry: &mut Registry, pool: &PgPool) -> Result<(), sqlx::Error> {
    let runs = Family::<Labels, Counter>::default();
    let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
        "SELECT a.key, a.kind, r.kind, r.status, count(*)
           FROM runs r JOIN audiences a ON a.id = r.audience_id
          GROUP BY 1, 2, 3, 4",
    )
    .fetch_all(pool)
    .await?;
    for (key, class, kind, status, n) in rows {
        let mut l = audience(&key, &class);
        l.push(("kind".into(), kind));
        l.push(("status".into(), status));
        runs.get_or_create(&l).inc_by(n.max(0) as u64);
    }
    registry.register(
        "audience_sync_runs",
        "Runs by audience, kind and final status",
        runs,
    );
    Ok(())
}

/// Changes sent, failed and retried, and the last success, per audience (sums over runs).
async fn register_changes(registry: &mut Registry, pool: &PgPool) -> Result<(), sqlx::Error> {
    let sent = Family::<Labels, Counter>::default();
    let failed = Family::<Labels, Counter>::default();
    let retried = Family::<Labels, Counter>::default();
    let last_success = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let rows: Vec<(String, String, i64, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT a.key, a.kind, coalesce(sum(r.sent), 0)::bigint,
                coalesce(sum(r.failed), 0)::bigint, coalesce(sum(r.retried), 0)::bigint,
                extract(epoch FROM max(r.finished_at) FILTER (WHERE r.status = 'succeeded'))::float8
           FROM audiences a LEFT JOIN runs r ON r.audience_id = a.id
          GROUP BY a.key, a.kind",
    )
    .fetch_all(pool)
    .await?;
    for (key, class, s, f, rt, ok_at) in rows {
        let l = audience(&key, &class);
        sent.get_or_create(&l).inc_by(s.max(0) as u64);
        failed.get_or_create(&l).inc_by(f.max(0) as u64);
        retried.get_or_create(&l).inc_by(rt.max(0) as u64);
        if let Some(t) = ok_at {
            last_success.get_or_create(&l).set(t);
        }
    }
    registry.register(
        "audience_sync_changes_sent",
        "Changes confirmed by Wigzo (sum over runs)",
        sent,
    );
    registry.register(
        "audience_sync_changes_failed",
        "Changes not delivered by their run: rejected or out of retries (sum over runs)",
        failed,
    );
    registry.register(
        "audience_sync_changes_retried",
        "Extra HTTP attempts made (sum over runs)",
        retried,
    );
    registry.register(
        "audience_sync_last_success_timestamp_seconds",
        "When the audience's latest successful run finished (Unix time)",
        last_success,
    );
    Ok(())
}

/// Per audience now: members, pending and failed changes, the oldest pending one, held.
async fn register_audiences(registry: &mut Registry, pool: &PgPool) -> Result<(), sqlx::Error> {
    let pending = Family::<Labels, Gauge>::default();
    let failed_now = Family::<Labels, Gauge>::default();
    let members = Family::<Labels, Gauge>::default();
    let oldest = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let held = Family::<Labels, Gauge>::default();
    #[derive(sqlx::FromRow)]
    struct Row {
        key: String,
        kind: String,
        members: i64,
        pending: i64,
        failed: i64,
        oldest_pending_s: Option<f64>,
        held: bool,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT key, kind, members, pending, failed,
                extract(epoch FROM oldest_pending_age)::float8 AS oldest_pending_s, held
           FROM ops.audience_overview",
    )
    .fetch_all(pool)
    .await?;
    for r in rows {
        let l = audience(&r.key, &r.kind);
        members.get_or_create(&l).set(r.members);
        pending.get_or_create(&l).set(r.pending);
        failed_now.get_or_create(&l).set(r.failed);
        oldest
            .get_or_create(&l)
            .set(r.oldest_pending_s.unwrap_or(0.0));
        held.get_or_create(&l).set(i64::from(r.held));
    }
    registry.register(
        "audience_sync_pending_changes",
        "Changes waiting to be delivered",
        pending,
    );
    registry.register(
        "audience_sync_failed_changes",
        "Changes rejected or out of retries, waiting for the next run",
        failed_now,
    );
    registry.register(
        "audience_sync_held",
        "1 while the audience's latest run is held by the removal guard (waiting for a person)",
        held,
    );
    registry.register(
        "audience_sync_members",
        "Members as last confirmed by Wigzo (for a trait: users with a confirmed value)",
        members,
    );
    registry.register(
        "audience_sync_oldest_pending_age_seconds",
        "Age of the oldest change still owed to Wigzo (0 when none)",
        oldest,
    );
    Ok(())
}
