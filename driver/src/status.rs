//! gRPC error statuses in the shapes Nomad's Go client understands. In particular a start
//! failure that may succeed on retry must be FAILED_PRECONDITION carrying a
//! `hashicorp.nomad.plugins.shared.structs.RecoverableError{recoverable: true}` detail, packed in
//! a `google.rpc.Status` as grpc-go expects in the `grpc-status-details-bin` trailer.

use prost::Message;
use tonic::{Code, Status};

use crate::proto::structs::RecoverableError;

/// `google.rpc.Status`, declared here because only its encoding is needed.
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

pub const RECOVERABLE_TYPE_URL: &str =
    "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A failure Nomad should retry (the task is restarted per its restart policy).
pub fn recoverable(message: impl Into<String>) -> Status {
    let message = message.into();
    let detail = prost_types::Any {
        type_url: RECOVERABLE_TYPE_URL.into(),
        value: RecoverableError { recoverable: true }.encode_to_vec(),
    };
    let st = RpcStatus {
        code: Code::FailedPrecondition as i32,
        message: message.clone(),
        details: vec![detail],
    };
    Status::with_details(Code::FailedPrecondition, message, st.encode_to_vec().into())
}

/// Decodes the RecoverableError detail of a status, if any (used by tests as Nomad would).
pub fn is_recoverable(status: &Status) -> bool {
    RpcStatus::decode(status.details()).ok().is_some_and(|st| {
        st.details.iter().any(|d| {
            d.type_url == RECOVERABLE_TYPE_URL
                && RecoverableError::decode(d.value.as_slice()).is_ok_and(|r| r.recoverable)
        })
    })
}

pub fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not supported by the transcode driver (its capability is false)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoverable_round_trip() {
        let s = recoverable("cgroup busy");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(is_recoverable(&s));
        assert!(!is_recoverable(&Status::invalid_argument("bad config")));
    }
}
