//! The intake socket: publishers submit tasks here (ARCHITECTURE §5). Each request is answered
//! from its own tokio task, because the store may be slow and the socket loop must keep
//! serving; frames that fail the protocol checks are answered (and counted) from the loop
//! itself. A request is only acknowledged after the store has said yes, so an `ok` reply
//! means the task is durably `queued`.

use crate::dispatch::Offered;
use crate::metrics as m;
use crate::queue::QueueItem;
use crate::server::Shared;
use crate::wire;
use std::sync::mpsc as stdmpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use transcode_core::bus::Multipart;
use transcode_core::events::{EventBody, TaskQueued};
use transcode_core::protocol::{self, FrameError, IntakeReply, IntakeRequest};
use transcode_core::store::StoreError;
use transcode_core::{TaskSpec, TaskStatus};

/// Requests being answered at once. Past this the store is clearly behind, and telling the
/// publisher to retry beats queueing unbounded work in memory.
pub const MAX_PENDING: usize = 1024;
/// How long requests already accepted get to finish when the scaler stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the intake socket until `stop` turns true or the socket thread ends. Returns the
/// receiver so the socket can be closed in order.
pub async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Multipart>,
    reply: stdmpsc::Sender<Multipart>,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Multipart> {
    let mut pending: JoinSet<()> = JoinSet::new();
    let permits = Arc::new(Semaphore::new(MAX_PENDING));
    loop {
        tokio::select! {
            () = crate::server::stopped(&mut stop) => break,
            Some(done) = pending.join_next(), if !pending.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(error = %e, "intake request handler panicked");
                    }
                }
            }
            msg = rx.recv() => match msg {
                Some(msg) => on_message(&shared, &reply, msg, &mut pending, &permits),
                None => {
                    shared.intake_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!("intake socket loop ended");
                    break;
                }
            },
        }
    }
    // Let accepted requests reply, within bounds; then cut the rest off.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while pending.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = pending.len(),
            "intake requests still running at shutdown were abandoned"
        );
        pending.abort_all();
        while pending.join_next().await.is_some() {}
    }
    rx
}

fn send(reply: &stdmpsc::Sender<Multipart>, msg: Multipart) {
    if reply.send(msg).is_err() {
        tracing::debug!("intake socket closed before a reply could be sent");
    }
}

fn on_message(
    shared: &Arc<Shared>,
    reply: &stdmpsc::Sender<Multipart>,
    msg: Multipart,
    pending: &mut JoinSet<()>,
    permits: &Arc<Semaphore>,
) {
    let parts = msg.len();
    let Some(mut routed) = wire::split(msg) else {
        wire::rejected(&shared.metrics, "intake", &[], &FrameError::Envelope(parts));
        return;
    };
    let request = routed
        .take_body()
        .and_then(|body| protocol::parse_intake(&body));
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            wire::rejected(&shared.metrics, "intake", routed.identity(), &e);
            count(shared, "rejected");
            send(
                reply,
                routed.reply(IntakeReply::err(e.code(), e.to_string()).to_bytes()),
            );
            return;
        }
    };
    if request == IntakeRequest::Ping {
        count(shared, "ok");
        send(reply, routed.reply(IntakeReply::ok(None, None).to_bytes()));
        return;
    }
    let Ok(permit) = permits.clone().try_acquire_owned() else {
        count(shared, "busy");
        tracing::warn!(
            limit = MAX_PENDING,
            "intake is saturated; asking the publisher to retry"
        );
        send(
            reply,
            routed.reply(
                IntakeReply::err(
                    "busy",
                    format!("{MAX_PENDING} requests are already pending; retry shortly"),
                )
                .to_bytes(),
            ),
        );
        return;
    };
    let shared = shared.clone();
    let reply = reply.clone();
    pending.spawn(async move {
        let answer = handle(&shared, request).await;
        let outcome = answer.error.as_ref().map_or("ok", |e| e.code.as_str());
        count(&shared, outcome);
        send(&reply, routed.reply(answer.to_bytes()));
        drop(permit);
    });
}

fn count(shared: &Shared, outcome: &str) {
    shared
        .metrics
        .inc(m::INTAKE_REQUESTS, &[("outcome", outcome)]);
}

/// Answers one request.
pub async fn handle(shared: &Shared, request: IntakeRequest) -> IntakeReply {
    match request {
        IntakeRequest::Ping => IntakeReply::ok(None, None),
        IntakeRequest::SubmitId(id) => {
            let task = match shared
                .store_call("get_task", shared.store.get_task(id))
                .await
            {
                Ok(t) => t,
                Err(e) => return store_error(e),
            };
            if task.status != TaskStatus::Queued {
                return IntakeReply::err(
                    "not_queued",
                    format!(
                        "task {id} is {}, only a queued task can be submitted",
                        task.status
                    ),
                );
            }
            let offered = enqueue(shared, id, task.priority, task.attempts);
            tracing::debug!(task = %id, ?offered, "submitted by id");
            IntakeReply::ok(Some(id), None)
        }
        IntakeRequest::SubmitSpec(spec) => submit_spec(shared, &spec).await,
    }
}

async fn submit_spec(shared: &Shared, spec: &TaskSpec) -> IntakeReply {
    // Checked here as well as in the store, so a bad spec is answered without a database
    // round trip (and the answer does not depend on the store being up).
    if let Err(e) = spec.validate() {
        return IntakeReply::err("invalid_spec", e.to_string());
    }
    let mut queued = shared.origin.event(
        None,
        EventBody::TaskQueued(TaskQueued {
            priority: spec.priority,
            via: "intake".into(),
        }),
    );
    let inserted = match shared
        .store_call(
            "insert_task",
            shared
                .store
                .insert_task(spec, std::slice::from_ref(&queued)),
        )
        .await
    {
        Ok(i) => i,
        Err(e) => return store_error(e),
    };
    let task = inserted.task;
    if inserted.created {
        // The store stamped the subject on its copy; the bus gets the same event.
        queued.subject = Some(task.id);
        shared.publish(&queued);
    }
    if task.status == TaskStatus::Queued {
        enqueue(shared, task.id, task.priority, task.attempts);
    }
    tracing::debug!(task = %task.id, created = inserted.created, "submitted by spec");
    IntakeReply::ok(Some(task.id), Some(inserted.created))
}

fn enqueue(shared: &Shared, id: transcode_core::TaskId, priority: i32, attempts: u32) -> Offered {
    let item = QueueItem {
        id,
        priority,
        attempt: attempts.saturating_add(1),
    };
    shared
        .dispatch
        .offer(std::slice::from_ref(&item), false)
        .first()
        .copied()
        // offer returns one result per item; a missing one cannot happen, and if it did the
        // row is still queued in the store for the scan.
        .unwrap_or(Offered::QueueFull)
}

/// The reply for a failed store call.
fn store_error(e: StoreError) -> IntakeReply {
    match e {
        StoreError::NotFound(id) => IntakeReply::err("not_found", format!("task {id} not found")),
        StoreError::InvalidSpec(e) => IntakeReply::err("invalid_spec", e.to_string()),
        e @ StoreError::IdempotencyConflict { .. } => {
            IntakeReply::err("idempotency_conflict", e.to_string())
        }
        e @ StoreError::Unavailable(_) => IntakeReply::err("unavailable", e.to_string()),
        e => {
            tracing::error!(error = %e, "store error on intake");
            IntakeReply::err("internal", e.to_string())
        }
    }
}
