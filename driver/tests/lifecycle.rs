//! End-to-end tests of the plugin binary, driven the way Nomad's client drives it. Cgroup
//! limits are really applied (v2 where the host delegates controllers, v1 otherwise); these
//! tests need root and fail, loudly, where no cgroup hierarchy is writable.

mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use harness::*;
use nomad_driver_transcode::proto::base as bpb;
use nomad_driver_transcode::proto::drivers::{self as pb, fingerprint_response::HealthState};
use nomad_driver_transcode::proto::grpc::health::v1 as hpb;
use nomad_driver_transcode::proto::hclspec::spec::Block;
use nomad_driver_transcode::proto::plugin as ctl;
use nomad_driver_transcode::status::is_recoverable;
use nomad_driver_transcode::tasks::DriverState;
use tonic::Code;

const LONG: Duration = Duration::from_secs(20);

struct Scenario {
    tmp: tempfile::TempDir,
    worker: std::path::PathBuf,
    parent: String,
    state: std::path::PathBuf,
}

impl Scenario {
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let worker = tmp.path().join("fake-worker");
        write_executable(&worker, FAKE_WORKER);
        let state = tmp.path().join("state");
        Scenario {
            parent: format!("transcode-test-{name}-{}", std::process::id()),
            worker,
            state,
            tmp,
        }
    }
    fn config(&self) -> Vec<u8> {
        plugin_config(&self.worker, &self.parent, &self.state)
    }
    fn out_dir(&self, name: &str) -> std::path::PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).expect("out dir");
        d
    }
    fn opts<'a>(&self, id: &'a str, mode: &'a str, out: &'a Path) -> TaskOpts<'a> {
        TaskOpts {
            id,
            mode,
            out,
            memory_mb: 256,
            cpu_quota: None,
            stdout_path: out.join("stdout.log"),
            stderr_path: out.join("stderr.log"),
        }
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        remove_cgroup_parent(&self.parent);
    }
}

fn driver_state(h: &pb::TaskHandle) -> DriverState {
    serde_json::from_slice(&h.driver_state).expect("driver_state is the driver's JSON")
}

fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// WaitTask in flight, then StopTask (SIGTERM, `timeout_secs` before the kill): what WaitTask
/// answers once the task is gone.
async fn stop_and_wait(p: &Plugin, id: &str, timeout_secs: i64) -> pb::WaitTaskResponse {
    let waiter = {
        let mut d = p.driver();
        let task_id = id.to_string();
        tokio::spawn(async move { d.wait_task(pb::WaitTaskRequest { task_id }).await })
    };
    p.driver()
        .stop_task(pb::StopTaskRequest {
            task_id: id.into(),
            timeout: Some(prost_types::Duration {
                seconds: timeout_secs,
                nanos: 0,
            }),
            signal: "SIGTERM".into(),
        })
        .await
        .expect("StopTask");
    tokio::time::timeout(LONG, waiter)
        .await
        .expect("WaitTask answered")
        .expect("join")
        .expect("WaitTask ok")
        .into_inner()
}

/// DestroyTask with `force`, which must succeed.
async fn force_destroy(p: &Plugin, id: &str) {
    p.driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id.into(),
            force: true,
        })
        .await
        .expect("DestroyTask");
}

async fn wait_task(p: &Plugin, id: &str) -> pb::WaitTaskResponse {
    tokio::time::timeout(
        LONG,
        p.driver()
            .wait_task(pb::WaitTaskRequest { task_id: id.into() }),
    )
    .await
    .expect("WaitTask answered")
    .expect("WaitTask ok")
    .into_inner()
}

#[test]
fn refuses_to_run_without_the_magic_cookie() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nomad-driver-transcode"))
        .env_remove(COOKIE_KEY)
        .output()
        .expect("run plugin");
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "no handshake without the cookie");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("this is a Nomad task driver plugin"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_in_nomad_order() {
    let sc = Scenario::new("life");
    let plugin = Plugin::launch(sc.tmp.path()).await;

    // go-plugin checks health of service "plugin" right after connecting.
    let h = plugin
        .health()
        .check(hpb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        h.status,
        hpb::health_check_response::ServingStatus::Serving as i32
    );

    // 1. PluginInfo, ConfigSchema, SetConfig.
    let info = plugin
        .base()
        .plugin_info(bpb::PluginInfoRequest {})
        .await
        .expect("PluginInfo")
        .into_inner();
    assert_eq!(info.r#type, bpb::PluginType::Driver as i32);
    assert_eq!(info.plugin_api_versions, vec!["v0.1.0".to_owned()]);
    assert_eq!(info.name, "transcode");
    assert_eq!(info.plugin_version.split('.').count(), 3, "semver");
    let schema = plugin
        .base()
        .config_schema(bpb::ConfigSchemaRequest {})
        .await
        .expect("ConfigSchema")
        .into_inner()
        .spec
        .and_then(|s| s.block);
    let Some(Block::Object(obj)) = schema else {
        panic!("plugin schema is an object spec: {schema:?}");
    };
    let mut keys: Vec<&str> = obj.attributes.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = PLUGIN_KEYS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected, "harness encodes exactly the schema's keys");

    // Nomad's validation launch: SetConfig without nomad_config; a bad value is refused.
    let bad = cty_object(PLUGIN_KEYS, &[("stats_interval", s("often"))]);
    let err = plugin
        .base()
        .set_config(bpb::SetConfigRequest {
            msgpack_config: bad,
            nomad_config: None,
            plugin_api_version: "v0.1.0".into(),
        })
        .await
        .expect_err("invalid config");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("stats_interval"),
        "{}",
        err.message()
    );
    plugin.configure(&sc.config()).await;

    // 2. Capabilities and the first fingerprint.
    let caps = plugin
        .driver()
        .capabilities(pb::CapabilitiesRequest {})
        .await
        .expect("Capabilities")
        .into_inner()
        .capabilities
        .expect("capabilities");
    assert!(caps.send_signals);
    assert!(!caps.exec);
    assert_eq!(
        caps.fs_isolation,
        pb::driver_capabilities::FsIsolation::None as i32
    );
    let fp = healthy_fingerprint(&plugin).await;
    assert_eq!(
        attr_str(&fp, "driver.transcode.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let gst = attr_str(&fp, "driver.transcode.gstreamer_version").expect("gstreamer version");
    assert!(gst.starts_with("1."), "{gst}");
    assert!(
        fp.attributes
            .keys()
            .any(|k| k.starts_with("driver.transcode.encoder.")),
        "at least one H.264/AAC encoder attribute: {:?}",
        fp.attributes.keys().collect::<Vec<_>>()
    );
    let tschema = plugin
        .driver()
        .task_config_schema(pb::TaskConfigSchemaRequest {})
        .await
        .expect("TaskConfigSchema")
        .into_inner();
    let Some(Block::Object(tobj)) = tschema.spec.and_then(|s| s.block) else {
        panic!("task schema is an object spec");
    };
    assert_eq!(tobj.attributes.len(), TASK_KEYS.len());

    let mut events = plugin
        .driver()
        .task_events(pb::TaskEventsRequest {})
        .await
        .expect("TaskEvents")
        .into_inner();

    // A config a user got wrong: plain error naming the field, not retryable.
    let out = sc.out_dir("bad");
    let mut bad_task = task_config(&sc.opts("alloc-1/bad/1", "drain", &out));
    bad_task.msgpack_driver_config = cty_object(
        TASK_KEYS,
        &[
            ("scaler_address", s("tcp://s:5571")),
            ("store_url", s("mysql://db")),
        ],
    );
    let err = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(bad_task),
        })
        .await
        .expect_err("bad task config");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("store_url"), "{}", err.message());
    assert!(!is_recoverable(&err));

    // 3. StartTask, with Nomad's log FIFOs read by a "logmon" thread each.
    let out = sc.out_dir("w1");
    let id = "alloc-1/worker/w1";
    let mut opts = sc.opts(id, "drain", &out);
    opts.stdout_path = out.join("stdout.fifo");
    opts.stderr_path = out.join("stderr.fifo");
    let mut readers = Vec::new();
    for f in [&opts.stdout_path, &opts.stderr_path] {
        nix::unistd::mkfifo(f, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let f = f.clone();
        readers.push(std::thread::spawn(move || {
            std::fs::read_to_string(&f).unwrap_or_default()
        }));
    }
    let task = task_config(&opts);
    let handle = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task.clone()),
        })
        .await
        .expect("StartTask")
        .into_inner()
        .handle
        .expect("handle");
    assert!(handle.version >= 1);
    assert_eq!(handle.config.as_ref(), Some(&task), "config echoed back");
    assert_eq!(handle.state, pb::TaskState::Running as i32);
    let st = driver_state(&handle);
    assert!(st.worker.pid > 0 && st.worker.start_time > 0);
    let cg = st.cgroup.clone().expect("cgroup in driver state");
    let cg_dirs = cg.dirs();
    assert!(cg_dirs.iter().all(|d| d.exists()));
    wait_until_async("worker ready", LONG, || out.join("ready").exists()).await;
    // The worker is inside its cgroup (every hierarchy it was placed in).
    let proc_cg = cgroup_of(st.worker.pid);
    for d in &cg_dirs {
        let tail = d.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(proc_cg.contains(tail), "{proc_cg} lacks {tail}");
    }
    let argv = std::fs::read_to_string(out.join("argv")).expect("argv");
    assert_eq!(argv, "--http\n127.0.0.1:0\n");
    let env = std::fs::read_to_string(out.join("env")).expect("env");
    for want in [
        "TRANSCODE_SCALER_DISPATCH=tcp://127.0.0.1:5571",
        "TRANSCODE_SCALER_EVENTS_SUB=tcp://127.0.0.1:5573",
        "TRANSCODE_STORE_URL=sqlite:///tmp/transcode.db",
        "TRANSCODE_OBJECTS_S3_ENDPOINT=http://127.0.0.1:8333",
        "TRANSCODE_OBJECTS_S3_REGION=eu-west-1",
        // The typed `slots` wins over the task env's TRANSCODE_WORKER_SLOTS=99.
        "TRANSCODE_WORKER_SLOTS=2",
        // node_label wins over Nomad's node name ("client-1").
        "TRANSCODE_WORKER_NODE=node-a",
        "TRANSCODE_WORKER_ID=alloc-1-worker",
        "TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS=10",
        "FAKE_MODE=drain",
    ] {
        assert!(
            env.lines().any(|l| l == want),
            "worker env lacks {want}:\n{env}"
        );
    }
    assert!(
        !env.lines().any(|l| l == "TRANSCODE_WORKER_SLOTS=99"),
        "the task env's value must lose to the typed config:\n{env}"
    );
    assert!(
        !env.contains(COOKIE),
        "the plugin's magic cookie leaked to the worker"
    );

    // 4. TaskStats: figures are measured and non-zero.
    let mut stats = plugin
        .driver()
        .task_stats(pb::TaskStatsRequest {
            task_id: id.into(),
            collection_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
        })
        .await
        .expect("TaskStats")
        .into_inner();
    let sample = stats
        .next()
        .await
        .expect("a stats sample")
        .expect("stats ok")
        .stats
        .expect("stats");
    assert_eq!(sample.id, id);
    let usage = sample.agg_resource_usage.expect("usage");
    let mem = usage.memory.expect("memory");
    assert!(mem.usage > 0, "memory usage measured: {mem:?}");
    assert!(mem
        .measured_fields
        .contains(&(pb::memory_usage::Fields::Usage as i32)));
    let cpu = usage.cpu.expect("cpu");
    assert!(cpu
        .measured_fields
        .contains(&(pb::cpu_usage::Fields::Percent as i32)));
    drop(stats);

    let insp = plugin
        .driver()
        .inspect_task(pb::InspectTaskRequest { task_id: id.into() })
        .await
        .expect("InspectTask")
        .into_inner();
    let ts = insp.task.expect("status");
    assert_eq!(ts.state, pb::TaskState::Running as i32);
    assert_eq!(
        insp.driver.expect("driver").attributes.get("pid"),
        Some(&st.worker.pid.to_string())
    );

    // 5. SignalTask, then StopTask: SIGTERM makes the worker drain and exit 0.
    plugin
        .driver()
        .signal_task(pb::SignalTaskRequest {
            task_id: id.into(),
            signal: "SIGUSR1".into(),
        })
        .await
        .expect("SignalTask");
    wait_until_async("worker saw SIGUSR1", LONG, || out.join("usr1").exists()).await;
    let err = plugin
        .driver()
        .signal_task(pb::SignalTaskRequest {
            task_id: id.into(),
            signal: "SIGNOPE".into(),
        })
        .await
        .expect_err("unknown signal");
    assert_eq!(err.code(), Code::InvalidArgument);
    plugin
        .driver()
        .stop_task(pb::StopTaskRequest {
            task_id: id.into(),
            timeout: Some(prost_types::Duration {
                seconds: 15,
                nanos: 0,
            }),
            signal: String::new(),
        })
        .await
        .expect("StopTask");
    assert!(out.join("drained").exists(), "worker drained on SIGTERM");
    for _ in 0..2 {
        // Repeatable, and after exit.
        let w = wait_task(&plugin, id).await;
        let r = w.result.expect("result");
        assert_eq!(
            (r.exit_code, r.signal, r.oom_killed),
            (0, 0, false),
            "{}",
            w.err
        );
    }
    let logs: Vec<String> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    assert!(
        logs[0].contains("worker started mode=drain"),
        "stdout: {:?}",
        logs[0]
    );
    assert!(logs[0].contains("draining"), "stdout: {:?}", logs[0]);
    assert!(
        logs[1].contains("worker stderr line"),
        "stderr: {:?}",
        logs[1]
    );
    let insp = plugin
        .driver()
        .inspect_task(pb::InspectTaskRequest { task_id: id.into() })
        .await
        .expect("InspectTask")
        .into_inner()
        .task
        .expect("status");
    assert_eq!(insp.state, pb::TaskState::Exited as i32);
    assert!(insp.completed_at.is_some());

    // 6. DestroyTask removes the cgroup and the task's state.
    plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id.into(),
            force: false,
        })
        .await
        .expect("DestroyTask");
    assert!(cg_dirs.iter().all(|d| !d.exists()), "cgroup removed");
    assert!(!st.state_dir.exists(), "state dir removed");
    let err = plugin
        .driver()
        .wait_task(pb::WaitTaskRequest { task_id: id.into() })
        .await
        .expect_err("destroyed task is unknown");
    assert_eq!(err.code(), Code::NotFound);

    // A running task is only destroyed with force, which kills it and removes its cgroup.
    let out2 = sc.out_dir("w2");
    let id2 = "alloc-1/worker/w2";
    let h2 = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task_config(&sc.opts(id2, "drain", &out2))),
        })
        .await
        .expect("StartTask 2")
        .into_inner()
        .handle
        .expect("handle");
    let err = plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id2.into(),
            force: false,
        })
        .await
        .expect_err("running task without force");
    assert_eq!(err.code(), Code::FailedPrecondition);
    plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id2.into(),
            force: true,
        })
        .await
        .expect("DestroyTask force");
    let st2 = driver_state(&h2);
    assert!(!st2.worker.is_running(), "force destroy killed the worker");
    assert!(st2
        .cgroup
        .expect("cgroup")
        .dirs()
        .iter()
        .all(|d| !d.exists()));

    // Everything else is UNIMPLEMENTED.
    let d = plugin.driver();
    let codes = [
        d.clone()
            .init(pb::InitRequest {})
            .await
            .err()
            .map(|e| e.code()),
        d.clone()
            .exec_task(pb::ExecTaskRequest::default())
            .await
            .err()
            .map(|e| e.code()),
        d.clone()
            .exec_task_streaming(futures::stream::iter(vec![
                pb::ExecTaskStreamingRequest::default(),
            ]))
            .await
            .err()
            .map(|e| e.code()),
        d.clone()
            .create_network(pb::CreateNetworkRequest::default())
            .await
            .err()
            .map(|e| e.code()),
        d.clone()
            .destroy_network(pb::DestroyNetworkRequest::default())
            .await
            .err()
            .map(|e| e.code()),
        d.clone()
            .shutdown(pb::ShutdownRequest {})
            .await
            .err()
            .map(|e| e.code()),
    ];
    assert!(
        codes.iter().all(|c| *c == Some(Code::Unimplemented)),
        "{codes:?}"
    );

    // No OOM event was emitted for these tasks.
    let pending = tokio::time::timeout(Duration::from_millis(100), events.next()).await;
    if let Ok(Some(Ok(ev))) = pending {
        assert!(!ev.message.contains("OOM"), "unexpected event {ev:?}");
    }

    // The controller's Shutdown stops the plugin process.
    let mut plugin = plugin;
    plugin
        .controller()
        .shutdown(ctl::Empty {})
        .await
        .expect("controller Shutdown");
    let mut status = None;
    wait_until_async("plugin exits after Shutdown", LONG, || {
        status = plugin.child.try_wait().ok().flatten();
        status.is_some()
    })
    .await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        plugin.stderr()
    );
    let log = plugin.stderr();
    let first = log.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(first).expect("stderr is hclog JSON");
    assert!(
        v.get("@level").is_some() && v.get("@message").is_some() && v.get("@timestamp").is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_limits_throttle_cpu_and_oom_kill_memory() {
    let sc = Scenario::new("limits");
    let plugin = Plugin::launch(sc.tmp.path()).await;
    plugin.configure(&sc.config()).await;
    healthy_fingerprint(&plugin).await;
    let mut events = plugin
        .driver()
        .task_events(pb::TaskEventsRequest {})
        .await
        .expect("TaskEvents")
        .into_inner();

    // CPU hog with a hard limit of 20% of one core.
    let out = sc.out_dir("cpu");
    let id = "alloc-2/worker/cpu";
    let mut o = sc.opts(id, "cpu", &out);
    o.cpu_quota = Some((20_000, 100_000));
    let h = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task_config(&o)),
        })
        .await
        .expect("StartTask cpu")
        .into_inner()
        .handle
        .expect("handle");
    let cg = driver_state(&h).cgroup.expect("cgroup");
    match &cg {
        nomad_driver_transcode::cgroup::Cgroup::V2 { path } => {
            let max = std::fs::read_to_string(path.join("cpu.max")).expect("cpu.max");
            assert_eq!(max.trim(), "20000 100000");
        }
        nomad_driver_transcode::cgroup::Cgroup::V1 { cpu, .. } => {
            let q = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("quota");
            let p = std::fs::read_to_string(cpu.join("cpu.cfs_period_us")).expect("period");
            assert_eq!((q.trim(), p.trim()), ("20000", "100000"));
        }
    }
    let mut stats = plugin
        .driver()
        .task_stats(pb::TaskStatsRequest {
            task_id: id.into(),
            collection_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await
        .expect("TaskStats")
        .into_inner();
    let mut throttled = None;
    for _ in 0..60 {
        let s = stats
            .next()
            .await
            .expect("sample")
            .expect("ok")
            .stats
            .expect("stats");
        let cpu = s.agg_resource_usage.expect("usage").cpu.expect("cpu");
        if cpu.throttled_periods > 0 && cpu.percent > 0.0 && cpu.user_mode > 0.0 {
            throttled = Some(cpu);
            break;
        }
    }
    let cpu = throttled.expect("the CPU hog was throttled by the kernel, with non-zero usage");
    for f in [
        pb::cpu_usage::Fields::Percent,
        pb::cpu_usage::Fields::UserMode,
        pb::cpu_usage::Fields::SystemMode,
        pb::cpu_usage::Fields::ThrottledPeriods,
        pb::cpu_usage::Fields::ThrottledTime,
    ] {
        assert!(cpu.measured_fields.contains(&(f as i32)), "{f:?} measured");
    }
    drop(stats);
    // The hog ignores nothing: SIGTERM ends it, and WaitTask says so.
    plugin
        .driver()
        .stop_task(pb::StopTaskRequest {
            task_id: id.into(),
            timeout: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            signal: "SIGTERM".into(),
        })
        .await
        .expect("StopTask cpu");
    let r = wait_task(&plugin, id).await.result.expect("result");
    assert_eq!((r.signal, r.exit_code, r.oom_killed), (15, 143, false));
    plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id.into(),
            force: true,
        })
        .await
        .expect("destroy cpu");

    // Memory hog with a 32 MiB limit: the kernel OOM-kills it at the limit.
    let out = sc.out_dir("mem");
    let id = "alloc-2/worker/mem";
    let mut o = sc.opts(id, "mem", &out);
    o.memory_mb = 32;
    let h = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task_config(&o)),
        })
        .await
        .expect("StartTask mem")
        .into_inner()
        .handle
        .expect("handle");
    let cg = driver_state(&h).cgroup.expect("cgroup");
    let limit = match &cg {
        nomad_driver_transcode::cgroup::Cgroup::V2 { path } => {
            std::fs::read_to_string(path.join("memory.max")).expect("memory.max")
        }
        nomad_driver_transcode::cgroup::Cgroup::V1 { memory, .. } => {
            std::fs::read_to_string(memory.join("memory.limit_in_bytes")).expect("limit")
        }
    };
    assert_eq!(limit.trim(), (32u64 * 1024 * 1024).to_string());
    let w = wait_task(&plugin, id).await;
    let r = w.result.expect("result");
    assert!(r.oom_killed, "WaitTask reports oom_killed: {r:?} {}", w.err);
    assert_eq!(r.signal, 9);
    let ev = tokio::time::timeout(LONG, async {
        loop {
            match events.next().await {
                Some(Ok(ev)) if ev.task_id == id => return ev,
                Some(Ok(_)) => continue,
                other => panic!("event stream ended: {other:?}"),
            }
        }
    })
    .await
    .expect("an OOM event");
    assert!(ev.message.contains("OOM"), "{ev:?}");
    assert_eq!(
        ev.annotations.get("oom_killed").map(String::as_str),
        Some("true")
    );
    assert_eq!(ev.alloc_id, "alloc-1");
    plugin
        .driver()
        .destroy_task(pb::DestroyTaskRequest {
            task_id: id.into(),
            force: false,
        })
        .await
        .expect("destroy mem");
    assert!(cg.dirs().iter().all(|d| !d.exists()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_outlive_the_plugin_and_are_recovered() {
    let sc = Scenario::new("recover");
    let mut first = Plugin::launch(sc.tmp.path()).await;
    first.configure(&sc.config()).await;
    healthy_fingerprint(&first).await;

    let start = |p: &Plugin, id: &'static str, mode: &'static str, out: std::path::PathBuf| {
        let task = task_config(&sc.opts(id, mode, &out));
        let mut d = p.driver();
        async move {
            d.start_task(pb::StartTaskRequest { task: Some(task) })
                .await
                .expect("StartTask")
                .into_inner()
                .handle
                .expect("handle")
        }
    };
    let drain_out = sc.out_dir("drain");
    let late_out = sc.out_dir("late");
    let drain = start(&first, "alloc-3/worker/drain", "drain", drain_out.clone()).await;
    let late = start(
        &first,
        "alloc-3/worker/late",
        "exit-on-file",
        late_out.clone(),
    )
    .await;
    wait_until_async("drain worker ready", LONG, || {
        drain_out.join("ready").exists()
    })
    .await;

    // The plugin dies mid-task (kill -9); the tasks do not.
    first.kill9();
    let drain_state = driver_state(&drain);
    let late_state = driver_state(&late);
    assert!(
        drain_state.worker.is_running(),
        "worker survived the plugin"
    );
    assert!(late_state.worker.is_running(), "worker survived the plugin");
    // One task finishes while no plugin is running; its exit code must not be lost.
    std::fs::write(late_out.join("go"), b"").expect("trigger exit");
    wait_until_async("late worker exits", LONG, || {
        !late_state.worker.is_running()
    })
    .await;

    let second = Plugin::launch(sc.tmp.path()).await;
    second.configure(&sc.config()).await;
    for h in [&drain, &late] {
        second
            .driver()
            .recover_task(pb::RecoverTaskRequest {
                task_id: h.config.as_ref().expect("config").id.clone(),
                handle: Some(h.clone()),
            })
            .await
            .expect("RecoverTask");
    }
    let r = wait_task(&second, "alloc-3/worker/late").await;
    assert_eq!(r.result.expect("result").exit_code, 7, "{}", r.err);

    let insp = second
        .driver()
        .inspect_task(pb::InspectTaskRequest {
            task_id: "alloc-3/worker/drain".into(),
        })
        .await
        .expect("InspectTask")
        .into_inner()
        .task
        .expect("status");
    assert_eq!(insp.state, pb::TaskState::Running as i32);
    // Stats work on the recovered task too.
    let mut stats = second
        .driver()
        .task_stats(pb::TaskStatsRequest {
            task_id: "alloc-3/worker/drain".into(),
            collection_interval: None,
        })
        .await
        .expect("TaskStats")
        .into_inner();
    let s = stats.next().await.expect("sample").expect("ok");
    assert!(s.stats.is_some());
    drop(stats);

    // WaitTask on the recovered (non-child) task sees its real exit after a drain.
    let w = stop_and_wait(&second, "alloc-3/worker/drain", 15).await;
    let r = w.result.expect("result");
    assert_eq!((r.exit_code, r.signal), (0, 0), "{}", w.err);
    assert!(drain_out.join("drained").exists());

    // A handle whose pid now belongs to a different process (another start time) is refused.
    let mut forged_state = drain_state.clone();
    forged_state.worker = nomad_driver_transcode::procfs::ProcId {
        pid: std::process::id() as i32,
        start_time: 1,
    };
    forged_state.exit_file = sc.tmp.path().join("no-such-exit.json");
    let mut forged = drain.clone();
    forged.driver_state = serde_json::to_vec(&forged_state).expect("json");
    if let Some(c) = forged.config.as_mut() {
        c.id = "alloc-3/worker/forged".into();
    }
    let err = second
        .driver()
        .recover_task(pb::RecoverTaskRequest {
            task_id: "alloc-3/worker/forged".into(),
            handle: Some(forged),
        })
        .await
        .expect_err("reused pid refused");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("another process"),
        "{}",
        err.message()
    );

    for id in ["alloc-3/worker/drain", "alloc-3/worker/late"] {
        force_destroy(&second, id).await;
    }
}

/// A worker that ignores SIGTERM (a hung drain) is SIGKILLed once StopTask's timeout passes,
/// and WaitTask reports the kill rather than hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_task_kills_a_worker_that_ignores_sigterm_after_the_timeout() {
    let sc = Scenario::new("stubborn");
    let plugin = Plugin::launch(sc.tmp.path()).await;
    plugin.configure(&sc.config()).await;
    let out = sc.out_dir("stubborn");
    let id = "alloc-4/worker/stubborn";
    plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task_config(&sc.opts(id, "stubborn", &out))),
        })
        .await
        .expect("StartTask");
    wait_until_async("the worker to trap SIGTERM", LONG, || {
        out.join("ready").exists()
    })
    .await;
    let w = stop_and_wait(&plugin, id, 1).await;
    let r = w.result.expect("result");
    assert!(
        out.join("term-ignored").exists(),
        "SIGTERM was sent first and ignored"
    );
    assert_eq!(r.signal, 9, "killed with SIGKILL: {r:?} {}", w.err);
    force_destroy(&plugin, id).await;
}

/// A task with `user = "nobody"` runs as that user, not as the plugin's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_user_runs_the_worker_as_that_user() {
    use std::os::unix::fs::PermissionsExt;
    let sc = Scenario::new("user");
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd lookup")
        .expect("this test needs the standard `nobody` user");
    // The unprivileged worker must reach its script and write its output folder.
    std::fs::set_permissions(sc.tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tmp");
    let out = sc.out_dir("as-nobody");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).expect("chmod out");
    let plugin = Plugin::launch(sc.tmp.path()).await;
    plugin.configure(&sc.config()).await;
    let id = "alloc-5/worker/nobody";
    let mut t = task_config(&sc.opts(id, "drain", &out));
    t.user = "nobody".into();
    plugin
        .driver()
        .start_task(pb::StartTaskRequest { task: Some(t) })
        .await
        .expect("StartTask as nobody");
    wait_until_async("the worker to report its uid", LONG, || {
        out.join("ready").exists()
    })
    .await;
    let uid = std::fs::read_to_string(out.join("uid")).expect("uid file");
    assert_eq!(uid.trim(), nobody.uid.to_string(), "runs as nobody");
    let w = stop_and_wait(&plugin, id, 10).await;
    let r = w.result.expect("result");
    assert_eq!((r.exit_code, r.signal), (0, 0), "{}", w.err);
    force_destroy(&plugin, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_reported_clearly() {
    let sc = Scenario::new("misconf");
    let plugin = Plugin::launch(sc.tmp.path()).await;
    // A worker binary that is not executable: fingerprint says why, StartTask is retryable.
    let not_exec = sc.tmp.path().join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").expect("write");
    plugin
        .configure(&plugin_config(&not_exec, &sc.parent, &sc.state))
        .await;
    let fp = plugin
        .driver()
        .fingerprint(pb::FingerprintRequest {})
        .await
        .expect("Fingerprint")
        .into_inner()
        .next()
        .await
        .expect("fingerprint")
        .expect("ok");
    assert_ne!(fp.health, HealthState::Healthy as i32);
    assert!(
        fp.health_description.contains("not executable"),
        "{}",
        fp.health_description
    );
    let out = sc.out_dir("x");
    let err = plugin
        .driver()
        .start_task(pb::StartTaskRequest {
            task: Some(task_config(&sc.opts("alloc-4/worker/x", "drain", &out))),
        })
        .await
        .expect_err("worker binary unusable");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(is_recoverable(&err), "carries RecoverableError: {err:?}");
    // An unknown task user is a plain, actionable error.
    plugin.configure(&sc.config()).await;
    let mut t = task_config(&sc.opts("alloc-4/worker/y", "drain", &out));
    t.user = "no-such-user-xyz".into();
    let err = plugin
        .driver()
        .start_task(pb::StartTaskRequest { task: Some(t) })
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("no-such-user-xyz"),
        "{}",
        err.message()
    );
    let _: HashMap<String, String> = HashMap::new();
}
