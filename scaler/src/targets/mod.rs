//! Scaling targets (ARCHITECTURE §8): the one trait through which the autoscaler changes the
//! size of the farm, and its implementations. A target knows how to list the worker nodes and
//! their containers, add or remove a node, and start or stop a container on a node. It does not
//! decide anything: the policies in `crate::policy` decide, and `crate::autoscale` carries the
//! decision out (draining through the dispatcher before it asks a target to remove anything).
//!
//! Not every target can do every operation: Nomad's API scales allocations and drains nodes but
//! cannot create a machine, and a `command` target does only what its commands are given for.
//! Such an operation answers [`TargetError::Unsupported`], and the config check refuses a policy
//! bound to a target that cannot carry it out, so this is found at start-up, not mid-incident.

pub mod command;
pub mod local;
pub mod nomad;

use async_trait::async_trait;

/// One worker node as a target sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node label workers carry in gossip (`worker.node`); for Nomad, the node's name.
    pub name: String,
    /// Worker containers (processes, allocations) the target runs on it now.
    pub containers: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target cannot do this at all (a config error, caught at start-up where possible).
    #[error("the {target} target cannot {op}")]
    Unsupported {
        target: &'static str,
        op: &'static str,
    },
    /// The node is not one this target manages.
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    /// The action failed; nothing may be assumed about the count having changed.
    #[error("{0}")]
    Failed(String),
    /// The action did not finish in time; nothing may be assumed about the count.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

pub type TargetResult<T> = Result<T, TargetError>;

/// The one interface every target implements. All calls may block for a while (an HTTP call, a
/// `terraform apply`), so the autoscaler runs them off its evaluation loop.
#[async_trait]
pub trait Target: Send + Sync {
    /// The name in config (`local`, `nomad`, `command`), for logs and events.
    fn kind(&self) -> &'static str;
    /// The worker nodes managed now, with their container counts.
    async fn nodes(&self) -> TargetResult<Vec<NodeInfo>>;
    /// Adds one worker node and answers its name.
    async fn add_node(&self) -> TargetResult<String>;
    /// Removes a node whose workers have already been drained by the scaler. For Nomad this
    /// is the node drain (with `deadline`) plus marking it ineligible.
    async fn remove_node(&self, node: &str, deadline: std::time::Duration) -> TargetResult<()>;
    /// Starts one more worker container on `node`.
    async fn start_container(&self, node: &str) -> TargetResult<()>;
    /// Stops one worker container on `node`: `member` is the worker the scaler already sent
    /// DRAIN to, so it finishes its current task first. The target only reaps it.
    async fn stop_container(&self, node: &str, member: &str) -> TargetResult<()>;
}
