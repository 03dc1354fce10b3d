//! The PostgreSQL store: tokio-postgres behind a deadpool pool. Claims lock rows with
//! `FOR UPDATE` (and `SKIP LOCKED` when picking the next task), lease times come from the
//! database clock so workers on machines with skewed clocks agree, and large event batches are
//! written with binary `COPY` (measured here at ~30x single inserts; see bench/store).

use super::{
    check_fence, lease_millis, recovery_event, recovery_target, Claimant, EventFilter, Fence,
    Inserted, Member, Patch, Recovered, RunningUpdate, Store, StoreError, StoreResult, TaskFilter,
};
use crate::events::{Event, Origin, StoredEvent};
use crate::spec::TaskSpec;
use crate::status::TaskStatus;
use crate::task::{Task, TaskId};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

const MIGRATIONS: &[(u32, &str)] = &[(1, include_str!("../../migrations/postgres/0001_init.sql"))];

/// Any fixed number works; it only has to be the same in every process that migrates.
const MIGRATION_LOCK: i64 = 0x7472_616e_7363;

/// Below this many events a transaction uses plain inserts; COPY's setup costs more.
const COPY_THRESHOLD: usize = 16;

const TASK_COLUMNS: &str = "id, status, priority, spec, attempts, max_attempts, worker_id, node, \
     lease_token, lease_expires_at, progress, error_code, error_message, idempotency_key, \
     created_at, updated_at";

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Kept for connections that must live outside the pool (the leader lock).
    config: tokio_postgres::Config,
}

pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // Class 08 is connection trouble, 57P0x is the server going away: both pass.
        if code.starts_with("08") || code.starts_with("57P0") || code == "40001" {
            return StoreError::Unavailable(db.to_string());
        }
        return StoreError::Backend(format!("{} ({code})", db.message()));
    }
    if e.is_closed() || std::error::Error::source(&e).is_some() {
        return StoreError::Unavailable(e.to_string());
    }
    StoreError::Backend(e.to_string())
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg(e),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn corrupt(e: tokio_postgres::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn to_u32(v: i32, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

fn task_from_row(row: &Row) -> StoreResult<Task> {
    let status: String = row.try_get(1).map_err(corrupt)?;
    let spec: serde_json::Value = row.try_get(3).map_err(corrupt)?;
    let progress: i16 = row.try_get(10).map_err(corrupt)?;
    Ok(Task {
        id: row.try_get(0).map_err(corrupt)?,
        status: status
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("{e}")))?,
        priority: row.try_get(2).map_err(corrupt)?,
        spec: serde_json::from_value::<TaskSpec>(spec)
            .map_err(|e| StoreError::Corrupt(format!("spec: {e}")))?,
        attempts: to_u32(row.try_get(4).map_err(corrupt)?, "attempts")?,
        max_attempts: to_u32(row.try_get(5).map_err(corrupt)?, "max_attempts")?,
        worker_id: row.try_get(6).map_err(corrupt)?,
        node: row.try_get(7).map_err(corrupt)?,
        lease_token: row.try_get(8).map_err(corrupt)?,
        lease_expires_at: row.try_get(9).map_err(corrupt)?,
        progress: u8::try_from(progress)
            .map_err(|_| StoreError::Corrupt(format!("progress {progress}")))?,
        error_code: row.try_get(11).map_err(corrupt)?,
        error_message: row.try_get(12).map_err(corrupt)?,
        idempotency_key: row.try_get(13).map_err(corrupt)?,
        created_at: row.try_get(14).map_err(corrupt)?,
        updated_at: row.try_get(15).map_err(corrupt)?,
    })
}

async fn load(tx: &Transaction<'_>, id: TaskId, lock: bool) -> StoreResult<Task> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let stmt = tx.prepare_cached(&sql).await.map_err(pg)?;
    match tx.query_opt(&stmt, &[&id]).await.map_err(pg)? {
        Some(row) => task_from_row(&row),
        None => Err(StoreError::NotFound(id)),
    }
}

async fn insert_events(
    tx: &Transaction<'_>,
    events: &[Event],
    subject: Option<TaskId>,
) -> StoreResult<()> {
    if events.len() >= COPY_THRESHOLD {
        return copy_events(tx, events, subject).await;
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (id, type, task_id, source, node, time, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(pg)?;
    for ev in events {
        let task = ev.subject.or(subject);
        tx.execute(
            &stmt,
            &[
                &ev.id,
                &ev.event_type().as_str(),
                &task,
                &ev.source,
                &ev.node,
                &ev.time,
                &ev.data_json(),
            ],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

async fn copy_events(
    tx: &Transaction<'_>,
    events: &[Event],
    subject: Option<TaskId>,
) -> StoreResult<()> {
    let sink = tx
        .copy_in("COPY events (id, type, task_id, source, node, time, data) FROM STDIN BINARY")
        .await
        .map_err(pg)?;
    let types = [
        Type::UUID,
        Type::TEXT,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::JSONB,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    for ev in events {
        let task = ev.subject.or(subject);
        let kind = ev.event_type().as_str();
        let data = ev.data_json();
        let row: [&(dyn ToSql + Sync); 7] =
            [&ev.id, &kind, &task, &ev.source, &ev.node, &ev.time, &data];
        writer.as_mut().write(&row).await.map_err(pg)?;
    }
    writer.finish().await.map_err(pg)?;
    Ok(())
}

/// Moves a loaded (and locked) task to `to`, after the state machine allows it.
async fn write_status(
    tx: &Transaction<'_>,
    task: &Task,
    to: TaskStatus,
    patch: &Patch,
) -> StoreResult<()> {
    task.status.check_transition(to)?;
    let leaving_running = task.status == TaskStatus::Running;
    let progress = patch.progress.map(i16::from);
    let stmt = tx
        .prepare_cached(
            "UPDATE tasks SET status = $2, updated_at = now(), \
               progress = COALESCE($3, progress), \
               error_code = CASE WHEN $6 THEN NULL ELSE COALESCE($4, error_code) END, \
               error_message = CASE WHEN $6 THEN NULL ELSE COALESCE($5, error_message) END, \
               lease_expires_at = CASE WHEN $7 THEN NULL ELSE lease_expires_at END \
             WHERE id = $1",
        )
        .await
        .map_err(pg)?;
    tx.execute(
        &stmt,
        &[
            &task.id,
            &to.as_str(),
            &progress,
            &patch.error_code,
            &patch.error_message,
            &(to == TaskStatus::Queued),
            &leaving_running,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

async fn claim_row(
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
    let stmt = tx
        .prepare_cached(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, \
               lease_token = lease_token + 1, worker_id = $2, node = $3, \
               lease_expires_at = now() + $4::bigint * interval '1 millisecond', \
               updated_at = now(), error_code = NULL, error_message = NULL \
             WHERE id = $1",
        )
        .await
        .map_err(pg)?;
    tx.execute(
        &stmt,
        &[&task.id, &who.worker_id, &who.node, &lease_millis(lease)],
    )
    .await
    .map_err(pg)?;
    insert_events(tx, events, Some(task.id)).await?;
    load(tx, task.id, false).await
}

async fn recover_row(
    tx: &Transaction<'_>,
    task: Task,
    origin: &Origin,
    reason: &str,
    events: &[Event],
) -> StoreResult<Recovered> {
    let lost_worker = task.worker_id.clone();
    write_status(tx, &task, TaskStatus::Incomplete, &Patch::default()).await?;
    let incomplete = load(tx, task.id, false).await?;
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
    write_status(tx, &incomplete, to, &patch).await?;
    let event = recovery_event(origin, &incomplete, to, reason);
    let mut all = events.to_vec();
    all.push(event.clone());
    insert_events(tx, &all, Some(task.id)).await?;
    Ok(Recovered {
        task: load(tx, task.id, false).await?,
        lost_worker,
        event,
    })
}

impl PgStore {
    pub async fn connect(url: &str, pool_size: usize) -> StoreResult<Self> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url}: {e}")))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let store = PgStore { pool, config: cfg };
        // Fail at start-up, not on the first task, when the server is unreachable.
        store.ping().await?;
        Ok(store)
    }

    pub(crate) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }
}

/// Runs `$body` inside a transaction on a pooled connection and commits it.
macro_rules! in_tx {
    ($self:ident, |$tx:ident| $body:block) => {{
        let mut client = $self.client().await?;
        let $tx = client.transaction().await.map_err(pg)?;
        let out = $body;
        $tx.commit().await.map_err(pg)?;
        Ok(out)
    }};
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<u32> {
        in_tx!(self, |tx| {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(pg)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(pg)?;
            let row = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await
                .map_err(pg)?;
            let mut version = to_u32(row.try_get(0).map_err(corrupt)?, "schema version")?;
            for (v, sql) in MIGRATIONS {
                if *v > version {
                    tx.batch_execute(sql).await.map_err(pg)?;
                    let vi =
                        i32::try_from(*v).map_err(|_| StoreError::Corrupt("version".into()))?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)",
                        &[&vi],
                    )
                    .await
                    .map_err(pg)?;
                    version = *v;
                }
            }
            version
        })
    }

    async fn insert_task(&self, spec: &TaskSpec, events: &[Event]) -> StoreResult<Inserted> {
        let spec = spec.validate()?.spec;
        let spec_json =
            serde_json::to_value(&spec).map_err(|e| StoreError::Backend(e.to_string()))?;
        let id = uuid::Uuid::now_v7();
        let max_attempts = i32::try_from(spec.max_attempts()).unwrap_or(i32::MAX);
        in_tx!(self, |tx| {
            // ON CONFLICT keeps two racing inserts with one key from both creating a row.
            let inserted = tx
                .query_opt(
                    "INSERT INTO tasks (id, status, priority, spec, max_attempts, idempotency_key) \
                     VALUES ($1, 'queued', $2, $3, $4, $5) \
                     ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                    &[
                        &id,
                        &spec.priority,
                        &spec_json,
                        &max_attempts,
                        &spec.idempotency_key,
                    ],
                )
                .await
                .map_err(pg)?;
            if inserted.is_some() {
                insert_events(&tx, events, Some(id)).await?;
                Inserted {
                    task: load(&tx, id, false).await?,
                    created: true,
                }
            } else {
                let row = tx
                    .query_one(
                        "SELECT id FROM tasks WHERE idempotency_key = $1",
                        &[&spec.idempotency_key],
                    )
                    .await
                    .map_err(pg)?;
                let existing: TaskId = row.try_get(0).map_err(corrupt)?;
                let task = load(&tx, existing, false).await?;
                if task.spec != spec {
                    return Err(StoreError::IdempotencyConflict {
                        key: spec.idempotency_key.clone().unwrap_or_default(),
                        existing,
                    });
                }
                Inserted {
                    task,
                    created: false,
                }
            }
        })
    }

    async fn get_task(&self, id: TaskId) -> StoreResult<Task> {
        let client = self.client().await?;
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
        match client.query_opt(&sql, &[&id]).await.map_err(pg)? {
            Some(row) => task_from_row(&row),
            None => Err(StoreError::NotFound(id)),
        }
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> StoreResult<Vec<Task>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks \
             WHERE ($1::text IS NULL OR status = $1) \
               AND ($2::uuid IS NULL OR (created_at, id) < \
                    (SELECT created_at, id FROM tasks WHERE id = $2)) \
             ORDER BY created_at DESC, id DESC LIMIT $3"
        );
        let status = filter.status.map(|s| s.as_str());
        let rows = client
            .query(&sql, &[&status, &filter.before, &i64::from(filter.limit)])
            .await
            .map_err(pg)?;
        rows.iter().map(task_from_row).collect()
    }

    async fn queued_tasks(&self, limit: u32) -> StoreResult<Vec<(TaskId, i32)>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, priority FROM tasks WHERE status = 'queued' \
                 ORDER BY priority DESC, created_at, id LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(corrupt)?,
                    r.try_get(1).map_err(corrupt)?,
                ))
            })
            .collect()
    }

    async fn claim(
        &self,
        id: TaskId,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Task> {
        in_tx!(self, |tx| {
            let task = load(&tx, id, true).await?;
            claim_row(&tx, task, who, lease, events).await?
        })
    }

    async fn claim_next(
        &self,
        who: &Claimant,
        lease: Duration,
        events: &[Event],
    ) -> StoreResult<Option<Task>> {
        in_tx!(self, |tx| {
            let next = tx
                .query_opt(
                    "SELECT id FROM tasks WHERE status = 'queued' \
                     ORDER BY priority DESC, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                    &[],
                )
                .await
                .map_err(pg)?;
            match next {
                None => None,
                Some(row) => {
                    let id: TaskId = row.try_get(0).map_err(corrupt)?;
                    let task = load(&tx, id, false).await?;
                    Some(claim_row(&tx, task, who, lease, events).await?)
                }
            }
        })
    }

    async fn renew_lease(
        &self,
        id: TaskId,
        token: i64,
        lease: Duration,
    ) -> StoreResult<DateTime<Utc>> {
        let client = self.client().await?;
        // One statement, no transaction: the WHERE clause is the fence.
        let row = client
            .query_opt(
                "UPDATE tasks SET lease_expires_at = now() + $3::bigint * interval '1 millisecond' \
                 WHERE id = $1 AND lease_token = $2 AND status = 'running' \
                 RETURNING lease_expires_at",
                &[&id, &token, &lease_millis(lease)],
            )
            .await
            .map_err(pg)?;
        match row {
            Some(r) => r.try_get(0).map_err(corrupt),
            None => {
                let task = self.get_task(id).await?;
                check_fence(&task, Fence::Token(token))?;
                Err(StoreError::StaleToken {
                    id,
                    held: token,
                    current: task.lease_token,
                })
            }
        }
    }

    async fn update_running(
        &self,
        id: TaskId,
        token: i64,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<()> {
        let progress = patch.progress.map(i16::from);
        in_tx!(self, |tx| {
            // The fenced UPDATE locks the row, so events cannot slip in after a requeue.
            let n = tx
                .execute(
                    "UPDATE tasks SET progress = COALESCE($3, progress), updated_at = now() \
                     WHERE id = $1 AND lease_token = $2 AND status = 'running'",
                    &[&id, &token, &progress],
                )
                .await
                .map_err(pg)?;
            if n == 0 {
                let task = load(&tx, id, false).await?;
                check_fence(&task, Fence::Token(token))?;
            }
            insert_events(&tx, events, Some(id)).await?;
        })
    }

    async fn update_running_many(
        &self,
        items: &[RunningUpdate],
    ) -> StoreResult<Vec<StoreResult<()>>> {
        // Rows are locked in id order, so two batches touching the same tasks (this writer and
        // a scaler's recovery, say) queue behind each other instead of deadlocking.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].id);
        let mut results: Vec<StoreResult<()>> = items.iter().map(|_| Ok(())).collect();
        let committed: StoreResult<()> = in_tx!(self, |tx| {
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET progress = COALESCE($3, progress), updated_at = now() \
                     WHERE id = $1 AND lease_token = $2 AND status = 'running'",
                )
                .await
                .map_err(pg)?;
            let mut events = Vec::new();
            for &i in &order {
                let it = &items[i];
                let progress = it.patch.progress.map(i16::from);
                let n = tx
                    .execute(&stmt, &[&it.id, &it.token, &progress])
                    .await
                    .map_err(pg)?;
                if n == 0 {
                    // A definite answer for this step alone; the rest of the batch goes on.
                    let verdict = match load(&tx, it.id, false).await {
                        Ok(task) => check_fence(&task, Fence::Token(it.token)),
                        Err(e @ StoreError::NotFound(_)) => Err(e),
                        Err(e) => return Err(e),
                    };
                    if verdict.is_err() {
                        results[i] = verdict;
                        continue;
                    }
                }
                events.extend(it.events.iter().map(|e| {
                    let mut e = e.clone();
                    e.subject = e.subject.or(Some(it.id));
                    e
                }));
            }
            insert_events(&tx, &events, None).await?;
        });
        committed?;
        Ok(results)
    }

    async fn transition(
        &self,
        id: TaskId,
        fence: Fence,
        to: TaskStatus,
        patch: &Patch,
        events: &[Event],
    ) -> StoreResult<Task> {
        in_tx!(self, |tx| {
            let task = load(&tx, id, true).await?;
            check_fence(&task, fence)?;
            write_status(&tx, &task, to, patch).await?;
            insert_events(&tx, events, Some(id)).await?;
            load(&tx, id, false).await?
        })
    }

    async fn recover_task(
        &self,
        id: TaskId,
        fence: Fence,
        origin: &Origin,
        reason: &str,
        events: &[Event],
    ) -> StoreResult<Recovered> {
        in_tx!(self, |tx| {
            let task = load(&tx, id, true).await?;
            check_fence(&task, fence)?;
            recover_row(&tx, task, origin, reason, events).await?
        })
    }

    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
        origin: &Origin,
    ) -> StoreResult<Vec<Recovered>> {
        in_tx!(self, |tx| {
            let rows = tx
                .query(
                    "SELECT id FROM tasks WHERE status = 'running' AND lease_expires_at < $1 \
                     FOR UPDATE SKIP LOCKED",
                    &[&now],
                )
                .await
                .map_err(pg)?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let id: TaskId = row.try_get(0).map_err(corrupt)?;
                let task = load(&tx, id, false).await?;
                out.push(recover_row(&tx, task, origin, "lease expired", &[]).await?);
            }
            out
        })
    }

    async fn tasks_of_worker(&self, worker_id: &str) -> StoreResult<Vec<Task>> {
        let client = self.client().await?;
        let sql =
            format!("SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'running' AND worker_id = $1");
        let rows = client.query(&sql, &[&worker_id]).await.map_err(pg)?;
        rows.iter().map(task_from_row).collect()
    }

    async fn append_events(&self, events: &[Event]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        in_tx!(self, |tx| {
            insert_events(&tx, events, None).await?;
        })
    }

    async fn events(&self, filter: &EventFilter) -> StoreResult<Vec<StoredEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, id, type, task_id, source, node, time, data FROM events \
                 WHERE ($1::uuid IS NULL OR task_id = $1) AND ($2::text IS NULL OR type = $2) \
                   AND seq > $3 ORDER BY seq LIMIT $4",
                &[
                    &filter.task_id,
                    &filter.event_type,
                    &filter.after_seq.unwrap_or(0),
                    &i64::from(filter.limit),
                ],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    seq: r.try_get(0).map_err(corrupt)?,
                    id: r.try_get(1).map_err(corrupt)?,
                    event_type: r.try_get(2).map_err(corrupt)?,
                    task_id: r.try_get(3).map_err(corrupt)?,
                    source: r.try_get(4).map_err(corrupt)?,
                    node: r.try_get(5).map_err(corrupt)?,
                    time: r.try_get(6).map_err(corrupt)?,
                    data: r.try_get(7).map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn upsert_members(&self, members: &[Member]) -> StoreResult<()> {
        in_tx!(self, |tx| {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO members (id, role, node, state, last_seen, tags) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                     role = excluded.role, node = excluded.node, state = excluded.state, \
                     last_seen = GREATEST(members.last_seen, excluded.last_seen), \
                     tags = excluded.tags",
                )
                .await
                .map_err(pg)?;
            for m in members {
                tx.execute(
                    &stmt,
                    &[&m.id, &m.role, &m.node, &m.state, &m.last_seen, &m.tags],
                )
                .await
                .map_err(pg)?;
            }
        })
    }

    async fn members(&self) -> StoreResult<Vec<Member>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, role, node, state, last_seen, tags FROM members ORDER BY id",
                &[],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(Member {
                    id: r.try_get(0).map_err(corrupt)?,
                    role: r.try_get(1).map_err(corrupt)?,
                    node: r.try_get(2).map_err(corrupt)?,
                    state: r.try_get(3).map_err(corrupt)?,
                    last_seen: r.try_get(4).map_err(corrupt)?,
                    tags: r.try_get(5).map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn ping(&self) -> StoreResult<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map_err(pg)?;
        Ok(())
    }

    async fn try_lead(&self, name: &str) -> StoreResult<Option<Box<dyn super::Leadership>>> {
        Ok(super::leader::PgLeader::try_take(self.config(), name)
            .await?
            .map(|l| Box::new(l) as Box<dyn super::Leadership>))
    }
}
