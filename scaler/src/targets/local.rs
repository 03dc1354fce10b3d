//! The `local` target: worker processes on this machine, grouped into named nodes. A "node" is
//! a label (`--node`) shared by the workers started for it, so `transcode dev`, the tests and a
//! single-box install exercise the same node and container decisions a Nomad cluster gets.
//!
//! The target owns the child processes: it starts them, reaps them, and on removal waits for
//! the drain the scaler already started (DRAIN frame) before it escalates to SIGTERM, which the
//! worker also treats as a drain, and only past a grace period to SIGKILL. A worker that dies
//! on its own is simply not counted any more; replacing it is the policy's call.

use super::{NodeInfo, Target, TargetError, TargetResult};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::process::{Child, Command};

/// After the drain deadline, SIGTERM; after this much more, SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The `transcode-worker` binary.
    pub worker_bin: PathBuf,
    /// Arguments every worker gets: the store, the scaler's endpoints, gossip join, config.
    pub args: Vec<String>,
    /// Workers started with a new node.
    pub containers_per_node: u32,
    /// `--slots` of each worker.
    pub slots: u32,
    /// New nodes are named `<prefix><n>`.
    pub node_prefix: String,
    /// One log file per worker here; `None` passes the scaler's own stderr on.
    pub log_dir: Option<PathBuf>,
    /// How long a worker sent DRAIN by the container policy may take to finish its task and
    /// exit before it gets SIGTERM (the container policy's drain deadline).
    pub drain_wait: Duration,
}

struct Worker {
    member: String,
    child: Child,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, Vec<Worker>>,
    next_node: u32,
    next_worker: u64,
}

pub struct LocalTarget {
    settings: LocalSettings,
    state: Mutex<State>,
}

fn failed(e: impl std::fmt::Display) -> TargetError {
    TargetError::Failed(e.to_string())
}

impl LocalTarget {
    pub fn new(settings: LocalSettings) -> TargetResult<LocalTarget> {
        if !settings.worker_bin.is_file() {
            return Err(TargetError::Failed(format!(
                "worker binary {} not found (scaling.local.worker_bin)",
                settings.worker_bin.display()
            )));
        }
        if let Some(d) = &settings.log_dir {
            std::fs::create_dir_all(d).map_err(|e| failed(format!("{}: {e}", d.display())))?;
        }
        Ok(LocalTarget {
            settings,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map usable: children are only added or
        // removed whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, node: &str, n: u64) -> TargetResult<Worker> {
        let member = format!("{node}-w{n}");
        let mut cmd = Command::new(&self.settings.worker_bin);
        cmd.args(&self.settings.args)
            .args(["--node", node, "--id", &member])
            .args(["--slots", &self.settings.slots.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &self.settings.log_dir {
            Some(d) => {
                let path = d.join(format!("{member}.log"));
                let f = std::fs::File::create(&path)
                    .map_err(|e| failed(format!("{}: {e}", path.display())))?;
                cmd.stderr(Stdio::from(f));
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn().map_err(|e| {
            failed(format!(
                "starting {}: {e}",
                self.settings.worker_bin.display()
            ))
        })?;
        tracing::info!(%node, %member, pid = child.id(), "worker started");
        Ok(Worker { member, child })
    }

    /// Drops workers that have exited, so counts are of live processes.
    fn reap(state: &mut State) {
        for (node, workers) in state.nodes.iter_mut() {
            workers.retain_mut(|w| match w.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(%node, member = %w.member, %status, "worker exited");
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(member = %w.member, error = %e, "cannot poll worker; dropping it");
                    false
                }
            });
        }
    }

    /// SIGTERM now; the worker drains and exits. Used at shutdown.
    pub fn terminate_all(&self) {
        let st = self.state();
        for w in st.nodes.values().flatten() {
            signal(&w.child, "TERM");
        }
    }

    /// Waits for `workers` to exit: up to `deadline` for the drain the scaler started, then
    /// SIGTERM and [`TERM_GRACE`], then SIGKILL.
    async fn retire(mut workers: Vec<Worker>, deadline: Duration) {
        let first = wait_all(&mut workers, deadline).await;
        if first.iter().all(|r| r.is_ok()) {
            return;
        }
        for w in &workers {
            tracing::warn!(member = %w.member, "still running after the drain deadline: SIGTERM");
            signal(&w.child, "TERM");
        }
        let second = wait_all(&mut workers, TERM_GRACE).await;
        if second.iter().all(|r| r.is_ok()) {
            return;
        }
        for w in &mut workers {
            tracing::warn!(member = %w.member, "still running after SIGTERM: SIGKILL");
            let _ = w.child.start_kill();
            let _ = w.child.wait().await;
        }
    }
}

/// Waits up to `d` for every worker to exit; one result per worker, `Err` where it did not.
async fn wait_all(
    ws: &mut [Worker],
    d: Duration,
) -> Vec<Result<std::io::Result<std::process::ExitStatus>, tokio::time::error::Elapsed>> {
    futures::future::join_all(
        ws.iter_mut()
            .map(|w| tokio::time::timeout(d, w.child.wait())),
    )
    .await
}

/// Signals a child by pid through kill(1): tokio offers only SIGKILL.
fn signal(child: &Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[async_trait]
impl Target for LocalTarget {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn nodes(&self) -> TargetResult<Vec<NodeInfo>> {
        let mut st = self.state();
        Self::reap(&mut st);
        Ok(st
            .nodes
            .iter()
            .map(|(name, ws)| NodeInfo {
                name: name.clone(),
                containers: ws.len() as u32,
            })
            .collect())
    }

    async fn add_node(&self) -> TargetResult<String> {
        let mut st = self.state();
        st.next_node += 1;
        let name = format!("{}{}", self.settings.node_prefix, st.next_node);
        let mut workers = Vec::new();
        for _ in 0..self.settings.containers_per_node.max(1) {
            st.next_worker += 1;
            let n = st.next_worker;
            match self.spawn(&name, n) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // All or nothing: a half-started node would be counted as a whole one.
                    for w in &mut workers {
                        let _ = w.child.start_kill();
                    }
                    return Err(e);
                }
            }
        }
        st.nodes.insert(name.clone(), workers);
        Ok(name)
    }

    async fn remove_node(&self, node: &str, deadline: Duration) -> TargetResult<()> {
        let workers = self
            .state()
            .nodes
            .remove(node)
            .ok_or_else(|| TargetError::UnknownNode(node.to_string()))?;
        Self::retire(workers, deadline).await;
        tracing::info!(%node, "node removed");
        Ok(())
    }

    async fn start_container(&self, node: &str) -> TargetResult<()> {
        let mut st = self.state();
        if !st.nodes.contains_key(node) {
            return Err(TargetError::UnknownNode(node.to_string()));
        }
        st.next_worker += 1;
        let n = st.next_worker;
        let w = self.spawn(node, n)?;
        st.nodes.entry(node.to_string()).or_default().push(w);
        Ok(())
    }

    async fn stop_container(&self, node: &str, member: &str) -> TargetResult<()> {
        let worker = {
            let mut st = self.state();
            let ws = st
                .nodes
                .get_mut(node)
                .ok_or_else(|| TargetError::UnknownNode(node.to_string()))?;
            let i = ws
                .iter()
                .position(|w| w.member == member)
                .ok_or_else(|| failed(format!("no worker {member:?} on node {node:?}")))?;
            ws.remove(i)
        };
        // The worker was sent DRAIN: it finishes its task and exits by itself.
        Self::retire(vec![worker], self.settings.drain_wait).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in worker binary: a shell script that records its args and runs until
    /// signalled. The real worker is exercised by the e2e scaling scenario.
    fn fake_worker(dir: &std::path::Path) -> PathBuf {
        let p = dir.join("fake-worker");
        std::fs::write(
            &p,
            "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/args.log\"\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[tokio::test]
    async fn nodes_and_containers_are_real_processes() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = LocalTarget::new(LocalSettings {
            worker_bin: fake_worker(dir.path()),
            args: vec!["--store".into(), "sqlite://x".into()],
            containers_per_node: 2,
            slots: 3,
            node_prefix: "n".into(),
            log_dir: Some(dir.path().join("logs")),
            drain_wait: Duration::from_millis(100),
        })
        .expect("target");
        let a = t.add_node().await.expect("add");
        let b = t.add_node().await.expect("add");
        assert_eq!((a.as_str(), b.as_str()), ("n1", "n2"));
        t.start_container("n1").await.expect("start");
        let counts: Vec<(String, u32)> = t
            .nodes()
            .await
            .expect("nodes")
            .into_iter()
            .map(|n| (n.name, n.containers))
            .collect();
        assert_eq!(counts, vec![("n1".into(), 3), ("n2".into(), 2)]);
        assert!(matches!(
            t.start_container("n9").await,
            Err(TargetError::UnknownNode(_))
        ));
        // The worker did not drain by itself (no DRAIN in this test): SIGTERM after the deadline.
        t.remove_node("n2", Duration::from_millis(100))
            .await
            .expect("remove");
        t.stop_container("n1", "n1-w5").await.expect("stop");
        let counts: Vec<u32> = t
            .nodes()
            .await
            .expect("nodes")
            .iter()
            .map(|n| n.containers)
            .collect();
        assert_eq!(counts, vec![2]);
        let args = std::fs::read_to_string(dir.path().join("args.log")).expect("args");
        assert!(
            args.lines()
                .any(|l| l == "--store sqlite://x --node n1 --id n1-w1 --slots 3"),
            "{args}"
        );
        t.terminate_all();
    }
}
