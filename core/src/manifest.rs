//! `manifest.json`, written next to a task's outputs: what each rendition is, measured from the
//! file itself, and its sha256. Players and downstream jobs read it, so its shape is a public
//! contract (docs/protocol.md). It is written last, after every rendition; what a resumed task
//! may skip comes from the `RenditionUploaded` events instead (docs/decisions.md, "Resuming").

use crate::TaskId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestOutput {
    pub name: String,
    pub url: String,
    pub width: u32,
    pub height: u32,
    /// Measured from the file's size and duration, not the requested bitrate.
    pub video_kbps: u32,
    pub duration_ms: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub task_id: TaskId,
    pub source: String,
    pub source_sha256: String,
    pub source_width: u32,
    pub source_height: u32,
    pub duration_ms: u64,
    pub has_audio: bool,
    pub outputs: Vec<ManifestOutput>,
    /// Requested rungs that were left out because they were taller than the source.
    #[serde(default)]
    pub dropped: Vec<String>,
    /// The fencing token of the attempt that wrote this manifest.
    pub lease_token: i64,
    pub worker: String,
    pub created_at: DateTime<Utc>,
}
