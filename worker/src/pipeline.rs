//! One task's life on a worker: claim → pull → transcode → push → finish, with one event per
//! step. Each event is written to the store first (in the same transaction as the status change
//! that caused it, fenced by the lease token) and published on the bus only once committed, so
//! the bus never announces what the database does not hold. A background task renews the lease;
//! if renewal finds the token stale (the task was requeued elsewhere), the pipeline stops and
//! writes nothing more. Scratch files are removed on every path.

use crate::transcode::{self, TranscodeError, TranscodeJob, TranscodeReport};
use chrono::Utc;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use transcode_core::bus::Publisher;
use transcode_core::events::{self, EventBody, Origin};
use transcode_core::manifest::{Manifest, ManifestOutput};
use transcode_core::metrics::Registry;
use transcode_core::objects::{ObjectError, Objects};
use transcode_core::spec::ValidSpec;
use transcode_core::store::{Claimant, Fence, Patch, Store, StoreError};
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
    pub objects: Objects,
    pub bus: Publisher,
    pub origin: Origin,
    pub scratch: PathBuf,
    pub lease: Duration,
    pub metrics: Arc<Registry>,
    pub mode: Mode,
    pub stall_timeout: Duration,
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
enum Stop {
    /// Permanent: the task fails with this code and message.
    Fail(String, String),
    /// Needs an operator: the task escalates (operation, class, message).
    Escalate(String, String, String),
    Fenced,
    Store(StoreError),
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

/// Retries a store call a few times when the database is unreachable (a restart, a failover),
/// so a short outage does not cost the task.
async fn retry_store<T, F, Fut>(what: &str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if e.is_transient() && tries < 8 => {
                tries += 1;
                tracing::warn!(op = what, error = %e, retry_in_ms = delay.as_millis() as u64, "store unavailable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
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
        retry_store("record", || {
            self.store.update_running(id, token, &patch, &evs)
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
        retry_store("finish", || {
            self.store
                .transition(id, Fence::Token(token), to, &patch, &evs)
        })
        .await?;
        self.publish(&evs);
        Ok(())
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
    if let Err(e) = retry_store("received", || {
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
    let claimed = match retry_store("claim", || {
        ctx.store
            .claim(id, &claimant, ctx.lease, std::slice::from_ref(&details))
    })
    .await
    {
        Ok(t) => t,
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

    // The lease renewer flips `lost` when the token goes stale.
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
        Some(Err(Stop::Escalate(operation, class, message))) => {
            tracing::warn!(task = %id, %operation, %class, %message, "task escalated: needs an operator");
            ctx.metrics
                .inc("transcode_escalations_total", &[("operation", &operation)]);
            let code = format!("{operation}_{class}");
            let evs = vec![
                ctx.event(
                    id,
                    EventBody::ContainerErrorEscalation(events::ContainerErrorEscalation {
                        operation: operation.clone(),
                        attempts: 1,
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

fn object_stop(operation: &str, e: ObjectError) -> Stop {
    match &e {
        ObjectError::NotFound { url } if operation == "pull" => Stop::Fail(
            "source_not_found".into(),
            format!("source not found: {url}"),
        ),
        ObjectError::LocalIo { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            Stop::Fail(
                format!("{operation}_no_space"),
                format!("scratch disk full (ENOSPC): {e}"),
            )
        }
        ObjectError::PermissionDenied { .. } => {
            Stop::Escalate(operation.into(), "permission_denied".into(), e.to_string())
        }
        _ => Stop::Escalate(operation.into(), e.code().into(), e.to_string()),
    }
}

fn transcode_stop(e: TranscodeError) -> Stop {
    if let TranscodeError::MissingPlugin { .. } = e {
        return Stop::Escalate("transcode".into(), e.code().into(), e.to_string());
    }
    Stop::Fail(e.code().to_string(), e.to_string())
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
    tokio::fs::create_dir_all(&dir).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::StorageFull {
            Stop::Fail(
                "scratch_no_space".into(),
                format!("scratch disk full (ENOSPC): {e}"),
            )
        } else {
            Stop::Escalate(
                "scratch".into(),
                "io".into(),
                format!("{}: {e}", dir.display()),
            )
        }
    })?;
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
        ctx.objects
            .get_to_file(&spec.source, &input)
            .await
            .map_err(|e| object_stop("pull", e))?
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

    // Transcode.
    let t1 = Instant::now();
    let report = if ctx.mode == Mode::Noop {
        TranscodeReport {
            source: transcode::SourceInfo {
                width: 0,
                height: 0,
                duration_ms: 0,
                has_audio: false,
                framerate: (0, 1),
            },
            outputs: Vec::new(),
            dropped: Vec::new(),
        }
    } else {
        run_transcoder(ctx, id, token, spec, &input, &dir).await?
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
        push(ctx, task, spec, token, &pulled.sha256, &report).await?
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

async fn run_transcoder(
    ctx: &Arc<Ctx>,
    id: TaskId,
    token: i64,
    spec: &ValidSpec,
    input: &Path,
    dir: &Path,
) -> Result<TranscodeReport, Stop> {
    let job = TranscodeJob {
        input: input.to_path_buf(),
        out_dir: dir.join("out"),
        renditions: spec.renditions.clone(),
        codec_preset: spec.spec.codec_preset,
        stall_timeout: ctx.stall_timeout,
        hard_timeout: None,
    };
    tokio::fs::create_dir_all(&job.out_dir)
        .await
        .map_err(|e| Stop::Escalate("scratch".into(), "io".into(), e.to_string()))?;
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

async fn push(
    ctx: &Arc<Ctx>,
    task: &Task,
    spec: &ValidSpec,
    token: i64,
    source_sha256: &str,
    report: &TranscodeReport,
) -> Result<(Vec<events::UploadedOutput>, String), Stop> {
    let mut uploaded = Vec::new();
    let mut outputs = Vec::new();
    for out in &report.outputs {
        let url = spec
            .output
            .join(&format!("{}.mp4", out.name))
            .map_err(|e| Stop::Fail("invalid_output".into(), e.to_string()))?;
        let t = ctx
            .objects
            .put_file(&out.path, &url)
            .await
            .map_err(|e| object_stop("push", e))?;
        uploaded.push(events::UploadedOutput {
            name: out.name.clone(),
            url: url.to_string(),
            bytes: t.bytes,
            sha256: t.sha256.clone(),
            uploaded: true,
        });
        outputs.push(ManifestOutput {
            name: out.name.clone(),
            url: url.to_string(),
            width: out.width,
            height: out.height,
            video_kbps: out.video_kbps,
            duration_ms: out.duration_ms,
            bytes: t.bytes,
            sha256: t.sha256,
        });
    }
    let manifest = Manifest {
        task_id: task.id,
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
    ctx.store.renew_lease(task.id, token, ctx.lease).await?;
    ctx.objects
        .put_bytes(&url, body.into())
        .await
        .map_err(|e| object_stop("push", e))?;
    Ok((uploaded, url.to_string()))
}
