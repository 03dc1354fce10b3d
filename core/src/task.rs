//! The task row as every process sees it (ARCHITECTURE §4 `tasks`).

use crate::spec::TaskSpec;
use crate::status::TaskStatus;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Task ids are UUIDv7, so they sort by creation time.
pub type TaskId = Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub status: TaskStatus,
    pub priority: i32,
    pub spec: TaskSpec,
    /// How many times the task has been claimed.
    pub attempts: u32,
    pub max_attempts: u32,
    pub worker_id: Option<String>,
    pub node: Option<String>,
    /// The fencing token: it grows by one on every claim, and every write a worker makes to a
    /// running task must carry the current value.
    pub lease_token: i64,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress: u8,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}
