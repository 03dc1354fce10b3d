//! `transcode-core`: the types and services that every nomad-transcode process shares: the task
//! model and its state machine, the event catalog, the `Store` trait with its PostgreSQL and
//! SQLite implementations, object access, the retry policy, and configuration. Binaries depend
//! on this crate and never on each other.

pub mod bus;
pub mod config;
pub mod events;
pub mod http;
pub mod manifest;
pub mod membership;
pub mod metrics;
pub mod objects;
pub mod protocol;
pub mod retry;
pub mod spec;
pub mod status;
pub mod store;
pub mod task;
pub mod url;
pub mod utilization;

pub use events::{Event, EventBody, EventType, Origin};
pub use spec::{Rendition, TaskSpec};
pub use status::TaskStatus;
pub use store::{Store, StoreError};
pub use task::{Task, TaskId};

/// The version every binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
