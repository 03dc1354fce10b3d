//! The embedded store: SQLite in WAL mode, used by the quick start and `transcode dev`. Every
//! write transaction is `BEGIN IMMEDIATE`, so several processes on one database file (the
//! scaler and its workers) serialize on SQLite's own lock instead of failing mid-transaction.
//! Calls run on tokio's blocking pool because rusqlite blocks.

use super::{
    check_fence, lease_millis, recovery_event, recovery_target, Claimant, EventFilter, Fence,
    Inserted, Member, Patch, Recovered, Store, StoreError, StoreResult, TaskFilter,
};
use crate::events::{Event, Origin, StoredEvent};
use crate::spec::TaskSpec;
use crate::status::TaskStatus;
use crate::task::{Task, TaskId};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIGRATIONS: &[(u32, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_init.sql"))];

const TASK_COLUMNS: &str = "id, status, priority, spec, attempts, max_attempts, worker_id, node, \
     lease_token, lease_expires_at, progress, error_code, error_message, idempotency_key, \
     created_at, updated_at";

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The database file (none in memory): the leader lock file sits beside it.
    path: Option<std::path::PathBuf>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            StoreError::Unavailable(e.to_string())
        }
        Some(rusqlite::ErrorCode::CannotOpen) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v).ok_or_else(|| StoreError::Corrupt(format!("time {v}")))
}

fn parse_id(s: &str) -> StoreResult<TaskId> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("uuid {s:?}")))
}

fn to_u32(v: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

fn task_from_row(row: &Row<'_>) -> StoreResult<Task> {
    let get_err = |e: rusqlite::Error| StoreError::Corrupt(e.to_string());
    let id: String = row.get(0).map_err(get_err)?;
    let status: String = row.get(1).map_err(get_err)?;
    let spec: String = row.get(3).map_err(get_err)?;
    let lease: Option<i64> = row.get(9).map_err(get_err)?;
    let progress: i64 = row.get(10).map_err(get_err)?;
    Ok(Task {
        id: parse_id(&id)?,
        status: status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
        priority: row.get(2).map_err(get_err)?,
        spec: serde_json::from_str::<TaskSpec>(&spec)
            .map_err(|e| StoreError::Corrupt(format!("spec: {e}")))?,
        attempts: to_u32(row.get(4).map_err(get_err)?, "attempts")?,
        max_attempts: to_u32(row.get(5).map_err(get_err)?, "max_attempts")?,
        worker_id: row.get(6).map_err(get_err)?,
        node: row.get(7).map_err(get_err)?,
        lease_token: row.get(8).map_err(get_err)?,
        lease_expires_at: lease.map(from_micros).transpose()?,
        progress: u8::try_from(progress)
            .map_err(|_| StoreError::Corrupt(format!("progress {progress}")))?,
        error_code: row.get(11).map_err(get_err)?,
        error_message: row.get(12).map_err(get_err)?,
        idempotency_key: row.get(13).map_err(get_err)?,
        created_at: from_micros(row.get(14).map_err(get_err)?)?,
        updated_at: from_micros(row.get(15).map_err(get_err)?)?,
    })
}

fn load(tx: &Connection, id: TaskId) -> StoreResult<Task> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
    let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
    let mut rows = stmt.query(params![id.to_string()]).map_err(backend)?;
    match rows.next().map_err(backend)? {
        Some(row) => task_from_row(row),
        None => Err(StoreError::NotFound(id)),
    }
}

fn insert_events(
    tx: &Transaction<'_>,
    events: &[Event],
    subject: Option<TaskId>,
) -> StoreResult<()> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO events (id, type, task_id, source, node, time, data) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(backend)?;
    for ev in events {
        let task = ev.subject.or(subject);
        stmt.execute(params![
            ev.id.to_string(),
            ev.event_type().as_str(),
            task.map(|t| t.to_string()),
            ev.source,
            ev.node,
            micros(ev.time),
            ev.data_json().to_string(),
        ])
        .map_err(backend)?;
    }
    Ok(())
}

/// Moves a loaded task to `to`, after the state machine allows it.
fn write_status(
    tx: &Transaction<'_>,
    task: &Task,
    to: TaskStatus,
    patch: &Patch,
    now: i64,
) -> StoreResult<()> {
    task.status.check_transition(to)?;
    let leaving_running = task.status == TaskStatus::Running;
    tx.execute(
        "UPDATE tasks SET status = ?2, updated_at = ?3, \
           progress = COALESCE(?4, progress), \
           error_code = CASE WHEN ?7 THEN NULL ELSE COALESCE(?5, error_code) END, \
           error_message = CASE WHEN ?7 THEN NULL ELSE COALESCE(?6, error_message) END, \
           lease_expires_at = CASE WHEN ?8 THEN NULL ELSE lease_expires_at END \
         WHERE id = ?1",
        params![
            task.id.to_string(),
            to.as_str(),
            now,
            patch.progress.map(i64::from),
            patch.error_code,
            patch.error_message,
            to == TaskStatus::Queued,
            leaving_running,
        ],
    )
    .map_err(backend)?;
    Ok(())
}

impl SqliteStore {
    pub fn open(path: &str) -> StoreResult<Self> {
        if let Some(dir) = std::path::Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
            }
        }
        let conn = Connection::open(path).map_err(backend)?;
        let mut store = Self::setup(conn)?;
        store.path = Some(std::path::PathBuf::from(path));
        Ok(store)
    }

    pub fn open_memory() -> StoreResult<Self> {
        Self::setup(Connection::open_in_memory().map_err(backend)?)
    }

    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    fn setup(conn: Connection) -> StoreResult<Self> {
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(backend)?;
        // FULL keeps commits durable in WAL mode; throughput comes from batching, not from
        // weaker durability (ARCHITECTURE §4).
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
        )
        .map_err(backend)?;
        Ok(SqliteStore {
            path: None,
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Backend("sqlite connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite worker thread: {e}")))?
    }

    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
    {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let out = f(&tx)?;
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }
}

fn claim_row(
    tx: &Transaction<'_>,
    task: Task,
    who: &Claimant,
    lease: Duration,
    events: &[Event],
) -> StoreResult<Task> {
    if task.status != TaskStatus::Queued {
        return Err(StoreError::WrongStatus {
            id: task.id,
            status: task.status,
            expected: "queued",
        });
    }
    task.status.check_transition(TaskStatus::Running)?;
    let now = micros(Utc::now());
    tx.execute(
        "UPDATE tasks SET status = 'running', attempts = attempts + 1, \
           lease_token = lease_token + 1, worker_id = ?2, node = ?3, \
           lease_expires_at = ?4, updated_at = ?5, error_code = NULL, error_message = NULL \
         WHERE id = ?1",
        params![
            task.id.to_string(),
            who.worker_id,
            who.node,
            now + lease_millis(lease) * 1000,
            now,
        ],
    )
    .map_err(backend)?;
    insert_events(tx, events, Some(task.id))?;
    load(tx, task.id)
}

fn recover_row(
    tx: &Transaction<'_>,
    task: Task,
    origin: &Origin,
    reason: &str,
    events: &[Event],
) -> StoreResult<Recovered> {
    let now = micros(Utc::now());
    let lost_worker = task.worker_id.clone();
    write_status(tx, &task, TaskStatus::Incomplete, &Patch::default(), now)?;
    let incomplete = load(tx, task.id)?;
    let to = recovery_target(incomplete.attempts, incomplete.max_attempts);
    let patch = if to == TaskStatus::Failed {
        Patch {
            error_code: Some("attempts_exhausted".into()),
            error_message: Some(format!("{reason}; no attempts left")),
            ..Patch::default()
        }
    } else {
        Patch::default()
    };
    write_status(tx, &incomplete, to, &patch, now)?;
    let event = recovery_event(origin, &incomplete, to, reason);
    let mut all = events.to_vec();
    all.push(event.clone());
    insert_events(tx, &all, Some(task.id))?;
    Ok(Recovered {
        task: load(tx, task.id)?,
        lost_worker,
        event,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<u32> {
        self.write(|tx| {
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
            )
            .map_err(backend)?;
            let current: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    [],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            let mut version = to_u32(current, "schema version")?;
            for (v, sql) in MIGRATIONS {
                if *v > version {
                    tx.execute_batch(sql).map_err(backend)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                        params![v, micros(Utc::now())],
                    )
                    .map_err(backend)?;
                    version = *v;
                }
            }
            Ok(version)
        })
        .await
    }

    async fn insert_task(&self, spec: &TaskSpec, events: &[Event]) -> StoreResult<Inserted> {
        let valid = spec.validate()?;
        let spec = valid.spec;
        let events = events.to_vec();
        self.write(move |tx| {
            if let Some(key) = &spec.idempotency_key {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT id FROM tasks WHERE idempotency_key = ?1",
                        params![key],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(backend)?;
                if let Some(id) = existing {
                    let task = load(tx, parse_id(&id)?)?;
                    if task.spec != spec {
                        return Err(StoreError::IdempotencyConflict {
                            key: key.clone(),
                            existing: task.id,
                        });
                    }
                    return Ok(Inserted {
                        task,
                        created: false,
                    });
                }
            }
            let id = uuid::Uuid::now_v7();
            let now = micros(Utc::now());
            let spec_json =
                serde_json::to_string(&spec).map_err(|e| StoreError::Backend(e.to_string()))?;
            tx.execute(
                "INSERT INTO tasks (id, status, priority, spec, max_attempts, idempotency_key, \
                 created_at, updated_at) VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?6)",
                params![
                    id.to_string(),
                    spec.priority,
                    spec_json,
                    spec.max_attempts(),
                    spec.idempotency_key,
                    now
                ],
            )
            .map_err(backend)?;
            insert_events(tx, &events, Some(id))?;
            Ok(Inserted {
                task: load(tx, id)?,
                created: true,
            })
        })
        .await
    }

    async fn get_task(&self, id: TaskId) -> StoreResult<Task> {
        self.run(move |c| load(c, id)).await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<Task>> {
        let filter = filter.clone();
        self.run(move |c| {
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM tasks \
                 WHERE (?1 IS NULL OR status = ?1) \
                   AND (?2 IS NULL OR (created_at, id) < \
                        (SELECT created_at, id FROM tasks WHERE id = ?2)) \
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let mut rows = stmt
                .query(params![
                    filter.status.map(|s| s.as_str()),
                    filter.before.map(|b| b.to_string()),
                    filter.limit
                ])
                .map_err(backend)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                out.push(task_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn queued_tasks(&self, limit: u32) -> StoreResult<Vec<(TaskId, i32)>> {
        self.run(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, priority FROM tasks WHERE status = 'queued' \
                     ORDER BY priority DESC, created_at, id LIMIT ?1",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![limit], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, p) = row.map_err(backend)?;
                out.push((parse_id(&id)?, p));
            }
            Ok(out)
        })
        .await
    }

    async fn claim(
        &self,
        id: TaskId,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Task> {
        let who = who.clone();
        let events = events.to_vec();
        self.write(move |tx| {
            let task = load(tx, id)?;
            claim_row(tx, task, &who, lease, &events)
        })
        .await
    }

    async fn claim_next(
        &self,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Option<Task>> {
        let who = who.clone();
        let events = events.to_vec();
        self.write(move |tx| {
            let next: Option<String> = tx
                .query_row(
                    "SELECT id FROM tasks WHERE status = 'queued' \
                     ORDER BY priority DESC, created_at, id LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            match next {
                None => Ok(None),
                Some(id) => {
                    let task = load(tx, parse_id(&id)?)?;
                    claim_row(tx, task, &who, lease, &events).map(Some)
                }
            }
        })
        .await
    }

    async fn renew_lease(
        &self,
        id: TaskId,
        token: i64,
        lease: Duration,
    ) -> StoreResult<DateTime<Utc>> {
        self.write(move |tx| {
            let task = load(tx, id)?;
            check_fence(&task, Fence::Token(token))?;
            let until = micros(Utc::now()) + lease_millis(lease) * 1000;
            tx.execute(
                "UPDATE tasks SET lease_expires_at = ?2 WHERE id = ?1",
                params![id.to_string(), until],
            )
            .map_err(backend)?;
            from_micros(until)
        })
        .await
    }

    async fn update_running(
        &self,
        id: TaskId,
        token: i64,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<()> {
        let patch = patch.clone();
        let events = events.to_vec();
        self.write(move |tx| {
            let task = load(tx, id)?;
            check_fence(&task, Fence::Token(token))?;
            tx.execute(
                "UPDATE tasks SET progress = COALESCE(?2, progress), updated_at = ?3 WHERE id = ?1",
                params![
                    id.to_string(),
                    patch.progress.map(i64::from),
                    micros(Utc::now())
                ],
            )
            .map_err(backend)?;
            insert_events(tx, &events, Some(id))
        })
        .await
    }

    async fn transition(
        &self,
        id: TaskId,
        fence: Fence,
        to: TaskStatus,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<Task> {
        let patch = patch.clone();
        let events = events.to_vec();
        self.write(move |tx| {
            let task = load(tx, id)?;
            check_fence(&task, fence)?;
            write_status(tx, &task, to, &patch, micros(Utc::now()))?;
            insert_events(tx, &events, Some(id))?;
            load(tx, id)
        })
        .await
    }

    async fn recover_task(
        &self,
        id: TaskId,
        fence: Fence,
        origin: &Origin,
        reason: &str,
        events: &[Event],
    ) -> StoreResult<Recovered> {
        let origin = origin.clone();
        let reason = reason.to_string();
        let events = events.to_vec();
        self.write(move |tx| {
            let task = load(tx, id)?;
            check_fence(&task, fence)?;
            recover_row(tx, task, &origin, &reason, &events)
        })
        .await
    }

    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
        origin: &Origin,
    ) -> StoreResult<Vec<Recovered>> {
        let origin = origin.clone();
        self.write(move |tx| {
            let ids: Vec<String> = {
                let mut stmt = tx
                    .prepare_cached(
                        "SELECT id FROM tasks WHERE status = 'running' AND lease_expires_at < ?1",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![micros(now)], |r| r.get(0))
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let task = load(tx, parse_id(&id)?)?;
                out.push(recover_row(tx, task, &origin, "lease expired", &[])?);
            }
            Ok(out)
        })
        .await
    }

    async fn tasks_of_worker(&self, worker_id: &str) -> StoreResult<Vec<Task>> {
        let worker_id = worker_id.to_string();
        self.run(move |c| {
            let sql = format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'running' AND worker_id = ?1"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(backend)?;
            let mut rows = stmt.query(params![worker_id]).map_err(backend)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(backend)? {
                out.push(task_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    async fn append_events(&self, events: &[Event]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let events = events.to_vec();
        self.write(move |tx| insert_events(tx, &events, None)).await
    }

    async fn events(&self, filter: &EventFilter) -> StoreResult<Vec<StoredEvent>> {
        let filter = filter.clone();
        self.run(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, id, type, task_id, source, node, time, data FROM events \
                     WHERE (?1 IS NULL OR task_id = ?1) AND (?2 IS NULL OR type = ?2) \
                       AND seq > ?3 ORDER BY seq LIMIT ?4",
                )
                .map_err(backend)?;
            let mut rows = stmt
                .query(params![
                    filter.task_id.map(|t| t.to_string()),
                    filter.event_type,
                    filter.after_seq.unwrap_or(0),
                    filter.limit
                ])
                .map_err(backend)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(backend)? {
                let get_err = |e: rusqlite::Error| StoreError::Corrupt(e.to_string());
                let id: String = r.get(1).map_err(get_err)?;
                let task: Option<String> = r.get(3).map_err(get_err)?;
                let data: String = r.get(7).map_err(get_err)?;
                out.push(StoredEvent {
                    seq: r.get(0).map_err(get_err)?,
                    id: parse_id(&id)?,
                    event_type: r.get(2).map_err(get_err)?,
                    task_id: task.as_deref().map(parse_id).transpose()?,
                    source: r.get(4).map_err(get_err)?,
                    node: r.get(5).map_err(get_err)?,
                    time: from_micros(r.get(6).map_err(get_err)?)?,
                    data: serde_json::from_str(&data)
                        .map_err(|e| StoreError::Corrupt(format!("event data: {e}")))?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn upsert_members(&self, members: &[Member]) -> StoreResult<()> {
        let members = members.to_vec();
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO members (id, role, node, state, last_seen, tags) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO UPDATE SET \
                     role = excluded.role, node = excluded.node, state = excluded.state, \
                     last_seen = MAX(members.last_seen, excluded.last_seen), tags = excluded.tags",
                )
                .map_err(backend)?;
            for m in &members {
                stmt.execute(params![
                    m.id,
                    m.role,
                    m.node,
                    m.state,
                    micros(m.last_seen),
                    m.tags.to_string()
                ])
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn members(&self) -> StoreResult<Vec<Member>> {
        self.run(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, role, node, state, last_seen, tags FROM members ORDER BY id",
                )
                .map_err(backend)?;
            let mut rows = stmt.query([]).map_err(backend)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(backend)? {
                let get_err = |e: rusqlite::Error| StoreError::Corrupt(e.to_string());
                let tags: String = r.get(5).map_err(get_err)?;
                out.push(Member {
                    id: r.get(0).map_err(get_err)?,
                    role: r.get(1).map_err(get_err)?,
                    node: r.get(2).map_err(get_err)?,
                    state: r.get(3).map_err(get_err)?,
                    last_seen: from_micros(r.get(4).map_err(get_err)?)?,
                    tags: serde_json::from_str(&tags)
                        .map_err(|e| StoreError::Corrupt(format!("member tags: {e}")))?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.run(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
            .await
    }

    async fn try_lead(&self, name: &str) -> StoreResult<Option<Box<dyn super::Leadership>>> {
        match self.path() {
            None => Ok(Some(Box::new(super::leader::Sole))),
            Some(p) => Ok(super::leader::FileLeader::try_take(p, name)?
                .map(|l| Box::new(l) as Box<dyn super::Leadership>)),
        }
    }
}
