//! The dispatch socket service: the [`Dispatcher`] state behind a mutex, the ROUTER loop that
//! feeds it worker frames, and [`DispatchHandle`], through which intake, the scan and the
//! sweeper queue tasks (and autoscaling will drain workers). Whoever changes the state also
//! sends the TASK frames that change unlocks, while still holding the lock, so frames leave in
//! the order the queue chose them.

use crate::dispatch::{DispatchConfig, DispatchStats, Dispatcher, LostWorker, Offered, Outgoing};
use crate::metrics as m;
use crate::queue::QueueItem;
use crate::wire;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as stdmpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use transcode_core::bus::Multipart;
use transcode_core::metrics::Registry;
use transcode_core::protocol::{self, DispatcherFrame, FrameError, WorkerFrame};
use transcode_core::TaskId;

/// DONE outcomes that get their own metric label; anything else a worker sends is counted as
/// `other`, so a peer cannot grow the label set without bound.
const KNOWN_OUTCOMES: &[&str] = &[
    "succeeded",
    "failed",
    "escalated",
    "released",
    "cancelled",
    "duplicate",
    "not_found",
    "fenced",
    "abandoned",
    crate::dispatch::OUTCOME_REJECTED,
];

struct Inner {
    state: Mutex<Dispatcher>,
    /// The dispatch socket's send side.
    tx: stdmpsc::Sender<Multipart>,
    metrics: Arc<Registry>,
    /// False once a send found the socket thread gone.
    socket_ok: AtomicBool,
}

/// Shared access to the dispatcher. Cloning is cheap. Every clone keeps the dispatch socket's
/// sender alive, so all of them must be dropped before the socket can close.
#[derive(Clone)]
pub struct DispatchHandle {
    inner: Arc<Inner>,
}

/// A handle that does not keep the socket open, for the health endpoint.
#[derive(Clone)]
pub struct WeakDispatch(Weak<Inner>);

impl WeakDispatch {
    /// Current counts, and whether the socket is still served; `None` after shutdown.
    pub fn stats(&self) -> Option<(DispatchStats, bool)> {
        let inner = self.0.upgrade()?;
        let h = DispatchHandle { inner };
        Some((h.stats(), h.socket_ok()))
    }
}

impl DispatchHandle {
    pub fn new(
        cfg: DispatchConfig,
        tx: stdmpsc::Sender<Multipart>,
        metrics: Arc<Registry>,
    ) -> Self {
        DispatchHandle {
            inner: Arc::new(Inner {
                state: Mutex::new(Dispatcher::new(cfg)),
                tx,
                metrics,
                socket_ok: AtomicBool::new(true),
            }),
        }
    }

    pub fn downgrade(&self) -> WeakDispatch {
        WeakDispatch(Arc::downgrade(&self.inner))
    }

    fn lock(&self) -> MutexGuard<'_, Dispatcher> {
        // The state stays consistent across a panic in another holder (every method leaves it
        // valid before anything can panic), so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state, then sends its frames plus whatever dispatches are now possible.
    fn apply<R>(&self, f: impl FnOnce(&mut Dispatcher, Instant, &mut Vec<Outgoing>) -> R) -> R {
        let now = Instant::now();
        let mut d = self.lock();
        let mut out = Vec::new();
        let r = f(&mut d, now, &mut out);
        out.extend(d.next_dispatches(now));
        self.send(&out);
        self.export(&d.stats());
        r
    }

    fn send(&self, out: &[Outgoing]) {
        let metrics = &self.inner.metrics;
        for o in out {
            match &o.frame {
                DispatcherFrame::Task { task_id, attempt } => {
                    metrics.inc(m::DISPATCHED, &[]);
                    tracing::debug!(task = %task_id, attempt, peer = %wire::peer(&o.identity), "task dispatched");
                }
                DispatcherFrame::Error { code, message } => {
                    metrics.inc(m::REJECTED, &[("socket", "dispatch"), ("code", code)]);
                    tracing::warn!(socket = "dispatch", peer = %wire::peer(&o.identity), %code, reason = %message, "frame rejected");
                }
                DispatcherFrame::Drain => {}
            }
            let msg = vec![o.identity.clone(), protocol::encode(&o.frame)];
            if self.inner.tx.send(msg).is_err()
                && self.inner.socket_ok.swap(false, Ordering::Relaxed)
            {
                tracing::error!("dispatch socket is closed: frames can no longer be sent");
            }
        }
    }

    fn export(&self, s: &DispatchStats) {
        let r = &self.inner.metrics;
        r.set(m::QUEUE_LENGTH, &[], s.queue_length as f64);
        r.set(m::IN_FLIGHT, &[], s.in_flight as f64);
        r.set(m::WORKERS, &[], s.workers as f64);
        r.set(m::FREE_CREDITS, &[], s.free_credits as f64);
    }

    /// Queues tasks the store says are `queued`; see [`Dispatcher::offer`].
    pub fn offer(&self, items: &[QueueItem], fresh: bool) -> Vec<Offered> {
        self.apply(|d, now, _| items.iter().map(|i| d.offer(*i, fresh, now)).collect())
    }

    /// Drops tasks that left `queued` from the queue and the in-flight map.
    pub fn forget(&self, ids: &[TaskId]) {
        self.apply(|d, _, _| ids.iter().for_each(|id| d.forget(id)));
    }

    /// The ids among `ids` a scan should offer (not queued here, not sent recently).
    pub fn wanted(&self, ids: &[TaskId]) -> Vec<TaskId> {
        let now = Instant::now();
        let d = self.lock();
        ids.iter().copied().filter(|id| d.wants(id, now)).collect()
    }

    /// Drains a worker gossip declared failed, unless it said HELLO after `last_seen` (it
    /// restarted under the same id); see [`Dispatcher::drain_failed`].
    pub fn drain_failed(&self, worker: &str, last_seen: Instant) -> bool {
        self.apply(|d, _, out| match d.drain_failed(worker, last_seen) {
            Some(o) => {
                out.push(o);
                true
            }
            None => false,
        })
    }

    /// Sends DRAIN to a worker and gives it no more tasks. False when it is not connected.
    pub fn drain(&self, worker: &str) -> bool {
        self.apply(|d, _, out| match d.drain(worker) {
            Some(o) => {
                out.push(o);
                true
            }
            None => false,
        })
    }

    pub fn stats(&self) -> DispatchStats {
        self.lock().stats()
    }

    /// Every connected worker (see [`crate::dispatch::WorkerView`]).
    pub fn workers(&self) -> Vec<crate::dispatch::WorkerView> {
        self.lock().workers()
    }

    pub fn socket_ok(&self) -> bool {
        self.inner.socket_ok.load(Ordering::Relaxed)
    }

    /// Drops silent workers; returns them for logging.
    pub fn expire(&self) -> Vec<LostWorker> {
        let lost = self.apply(|d, now, _| d.expire(now));
        for w in &lost {
            if w.draining {
                // A drained worker closing its socket is the end of a graceful exit, not a
                // failure (ARCHITECTURE §7).
                tracing::info!(worker = %w.worker, node = %w.node, "drained worker left");
                continue;
            }
            self.inner.metrics.inc(m::WORKERS_LOST, &[]);
            tracing::warn!(
                worker = %w.worker,
                node = %w.node,
                silent_ms = w.silent_for.as_millis() as u64,
                tasks = w.tasks.len(),
                "worker went silent and was dropped; its claimed tasks return when their leases expire"
            );
        }
        lost
    }

    /// Handles one raw message from the dispatch socket.
    pub fn on_message(&self, msg: Multipart) {
        let parts = msg.len();
        let Some(mut routed) = wire::split(msg) else {
            // Nobody to answer: count it and move on.
            wire::rejected(
                &self.inner.metrics,
                "dispatch",
                &[],
                &FrameError::Envelope(parts),
            );
            return;
        };
        let frame = routed.take_body().and_then(|b| protocol::parse_worker(&b));
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                wire::rejected(&self.inner.metrics, "dispatch", routed.identity(), &e);
                let reply = DispatcherFrame::Error {
                    code: e.code().to_string(),
                    message: e.to_string(),
                };
                if self
                    .inner
                    .tx
                    .send(routed.reply(protocol::encode(&reply)))
                    .is_err()
                {
                    self.inner.socket_ok.store(false, Ordering::Relaxed);
                }
                return;
            }
        };
        if let WorkerFrame::Done { outcome, .. } = &frame {
            let label = if KNOWN_OUTCOMES.contains(&outcome.as_str()) {
                outcome.as_str()
            } else {
                "other"
            };
            self.inner.metrics.inc(m::DONE, &[("outcome", label)]);
        }
        let identity = routed.identity().to_vec();
        self.apply(|d, now, out| out.extend(d.on_frame(&identity, frame, now)));
    }
}

/// Serves the dispatch socket until `stop` turns true or the socket thread ends. Silent
/// workers are checked every `tick`.
pub async fn run(
    handle: DispatchHandle,
    mut rx: mpsc::Receiver<Multipart>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Multipart> {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::server::stopped(&mut stop) => break,
            msg = rx.recv() => match msg {
                Some(msg) => handle.on_message(msg),
                None => {
                    handle.inner.socket_ok.store(false, Ordering::Relaxed);
                    tracing::error!("dispatch socket loop ended");
                    break;
                }
            },
            _ = ticker.tick() => {
                handle.expire();
            }
        }
    }
    rx
}
