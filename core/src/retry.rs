//! The retry policy for object transfers (ARCHITECTURE §1: "retry+backoff on error"): how many
//! times an operation is tried, how long to wait between tries, and which errors are worth
//! another try at all. It owns the `retry { pull { … } push { … } }` config block, the delay
//! computation (exponential with a cap and jitter), the sorting of errors into transient,
//! integrity and permanent classes, and a small async loop, [`run`], that applies all three and
//! reports each retry to the caller before it sleeps (so the caller can log an event first).
//!
//! Why not the `backon` crate: its jitter adds a random `[0, d)` on top of the delay, which is
//! neither "full" nor "equal" jitter and lets a delay overshoot the configured maximum by up to
//! 2x; and its notify hook is synchronous, while every retry here must first be written to the
//! database (an awaited, fenced write that may itself fail and stop the task). The computation
//! is twenty lines and is tested below against tokio's paused clock.
//!
//! Jitter: **equal jitter** by default. The delay before retry `n` (1-based) is
//! `d = min(max_delay, base_delay × multiplier^(n-1))`, and the wait is drawn uniformly from
//! `[d/2, d)`. Half the delay is kept so a failing server is never hammered (full jitter can
//! draw ~0), and half is random so a fleet of workers that failed together does not retry in
//! lock-step. With the default multiplier of 2 the ranges of successive retries do not overlap,
//! so waits strictly increase until the cap is reached. `full` draws from `[0, d)`; `none`
//! waits exactly `d`.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::objects::ObjectError;

/// How the random part of a delay is drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Uniform in `[d/2, d)`.
    #[default]
    Equal,
    /// Uniform in `[0, d)`.
    Full,
    /// Exactly `d` (tests, or a single worker where lock-step does not matter).
    None,
}

impl Jitter {
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Equal => "equal",
            Jitter::Full => "full",
            Jitter::None => "none",
        }
    }
}

/// The policy for one operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Tries in all, the first included: 5 means up to 4 retries.
    pub max_attempts: u32,
    /// The nominal delay before the first retry.
    pub base_delay_ms: u64,
    /// Each retry's nominal delay is the previous one times this.
    pub multiplier: f64,
    /// No nominal delay exceeds this.
    pub max_delay_ms: u64,
    pub jitter: Jitter,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 500,
            multiplier: 2.0,
            max_delay_ms: 30_000,
            jitter: Jitter::Equal,
        }
    }
}

/// The `retry` block of the config: one policy per operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Downloading the source.
    pub pull: RetryPolicy,
    /// Uploading renditions and the manifest (and checking earlier uploads on a resume).
    pub push: RetryPolicy,
}

impl RetryPolicy {
    /// The delay before retry `retry` (1-based) with no jitter: the exponential curve, capped.
    pub fn nominal_delay(&self, retry: u32) -> Duration {
        let base = self.base_delay_ms as f64;
        let cap = self.max_delay_ms as f64;
        // Exponents past ~1000 overflow to infinity, which min() then caps; NaN (a multiplier
        // of 0 would need a negative exponent, which cannot happen) is guarded anyway.
        let exp = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = base * self.multiplier.max(1.0).powi(exp);
        let ms = if raw.is_finite() { raw.min(cap) } else { cap };
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The delay before retry `retry` for a random draw `unit` in `[0, 1)`. Whole milliseconds,
    /// so what an event reports is exactly what was slept.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let d = self.nominal_delay(retry).as_millis() as f64;
        let unit = unit.clamp(0.0, 1.0);
        let ms = match self.jitter {
            Jitter::None => d,
            Jitter::Full => (d * unit).floor(),
            Jitter::Equal => (d / 2.0 + (d / 2.0) * unit).floor(),
        };
        // floor() keeps Equal below d for any unit < 1; a unit of exactly 1 is clamped into
        // the range's top.
        Duration::from_millis(ms.min(d) as u64)
    }

    /// The waits of one run of retries, drawn with a seeded generator so tests can replay them.
    pub fn schedule(&self, seed: u64) -> Vec<Duration> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (1..self.max_attempts)
            .map(|n| self.delay(n, rng.f64()))
            .collect()
    }
}

/// What another try can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May pass by itself: 5xx, 429, timeouts, reset or refused connections, truncated bodies.
    Transient,
    /// The bytes did not match their checksum: the transfer is redone once from the start
    /// ("a full retry"); a second mismatch means the stored object itself is bad, and that is
    /// permanent.
    Integrity,
    /// Trying again cannot help: 404, 403, bad credentials or key, a full local disk.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Integrity => "integrity",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// An error the retry loop can sort.
pub trait Classify: std::fmt::Display {
    fn class(&self) -> ErrorClass;
    /// A stable snake_case name for the specific error, reported in events (`unreachable`,
    /// `transient`, `not_found`, …).
    fn code(&self) -> &str;
}

impl Classify for ObjectError {
    fn class(&self) -> ErrorClass {
        if self.is_transient() {
            ErrorClass::Transient
        } else if matches!(self, ObjectError::ChecksumMismatch { .. }) {
            ErrorClass::Integrity
        } else {
            // NotFound, PermissionDenied, LocalIo (a full disk among them), TooLarge, Config
            // and Other: none of them changes by waiting. Unclassified server answers (Other,
            // e.g. a 400) are permanent on purpose: an operator should look rather than the
            // worker repeating a request the server called malformed.
            ErrorClass::Permanent
        }
    }

    fn code(&self) -> &str {
        ObjectError::code(self)
    }
}

/// One retry about to happen, as the caller's `on_retry` hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retrying {
    /// The attempt that failed (1-based); the next one is `attempt + 1`.
    pub attempt: u32,
    /// How long the loop will sleep before the next attempt.
    pub delay: Duration,
    /// The error's [`Classify::code`].
    pub code: String,
    pub class: ErrorClass,
    pub message: String,
}

/// Why [`run`] gave up.
#[derive(Debug)]
pub enum GaveUp<E, A> {
    /// The operation failed for good. `exhausted` is true when the attempts ran out (the last
    /// error was still worth retrying), false when the error was not worth retrying at all.
    Failed {
        error: E,
        attempts: u32,
        exhausted: bool,
    },
    /// The `on_retry` hook refused to go on (for example the task's lease was lost).
    Aborted(A),
}

/// Runs `op` under `policy`. `op` gets the attempt number (1-based). Before every sleep,
/// `on_retry` is awaited with what is about to happen; if it fails, the loop stops with
/// [`GaveUp::Aborted`] without sleeping. Sleeps are `tokio::time::sleep`, so they yield to the
/// runtime (a lease renewer keeps running) and follow a paused clock in tests.
pub async fn run<T, E, A, Op, OpFut, N, NFut>(
    policy: &RetryPolicy,
    mut op: Op,
    mut on_retry: N,
) -> Result<T, GaveUp<E, A>>
where
    E: Classify,
    Op: FnMut(u32) -> OpFut,
    OpFut: Future<Output = Result<T, E>>,
    N: FnMut(Retrying) -> NFut,
    NFut: Future<Output = Result<(), A>>,
{
    let mut rng = fastrand::Rng::new();
    let max = policy.max_attempts.max(1);
    let mut integrity_retried = false;
    let mut attempt = 1u32;
    loop {
        let error = match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let class = error.class();
        let retryable = match class {
            ErrorClass::Transient => true,
            ErrorClass::Integrity => !integrity_retried,
            ErrorClass::Permanent => false,
        };
        if !retryable || attempt >= max {
            return Err(GaveUp::Failed {
                error,
                attempts: attempt,
                exhausted: retryable,
            });
        }
        if class == ErrorClass::Integrity {
            integrity_retried = true;
        }
        let delay = policy.delay(attempt, rng.f64());
        on_retry(Retrying {
            attempt,
            delay,
            code: error.code().to_string(),
            class,
            message: error.to_string(),
        })
        .await
        .map_err(GaveUp::Aborted)?;
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[derive(Debug, Clone)]
    struct TestError(ErrorClass);

    impl std::fmt::Display for TestError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "test error ({})", self.0.as_str())
        }
    }

    impl Classify for TestError {
        fn class(&self) -> ErrorClass {
            self.0
        }
        fn code(&self) -> &str {
            self.0.as_str()
        }
    }

    fn policy(max_attempts: u32, jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            jitter,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let p = RetryPolicy::default();
        assert_eq!(
            (p.max_attempts, p.base_delay_ms, p.max_delay_ms, p.jitter),
            (5, 500, 30_000, Jitter::Equal)
        );
        assert!((p.multiplier - 2.0).abs() < f64::EPSILON);
    }

    #[test]
    fn nominal_delays_grow_exponentially_up_to_the_cap() {
        let p = RetryPolicy::default();
        let got: Vec<u64> = (1..=9)
            .map(|n| p.nominal_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
        // Absurd retry numbers stay at the cap instead of overflowing.
        assert_eq!(p.nominal_delay(u32::MAX), ms(30_000));
        let slow = RetryPolicy {
            multiplier: 1.5,
            base_delay_ms: 100,
            ..RetryPolicy::default()
        };
        assert_eq!(slow.nominal_delay(3), ms(225));
    }

    #[test]
    fn jitter_bounds() {
        let equal = policy(5, Jitter::Equal);
        let full = policy(5, Jitter::Full);
        let none = policy(5, Jitter::None);
        for n in 1..=8 {
            let d = equal.nominal_delay(n);
            assert_eq!(equal.delay(n, 0.0), d / 2);
            assert!(equal.delay(n, 0.999_999) < d);
            assert_eq!(full.delay(n, 0.0), Duration::ZERO);
            assert!(full.delay(n, 0.999_999) < d);
            assert_eq!(none.delay(n, 0.3), d);
            // Out-of-range draws cannot push a wait past the nominal delay.
            assert!(equal.delay(n, 7.0) <= d);
        }
    }

    #[test]
    fn equal_jitter_waits_strictly_increase_below_the_cap() {
        let p = RetryPolicy {
            max_attempts: 7,
            ..RetryPolicy::default()
        };
        for seed in 0..500 {
            let s = p.schedule(seed);
            assert_eq!(s.len(), 6);
            // 500·2^5 = 16 s is still below the 30 s cap, so all six must rise.
            assert!(s.windows(2).all(|w| w[0] < w[1]), "seed {seed}: {s:?}");
        }
    }

    /// Runs `run` on the paused clock with an op that fails with `errors` in turn and then
    /// succeeds; returns the result, the retries seen, the attempts made and the virtual time.
    async fn drive(
        p: &RetryPolicy,
        errors: Vec<ErrorClass>,
    ) -> (
        Result<u32, GaveUp<TestError, ()>>,
        Vec<Retrying>,
        u32,
        Duration,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(0u32));
        let start = Instant::now();
        let result = run(
            p,
            |attempt| {
                let errors = errors.clone();
                let calls = calls.clone();
                async move {
                    *calls.lock().expect("lock") += 1;
                    match errors.get(attempt as usize - 1) {
                        Some(c) => Err(TestError(*c)),
                        None => Ok(attempt),
                    }
                }
            },
            |r| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("lock").push(r);
                    Ok::<(), ()>(())
                }
            },
        )
        .await;
        let retries = seen.lock().expect("lock").clone();
        let n = *calls.lock().expect("lock");
        (result, retries, n, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn two_transient_errors_then_success_sleeps_exactly_the_reported_delays() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 500,
            ..RetryPolicy::default()
        };
        let (res, retries, calls, elapsed) =
            drive(&p, vec![ErrorClass::Transient, ErrorClass::Transient]).await;
        assert_eq!(res.ok(), Some(3));
        assert_eq!(calls, 3);
        assert_eq!(retries.len(), 2);
        assert_eq!(retries[0].attempt, 1);
        assert_eq!(retries[1].attempt, 2);
        assert_eq!(retries[0].code, "transient");
        // Equal jitter: [250, 500) then [500, 1000).
        assert!((ms(250)..ms(500)).contains(&retries[0].delay));
        assert!((ms(500)..ms(1000)).contains(&retries[1].delay));
        // The paused clock moves only by the sleeps, so the run took exactly their sum.
        assert_eq!(elapsed, retries[0].delay + retries[1].delay);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_after_max_attempts() {
        let p = policy(4, Jitter::None);
        let (res, retries, calls, elapsed) = drive(&p, vec![ErrorClass::Transient; 10]).await;
        match res {
            Err(GaveUp::Failed {
                attempts,
                exhausted,
                ..
            }) => {
                assert_eq!(attempts, 4);
                assert!(exhausted);
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
        assert_eq!(calls, 4);
        let delays: Vec<Duration> = retries.iter().map(|r| r.delay).collect();
        assert_eq!(delays, [ms(500), ms(1000), ms(2000)]);
        assert_eq!(elapsed, ms(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let p = policy(5, Jitter::None);
        let (res, retries, calls, elapsed) = drive(&p, vec![ErrorClass::Permanent]).await;
        assert!(matches!(
            res,
            Err(GaveUp::Failed {
                attempts: 1,
                exhausted: false,
                ..
            })
        ));
        assert!(retries.is_empty());
        assert_eq!(calls, 1);
        assert_eq!(elapsed, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_checksum_mismatch_gets_one_full_retry_then_is_permanent() {
        let p = policy(5, Jitter::None);
        let (ok, retries, _, _) = drive(&p, vec![ErrorClass::Integrity]).await;
        assert_eq!(ok.ok(), Some(2));
        assert_eq!(retries.len(), 1);
        let (res, retries, calls, _) =
            drive(&p, vec![ErrorClass::Integrity, ErrorClass::Integrity]).await;
        assert!(matches!(
            res,
            Err(GaveUp::Failed {
                attempts: 2,
                exhausted: false,
                ..
            })
        ));
        assert_eq!((retries.len(), calls), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_hook_stops_before_sleeping() {
        let p = policy(5, Jitter::None);
        let start = Instant::now();
        let res: Result<(), GaveUp<TestError, &str>> = run(
            &p,
            |_| async { Err(TestError(ErrorClass::Transient)) },
            |_| async { Err("lease lost") },
        )
        .await;
        assert!(matches!(res, Err(GaveUp::Aborted("lease lost"))));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn sleeping_does_not_starve_other_tasks() {
        // Stands in for the lease renewer: it must tick all through a long backoff.
        let ticks = Arc::new(Mutex::new(0u32));
        let renewer = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(ms(100));
                loop {
                    every.tick().await;
                    *ticks.lock().expect("lock") += 1;
                }
            })
        };
        let p = policy(3, Jitter::None);
        let (_, _, _, elapsed) = drive(&p, vec![ErrorClass::Transient; 3]).await;
        renewer.abort();
        assert_eq!(elapsed, ms(1500));
        let n = *ticks.lock().expect("lock");
        assert!(n >= 15, "renewer ticked {n} times in 1.5 s of backoff");
    }

    #[test]
    fn object_errors_are_classified() {
        let cases = [
            (
                ObjectError::Transient {
                    url: "s3://b/k".into(),
                    message: "503".into(),
                },
                ErrorClass::Transient,
            ),
            (
                ObjectError::Unreachable {
                    url: "s3://b/k".into(),
                    source: "connection refused".into(),
                },
                ErrorClass::Transient,
            ),
            (
                ObjectError::NotFound {
                    url: "s3://b/k".into(),
                },
                ErrorClass::Permanent,
            ),
            (
                ObjectError::PermissionDenied {
                    url: "s3://b/k".into(),
                    message: "403".into(),
                },
                ErrorClass::Permanent,
            ),
            (
                ObjectError::LocalIo {
                    path: "/scratch/x".into(),
                    source: std::io::Error::from(std::io::ErrorKind::StorageFull),
                },
                ErrorClass::Permanent,
            ),
            (
                ObjectError::Other {
                    url: "s3://b/k".into(),
                    message: "key not usable".into(),
                },
                ErrorClass::Permanent,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(Classify::class(&e), class, "{e}");
            assert_eq!(Classify::code(&e), e.code());
        }
    }

    #[test]
    fn config_block_deserializes_with_defaults() {
        let c: RetryConfig = serde_json::from_value(serde_json::json!({
            "pull": {"max_attempts": 2, "jitter": "full"},
            "push": {"base_delay_ms": 50, "multiplier": 1.5}
        }))
        .expect("valid");
        assert_eq!(c.pull.max_attempts, 2);
        assert_eq!(c.pull.jitter, Jitter::Full);
        assert_eq!(c.pull.base_delay_ms, 500);
        assert_eq!(c.push.base_delay_ms, 50);
        assert_eq!(c.push.max_attempts, 5);
        assert!(
            serde_json::from_value::<RetryConfig>(serde_json::json!({"pull": {"tries": 1}}))
                .is_err()
        );
    }
}
