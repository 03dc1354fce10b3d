//! The `hashicorp.nomad.plugins.drivers.proto.Driver` service: task lifecycle (start, recover,
//! wait, stop, destroy, inspect, signal), stats and event streams, capabilities and
//! fingerprinting. Tasks run under a shim (see `shim`) in their own cgroup (see `cgroup`), so
//! they keep running when this plugin process dies and a fresh one can recover them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use nix::sys::signal::Signal;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status};

use crate::cgroup::{self, Cgroup, Limits, RawStats};
use crate::config::{self, PluginConfig, TaskSettings};
use crate::fingerprint;
use crate::procfs::{parse_signal, ProcError, ProcId};
use crate::proto::drivers::{self as pb, driver_server::Driver};
use crate::shim::{ShimReport, ShimSpec, TaskUser};
use crate::status::{recoverable, unimplemented};
use crate::tasks::{self, DriverState, Shared, TaskEntry, HANDLE_VERSION};

/// How long StartTask waits for the shim to report the worker's pid. Opening Nomad's log
/// FIFOs can block until logmon reads them, so this is generous.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often fingerprint conditions are re-checked; changes are sent at once.
const FINGERPRINT_CHECK: Duration = Duration::from_secs(5);
/// Unchanged fingerprints are re-sent this often, so Nomad never sees the driver as stale.
const FINGERPRINT_RESEND: Duration = Duration::from_secs(30);
/// Upper bound on waiting for a SIGKILLed task to be reported as exited.
const KILL_GRACE: Duration = Duration::from_secs(15);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct DriverService {
    shared: Arc<Shared>,
}

impl DriverService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    async fn config(&self) -> Result<PluginConfig, Status> {
        self.shared.config.read().await.clone().ok_or_else(|| {
            recoverable("the transcode driver has not been configured yet (SetConfig)")
        })
    }

    async fn entry(&self, id: &str) -> Result<Arc<TaskEntry>, Status> {
        self.shared.task(id).await.ok_or_else(|| {
            Status::not_found(format!("task {id:?} is not known to the transcode driver"))
        })
    }
}

fn mib(v: i64) -> Option<u64> {
    (v > 0).then(|| v as u64 * 1024 * 1024)
}

/// Nomad resources to cgroup limits: a CFS quota only when Nomad sets one (cpu_hard_limit),
/// shares always, and memory.max from memory_max_mb (oversubscription) or else memory_mb.
pub fn limits_from(resources: Option<&pb::Resources>) -> Limits {
    let mut l = Limits::default();
    let Some(r) = resources else {
        return l;
    };
    let linux = r.linux_resources.as_ref();
    let alloc = r.allocated_resources.as_ref();
    if let Some(lx) = linux {
        if lx.cpu_quota > 0 && lx.cpu_period > 0 {
            l.cpu_quota_period = Some((lx.cpu_quota as u64, lx.cpu_period as u64));
        }
        if lx.cpu_shares > 0 {
            l.cpu_shares = Some(lx.cpu_shares as u64);
        }
    }
    if l.cpu_shares.is_none() {
        l.cpu_shares = alloc
            .and_then(|a| a.cpu.as_ref())
            .and_then(|c| (c.cpu_shares > 0).then_some(c.cpu_shares as u64));
    }
    l.memory_max = alloc
        .and_then(|a| a.memory.as_ref())
        .and_then(|m| mib(m.memory_max_mb).or_else(|| mib(m.memory_mb)))
        .or_else(|| {
            linux.and_then(|lx| (lx.memory_limit_bytes > 0).then_some(lx.memory_limit_bytes as u64))
        });
    l
}

fn resolve_user(name: &str) -> Result<Option<TaskUser>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(Some(TaskUser {
            name: name.to_owned(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })),
        Ok(None) => Err(Status::invalid_argument(format!(
            "task user {name:?} does not exist on this node; create it or change the task's user"
        ))),
        Err(e) => Err(recoverable(format!("look up task user {name:?}: {e}"))),
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

fn ts(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn exit_result(r: &crate::shim::ExitRecord) -> pb::ExitResult {
    pb::ExitResult {
        exit_code: r.exit_code,
        signal: r.signal,
        oom_killed: r.oom_killed,
    }
}

fn handle_for(entry: &TaskEntry) -> Result<pb::TaskHandle, Status> {
    let driver_state = serde_json::to_vec(&entry.state)
        .map_err(|e| Status::internal(format!("encode driver state: {e}")))?;
    Ok(pb::TaskHandle {
        version: HANDLE_VERSION,
        config: Some(entry.config.clone()),
        state: if entry.outcome().is_some() {
            pb::TaskState::Exited
        } else {
            pb::TaskState::Running
        } as i32,
        driver_state,
    })
}

/// Spawns the shim and reads its one-line report: the shim's and the worker's identities.
async fn spawn_shim(
    shim_exe: &Path,
    spec_path: &Path,
    log_path: &Path,
) -> Result<(ProcId, ProcId), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("open shim log {}: {e}", log_path.display()))?;
    let mut child = tokio::process::Command::new(shim_exe)
        .arg("shim")
        .arg(spec_path)
        // The shim needs no environment; clearing it keeps the plugin's (including Nomad's
        // magic cookie) away from the worker.
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("start shim {}: {e}", shim_exe.display()))?;
    let shim_pid = child.id().map(|p| p as i32).unwrap_or_default();
    let shim_id = ProcId::of(shim_pid).map_err(|e| format!("identify shim: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("shim stdout was not captured".into());
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(SHIM_START_TIMEOUT, lines.next_line()).await;
    // Reap the shim whenever it exits so it never lingers as a zombie. On timeout it is killed
    // first: a worker that could not start in time must not appear later, untracked.
    if line.is_err() {
        let _ = child.start_kill();
    }
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let line = match line {
        Ok(Ok(Some(l))) => l,
        Ok(Ok(None)) => {
            return Err(format!(
                "shim exited without reporting; see {}",
                log_path.display()
            ))
        }
        Ok(Err(e)) => return Err(format!("read shim report: {e}")),
        Err(_) => {
            return Err(format!(
                "worker did not start within {SHIM_START_TIMEOUT:?} (are the task's log FIFOs being read?)"
            ))
        }
    };
    match serde_json::from_str(&line) {
        Ok(ShimReport::Started(worker)) => Ok((shim_id, worker)),
        Ok(ShimReport::Failed { error }) => Err(error),
        Err(e) => Err(format!("bad shim report {line:?}: {e}")),
    }
}

/// Kills everything in a task (cgroup, else the worker pid) and waits for its outcome.
async fn kill_and_wait(entry: &TaskEntry) -> Option<tasks::Outcome> {
    let deadline = Instant::now() + KILL_GRACE;
    loop {
        match &entry.state.cgroup {
            Some(cg) => cg.kill_all(),
            None => {
                let _ = entry.state.worker.signal(Signal::SIGKILL);
            }
        }
        if let Some(o) = entry.wait_exit(Duration::from_millis(500)).await {
            return Some(o);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// Computes one TaskStats sample from the current cgroup reading and, when there is one, the
/// previous reading and the wall time between them.
pub fn stats_sample(
    id: &str,
    now: SystemTime,
    cur: &RawStats,
    prev: Option<(&RawStats, Duration)>,
    since_start: Duration,
    cpu_mhz: Option<f64>,
) -> pb::TaskStats {
    use pb::cpu_usage::Fields as C;
    use pb::memory_usage::Fields as M;
    // Percentages are of one core, as Nomad's executor reports them: CPU time used in the
    // interval over the interval's wall time. Without a previous reading, the average since
    // start is used so that the first sample is meaningful too.
    let pct = |cur_v: Option<u64>, prev_v: Option<u64>| -> Option<f64> {
        let (delta, wall) = match (prev, prev_v) {
            (Some((_, wall)), Some(p)) => (cur_v?.saturating_sub(p), wall),
            _ => (cur_v?, since_start),
        };
        let wall_ns = wall.as_nanos() as f64;
        (wall_ns > 0.0).then(|| delta as f64 / wall_ns * 100.0)
    };
    let p = prev.map(|(p, _)| p);
    let mut cpu = pb::CpuUsage::default();
    let mut cf = Vec::new();
    if let Some(v) = pct(cur.cpu_user_ns, p.and_then(|p| p.cpu_user_ns)) {
        cpu.user_mode = v;
        cf.push(C::UserMode as i32);
    }
    if let Some(v) = pct(cur.cpu_system_ns, p.and_then(|p| p.cpu_system_ns)) {
        cpu.system_mode = v;
        cf.push(C::SystemMode as i32);
    }
    if let Some(v) = pct(cur.cpu_total_ns, p.and_then(|p| p.cpu_total_ns)) {
        cpu.percent = v;
        cf.push(C::Percent as i32);
        if let Some(mhz) = cpu_mhz {
            // Nomad's TotalTicks: the share of one core's MHz in use.
            cpu.total_ticks = v / 100.0 * mhz;
            cf.push(C::TotalTicks as i32);
        }
    }
    if let Some(v) = cur.throttled_periods {
        cpu.throttled_periods = v;
        cf.push(C::ThrottledPeriods as i32);
    }
    if let Some(v) = cur.throttled_ns {
        cpu.throttled_time = v;
        cf.push(C::ThrottledTime as i32);
    }
    cpu.measured_fields = cf;
    let mut mem = pb::MemoryUsage::default();
    let mut mf = Vec::new();
    let mut put = |v: Option<u64>, slot: &mut u64, f: M| {
        if let Some(v) = v {
            *slot = v;
            mf.push(f as i32);
        }
    };
    put(cur.mem_rss, &mut mem.rss, M::Rss);
    put(cur.mem_cache, &mut mem.cache, M::Cache);
    put(cur.mem_swap, &mut mem.swap, M::Swap);
    put(cur.mem_usage, &mut mem.usage, M::Usage);
    put(cur.mem_max_usage, &mut mem.max_usage, M::MaxUsage);
    put(cur.mem_kernel, &mut mem.kernel_usage, M::KernelUsage);
    put(
        cur.mem_kernel_max,
        &mut mem.kernel_max_usage,
        M::KernelMaxUsage,
    );
    mem.measured_fields = mf;
    pb::TaskStats {
        id: id.to_owned(),
        timestamp: Some(prost_types::Timestamp::from(now)),
        agg_resource_usage: Some(pb::TaskResourceUsage {
            cpu: Some(cpu),
            memory: Some(mem),
        }),
        resource_usage_by_pid: HashMap::new(),
    }
}

fn cpu_mhz() -> Option<f64> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "cpu MHz").then(|| v.trim().parse().ok())?
        })
}

fn signal_error(e: ProcError) -> Status {
    match e {
        ProcError::UnknownSignal(_) => Status::invalid_argument(e.to_string()),
        ProcError::Gone(_) | ProcError::Reused { .. } => {
            Status::failed_precondition(format!("task is no longer running: {e}"))
        }
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl Driver for DriverService {
    async fn init(
        &self,
        _: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitResponse>, Status> {
        Err(unimplemented("Init"))
    }

    async fn task_config_schema(
        &self,
        _: Request<pb::TaskConfigSchemaRequest>,
    ) -> Result<Response<pb::TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::TaskConfigSchemaResponse {
            spec: Some(config::task_schema()),
        }))
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(pb::CapabilitiesResponse {
            capabilities: Some(pb::DriverCapabilities {
                send_signals: true,
                exec: false,
                fs_isolation: pb::driver_capabilities::FsIsolation::None as i32,
                network_isolation_modes: vec![
                    pb::network_isolation_spec::NetworkIsolationMode::Host as i32,
                ],
                must_create_network: false,
                // Volume mounts need filesystem isolation, which this driver does not do.
                mount_configs: pb::driver_capabilities::MountConfigs::NoMounts as i32,
                disable_log_collection: false,
                dynamic_workload_users: false,
            }),
        }))
    }

    type FingerprintStream = ReceiverStream<Result<pb::FingerprintResponse, Status>>;

    async fn fingerprint(
        &self,
        _: Request<pb::FingerprintRequest>,
    ) -> Result<Response<Self::FingerprintStream>, Status> {
        let (tx, rx) = mpsc::channel(2);
        let shared = self.shared.clone();
        let mut shutdown = shared.shutdown.subscribe();
        tokio::spawn(async move {
            let mut last: Option<(fingerprint::Fingerprint, Instant)> = None;
            loop {
                let cfg = shared.config.read().await.clone();
                let fp = fingerprint::compute(cfg.as_ref(), &shared.layout).await;
                let due = match &last {
                    None => true,
                    Some((prev, at)) => *prev != fp || at.elapsed() >= FINGERPRINT_RESEND,
                };
                if due {
                    if last.as_ref().is_none_or(|(p, _)| p.health != fp.health) {
                        tracing::info!(health = ?fp.health, description = %fp.description, "fingerprint");
                    }
                    if tx.send(Ok(fp.to_proto())).await.is_err() {
                        return;
                    }
                    last = Some((fp, Instant::now()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(FINGERPRINT_CHECK) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn recover_task(
        &self,
        request: Request<pb::RecoverTaskRequest>,
    ) -> Result<Response<pb::RecoverTaskResponse>, Status> {
        let req = request.into_inner();
        let handle = req
            .handle
            .ok_or_else(|| Status::invalid_argument("RecoverTask without a task handle"))?;
        let config = handle
            .config
            .ok_or_else(|| Status::invalid_argument("task handle has no task config"))?;
        let id = if req.task_id.is_empty() {
            config.id.clone()
        } else {
            req.task_id.clone()
        };
        if self.shared.task(&id).await.is_some() {
            return Ok(Response::new(pb::RecoverTaskResponse {}));
        }
        if handle.version < 1 || handle.version > HANDLE_VERSION {
            return Err(Status::invalid_argument(format!(
                "task handle version {} is not one this driver wrote (expected {HANDLE_VERSION})",
                handle.version
            )));
        }
        let state: DriverState = serde_json::from_slice(&handle.driver_state).map_err(|e| {
            Status::invalid_argument(format!("task handle driver state is not valid: {e}"))
        })?;
        let default_cfg = self
            .shared
            .config
            .read()
            .await
            .as_ref()
            .and_then(|c| c.default_config_file.clone());
        let drain_timeout =
            TaskSettings::from_msgpack(&config.msgpack_driver_config, default_cfg.as_deref())
                .map(|s| s.drain_timeout)
                .unwrap_or(Duration::from_secs(30));
        // Decide from the recorded exit and the live process table; a pid whose start time
        // differs is someone else's process and is never adopted.
        if let (Err(e @ ProcError::Reused { .. }), Ok(None)) = (
            state.worker.check(),
            crate::shim::ExitRecord::load(&state.exit_file),
        ) {
            return Err(Status::not_found(format!(
                "cannot recover task {id}: {e}; the task's process is gone"
            )));
        }
        let outcome = match tasks::poll_once(&state) {
            Some(Ok(r)) => Some(Ok(r)),
            Some(Err(e)) => {
                return Err(Status::not_found(format!(
                    "cannot recover task {id}: {e} (pid {} start time {})",
                    state.worker.pid, state.worker.start_time
                )))
            }
            None => None,
        };
        let (exit_tx, _) = watch::channel(None);
        let entry = Arc::new(TaskEntry {
            config,
            state,
            drain_timeout,
            exit_tx,
        });
        let exited = outcome.is_some();
        if let Some(o) = outcome {
            entry.exit_tx.send_replace(Some(o));
        }
        self.shared
            .tasks
            .lock()
            .await
            .insert(id.clone(), entry.clone());
        if !exited {
            tasks::spawn_monitor(self.shared.clone(), &entry);
        }
        tracing::info!(task_id = %id, pid = entry.state.worker.pid, exited, "recovered task");
        Ok(Response::new(pb::RecoverTaskResponse {}))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let task = request
            .into_inner()
            .task
            .ok_or_else(|| Status::invalid_argument("StartTask without a task"))?;
        if task.id.is_empty() {
            return Err(Status::invalid_argument("task has no id"));
        }
        let cfg = self.config().await?;
        if self.shared.task(&task.id).await.is_some() {
            return Err(Status::already_exists(format!(
                "task {} is already running",
                task.id
            )));
        }
        let settings = TaskSettings::from_msgpack(
            &task.msgpack_driver_config,
            cfg.default_config_file.as_deref(),
        )
        .map_err(|e| Status::invalid_argument(format!("invalid transcode task config: {e}")))?;
        let binary = fingerprint::resolve_worker_binary(&cfg.worker_binary)
            .map_err(|e| recoverable(format!("{e} (plugin option worker_binary)")))?;
        let user = resolve_user(&task.user)?;
        let layout = self
            .shared
            .layout
            .as_ref()
            .map_err(|e| recoverable(format!("cannot place the task in a cgroup: {e}")))?;
        let name = cgroup::dir_name_for(&task.id);
        let limits = limits_from(task.resources.as_ref());
        let cg = layout
            .create(&cfg.cgroup_parent, &name, &limits)
            .map_err(|e| recoverable(format!("create task cgroup: {e}")))?;
        let state_dir = cfg.state_dir.join("tasks").join(&name);
        let launch = Launch {
            task: &task,
            settings: &settings,
            cfg: &cfg,
            binary,
            user,
            cg: cg.clone(),
            state_dir: state_dir.clone(),
        };
        match self.launch(launch).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                cg.kill_all();
                let _ = cg.remove();
                let _ = std::fs::remove_dir_all(&state_dir);
                Err(e)
            }
        }
    }

    async fn wait_task(
        &self,
        request: Request<pb::WaitTaskRequest>,
    ) -> Result<Response<pb::WaitTaskResponse>, Status> {
        let id = request.into_inner().task_id;
        let mut rx = self.entry(&id).await?.exit_tx.subscribe();
        let outcome = rx
            .wait_for(|o| o.is_some())
            .await
            .map_err(|_| Status::aborted(format!("task {id} was destroyed while waiting")))?
            .clone();
        let resp = match outcome {
            Some(Ok(r)) => pb::WaitTaskResponse {
                result: Some(exit_result(&r)),
                err: String::new(),
            },
            Some(Err(e)) => pb::WaitTaskResponse {
                result: Some(pb::ExitResult {
                    exit_code: -1,
                    signal: 0,
                    oom_killed: false,
                }),
                err: e,
            },
            None => return Err(Status::internal("wait ended without an outcome")),
        };
        Ok(Response::new(resp))
    }

    async fn stop_task(
        &self,
        request: Request<pb::StopTaskRequest>,
    ) -> Result<Response<pb::StopTaskResponse>, Status> {
        let req = request.into_inner();
        let entry = self.entry(&req.task_id).await?;
        if entry.outcome().is_some() {
            return Ok(Response::new(pb::StopTaskResponse {}));
        }
        let signal = if req.signal.is_empty() {
            Signal::SIGTERM
        } else {
            parse_signal(&req.signal).map_err(signal_error)?
        };
        let timeout = match req.timeout {
            Some(d) => Duration::try_from(d).unwrap_or(Duration::ZERO),
            None => entry.drain_timeout,
        };
        tracing::info!(task_id = %req.task_id, %signal, ?timeout, "stopping task");
        match entry.state.worker.signal(signal) {
            Ok(()) | Err(ProcError::Gone(_)) => {}
            Err(e) => return Err(signal_error(e)),
        }
        if entry.wait_exit(timeout).await.is_some() {
            return Ok(Response::new(pb::StopTaskResponse {}));
        }
        self.shared.emit(
            &entry.config,
            format!("Worker did not stop within {timeout:?} of {signal}; killing it"),
            HashMap::new(),
        );
        match kill_and_wait(&entry).await {
            Some(_) => Ok(Response::new(pb::StopTaskResponse {})),
            None => Err(Status::deadline_exceeded(format!(
                "task {} did not exit after SIGKILL",
                req.task_id
            ))),
        }
    }

    async fn destroy_task(
        &self,
        request: Request<pb::DestroyTaskRequest>,
    ) -> Result<Response<pb::DestroyTaskResponse>, Status> {
        let req = request.into_inner();
        let Some(entry) = self.shared.task(&req.task_id).await else {
            // Destroy is idempotent: Nomad may retry it after a timeout.
            return Ok(Response::new(pb::DestroyTaskResponse {}));
        };
        if entry.outcome().is_none() {
            if !req.force {
                return Err(Status::failed_precondition(format!(
                    "task {} is still running; stop it first or destroy with force",
                    req.task_id
                )));
            }
            if kill_and_wait(&entry).await.is_none() {
                return Err(Status::deadline_exceeded(format!(
                    "task {} did not exit after SIGKILL",
                    req.task_id
                )));
            }
        }
        if let Some(cg) = &entry.state.cgroup {
            // Leftover descendants (e.g. daemonized helpers) would keep the cgroup busy.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                cg.kill_all();
                match cg.remove() {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(Status::internal(format!("remove task cgroup: {e}")))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&entry.state.state_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(task_id = %req.task_id, error = %e, "could not remove task state dir");
            }
        }
        self.shared.tasks.lock().await.remove(&req.task_id);
        tracing::info!(task_id = %req.task_id, "destroyed task");
        Ok(Response::new(pb::DestroyTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        request: Request<pb::InspectTaskRequest>,
    ) -> Result<Response<pb::InspectTaskResponse>, Status> {
        let id = request.into_inner().task_id;
        let entry = self.entry(&id).await?;
        let outcome = entry.outcome();
        let (state, completed_at, result) = match &outcome {
            None => (pb::TaskState::Running, None, None),
            Some(Ok(r)) => (
                pb::TaskState::Exited,
                Some(ts(r.finished_at_ns)),
                Some(exit_result(r)),
            ),
            Some(Err(_)) => (pb::TaskState::Exited, None, None),
        };
        let mut attributes = HashMap::new();
        attributes.insert("pid".to_owned(), entry.state.worker.pid.to_string());
        attributes.insert("shim_pid".to_owned(), entry.state.shim.pid.to_string());
        if let Some(cg) = &entry.state.cgroup {
            attributes.insert("cgroup".to_owned(), cg.display());
            attributes.insert("cgroup_version".to_owned(), cg.version().to_owned());
        }
        if let Some(Err(e)) = &outcome {
            attributes.insert("error".to_owned(), e.clone());
        }
        Ok(Response::new(pb::InspectTaskResponse {
            task: Some(pb::TaskStatus {
                id: entry.config.id.clone(),
                name: entry.config.name.clone(),
                state: state as i32,
                started_at: Some(ts(entry.state.started_at_ns)),
                completed_at,
                result,
            }),
            driver: Some(pb::TaskDriverStatus { attributes }),
            network_override: None,
        }))
    }

    type TaskStatsStream = ReceiverStream<Result<pb::TaskStatsResponse, Status>>;

    async fn task_stats(
        &self,
        request: Request<pb::TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        let req = request.into_inner();
        let entry = self.entry(&req.task_id).await?;
        let Some(cg) = entry.state.cgroup.clone() else {
            return Err(Status::failed_precondition("task has no cgroup to measure"));
        };
        let cfg_interval = self
            .shared
            .config
            .read()
            .await
            .as_ref()
            .map(|c| c.stats_interval);
        let interval = req
            .collection_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .or(cfg_interval)
            .unwrap_or(Duration::from_secs(1));
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        let id = req.task_id.clone();
        let started = entry.started_at();
        drop(entry);
        let mhz = cpu_mhz();
        let mut shutdown = shared.shutdown.subscribe();
        tokio::spawn(async move {
            let mut prev: Option<(RawStats, Instant)> = None;
            loop {
                // The stream ends when the task is destroyed.
                if shared.task(&id).await.is_none() {
                    return;
                }
                let cur = cg.stats();
                let now = SystemTime::now();
                let since_start = now.duration_since(started).unwrap_or_default();
                let sample = stats_sample(
                    &id,
                    now,
                    &cur,
                    prev.as_ref().map(|(p, at)| (p, at.elapsed())),
                    since_start,
                    mhz,
                );
                let msg = pb::TaskStatsResponse {
                    stats: Some(sample),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                prev = Some((cur, Instant::now()));
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type TaskEventsStream = BoxStream<pb::DriverTaskEvent>;

    async fn task_events(
        &self,
        _: Request<pb::TaskEventsRequest>,
    ) -> Result<Response<Self::TaskEventsStream>, Status> {
        let mut shutdown = self.shared.shutdown.subscribe();
        let events = BroadcastStream::new(self.shared.events.subscribe())
            // A lagging reader loses old events rather than the stream.
            .filter_map(|r| async move { r.ok().map(Ok) })
            .take_until(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            });
        Ok(Response::new(Box::pin(events)))
    }

    async fn shutdown(
        &self,
        _: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        Err(unimplemented("Shutdown"))
    }

    async fn signal_task(
        &self,
        request: Request<pb::SignalTaskRequest>,
    ) -> Result<Response<pb::SignalTaskResponse>, Status> {
        let req = request.into_inner();
        let entry = self.entry(&req.task_id).await?;
        let signal = parse_signal(&req.signal).map_err(signal_error)?;
        if entry.outcome().is_some() {
            return Err(Status::failed_precondition(format!(
                "task {} has exited",
                req.task_id
            )));
        }
        entry.state.worker.signal(signal).map_err(signal_error)?;
        tracing::info!(task_id = %req.task_id, %signal, "signalled task");
        Ok(Response::new(pb::SignalTaskResponse {}))
    }

    async fn exec_task(
        &self,
        _: Request<pb::ExecTaskRequest>,
    ) -> Result<Response<pb::ExecTaskResponse>, Status> {
        Err(unimplemented("ExecTask"))
    }

    type ExecTaskStreamingStream = BoxStream<pb::ExecTaskStreamingResponse>;

    async fn exec_task_streaming(
        &self,
        _: Request<tonic::Streaming<pb::ExecTaskStreamingRequest>>,
    ) -> Result<Response<Self::ExecTaskStreamingStream>, Status> {
        Err(unimplemented("ExecTaskStreaming"))
    }

    async fn create_network(
        &self,
        _: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        Err(unimplemented("CreateNetwork"))
    }

    async fn destroy_network(
        &self,
        _: Request<pb::DestroyNetworkRequest>,
    ) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
        Err(unimplemented("DestroyNetwork"))
    }
}

/// Everything StartTask resolved before launching.
struct Launch<'a> {
    task: &'a pb::TaskConfig,
    settings: &'a TaskSettings,
    cfg: &'a PluginConfig,
    binary: PathBuf,
    user: Option<TaskUser>,
    cg: Cgroup,
    state_dir: PathBuf,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl DriverService {
    /// Writes the shim spec, starts the shim and registers the task. On error the caller
    /// removes the cgroup and state dir.
    async fn launch(&self, l: Launch<'_>) -> Result<pb::StartTaskResponse, Status> {
        let Launch {
            task,
            settings,
            cfg,
            binary,
            user,
            cg,
            state_dir,
        } = l;
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| recoverable(format!("create state dir {}: {e}", state_dir.display())))?;
        // A stale exit file from an earlier task with the same id would be mistaken for ours.
        let exit_file = state_dir.join("exit.json");
        let _ = std::fs::remove_file(&exit_file);
        let who = config::WorkerIdentity {
            alloc_id: &task.alloc_id,
            task_name: &task.name,
            node_name: &task.node_name,
        };
        let (args, extra_env) = settings.worker_invocation(cfg.default_config_file.as_deref(), who);
        // The typed config block wins over same-named variables from the task's env.
        let mut env: Vec<(String, String)> = task
            .env
            .iter()
            .filter(|(k, _)| !extra_env.iter().any(|(ek, _)| ek == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.sort();
        env.extend(extra_env);
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let task_dir = Path::new(&task.alloc_dir).join(&task.name);
        let path_of = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let spec = ShimSpec {
            argv: std::iter::once(binary.display().to_string())
                .chain(args)
                .collect(),
            env,
            cwd: (!task.alloc_dir.is_empty() && task_dir.is_dir()).then_some(task_dir),
            stdout_path: path_of(&task.stdout_path),
            stderr_path: path_of(&task.stderr_path),
            user,
            cgroup: Some(cg.clone()),
            exit_file: exit_file.clone(),
        };
        let spec_path = state_dir.join("spec.json");
        let bytes = serde_json::to_vec_pretty(&spec)
            .map_err(|e| Status::internal(format!("encode shim spec: {e}")))?;
        std::fs::write(&spec_path, bytes)
            .map_err(|e| recoverable(format!("write {}: {e}", spec_path.display())))?;
        let started_at_ns = now_ns();
        let (shim, worker) = spawn_shim(
            &self.shared.shim_exe,
            &spec_path,
            &state_dir.join("shim.log"),
        )
        .await
        .map_err(|e| recoverable(format!("start worker: {e}")))?;
        let state = DriverState {
            worker,
            shim,
            cgroup: Some(cg.clone()),
            state_dir,
            exit_file,
            started_at_ns,
        };
        let (exit_tx, _) = watch::channel(None);
        let entry = Arc::new(TaskEntry {
            config: task.clone(),
            state,
            drain_timeout: settings.drain_timeout,
            exit_tx,
        });
        let handle = handle_for(&entry)?;
        self.shared
            .tasks
            .lock()
            .await
            .insert(task.id.clone(), entry.clone());
        tasks::spawn_monitor(self.shared.clone(), &entry);
        tracing::info!(
            task_id = %task.id,
            pid = worker.pid,
            cgroup = %cg.display(),
            cgroup_version = cg.version(),
            "started task"
        );
        Ok(pb::StartTaskResponse {
            result: pb::start_task_response::Result::Success as i32,
            driver_error_msg: String::new(),
            handle: Some(handle),
            network_override: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_nomad_semantics() {
        let r = pb::Resources {
            allocated_resources: Some(pb::AllocatedTaskResources {
                cpu: Some(pb::AllocatedCpuResources { cpu_shares: 500 }),
                memory: Some(pb::AllocatedMemoryResources {
                    memory_mb: 256,
                    memory_max_mb: 512,
                }),
                networks: vec![],
            }),
            linux_resources: Some(pb::LinuxResources {
                cpu_period: 100_000,
                cpu_quota: 25_000,
                ..Default::default()
            }),
            ports: vec![],
        };
        let l = limits_from(Some(&r));
        assert_eq!(l.cpu_quota_period, Some((25_000, 100_000)));
        assert_eq!(l.cpu_shares, Some(500));
        assert_eq!(l.memory_max, Some(512 * 1024 * 1024));
        assert_eq!(limits_from(None), Limits::default());
    }

    #[test]
    fn stats_sample_percentages_and_fields() {
        let prev = RawStats {
            cpu_total_ns: Some(1_000_000_000),
            cpu_user_ns: Some(800_000_000),
            cpu_system_ns: Some(200_000_000),
            ..Default::default()
        };
        let cur = RawStats {
            cpu_total_ns: Some(1_500_000_000),
            cpu_user_ns: Some(1_200_000_000),
            cpu_system_ns: Some(300_000_000),
            throttled_periods: Some(3),
            mem_usage: Some(4096),
            mem_rss: Some(2048),
            ..Default::default()
        };
        let s = stats_sample(
            "t",
            SystemTime::now(),
            &cur,
            Some((&prev, Duration::from_secs(1))),
            Duration::from_secs(10),
            Some(2000.0),
        );
        let u = s.agg_resource_usage.expect("usage");
        let cpu = u.cpu.expect("cpu");
        assert!((cpu.percent - 50.0).abs() < 1e-9);
        assert!((cpu.user_mode - 40.0).abs() < 1e-9);
        assert!((cpu.total_ticks - 1000.0).abs() < 1e-9);
        let has = |f: pb::cpu_usage::Fields| cpu.measured_fields.contains(&(f as i32));
        assert!(has(pb::cpu_usage::Fields::ThrottledPeriods));
        assert!(!has(pb::cpu_usage::Fields::ThrottledTime));
        let mem = u.memory.expect("memory");
        assert_eq!(mem.usage, 4096);
        assert_eq!(
            mem.measured_fields,
            vec![
                pb::memory_usage::Fields::Rss as i32,
                pb::memory_usage::Fields::Usage as i32
            ]
        );
    }
}
