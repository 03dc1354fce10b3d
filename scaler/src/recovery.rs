//! The two loops that make the in-memory queue converge on the database, so that no message
//! loss costs a task: the **scan** finds `queued` rows the dispatcher does not hold (submitted
//! while the scaler was down, a lost intake message, a TASK frame lost with its worker), and
//! the **lease sweeper** requeues `running` tasks whose lease ran out (the worker died between
//! claim and completion) and publishes the store's `TaskRequeued` events.

use crate::dispatch::Offered;
use crate::metrics as m;
use crate::queue::QueueItem;
use crate::server::Shared;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use transcode_core::store::StoreError;
use transcode_core::TaskStatus;

/// Rows read per scan. The highest-ranked ones come first, and the queue drains between
/// scans, so a deeper backlog is reached over successive scans.
pub const SCAN_LIMIT: u32 = 1000;

/// What one scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub seen: usize,
    pub enqueued: usize,
}

/// Reads the queued rows once and queues those the dispatcher does not know about.
pub async fn scan_once(shared: &Shared) -> Result<ScanReport, StoreError> {
    let rows = shared
        .store_call("queued_tasks", shared.store.queued_tasks(SCAN_LIMIT))
        .await?;
    let ids: Vec<_> = rows.iter().map(|(id, _)| *id).collect();
    let wanted = shared.dispatch.wanted(&ids);
    let mut items = Vec::with_capacity(wanted.len());
    for id in wanted {
        // The row is read again for its attempt count (the TASK frame carries it), which also
        // skips a task claimed since the list was read.
        match shared
            .store_call("get_task", shared.store.get_task(id))
            .await
        {
            Ok(t) if t.status == TaskStatus::Queued => items.push(QueueItem {
                id,
                priority: t.priority,
                attempt: t.attempts.saturating_add(1),
            }),
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let enqueued = shared
        .dispatch
        .offer(&items, false)
        .into_iter()
        .filter(|o| *o == Offered::Queued)
        .count();
    Ok(ScanReport {
        seen: rows.len(),
        enqueued,
    })
}

/// Requeues every task whose lease expired; returns how many were recovered.
pub async fn sweep_once(shared: &Shared) -> Result<usize, StoreError> {
    let recovered = shared
        .store_call(
            "recover_expired",
            shared
                .store
                .recover_expired(chrono::Utc::now(), &shared.origin),
        )
        .await?;
    let mut requeue = Vec::new();
    let mut gone = Vec::new();
    for r in &recovered {
        shared.publish(&r.event);
        let status = r.task.status.as_str();
        shared.metrics.inc(m::RECOVERED, &[("status", status)]);
        tracing::warn!(
            task = %r.task.id,
            lost_worker = r.lost_worker.as_deref().unwrap_or("-"),
            attempts = r.task.attempts,
            max_attempts = r.task.max_attempts,
            %status,
            "lease expired: task recovered from a lost worker"
        );
        if r.task.status == TaskStatus::Queued {
            requeue.push(QueueItem {
                id: r.task.id,
                priority: r.task.priority,
                attempt: r.task.attempts.saturating_add(1),
            });
        } else {
            gone.push(r.task.id);
        }
    }
    shared.dispatch.forget(&gone);
    // A new attempt: whatever this scaler sent for the task before no longer counts.
    shared.dispatch.offer(&requeue, true);
    Ok(recovered.len())
}

/// Scans at start-up and then every `every`, until `stop` turns true.
pub async fn run_scans(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::server::stopped(&mut stop) => break,
            _ = ticker.tick() => {
                match scan_once(&shared).await {
                    Ok(r) => {
                        shared.metrics.inc(m::SCANS, &[("result", "ok")]);
                        shared.metrics.add(m::SCAN_ENQUEUED, &[], r.enqueued as f64);
                        if r.enqueued > 0 {
                            tracing::info!(seen = r.seen, enqueued = r.enqueued,
                                "scan queued tasks the dispatcher did not hold");
                        }
                    }
                    Err(e) => {
                        shared.metrics.inc(m::SCANS, &[("result", "error")]);
                        tracing::warn!(error = %e, "scan of queued tasks failed; retrying next interval");
                    }
                }
            }
        }
    }
}

/// Sweeps expired leases every `every` (the first right away), until `stop` turns true.
pub async fn run_sweeps(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::server::stopped(&mut stop) => break,
            _ = ticker.tick() => {
                if let Err(e) = sweep_once(&shared).await {
                    tracing::warn!(error = %e, "lease sweep failed; retrying next interval");
                }
            }
        }
    }
}
