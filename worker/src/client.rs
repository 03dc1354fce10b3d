//! The worker's side of dispatch: a DEALER socket to the scaler, credits for free slots, and
//! the drain sequence. The worker announces itself (HELLO), grants one credit per free slot
//! (READY), runs each TASK in its own tokio task, and reports DONE. On SIGTERM or a DRAIN frame
//! it says BYE, lets running tasks finish until the drain deadline, gives back what is still
//! running, and returns.

use crate::pipeline::{self, Ctx, Outcome};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use transcode_core::bus::{self, BusError};
use transcode_core::protocol::{self, DispatcherFrame, WorkerFrame};
use transcode_core::TaskId;

pub struct ClientConfig {
    pub dispatch: String,
    pub slots: u32,
    pub drain_timeout: Duration,
    pub ping_every: Duration,
    /// Tasks running now, read by the gossip member for its `busy` tag.
    pub busy: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// Why the worker stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Drained { released: usize },
}

fn send(h: &bus::SocketHandle, frame: &WorkerFrame) {
    if !h.send(vec![protocol::encode(frame)]) {
        tracing::warn!("dispatch socket thread is gone");
    }
}

/// Runs until drained. `shutdown` turning true starts the drain (SIGTERM).
pub async fn run(
    ctx: Arc<Ctx>,
    zctx: &zmq::Context,
    cfg: ClientConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Exit, BusError> {
    let sock = bus::socket(zctx, zmq::DEALER)?;
    bus::connect(&sock, &cfg.dispatch)?;
    let mut h = bus::spawn_loop(zctx, sock, "dispatch", 256)?;
    let hello = WorkerFrame::Hello {
        worker: ctx.origin.member.clone(),
        node: ctx.origin.node.clone(),
        slots: cfg.slots,
    };
    send(&h, &hello);
    send(&h, &WorkerFrame::Ready { credits: cfg.slots });
    tracing::info!(dispatch = %cfg.dispatch, slots = cfg.slots, "connected to dispatcher");

    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut running: JoinSet<(TaskId, Outcome)> = JoinSet::new();
    let mut in_flight: HashMap<TaskId, ()> = HashMap::new();
    let mut draining = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut ping = tokio::time::interval(cfg.ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut released = 0usize;

    loop {
        if draining && running.is_empty() {
            send(&h, &WorkerFrame::Bye);
            // Give the socket thread a moment to flush BYE before it closes (linger covers it).
            h.close();
            return Ok(Exit::Drained { released });
        }
        let deadline = async {
            match drain_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = h.rx.recv() => {
                let Some(msg) = msg else {
                    tracing::error!("dispatch socket closed");
                    draining = true;
                    continue;
                };
                let Some(payload) = msg.last() else { continue };
                match protocol::parse_dispatcher(payload) {
                    Ok(DispatcherFrame::Task { task_id, attempt }) => {
                        if draining {
                            // Not ours to run; the scaler's scan dispatches it elsewhere.
                            send(&h, &WorkerFrame::Done { task_id, outcome: "rejected".into() });
                            continue;
                        }
                        if in_flight.contains_key(&task_id) {
                            tracing::info!(task = %task_id, "duplicate TASK for a task running here: ignored");
                            send(&h, &WorkerFrame::Ready { credits: 1 });
                            continue;
                        }
                        in_flight.insert(task_id, ());
                        let task_ctx = ctx.clone();
                        let cancel = cancel_rx.clone();
                        running.spawn(async move {
                            let outcome = pipeline::run_task(task_ctx, task_id, attempt, cancel).await;
                            (task_id, outcome)
                        });
                        ctx.metrics.set("transcode_worker_running", &[], running.len() as f64);
                        cfg.busy.store(running.len() as u32, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(DispatcherFrame::Drain) => {
                        tracing::info!("DRAIN from the scaler");
                        start_drain(&h, &mut draining, &mut drain_deadline, cfg.drain_timeout);
                    }
                    Ok(DispatcherFrame::Error { code, message }) => {
                        if code == "no_hello" {
                            // The scaler restarted and forgot us: introduce ourselves again.
                            tracing::info!("scaler does not know this worker; sending HELLO again");
                            send(&h, &hello);
                            if !draining {
                                let free = cfg.slots.saturating_sub(running.len() as u32);
                                send(&h, &WorkerFrame::Ready { credits: free });
                            }
                        } else {
                            tracing::warn!(%code, %message, "dispatcher refused a frame");
                        }
                    }
                    Err(e) => {
                        ctx.metrics.inc("transcode_frames_rejected_total", &[("socket", "dispatch"), ("code", e.code())]);
                        tracing::warn!(error = %e, "bad frame from dispatcher");
                    }
                }
            }
            Some(joined) = running.join_next(), if !running.is_empty() => {
                ctx.metrics.set("transcode_worker_running", &[], running.len() as f64);
                cfg.busy.store(running.len() as u32, std::sync::atomic::Ordering::Relaxed);
                match joined {
                    Ok((task_id, outcome)) => {
                        in_flight.remove(&task_id);
                        if outcome == Outcome::Released {
                            released += 1;
                        }
                        send(&h, &WorkerFrame::Done { task_id, outcome: outcome.as_str().to_string() });
                        if !draining {
                            send(&h, &WorkerFrame::Ready { credits: 1 });
                        }
                    }
                    Err(e) => {
                        // A panic inside a pipeline: the slot is free again; the lease will
                        // expire and the scaler requeues the task.
                        tracing::error!(error = %e, "task panicked");
                        if !draining {
                            send(&h, &WorkerFrame::Ready { credits: 1 });
                        }
                    }
                }
            }
            _ = ping.tick() => send(&h, &WorkerFrame::Ping),
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!(running = running.len(), "shutdown requested: draining");
                    start_drain(&h, &mut draining, &mut drain_deadline, cfg.drain_timeout);
                }
            }
            _ = deadline => {
                tracing::warn!(running = running.len(), "drain deadline passed: giving running tasks back to the queue");
                let _ = cancel_tx.send(true);
                drain_deadline = None;
            }
        }
    }
}

fn start_drain(
    h: &bus::SocketHandle,
    draining: &mut bool,
    deadline: &mut Option<tokio::time::Instant>,
    timeout: Duration,
) {
    if *draining {
        return;
    }
    *draining = true;
    *deadline = Some(tokio::time::Instant::now() + timeout);
    send(h, &WorkerFrame::Bye);
}
