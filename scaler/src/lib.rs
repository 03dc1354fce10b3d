//! `transcode-scaler` as a library: the intake, the dispatcher, the event forwarder, the scan
//! and the lease sweeper, assembled by [`server::Scaler`]. The binary (`main.rs`) only parses
//! flags, loads the config, sets up logging and waits for a signal; keeping the rest here lets
//! later parts (autoscaling, leader election) drive the dispatcher directly.

pub mod autoscale;
pub mod container_policy;
pub mod dispatch;
pub mod dispatch_service;
pub mod failure;
pub mod intake;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod recovery;
pub mod server;
pub mod targets;
pub mod wire;

pub use dispatch_service::DispatchHandle;
pub use server::{Endpoints, Scaler, Settings, StartError};
