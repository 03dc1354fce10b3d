//! The ZeroMQ wire protocol (ARCHITECTURE §5, docs/protocol.md): the JSON frames of intake and
//! dispatch, and the checks every incoming frame passes before anything acts on it. Parsing
//! never panics and never trusts a size: a bad frame becomes a [`FrameError`] with a stable code
//! that goes back to the sender where the socket allows a reply, and into a counter.

use crate::spec::TaskSpec;
use crate::TaskId;
use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

/// Largest frame accepted on intake (a spec with a long ladder fits easily).
pub const MAX_INTAKE_FRAME: usize = 64 * 1024;
/// Largest frame accepted on dispatch; its frames are tiny.
pub const MAX_DISPATCH_FRAME: usize = 8 * 1024;
/// Hard cap libzmq enforces before our code sees anything (it drops the peer above this).
pub const MAX_WIRE_MESSAGE: i64 = 1024 * 1024;

/// Why a frame was refused. `code()` is what goes on the wire and into metrics labels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes exceeds the {max}-byte limit")]
    Oversized { size: usize, max: usize },
    #[error("frame is not valid JSON: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {0} (this server speaks v1)")]
    Version(u64),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("invalid frame: {0}")]
    Invalid(String),
    #[error("wrong number of message parts: {0}")]
    Envelope(usize),
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::Oversized { .. } => "oversized",
            FrameError::Malformed(_) => "malformed",
            FrameError::Version(_) => "bad_version",
            FrameError::UnknownOp(_) => "unknown_op",
            FrameError::Invalid(_) => "invalid",
            FrameError::Envelope(_) => "bad_envelope",
        }
    }
}

/// A publisher's request on intake.
#[derive(Debug, Clone, PartialEq)]
pub enum IntakeRequest {
    /// Dispatch a row the publisher inserted itself.
    SubmitId(TaskId),
    /// Insert the spec as a new task, then dispatch it.
    SubmitSpec(Box<TaskSpec>),
    Ping,
}

/// The error object of a refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// The reply to every intake request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntakeReply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// For a submit with an idempotency key that matched: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl IntakeReply {
    pub fn ok(task_id: Option<TaskId>, created: Option<bool>) -> Self {
        IntakeReply {
            v: VERSION,
            ok: true,
            task_id,
            created,
            error: None,
        }
    }

    pub fn err(code: &str, message: impl Into<String>) -> Self {
        IntakeReply {
            v: VERSION,
            ok: false,
            task_id: None,
            created: None,
            error: Some(ErrorBody {
                code: code.to_string(),
                message: message.into(),
            }),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Frames a worker sends to the dispatcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum WorkerFrame {
    /// First frame after (re)connecting; resets what the dispatcher knew about this id.
    Hello {
        worker: String,
        node: String,
        slots: u32,
    },
    /// Grants the dispatcher `credits` more tasks.
    Ready { credits: u32 },
    /// A task left this worker, with how it ended.
    Done { task_id: TaskId, outcome: String },
    /// Liveness between tasks, so an idle worker is not forgotten.
    Ping,
    /// The worker is draining and will take nothing more.
    Bye,
}

/// Frames the dispatcher sends to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum DispatcherFrame {
    Task {
        task_id: TaskId,
        attempt: u32,
    },
    /// Stop taking work: finish what is running, then leave.
    Drain,
    /// The last frame from this worker was refused.
    Error {
        code: String,
        message: String,
    },
}

#[derive(Serialize)]
struct Versioned<'a, T: Serialize> {
    v: u32,
    #[serde(flatten)]
    inner: &'a T,
}

/// Serializes a dispatch frame with its `"v":1`.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        v: VERSION,
        inner: frame,
    })
    .unwrap_or_default()
}

/// Parses the JSON object of a frame and checks size and version; returns the object.
fn object(
    bytes: &[u8],
    max: usize,
) -> Result<serde_json::Map<String, serde_json::Value>, FrameError> {
    if bytes.len() > max {
        return Err(FrameError::Oversized {
            size: bytes.len(),
            max,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(FrameError::Malformed("expected a JSON object".into()));
    };
    match obj.remove("v") {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => Ok(obj),
        Some(serde_json::Value::Number(n)) => Err(FrameError::Version(n.as_u64().unwrap_or(0))),
        Some(_) => Err(FrameError::Invalid("\"v\" must be a number".into())),
        None => Err(FrameError::Invalid("missing \"v\"".into())),
    }
}

pub fn parse_intake(bytes: &[u8]) -> Result<IntakeRequest, FrameError> {
    let mut obj = object(bytes, MAX_INTAKE_FRAME)?;
    let op = match obj.remove("op") {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(FrameError::Invalid("\"op\" must be a string".into())),
        None => return Err(FrameError::Invalid("missing \"op\"".into())),
    };
    match op.as_str() {
        "ping" => Ok(IntakeRequest::Ping),
        "submit" => {
            let id = obj.remove("task_id");
            let spec = obj.remove("spec");
            if let Some(extra) = obj.keys().next() {
                return Err(FrameError::Invalid(format!("unknown field {extra:?}")));
            }
            match (id, spec) {
                (Some(id), None) => {
                    let id: TaskId = serde_json::from_value(id)
                        .map_err(|_| FrameError::Invalid("task_id must be a UUID string".into()))?;
                    Ok(IntakeRequest::SubmitId(id))
                }
                (None, Some(spec)) => {
                    let spec: TaskSpec = serde_json::from_value(spec)
                        .map_err(|e| FrameError::Invalid(format!("spec: {e}")))?;
                    Ok(IntakeRequest::SubmitSpec(Box::new(spec)))
                }
                (Some(_), Some(_)) => Err(FrameError::Invalid(
                    "give either task_id or spec, not both".into(),
                )),
                (None, None) => Err(FrameError::Invalid("submit needs task_id or spec".into())),
            }
        }
        other => Err(FrameError::UnknownOp(other.to_string())),
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    obj: serde_json::Map<String, serde_json::Value>,
    known: &[&str],
) -> Result<T, FrameError> {
    match obj.get("op") {
        Some(serde_json::Value::String(op)) if !known.contains(&op.as_str()) => {
            return Err(FrameError::UnknownOp(op.clone()))
        }
        Some(serde_json::Value::String(_)) => {}
        Some(_) => return Err(FrameError::Invalid("\"op\" must be a string".into())),
        None => return Err(FrameError::Invalid("missing \"op\"".into())),
    }
    serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| FrameError::Invalid(e.to_string()))
}

pub fn parse_worker(bytes: &[u8]) -> Result<WorkerFrame, FrameError> {
    let obj = object(bytes, MAX_DISPATCH_FRAME)?;
    typed(obj, &["hello", "ready", "done", "ping", "bye"])
}

pub fn parse_dispatcher(bytes: &[u8]) -> Result<DispatcherFrame, FrameError> {
    let obj = object(bytes, MAX_DISPATCH_FRAME)?;
    typed(obj, &["task", "drain", "error"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_submit_forms() {
        let id = uuid::Uuid::now_v7();
        let f = format!(r#"{{"v":1,"op":"submit","task_id":"{id}"}}"#);
        assert_eq!(parse_intake(f.as_bytes()), Ok(IntakeRequest::SubmitId(id)));
        let s = br#"{"v":1,"op":"submit","spec":{"source":"s3://media/a.mp4","output":"s3://media/o/","preset":"hd"}}"#;
        assert!(matches!(parse_intake(s), Ok(IntakeRequest::SubmitSpec(_))));
        assert_eq!(
            parse_intake(br#"{"v":1,"op":"ping"}"#),
            Ok(IntakeRequest::Ping)
        );
    }

    #[test]
    fn intake_refusals_have_codes() {
        let big = vec![b' '; MAX_INTAKE_FRAME + 1];
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "malformed"),
            (b"[1,2]", "malformed"),
            (br#"{"op":"submit"}"#, "invalid"),
            (br#"{"v":2,"op":"submit"}"#, "bad_version"),
            (br#"{"v":"1","op":"submit"}"#, "invalid"),
            (br#"{"v":1,"op":"explode"}"#, "unknown_op"),
            (br#"{"v":1,"op":"submit"}"#, "invalid"),
            (br#"{"v":1,"op":"submit","task_id":"nope"}"#, "invalid"),
            (br#"{"v":1,"op":"submit","task_id":"01900000-0000-7000-8000-000000000000","spec":{}}"#, "invalid"),
            (br#"{"v":1,"op":"submit","spec":{"source":1}}"#, "invalid"),
            (br#"{"v":1,"op":"submit","task":"x"}"#, "invalid"),
            (&big, "oversized"),
            (b"", "malformed"),
            (b"\xff\xfe", "malformed"),
        ];
        for (bytes, code) in cases {
            let e = parse_intake(bytes).expect_err(&String::from_utf8_lossy(bytes));
            assert_eq!(e.code(), code, "{e}");
        }
    }

    #[test]
    fn dispatch_frames_round_trip() {
        let id = uuid::Uuid::now_v7();
        let frames = [
            WorkerFrame::Hello {
                worker: "w1".into(),
                node: "n".into(),
                slots: 4,
            },
            WorkerFrame::Ready { credits: 4 },
            WorkerFrame::Done {
                task_id: id,
                outcome: "succeeded".into(),
            },
            WorkerFrame::Ping,
            WorkerFrame::Bye,
        ];
        for f in frames {
            let bytes = encode(&f);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            assert!(text.contains(r#""v":1"#), "{text}");
            assert_eq!(parse_worker(&bytes), Ok(f));
        }
        let t = DispatcherFrame::Task {
            task_id: id,
            attempt: 2,
        };
        assert_eq!(parse_dispatcher(&encode(&t)), Ok(t));
        assert_eq!(
            parse_dispatcher(&encode(&DispatcherFrame::Drain)),
            Ok(DispatcherFrame::Drain)
        );
    }

    #[test]
    fn dispatch_refusals() {
        assert_eq!(
            parse_worker(br#"{"v":1,"op":"steal"}"#).map_err(|e| e.code()),
            Err("unknown_op")
        );
        assert_eq!(
            parse_worker(br#"{"v":1,"op":"ready"}"#).map_err(|e| e.code()),
            Err("invalid")
        );
        assert_eq!(
            parse_worker(br#"{"v":1,"op":"ready","credits":-1}"#).map_err(|e| e.code()),
            Err("invalid")
        );
        assert_eq!(
            parse_worker(br#"{"op":"ping"}"#).map_err(|e| e.code()),
            Err("invalid")
        );
        assert_eq!(
            parse_worker(&vec![b'x'; MAX_DISPATCH_FRAME + 1]).map_err(|e| e.code()),
            Err("oversized")
        );
    }
}
