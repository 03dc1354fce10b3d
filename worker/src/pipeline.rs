//! One task's life on a worker: claim → pull → transcode → push → finish, with one event per
//! step. Each event is written to the store first (in the same transaction as the status change
//! that caused it, fenced by the lease token) and published on the bus only once committed, so
//! the bus never announces what the database does not hold. A background task renews the lease;
//! if renewal finds the token stale (the task was requeued elsewhere), the pipeline stops and
//! writes nothing more. Scratch files are removed on every path.
//!
//! Object transfers run under the retry policy of `transcode_core::retry` (one policy for
//! pull, one for push): every retry is logged as a fenced `ContainerErrorRetry` before the
//! backoff sleep, and a transient failure that outlasts its attempts escalates the task
//! (`ContainerErrorEscalation`, status `escalated`, the slot freed, a WARN line and
//! `transcode_escalations_total`). Errors no wait can fix are not retried: a missing source
//! fails the task, a refused request (403) escalates it at once, a full scratch disk fails it.
//!
//! A resumed attempt (an operator's `resolve --retry`, or a requeue after a lost worker) never
//! uploads again what an earlier attempt already put in the object store: each upload is
//! recorded as a `RenditionUploaded` event as it completes, and rungs whose record matches the
//! current source and whose object is still there with the recorded size are left out of the
//! transcode and the upload and merged into the new manifest (docs/decisions.md, "Resuming").

use crate::transcode::{self, SourceInfo, TranscodeError, TranscodeJob, TranscodeReport};
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use transcode_core::bus::Publisher;
use transcode_core::events::{self, EventBody, Origin, RenditionUploaded};
use transcode_core::manifest::{Manifest, ManifestOutput};
use transcode_core::metrics::{Kind, Registry};
use transcode_core::objects::{ObjectError, Objects};
use transcode_core::retry::{self, GaveUp, RetryConfig, RetryPolicy, Retrying};
use transcode_core::spec::{Rendition, ValidSpec};
use transcode_core::store::{Claimant, EventFilter, Fence, Patch, Store, StoreError};
use transcode_core::url::ObjectUrl;
use transcode_core::{Event, Task, TaskId, TaskStatus};

/// How transcoding is done. `Noop` exists for the dispatch benchmark and protocol tests: it
/// skips pull, transcode and push but still writes every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Gstreamer,
    Noop,
}

/// Everything a pipeline needs, shared by all slots of a worker.
pub struct Ctx {
    pub store: Arc<dyn Store>,
    /// Step records of every running task go through here, so concurrent tasks share commits.
    pub steps: transcode_core::store::StepWriter,
    pub objects: Objects,
    pub bus: Publisher,
    pub origin: Origin,
    pub scratch: PathBuf,
    pub lease: Duration,
    pub metrics: Arc<Registry>,
    pub mode: Mode,
    pub stall_timeout: Duration,
    /// Retry policies for pull and push (the config's `retry` block).
    pub retry: RetryConfig,
}

/// Declares the pipeline's metric families, so `/metrics` lists them (with help text) before
/// the first task, and an alert on them has a series to start from.
pub fn describe_metrics(metrics: &Registry) {
    metrics.describe(
        "transcode_escalations_total",
        Kind::Counter,
        "Tasks escalated to an operator, by failing operation (pull, push, transcode, scratch).",
    );
    metrics.describe(
        "transcode_retries_total",
        Kind::Counter,
        "Object operations retried after an error, by operation and error class.",
    );
    metrics.describe(
        "transcode_tasks_total",
        Kind::Counter,
        "Tasks that left this worker, by outcome.",
    );
    metrics.describe(
        "transcode_renditions_reused_total",
        Kind::Counter,
        "Renditions a resumed task did not transcode or upload again.",
    );
}

/// How a task left this worker; sent to the dispatcher in DONE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
    Escalated(String),
    /// Given back to the queue (drain deadline).
    Released,
    /// Not queued when it arrived (a second delivery): nothing done.
    Duplicate,
    /// Unknown task id.
    NotFound,
    /// Our lease token went stale: the task belongs to someone else now.
    Fenced,
    /// The store could not be reached to record the outcome; the lease will expire and the
    /// scaler requeues it.
    Abandoned,
}

impl Outcome {
    pub fn as_str(&self) -> &str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::Escalated(_) => "escalated",
            Outcome::Released => "released",
            Outcome::Duplicate => "duplicate",
            Outcome::NotFound => "not_found",
            Outcome::Fenced => "fenced",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Why a step stopped the pipeline.
#[derive(Debug)]
enum Stop {
    /// Permanent: the task fails with this code and message.
    Fail(String, String),
    /// Needs an operator: the task escalates.
    Escalate {
        operation: String,
        /// How many attempts were made (1 when the error was not worth retrying).
        attempts: u32,
        /// The last error's code (`unreachable`, `transient`, `permission_denied`, …).
        class: String,
        message: String,
    },
    Fenced,
    Store(StoreError),
}

impl Stop {
    fn escalate(operation: &str, class: &str, message: String) -> Stop {
        Stop::Escalate {
            operation: operation.to_string(),
            attempts: 1,
            class: class.to_string(),
            message,
        }
    }
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::StaleToken { .. } | StoreError::WrongStatus { .. } => Stop::Fenced,
            other => Stop::Store(other),
        }
    }
}

/// Removes a directory when dropped, whatever path the pipeline took.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "scratch dir not removed");
            }
        }
    }
}

/// How many times a store call is tried while the database is unreachable, and the backoff
/// between tries (200 ms doubling to 5 s: about 21 s in all), so a restart or a failover does
/// not cost the task.
const STORE_TRIES: u32 = 9;
const STORE_FIRST_DELAY: Duration = Duration::from_millis(200);
const STORE_MAX_DELAY: Duration = Duration::from_secs(5);

/// A store call's result, and whether any try before the last failed on the connection. After
/// such a failure the earlier try may have committed without us hearing back (the connection
/// dropped between COMMIT and its answer), so a refusal of the retry may only mean "already
/// done"; callers that care check for their own events before believing the refusal.
struct Tried<T> {
    result: Result<T, StoreError>,
    interrupted: bool,
}

async fn retry_store_tracked<T, F, Fut>(what: &str, mut f: F) -> Tried<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = STORE_FIRST_DELAY;
    let mut tries = 1;
    let mut interrupted = false;
    loop {
        match f().await {
            Err(e) if e.is_transient() && tries < STORE_TRIES => {
                tries += 1;
                interrupted = true;
                tracing::warn!(op = what, error = %e, retry_in_ms = delay.as_millis() as u64, "store unavailable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(STORE_MAX_DELAY);
            }
            result => {
                if interrupted && result.is_ok() {
                    tracing::info!(op = what, tries, "store reachable again");
                }
                return Tried {
                    result,
                    interrupted,
                };
            }
        }
    }
}

/// Retries a store call a few times when the database is unreachable.
async fn retry_store<T, F, Fut>(what: &str, f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    retry_store_tracked(what, f).await.result
}

impl Ctx {
    fn claimant(&self) -> Claimant {
        Claimant {
            worker_id: self.origin.member.clone(),
            node: self.origin.node.clone(),
        }
    }

    fn event(&self, task: TaskId, body: EventBody) -> Event {
        self.origin.event(Some(task), body)
    }

    fn publish(&self, evs: &[Event]) {
        self.bus.publish_all(evs);
        for e in evs {
            self.metrics.inc(
                "transcode_events_total",
                &[("type", e.event_type().as_str())],
            );
        }
    }

    /// Whether the first of `evs` is already in the store: the proof that a write whose answer
    /// was lost did commit.
    async fn already_logged(&self, id: TaskId, evs: &[Event]) -> bool {
        let Some(first) = evs.first() else {
            return false;
        };
        let filter = EventFilter {
            task_id: Some(id),
            event_type: Some(first.event_type().to_string()),
            after_seq: None,
            limit: 10_000,
        };
        match retry_store("check", || self.store.events(&filter)).await {
            Ok(found) => found.iter().any(|e| e.id == first.id),
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "could not check whether a write committed");
                false
            }
        }
    }

    /// Runs a fenced write (with its events) until it is known to have committed or been
    /// refused. A refusal that follows a lost connection is checked against the events: if
    /// they are there, the earlier try committed and the refusal is our own write seen from
    /// the other side.
    async fn write_once<T, F, Fut>(
        &self,
        what: &str,
        id: TaskId,
        evs: &[Event],
        f: F,
    ) -> Result<(), StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let tried = retry_store_tracked(what, f).await;
        match tried.result {
            Ok(_) => Ok(()),
            Err(e)
                if tried.interrupted && !e.is_transient() && self.already_logged(id, evs).await =>
            {
                tracing::info!(task = %id, op = what, "write committed before the connection was lost");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Logs events of a running task (fenced), with optional progress, then publishes them.
    async fn record(
        &self,
        id: TaskId,
        token: i64,
        progress: Option<u8>,
        evs: Vec<Event>,
    ) -> Result<(), Stop> {
        let patch = Patch {
            progress,
            ..Patch::default()
        };
        self.write_once("record", id, &evs, || {
            self.steps.update_running(id, token, &patch, &evs)
        })
        .await?;
        self.publish(&evs);
        Ok(())
    }

    async fn finish(
        &self,
        id: TaskId,
        token: i64,
        to: TaskStatus,
        patch: Patch,
        evs: Vec<Event>,
    ) -> Result<(), StoreError> {
        self.write_once("finish", id, &evs, || {
            self.store
                .transition(id, Fence::Token(token), to, &patch, &evs)
        })
        .await?;
        self.publish(&evs);
        Ok(())
    }

    /// Runs one object operation under `policy`. Each retry is logged (fenced) and published
    /// as `ContainerErrorRetry` before the backoff sleep; a refused log write (the lease is
    /// gone) stops the loop. The sleep is a plain tokio sleep, so the lease renewer keeps
    /// running all through it.
    async fn with_retry<T, Op, Fut>(
        &self,
        id: TaskId,
        token: i64,
        operation: &str,
        policy: &RetryPolicy,
        op: Op,
    ) -> Result<T, Stop>
    where
        Op: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, ObjectError>>,
    {
        let outcome = retry::run(policy, op, |r: Retrying| async move {
            let delay_ms = u64::try_from(r.delay.as_millis()).unwrap_or(u64::MAX);
            tracing::warn!(
                task = %id,
                operation,
                attempt = r.attempt,
                max_attempts = policy.max_attempts,
                delay_ms,
                class = %r.code,
                error = %r.message,
                "object operation failed; retrying"
            );
            self.metrics.inc(
                "transcode_retries_total",
                &[("operation", operation), ("class", &r.code)],
            );
            let ev = self.event(
                id,
                EventBody::ContainerErrorRetry(events::ContainerErrorRetry {
                    operation: operation.to_string(),
                    attempt: r.attempt,
                    delay_ms,
                    class: r.code,
                    message: r.message,
                }),
            );
            self.record(id, token, None, vec![ev]).await
        })
        .await;
        match outcome {
            Ok(v) => Ok(v),
            Err(GaveUp::Aborted(stop)) => Err(stop),
            Err(GaveUp::Failed {
                error,
                attempts,
                exhausted,
            }) => Err(object_stop(operation, error, attempts, exhausted)),
        }
    }
}

/// Runs one task to its end. `cancel` turning true (drain deadline) gives the task back to the
/// queue instead.
pub async fn run_task(
    ctx: Arc<Ctx>,
    id: TaskId,
    attempt: u32,
    mut cancel: watch::Receiver<bool>,
) -> Outcome {
    let started = Instant::now();
    let worker = ctx.origin.member.clone();
    let received = ctx.event(
        id,
        EventBody::TaskReceived(events::TaskReceived {
            worker: worker.clone(),
            attempt,
        }),
    );
    // Logged before the claim: a delivery is a fact even when the claim is then refused.
    if let Err(e) = ctx
        .write_once("received", id, std::slice::from_ref(&received), || {
            ctx.store.append_events(std::slice::from_ref(&received))
        })
        .await
    {
        tracing::warn!(task = %id, error = %e, "could not log TaskReceived");
        return Outcome::Abandoned;
    }
    ctx.publish(std::slice::from_ref(&received));

    let task = match retry_store("get", || ctx.store.get_task(id)).await {
        Ok(t) => t,
        Err(StoreError::NotFound(_)) => {
            tracing::warn!(task = %id, "dispatched task does not exist");
            return Outcome::NotFound;
        }
        Err(e) => {
            tracing::warn!(task = %id, error = %e, "could not read task");
            return Outcome::Abandoned;
        }
    };
    if task.status != TaskStatus::Queued {
        tracing::info!(task = %id, status = %task.status, "second delivery of a task that is not queued: ignored");
        return Outcome::Duplicate;
    }
    let valid = match task.spec.validate() {
        Ok(v) => v,
        Err(e) => {
            // Only possible for a row written around the validation (by hand, or an older
            // version); claim it so the failure is recorded against it.
            tracing::warn!(task = %id, error = %e, "stored spec is invalid");
            return fail_unclaimed(&ctx, &task, &e.to_string()).await;
        }
    };
    let details = ctx.event(
        id,
        EventBody::TaskDetailsRetrieved(events::TaskDetailsRetrieved {
            worker: worker.clone(),
            attempt: task.attempts + 1,
            source: task.spec.source.clone(),
            renditions: valid.renditions.iter().map(|r| r.name.clone()).collect(),
        }),
    );
    let claimant = ctx.claimant();
    let tried = retry_store_tracked("claim", || {
        ctx.store
            .claim(id, &claimant, ctx.lease, std::slice::from_ref(&details))
    })
    .await;
    let claimed = match tried.result {
        Ok(t) => t,
        Err(StoreError::WrongStatus { status, .. })
            if tried.interrupted
                && status == TaskStatus::Running
                && ctx.already_logged(id, std::slice::from_ref(&details)).await =>
        {
            // Our claim committed but its answer was lost with the connection: the row is
            // ours (the details event is in the same transaction), so carry on with it.
            match retry_store("get", || ctx.store.get_task(id)).await {
                Ok(t) if t.worker_id.as_deref() == Some(worker.as_str()) => {
                    tracing::info!(task = %id, "claim committed before the connection was lost");
                    t
                }
                Ok(_) => return Outcome::Duplicate,
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "could not read the claimed task");
                    return Outcome::Abandoned;
                }
            }
        }
        Err(StoreError::WrongStatus { status, .. }) => {
            tracing::info!(task = %id, %status, "lost the claim race: ignored");
            return Outcome::Duplicate;
        }
        Err(e) => {
            tracing::warn!(task = %id, error = %e, "claim failed");
            return Outcome::Abandoned;
        }
    };
    ctx.publish(std::slice::from_ref(&details));
    let token = claimed.lease_token;

    // The lease renewer flips `lost` when the token goes stale. It runs on its own tokio task,
    // so neither a backoff sleep nor a long transcode delays a renewal.
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let renewer = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let every = (ctx.lease / 3).max(Duration::from_millis(100));
            loop {
                tokio::time::sleep(every).await;
                match ctx.store.renew_lease(id, token, ctx.lease).await {
                    Ok(_) => {}
                    Err(StoreError::StaleToken { .. }) | Err(StoreError::NotFound(_)) => {
                        tracing::warn!(task = %id, token, "lease lost: another worker owns the task now");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "lease renewal failed; will retry")
                    }
                }
            }
        })
    };

    let body = process(&ctx, &claimed, &valid, token, started);
    let result = tokio::select! {
        r = body => Some(r),
        _ = cancel.wait_for(|c| *c) => None,
        _ = lost_rx.wait_for(|l| *l) => Some(Err(Stop::Fenced)),
    };
    renewer.abort();

    let finished = |outcome: &str| {
        ctx.event(
            id,
            EventBody::WorkloadProcessingFinished(events::WorkloadProcessingFinished {
                worker: worker.clone(),
                outcome: outcome.to_string(),
                millis: started.elapsed().as_millis() as u64,
            }),
        )
    };
    let outcome = match result {
        None => {
            let ev = ctx.event(
                id,
                EventBody::TaskReleased(events::TaskReleased {
                    worker: worker.clone(),
                    reason: "drain deadline passed".into(),
                }),
            );
            match ctx
                .finish(id, token, TaskStatus::Queued, Patch::default(), vec![ev])
                .await
            {
                Ok(()) => Outcome::Released,
                Err(e) => stopped_by_store(id, e),
            }
        }
        Some(Ok(outputs)) => {
            let evs = vec![
                finished("succeeded"),
                ctx.event(
                    id,
                    EventBody::TaskSucceeded(events::TaskSucceeded { outputs }),
                ),
            ];
            let patch = Patch {
                progress: Some(100),
                ..Patch::default()
            };
            match ctx
                .finish(id, token, TaskStatus::Succeeded, patch, evs)
                .await
            {
                Ok(()) => Outcome::Succeeded,
                Err(e) => stopped_by_store(id, e),
            }
        }
        Some(Err(Stop::Fail(code, message))) => {
            tracing::warn!(task = %id, %code, %message, "task failed");
            let evs = vec![
                ctx.event(
                    id,
                    EventBody::TaskFailed(events::TaskFailed {
                        code: code.clone(),
                        message: message.clone(),
                    }),
                ),
                finished("failed"),
            ];
            let patch = Patch {
                error_code: Some(code.clone()),
                error_message: Some(message),
                ..Patch::default()
            };
            match ctx.finish(id, token, TaskStatus::Failed, patch, evs).await {
                Ok(()) => Outcome::Failed(code),
                Err(e) => stopped_by_store(id, e),
            }
        }
        Some(Err(Stop::Escalate {
            operation,
            attempts,
            class,
            message,
        })) => {
            // The alert: this WARN line, the metric below and the event.
            tracing::warn!(task = %id, %operation, attempts, %class, %message, "task escalated: needs an operator (transcode resolve)");
            ctx.metrics
                .inc("transcode_escalations_total", &[("operation", &operation)]);
            let code = format!("{operation}_{class}");
            let evs = vec![
                ctx.event(
                    id,
                    EventBody::ContainerErrorEscalation(events::ContainerErrorEscalation {
                        operation: operation.clone(),
                        attempts,
                        class,
                        message: message.clone(),
                    }),
                ),
                finished("escalated"),
            ];
            let patch = Patch {
                error_code: Some(code.clone()),
                error_message: Some(message),
                ..Patch::default()
            };
            match ctx
                .finish(id, token, TaskStatus::Escalated, patch, evs)
                .await
            {
                Ok(()) => Outcome::Escalated(code),
                Err(e) => stopped_by_store(id, e),
            }
        }
        Some(Err(Stop::Fenced)) => {
            tracing::warn!(task = %id, token, "stopped: lease token is stale, writes refused");
            Outcome::Fenced
        }
        Some(Err(Stop::Store(e))) => stopped_by_store(id, e),
    };
    ctx.metrics
        .inc("transcode_tasks_total", &[("outcome", outcome.as_str())]);
    outcome
}

fn stopped_by_store(id: TaskId, e: StoreError) -> Outcome {
    match e {
        StoreError::StaleToken { .. } => {
            tracing::warn!(task = %id, "outcome refused: lease token is stale (task was requeued)");
            Outcome::Fenced
        }
        other => {
            tracing::error!(task = %id, error = %other, "cannot record outcome; the lease will expire and the task be requeued");
            Outcome::Abandoned
        }
    }
}

async fn fail_unclaimed(ctx: &Ctx, task: &Task, message: &str) -> Outcome {
    let claimed = match ctx
        .store
        .claim(task.id, &ctx.claimant(), ctx.lease, &[])
        .await
    {
        Ok(t) => t,
        Err(_) => return Outcome::Duplicate,
    };
    let ev = ctx.event(
        task.id,
        EventBody::TaskFailed(events::TaskFailed {
            code: "invalid_spec".into(),
            message: message.to_string(),
        }),
    );
    let patch = Patch {
        error_code: Some("invalid_spec".into()),
        error_message: Some(message.to_string()),
        ..Patch::default()
    };
    match ctx
        .finish(
            task.id,
            claimed.lease_token,
            TaskStatus::Failed,
            patch,
            vec![ev],
        )
        .await
    {
        Ok(()) => Outcome::Failed("invalid_spec".into()),
        Err(e) => stopped_by_store(task.id, e),
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
}

/// A failure of the local scratch disk. A full disk is the task's error (ENOSPC, named as
/// such), never the worker's: the scratch folder is removed and the slot taken again. Other
/// local I/O errors point at the node, so an operator looks.
fn scratch_stop(step: &str, path: &Path, e: &std::io::Error) -> Stop {
    if is_no_space(e) {
        Stop::Fail(
            format!("{step}_no_space"),
            format!(
                "scratch disk full (ENOSPC) during {step}: {}: {e}",
                path.display()
            ),
        )
    } else {
        Stop::escalate("scratch", "local_io", format!("{}: {e}", path.display()))
    }
}

/// What a failed object operation does to the task, once the retry policy has given up.
fn object_stop(operation: &str, e: ObjectError, attempts: u32, exhausted: bool) -> Stop {
    match &e {
        ObjectError::NotFound { url } if operation == "pull" => Stop::Fail(
            "source_not_found".into(),
            format!("source not found: {url}"),
        ),
        // Pulled twice, wrong twice: the stored object is not the one the publisher meant.
        ObjectError::ChecksumMismatch { .. } if operation == "pull" => Stop::Fail(
            "source_checksum_mismatch".into(),
            format!("after {attempts} pulls: {e}"),
        ),
        ObjectError::LocalIo { path, source } if is_no_space(source) => {
            scratch_stop(operation, path, source)
        }
        _ => {
            let message = if exhausted {
                format!("gave up after {attempts} attempts: {e}")
            } else {
                e.to_string()
            };
            Stop::Escalate {
                operation: operation.to_string(),
                attempts,
                class: e.code().to_string(),
                message,
            }
        }
    }
}

fn transcode_stop(e: TranscodeError) -> Stop {
    match &e {
        TranscodeError::MissingPlugin { .. } => {
            Stop::escalate("transcode", e.code(), e.to_string())
        }
        TranscodeError::Io { path, source } if is_no_space(source) => {
            scratch_stop("transcode", path, source)
        }
        // GStreamer reports a failed write as its own error, with the OS text in the message.
        TranscodeError::Gst { message } if message.contains("No space left on device") => {
            Stop::Fail(
                "transcode_no_space".into(),
                format!("scratch disk full (ENOSPC) during transcode: {message}"),
            )
        }
        _ => Stop::Fail(e.code().to_string(), e.to_string()),
    }
}

/// The steps between claim and finish. Returns the number of outputs on success.
async fn process(
    ctx: &Arc<Ctx>,
    task: &Task,
    spec: &ValidSpec,
    token: i64,
    started: Instant,
) -> Result<u32, Stop> {
    let id = task.id;
    let worker = ctx.origin.member.clone();
    ctx.record(
        id,
        token,
        Some(0),
        vec![ctx.event(
            id,
            EventBody::WorkloadProcessingStarted(events::WorkloadProcessingStarted {
                worker: worker.clone(),
                attempt: task.attempts,
            }),
        )],
    )
    .await?;

    let dir = ctx.scratch.join(format!("{id}-{token}"));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| scratch_stop("scratch", &dir, &e))?;
    let _scratch = Scratch(dir.clone());

    // Pull.
    let t0 = Instant::now();
    let input = dir.join("source");
    let pulled = if ctx.mode == Mode::Noop {
        transcode_core::objects::Transfer {
            bytes: 0,
            sha256: String::new(),
        }
    } else {
        let expected = spec.spec.source_sha256.as_deref();
        ctx.with_retry(id, token, "pull", &ctx.retry.pull, |_| async {
            let t = ctx.objects.get_to_file(&spec.source, &input).await?;
            match expected {
                Some(want) if !want.eq_ignore_ascii_case(&t.sha256) => {
                    Err(ObjectError::ChecksumMismatch {
                        url: spec.source.to_string(),
                        expected: want.to_ascii_lowercase(),
                        found: t.sha256,
                    })
                }
                _ => Ok(t),
            }
        })
        .await?
    };
    ctx.record(
        id,
        token,
        Some(10),
        vec![ctx.event(
            id,
            EventBody::VideoFilePulled(events::VideoFilePulled {
                source: spec.source.to_string(),
                bytes: pulled.bytes,
                sha256: pulled.sha256.clone(),
                millis: t0.elapsed().as_millis() as u64,
            }),
        )],
    )
    .await?;

    // What an earlier attempt already delivered (empty on a first attempt).
    let reused = if ctx.mode == Mode::Noop {
        Vec::new()
    } else {
        previous_uploads(ctx, task, spec, token, &pulled.sha256).await?
    };

    // Transcode.
    let t1 = Instant::now();
    let report = if ctx.mode == Mode::Noop {
        TranscodeReport {
            source: SourceInfo {
                width: 0,
                height: 0,
                duration_ms: 0,
                has_audio: false,
                framerate: (0, 1),
            },
            outputs: Vec::new(),
            dropped: Vec::new(),
        }
    } else if reused.is_empty() {
        run_transcoder(ctx, id, token, spec, spec.renditions.clone(), &input, &dir).await?
    } else {
        let source = probe_source(ctx, &input).await?;
        let done: HashSet<&str> = reused.iter().map(|r| r.name.as_str()).collect();
        let plan = resume_plan(&spec.renditions, &done, source.height);
        ctx.metrics.add(
            "transcode_renditions_reused_total",
            &[],
            reused.len() as f64,
        );
        tracing::info!(
            task = %id,
            reused = ?done,
            transcode = ?plan.transcode.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            "resuming: renditions already uploaded by an earlier attempt are kept"
        );
        if plan.transcode.is_empty() {
            TranscodeReport {
                source,
                outputs: Vec::new(),
                dropped: plan.dropped,
            }
        } else {
            run_transcoder(ctx, id, token, spec, plan.transcode, &input, &dir).await?
        }
    };
    ctx.record(
        id,
        token,
        Some(80),
        vec![ctx.event(
            id,
            EventBody::VideoTranscoded(events::VideoTranscoded {
                renditions: report.outputs.iter().map(|o| o.name.clone()).collect(),
                dropped: report.dropped.clone(),
                reused: reused.iter().map(|r| r.name.clone()).collect(),
                duration_ms: report.source.duration_ms,
                millis: t1.elapsed().as_millis() as u64,
            }),
        )],
    )
    .await?;

    // Push.
    let t2 = Instant::now();
    let (uploaded, manifest_url) = if ctx.mode == Mode::Noop {
        (Vec::new(), String::new())
    } else {
        push(ctx, task, spec, token, &pulled.sha256, &report, &reused).await?
    };
    let n = u32::try_from(uploaded.len()).unwrap_or(u32::MAX);
    ctx.record(
        id,
        token,
        Some(95),
        vec![ctx.event(
            id,
            EventBody::TranscodedVideoUploaded(events::TranscodedVideoUploaded {
                outputs: uploaded,
                manifest: manifest_url,
                millis: t2.elapsed().as_millis() as u64,
            }),
        )],
    )
    .await?;
    tracing::info!(task = %id, outputs = n, millis = started.elapsed().as_millis() as u64, "task processed");
    Ok(n)
}

fn output_url(spec: &ValidSpec, name: &str) -> Result<ObjectUrl, Stop> {
    spec.output
        .join(&format!("{name}.mp4"))
        .map_err(|e| Stop::Fail("invalid_output".into(), e.to_string()))
}

/// The renditions an earlier attempt of this task uploaded that can stand as they are: the
/// latest `RenditionUploaded` record per rung whose key is the one this spec gives, whose
/// source had the sha256 just pulled, and whose object is still in the store with the recorded
/// tag (so it is the very upload whose sha256 was recorded; older records without a tag are
/// checked by size). The outputs of mp4mux differ from run to run (timestamps in the file), so comparing a
/// new transcode with the old object could never prove anything; the record plus a HEAD can.
async fn previous_uploads(
    ctx: &Arc<Ctx>,
    task: &Task,
    spec: &ValidSpec,
    token: i64,
    source_sha256: &str,
) -> Result<Vec<RenditionUploaded>, Stop> {
    // `attempts` counts claims, this one included: 1 means no attempt came before.
    if task.attempts <= 1 {
        return Ok(Vec::new());
    }
    let filter = EventFilter {
        task_id: Some(task.id),
        event_type: Some(transcode_core::EventType::RenditionUploaded.to_string()),
        after_seq: None,
        limit: 10_000,
    };
    let rows = retry_store("uploads", || ctx.store.events(&filter)).await?;
    // Rows come in log order, so a later upload of the same rung replaces an earlier one.
    let mut latest: HashMap<String, RenditionUploaded> = HashMap::new();
    for row in rows {
        match serde_json::from_value::<RenditionUploaded>(row.data) {
            Ok(r) => {
                latest.insert(r.name.clone(), r);
            }
            Err(e) => {
                tracing::warn!(task = %task.id, seq = row.seq, error = %e, "unreadable RenditionUploaded event ignored")
            }
        }
    }
    let mut kept = Vec::new();
    for r in &spec.renditions {
        let Some(prev) = latest.remove(&r.name) else {
            continue;
        };
        let url = output_url(spec, &r.name)?;
        if prev.url != url.to_string() || prev.source_sha256 != source_sha256 {
            tracing::info!(task = %task.id, rendition = %r.name, "earlier upload was of another key or source: made again");
            continue;
        }
        let head = ctx
            .with_retry(task.id, token, "push", &ctx.retry.push, |_| {
                ctx.objects.head(&url)
            })
            .await?;
        match head {
            Some(info) if same_upload(&prev, &info) => kept.push(prev),
            Some(info) => {
                tracing::info!(task = %task.id, rendition = %r.name, recorded = prev.bytes, found = info.size, recorded_tag = ?prev.e_tag, found_tag = ?info.e_tag, "object changed since it was uploaded: made again")
            }
            None => {
                tracing::info!(task = %task.id, rendition = %r.name, "uploaded object is gone: made again")
            }
        }
    }
    Ok(kept)
}

/// True when `info` describes the object that `prev` recorded uploading.
fn same_upload(prev: &RenditionUploaded, info: &transcode_core::objects::ObjectInfo) -> bool {
    info.size == prev.bytes
        && match &prev.e_tag {
            Some(tag) => info.e_tag.as_ref() == Some(tag),
            None => true,
        }
}

/// What a resumed attempt still has to transcode.
#[derive(Debug, PartialEq)]
struct ResumePlan {
    /// The rungs to give the transcoder, in ladder order.
    transcode: Vec<Rendition>,
    /// Rungs that are not made at all because they are taller than the source; reported here
    /// when the transcoder is not run.
    dropped: Vec<String>,
}

/// Plans a resumed transcode against the ladder, the rungs already `done`, and the source's
/// height. Two rules of the ladder planner (worker/src/transcode/ladder.rs) must give the same
/// result as in the first attempt:
/// - rungs taller than the source are dropped, but when *every* rung given is taller, the
///   smallest is kept at the source's height. A subset made only of taller rungs would trip
///   that rule and produce a rung the first attempt dropped, so when everything not taller is
///   done the transcoder is not run at all;
/// - the AAC stream is encoded once, at the highest `audio_kbps` of the kept rungs. The rungs
///   passed on get that bitrate, so resumed outputs have the same audio as the first ones.
fn resume_plan(ladder: &[Rendition], done: &HashSet<&str>, source_height: u32) -> ResumePlan {
    let fits = |r: &&Rendition| r.height <= source_height;
    let mut kept: Vec<&Rendition> = ladder.iter().filter(fits).collect();
    if kept.is_empty() {
        kept.extend(ladder.iter().min_by_key(|r| (r.height, r.width)));
    }
    let audio_kbps = kept.iter().map(|r| r.audio_kbps).max().unwrap_or(128);
    let missing: Vec<&Rendition> = ladder
        .iter()
        .filter(|r| !done.contains(r.name.as_str()))
        .collect();
    if !missing
        .iter()
        .any(|r| kept.iter().any(|k| k.name == r.name))
    {
        return ResumePlan {
            transcode: Vec::new(),
            dropped: missing.iter().map(|r| r.name.clone()).collect(),
        };
    }
    ResumePlan {
        transcode: missing
            .into_iter()
            .map(|r| Rendition {
                audio_kbps,
                ..r.clone()
            })
            .collect(),
        dropped: Vec::new(),
    }
}

/// Probes the pulled source (GStreamer's discoverer blocks, so off the async threads).
async fn probe_source(ctx: &Arc<Ctx>, input: &Path) -> Result<SourceInfo, Stop> {
    let input = input.to_path_buf();
    let timeout = ctx.stall_timeout;
    match tokio::task::spawn_blocking(move || transcode::probe(&input, timeout)).await {
        Ok(r) => r.map_err(transcode_stop),
        Err(e) => Err(Stop::Fail("transcoder_crashed".into(), e.to_string())),
    }
}

async fn run_transcoder(
    ctx: &Arc<Ctx>,
    id: TaskId,
    token: i64,
    spec: &ValidSpec,
    renditions: Vec<Rendition>,
    input: &Path,
    dir: &Path,
) -> Result<TranscodeReport, Stop> {
    let job = TranscodeJob {
        input: input.to_path_buf(),
        out_dir: dir.join("out"),
        renditions,
        codec_preset: spec.spec.codec_preset,
        stall_timeout: ctx.stall_timeout,
        hard_timeout: None,
    };
    tokio::fs::create_dir_all(&job.out_dir)
        .await
        .map_err(|e| scratch_stop("transcode", &job.out_dir, &e))?;
    // Progress flows from the GStreamer thread through a channel; this side turns every 10 %
    // into a TaskProgress event (10 % → 80 % of the whole task).
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u8>();
    let handle = tokio::task::spawn_blocking(move || {
        let cb = move |p: u8| {
            let _ = ptx.send(p);
        };
        transcode::transcode(&job, &cb)
    });
    let mut last = 0u8;
    while let Some(p) = prx.recv().await {
        let step = p / 10 * 10;
        if step > last && step < 100 {
            last = step;
            // u16: 90 * 7 does not fit in a u8.
            let overall = u8::try_from(10 + u16::from(step) * 7 / 10).unwrap_or(80);
            ctx.record(
                id,
                token,
                Some(overall),
                vec![ctx.event(
                    id,
                    EventBody::TaskProgress(events::TaskProgress { percent: overall }),
                )],
            )
            .await?;
        }
    }
    match handle.await {
        Ok(r) => r.map_err(transcode_stop),
        Err(e) => Err(Stop::Fail("transcoder_crashed".into(), e.to_string())),
    }
}

/// Uploads the renditions made in this attempt, each under the push retry policy and each
/// recorded (`RenditionUploaded`) as soon as it is in the store, then the manifest, which
/// lists every rung in ladder order, reused ones included.
async fn push(
    ctx: &Arc<Ctx>,
    task: &Task,
    spec: &ValidSpec,
    token: i64,
    source_sha256: &str,
    report: &TranscodeReport,
    reused: &[RenditionUploaded],
) -> Result<(Vec<events::UploadedOutput>, String), Stop> {
    let id = task.id;
    let mut uploaded = Vec::new();
    let mut outputs = Vec::new();
    for r in &spec.renditions {
        let done = if let Some(prev) = reused.iter().find(|p| p.name == r.name) {
            uploaded.push(events::UploadedOutput {
                name: prev.name.clone(),
                url: prev.url.clone(),
                bytes: prev.bytes,
                sha256: prev.sha256.clone(),
                uploaded: false,
            });
            prev.clone()
        } else if let Some(out) = report.outputs.iter().find(|o| o.name == r.name) {
            let url = output_url(spec, &out.name)?;
            let t = ctx
                .with_retry(id, token, "push", &ctx.retry.push, |_| {
                    ctx.objects.put_file(&out.path, &url)
                })
                .await?;
            // The tag is what lets a resumed attempt trust this object without reading it back.
            let e_tag = ctx
                .with_retry(id, token, "push", &ctx.retry.push, |_| {
                    ctx.objects.head(&url)
                })
                .await?
                .and_then(|i| i.e_tag);
            let rec = RenditionUploaded {
                name: out.name.clone(),
                url: url.to_string(),
                bytes: t.bytes,
                sha256: t.sha256,
                source_sha256: source_sha256.to_string(),
                width: out.width,
                height: out.height,
                video_kbps: out.video_kbps,
                duration_ms: out.duration_ms,
                e_tag,
            };
            ctx.record(
                id,
                token,
                None,
                vec![ctx.event(id, EventBody::RenditionUploaded(rec.clone()))],
            )
            .await?;
            uploaded.push(events::UploadedOutput {
                name: rec.name.clone(),
                url: rec.url.clone(),
                bytes: rec.bytes,
                sha256: rec.sha256.clone(),
                uploaded: true,
            });
            rec
        } else {
            // Dropped: taller than the source.
            continue;
        };
        outputs.push(ManifestOutput {
            name: done.name,
            url: done.url,
            width: done.width,
            height: done.height,
            video_kbps: done.video_kbps,
            duration_ms: done.duration_ms,
            bytes: done.bytes,
            sha256: done.sha256,
        });
    }
    let manifest = Manifest {
        task_id: id,
        source: spec.source.to_string(),
        source_sha256: source_sha256.to_string(),
        source_width: report.source.width,
        source_height: report.source.height,
        duration_ms: report.source.duration_ms,
        has_audio: report.source.has_audio,
        outputs,
        dropped: report.dropped.clone(),
        lease_token: token,
        worker: ctx.origin.member.clone(),
        created_at: Utc::now(),
    };
    let body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Stop::Fail("manifest".into(), e.to_string()))?;
    let url = spec
        .output
        .join("manifest.json")
        .map_err(|e| Stop::Fail("invalid_output".into(), e.to_string()))?;
    // A zombie must not overwrite the manifest of the attempt that replaced it: prove the
    // lease is still ours right before the write.
    retry_store("renew", || ctx.store.renew_lease(id, token, ctx.lease)).await?;
    ctx.with_retry(id, token, "push", &ctx.retry.push, |_| {
        ctx.objects.put_bytes(&url, body.clone().into())
    })
    .await?;
    Ok((uploaded, url.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_is_reused_only_while_the_store_reports_its_tag() {
        let rec = |e_tag: Option<&str>| RenditionUploaded {
            name: "720p".into(),
            url: "s3://b/out/720p.mp4".into(),
            bytes: 100,
            sha256: "ab".into(),
            source_sha256: "cd".into(),
            width: 1280,
            height: 720,
            video_kbps: 3000,
            duration_ms: 2000,
            e_tag: e_tag.map(str::to_string),
        };
        let info = |size: u64, e_tag: Option<&str>| transcode_core::objects::ObjectInfo {
            size,
            last_modified: chrono::Utc::now(),
            e_tag: e_tag.map(str::to_string),
        };
        assert!(same_upload(&rec(Some("\"x\"")), &info(100, Some("\"x\""))));
        // Overwritten with bytes of the same length: only the tag tells.
        assert!(!same_upload(&rec(Some("\"x\"")), &info(100, Some("\"y\""))));
        assert!(!same_upload(&rec(Some("\"x\"")), &info(100, None)));
        assert!(!same_upload(&rec(Some("\"x\"")), &info(99, Some("\"x\""))));
        // Records from before tags were kept: the size is all there is.
        assert!(same_upload(&rec(None), &info(100, Some("\"z\""))));
        assert!(!same_upload(&rec(None), &info(101, None)));
    }

    fn rung(name: &str, width: u32, height: u32, audio_kbps: u32) -> Rendition {
        Rendition {
            name: name.into(),
            width,
            height,
            video_kbps: 500,
            audio_kbps,
        }
    }

    fn names(v: &[Rendition]) -> Vec<&str> {
        v.iter().map(|r| r.name.as_str()).collect()
    }

    fn ladder() -> Vec<Rendition> {
        vec![
            rung("1080p", 1920, 1080, 192),
            rung("720p", 1280, 720, 128),
            rung("360p", 640, 360, 96),
        ]
    }

    #[test]
    fn resume_transcodes_only_what_is_missing_with_the_first_runs_audio() {
        let done: HashSet<&str> = ["720p"].into_iter().collect();
        // A 720p source: 1080p was dropped the first time, 720p is done, 360p is missing.
        let plan = resume_plan(&ladder(), &done, 720);
        assert_eq!(names(&plan.transcode), ["1080p", "360p"]);
        // The first run's AAC was 128 kb/s (the best of the kept 720p and 360p), not 96.
        assert!(plan.transcode.iter().all(|r| r.audio_kbps == 128));
        assert!(plan.dropped.is_empty());
    }

    #[test]
    fn resume_skips_the_transcoder_when_only_taller_rungs_are_left() {
        // Given 1080p alone, the planner would keep it capped at the source's height; the
        // first attempt dropped it, so the resumed one must not make it.
        let done: HashSet<&str> = ["720p", "360p"].into_iter().collect();
        let plan = resume_plan(&ladder(), &done, 720);
        assert!(plan.transcode.is_empty());
        assert_eq!(plan.dropped, ["1080p"]);
        // Every rung taller than a 240p source: the first attempt made the smallest, capped.
        let done: HashSet<&str> = ["360p"].into_iter().collect();
        let plan = resume_plan(&ladder(), &done, 240);
        assert!(plan.transcode.is_empty());
        assert_eq!(plan.dropped, ["1080p", "720p"]);
    }

    #[test]
    fn resume_of_the_capped_smallest_rung_is_made_again() {
        // Nothing done yet on a 240p source: the smallest (capped) rung goes to the transcoder
        // with the others, which drops the taller ones itself.
        let plan = resume_plan(&ladder(), &HashSet::new(), 240);
        assert_eq!(names(&plan.transcode), ["1080p", "720p", "360p"]);
        assert!(plan.transcode.iter().all(|r| r.audio_kbps == 96));
    }

    #[test]
    fn object_errors_map_to_the_documented_task_outcomes() {
        let url = "s3://b/in.mp4".to_string();
        match object_stop("pull", ObjectError::NotFound { url: url.clone() }, 1, false) {
            Stop::Fail(code, _) => assert_eq!(code, "source_not_found"),
            other => panic!("missing source must fail, got {other:?}"),
        }
        // A missing bucket on push is a setup problem for an operator, not the input's fault.
        assert!(matches!(
            object_stop("push", ObjectError::NotFound { url: url.clone() }, 1, false),
            Stop::Escalate { .. }
        ));
        match object_stop(
            "pull",
            ObjectError::PermissionDenied {
                url: url.clone(),
                message: "403".into(),
            },
            1,
            false,
        ) {
            Stop::Escalate {
                operation,
                attempts,
                class,
                ..
            } => assert_eq!(
                (operation.as_str(), attempts, class.as_str()),
                ("pull", 1, "permission_denied")
            ),
            other => panic!("403 escalates at once, got {other:?}"),
        }
        match object_stop(
            "push",
            ObjectError::Transient {
                url: url.clone(),
                message: "503".into(),
            },
            5,
            true,
        ) {
            Stop::Escalate {
                attempts, message, ..
            } => {
                assert_eq!(attempts, 5);
                assert!(message.starts_with("gave up after 5 attempts"), "{message}");
            }
            other => panic!("exhausted retries escalate, got {other:?}"),
        }
        match object_stop(
            "pull",
            ObjectError::LocalIo {
                path: "/scratch/t/source".into(),
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            },
            1,
            false,
        ) {
            Stop::Fail(code, message) => {
                assert_eq!(code, "pull_no_space");
                assert!(message.contains("ENOSPC"), "{message}");
            }
            other => panic!("a full disk fails the task, got {other:?}"),
        }
    }

    #[test]
    fn a_full_disk_while_transcoding_is_a_task_error() {
        let io = TranscodeError::Io {
            path: "/scratch/t/out/a.mp4".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert!(matches!(transcode_stop(io), Stop::Fail(code, _) if code == "transcode_no_space"));
        let gst = TranscodeError::Gst {
            message: "Error while writing to file \"/x\". No space left on device".into(),
        };
        assert!(matches!(transcode_stop(gst), Stop::Fail(code, _) if code == "transcode_no_space"));
        let plugin = TranscodeError::MissingPlugin {
            name: "x264enc".into(),
        };
        assert!(matches!(transcode_stop(plugin), Stop::Escalate { .. }));
    }
}
