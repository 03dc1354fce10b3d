//! ZeroMQ plumbing shared by every process: socket set-up with the options we always want
//! (linger, high-water marks, a hard message cap), a thread per socket bridged to tokio
//! channels (the `zmq` crate blocks), the event publisher and subscriber, and the XSUB→XPUB
//! forwarder. Socket threads never panic on input; they log and keep serving.

use crate::events::Event;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as stdmpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// One ZeroMQ message: its parts in order.
pub type Multipart = Vec<Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("zmq {op} {endpoint}: {source}")]
    Zmq {
        op: &'static str,
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    #[error("zmq: {0}")]
    Socket(#[from] zmq::Error),
    #[error("thread: {0}")]
    Thread(String),
    #[error("bad reply: {0}")]
    BadReply(String),
}

/// Linger on close: long enough to flush a final reply, short enough that a drop never hangs.
const LINGER_MS: i32 = 500;
const HWM: i32 = 10_000;

/// Creates a socket with our defaults.
pub fn socket(ctx: &zmq::Context, kind: zmq::SocketType) -> Result<zmq::Socket, BusError> {
    let s = ctx.socket(kind)?;
    s.set_linger(LINGER_MS)?;
    s.set_sndhwm(HWM)?;
    s.set_rcvhwm(HWM)?;
    s.set_maxmsgsize(crate::protocol::MAX_WIRE_MESSAGE)?;
    if kind == zmq::ROUTER {
        // Unroutable replies (the peer is gone) fail loudly instead of vanishing.
        s.set_router_mandatory(true)?;
    }
    Ok(s)
}

/// Binds and returns the endpoint actually bound (resolves `:0` and `*`).
pub fn bind(s: &zmq::Socket, endpoint: &str) -> Result<String, BusError> {
    s.bind(endpoint).map_err(|source| BusError::Zmq {
        op: "bind",
        endpoint: endpoint.to_string(),
        source,
    })?;
    Ok(match s.get_last_endpoint() {
        Ok(Ok(e)) => e,
        _ => endpoint.to_string(),
    })
}

pub fn connect(s: &zmq::Socket, endpoint: &str) -> Result<(), BusError> {
    s.connect(endpoint).map_err(|source| BusError::Zmq {
        op: "connect",
        endpoint: endpoint.to_string(),
        source,
    })
}

/// Counters a socket loop keeps; exported as metrics by its owner.
#[derive(Debug, Default)]
pub struct LoopStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Sends that failed: high-water mark reached, or a ROUTER peer that is gone.
    pub send_failures: AtomicU64,
}

/// The async side of a socket owned by its own thread. Dropping it stops the thread.
pub struct SocketHandle {
    pub tx: stdmpsc::Sender<Multipart>,
    pub rx: mpsc::Receiver<Multipart>,
    pub stats: Arc<LoopStats>,
    threads: Vec<JoinHandle<()>>,
}

impl SocketHandle {
    /// Sends a message; false when the socket thread has stopped.
    pub fn send(&self, msg: Multipart) -> bool {
        // An empty message is the internal stop signal; it is never a valid message.
        !msg.is_empty() && self.tx.send(msg).is_ok()
    }

    /// A sender that can be cloned into other tasks.
    pub fn sender(&self) -> stdmpsc::Sender<Multipart> {
        self.tx.clone()
    }

    /// Stops the threads and waits for them (the socket closes with its linger).
    pub fn close(self) {
        let SocketHandle {
            tx, rx, threads, ..
        } = self;
        drop(tx);
        drop(rx);
        for t in threads {
            let _ = t.join();
        }
    }
}

static LOOP_ID: AtomicU64 = AtomicU64::new(0);
const CTRL_MSG: &[u8] = b"m";
const CTRL_QUIT: &[u8] = b"q";

/// Moves `socket` onto its own thread. Incoming messages arrive on `rx` (bounded: a slow
/// consumer pushes back onto libzmq's queue, not into memory); messages given to `tx` are
/// sent at once: a second thread wakes the socket thread through an inproc pair.
pub fn spawn_loop(
    ctx: &zmq::Context,
    socket: zmq::Socket,
    name: &str,
    inbound_capacity: usize,
) -> Result<SocketHandle, BusError> {
    let id = LOOP_ID.fetch_add(1, Ordering::Relaxed);
    let wake_ep = format!("inproc://wake-{name}-{id}");
    let wake_rx = ctx.socket(zmq::PAIR)?;
    wake_rx.set_linger(0)?;
    bind(&wake_rx, &wake_ep)?;
    let wake_tx = ctx.socket(zmq::PAIR)?;
    wake_tx.set_linger(0)?;
    connect(&wake_tx, &wake_ep)?;

    let (out_tx, out_rx) = stdmpsc::channel::<Multipart>();
    let (in_tx, in_rx) = mpsc::channel::<Multipart>(inbound_capacity.max(1));
    let stats = Arc::new(LoopStats::default());

    let fwd_name = name.to_string();
    let forwarder = std::thread::Builder::new()
        .name(format!("zmq-fwd-{name}"))
        .spawn(move || {
            while let Ok(msg) = out_rx.recv() {
                // A message has at least one part; an empty one is `close()` asking us to stop.
                if msg.is_empty() {
                    break;
                }
                let mut parts: Multipart = Vec::with_capacity(msg.len() + 1);
                parts.push(CTRL_MSG.to_vec());
                parts.extend(msg);
                if let Err(e) = wake_tx.send_multipart(parts, 0) {
                    tracing::warn!(socket = %fwd_name, error = %e, "wake pair send failed");
                    return;
                }
            }
            let _ = wake_tx.send(CTRL_QUIT, 0);
        })
        .map_err(|e| BusError::Thread(e.to_string()))?;

    let loop_name = name.to_string();
    let loop_stats = stats.clone();
    let main = std::thread::Builder::new()
        .name(format!("zmq-{name}"))
        .spawn(move || socket_loop(&socket, &wake_rx, &in_tx, &loop_stats, &loop_name))
        .map_err(|e| BusError::Thread(e.to_string()))?;

    Ok(SocketHandle {
        tx: out_tx,
        rx: in_rx,
        stats,
        threads: vec![forwarder, main],
    })
}

fn socket_loop(
    socket: &zmq::Socket,
    wake: &zmq::Socket,
    inbound: &mpsc::Sender<Multipart>,
    stats: &LoopStats,
    name: &str,
) {
    loop {
        let mut items = [
            socket.as_poll_item(zmq::POLLIN),
            wake.as_poll_item(zmq::POLLIN),
        ];
        if let Err(e) = zmq::poll(&mut items, 1000) {
            if e == zmq::Error::ETERM {
                return;
            }
            tracing::warn!(socket = %name, error = %e, "poll failed");
            continue;
        }
        let (readable, woken) = (items[0].is_readable(), items[1].is_readable());
        if readable {
            // Drain what is queued now, but come back to the wake pair at least every 256.
            for _ in 0..256 {
                match socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(msg) => {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        if inbound.blocking_send(msg).is_err() {
                            return;
                        }
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(zmq::Error::ETERM) => return,
                    Err(e) => {
                        tracing::warn!(socket = %name, error = %e, "receive failed");
                        break;
                    }
                }
            }
        }
        if woken {
            loop {
                match wake.recv_multipart(zmq::DONTWAIT) {
                    Ok(mut msg) => {
                        if msg.first().map(Vec::as_slice) != Some(CTRL_MSG) {
                            return;
                        }
                        msg.remove(0);
                        match socket.send_multipart(msg, zmq::DONTWAIT) {
                            Ok(()) => {
                                stats.sent.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                stats.send_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(socket = %name, error = %e, "send dropped");
                            }
                        }
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(_) => return,
                }
            }
        }
    }
}

/// Publishes events as `[type, CloudEvents JSON]`, so subscribers filter on the type.
#[derive(Clone)]
pub struct Publisher {
    tx: stdmpsc::Sender<Multipart>,
    published: Arc<AtomicU64>,
}

impl Publisher {
    pub fn publish(&self, ev: &Event) {
        match serde_json::to_vec(ev) {
            Ok(json) => {
                if self
                    .tx
                    .send(vec![ev.event_type().as_str().as_bytes().to_vec(), json])
                    .is_ok()
                {
                    self.published.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "event did not serialize"),
        }
    }

    pub fn publish_all(&self, evs: &[Event]) {
        for ev in evs {
            self.publish(ev);
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// A publisher that drops everything, for tools that have no bus.
    pub fn disconnected() -> Self {
        let (tx, _rx) = stdmpsc::channel();
        Publisher {
            tx,
            published: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Connects a PUB socket to the forwarder's XSUB endpoint. Keep the handle alive as long as
/// the publisher is used.
pub fn publisher(
    ctx: &zmq::Context,
    xsub_endpoint: &str,
) -> Result<(Publisher, SocketHandle), BusError> {
    let s = socket(ctx, zmq::PUB)?;
    connect(&s, xsub_endpoint)?;
    let handle = spawn_loop(ctx, s, "pub", 1)?;
    Ok((
        Publisher {
            tx: handle.sender(),
            published: Arc::new(AtomicU64::new(0)),
        },
        handle,
    ))
}

/// Subscribes to the forwarder's XPUB endpoint; `topics` empty means every event.
pub fn subscriber(
    ctx: &zmq::Context,
    xpub_endpoint: &str,
    topics: &[&str],
) -> Result<SocketHandle, BusError> {
    let s = socket(ctx, zmq::SUB)?;
    if topics.is_empty() {
        s.set_subscribe(b"")?;
    }
    for t in topics {
        s.set_subscribe(t.as_bytes())?;
    }
    connect(&s, xpub_endpoint)?;
    spawn_loop(ctx, s, "sub", 4096)
}

/// The event forwarder: XSUB (publishers connect) to XPUB (subscribers connect). Returns the
/// bound endpoints and a handle that stops it.
pub struct Forwarder {
    pub xsub: String,
    pub xpub: String,
    control: zmq::Socket,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(ctx: &zmq::Context, xsub_ep: &str, xpub_ep: &str) -> Result<Self, BusError> {
        let mut xsub = socket(ctx, zmq::XSUB)?;
        let mut xpub = socket(ctx, zmq::XPUB)?;
        let xsub_bound = bind(&xsub, xsub_ep)?;
        let xpub_bound = bind(&xpub, xpub_ep)?;
        let id = LOOP_ID.fetch_add(1, Ordering::Relaxed);
        let ctl_ep = format!("inproc://forwarder-ctl-{id}");
        let mut ctl_in = ctx.socket(zmq::PAIR)?;
        ctl_in.set_linger(0)?;
        bind(&ctl_in, &ctl_ep)?;
        let control = ctx.socket(zmq::PAIR)?;
        control.set_linger(0)?;
        connect(&control, &ctl_ep)?;
        let thread = std::thread::Builder::new()
            .name("zmq-forwarder".into())
            .spawn(move || {
                if let Err(e) = zmq::proxy_steerable(&mut xsub, &mut xpub, &mut ctl_in) {
                    tracing::warn!(error = %e, "event forwarder stopped");
                }
            })
            .map_err(|e| BusError::Thread(e.to_string()))?;
        Ok(Forwarder {
            xsub: xsub_bound,
            xpub: xpub_bound,
            control,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.control.send("TERMINATE", 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request/reply on the scaler's intake from a short-lived client (the CLI): a REQ socket
/// with send and receive timeouts, so an absent scaler is an error after `timeout`, not a hang.
/// Blocking: call it from `spawn_blocking`.
pub fn intake_request(
    ctx: &zmq::Context,
    endpoint: &str,
    payload: &[u8],
    timeout: std::time::Duration,
) -> Result<crate::protocol::IntakeReply, BusError> {
    let s = socket(ctx, zmq::REQ)?;
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    s.set_rcvtimeo(ms)?;
    s.set_sndtimeo(ms)?;
    s.set_linger(0)?;
    connect(&s, endpoint)?;
    s.send(payload, 0).map_err(|source| BusError::Zmq {
        op: "send to",
        endpoint: endpoint.to_string(),
        source,
    })?;
    let reply = s.recv_bytes(0).map_err(|source| BusError::Zmq {
        op: "receive from",
        endpoint: endpoint.to_string(),
        source,
    })?;
    serde_json::from_slice(&reply).map_err(|e| {
        BusError::BadReply(format!(
            "intake answered with something that is not a reply: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventBody, Origin, TaskReceived};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_flow_through_the_forwarder_and_filter_by_type() {
        let ctx = zmq::Context::new();
        let fwd = Forwarder::start(&ctx, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0").expect("fwd");
        let mut sub = subscriber(&ctx, &fwd.xpub, &["TaskReceived"]).expect("sub");
        let (publ, _h) = publisher(&ctx, &fwd.xsub).expect("pub");
        let o = Origin::new("w", "n");
        let wanted = o.event(
            None,
            EventBody::TaskReceived(TaskReceived {
                worker: "w".into(),
                attempt: 1,
            }),
        );
        let other = o.event(
            None,
            EventBody::TaskProgress(crate::events::TaskProgress { percent: 3 }),
        );
        // PUB/SUB drops messages until the subscription has propagated: keep publishing
        // until one arrives, bounded.
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                publ.publish(&other);
                publ.publish(&wanted);
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(100), sub.rx.recv()).await
                {
                    return m;
                }
            }
        })
        .await
        .expect("an event within 10 s");
        assert_eq!(got[0], b"TaskReceived");
        let ev: Event = serde_json::from_slice(&got[1]).expect("cloudevent");
        assert_eq!(ev.id, wanted.id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn router_dealer_round_trip_through_loops() {
        let ctx = zmq::Context::new();
        let router = socket(&ctx, zmq::ROUTER).expect("router");
        let ep = bind(&router, "tcp://127.0.0.1:0").expect("bind");
        let mut r = spawn_loop(&ctx, router, "router", 16).expect("loop");
        let dealer = socket(&ctx, zmq::DEALER).expect("dealer");
        connect(&dealer, &ep).expect("connect");
        let mut d = spawn_loop(&ctx, dealer, "dealer", 16).expect("loop");
        assert!(d.send(vec![b"hello".to_vec()]));
        let m = tokio::time::timeout(Duration::from_secs(5), r.rx.recv())
            .await
            .expect("in time")
            .expect("message");
        assert_eq!(m.len(), 2);
        assert_eq!(m[1], b"hello");
        assert!(r.send(vec![m[0].clone(), b"back".to_vec()]));
        let back = tokio::time::timeout(Duration::from_secs(5), d.rx.recv())
            .await
            .expect("in time")
            .expect("message");
        assert_eq!(back, vec![b"back".to_vec()]);
        // A reply to a peer that does not exist is counted, not fatal.
        assert!(r.send(vec![b"nobody".to_vec(), b"x".to_vec()]));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(r.stats.send_failures.load(Ordering::Relaxed), 1);
        d.close();
        r.close();
    }
}
