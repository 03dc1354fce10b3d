//! nomad-driver-transcode: a Nomad task driver plugin (go-plugin over gRPC) that runs
//! `transcode-worker` processes as managed allocations, each in its own cgroup, and keeps
//! them running and recoverable across plugin restarts.

pub mod base;
pub mod cgroup;
pub mod config;
pub mod cty;
pub mod driver;
pub mod fingerprint;
pub mod logging;
pub mod procfs;
pub mod proto;
pub mod server;
pub mod shim;
pub mod status;
pub mod tasks;
