//! The worker's gossip member: it joins the scaler's cluster (`membership.join`) with the tags
//! ARCHITECTURE §7 names, refreshes the cpu/mem tags from `transcode_core::utilization` and
//! `busy` from the dispatch client's running count, flips `state` to `draining`
//! when a drain starts, and leaves gracefully when the worker exits, so that a drain is never
//! taken for a failure. A `kill -9` skips the leave: that is what gossip detects.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use transcode_core::config::{MembershipConfig, UtilizationConfig};
use transcode_core::membership::{MemberTags, Membership, MembershipError, Settings};
use transcode_core::metrics::{Kind, Registry};
use transcode_core::utilization::{Sampler, Source};

const CPU: &str = "transcode_utilization_cpu_percent";
const MEM: &str = "transcode_utilization_mem_percent";

pub struct Gossip {
    membership: Arc<Membership>,
}

/// What the worker tells its member as it runs: how many tasks it holds (the `busy` tag) and
/// whether a drain has started (the `state` tag).
pub struct Live {
    pub busy: Arc<AtomicU32>,
    pub draining: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Utilization(#[from] transcode_core::utilization::UtilizationError),
}

impl Gossip {
    /// Starts the member and joins in the background; `draining` turning true re-tags it.
    ///
    /// Utilization is sampled every `utilization.sample_interval_ms` into the smoothed value
    /// (and the `/metrics` gauges), and published in the tags at most every
    /// `utilization.publish_interval_ms`, so a fast sampler cannot flood the gossip layer.
    pub async fn start(
        cfg: &MembershipConfig,
        util: &UtilizationConfig,
        metrics: Arc<Registry>,
        id: &str,
        node: &str,
        slots: u32,
        live: Live,
    ) -> Result<Gossip, GossipError> {
        let Live { busy, mut draining } = live;
        let settings = Settings::from_config(cfg)?;
        let mut sampler = Sampler::new(Source::parse(&util.source)?, node, util.smoothing);
        metrics.describe(
            CPU,
            Kind::Gauge,
            "Smoothed CPU use of this worker's node or cgroup, percent.",
        );
        metrics.describe(
            MEM,
            Kind::Gauge,
            "Smoothed memory use of this worker's node or cgroup, percent.",
        );
        // A synthetic file that cannot be read yet is not fatal: the tags start at zero.
        let first = sampler.sample().unwrap_or_default();
        let mut tags = MemberTags {
            role: "worker".into(),
            node: node.into(),
            slots,
            busy: 0,
            cpu: first.cpu,
            mem: first.mem,
            state: "active".into(),
        };
        let (membership, mut events) = Membership::start(id, &settings, tags.clone()).await?;
        let membership = Arc::new(membership);
        membership.join_in_background(settings.join.clone());
        // The scaler acts on membership events; the worker only needs to keep its queue empty.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let weak = Arc::downgrade(&membership);
        let sample_every = Duration::from_millis(util.sample_interval_ms.max(10));
        let publish_every = Duration::from_millis(util.publish_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sample_every);
            let mut published = tokio::time::Instant::now();
            let mut last: Option<MemberTags> = None;
            loop {
                let mut state_changed = false;
                tokio::select! {
                    _ = tick.tick() => {}
                    r = draining.changed() => {
                        if r.is_err() { return; }
                        state_changed = true;
                    }
                }
                let Some(m) = weak.upgrade() else { return };
                match sampler.sample() {
                    Ok(u) => {
                        metrics.set(CPU, &[], u.cpu);
                        metrics.set(MEM, &[], u.mem);
                        tags.cpu = u.cpu;
                        tags.mem = u.mem;
                    }
                    Err(e) => tracing::warn!(error = %e, "utilization sample failed"),
                }
                if *draining.borrow() {
                    tags.state = "draining".into();
                }
                // A change in load is news for the scheduler's view; publish it at once.
                let now_busy = busy.load(Ordering::Relaxed);
                if now_busy != tags.busy {
                    tags.busy = now_busy;
                    state_changed = true;
                }
                if !state_changed && published.elapsed() < publish_every {
                    continue;
                }
                // Every tag update is a gossip broadcast to the whole cluster; an unchanged
                // set (to the precision peers see) is not worth one.
                let rounded = |v: f64| (v * 10.0).round() / 10.0;
                let mut seen = tags.clone();
                seen.cpu = rounded(seen.cpu);
                seen.mem = rounded(seen.mem);
                if last.as_ref() == Some(&seen) {
                    continue;
                }
                published = tokio::time::Instant::now();
                match m.set_tags(&tags).await {
                    Ok(()) => last = Some(seen),
                    Err(e) => tracing::debug!(error = %e, "gossip tags not updated"),
                }
            }
        });
        Ok(Gossip { membership })
    }

    /// Leaves the cluster gracefully (the drain is over).
    pub async fn leave(&self) {
        self.membership.leave().await;
    }
}
