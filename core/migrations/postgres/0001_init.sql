CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    status           text NOT NULL CHECK (status IN ('queued','running','succeeded','failed','escalated','incomplete','cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    spec             jsonb NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    worker_id        text,
    node             text,
    lease_token      bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    progress         smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error_code       text,
    error_message    text,
    idempotency_key  text UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_status_created ON tasks (status, created_at DESC);
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);
CREATE INDEX tasks_running ON tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX tasks_worker ON tasks (worker_id) WHERE status = 'running';

CREATE TABLE events (
    seq     bigserial PRIMARY KEY,
    id      uuid NOT NULL UNIQUE,
    type    text NOT NULL,
    task_id uuid,
    source  text NOT NULL,
    node    text NOT NULL,
    time    timestamptz NOT NULL,
    data    jsonb NOT NULL
);
CREATE INDEX events_task_time ON events (task_id, time);
CREATE INDEX events_type_time ON events (type, time);

CREATE TABLE members (
    id        text PRIMARY KEY,
    role      text NOT NULL,
    node      text NOT NULL,
    state     text NOT NULL,
    last_seen timestamptz NOT NULL,
    tags      jsonb NOT NULL
);
