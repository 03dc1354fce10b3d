//! Gossip membership (ARCHITECTURE §7): a narrow wrapper over the `serf` crate (SWIM with
//! Lifeguard, tags, an AES-256-GCM keyring). It owns the gossip socket of one process, turns
//! Serf's member events into [`MembershipEvent`]s, and keeps a table of every member it has
//! seen with its state and the time of its last heartbeat. Nothing outside this module names a
//! `serf` type, so another SWIM implementation can replace it behind the same API.
//!
//! Heartbeats: Serf does not report individual probe acks, but every ack carries the peer's
//! network coordinate, which Serf caches per member. A cached coordinate that changed since
//! the last look means an ack came back from that member; the RTT is the coordinate estimate.

use crate::config::MembershipConfig;
use crate::events::MemberChange;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serf::event::{Event as SerfEvent, EventProducer, MemberEventType};
use serf::net::NetTransportOptions;
use serf::tokio::{TokioNetTransport, TokioSocketAddrResolver, TokioTcp, TokioTcpSerf};
use serf::types::SmolStr;
use serf::types::{MaybeResolvedAddress, MemberStatus, SecretKey, Tags};
use serf::{DefaultDelegate, MemberlistOptions, Options};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

type Transport = TokioNetTransport<SmolStr, TokioSocketAddrResolver, TokioTcp>;
type Serf = TokioTcpSerf<SmolStr, TokioSocketAddrResolver, DefaultDelegate<Transport>>;

/// Events buffered for the owner of a [`Membership`]; heartbeats are dropped (and counted by
/// the owner's metrics, not here) rather than stall gossip when the owner falls behind.
const EVENT_CAPACITY: usize = 4096;
/// First and longest pause between join attempts.
const JOIN_RETRY_MIN: Duration = Duration::from_millis(500);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("membership.{key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("gossip could not start on {bind}: {message}")]
    Start { bind: String, message: String },
    #[error(
        "gossip join to {addr} refused: the encryption key does not match the cluster's \
         (membership.encrypt_key): {message}"
    )]
    KeyMismatch { addr: String, message: String },
    #[error("gossip join to {addr} failed: {message}")]
    Join { addr: String, message: String },
}

/// What a member says about itself through gossip tags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberTags {
    /// `worker` or `scaler`.
    pub role: String,
    pub node: String,
    pub slots: u32,
    pub busy: u32,
    /// Smoothed CPU and memory use, percent.
    pub cpu: f64,
    pub mem: f64,
    /// `active` or `draining`.
    pub state: String,
}

impl MemberTags {
    fn to_serf(&self) -> Tags {
        [
            ("role", self.role.clone()),
            ("node", self.node.clone()),
            ("slots", self.slots.to_string()),
            ("busy", self.busy.to_string()),
            ("cpu", format!("{:.1}", self.cpu)),
            ("mem", format!("{:.1}", self.mem)),
            ("state", self.state.clone()),
        ]
        .into_iter()
        .collect()
    }

    /// Reads tags another member sent; anything missing or malformed reads as empty or zero,
    /// because a peer running a different version must not break the table.
    fn from_serf(tags: &Tags) -> MemberTags {
        let get = |k: &str| {
            tags.get(&SmolStr::new(k))
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        MemberTags {
            role: get("role"),
            node: get("node"),
            slots: get("slots").parse().unwrap_or(0),
            busy: get("busy").parse().unwrap_or(0),
            cpu: get("cpu").parse().unwrap_or(0.0),
            mem: get("mem").parse().unwrap_or(0.0),
            state: get("state"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    /// Missed probes; Lifeguard gives it a suspicion timeout to refute.
    Suspect,
    Failed,
    /// Left gracefully: not a failure.
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Failed => "failed",
            MemberState::Left => "left",
        }
    }
    pub const ALL: [MemberState; 4] = [
        MemberState::Alive,
        MemberState::Suspect,
        MemberState::Failed,
        MemberState::Left,
    ];
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    pub addr: SocketAddr,
    pub tags: MemberTags,
    pub state: MemberState,
    pub last_seen: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    Joined(MemberInfo),
    Updated(MemberInfo),
    Failed(MemberInfo),
    Left(MemberInfo),
    /// An ack came back from `member`.
    Heartbeat {
        member: String,
        rtt: Option<Duration>,
    },
    /// A batch of member updates was merged into the table.
    Merged {
        count: u32,
        changes: Vec<MemberChange>,
    },
}

/// The runtime form of [`MembershipConfig`], checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub advertise: Option<SocketAddr>,
    pub join: Vec<String>,
    pub key: Option<[u8; 32]>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, MembershipError> {
    s.parse().map_err(|e| MembershipError::Config {
        key,
        message: format!("{s:?} is not an IP:port address: {e}"),
    })
}

/// Decodes a key written as `serf keygen` prints it: base64 of 32 bytes.
pub fn decode_key(b64: &str) -> Result<[u8; 32], MembershipError> {
    let bad = |message: String| MembershipError::Config {
        key: "encrypt_key",
        message,
    };
    match b64.trim().parse::<SecretKey>() {
        Ok(SecretKey::Aes256(k)) => Ok(k),
        Ok(other) => Err(bad(format!(
            "expected base64 of 32 bytes (AES-256), found {} bytes",
            other.len()
        ))),
        Err(e) => Err(bad(format!("expected base64 of 32 bytes: {e}"))),
    }
}

impl Settings {
    pub fn from_config(cfg: &MembershipConfig) -> Result<Settings, MembershipError> {
        let bind = parse_addr("bind", cfg.bind.as_deref().unwrap_or("127.0.0.1:0"))?;
        let advertise = cfg
            .advertise
            .as_deref()
            .map(|a| parse_addr("advertise", a))
            .transpose()?;
        let key = cfg.encrypt_key.as_deref().map(decode_key).transpose()?;
        Ok(Settings {
            bind,
            advertise,
            join: cfg.join.clone(),
            key,
            probe_interval: Duration::from_millis(cfg.probe_interval_ms),
            probe_timeout: Duration::from_millis(cfg.probe_timeout_ms),
        })
    }
}

/// What the poller remembers about a member between looks.
#[derive(Debug, Clone)]
struct Seen {
    info: MemberInfo,
    /// The peer's coordinate at the last look, to spot a fresh ack.
    coord: Option<(f64, f64, f64)>,
}

type Table = Arc<Mutex<HashMap<String, Seen>>>;

/// One process's gossip membership. Dropping it does not leave the cluster: call
/// [`Membership::leave`] for a graceful exit (a drain), or [`Membership::shutdown`].
pub struct Membership {
    serf: Serf,
    id: String,
    addr: SocketAddr,
    table: Table,
    stop: watch::Sender<bool>,
}

fn lock(t: &Table) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
    // A panic while holding the table leaves plain data behind; keep using it.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn state_of(s: &MemberStatus) -> MemberState {
    match s {
        MemberStatus::Failed => MemberState::Failed,
        MemberStatus::Left | MemberStatus::Leaving => MemberState::Left,
        _ => MemberState::Alive,
    }
}

impl Membership {
    /// Binds the gossip socket and starts the event and heartbeat loops. Joining happens in
    /// the background (see [`Membership::join`]), so a member may start before its seeds.
    pub async fn start(
        id: &str,
        s: &Settings,
        tags: MemberTags,
    ) -> Result<(Membership, mpsc::Receiver<MembershipEvent>), MembershipError> {
        let mut topts = NetTransportOptions::<SmolStr, TokioSocketAddrResolver, TokioTcp>::new(
            SmolStr::new(id),
        );
        topts.add_bind_address(s.bind);
        if let Some(a) = s.advertise {
            topts = topts.with_advertise_address(a);
        }
        let mut ml = MemberlistOptions::lan()
            .with_probe_interval(s.probe_interval)
            .with_probe_timeout(s.probe_timeout)
            // A worker restarted under the same id binds a new ephemeral port. Memberlist
            // refuses a known name at a new address unless the old one has been dead this
            // long (default: never, until reaped an hour later), so without this the restart
            // would stay outside the cluster.
            .with_dead_node_reclaim_time(s.probe_interval);
        if let Some(k) = s.key {
            ml = ml
                .with_primary_key(SecretKey::Aes256(k))
                .with_gossip_verify_incoming(true)
                .with_gossip_verify_outgoing(true)
                .with_encryption_algo(Default::default());
        }
        let opts = Options::new()
            .with_memberlist_options(ml)
            // A failed member is forgotten after this long; a restart under the same id
            // reclaims its name sooner (dead_node_reclaim_time above).
            .with_reconnect_timeout(Duration::from_secs(3600))
            .with_tags(tags.to_serf().into_iter());
        let (producer, subscriber) = EventProducer::bounded(EVENT_CAPACITY);
        let serf = Serf::with_event_producer(topts, opts, producer)
            .await
            .map_err(|e| MembershipError::Start {
                bind: s.bind.to_string(),
                message: e.to_string(),
            })?;
        let addr = *serf.advertise_node().address();
        let table: Table = Arc::new(Mutex::new(HashMap::new()));
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(event_loop(
            subscriber,
            table.clone(),
            tx.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(heartbeat_loop(
            serf.clone(),
            id.to_string(),
            table.clone(),
            tx,
            s.probe_interval,
            stop_rx,
        ));
        tracing::info!(member = id, gossip = %addr, encrypted = s.key.is_some(), "gossip started");
        Ok((
            Membership {
                serf,
                id: id.to_string(),
                addr,
                table,
                stop,
            },
            rx,
        ))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address other members reach this one at (the bound port when `bind` said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Tries each address once; returns how many answered. A key mismatch gets its own error
    /// so that the operator sees the cause, not a timeout.
    pub async fn join(&self, addrs: &[String]) -> Result<usize, MembershipError> {
        let mut joined = 0;
        let mut last = None;
        for a in addrs {
            // A name (a Consul service, say) is looked up on every try, so a join retried in
            // the background follows the scaler to a new address.
            let sa = match a.parse::<SocketAddr>() {
                Ok(sa) => sa,
                Err(_) => match tokio::net::lookup_host(a.as_str()).await {
                    // Our own address family first (`localhost` may list ::1 before 127.0.0.1).
                    Ok(found) => match found.min_by_key(|sa| sa.is_ipv4() != self.addr.is_ipv4()) {
                        Some(sa) => sa,
                        None => {
                            last = Some(MembershipError::Config {
                                key: "join",
                                message: format!("{a:?}: the name has no address"),
                            });
                            continue;
                        }
                    },
                    Err(e) => {
                        last = Some(MembershipError::Config {
                            key: "join",
                            message: format!("{a:?}: {e}"),
                        });
                        continue;
                    }
                },
            };
            match self
                .serf
                .join(MaybeResolvedAddress::Resolved(sa), false)
                .await
            {
                Ok(_) => joined += 1,
                Err(e) => {
                    let message = e.to_string();
                    last = Some(
                        if message.contains("decrypt") || message.contains("encrypt") {
                            MembershipError::KeyMismatch {
                                addr: a.clone(),
                                message,
                            }
                        } else {
                            MembershipError::Join {
                                addr: a.clone(),
                                message,
                            }
                        },
                    );
                }
            }
        }
        match (joined, last) {
            (0, Some(e)) => Err(e),
            (n, _) => Ok(n),
        }
    }

    /// Joins in the background, retrying with backoff until one seed answers. Each failure is
    /// logged; a key mismatch at ERROR, since retrying will not fix it.
    pub fn join_in_background(self: &Arc<Self>, addrs: Vec<String>) {
        if addrs.is_empty() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut pause = JOIN_RETRY_MIN;
            loop {
                let Some(m) = me.upgrade() else { return };
                if *m.stop.borrow() {
                    return;
                }
                match m.join(&addrs).await {
                    Ok(n) => {
                        tracing::info!(joined = n, seeds = ?addrs, "joined the gossip cluster");
                        return;
                    }
                    Err(e @ MembershipError::KeyMismatch { .. }) => {
                        tracing::error!(error = %e, "cannot join the gossip cluster");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?pause, "gossip join failed; retrying");
                    }
                }
                drop(m);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(JOIN_RETRY_MAX);
            }
        });
    }

    /// Replaces this member's tags; gossip spreads them.
    pub async fn set_tags(&self, tags: &MemberTags) -> Result<(), MembershipError> {
        self.serf
            .set_tags(tags.to_serf())
            .await
            .map_err(|e| MembershipError::Start {
                bind: self.addr.to_string(),
                message: format!("set_tags: {e}"),
            })
    }

    /// Every member this one knows, itself included.
    pub fn members(&self) -> Vec<MemberInfo> {
        let mut v: Vec<MemberInfo> = lock(&self.table).values().map(|s| s.info.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Leaves gracefully: the others see `Left`, not `Failed`, so nothing is recovered.
    pub async fn leave(&self) {
        if let Err(e) = self.serf.leave().await {
            tracing::warn!(error = %e, "gossip leave did not complete");
        }
        self.shutdown().await;
    }

    /// Stops gossiping without a goodbye.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.serf.shutdown().await {
            tracing::debug!(error = %e, "gossip shutdown");
        }
    }
}

async fn event_loop(
    sub: serf::event::EventSubscriber<Transport, DefaultDelegate<Transport>>,
    table: Table,
    tx: mpsc::Sender<MembershipEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let ev = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            ev = sub.recv() => match ev { Ok(ev) => ev, Err(_) => return },
        };
        let SerfEvent::Member(me) = ev else { continue };
        let ty = me.ty();
        let mut out = Vec::new();
        let mut changes = Vec::new();
        {
            let mut t = lock(&table);
            for m in me.members() {
                let id = m.node().id().to_string();
                let state = match ty {
                    MemberEventType::Failed => MemberState::Failed,
                    MemberEventType::Leave | MemberEventType::Reap => MemberState::Left,
                    _ => state_of(m.status()),
                };
                let info = MemberInfo {
                    id: id.clone(),
                    addr: *m.node().address(),
                    tags: MemberTags::from_serf(m.tags()),
                    state,
                    last_seen: Utc::now(),
                };
                let prev = t.get(&id).map(|s| s.info.state);
                // A failed or left member keeps its last heartbeat time.
                let last_seen = match (state, t.get(&id)) {
                    (MemberState::Failed | MemberState::Left, Some(s)) => s.info.last_seen,
                    _ => info.last_seen,
                };
                let info = MemberInfo { last_seen, ..info };
                if prev != Some(state) {
                    changes.push(MemberChange {
                        member: id.clone(),
                        from: prev.map(|p| p.to_string()),
                        to: state.to_string(),
                    });
                }
                let coord = t.get(&id).and_then(|s| s.coord);
                t.insert(
                    id,
                    Seen {
                        info: info.clone(),
                        coord,
                    },
                );
                out.push(match ty {
                    MemberEventType::Join => MembershipEvent::Joined(info),
                    MemberEventType::Failed => MembershipEvent::Failed(info),
                    MemberEventType::Leave | MemberEventType::Reap => MembershipEvent::Left(info),
                    _ => MembershipEvent::Updated(info),
                });
            }
        }
        let count = out.len() as u32;
        for e in out {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        if tx
            .send(MembershipEvent::Merged { count, changes })
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn heartbeat_loop(
    serf: Serf,
    me: String,
    table: Table,
    tx: mpsc::Sender<MembershipEvent>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = ticker.tick() => {}
        }
        let ours = serf.cooridate().ok();
        // Suspicion lives in memberlist's table, below Serf's alive/failed view.
        let suspects: Vec<String> = serf
            .memberlist()
            .members()
            .await
            .iter()
            .filter(|n| n.state().to_string() == "suspect")
            .map(|n| n.id().to_string())
            .collect();
        let ids: Vec<String> = lock(&table).keys().cloned().collect();
        let mut beats = Vec::new();
        for id in ids {
            let coord = if id == me {
                None
            } else {
                serf.cached_coordinate(&SmolStr::new(&id)).ok().flatten()
            };
            let mut t = lock(&table);
            let Some(seen) = t.get_mut(&id) else { continue };
            if id == me {
                seen.info.last_seen = Utc::now();
            }
            let suspect = suspects.contains(&id);
            match (seen.info.state, suspect) {
                (MemberState::Alive, true) => seen.info.state = MemberState::Suspect,
                (MemberState::Suspect, false) => seen.info.state = MemberState::Alive,
                _ => {}
            }
            let Some(c) = coord else { continue };
            let key = (c.adjustment, c.error, c.height);
            if seen.coord != Some(key) && seen.info.state != MemberState::Failed {
                seen.coord = Some(key);
                seen.info.last_seen = Utc::now();
                let rtt = ours.as_ref().map(|o| o.distance_to(&c));
                beats.push(MembershipEvent::Heartbeat {
                    member: id.clone(),
                    rtt,
                });
            }
        }
        for b in beats {
            // Heartbeats are advisory: a full channel drops them rather than stall gossip.
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(b) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(key: Option<[u8; 32]>) -> Settings {
        Settings {
            bind: "127.0.0.1:0".parse().expect("addr"),
            advertise: None,
            join: Vec::new(),
            key,
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(100),
        }
    }

    fn tags(role: &str) -> MemberTags {
        MemberTags {
            role: role.into(),
            node: "n1".into(),
            slots: 2,
            busy: 1,
            cpu: 12.5,
            mem: 40.0,
            state: "active".into(),
        }
    }

    async fn until<F: FnMut(&MembershipEvent) -> bool>(
        rx: &mut mpsc::Receiver<MembershipEvent>,
        mut f: F,
    ) -> MembershipEvent {
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("event in time")
                .expect("channel open");
            if f(&ev) {
                return ev;
            }
        }
    }

    #[test]
    fn keys_decode_like_serf_keygen() {
        let k = decode_key("T9jncgl9mbLus+baTTa7q7nPSUrXwbDi2dhbtqir37s=").expect("valid");
        assert_eq!(k.len(), 32);
        let err = decode_key("c2hvcnQ=").expect_err("short");
        assert!(err.to_string().contains("32 bytes"), "{err}");
        assert!(decode_key("not base64!").is_err());
    }

    #[test]
    fn tags_round_trip() {
        let t = tags("worker");
        assert_eq!(MemberTags::from_serf(&t.to_serf()), t);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_address_may_be_a_host_name() {
        let (a, _arx) = Membership::start("a", &settings(None), tags("scaler"))
            .await
            .expect("a");
        let (b, _brx) = Membership::start("b", &settings(None), tags("worker"))
            .await
            .expect("b");
        let by_name = vec![format!("localhost:{}", a.local_addr().port())];
        assert_eq!(b.join(&by_name).await.expect("joins by name"), 1);
        let err = b
            .join(&["no-such-host.invalid:7946".to_string()])
            .await
            .expect_err("an unknown name");
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
        a.leave().await;
        b.leave().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn join_tags_heartbeat_failure_and_leave() {
        let (a, mut arx) = Membership::start("a", &settings(None), tags("scaler"))
            .await
            .expect("a");
        let (b, _brx) = Membership::start("b", &settings(None), tags("worker"))
            .await
            .expect("b");
        let (c, _crx) = Membership::start("c", &settings(None), tags("worker"))
            .await
            .expect("c");
        let seed = vec![a.local_addr().to_string()];
        assert_eq!(b.join(&seed).await.expect("b joins"), 1);
        assert_eq!(c.join(&seed).await.expect("c joins"), 1);
        until(
            &mut arx,
            |e| matches!(e, MembershipEvent::Joined(m) if m.id == "c"),
        )
        .await;
        until(
            &mut arx,
            |e| matches!(e, MembershipEvent::Heartbeat { member, .. } if member == "b"),
        )
        .await;
        let mut busy = tags("worker");
        busy.busy = 2;
        b.set_tags(&busy).await.expect("tags");
        until(
            &mut arx,
            |e| matches!(e, MembershipEvent::Updated(m) if m.id == "b" && m.tags.busy == 2),
        )
        .await;
        // c vanishes without a goodbye: a failure. b says goodbye: not a failure.
        c.shutdown().await;
        let failed = until(&mut arx, |e| matches!(e, MembershipEvent::Failed(_))).await;
        assert!(matches!(failed, MembershipEvent::Failed(m) if m.id == "c"));
        b.leave().await;
        let left = until(&mut arx, |e| {
            matches!(e, MembershipEvent::Left(_) | MembershipEvent::Failed(_))
        })
        .await;
        assert!(
            matches!(&left, MembershipEvent::Left(m) if m.id == "b"),
            "{left:?}"
        );
        let states: Vec<(String, MemberState)> =
            a.members().into_iter().map(|m| (m.id, m.state)).collect();
        assert!(
            states.contains(&("c".into(), MemberState::Failed)),
            "{states:?}"
        );
        assert!(
            states.contains(&("b".into(), MemberState::Left)),
            "{states:?}"
        );
        a.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_key_cannot_join_and_says_so() {
        let (a, _arx) = Membership::start("a", &settings(Some([7; 32])), tags("scaler"))
            .await
            .expect("a");
        let (b, _brx) = Membership::start("b", &settings(Some([8; 32])), tags("worker"))
            .await
            .expect("b");
        let err = b
            .join(&[a.local_addr().to_string()])
            .await
            .expect_err("must not join");
        assert!(matches!(err, MembershipError::KeyMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("encryption key does not match"),
            "{err}"
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}
