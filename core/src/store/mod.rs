//! The `Store` trait: the database as the source of truth for tasks, events and members, and
//! the rules every implementation shares. The PostgreSQL and SQLite stores implement it and
//! pass one conformance suite (`core/tests/store_conformance.rs`). Status changes go through
//! [`TaskStatus::check_transition`] inside the same transaction that writes their events.

mod batch;
mod leader;
mod postgres;
mod sqlite;

pub use batch::StepWriter;
pub use leader::{lock_key, Leadership};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::events::{Event, StoredEvent};
use crate::spec::{SpecError, TaskSpec};
use crate::status::{IllegalTransition, TaskStatus};
use crate::task::{Task, TaskId};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task {0} not found")]
    NotFound(TaskId),
    #[error("task {id} is {status}, expected {expected}")]
    WrongStatus {
        id: TaskId,
        status: TaskStatus,
        expected: &'static str,
    },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("stale lease token for task {id}: held {held}, current {current}")]
    StaleToken { id: TaskId, held: i64, current: i64 },
    #[error("idempotency key {key:?} is already used by task {existing} with a different spec")]
    IdempotencyConflict { key: String, existing: TaskId },
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] SpecError),
    #[error("cannot reach the database: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Backend(String),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("unsupported store URL {0:?}: use sqlite://PATH or postgres://…")]
    BadUrl(String),
    /// Leadership passed to another process (`leader.rs`).
    #[error("leadership lost: {0}")]
    LostLeadership(String),
}

impl StoreError {
    /// Connection-level failures a caller may retry; everything else is a definite answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Who holds a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    pub worker_id: String,
    pub node: String,
}

/// How a write to a task proves it may be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// A worker writing to the task it claimed: the token must be the current one.
    Token(i64),
    /// An operator or the scaler, acting on the row as it is now.
    Admin,
    /// An operator acting only on a task in exactly this status (resolving an escalated task):
    /// in any other status the write is refused with `WrongStatus` and nothing changes. The
    /// check runs on the locked row, so it cannot race another writer as a read-then-write can.
    Status(TaskStatus),
}

/// Fields a transition may set besides the status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch {
    pub progress: Option<u8>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// One fenced step of a running task, as [`Store::update_running`] takes it; the unit that
/// [`Store::update_running_many`] and the [`StepWriter`] group.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningUpdate {
    pub id: TaskId,
    pub token: i64,
    pub patch: Patch,
    pub events: Vec<Event>,
}

/// Filter and page for listing tasks, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFilter {
    pub status: Option<TaskStatus>,
    pub limit: u32,
    /// Keyset paging: only tasks older than this one.
    pub before: Option<TaskId>,
}

impl Default for TaskFilter {
    fn default() -> Self {
        TaskFilter {
            status: None,
            limit: 100,
            before: None,
        }
    }
}

/// Filter for reading events, oldest first from the cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub task_id: Option<TaskId>,
    pub event_type: Option<String>,
    /// Only events with `seq` greater than this.
    pub after_seq: Option<i64>,
    pub limit: u32,
}

/// One gossip member as the database records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub role: String,
    pub node: String,
    pub state: String,
    pub last_seen: DateTime<Utc>,
    pub tags: serde_json::Value,
}

/// The result of inserting a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Inserted {
    pub task: Task,
    /// False when the idempotency key matched an existing task, which is returned instead.
    pub created: bool,
}

/// What happened to a task recovered from a lost worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub task: Task,
    /// The worker that held it.
    pub lost_worker: Option<String>,
    /// The `TaskRequeued` event the store appended, for the caller to publish.
    pub event: Event,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations; returns the schema version now in force.
    async fn migrate(&self) -> StoreResult<u32>;

    /// Validates and inserts a `queued` task together with `events` (their subject is set to
    /// the new id). A repeated idempotency key with the same spec returns the first task.
    async fn insert_task(&self, spec: &TaskSpec, events: &[Event]) -> StoreResult<Inserted>;

    async fn get_task(&self, id: TaskId) -> StoreResult<Task>;

    async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<Task>>;

    /// Queued tasks in dispatch order (priority, then age), for the dispatcher's scans.
    async fn queued_tasks(&self, limit: u32) -> StoreResult<Vec<(TaskId, i32)>>;

    /// Claims one specific queued task: `running`, a new fencing token, attempts + 1, a lease.
    async fn claim(
        &self,
        id: TaskId,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Task>;

    /// Claims the next queued task in dispatch order, if any. Concurrent callers never get the
    /// same task.
    async fn claim_next(
        &self,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Option<Task>>;

    /// Extends the lease of a running task held with `token`; returns the new expiry.
    async fn renew_lease(
        &self,
        id: TaskId,
        token: i64,
        lease: Duration,
    ) -> StoreResult<DateTime<Utc>>;

    /// Records work on a running task without changing its status (progress, step events).
    /// The token is the fence: a worker whose task was requeued gets `StaleToken`, and its
    /// events are not written.
    async fn update_running(
        &self,
        id: TaskId,
        token: i64,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<()>;

    /// Many [`update_running`](Store::update_running) steps, of any tasks, in one transaction:
    /// one commit for the lot, each step still fenced on its own. The outer error means
    /// nothing was written (the connection failed); otherwise each item has its own answer,
    /// and a stale token fails only its own item. The default runs them one by one.
    async fn update_running_many(
        &self,
        items: &[RunningUpdate],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            out.push(
                self.update_running(it.id, it.token, &it.patch, &it.events)
                    .await,
            );
        }
        Ok(out)
    }

    /// Moves a task to `to`, checked against the state machine and the fence, and appends
    /// `events` in the same transaction. Leaving `running` clears the lease.
    async fn transition(
        &self,
        id: TaskId,
        fence: Fence,
        to: TaskStatus,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<Task>;

    /// A worker is gone: its running task goes `incomplete` and then straight to `queued`, or
    /// to `failed` when its attempts are used up. `events` come first; the store appends a
    /// `TaskRequeued` event from `origin` itself, so the requeue is always logged.
    async fn recover_task(
        &self,
        id: TaskId,
        fence: Fence,
        origin: &crate::events::Origin,
        reason: &str,
        events: &[Event],
    ) -> StoreResult<Recovered>;

    /// Recovers every running task whose lease ran out before `now`.
    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
        origin: &crate::events::Origin,
    ) -> StoreResult<Vec<Recovered>>;

    /// Running tasks held by a worker.
    async fn tasks_of_worker(&self, worker_id: &str) -> StoreResult<Vec<Task>>;

    /// Appends events that change no task status (progress, gossip, scaling).
    async fn append_events(&self, events: &[Event]) -> StoreResult<()>;

    async fn events(&self, filter: &EventFilter) -> StoreResult<Vec<StoredEvent>>;

    async fn upsert_members(&self, members: &[Member]) -> StoreResult<()>;

    async fn members(&self) -> StoreResult<Vec<Member>>;

    /// A cheap round trip, for health checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Tries once to become the leader named `name` (see `leader.rs`); `None` while another
    /// process leads.
    async fn try_lead(&self, name: &str) -> StoreResult<Option<Box<dyn Leadership>>>;
}

/// Opens the store a URL names: `sqlite://PATH` (relative or absolute; `sqlite::memory:` for
/// tests) or `postgres://…` / `postgresql://…`.
pub async fn open(url: &str, pool_size: usize) -> StoreResult<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(SqliteStore::open(path)?))
    } else if url == "sqlite::memory:" {
        Ok(Arc::new(SqliteStore::open_memory()?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, pool_size).await?))
    } else {
        Err(StoreError::BadUrl(url.to_string()))
    }
}

/// Shared by both stores: the status a recovered task lands in.
pub(crate) fn recovery_target(attempts: u32, max_attempts: u32) -> TaskStatus {
    if attempts >= max_attempts {
        TaskStatus::Failed
    } else {
        TaskStatus::Queued
    }
}

/// Shared by both stores: checks a fence against the row's current token and status.
pub(crate) fn check_fence(task: &Task, fence: Fence) -> StoreResult<()> {
    match fence {
        Fence::Token(held) => {
            if task.status != TaskStatus::Running || held != task.lease_token {
                return Err(StoreError::StaleToken {
                    id: task.id,
                    held,
                    current: task.lease_token,
                });
            }
        }
        Fence::Status(expected) => {
            if task.status != expected {
                return Err(StoreError::WrongStatus {
                    id: task.id,
                    status: task.status,
                    expected: expected.as_str(),
                });
            }
        }
        Fence::Admin => {}
    }
    Ok(())
}

/// Shared by both stores: the bookkeeping events a recovery appends.
pub(crate) fn recovery_event(
    origin: &crate::events::Origin,
    task: &Task,
    to: TaskStatus,
    reason: &str,
) -> Event {
    origin.event(
        Some(task.id),
        crate::events::EventBody::TaskRequeued(crate::events::TaskRequeued {
            attempts: task.attempts,
            reason: reason.to_string(),
            status: to.to_string(),
        }),
    )
}

pub(crate) fn lease_millis(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}
