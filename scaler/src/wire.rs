//! What both ROUTER sockets do with a raw message before the protocol sees it: split the
//! routing envelope from the one payload part, and record a refused frame (counter plus a WARN
//! with the reason) the same way on every socket.

use transcode_core::bus::Multipart;
use transcode_core::metrics::Registry;
use transcode_core::protocol::FrameError;

/// A message from a ROUTER socket, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The parts to put in front of a reply: the peer identity, plus any further hops and the
    /// empty delimiter when the peer is a REQ socket (or talks like one).
    pub route: Vec<Vec<u8>>,
    /// The single payload part, or why there was not exactly one.
    pub body: Result<Vec<u8>, FrameError>,
}

impl Routed {
    /// The peer's identity (the first routing part).
    pub fn identity(&self) -> &[u8] {
        self.route.first().map(Vec::as_slice).unwrap_or_default()
    }

    /// Moves the payload (or its error) out, leaving the route for the reply.
    pub fn take_body(&mut self) -> Result<Vec<u8>, FrameError> {
        std::mem::replace(&mut self.body, Err(FrameError::Envelope(0)))
    }

    /// A reply with the same envelope.
    pub fn reply(&self, payload: Vec<u8>) -> Multipart {
        let mut msg = self.route.clone();
        msg.push(payload);
        msg
    }
}

/// Splits `[identity, payload]` (DEALER) or `[identity, …hops, "", payload]` (REQ, possibly
/// through proxies). `None` when there is not even an identity and a part after it, which a
/// ROUTER never delivers but costs nothing to survive.
pub fn split(mut msg: Multipart) -> Option<Routed> {
    if msg.len() < 2 {
        return None;
    }
    // Identities are never empty, so the first empty part after the identity is the REQ
    // delimiter; without one the peer is a DEALER and only the identity routes.
    let route_len = msg
        .iter()
        .skip(1)
        .position(Vec::is_empty)
        .map_or(1, |i| i + 2);
    let body = msg.split_off(route_len);
    let body = if body.len() == 1 {
        body.into_iter().next().ok_or(FrameError::Envelope(0))
    } else {
        Err(FrameError::Envelope(body.len()))
    };
    Some(Routed { route: msg, body })
}

/// Counts and logs a refused frame.
pub fn rejected(metrics: &Registry, socket: &str, identity: &[u8], err: &FrameError) {
    metrics.inc(
        crate::metrics::REJECTED,
        &[("socket", socket), ("code", err.code())],
    );
    tracing::warn!(socket, peer = %peer(identity), code = err.code(), reason = %err, "frame rejected");
}

/// A short printable form of a ROUTER identity for logs.
pub fn peer(identity: &[u8]) -> String {
    identity
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: &[&[u8]]) -> Multipart {
        p.iter().map(|x| x.to_vec()).collect()
    }

    #[test]
    fn dealer_req_and_proxied_envelopes() {
        let d = split(parts(&[b"id", b"{}"])).expect("routed");
        assert_eq!(d.route, parts(&[b"id"]));
        assert_eq!(d.body, Ok(b"{}".to_vec()));
        assert_eq!(d.reply(b"r".to_vec()), parts(&[b"id", b"r"]));

        let r = split(parts(&[b"id", b"", b"{}"])).expect("routed");
        assert_eq!(r.route, parts(&[b"id", b""]));
        assert_eq!(r.body, Ok(b"{}".to_vec()));

        let p = split(parts(&[b"id", b"hop", b"", b"{}"])).expect("routed");
        assert_eq!(p.route, parts(&[b"id", b"hop", b""]));
        assert_eq!(p.identity(), b"id");
    }

    #[test]
    fn wrong_part_counts() {
        let junk = split(parts(&[b"id", b"a", b"b", b"c"])).expect("routed");
        assert_eq!(junk.body, Err(FrameError::Envelope(3)));
        assert_eq!(junk.route, parts(&[b"id"]));
        let req_junk = split(parts(&[b"id", b"", b"a", b"b"])).expect("routed");
        assert_eq!(req_junk.body, Err(FrameError::Envelope(2)));
        assert_eq!(req_junk.route, parts(&[b"id", b""]));
        let empty = split(parts(&[b"id", b""])).expect("routed");
        assert_eq!(empty.body, Err(FrameError::Envelope(0)));
        assert_eq!(split(parts(&[b"id"])), None);
        assert_eq!(split(Vec::new()), None);
    }
}
