//! Wigzo client: owns the identify call's wire format, sends it, and classifies the answer
//! (confirm / retry / reject / token refused). Retry *timing* lives here too, as pure functions.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use crate::config::WigzoConfig;
use crate::outbox::Change;

/// Path of the identify endpoint under the base URL.
pub const IDENTIFY_PATH: &str = "/rest/v1/learn/identify";
/// Longest response-body excerpt kept for a rejected change.
const EXCERPT_LEN: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("no Wigzo organization token configured: set WIGZO_ORG_TOKEN or [wigzo] org_token")]
    NoToken,
}

/// What one identify call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: Wigzo has the change.
    Confirmed { status: u16 },
    /// 429, 5xx, timeout or connection error: try again later. `throttled` (429) calls do not
    /// use up the attempt budget.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
        throttled: bool,
    },
    /// Any other 4xx: Wigzo refuses this one change.
    Rejected { status: u16, error: String },
    /// 401/403: the organization token was refused; the run must stop.
    Unauthorized { status: u16 },
}

/// Builds the identify call for one change.
pub fn identify_payload(audience_id: i64, key: &str, change: &Change) -> Value {
    let mut traits = Map::new();
    traits.insert(key.to_string(), Value::Bool(change.member));
    let mut body = Map::new();
    body.insert("type".into(), json!("identify"));
    body.insert("userId".into(), json!(change.user_id));
    body.insert("messageId".into(), json!(change.message_id.to_string()));
    body.insert("timestamp".into(), json!(rfc3339(change.detected_at)));
    for (field, value) in [
        ("email", &change.email),
        ("phone", &change.phone),
        ("name", &change.name),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            traits.insert(field.into(), json!(v));
            if field != "name" {
                body.insert(field.into(), json!(v));
            } else {
                body.insert("fullName".into(), json!(v));
            }
        }
    }
    body.insert("traits".into(), Value::Object(traits));
    body.insert(
        "context".into(),
        json!({
            "personas": {
                "computation_class": "audience",
                "computation_key": key,
                "computation_id": audience_id.to_string(),
            },
            "library": {"name": "audience-sync", "version": env!("CARGO_PKG_VERSION")},
        }),
    );
    body.insert("is_active".into(), json!(true));
    Value::Object(body)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Sends identify calls. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct WigzoClient {
    http: reqwest::Client,
    url: String,
    token: SecretString,
}

impl std::fmt::Debug for WigzoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WigzoClient")
            .field("url", &self.url)
            .field("token", &"[redacted]")
            .finish()
    }
}

impl WigzoClient {
    pub fn new(cfg: &WigzoConfig) -> Result<Self, ClientError> {
        let token = cfg.org_token.clone().ok_or(ClientError::NoToken)?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(cfg.concurrency.max(1))
            .user_agent(concat!("audience-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Build(e.without_url().to_string()))?;
        Ok(Self {
            http,
            url: format!("{}{IDENTIFY_PATH}", cfg.base_url),
            token,
        })
    }

    /// The endpoint, without the token (safe to log).
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    /// Sends one call and classifies the answer. Never returns or logs the token.
    pub async fn send(&self, body: &Value) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = self.send_inner(body).await;
        crate::metrics::observe_delivery_latency(started.elapsed().as_secs_f64());
        outcome
    }

    /// A response body with the token blanked out: an error page that echoes the request
    /// (URL and query string) must not carry the token into stored errors and logs.
    fn without_token(&self, mut text: String) -> String {
        let token = self.token.expose_secret();
        if token.is_empty() {
            return text;
        }
        // As it travels in the query string (form-encoded).
        let mut url = reqwest::Url::parse("http://x/").expect("valid URL");
        url.query_pairs_mut().append_pair("t", token);
        let encoded = url
            .query()
            .and_then(|q| q.strip_prefix("t="))
            .unwrap_or_default()
            .to_string();
        for t in [token, encoded.as_str()] {
            if text.contains(t) {
                text = text.replace(t, "[redacted]");
            }
        }
        text
    }

    async fn send_inner(&self, body: &Value) -> Outcome {
        let res = self
            .http
            .post(&self.url)
            .query(&[("org_token", self.token.expose_secret())])
            .json(body)
            .send()
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                };
                return Outcome::Retry {
                    status: None,
                    error: format!("{kind}: {}", error_chain(&e.without_url())),
                    retry_after: None,
                    throttled: false,
                };
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read the body so the connection goes back to the pool, even on success.
        if (200..300).contains(&status) {
            let _ = resp.bytes().await;
            return Outcome::Confirmed { status };
        }
        let text = resp.text().await.unwrap_or_default();
        classify(status, retry_after, &self.without_token(text))
    }
}

/// Maps a status and body to an outcome (the retry *decision*).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Outcome {
    match status {
        200..=299 => Outcome::Confirmed { status },
        401 | 403 => Outcome::Unauthorized { status },
        429 => Outcome::Retry {
            status: Some(status),
            error: format!("429 Too Many Requests: {}", excerpt(body)),
            retry_after,
            throttled: true,
        },
        408 | 500..=599 => Outcome::Retry {
            status: Some(status),
            error: format!("HTTP {status}: {}", excerpt(body)),
            retry_after,
            throttled: false,
        },
        _ => Outcome::Rejected {
            status,
            error: format!("HTTP {status}: {}", excerpt(body)),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A short, single-line excerpt of a response body.
pub fn excerpt(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(EXCERPT_LEN)
        .collect();
    if one_line.trim().is_empty() {
        "(empty body)".into()
    } else {
        one_line.trim().to_string()
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Exponential backoff with full jitter: a random delay in [0, min(max, base * 2^n)], never
/// less than base/2 so retries do not hammer a struggling host.
pub fn backoff(retry_number: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << retry_number.min(20));
    let cap = exp.min(max).max(base / 2);
    let lo = (base / 2).as_millis() as u64;
    let hi = cap.as_millis() as u64;
    Duration::from_millis(if hi > lo {
        rand::rng().random_range(lo..=hi)
    } else {
        lo
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(classify(200, None, ""), Outcome::Confirmed { status: 200 });
        assert_eq!(classify(204, None, ""), Outcome::Confirmed { status: 204 });
        assert!(matches!(
            classify(401, None, ""),
            Outcome::Unauthorized { status: 401 }
        ));
        assert!(matches!(
            classify(403, None, ""),
            Outcome::Unauthorized { status: 403 }
        ));
        assert!(matches!(
            classify(429, Some(Duration::from_secs(3)), ""),
            Outcome::Retry { throttled: true, retry_after: Some(d), .. } if d == Duration::from_secs(3)
        ));
        for s in [500, 502, 503, 408] {
            assert!(matches!(
                classify(s, None, ""),
                Outcome::Retry {
                    throttled: false,
                    ..
                }
            ));
        }
        match classify(400, None, "{\"error\":\"bad email\"}\n") {
            Outcome::Rejected { status, error } => {
                assert_eq!(status, 400);
                assert_eq!(error, "HTTP 400: {\"error\":\"bad email\"}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for n in 0..30 {
            let d = backoff(n, base, max);
            assert!(d >= base / 2 && d <= max, "retry {n}: {d:?}");
        }
        let late: u128 = (0..50).map(|_| backoff(10, base, max).as_millis()).sum();
        let early: u128 = (0..50).map(|_| backoff(0, base, max).as_millis()).sum();
        assert!(late > early * 3, "late {late} early {early}");
    }

    #[test]
    fn bodies_echoing_the_token_are_redacted_raw_and_encoded() {
        let cfg = WigzoConfig::new("http://127.0.0.1:9", "s3c r/t+k");
        let client = WigzoClient::new(&cfg).unwrap();
        let body = "bad: /identify?org_token=s3c+r%2Ft%2Bk (token s3c r/t+k)".to_string();
        let clean = client.without_token(body);
        assert_eq!(
            clean,
            "bad: /identify?org_token=[redacted] (token [redacted])"
        );
    }

    #[test]
    fn excerpt_is_one_short_line() {
        let e = excerpt(&format!("line1\nline2{}", "x".repeat(1000)));
        assert!(!e.contains('\n') && e.chars().count() <= EXCERPT_LEN);
        assert_eq!(excerpt("  "), "(empty body)");
    }
}
