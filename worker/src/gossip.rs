//! The worker's gossip member: it joins the scaler's cluster (`membership.join`) with the tags
//! ARCHITECTURE §7 names, refreshes the cpu/mem tags from procfs, flips `state` to `draining`
//! when a drain starts, and leaves gracefully when the worker exits, so that a drain is never
//! taken for a failure. A `kill -9` skips the leave: that is what gossip detects.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use transcode_core::config::MembershipConfig;
use transcode_core::membership::{MemberTags, Membership, MembershipError, Settings};

/// How often the cpu/mem tags are refreshed.
const TAG_EVERY: Duration = Duration::from_secs(5);

pub struct Gossip {
    membership: Arc<Membership>,
}

/// CPU use as the 1-minute load per core, and memory use, both in percent; zero when procfs
/// cannot be read (not Linux, or a restricted container).
fn sample() -> (f64, f64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let cpu = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |l| (l / cores * 100.0).min(100.0));
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .map_or(0.0, |s| {
            let field = |name: &str| {
                s.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            };
            match (field("MemTotal:"), field("MemAvailable:")) {
                (Some(t), Some(a)) if t > 0.0 => (t - a) / t * 100.0,
                _ => 0.0,
            }
        });
    (cpu, mem)
}

impl Gossip {
    /// Starts the member and joins in the background; `draining` turning true re-tags it.
    pub async fn start(
        cfg: &MembershipConfig,
        id: &str,
        node: &str,
        slots: u32,
        mut draining: watch::Receiver<bool>,
    ) -> Result<Gossip, MembershipError> {
        let settings = Settings::from_config(cfg)?;
        let (cpu, mem) = sample();
        let mut tags = MemberTags {
            role: "worker".into(),
            node: node.into(),
            slots,
            busy: 0,
            cpu,
            mem,
            state: "active".into(),
        };
        let (membership, mut events) = Membership::start(id, &settings, tags.clone()).await?;
        let membership = Arc::new(membership);
        membership.join_in_background(settings.join.clone());
        // The scaler acts on membership events; the worker only needs to keep its queue empty.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let weak = Arc::downgrade(&membership);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TAG_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = draining.changed() => {
                        if r.is_err() { return; }
                    }
                }
                let Some(m) = weak.upgrade() else { return };
                let (cpu, mem) = sample();
                tags.cpu = cpu;
                tags.mem = mem;
                if *draining.borrow() {
                    tags.state = "draining".into();
                }
                if let Err(e) = m.set_tags(&tags).await {
                    tracing::debug!(error = %e, "gossip tags not updated");
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

#[cfg(test)]
mod tests {
    #[test]
    fn samples_are_percentages() {
        let (cpu, mem) = super::sample();
        assert!((0.0..=100.0).contains(&cpu), "{cpu}");
        assert!((0.0..=100.0).contains(&mem), "{mem}");
    }
}
