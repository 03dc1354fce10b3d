//! `transcode-worker` as a library: the pieces of a worker (the GStreamer transcoder, the task
//! pipeline, the dispatcher client), so the binary, the end-to-end tests and the benchmarks all
//! run the same code.

pub mod client;
pub mod gossip;
pub mod pipeline;
pub mod transcode;
