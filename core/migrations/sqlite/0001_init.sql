-- Times are unix microseconds (INTEGER) so that comparisons and ordering are numeric.
CREATE TABLE tasks (
    id               TEXT PRIMARY KEY,
    status           TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','escalated','incomplete','cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    spec             TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    worker_id        TEXT,
    node             TEXT,
    lease_token      INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    progress         INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error_code       TEXT,
    error_message    TEXT,
    idempotency_key  TEXT UNIQUE,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_status_created ON tasks (status, created_at DESC);
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_running ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status = 'running';

CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    id      TEXT NOT NULL UNIQUE,
    type    TEXT NOT NULL,
    task_id TEXT,
    source  TEXT NOT NULL,
    node    TEXT NOT NULL,
    time    INTEGER NOT NULL,
    data    TEXT NOT NULL
);
CREATE INDEX events_task_time ON events (task_id, time);
CREATE INDEX events_type_time ON events (type, time);

CREATE TABLE members (
    id        TEXT PRIMARY KEY,
    role      TEXT NOT NULL,
    node      TEXT NOT NULL,
    state     TEXT NOT NULL,
    last_seen INTEGER NOT NULL,
    tags      TEXT NOT NULL
);
