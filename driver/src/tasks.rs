//! Task bookkeeping shared by the gRPC services: what the plugin knows about each task it
//! started or recovered, the persisted driver state inside Nomad's task handle, the monitor that
//! turns a worker's exit (recorded by its shim) into a WaitTask result, and the driver's event
//! bus for TaskEvents.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Mutex, RwLock};

use crate::cgroup::{Cgroup, Layout};
use crate::config::PluginConfig;
use crate::procfs::ProcId;
use crate::proto::drivers::{DriverTaskEvent, TaskConfig};
use crate::shim::ExitRecord;

/// Version of the `DriverState` JSON in task handles (Nomad reserves 0).
pub const HANDLE_VERSION: i32 = 1;

/// How often the monitor looks for the exit file. Polling is used because a recovered worker
/// is not our child and cannot be waited on; 200 ms keeps WaitTask prompt and costs one stat.
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(200);

/// The driver's part of a task handle: enough to find, signal, measure and clean up the task
/// from a fresh plugin process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverState {
    /// The worker process (pid + start time).
    #[serde(flatten)]
    pub worker: ProcId,
    pub shim: ProcId,
    pub cgroup: Option<Cgroup>,
    pub state_dir: PathBuf,
    pub exit_file: PathBuf,
    pub started_at_ns: i64,
}

/// The outcome WaitTask reports: a recorded exit, or why none could be recorded.
pub type Outcome = Result<ExitRecord, String>;

pub struct TaskEntry {
    pub config: TaskConfig,
    pub state: DriverState,
    pub drain_timeout: Duration,
    pub exit_tx: watch::Sender<Option<Outcome>>,
}

impl TaskEntry {
    pub fn outcome(&self) -> Option<Outcome> {
        self.exit_tx.borrow().clone()
    }

    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.state.started_at_ns.max(0) as u64)
    }

    /// Waits until the task has exited (or `limit` passes). `None` on timeout.
    pub async fn wait_exit(&self, limit: Duration) -> Option<Outcome> {
        let mut rx = self.exit_tx.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(|o| o.is_some())).await;
        match r {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }
}

/// State shared by BasePlugin and Driver.
pub struct Shared {
    pub config: RwLock<Option<PluginConfig>>,
    /// The cgroup hierarchy detected at start-up, or why there is none.
    pub layout: Result<Layout, String>,
    pub tasks: Mutex<HashMap<String, Arc<TaskEntry>>>,
    pub events: broadcast::Sender<DriverTaskEvent>,
    /// This binary, re-executed as the task shim.
    pub shim_exe: PathBuf,
    /// Flips to true when the plugin is shutting down, ending long-lived streams.
    pub shutdown: watch::Sender<bool>,
}

impl Shared {
    pub fn new(layout: Result<Layout, String>, shim_exe: PathBuf) -> Arc<Self> {
        let (events, _) = broadcast::channel(256);
        let (shutdown, _) = watch::channel(false);
        Arc::new(Self {
            config: RwLock::new(None),
            layout,
            tasks: Mutex::new(HashMap::new()),
            events,
            shim_exe,
            shutdown,
        })
    }

    pub async fn task(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.tasks.lock().await.get(id).cloned()
    }

    pub fn emit(&self, task: &TaskConfig, message: String, annotations: HashMap<String, String>) {
        let now = SystemTime::now();
        let ev = DriverTaskEvent {
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            timestamp: Some(prost_types::Timestamp::from(now)),
            message,
            annotations,
        };
        // No subscriber (Nomad not streaming events yet) is not an error.
        let _ = self.events.send(ev);
    }
}

/// Watches one task until it exits, then publishes its outcome (and an OOM event). Holds the
/// entry weakly so that a destroyed task's monitor ends by itself.
pub fn spawn_monitor(shared: Arc<Shared>, entry: &Arc<TaskEntry>) {
    let weak: Weak<TaskEntry> = Arc::downgrade(entry);
    tokio::spawn(async move {
        loop {
            let Some(entry) = weak.upgrade() else {
                return;
            };
            if entry.outcome().is_some() {
                return;
            }
            if let Some(outcome) = poll_once(&entry.state) {
                finish(&shared, &entry, outcome);
                return;
            }
            drop(entry);
            tokio::time::sleep(MONITOR_INTERVAL).await;
        }
    });
}

/// One look at a task: `Some` once its outcome is known.
pub fn poll_once(state: &DriverState) -> Option<Outcome> {
    match ExitRecord::load(&state.exit_file) {
        Ok(Some(r)) => return Some(Ok(r)),
        Ok(None) => {}
        Err(e) => return Some(Err(e.to_string())),
    }
    if state.worker.is_running() || state.shim.is_running() {
        return None;
    }
    // Both are gone: the shim may have written the file just before exiting, so look again.
    match ExitRecord::load(&state.exit_file) {
        Ok(Some(r)) => Some(Ok(r)),
        Ok(None) => Some(Err(format!(
            "worker {} ended but its exit status was not recorded: its shim {} was killed",
            state.worker.pid, state.shim.pid
        ))),
        Err(e) => Some(Err(e.to_string())),
    }
}

pub fn finish(shared: &Shared, entry: &TaskEntry, outcome: Outcome) {
    match &outcome {
        Ok(r) => {
            tracing::info!(
                task_id = %entry.config.id,
                exit_code = r.exit_code,
                signal = r.signal,
                oom_killed = r.oom_killed,
                "task exited"
            );
            if r.oom_killed {
                let limit = entry
                    .config
                    .resources
                    .as_ref()
                    .and_then(|r| r.allocated_resources.as_ref())
                    .and_then(|a| a.memory.as_ref())
                    .map(|m| m.memory_max_mb.max(m.memory_mb))
                    .unwrap_or_default();
                let mut ann = HashMap::new();
                ann.insert("oom_killed".to_owned(), "true".to_owned());
                ann.insert("memory_limit_mb".to_owned(), limit.to_string());
                shared.emit(
                    &entry.config,
                    format!("OOM Killed: the worker exceeded its memory limit of {limit} MiB"),
                    ann,
                );
            }
        }
        Err(e) => tracing::warn!(task_id = %entry.config.id, error = %e, "task outcome unknown"),
    }
    entry.exit_tx.send_replace(Some(outcome));
}
