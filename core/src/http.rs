//! The small HTTP surface every long-running process exposes: `/v1/health` (JSON, 200 when
//! healthy and 503 when not, so Consul and Nomad checks can use it as is) and `/metrics`
//! (Prometheus text).

use crate::metrics::Registry;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::Arc;

/// Answers whether the process is healthy, with details for the JSON body.
pub type HealthFn = Arc<dyn Fn() -> BoxFuture<'static, (bool, serde_json::Value)> + Send + Sync>;

/// A JSON document a process keeps current for operators (the scaler's `/v1/scaling`).
pub type Document = Arc<std::sync::Mutex<serde_json::Value>>;

#[derive(Clone)]
struct AppState {
    health: HealthFn,
    metrics: Arc<Registry>,
}

async fn document(State(d): State<Document>) -> impl IntoResponse {
    let v = d
        .lock()
        .map(|v| v.clone())
        .unwrap_or(serde_json::Value::Null);
    Json(v)
}

async fn health(State(s): State<AppState>) -> impl IntoResponse {
    let (ok, details) = (s.health)().await;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            serde_json::json!({"status": if ok { "ok" } else { "unhealthy" }, "details": details}),
        ),
    )
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// Binds `addr` and serves in the background; returns the bound address (`:0` resolves).
pub async fn serve(
    addr: &str,
    health_fn: HealthFn,
    registry: Arc<Registry>,
) -> std::io::Result<SocketAddr> {
    serve_with(addr, health_fn, registry, &[]).await
}

/// [`serve`], plus read-only JSON documents at the given paths.
pub async fn serve_with(
    addr: &str,
    health_fn: HealthFn,
    registry: Arc<Registry>,
    documents: &[(&'static str, Document)],
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let mut app = Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health: health_fn,
            metrics: registry,
        });
    for (path, doc) in documents {
        app = app.merge(
            Router::new()
                .route(path, get(document))
                .with_state(doc.clone()),
        );
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok(bound)
}
