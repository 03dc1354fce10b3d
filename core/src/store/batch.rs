//! Group commit for a process's step records (ARCHITECTURE §4: throughput comes from batching
//! commits, not from weaker durability). Every running task of a worker writes its step events
//! through one [`StepWriter`]; while one transaction is committing, the steps that arrive queue
//! up, and the next transaction takes all of them, so a busy worker pays one fsync for many
//! tasks' steps and an idle one pays no added latency. Each step keeps its own fence and gets
//! its own answer, and each caller awaits the commit of the batch that holds its step, so "an
//! event commits with the change that caused it" holds inside the batch.

use super::{Patch, RunningUpdate, Store, StoreError, StoreResult};
use crate::events::Event;
use crate::task::TaskId;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// The most steps one transaction takes; more wait for the next.
const MAX_BATCH: usize = 128;

type Job = (RunningUpdate, oneshot::Sender<StoreResult<()>>);

/// A handle to the process's step writer. Cheap to clone; the writer task ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct StepWriter {
    tx: mpsc::UnboundedSender<Job>,
}

impl StepWriter {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(store: Arc<dyn Store>) -> StepWriter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, rx));
        StepWriter { tx }
    }

    /// [`Store::update_running`], grouped with whatever other steps are waiting.
    pub async fn update_running(
        &self,
        id: TaskId,
        token: i64,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        let job = RunningUpdate {
            id,
            token,
            patch: patch.clone(),
            events: events.to_vec(),
        };
        self.tx
            .send((job, reply))
            .map_err(|_| StoreError::Unavailable("the step writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the step writer dropped the step".into()))?
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (items, replies): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
        match store.update_running_many(&items).await {
            Ok(results) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            // Nothing of the batch was written: every caller sees the failure and retries
            // (or gives up) on its own, as it would have with a single write.
            Err(e) => {
                let transient = e.is_transient();
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(if transient {
                        StoreError::Unavailable(msg.clone())
                    } else {
                        StoreError::Backend(msg.clone())
                    }));
                }
            }
        }
    }
}
