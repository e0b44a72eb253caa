//! Wigzo client: owns the identify call's wire format, sends it, and classifies the answer
//! (confirm / retry / reject / stop the run). Retry *timing* lives here too, as pure functions.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::audience::Kind;
use crate::config::WigzoConfig;
use crate::outbox::Change;

/// Path of the identify endpoint under the base URL.
pub const IDENTIFY_PATH: &str = "/rest/v1/learn/identify";
/// Longest response-body excerpt kept for a rejected change.
const EXCERPT_LEN: usize = 300;
/// Most of a response body ever read: error pages can be large or never end, and only an
/// excerpt is kept.
pub const MAX_BODY_READ: usize = 4096;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// reqwest refused the settings.
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    /// No organization token.
    #[error("no Wigzo organization token configured: set WIGZO_ORG_TOKEN or [wigzo] org_token")]
    NoToken,
}

/// What one identify call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: Wigzo has the change.
    Confirmed {
        /// The 2xx status.
        status: u16,
    },
    /// 429, 5xx, timeout or connection error: try again later. `throttled` (429) calls do not
    /// use up the attempt budget.
    Retry {
        /// The HTTP status, if there was an answer.
        status: Option<u16>,
        /// What went wrong (a body excerpt or the transport error).
        error: String,
        /// How long Wigzo asked to wait.
        retry_after: Option<Duration>,
        /// A 429: does not use up the attempt budget.
        throttled: bool,
    },
    /// Any other 4xx: Wigzo refuses this one change.
    Rejected {
        /// The 4xx status.
        status: u16,
        /// A body excerpt, the token blanked out.
        error: String,
    },
    /// 401/403: the organization token was refused; the run must stop.
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// 3xx: the call was answered by a redirect, which is never followed (a POST re-sent as a
    /// GET elsewhere would confirm nothing Wigzo applied). `base_url` is wrong; the run must
    /// stop. `location_host` is the host the answer pointed to, if it named one.
    Redirected {
        /// The 3xx status.
        status: u16,
        /// The host its `Location` named, if any.
        location_host: Option<String>,
    },
}

impl Outcome {
    /// The HTTP status Wigzo answered with; `None` when there was no answer (timeout,
    /// connection error).
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Confirmed { status }
            | Outcome::Rejected { status, .. }
            | Outcome::Unauthorized { status }
            | Outcome::Redirected { status, .. } => Some(*status),
            Outcome::Retry { status, .. } => *status,
        }
    }
}

/// The identify call for one change, borrowed from it and serialised straight into the request
/// body (no JSON tree is built per call).
#[derive(Debug, serde::Serialize)]
pub struct Identify<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "userId")]
    user_id: &'a str,
    #[serde(rename = "messageId")]
    message_id: uuid::Uuid,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<&'a str>,
    #[serde(rename = "fullName", skip_serializing_if = "Option::is_none")]
    full_name: Option<&'a str>,
    traits: Traits<'a>,
    context: Context<'a>,
    is_active: bool,
}

/// `{"<key>": value, "email": ..., "phone": ..., "name": ...}`; a contact field of the same
/// name as the key is left out so that the value is not overwritten.
#[derive(Debug)]
struct Traits<'a> {
    key: &'a str,
    value: TraitValue<'a>,
    email: Option<&'a str>,
    phone: Option<&'a str>,
    name: Option<&'a str>,
}

impl serde::Serialize for Traits<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match self.value {
            TraitValue::Flag(member) => m.serialize_entry(self.key, &member)?,
            TraitValue::Json(raw) => m.serialize_entry(self.key, raw)?,
            TraitValue::String(text) => m.serialize_entry(self.key, text)?,
        }
        for (field, value) in [
            ("email", self.email),
            ("phone", self.phone),
            ("name", self.name),
        ] {
            // An audience keyed "email", "phone" or "name" keeps its membership flag.
            if let Some(v) = value
                && field != self.key
            {
                m.serialize_entry(field, v)?;
            }
        }
        m.end()
    }
}

/// What the key is set to.
#[derive(Debug, Clone, Copy)]
enum TraitValue<'a> {
    /// An audience's membership.
    Flag(bool),
    /// A trait's value: canonical JSON made by the capture's SQL, written into the body as it is.
    Json(&'a serde_json::value::RawValue),
    /// A stored value that is not JSON (never made by the capture): sent as a string rather
    /// than breaking the body.
    String(&'a str),
}

impl<'a> TraitValue<'a> {
    fn of(change: &'a Change) -> Self {
        match change.value.as_deref() {
            None => TraitValue::Flag(change.member),
            Some(v) => match serde_json::from_str::<&serde_json::value::RawValue>(v) {
                Ok(raw) => TraitValue::Json(raw),
                Err(_) => TraitValue::String(v),
            },
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct Context<'a> {
    personas: Personas<'a>,
    library: Library,
}

#[derive(Debug, serde::Serialize)]
struct Personas<'a> {
    computation_class: &'static str,
    computation_key: &'a str,
    #[serde(serialize_with = "as_string")]
    computation_id: i64,
}

#[derive(Debug, serde::Serialize)]
struct Library {
    name: &'static str,
    version: &'static str,
}

fn as_string<S: serde::Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl<'a> Identify<'a> {
    /// The identify call for one change of audience or trait `audience_id` (key `key`). Empty
    /// contact fields are left out.
    pub fn new(audience_id: i64, key: &'a str, kind: Kind, change: &'a Change) -> Self {
        let present = |v: &'a Option<String>| v.as_deref().filter(|v| !v.is_empty());
        let (email, phone, name) = (
            present(&change.email),
            present(&change.phone),
            present(&change.name),
        );
        Identify {
            kind: "identify",
            user_id: &change.user_id,
            message_id: change.message_id,
            timestamp: rfc3339(change.detected_at),
            email,
            phone,
            full_name: name,
            traits: Traits {
                key,
                value: TraitValue::of(change),
                email,
                phone,
                name,
            },
            context: Context {
                personas: Personas {
                    computation_class: kind.as_str(),
                    computation_key: key,
                    computation_id: audience_id,
                },
                library: Library {
                    name: "audience-sync",
                    version: env!("CARGO_PKG_VERSION"),
                },
            },
            is_active: true,
        }
    }
}

/// The identify call for one change as a JSON value (dry-run samples, tests).
pub fn identify_payload(audience_id: i64, key: &str, kind: Kind, change: &Change) -> Value {
    serde_json::to_value(Identify::new(audience_id, key, kind, change)).expect("serialisable")
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Installs ring as the process's TLS crypto provider. reqwest is built without a provider of
/// its own, so TLS to Wigzo uses ring, the provider sqlx uses for PostgreSQL, and one crypto
/// stack is compiled. Every process that builds a `reqwest::Client` calls this first (the
/// binary does at start; [`WigzoClient::new`] does too); calling it again is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sends identify calls. Cheap to clone (one connection pool).
#[derive(Clone)]
pub struct WigzoClient {
    http: reqwest::Client,
    url: String,
    token: SecretString,
    /// This token's rate and 429 pause, shared by every clone (every run of the process).
    budget: crate::budget::Budget,
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
    /// A client for this destination; fails without a token.
    pub fn new(cfg: &WigzoConfig) -> Result<Self, ClientError> {
        let token = cfg.org_token.clone().ok_or(ClientError::NoToken)?;
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(cfg.concurrency.max(1))
            .user_agent(concat!("audience-sync/", env!("CARGO_PKG_VERSION")))
            // Only a 2xx from Wigzo itself confirms a call: a redirect is an answer, not a hop.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Build(e.without_url().to_string()))?;
        // Replicas with the same destination and token share one budget; the token itself is
        // never stored, only this fingerprint.
        let destination = {
            use md5::Digest;
            let mut h = md5::Md5::new();
            h.update(cfg.base_url.as_bytes());
            h.update(b"\n");
            h.update(token.expose_secret().as_bytes());
            let digest: [u8; 16] = h.finalize().into();
            uuid::Uuid::from_bytes(digest).simple().to_string()
        };
        let budget = crate::budget::Budget::new(cfg.requests_per_second, destination);
        Ok(Self {
            http,
            url: format!("{}{IDENTIFY_PATH}", cfg.base_url),
            token,
            budget,
        })
    }

    /// The budget every run using this client (or a clone of it) shares.
    pub fn budget(&self) -> &crate::budget::Budget {
        &self.budget
    }

    /// The endpoint, without the token (safe to log).
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    /// Sends one call and classifies the answer. Never returns or logs the token.
    pub async fn send(&self, body: &Identify<'_>) -> Outcome {
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

    async fn send_inner(&self, body: &Identify<'_>) -> Outcome {
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
        if (300..400).contains(&status) {
            let location_host = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| resp.url().join(l).ok())
                .and_then(|u| u.host_str().map(str::to_string));
            return Outcome::Redirected {
                status,
                location_host,
            };
        }
        // Read the body (bounded) so a short one lets the connection go back to the pool.
        let body = read_bounded(resp, MAX_BODY_READ).await;
        if (200..300).contains(&status) {
            return Outcome::Confirmed { status };
        }
        classify(status, retry_after, &self.without_token(body))
    }
}

/// At most `limit` bytes of a response body (as text, lossily): whatever the server sends,
/// however slowly, no more is read. A body cut short closes its connection.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - buf.len());
                buf.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Maps a status and body to an outcome (the retry *decision*).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Outcome {
    match status {
        200..=299 => Outcome::Confirmed { status },
        401 | 403 => Outcome::Unauthorized { status },
        300..=399 => Outcome::Redirected {
            status,
            location_host: None,
        },
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
    use serde_json::json;

    fn change(email: Option<&str>, name: Option<&str>) -> Change {
        Change {
            user_id: "u-1".into(),
            member: false,
            value: None,
            email: email.map(Into::into),
            phone: Some(String::new()),
            name: name.map(Into::into),
            target_version: 3,
            message_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            detected_at: DateTime::from_timestamp_millis(1_764_000_000_123).unwrap(),
        }
    }

    #[test]
    fn a_traits_value_is_written_as_its_json_and_a_removal_as_null() {
        let mut c = change(Some("a@example.com"), None);
        for (stored, sent) in [
            ("1.5", json!(1.5)),
            ("12345678901234567890", json!(12345678901234567890u64)),
            (
                "\"12345678901234567890.5\"",
                json!("12345678901234567890.5"),
            ),
            ("\"gold\"", json!("gold")),
            ("true", json!(true)),
            ("\"2026-01-02T03:04:05Z\"", json!("2026-01-02T03:04:05Z")),
            ("null", json!(null)),
        ] {
            c.member = stored != "null";
            c.value = Some(stored.into());
            let body = serde_json::to_string(&Identify::new(9, "ltv", Kind::Trait, &c)).unwrap();
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["traits"]["ltv"], sent, "{stored}");
            assert!(body.contains(&format!("\"ltv\":{stored}")), "{body}");
            assert_eq!(v["context"]["personas"]["computation_class"], "trait");
            assert_eq!(v["traits"]["email"], "a@example.com");
        }
        // Not JSON (never made by the capture): a string, and the body stays JSON.
        c.value = Some("1.5.5".into());
        let v = identify_payload(9, "ltv", Kind::Trait, &c);
        assert_eq!(v["traits"]["ltv"], "1.5.5");
    }

    #[test]
    fn trait_message_ids_differ_by_value_under_one_change_number() {
        use crate::outbox::{Sent, message_id};
        let ids = [
            message_id(3, "u", 2, Sent::Value("false")),
            message_id(3, "u", 2, Sent::Value("null")),
            message_id(3, "u", 2, Sent::Value("1")),
            message_id(3, "u", 2, Sent::Value("\"1\"")),
            message_id(3, "u", 3, Sent::Value("1")),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // An audience's ids are the formula older versions stored.
        assert_eq!(
            message_id(3, "u", 2, Sent::Flag(true)),
            uuid::Uuid::from_bytes(<md5::Md5 as md5::Digest>::digest(b"3:u:2:true").into())
        );
    }

    #[test]
    fn identify_payload_has_the_documented_shape() {
        let c = change(Some("a@example.com"), Some("Ann"));
        assert_eq!(
            identify_payload(7, "dormant_shoppers", Kind::Audience, &c),
            json!({
                "type": "identify",
                "userId": "u-1",
                "messageId": "01234567-89ab-cdef-0123-456789abcdef",
                "timestamp": "2025-11-24T16:00:00.123Z",
                "email": "a@example.com",
                "fullName": "Ann",
                "traits": {"dormant_shoppers": false, "email": "a@example.com", "name": "Ann"},
                "context": {
                    "personas": {
                        "computation_class": "audience",
                        "computation_key": "dormant_shoppers",
                        "computation_id": "7",
                    },
                    "library": {"name": "audience-sync", "version": env!("CARGO_PKG_VERSION")},
                },
                "is_active": true,
            })
        );
    }

    #[test]
    fn an_audience_keyed_like_a_contact_field_keeps_its_flag() {
        let c = change(Some("a@example.com"), None);
        let body = serde_json::to_string(&Identify::new(1, "email", Kind::Audience, &c)).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["traits"], json!({"email": false}));
        assert!(body.contains(r#""traits":{"email":false}"#), "{body}");
    }

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

    #[tokio::test]
    async fn https_works_with_the_one_crypto_provider() {
        // reqwest has no provider of its own: building a client and making a TLS connection
        // must find ring installed (a missing provider panics here).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = WigzoClient::new(&WigzoConfig::new(url, "t")).unwrap();
        let c = change(None, None);
        let outcome = client
            .send(&Identify::new(1, "k", Kind::Audience, &c))
            .await;
        assert!(
            matches!(&outcome, Outcome::Retry { status: None, error, .. } if error.starts_with("connection failed")),
            "{outcome:?}"
        );
    }

    #[test]
    fn excerpt_is_one_short_line() {
        let e = excerpt(&format!("line1\nline2{}", "x".repeat(1000)));
        assert!(!e.contains('\n') && e.chars().count() <= EXCERPT_LEN);
        assert_eq!(excerpt("  "), "(empty body)");
    }
}
