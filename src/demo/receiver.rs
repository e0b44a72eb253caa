//! An in-process Wigzo-compatible receiver on 127.0.0.1 that answers identify calls and keeps
//! bounded statistics of them (for the demo and benchmarks; tests use their own mocks).
//!
//! It accepts `POST /rest/v1/learn/identify?org_token=TOKEN` with a JSON body and answers:
//!
//! * `200 {"status":"success"}` when `org_token` matches and the body is a JSON object with a
//!   `userId`;
//! * `401` when `org_token` is missing or wrong;
//! * `400` when the body is not JSON or has no `userId`.
//!
//! Memory stays bounded however many calls arrive: two counters, plus per audience key
//! (`context.personas.computation_key`) the entered/left counts and the last body received,
//! for at most [`MAX_KEYS`] keys.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::oneshot;

/// The path Wigzo serves identify calls on.
pub const IDENTIFY_PATH: &str = "/rest/v1/learn/identify";

/// At most this many distinct audience keys are tracked; calls for further keys are still
/// answered and counted in [`Receiver::calls`], but get no per-key stats or sample.
pub const MAX_KEYS: usize = 10_000;

/// How long [`Receiver::shutdown`] waits for open connections before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Calls per audience key: `entered` counts trait value `true`, `left` counts `false`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStats {
    /// Calls that set the audience's trait to `true`.
    pub entered: u64,
    /// Calls that set it to `false`.
    pub left: u64,
}

#[derive(Default)]
struct KeyEntry {
    stats: KeyStats,
    sample: Value,
}

#[derive(Default)]
struct Inner {
    token: String,
    calls: AtomicU64,
    rejected: AtomicU64,
    /// Per computation key: counts and the last call (one sample per key: bounded).
    keys: Mutex<HashMap<String, KeyEntry>>,
}

impl Inner {
    /// The key map; a panic elsewhere while holding the lock cannot leave it inconsistent
    /// (every update is a single increment or assignment), so poisoning is ignored.
    fn keys(&self) -> MutexGuard<'_, HashMap<String, KeyEntry>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reject(&self, status: StatusCode, body: &'static str) -> Response {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        json_response(status, body)
    }
}

/// A running receiver; stops when dropped (best effort) or on [`Receiver::shutdown`].
pub struct Receiver {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is deliberately left out.
        f.debug_struct("Receiver")
            .field("addr", &self.addr)
            .field("calls", &self.calls())
            .field("rejected", &self.rejected())
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Starts on a random port of 127.0.0.1, accepting calls that carry `org_token`.
    /// Must be called within a Tokio runtime.
    pub async fn start(org_token: &str) -> std::io::Result<Receiver> {
        let inner = Arc::new(Inner {
            token: org_token.to_string(),
            ..Inner::default()
        });
        let app = Router::new()
            .route(IDENTIFY_PATH, post(identify))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // Resolves on send and when the sender is dropped.
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "receiver stopped with an error");
            }
        });
        tracing::debug!(%addr, "receiver listening");
        Ok(Receiver {
            addr,
            inner,
            stop: Some(tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls accepted (answered 200).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Calls refused (answered 401 or 400).
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Accepted calls for an audience key, by trait value; zeros for an unknown key.
    pub fn stats(&self, key: &str) -> KeyStats {
        self.inner
            .keys()
            .get(key)
            .map(|e| e.stats.clone())
            .unwrap_or_default()
    }

    /// The body of the last accepted call for an audience key.
    pub fn sample(&self, key: &str) -> Option<Value> {
        self.inner.keys().get(key).map(|e| e.sample.clone())
    }

    /// Stops accepting connections and waits (a few seconds at most) for open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::debug!("receiver connections still open after grace period; aborting");
                task.abort();
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    org_token: Option<String>,
}

fn json_response(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn identify(
    State(s): State<Arc<Inner>>,
    query: Result<Query<TokenQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let authorized =
        matches!(&query, Ok(Query(TokenQuery { org_token: Some(t) })) if *t == s.token);
    if !authorized {
        return s.reject(StatusCode::UNAUTHORIZED, r#"{"error":"invalid org_token"}"#);
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return s.reject(StatusCode::BAD_REQUEST, r#"{"error":"body is not JSON"}"#);
    };
    if v.get("userId").is_none_or(Value::is_null) {
        return s.reject(StatusCode::BAD_REQUEST, r#"{"error":"userId is required"}"#);
    }
    if let Some(key) = v["context"]["personas"]["computation_key"].as_str() {
        let value = v["traits"][key].as_bool();
        let mut keys = s.keys();
        let len = keys.len();
        let entry = match keys.get_mut(key) {
            Some(e) => e,
            None if len < MAX_KEYS => keys.entry(key.to_string()).or_default(),
            None => {
                drop(keys);
                s.calls.fetch_add(1, Ordering::Relaxed);
                return json_response(StatusCode::OK, r#"{"status":"success"}"#);
            }
        };
        match value {
            Some(true) => entry.stats.entered += 1,
            Some(false) => entry.stats.left += 1,
            None => {}
        }
        entry.sample = v;
    }
    s.calls.fetch_add(1, Ordering::Relaxed);
    json_response(StatusCode::OK, r#"{"status":"success"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(user: &str, key: &str, value: bool) -> Value {
        serde_json::json!({
            "userId": user,
            "traits": {key: value},
            "context": {"personas": {"computation_key": key}},
        })
    }

    #[tokio::test]
    async fn counts_calls_per_key_and_refuses_a_wrong_token() {
        let r = Receiver::start("tok").await.unwrap();
        assert!(r.base_url().starts_with("http://127.0.0.1:"));
        crate::wigzo::install_crypto_provider();
        let http = reqwest::Client::new();
        let url = format!("{}{IDENTIFY_PATH}", r.base_url());
        for (user, value) in [("1", true), ("2", true), ("3", false)] {
            let resp = http
                .post(&url)
                .query(&[("org_token", "tok")])
                .json(&call(user, "k", value))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body, serde_json::json!({"status": "success"}));
        }
        let resp = http
            .post(&url)
            .query(&[("org_token", "nope")])
            .json(&call("4", "k", true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        assert_eq!(r.calls(), 3);
        assert_eq!(r.rejected(), 1);
        assert_eq!(
            r.stats("k"),
            KeyStats {
                entered: 2,
                left: 1
            }
        );
        assert_eq!(r.stats("other"), KeyStats::default());
        assert_eq!(r.sample("k").unwrap()["userId"], "3");
        assert_eq!(r.sample("other"), None);
        r.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_missing_token_bad_json_and_missing_user_id() {
        let r = Receiver::start("tok").await.unwrap();
        crate::wigzo::install_crypto_provider();
        let http = reqwest::Client::new();
        let url = format!("{}{IDENTIFY_PATH}", r.base_url());

        let no_token = http.post(&url).json(&call("1", "k", true));
        assert_eq!(no_token.send().await.unwrap().status(), 401);

        let not_json = http
            .post(&url)
            .query(&[("org_token", "tok")])
            .body("{not json");
        assert_eq!(not_json.send().await.unwrap().status(), 400);

        let no_user = http
            .post(&url)
            .query(&[("org_token", "tok")])
            .json(&serde_json::json!({"traits": {"k": true}}));
        assert_eq!(no_user.send().await.unwrap().status(), 400);

        assert_eq!(r.calls(), 0);
        assert_eq!(r.rejected(), 3);
        assert_eq!(r.stats("k"), KeyStats::default());
        r.shutdown().await;
    }

    #[tokio::test]
    async fn stops_listening_after_shutdown_and_drop() {
        let r = Receiver::start("tok").await.unwrap();
        let addr = r.addr;
        r.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());

        let r = Receiver::start("tok").await.unwrap();
        let addr = r.addr;
        drop(r);
        // Abort takes effect at the task's next poll; give it a moment.
        let mut closed = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "receiver still listening after drop");
    }
}
