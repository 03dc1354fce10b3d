//! One conformance suite, run against both stores: every case below runs once on SQLite (a
//! real file in WAL mode) and once on a throwaway PostgreSQL database. PostgreSQL comes from
//! `TRANSCODE_TEST_PG_URL`, which `scripts/task test` provides; with
//! `TRANSCODE_REQUIRE_SERVICES=1` (CI) a missing server fails the run instead of skipping.

use chrono::Utc;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use transcode_core::events::{EventBody, Origin, TaskReceived, TaskResolved};
use transcode_core::store::{
    self, Claimant, EventFilter, Fence, Member, Patch, RunningUpdate, Store, StoreError, TaskFilter,
};
use transcode_core::{TaskSpec, TaskStatus};

struct Fixture {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = store::open(&url, 1).await.expect("open sqlite");
    store.migrate().await.expect("migrate");
    Some(Fixture {
        store,
        _dir: Some(dir),
    })
}

async fn postgres() -> Option<Fixture> {
    let Ok(url) = std::env::var("TRANSCODE_TEST_PG_URL") else {
        if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") {
            panic!("TRANSCODE_TEST_PG_URL is not set but TRANSCODE_REQUIRE_SERVICES=1: run ./scripts/task test");
        }
        eprintln!("SKIPPED: no PostgreSQL (set TRANSCODE_TEST_PG_URL or run ./scripts/task test)");
        return None;
    };
    // A fresh database per case keeps cases independent while they run in parallel.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to test postgres");
    tokio::spawn(conn);
    let db = format!("conf_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    let (base, _) = url.rsplit_once('/').expect("url has a database");
    let store = store::open(&format!("{base}/{db}"), 10)
        .await
        .expect("open postgres");
    assert_eq!(store.migrate().await.expect("migrate"), 1);
    Some(Fixture { store, _dir: None })
}

fn spec(n: usize) -> TaskSpec {
    serde_json::from_value(serde_json::json!({
        "source": format!("s3://media/in/{n}.mp4"),
        "output": format!("s3://media/out/{n}/"),
        "preset": "sd",
    }))
    .expect("spec")
}

fn who(w: &str) -> Claimant {
    Claimant {
        worker_id: w.to_string(),
        node: "node-a".to_string(),
    }
}

fn origin() -> Origin {
    Origin::new("test", "node-a")
}

const LEASE: Duration = Duration::from_secs(30);

async fn migrate_is_idempotent(s: Arc<dyn Store>) {
    assert_eq!(s.migrate().await.expect("again"), 1);
    assert_eq!(s.migrate().await.expect("and again"), 1);
}

async fn insert_get_list_and_page(s: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for n in 0..5 {
        let ins = s.insert_task(&spec(n), &[]).await.expect("insert");
        assert!(ins.created);
        assert_eq!(ins.task.status, TaskStatus::Queued);
        assert_eq!(ins.task.lease_token, 0);
        assert_eq!(ins.task.attempts, 0);
        ids.push(ins.task.id);
    }
    let got = s.get_task(ids[2]).await.expect("get");
    assert_eq!(got.spec, spec(2));
    let all = s.list_tasks(&TaskFilter::default()).await.expect("list");
    let listed: Vec<_> = all.iter().map(|t| t.id).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    let page1 = s
        .list_tasks(&TaskFilter {
            limit: 2,
            ..TaskFilter::default()
        })
        .await
        .expect("page 1");
    let page2 = s
        .list_tasks(&TaskFilter {
            limit: 2,
            before: page1.last().map(|t| t.id),
            ..TaskFilter::default()
        })
        .await
        .expect("page 2");
    assert_eq!(
        page1.iter().chain(&page2).map(|t| t.id).collect::<Vec<_>>(),
        newest_first[..4]
    );
    s.claim(ids[0], &who("w"), LEASE, &[]).await.expect("claim");
    let running = s
        .list_tasks(&TaskFilter {
            status: Some(TaskStatus::Running),
            ..TaskFilter::default()
        })
        .await
        .expect("filter");
    assert_eq!(running.iter().map(|t| t.id).collect::<Vec<_>>(), [ids[0]]);
    assert!(matches!(
        s.get_task(uuid::Uuid::now_v7()).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn idempotent_insert(s: Arc<dyn Store>) {
    let mut a = spec(1);
    a.idempotency_key = Some("cat-v1".into());
    let first = s.insert_task(&a, &[]).await.expect("first");
    let second = s.insert_task(&a, &[]).await.expect("second");
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.task.id, second.task.id);
    let mut b = spec(2);
    b.idempotency_key = Some("cat-v1".into());
    match s.insert_task(&b, &[]).await {
        Err(StoreError::IdempotencyConflict { existing, .. }) => {
            assert_eq!(existing, first.task.id)
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Concurrent inserts with one key still make one row.
    let mut c = spec(3);
    c.idempotency_key = Some("race".into());
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (s, c) = (s.clone(), c.clone());
        handles.push(tokio::spawn(async move { s.insert_task(&c, &[]).await }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for h in handles {
        let ins = h.await.expect("join").expect("insert");
        created += usize::from(ins.created);
        ids.insert(ins.task.id);
    }
    assert_eq!((ids.len(), created), (1, 1));
    let total = s.list_tasks(&TaskFilter::default()).await.expect("list");
    assert_eq!(total.len(), 2);
}

async fn invalid_spec_writes_nothing(s: Arc<dyn Store>) {
    let mut bad = spec(1);
    bad.output = "s3://media/../x/".into();
    assert!(matches!(
        s.insert_task(&bad, &[]).await,
        Err(StoreError::InvalidSpec(_))
    ));
    assert!(s
        .list_tasks(&TaskFilter::default())
        .await
        .expect("list")
        .is_empty());
}

async fn claim_and_events_commit_together(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let ev = origin().event(
        None,
        EventBody::TaskReceived(TaskReceived {
            worker: "w1".into(),
            attempt: 1,
        }),
    );
    let t = s
        .claim(id, &who("w1"), LEASE, std::slice::from_ref(&ev))
        .await
        .expect("claim");
    assert_eq!(t.status, TaskStatus::Running);
    assert_eq!((t.lease_token, t.attempts), (1, 1));
    assert_eq!(t.worker_id.as_deref(), Some("w1"));
    assert!(t.lease_expires_at.expect("lease") > Utc::now() + chrono::Duration::seconds(20));
    let evs = s
        .events(&EventFilter {
            task_id: Some(id),
            limit: 10,
            ..EventFilter::default()
        })
        .await
        .expect("events");
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].id, ev.id);
    assert_eq!(evs[0].event_type, "TaskReceived");
    assert_eq!(evs[0].task_id, Some(id));
    assert_eq!(evs[0].data, ev.data_json());
    // A second delivery finds it running: refused, and no event is written.
    match s.claim(id, &who("w2"), LEASE, &[ev]).await {
        Err(StoreError::WrongStatus { status, .. }) => assert_eq!(status, TaskStatus::Running),
        other => panic!("expected WrongStatus, got {other:?}"),
    }
    let evs = s
        .events(&EventFilter {
            task_id: Some(id),
            limit: 10,
            ..EventFilter::default()
        })
        .await
        .expect("events");
    assert_eq!(evs.len(), 1, "a refused claim must not log its event");
    assert!(matches!(
        s.claim(uuid::Uuid::now_v7(), &who("w"), LEASE, &[]).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn eight_claimers_thousand_tasks(s: Arc<dyn Store>) {
    let mut all = HashSet::new();
    for n in 0..1000 {
        all.insert(s.insert_task(&spec(n), &[]).await.expect("insert").task.id);
    }
    let mut handles = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(t) = s
                .claim_next(&who(&format!("w{w}")), LEASE, &[])
                .await
                .expect("claim_next")
            {
                assert_eq!(t.lease_token, 1);
                mine.push(t.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for h in handles {
        claimed.extend(h.await.expect("join"));
    }
    let unique: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), 1000, "every task claimed exactly once");
    assert_eq!(unique, all);
    assert!(s.queued_tasks(10).await.expect("queued").is_empty());
}

async fn racing_claims_on_one_id(s: Arc<dyn Store>) {
    let ids: Vec<_> = {
        let mut v = Vec::new();
        for n in 0..100 {
            v.push(s.insert_task(&spec(n), &[]).await.expect("insert").task.id);
        }
        v
    };
    let ids = Arc::new(ids);
    let mut handles = Vec::new();
    for w in 0..8 {
        let (s, ids) = (s.clone(), ids.clone());
        handles.push(tokio::spawn(async move {
            let mut won = 0usize;
            for id in ids.iter() {
                match s.claim(*id, &who(&format!("w{w}")), LEASE, &[]).await {
                    Ok(_) => won += 1,
                    Err(StoreError::WrongStatus { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            won
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.expect("join");
    }
    assert_eq!(total, 100);
}

/// Steps of many tasks in one transaction: each is fenced alone (a zombie's step fails, and its
/// event is not logged, while the others commit), and the writer that groups concurrent steps
/// gives every caller its own answer.
async fn batched_steps_are_fenced_one_by_one(s: Arc<dyn Store>) {
    let step = |n: u32| {
        origin().event(
            None,
            EventBody::TaskReceived(TaskReceived {
                worker: "w1".into(),
                attempt: n,
            }),
        )
    };
    let mut held = Vec::new();
    for n in 0..4 {
        let id = s
            .insert_task(&spec(900 + n), &[])
            .await
            .expect("insert")
            .task
            .id;
        let t = s.claim(id, &who("w1"), LEASE, &[]).await.expect("claim");
        held.push((id, t.lease_token));
    }
    // Task 2 is requeued behind the worker's back: its token goes stale.
    s.recover_task(held[2].0, Fence::Admin, &origin(), "worker lost", &[])
        .await
        .expect("recover");
    let missing = uuid::Uuid::now_v7();
    let mut items: Vec<RunningUpdate> = held
        .iter()
        .enumerate()
        .map(|(i, (id, token))| RunningUpdate {
            id: *id,
            token: *token,
            patch: Patch {
                progress: Some(10 + i as u8),
                ..Patch::default()
            },
            events: vec![step(i as u32)],
        })
        .collect();
    items.push(RunningUpdate {
        id: missing,
        token: 1,
        patch: Patch::default(),
        events: vec![step(99)],
    });
    let results = s
        .update_running_many(&items)
        .await
        .expect("one transaction");
    assert_eq!(results.len(), 5);
    for (i, r) in results.iter().enumerate() {
        match i {
            2 => assert!(matches!(r, Err(StoreError::StaleToken { .. })), "{r:?}"),
            4 => assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}"),
            _ => assert!(r.is_ok(), "{i}: {r:?}"),
        }
    }
    for (i, (id, _)) in held.iter().enumerate() {
        let logged = s
            .events(&EventFilter {
                task_id: Some(*id),
                limit: 100,
                ..EventFilter::default()
            })
            .await
            .expect("events");
        let has_step = logged.iter().any(|e| e.id == items[i].events[0].id);
        assert_eq!(
            has_step,
            i != 2,
            "task {i}: step logged only when fenced in"
        );
        if i != 2 {
            assert_eq!(s.get_task(*id).await.expect("get").progress, 10 + i as u8);
        }
    }

    // Through the writer, concurrently: every step answered, the stale one refused.
    let writer = transcode_core::store::StepWriter::start(s.clone());
    let calls = held.iter().enumerate().map(|(i, (id, token))| {
        let w = writer.clone();
        let (id, token) = (*id, *token);
        async move {
            let ev = step(100 + i as u32);
            let r = w
                .update_running(
                    id,
                    token,
                    &Patch {
                        progress: Some(50),
                        ..Patch::default()
                    },
                    std::slice::from_ref(&ev),
                )
                .await;
            (i, r)
        }
    });
    for (i, r) in futures::future::join_all(calls).await {
        if i == 2 {
            assert!(matches!(r, Err(StoreError::StaleToken { .. })), "{r:?}");
        } else {
            r.expect("fenced in");
            assert_eq!(s.get_task(held[i].0).await.expect("get").progress, 50);
        }
    }
}

async fn stale_token_is_rejected(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let first = s.claim(id, &who("w1"), LEASE, &[]).await.expect("claim");
    let rec = s
        .recover_task(id, Fence::Admin, &origin(), "worker lost", &[])
        .await
        .expect("recover");
    assert_eq!(rec.task.status, TaskStatus::Queued);
    assert_eq!(rec.lost_worker.as_deref(), Some("w1"));
    let second = s.claim(id, &who("w2"), LEASE, &[]).await.expect("reclaim");
    assert_eq!(second.lease_token, first.lease_token + 1);
    assert_eq!(second.attempts, 2);
    // The zombie (w1) tries to finish and to renew: both refused, the row is untouched.
    match s
        .transition(
            id,
            Fence::Token(first.lease_token),
            TaskStatus::Succeeded,
            &Patch::default(),
            &[],
        )
        .await
    {
        Err(StoreError::StaleToken { held, current, .. }) => {
            assert_eq!((held, current), (first.lease_token, second.lease_token))
        }
        other => panic!("expected StaleToken, got {other:?}"),
    }
    assert!(matches!(
        s.renew_lease(id, first.lease_token, LEASE).await,
        Err(StoreError::StaleToken { .. })
    ));
    let zombie_event = origin().event(
        None,
        EventBody::TaskReceived(TaskReceived {
            worker: "w1".into(),
            attempt: 1,
        }),
    );
    assert!(matches!(
        s.update_running(
            id,
            first.lease_token,
            &Patch {
                progress: Some(50),
                ..Patch::default()
            },
            std::slice::from_ref(&zombie_event)
        )
        .await,
        Err(StoreError::StaleToken { .. })
    ));
    s.update_running(
        id,
        second.lease_token,
        &Patch {
            progress: Some(40),
            ..Patch::default()
        },
        &[],
    )
    .await
    .expect("the holder may record progress");
    let t = s.get_task(id).await.expect("get");
    assert_eq!(t.progress, 40);
    let logged = s
        .events(&EventFilter {
            task_id: Some(id),
            limit: 100,
            ..EventFilter::default()
        })
        .await
        .expect("events");
    assert!(
        logged.iter().all(|e| e.id != zombie_event.id),
        "a zombie's event must not be logged"
    );
    assert_eq!(
        s.get_task(id).await.expect("get").status,
        TaskStatus::Running
    );
    let renewed = s
        .renew_lease(id, second.lease_token, Duration::from_secs(120))
        .await
        .expect("renew");
    assert!(renewed > Utc::now() + chrono::Duration::seconds(100));
    let done = s
        .transition(
            id,
            Fence::Token(second.lease_token),
            TaskStatus::Succeeded,
            &Patch {
                progress: Some(100),
                ..Patch::default()
            },
            &[],
        )
        .await
        .expect("finish");
    assert_eq!((done.status, done.progress), (TaskStatus::Succeeded, 100));
    assert!(done.lease_expires_at.is_none());
    // Even the right token cannot move a finished task.
    assert!(matches!(
        s.transition(
            id,
            Fence::Token(second.lease_token),
            TaskStatus::Failed,
            &Patch::default(),
            &[]
        )
        .await,
        Err(StoreError::StaleToken { .. })
    ));
}

async fn expired_lease_is_requeued(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let mut once = spec(2);
    once.max_attempts = Some(1);
    let last = s.insert_task(&once, &[]).await.expect("insert").task.id;
    let keep = s.insert_task(&spec(3), &[]).await.expect("insert").task.id;
    s.claim(id, &who("w1"), Duration::from_millis(1), &[])
        .await
        .expect("claim");
    s.claim(last, &who("w1"), Duration::from_millis(1), &[])
        .await
        .expect("claim");
    s.claim(keep, &who("w2"), Duration::from_secs(600), &[])
        .await
        .expect("claim");
    let later = Utc::now() + chrono::Duration::seconds(5);
    let rec = s.recover_expired(later, &origin()).await.expect("sweep");
    let mut got: Vec<_> = rec.iter().map(|r| (r.task.id, r.task.status)).collect();
    got.sort();
    let mut want = vec![(id, TaskStatus::Queued), (last, TaskStatus::Failed)];
    want.sort();
    assert_eq!(got, want);
    let failed = s.get_task(last).await.expect("get");
    assert_eq!(failed.error_code.as_deref(), Some("attempts_exhausted"));
    assert_eq!(
        s.get_task(keep).await.expect("get").status,
        TaskStatus::Running
    );
    let requeued = s
        .events(&EventFilter {
            event_type: Some("TaskRequeued".into()),
            limit: 10,
            ..EventFilter::default()
        })
        .await
        .expect("events");
    assert_eq!(requeued.len(), 2);
    assert!(s
        .recover_expired(later, &origin())
        .await
        .expect("again")
        .is_empty());
    let queued = s.get_task(id).await.expect("get");
    assert!(queued.lease_expires_at.is_none());
    assert_eq!(s.tasks_of_worker("w2").await.expect("of worker").len(), 1);
}

async fn state_machine_is_enforced(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let resolved = origin().event(
        None,
        EventBody::TaskResolved(TaskResolved {
            by: "admin".into(),
            action: "retry".into(),
            reason: "x".into(),
        }),
    );
    match s
        .transition(
            id,
            Fence::Admin,
            TaskStatus::Succeeded,
            &Patch::default(),
            std::slice::from_ref(&resolved),
        )
        .await
    {
        Err(StoreError::Illegal(e)) => {
            assert_eq!((e.from, e.to), (TaskStatus::Queued, TaskStatus::Succeeded))
        }
        other => panic!("expected Illegal, got {other:?}"),
    }
    assert_eq!(
        s.get_task(id).await.expect("get").status,
        TaskStatus::Queued
    );
    assert!(s
        .events(&EventFilter {
            task_id: Some(id),
            limit: 10,
            ..EventFilter::default()
        })
        .await
        .expect("events")
        .is_empty());
    let t = s.claim(id, &who("w"), LEASE, &[]).await.expect("claim");
    let esc = s
        .transition(
            id,
            Fence::Token(t.lease_token),
            TaskStatus::Escalated,
            &Patch {
                error_code: Some("push_unavailable".into()),
                error_message: Some("503".into()),
                ..Patch::default()
            },
            &[],
        )
        .await
        .expect("escalate");
    assert_eq!(esc.error_code.as_deref(), Some("push_unavailable"));
    let back = s
        .transition(
            id,
            Fence::Admin,
            TaskStatus::Queued,
            &Patch::default(),
            &[resolved],
        )
        .await
        .expect("resolve retry");
    assert_eq!(back.status, TaskStatus::Queued);
    assert!(back.error_code.is_none(), "a requeued task starts clean");
    let c = s
        .transition(
            id,
            Fence::Admin,
            TaskStatus::Cancelled,
            &Patch::default(),
            &[],
        )
        .await
        .expect("cancel");
    assert_eq!(c.status, TaskStatus::Cancelled);
}

async fn events_batches_and_cursor(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let o = origin();
    let single = o.event(
        Some(id),
        EventBody::TaskReceived(TaskReceived {
            worker: "w".into(),
            attempt: 1,
        }),
    );
    s.append_events(std::slice::from_ref(&single))
        .await
        .expect("single");
    // 100 events: large enough for the PostgreSQL store to take its COPY path.
    let batch: Vec<_> = (0..100)
        .map(|i| {
            o.event(
                None,
                EventBody::HeartbeatReceived(transcode_core::events::HeartbeatReceived {
                    member: format!("m{i}"),
                    rtt_ms: Some(f64::from(i) / 10.0),
                }),
            )
        })
        .collect();
    s.append_events(&batch).await.expect("batch");
    let by_task = s
        .events(&EventFilter {
            task_id: Some(id),
            limit: 1000,
            ..EventFilter::default()
        })
        .await
        .expect("by task");
    assert_eq!(by_task.len(), 1);
    let hb = s
        .events(&EventFilter {
            event_type: Some("HeartbeatReceived".into()),
            limit: 1000,
            ..EventFilter::default()
        })
        .await
        .expect("by type");
    assert_eq!(hb.len(), 100);
    assert!(hb.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(hb[7].data, batch[7].data_json());
    assert_eq!(hb[7].id, batch[7].id);
    assert!(hb[7].task_id.is_none());
    let cursor = hb[49].seq;
    let rest = s
        .events(&EventFilter {
            after_seq: Some(cursor),
            limit: 1000,
            ..EventFilter::default()
        })
        .await
        .expect("since");
    assert_eq!(rest.len(), 50);
    assert_eq!(rest[0].id, batch[50].id);
    let ce = rest[0].to_cloudevent();
    let parsed: transcode_core::Event = serde_json::from_value(ce).expect("cloudevent");
    assert_eq!(parsed.id, batch[50].id);
}

async fn members_upsert(s: Arc<dyn Store>) {
    let now = Utc::now();
    let m = |id: &str, state: &str, t| Member {
        id: id.into(),
        role: "worker".into(),
        node: "node-a".into(),
        state: state.into(),
        last_seen: t,
        tags: serde_json::json!({"slots": "2"}),
    };
    s.upsert_members(&[m("a", "alive", now), m("b", "alive", now)])
        .await
        .expect("upsert");
    // A late, older heartbeat must not move last_seen backwards.
    s.upsert_members(&[m("a", "failed", now - chrono::Duration::seconds(60))])
        .await
        .expect("upsert again");
    let all = s.members().await.expect("members");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].state, "failed");
    assert_eq!(all[0].last_seen.timestamp_micros(), now.timestamp_micros());
    s.ping().await.expect("ping");
}

/// `Fence::Status`: an admin write that applies only to a task in one status (resolving an
/// escalated task). Against any other status it is `WrongStatus` and writes nothing, not even
/// its events, including against `running`, where `Fence::Admin` would have been allowed to
/// move the task.
async fn status_fence_only_moves_that_status(s: Arc<dyn Store>) {
    let id = s.insert_task(&spec(1), &[]).await.expect("insert").task.id;
    let resolved = |action: &str| {
        origin().event(
            Some(id),
            EventBody::TaskResolved(TaskResolved {
                by: "admin".into(),
                action: action.into(),
                reason: "x".into(),
            }),
        )
    };
    let count = |s: Arc<dyn Store>| async move {
        s.events(&EventFilter {
            task_id: Some(id),
            limit: 100,
            ..EventFilter::default()
        })
        .await
        .expect("events")
        .len()
    };
    let fence = Fence::Status(TaskStatus::Escalated);
    for to in [TaskStatus::Queued, TaskStatus::Failed] {
        match s
            .transition(id, fence, to, &Patch::default(), &[resolved("retry")])
            .await
        {
            Err(StoreError::WrongStatus {
                status, expected, ..
            }) => {
                assert_eq!(status, TaskStatus::Queued);
                assert_eq!(expected, "escalated");
            }
            other => panic!("expected WrongStatus, got {other:?}"),
        }
    }
    let t = s.claim(id, &who("w"), LEASE, &[]).await.expect("claim");
    match s
        .transition(
            id,
            fence,
            TaskStatus::Failed,
            &Patch::default(),
            &[resolved("fail")],
        )
        .await
    {
        Err(StoreError::WrongStatus { status, .. }) => assert_eq!(status, TaskStatus::Running),
        other => panic!("expected WrongStatus on a running task, got {other:?}"),
    }
    let running = s.get_task(id).await.expect("get");
    assert_eq!(running.status, TaskStatus::Running);
    assert_eq!(running.lease_token, t.lease_token);
    assert_eq!(count(s.clone()).await, 0, "refused writes log nothing");

    s.transition(
        id,
        Fence::Token(t.lease_token),
        TaskStatus::Escalated,
        &Patch::default(),
        &[],
    )
    .await
    .expect("escalate");
    let failed = s
        .transition(
            id,
            fence,
            TaskStatus::Failed,
            &Patch {
                error_code: Some("operator_failed".into()),
                error_message: Some("bad source".into()),
                ..Patch::default()
            },
            &[resolved("fail")],
        )
        .await
        .expect("resolve fail");
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.error_message.as_deref(), Some("bad source"));
    assert_eq!(count(s.clone()).await, 1);
    // Resolving twice is refused the same way.
    assert!(matches!(
        s.transition(
            id,
            fence,
            TaskStatus::Queued,
            &Patch::default(),
            &[resolved("retry")]
        )
        .await,
        Err(StoreError::WrongStatus { .. })
    ));
    assert_eq!(count(s).await, 1);
}

/// One leader at a time: a second taker is refused while the first holds the lock, and gets it
/// once the first lets go. Both takers here are separate sessions (PostgreSQL) or separate
/// open files (SQLite), as two scaler processes would be.
async fn one_leader_at_a_time(s: Arc<dyn Store>) {
    let mut first = s
        .try_lead("scaler")
        .await
        .expect("try")
        .expect("first leads");
    assert!(
        s.try_lead("scaler").await.expect("try").is_none(),
        "a second leader"
    );
    // Another name is another lock.
    assert!(s.try_lead("other").await.expect("try").is_some());
    first.confirm().await.expect("still leading");
    drop(first);
    // PostgreSQL frees the lock when the session ends, which the server sees a moment later.
    let mut second = None;
    for _ in 0..50 {
        second = s.try_lead("scaler").await.expect("try");
        if second.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut second = second.expect("the lock passes on when the leader lets go");
    second.confirm().await.expect("leading");
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(f) = sqlite().await {
                        super::$case(f.store.clone()).await;
                    }
                }
            )*
        }
        mod postgres_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(f) = postgres().await {
                        super::$case(f.store.clone()).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    migrate_is_idempotent,
    insert_get_list_and_page,
    idempotent_insert,
    invalid_spec_writes_nothing,
    claim_and_events_commit_together,
    eight_claimers_thousand_tasks,
    racing_claims_on_one_id,
    stale_token_is_rejected,
    batched_steps_are_fenced_one_by_one,
    expired_lease_is_requeued,
    state_machine_is_enforced,
    events_batches_and_cursor,
    members_upsert,
    status_fence_only_moves_that_status,
    one_leader_at_a_time,
);
