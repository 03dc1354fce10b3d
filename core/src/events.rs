//! The event catalog and its CloudEvents 1.0 envelope (ARCHITECTURE §6). The 17 names of the
//! mission are fixed; the extra `Task*` types describe status changes the mission does not
//! name. Each event carries typed data; the store keeps the JSON as it was published, so the
//! bus and the database always hold the same bytes.

use crate::TaskId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! catalog {
    ($( $name:ident ($data:ty) ),* $(,)?) => {
        /// Every event type, spelled exactly as it appears on the bus and in the database.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum EventType { $( $name ),* }

        impl EventType {
            pub const ALL: &'static [EventType] = &[ $( EventType::$name ),* ];
            pub fn as_str(self) -> &'static str {
                match self { $( EventType::$name => stringify!($name) ),* }
            }
        }

        /// The typed payload of each event type.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", content = "data")]
        pub enum EventBody { $( $name($data) ),* }

        impl EventBody {
            pub fn event_type(&self) -> EventType {
                match self { $( EventBody::$name(_) => EventType::$name ),* }
            }
        }
    };
}

catalog! {
    TaskReceived(TaskReceived),
    TaskDetailsRetrieved(TaskDetailsRetrieved),
    VideoFilePulled(VideoFilePulled),
    VideoTranscoded(VideoTranscoded),
    TranscodedVideoUploaded(TranscodedVideoUploaded),
    WorkerNodeScaledUp(NodeScaled),
    WorkerNodeScaledDown(NodeScaled),
    ContainerErrorRetry(ContainerErrorRetry),
    ContainerErrorEscalation(ContainerErrorEscalation),
    ContainerFailureDetected(ContainerFailureDetected),
    HeartbeatReceived(HeartbeatReceived),
    GossipTableMerged(GossipTableMerged),
    ContainerScaledUp(ContainerScaled),
    ContainerScaledDown(ContainerScaled),
    ResourceUtilizationThresholdReached(ThresholdReached),
    WorkloadProcessingStarted(WorkloadProcessingStarted),
    WorkloadProcessingFinished(WorkloadProcessingFinished),
    TaskQueued(TaskQueued),
    TaskProgress(TaskProgress),
    TaskSucceeded(TaskSucceeded),
    TaskFailed(TaskFailed),
    TaskCancelled(TaskCancelled),
    TaskRequeued(TaskRequeued),
    TaskReleased(TaskReleased),
    TaskResolved(TaskResolved),
    RenditionUploaded(RenditionUploaded),
    ScalingActionFailed(ScalingActionFailed),
}

/// The 17 names the mission fixes, in the mission's order.
pub const MISSION_EVENTS: [EventType; 17] = [
    EventType::TaskReceived,
    EventType::TaskDetailsRetrieved,
    EventType::VideoFilePulled,
    EventType::VideoTranscoded,
    EventType::TranscodedVideoUploaded,
    EventType::WorkerNodeScaledUp,
    EventType::WorkerNodeScaledDown,
    EventType::ContainerErrorRetry,
    EventType::ContainerErrorEscalation,
    EventType::ContainerFailureDetected,
    EventType::HeartbeatReceived,
    EventType::GossipTableMerged,
    EventType::ContainerScaledUp,
    EventType::ContainerScaledDown,
    EventType::ResourceUtilizationThresholdReached,
    EventType::WorkloadProcessingStarted,
    EventType::WorkloadProcessingFinished,
];

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown event type {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReceived {
    pub worker: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDetailsRetrieved {
    pub worker: String,
    pub attempt: u32,
    pub source: String,
    pub renditions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoFilePulled {
    pub source: String,
    pub bytes: u64,
    pub sha256: String,
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoTranscoded {
    pub renditions: Vec<String>,
    /// Rungs left out because they were taller than the source.
    #[serde(default)]
    pub dropped: Vec<String>,
    /// Rungs not transcoded again because an earlier attempt of the task had already uploaded
    /// them (a resumed task; see `RenditionUploaded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reused: Vec<String>,
    pub duration_ms: u64,
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadedOutput {
    pub name: String,
    pub url: String,
    pub bytes: u64,
    pub sha256: String,
    /// False when an identical object was already there (a resumed task).
    pub uploaded: bool,
}

/// One rendition is safely in the object store. Written (fenced) as each upload completes,
/// before the next starts, so a task that escalates or is lost half-way through its uploads
/// leaves a durable record of what is done; a resumed attempt skips those rungs (in the
/// transcode and the upload) when the object is still there with this size and was made from
/// the same source bytes. It carries what the manifest needs, so skipped rungs can be merged
/// into the new manifest without probing them. See docs/decisions.md, "Resuming".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenditionUploaded {
    pub name: String,
    pub url: String,
    pub bytes: u64,
    pub sha256: String,
    /// sha256 of the source the rendition was made from.
    pub source_sha256: String,
    pub width: u32,
    pub height: u32,
    pub video_kbps: u32,
    pub duration_ms: u64,
    /// The store's tag of the object just after the upload (S3 ETag; inode, mtime and size for
    /// `file://`). A resumed attempt reuses the object only while the store still reports this
    /// tag, which proves it is the upload whose `sha256` is recorded here. Absent in records
    /// written before the field existed; those fall back to comparing the size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscodedVideoUploaded {
    pub outputs: Vec<UploadedOutput>,
    pub manifest: String,
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeScaled {
    pub from: u32,
    pub to: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub avg_cpu: f64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerErrorRetry {
    pub operation: String,
    pub attempt: u32,
    pub delay_ms: u64,
    pub class: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerErrorEscalation {
    pub operation: String,
    pub attempts: u32,
    pub class: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerFailureDetected {
    pub member: String,
    pub node: String,
    pub task_ids: Vec<TaskId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReceived {
    pub member: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberChange {
    pub member: String,
    pub from: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipTableMerged {
    pub merged: u32,
    pub changes: Vec<MemberChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerScaled {
    pub node: String,
    pub from: u32,
    pub to: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Above,
    Below,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdReached {
    pub node: String,
    pub metric: String,
    pub value: f64,
    pub threshold: f64,
    pub direction: Direction,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadProcessingStarted {
    pub worker: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadProcessingFinished {
    pub worker: String,
    pub outcome: String,
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskQueued {
    pub priority: i32,
    pub via: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    pub percent: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSucceeded {
    pub outputs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCancelled {
    pub by: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequeued {
    pub attempts: u32,
    pub reason: String,
    /// The status the task ended in: `queued`, or `failed` once attempts ran out.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReleased {
    pub worker: String,
    pub reason: String,
}

/// A scaling target could not carry out a decision (a command timed out or exited non-zero,
/// Nomad refused, a worker would not start). No count change is assumed: the next evaluation
/// starts from what the target reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingActionFailed {
    /// `node` or `container`.
    pub level: String,
    /// `up` or `down`.
    pub direction: String,
    /// The target kind: `local`, `nomad` or `command`.
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub from: u32,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResolved {
    pub by: String,
    pub action: String,
    pub reason: String,
}

/// A CloudEvents 1.0 structured-mode event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub specversion: String,
    pub id: Uuid,
    pub source: String,
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<TaskId>,
    /// Extension attribute: the node the source runs on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(flatten)]
    pub body: EventBody,
}

/// Who emits an event: a member id (`worker-…`, `scaler-…`, `cli-…`) and its node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub member: String,
    pub node: String,
}

impl Origin {
    pub fn new(member: impl Into<String>, node: impl Into<String>) -> Self {
        Origin {
            member: member.into(),
            node: node.into(),
        }
    }

    /// Builds an event stamped now, with a time-ordered id.
    pub fn event(&self, subject: Option<TaskId>, body: EventBody) -> Event {
        Event {
            specversion: "1.0".to_string(),
            id: Uuid::now_v7(),
            source: self.member.clone(),
            time: Utc::now(),
            subject,
            node: self.node.clone(),
            body,
        }
    }
}

impl Event {
    pub fn event_type(&self) -> EventType {
        self.body.event_type()
    }

    /// The payload as JSON, the form stored in the `events.data` column.
    pub fn data_json(&self) -> serde_json::Value {
        match serde_json::to_value(&self.body) {
            Ok(serde_json::Value::Object(mut m)) => m.remove("data").unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }
}

/// An event as stored: the envelope fields plus the store's sequence number, with the payload
/// kept as JSON so rows written by newer versions still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub task_id: Option<TaskId>,
    pub source: String,
    pub node: String,
    pub time: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl StoredEvent {
    /// The CloudEvents JSON form, identical in shape to what went on the bus.
    pub fn to_cloudevent(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "type": self.event_type,
            "source": self.source,
            "time": self.time,
            "data": self.data,
        });
        if let Some(obj) = v.as_object_mut() {
            if let Some(t) = self.task_id {
                obj.insert("subject".into(), serde_json::json!(t));
            }
            if !self.node.is_empty() {
                obj.insert("node".into(), serde_json::json!(self.node));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mission_names_are_exact() {
        let literal = [
            "TaskReceived",
            "TaskDetailsRetrieved",
            "VideoFilePulled",
            "VideoTranscoded",
            "TranscodedVideoUploaded",
            "WorkerNodeScaledUp",
            "WorkerNodeScaledDown",
            "ContainerErrorRetry",
            "ContainerErrorEscalation",
            "ContainerFailureDetected",
            "HeartbeatReceived",
            "GossipTableMerged",
            "ContainerScaledUp",
            "ContainerScaledDown",
            "ResourceUtilizationThresholdReached",
            "WorkloadProcessingStarted",
            "WorkloadProcessingFinished",
        ];
        let ours: Vec<&str> = MISSION_EVENTS.iter().map(|t| t.as_str()).collect();
        assert_eq!(ours, literal);
        for name in literal {
            let t: EventType = name.parse().expect("parses");
            assert_eq!(
                serde_json::to_string(&t).expect("ser"),
                format!("\"{name}\"")
            );
        }
        // Extras never shadow or rename a mission name.
        assert_eq!(EventType::ALL.len(), 27);
        let mut all: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), EventType::ALL.len());
    }

    fn samples() -> Vec<EventBody> {
        let task = Uuid::now_v7();
        vec![
            EventBody::TaskReceived(TaskReceived {
                worker: "w1".into(),
                attempt: 1,
            }),
            EventBody::TaskDetailsRetrieved(TaskDetailsRetrieved {
                worker: "w1".into(),
                attempt: 1,
                source: "s3://media/a.mp4".into(),
                renditions: vec!["720p".into()],
            }),
            EventBody::VideoFilePulled(VideoFilePulled {
                source: "s3://media/a.mp4".into(),
                bytes: 10,
                sha256: "ab".into(),
                millis: 3,
            }),
            EventBody::ContainerFailureDetected(ContainerFailureDetected {
                member: "w2".into(),
                node: "n1".into(),
                task_ids: vec![task],
            }),
            EventBody::ResourceUtilizationThresholdReached(ThresholdReached {
                node: "n1".into(),
                metric: "cpu".into(),
                value: 91.5,
                threshold: 80.0,
                direction: Direction::Above,
            }),
            EventBody::WorkerNodeScaledUp(NodeScaled {
                from: 1,
                to: 2,
                node: None,
                avg_cpu: 88.0,
                reason: "cpu".into(),
            }),
            EventBody::HeartbeatReceived(HeartbeatReceived {
                member: "w1".into(),
                rtt_ms: Some(0.4),
            }),
            EventBody::ScalingActionFailed(ScalingActionFailed {
                level: "node".into(),
                direction: "up".into(),
                target: "command".into(),
                node: None,
                from: 2,
                error: "add_node: exit status 1".into(),
            }),
        ]
    }

    #[test]
    fn envelope_round_trips_and_is_cloudevents() {
        let origin = Origin::new("worker-1", "node-a");
        for body in samples() {
            let ev = origin.event(Some(Uuid::now_v7()), body);
            let json = serde_json::to_value(&ev).expect("serialize");
            assert_eq!(json["specversion"], "1.0");
            assert_eq!(json["type"], ev.event_type().as_str());
            assert_eq!(json["source"], "worker-1");
            assert!(json["time"].is_string());
            assert!(json["data"].is_object());
            assert_eq!(json["data"], ev.data_json());
            let back: Event = serde_json::from_value(json).expect("deserialize");
            assert_eq!(back, ev);
        }
    }

    #[test]
    fn stored_form_matches_bus_form() {
        let ev = Origin::new("w", "n").event(Some(Uuid::now_v7()), samples().remove(0));
        let stored = StoredEvent {
            seq: 1,
            id: ev.id,
            event_type: ev.event_type().to_string(),
            task_id: ev.subject,
            source: ev.source.clone(),
            node: ev.node.clone(),
            time: ev.time,
            data: ev.data_json(),
        };
        let back: Event = serde_json::from_value(stored.to_cloudevent()).expect("same shape");
        assert_eq!(back, ev);
    }

    #[test]
    fn unknown_type_is_an_error() {
        let bad = serde_json::json!({"specversion":"1.0","id":Uuid::now_v7(),"source":"x",
            "time":"2026-01-01T00:00:00Z","type":"TaskExploded","data":{}});
        assert!(serde_json::from_value::<Event>(bad).is_err());
    }
}
