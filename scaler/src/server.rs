//! Assembles a running scaler: opens the store, binds the sockets (intake, dispatch, the event
//! forwarder) and the HTTP endpoint, starts the loops, and takes it all down again in an order
//! that lets every ZeroMQ socket close with its linger instead of hanging.

use crate::dispatch::DispatchConfig;
use crate::dispatch_service::{self, DispatchHandle};
use crate::{intake, metrics as m, recovery};
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use transcode_core::bus::{self, BusError, Forwarder, Multipart, Publisher, SocketHandle};
use transcode_core::metrics::Registry;
use transcode_core::store::{self, StoreError, StoreResult};
use transcode_core::{Event, Origin, Store};

/// Messages buffered between a socket thread and its loop before libzmq's own queue (and its
/// high-water mark) takes the pressure.
const INBOUND_CAPACITY: usize = 4096;
/// Most tasks held in the in-memory queue; beyond it the store holds them until a scan.
pub const QUEUE_CAPACITY: usize = 100_000;
/// Longest a single store call may take before the caller treats the store as unavailable.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the health check waits for the store.
const HEALTH_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for the loops, then for the sockets to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a scaler needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub store_url: String,
    pub pool_size: usize,
    /// Run migrations before serving.
    pub migrate: bool,
    pub intake: String,
    pub dispatch: String,
    pub events_pub: String,
    pub events_sub: String,
    pub http: String,
    /// Member id, the `source` of the scaler's events.
    pub member: String,
    pub node: String,
    pub scan_interval: Duration,
    pub sweep_interval: Duration,
    pub worker_timeout: Duration,
    pub redispatch_after: Duration,
    pub queue_capacity: usize,
}

/// Where a started scaler listens; `:0` ports are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub intake: String,
    pub dispatch: String,
    pub events_pub: String,
    pub events_sub: String,
    pub http: String,
}

impl Endpoints {
    /// The one-line JSON object the binary prints on start.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "intake": self.intake,
            "dispatch": self.dispatch,
            "events_pub": self.events_pub,
            "events_sub": self.events_sub,
            "http": self.http,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store {url}: no answer within {secs} s")]
    StoreTimeout { url: String, secs: u64 },
    #[error("migrations: {0}")]
    Migrate(StoreError),
    #[error("{what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: BusError,
    },
    #[error("http {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the intake, the scan and the sweeper share.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub dispatch: DispatchHandle,
    pub publisher: Publisher,
    pub origin: Origin,
    pub metrics: Arc<Registry>,
    /// False once the intake socket loop has ended.
    pub intake_ok: AtomicBool,
}

impl Shared {
    /// Runs a store call with a deadline; failures other than a definite answer are counted.
    pub async fn store_call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let r = match tokio::time::timeout(STORE_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{op} did not answer within {} s",
                STORE_TIMEOUT.as_secs()
            ))),
        };
        if let Err(e) = &r {
            if matches!(
                e,
                StoreError::Unavailable(_) | StoreError::Backend(_) | StoreError::Corrupt(_)
            ) {
                self.metrics.inc(m::STORE_ERRORS, &[("op", op)]);
            }
        }
        r
    }

    pub fn publish(&self, ev: &Event) {
        self.publisher.publish(ev);
        self.metrics.inc(m::EVENTS_PUBLISHED, &[]);
    }
}

/// A running scaler. Stop it with [`Scaler::shutdown`].
pub struct Scaler {
    endpoints: Endpoints,
    /// `/v1/scaling`: the autoscaler's status, `{"enabled": false}` while it does not run.
    scaling_status: transcode_core::http::Document,
    dispatch: DispatchHandle,
    metrics: Arc<Registry>,
    stop: watch::Sender<bool>,
    intake_task: JoinHandle<mpsc::Receiver<Multipart>>,
    dispatch_task: JoinHandle<mpsc::Receiver<Multipart>>,
    background: Vec<JoinHandle<()>>,
    intake_socket: SocketHandle,
    dispatch_socket: SocketHandle,
    pub_socket: SocketHandle,
    forwarder: Forwarder,
    ctx: zmq::Context,
}

/// Resolves once `stop` turns true (or its sender is gone). The guard `wait_for` returns is
/// dropped here, so loops can await other things in the same `select!`.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn bus_err(what: &'static str) -> impl FnOnce(BusError) -> StartError {
    move |source| StartError::Bus { what, source }
}

fn router(
    ctx: &zmq::Context,
    endpoint: &str,
    what: &'static str,
) -> Result<(SocketHandle, String), StartError> {
    let s = bus::socket(ctx, zmq::ROUTER).map_err(bus_err(what))?;
    let bound = bus::bind(&s, endpoint).map_err(bus_err(what))?;
    let handle = bus::spawn_loop(ctx, s, what, INBOUND_CAPACITY).map_err(bus_err(what))?;
    Ok((handle, bound))
}

/// Takes the receiver out of a socket handle, leaving a closed one in its place, so a loop
/// task can own it while the handle stays here for closing.
fn take_rx(h: &mut SocketHandle) -> mpsc::Receiver<Multipart> {
    let (_tx, placeholder) = mpsc::channel(1);
    std::mem::replace(&mut h.rx, placeholder)
}

impl Scaler {
    pub async fn start(s: Settings) -> Result<Scaler, StartError> {
        let store =
            match tokio::time::timeout(STORE_TIMEOUT, store::open(&s.store_url, s.pool_size)).await
            {
                Ok(r) => r?,
                Err(_) => {
                    return Err(StartError::StoreTimeout {
                        url: s.store_url.clone(),
                        secs: STORE_TIMEOUT.as_secs(),
                    })
                }
            };
        if s.migrate {
            let v = store.migrate().await.map_err(StartError::Migrate)?;
            tracing::info!(version = v, "store schema migrated");
        }
        let metrics = Arc::new(Registry::new());
        m::describe(&metrics);

        let ctx = zmq::Context::new();
        let forwarder =
            Forwarder::start(&ctx, &s.events_sub, &s.events_pub).map_err(bus_err("events"))?;
        let (publisher, pub_socket) =
            bus::publisher(&ctx, &forwarder.xsub).map_err(bus_err("events publisher"))?;
        let (mut intake_socket, intake_ep) = router(&ctx, &s.intake, "intake")?;
        let (mut dispatch_socket, dispatch_ep) = router(&ctx, &s.dispatch, "dispatch")?;

        let dispatch = DispatchHandle::new(
            DispatchConfig {
                worker_timeout: s.worker_timeout,
                redispatch_after: s.redispatch_after,
                queue_capacity: s.queue_capacity,
            },
            dispatch_socket.sender(),
            metrics.clone(),
        );
        let shared = Arc::new(Shared {
            store: store.clone(),
            dispatch: dispatch.clone(),
            publisher,
            origin: Origin::new(s.member.clone(), s.node.clone()),
            metrics: metrics.clone(),
            intake_ok: AtomicBool::new(true),
        });

        let scaling_status: transcode_core::http::Document =
            Arc::new(std::sync::Mutex::new(serde_json::json!({"enabled": false})));
        let http = transcode_core::http::serve_with(
            &s.http,
            health_fn(store.clone(), dispatch.downgrade(), Arc::downgrade(&shared)),
            metrics.clone(),
            &[("/v1/scaling", scaling_status.clone())],
        )
        .await
        .map_err(|source| StartError::Http {
            addr: s.http.clone(),
            source,
        })?;

        let (stop, stop_rx) = watch::channel(false);
        // Silent workers are looked for a few times per timeout, so one is dropped within
        // about a quarter of the timeout after it expires.
        let tick = (s.worker_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let dispatch_task = tokio::spawn(dispatch_service::run(
            dispatch.clone(),
            take_rx(&mut dispatch_socket),
            tick,
            stop_rx.clone(),
        ));
        let intake_task = tokio::spawn(intake::run(
            shared.clone(),
            take_rx(&mut intake_socket),
            intake_socket.sender(),
            stop_rx.clone(),
        ));
        let background = vec![
            tokio::spawn(recovery::run_scans(
                shared.clone(),
                s.scan_interval,
                stop_rx.clone(),
            )),
            tokio::spawn(recovery::run_sweeps(shared, s.sweep_interval, stop_rx)),
        ];
        let endpoints = Endpoints {
            intake: intake_ep,
            dispatch: dispatch_ep,
            events_pub: forwarder.xpub.clone(),
            events_sub: forwarder.xsub.clone(),
            http: http.to_string(),
        };
        tracing::info!(
            member = %s.member,
            node = %s.node,
            intake = %endpoints.intake,
            dispatch = %endpoints.dispatch,
            events_pub = %endpoints.events_pub,
            events_sub = %endpoints.events_sub,
            http = %endpoints.http,
            "scaler started"
        );
        Ok(Scaler {
            endpoints,
            scaling_status,
            dispatch,
            metrics,
            stop,
            intake_task,
            dispatch_task,
            background,
            intake_socket,
            dispatch_socket,
            pub_socket,
            forwarder,
            ctx,
        })
    }

    /// Where the autoscaler leaves its status for `/v1/scaling`.
    pub fn scaling_status(&self) -> transcode_core::http::Document {
        self.scaling_status.clone()
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The dispatcher, to drain workers and read counts. Drop every clone before
    /// [`Scaler::shutdown`]: a clone keeps the dispatch socket open.
    pub fn dispatcher(&self) -> DispatchHandle {
        self.dispatch.clone()
    }

    pub fn metrics(&self) -> Arc<Registry> {
        self.metrics.clone()
    }

    /// Stops the loops (accepted intake requests get to reply), then closes the sockets with
    /// their linger. Returns false when something did not stop in time and was abandoned.
    pub async fn shutdown(self) -> bool {
        let Scaler {
            dispatch,
            stop,
            intake_task,
            dispatch_task,
            background,
            mut intake_socket,
            mut dispatch_socket,
            pub_socket,
            forwarder,
            ctx,
            ..
        } = self;
        let _ = stop.send(true);
        let mut clean = true;
        let loops = async {
            let intake_rx = intake_task.await.ok();
            let dispatch_rx = dispatch_task.await.ok();
            for t in background {
                let _ = t.await;
            }
            (intake_rx, dispatch_rx)
        };
        match tokio::time::timeout(STOP_TIMEOUT, loops).await {
            Ok((intake_rx, dispatch_rx)) => {
                // Back into their handles, so each socket thread is told to quit before its
                // receiver goes (see `SocketHandle::close`).
                if let Some(rx) = intake_rx {
                    intake_socket.rx = rx;
                }
                if let Some(rx) = dispatch_rx {
                    dispatch_socket.rx = rx;
                }
            }
            Err(_) => {
                tracing::warn!("scaler loops did not stop in time");
                clean = false;
            }
        }
        drop(dispatch);
        let close = tokio::task::spawn_blocking(move || {
            intake_socket.close();
            dispatch_socket.close();
            pub_socket.close();
            drop(forwarder);
            drop(ctx);
        });
        match tokio::time::timeout(STOP_TIMEOUT, close).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::warn!("sockets did not close in time");
                clean = false;
            }
        }
        tracing::info!(clean, "scaler stopped");
        clean
    }
}

fn health_fn(
    store: Arc<dyn Store>,
    dispatch: dispatch_service::WeakDispatch,
    shared: std::sync::Weak<Shared>,
) -> transcode_core::http::HealthFn {
    Arc::new(move || -> BoxFuture<'static, (bool, serde_json::Value)> {
        let store = store.clone();
        let dispatch = dispatch.clone();
        let shared = shared.clone();
        Box::pin(async move {
            let store_state = match tokio::time::timeout(HEALTH_PING_TIMEOUT, store.ping()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no answer within {} s",
                    HEALTH_PING_TIMEOUT.as_secs()
                )),
            };
            let intake_ok = shared
                .upgrade()
                .is_some_and(|s| s.intake_ok.load(Ordering::Relaxed));
            let (stats, dispatch_ok) = dispatch.stats().unwrap_or_default();
            let sockets_ok = intake_ok && dispatch_ok;
            let details = serde_json::json!({
                "store": match &store_state { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
                "sockets": if sockets_ok { "bound" } else { "closed" },
                "workers": stats.workers,
                "draining": stats.draining,
                "free_credits": stats.free_credits,
                "queue_length": stats.queue_length,
                "in_flight": stats.in_flight,
            });
            (store_state.is_ok() && sockets_ok, details)
        })
    })
}
