//! A worker cut off from the others (ARCHITECTURE §7, issue 5 scenario 4), with real
//! processes: the worker runs in a network namespace of its own, joined to this host by a veth
//! pair, and the test takes the host end of the link down while the worker transcodes. Its
//! process keeps running, but gossip must mark it failed (ContainerFailureDetected naming it)
//! and its task must be requeued and succeed on another worker.
//!
//! The worker in the namespace cannot reach the host's 127.0.0.1, so the scaler's dispatch
//! and bus endpoints and every other gossip member bind the host end's address (which stays
//! locally reachable on the host when the link is down). The store is SQLite and the objects
//! are `file://`, both on the filesystem the namespace shares: the cut-off worker can still
//! write to the store, which makes it a live zombie, fenced by its stale lease token. The cut
//! uses only addresses inside namespaces this test creates, and removes them when it ends.
//!
//! Needs root (`ip netns`). Without it the test is skipped, or fails when
//! `TRANSCODE_REQUIRE_SERVICES=1` (CI).

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use transcode_core::store::{self, EventFilter};
use transcode_core::{TaskSpec, TaskStatus};
use transcode_e2e::{bin, make_clip, start_worker, wait_for, Proc};

/// Long enough that the lease sweeper cannot be what recovers the task within the test's
/// bounds even if renewals stopped; the cut-off worker keeps renewing through the shared
/// store anyway, so only gossip can take the task from it.
const LEASE: &str = "30";

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A network namespace with a veth pair to the host, removed on drop (pass or fail).
struct Netns {
    ns: String,
    host_if: String,
    /// The host end's address, where the host-side processes bind.
    host_ip: String,
    /// The namespace end's address.
    ns_ip: String,
}

impl Netns {
    /// `Ok(None)` when network namespaces cannot be made here (not root, no `ip`).
    fn create() -> anyhow::Result<Option<Netns>> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("tcut-{}", &tag[..8]);
        let probe = Command::new("ip").args(["netns", "add", &ns]).output();
        match probe {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return skip(&format!(
                    "`ip netns add` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Err(e) => return skip(&format!("`ip` cannot run: {e}")),
        }
        // From here on the guard owns the namespace and cleans up whatever exists.
        let mut me = Netns {
            ns,
            host_if: format!("tch{}", &tag[..8]),
            host_ip: String::new(),
            ns_ip: String::new(),
        };
        let ns_if = format!("tcn{}", &tag[..8]);
        // A /30 in 10.213.0.0/16 that no interface here uses yet.
        let (a, b) = loop {
            let r = uuid::Uuid::new_v4().as_u128();
            let (a, b) = ((r % 256) as u8, ((r >> 8) % 64) as u8 * 4);
            let net = format!("10.213.{a}.{b}/30");
            let out = Command::new("ip")
                .args(["-o", "addr", "show", "to", &net])
                .output()?;
            if out.status.success() && out.stdout.is_empty() {
                break (a, b);
            }
        };
        me.host_ip = format!("10.213.{a}.{}", b + 1);
        me.ns_ip = format!("10.213.{a}.{}", b + 2);
        ip(&[
            "link",
            "add",
            &me.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &me.ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", me.host_ip),
            "dev",
            &me.host_if,
        ])?;
        ip(&["link", "set", &me.host_if, "up"])?;
        ip(&[
            "-n",
            &me.ns,
            "addr",
            "add",
            &format!("{}/30", me.ns_ip),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", &me.ns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &me.ns, "link", "set", "lo", "up"])?;
        Ok(Some(me))
    }

    /// Takes the host end down: nothing crosses the link any more, either way.
    fn cut(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting either end of a veth pair deletes both.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn skip(why: &str) -> anyhow::Result<Option<Netns>> {
    if std::env::var("TRANSCODE_REQUIRE_SERVICES").as_deref() == Ok("1") {
        anyhow::bail!("network namespaces are needed (run as root) but {why}");
    }
    eprintln!("SKIPPED: network namespaces unavailable (run as root): {why}");
    Ok(None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cut_off_from_the_network_is_detected_and_its_task_recovered() -> anyhow::Result<()>
{
    // Declared first so it is dropped last, after every process in or beside it is killed.
    let Some(net) = Netns::create()? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let url = format!("sqlite://{}", dir.join("t.db").display());
    let clip = dir.join("long.mp4");
    // Long enough (about 20 s of transcoding on an idle 2-core machine) that the cut-off
    // worker, which can still reach the shared store, is detected before it could finish.
    make_clip(&clip, 40, 1280, 720, true)?;
    let host = &net.host_ip;
    let scaler = Proc::start(
        "scaler",
        &bin("transcode-scaler"),
        &[
            "--store",
            &url,
            "--migrate",
            "--intake",
            "tcp://127.0.0.1:0",
            "--dispatch",
            &format!("tcp://{host}:0"),
            "--events-pub",
            "tcp://127.0.0.1:0",
            "--events-sub",
            &format!("tcp://{host}:0"),
            "--http",
            "127.0.0.1:0",
            "--id",
            "e2e-scaler",
            "--scan-interval-ms",
            "300",
            "--gossip-bind",
            &format!("{host}:0"),
        ]
        .map(String::from),
        &[],
        dir,
    )?;
    let join = scaler.endpoint("gossip");
    assert!(
        join.starts_with(host.as_str()),
        "gossip on the link: {join}"
    );

    // The worker to cut off starts alone, so the first task is surely its.
    let scratch = dir.join("scratch-cut");
    let cut_args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        net.ns.clone(),
        bin("transcode-worker").display().to_string(),
        "--store".into(),
        url.clone(),
        "--dispatch".into(),
        scaler.endpoint("dispatch"),
        "--events".into(),
        scaler.endpoint("events_sub"),
        "--id".into(),
        "cut".into(),
        "--scratch-dir".into(),
        scratch.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--lease-seconds".into(),
        LEASE.into(),
        "--gossip-bind".into(),
        format!("{}:0", net.ns_ip),
        "--gossip-join".into(),
        join.clone(),
    ];
    let mut cut = Proc::start("cut", Path::new("ip"), &cut_args, &[], dir)?;
    let db = store::open(&url, 1).await?;
    let alive = |ids: &'static [&'static str]| {
        let db = db.clone();
        move || {
            let db = db.clone();
            async move {
                let m = db.members().await.ok()?;
                ids.iter()
                    .all(|id| {
                        m.iter()
                            .any(|m| m.id == *id && m.role == "worker" && m.state == "alive")
                    })
                    .then_some(())
            }
        }
    };
    wait_for(
        Duration::from_secs(30),
        "the namespaced worker alive in gossip",
        alive(&["cut"]),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", cut.log_tail(), scaler.log_tail()))?;

    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "source": format!("file://{}", clip.display()),
        "output": format!("file://{}/out/", dir.display()),
        "preset": "hd",
    }))?;
    let id = db.insert_task(&spec, &[]).await?.task.id;
    wait_for(
        Duration::from_secs(60),
        "the namespaced worker to start transcoding",
        || {
            let db = db.clone();
            async move {
                let evs = transcode_e2e::task_events(&db, id).await;
                let t = db.get_task(id).await.ok()?;
                (evs.iter().any(|e| e.event_type == "VideoFilePulled")
                    && t.worker_id.as_deref() == Some("cut"))
                .then_some(())
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", cut.log_tail()))?;
    let pulled_at = std::time::Instant::now();

    // The others, on the host end of the link.
    let gossip_bind = format!("{host}:0");
    let others_args = [
        "--lease-seconds",
        LEASE,
        "--gossip-bind",
        &gossip_bind,
        "--gossip-join",
        &join,
    ];
    let mut others = Vec::new();
    for name in ["h1", "h2"] {
        others.push(start_worker(name, &url, &scaler, &[], dir, &others_args)?);
    }
    wait_for(
        Duration::from_secs(30),
        "every worker alive in gossip",
        alive(&["cut", "h1", "h2"]),
    )
    .await?;
    let before = db.get_task(id).await?;
    anyhow::ensure!(
        before.status == TaskStatus::Running && before.worker_id.as_deref() == Some("cut"),
        "the task finished before the cut could be made ({:?}); use a longer clip",
        before.status
    );

    net.cut()?;
    let cut_at = std::time::Instant::now();
    let into_task = cut_at - pulled_at;

    let detected = wait_for(
        Duration::from_secs(90),
        "gossip to detect the cut-off worker",
        || {
            let db = db.clone();
            async move {
                let evs = db
                    .events(&EventFilter {
                        limit: 100_000,
                        ..EventFilter::default()
                    })
                    .await
                    .ok()?;
                evs.into_iter()
                    .find(|e| e.event_type == "ContainerFailureDetected")
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
    let detection = cut_at.elapsed();
    assert_eq!(detected.data["member"], "cut", "{detected:?}");
    assert_eq!(
        detected.data["task_ids"],
        serde_json::json!([id]),
        "the detection names the task it recovers (an empty list means the cut-off worker \
         finished before gossip caught it: the clip is too short for this machine)"
    );
    assert!(
        cut.child.try_wait()?.is_none(),
        "cut off, not dead: the worker's process is still running\n{}",
        cut.log_tail()
    );

    let t = transcode_e2e::finished(
        &db,
        id,
        Duration::from_secs(240),
        "the task to succeed elsewhere",
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", scaler.log_tail()))?;
    assert_eq!(t.status, TaskStatus::Succeeded, "{:?}", t.error_message);
    assert_eq!(t.attempts, 2);
    let winner = t.worker_id.clone().unwrap_or_default();
    assert!(winner == "h1" || winner == "h2", "won by {winner}");

    let all = db
        .events(&EventFilter {
            limit: 100_000,
            ..EventFilter::default()
        })
        .await?;
    let detections: Vec<_> = all
        .iter()
        .filter(|e| e.event_type == "ContainerFailureDetected")
        .map(|e| e.data["member"].clone())
        .collect();
    assert_eq!(
        detections,
        vec![serde_json::json!("cut")],
        "only the cut-off worker was taken for failed"
    );
    let requeued = all
        .iter()
        .find(|e| e.event_type == "TaskRequeued" && e.task_id == Some(id))
        .ok_or_else(|| anyhow::anyhow!("no TaskRequeued"))?;
    assert_eq!(requeued.data["reason"], "worker failed (gossip)");
    assert!(requeued.seq >= detected.seq, "detection, then the requeue");
    let successes: Vec<_> = all
        .iter()
        .filter(|e| e.event_type == "TaskSucceeded" && e.task_id == Some(id))
        .collect();
    assert_eq!(successes.len(), 1, "exactly one success");
    assert_eq!(successes[0].source, winner);
    let late: Vec<&str> = all
        .iter()
        .filter(|e| e.task_id == Some(id) && e.seq > requeued.seq && e.source == "cut")
        .map(|e| e.event_type.as_str())
        .collect();
    assert!(
        late.is_empty(),
        "the cut-off worker's writes after the requeue were refused: {late:?}"
    );
    let manifest: transcode_core::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("out/manifest.json"))?)?;
    assert_eq!(manifest.worker, winner, "the winner's manifest");
    let members = db.members().await?;
    let row = members
        .iter()
        .find(|m| m.id == "cut")
        .ok_or_else(|| anyhow::anyhow!("no member row for the cut-off worker"))?;
    assert_eq!(row.state, "failed");
    for o in &mut others {
        assert!(
            o.child.try_wait()?.is_none(),
            "{} exited:\n{}",
            o.name,
            o.log_tail()
        );
    }
    eprintln!(
        "cut {:.1}s into the transcode; the worker was detected {:.1}s after the cut and \
         fenced; task {id} succeeded on {winner} (attempt {}), {:.1}s after the cut",
        into_task.as_secs_f64(),
        detection.as_secs_f64(),
        t.attempts,
        cut_at.elapsed().as_secs_f64()
    );
    Ok(())
}
