//! The `nomad` target: worker containers are the allocations of one task group of the worker
//! job, and nodes are Nomad client nodes. This module owns the HTTP conversation with Nomad's
//! API (`/v1/job/:job/scale`, `/v1/job/:job/allocations`, `/v1/nodes`,
//! `/v1/node/:id/eligibility`, `/v1/node/:id/drain`): the token and namespace/region on every
//! request, the retry while a deployment blocks scaling, and turning Nomad's answers into
//! [`NodeInfo`] and [`TargetError`].
//!
//! Nomad places allocations itself, so a container is never started "on" a node: the node the
//! autoscaler names is a hint this API cannot honour. Nomad cannot create machines either, so
//! [`Target::add_node`] is unsupported; the `command` target (terraform and the like) is the
//! one for the node level. Only plain HTTP is set up: Nomad behind TLS with its own CA or
//! client certificates is not supported yet.

use super::{NodeInfo, Target, TargetError, TargetResult};
use async_trait::async_trait;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Nomad's error text while a deployment of the job runs; the scale call is refused (400)
/// until the deployment finishes, so it is worth waiting for rather than failing at once.
const DEPLOYMENT_BLOCKED: &str = "active deployment";

/// Error bodies are copied into errors and logs; a proxy's HTML page must not flood them.
const MAX_BODY_IN_ERROR: usize = 1000;

/// How often, and how patiently, a scale call refused for an active deployment is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRetry {
    /// Scale calls in all, the first included; at least one is always made.
    pub tries: u32,
    /// The wait before the second try; it doubles before each further one.
    pub first_delay: Duration,
}

impl Default for DeploymentRetry {
    /// Five tries over 7.5 s of waiting (0.5 + 1 + 2 + 4 s): long enough for a small rolling
    /// update of the worker job, short enough that the autoscaler's next evaluation decides
    /// again with fresh numbers instead of this call hanging on.
    fn default() -> Self {
        DeploymentRetry {
            tries: 5,
            first_delay: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NomadSettings {
    /// Nomad's HTTP address, e.g. `http://127.0.0.1:4646`.
    pub address: String,
    /// An ACL token (sent as `X-Nomad-Token`); `None` when ACLs are off.
    pub token: Option<String>,
    /// The worker job's namespace (`default` unless namespaces are used).
    pub namespace: String,
    /// A region to forward to; `None` for the agent's own.
    pub region: Option<String>,
    /// The worker job's ID.
    pub job: String,
    /// The task group whose count is the number of worker containers.
    pub group: String,
    /// Only client nodes of this node class are worker nodes; `None` for all.
    pub node_class: Option<String>,
    /// The limit for one HTTP request (connect to last byte).
    pub request_timeout: Duration,
    /// Retrying scale calls refused during a deployment.
    pub deployment_retry: DeploymentRetry,
}

impl NomadSettings {
    /// Settings for `job`/`group` on `address` with the defaults Nomad itself uses: the
    /// `default` namespace, the agent's region, no token, every node class.
    pub fn new(address: &str, job: &str, group: &str) -> NomadSettings {
        NomadSettings {
            address: address.to_string(),
            token: None,
            namespace: "default".to_string(),
            region: None,
            job: job.to_string(),
            group: group.to_string(),
            node_class: None,
            request_timeout: Duration::from_secs(10),
            deployment_retry: DeploymentRetry::default(),
        }
    }

    /// Settings from the `scaling.nomad` block. An empty token falls back to `NOMAD_TOKEN`,
    /// as the Nomad CLI does, so the secret need not be written into a config file.
    pub fn from_config(c: &transcode_core::config::NomadTargetConfig) -> NomadSettings {
        let some = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let token =
            some(&c.token).or_else(|| std::env::var("NOMAD_TOKEN").ok().filter(|t| !t.is_empty()));
        NomadSettings {
            token,
            namespace: if c.namespace.is_empty() {
                "default".to_string()
            } else {
                c.namespace.clone()
            },
            region: some(&c.region),
            node_class: some(&c.node_class),
            ..NomadSettings::new(&c.address, &c.job, &c.group)
        }
    }
}

pub struct NomadTarget {
    settings: NomadSettings,
    base: Url,
    token: Option<HeaderValue>,
    http: reqwest::Client,
}

// The subset of Nomad's answers this target reads; Nomad sends many more fields, and serde
// skips them. Missing optional fields default so a newer or older Nomad still parses.

#[derive(Debug, Deserialize)]
struct JobScaleStatus {
    #[serde(rename = "TaskGroups", default)]
    task_groups: HashMap<String, TaskGroupScale>,
}

#[derive(Debug, Deserialize)]
struct TaskGroupScale {
    #[serde(rename = "Desired", default)]
    desired: i64,
}

#[derive(Debug, Deserialize)]
struct NodeStub {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "NodeClass", default)]
    node_class: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "SchedulingEligibility", default)]
    scheduling_eligibility: String,
}

#[derive(Debug, Deserialize)]
struct AllocStub {
    #[serde(rename = "NodeID", default)]
    node_id: String,
    #[serde(rename = "TaskGroup", default)]
    task_group: String,
    #[serde(rename = "ClientStatus", default)]
    client_status: String,
    #[serde(rename = "DesiredStatus", default)]
    desired_status: String,
}

fn failed(e: impl std::fmt::Display) -> TargetError {
    TargetError::Failed(e.to_string())
}

fn clip(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_BODY_IN_ERROR {
        return text.to_string();
    }
    let mut end = MAX_BODY_IN_ERROR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Nomad reads a drain deadline of 0 as "no deadline" and a negative one as "now"; the
/// scaler's zero means it has no time left to give, so it must not become "wait forever".
fn drain_deadline_nanos(deadline: Duration) -> i64 {
    if deadline.is_zero() {
        return -1;
    }
    i64::try_from(deadline.as_nanos()).unwrap_or(i64::MAX)
}

/// An answer that was not 2xx.
struct HttpError {
    status: StatusCode,
    body: String,
}

impl NomadTarget {
    pub fn new(settings: NomadSettings) -> Result<NomadTarget, TargetError> {
        let base = Url::parse(&settings.address)
            .map_err(|e| failed(format!("nomad address {:?}: {e}", settings.address)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(failed(format!(
                "nomad address {:?} is not an http:// URL",
                settings.address
            )));
        }
        for (what, value) in [
            ("job", &settings.job),
            ("group", &settings.group),
            ("namespace", &settings.namespace),
        ] {
            if value.is_empty() {
                return Err(failed(format!("nomad target: {what} is empty")));
            }
        }
        let token = match settings.token.as_deref() {
            None => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(t)
                    .map_err(|_| failed("nomad token is not a valid HTTP header value"))?;
                // Keeps the token out of reqwest's Debug output and so out of our logs.
                v.set_sensitive(true);
                Some(v)
            }
        };
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| failed(format!("nomad HTTP client: {e}")))?;
        Ok(NomadTarget {
            settings,
            base,
            token,
            http,
        })
    }

    fn url(&self, segments: &[&str]) -> TargetResult<Url> {
        let mut url = self.base.clone();
        // Pushing segments (rather than formatting a string) percent-encodes job IDs and keeps
        // any path prefix of the address, e.g. Nomad behind a proxy at /nomad.
        url.path_segments_mut()
            .map_err(|_| failed("nomad address cannot take a path"))?
            .pop_if_empty()
            .push("v1")
            .extend(segments);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("namespace", &self.settings.namespace);
            if let Some(region) = &self.settings.region {
                q.append_pair("region", region);
            }
        }
        Ok(url)
    }

    /// One request; the outer error is transport trouble, the inner a non-2xx answer, so the
    /// scale retry can tell a refused call from an unreachable Nomad.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&serde_json::Value>,
    ) -> TargetResult<Result<Vec<u8>, HttpError>> {
        let url = self.url(segments)?;
        let what = format!("nomad {method} {}", url.path());
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.header("X-Nomad-Token", token.clone());
        }
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body).map_err(failed)?;
            req = req.header(CONTENT_TYPE, "application/json").body(bytes);
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                TargetError::Timeout(self.settings.request_timeout)
            } else {
                failed(format!("{what}: {e}"))
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            Ok(Ok(bytes.to_vec()))
        } else {
            Ok(Err(HttpError {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }))
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, segments: &[&str]) -> TargetResult<T> {
        let what = || format!("nomad GET /v1/{}", segments.join("/"));
        match self.call(Method::GET, segments, None).await? {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| failed(format!("{}: unexpected answer: {e}", what()))),
            Err(e) => Err(self.http_failed(&what(), e)),
        }
    }

    async fn post(&self, segments: &[&str], body: &serde_json::Value) -> TargetResult<()> {
        match self.call(Method::POST, segments, Some(body)).await? {
            Ok(_) => Ok(()),
            Err(e) => Err(self.http_failed(&format!("nomad POST /v1/{}", segments.join("/")), e)),
        }
    }

    fn http_failed(&self, what: &str, e: HttpError) -> TargetError {
        failed(format!("{what}: HTTP {}: {}", e.status, clip(&e.body)))
    }

    /// The group's desired count, as Nomad holds it now.
    async fn desired(&self) -> TargetResult<i64> {
        let status: JobScaleStatus = self.get(&["job", &self.settings.job, "scale"]).await?;
        status
            .task_groups
            .get(&self.settings.group)
            .map(|g| g.desired)
            .ok_or_else(|| {
                failed(format!(
                    "nomad job {:?} has no task group {:?}",
                    self.settings.job, self.settings.group
                ))
            })
    }

    /// Moves the group's count by `delta`. The new count is computed once and sent as an
    /// absolute value, so a retried call cannot move it twice.
    async fn scale_by(&self, delta: i64, message: String) -> TargetResult<()> {
        let desired = self.desired().await?;
        let count = desired + delta;
        if count < 0 {
            return Err(failed(format!(
                "nomad group {:?} of job {:?} already runs 0 allocations",
                self.settings.group, self.settings.job
            )));
        }
        let body = serde_json::json!({
            "Count": count,
            "Target": { "Group": self.settings.group },
            "Message": message,
            "PolicyOverride": false,
        });
        let segments = ["job", self.settings.job.as_str(), "scale"];
        let retry = &self.settings.deployment_retry;
        let tries = retry.tries.max(1);
        let mut delay = retry.first_delay;
        for attempt in 1..=tries {
            let e = match self.call(Method::POST, &segments, Some(&body)).await? {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let blocked = e.status == StatusCode::BAD_REQUEST
                && e.body.to_ascii_lowercase().contains(DEPLOYMENT_BLOCKED);
            if !blocked {
                return Err(self.http_failed(
                    &format!("nomad POST /v1/job/{}/scale", self.settings.job),
                    e,
                ));
            }
            if attempt == tries {
                return Err(failed(format!(
                    "nomad job {:?} could not be scaled to {count}: a deployment was still \
                     active after {tries} tries ({})",
                    self.settings.job,
                    clip(&e.body)
                )));
            }
            tracing::info!(
                job = %self.settings.job,
                attempt,
                retry_in = ?delay,
                "nomad refused to scale during an active deployment"
            );
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
        // Not reached: `tries` is at least 1 and the last try always returns.
        Err(failed("nomad scale: no try was made"))
    }

    async fn node_list(&self) -> TargetResult<Vec<NodeStub>> {
        let nodes: Vec<NodeStub> = self.get(&["nodes"]).await?;
        Ok(nodes
            .into_iter()
            .filter(|n| match &self.settings.node_class {
                Some(class) => &n.node_class == class,
                None => true,
            })
            .collect())
    }
}

#[async_trait]
impl Target for NomadTarget {
    fn kind(&self) -> &'static str {
        "nomad"
    }

    /// Ready, eligible nodes (of the class, when set), each with the running allocations of
    /// the worker group on it. An allocation Nomad is already stopping is not counted: the
    /// autoscaler asked for it to go, and counting it would make it ask again.
    async fn nodes(&self) -> TargetResult<Vec<NodeInfo>> {
        let nodes = self.node_list().await?;
        let allocs: Vec<AllocStub> = self
            .get(&["job", &self.settings.job, "allocations"])
            .await?;
        let mut per_node: HashMap<&str, u32> = HashMap::new();
        for a in &allocs {
            let live = a.client_status == "running"
                && !matches!(a.desired_status.as_str(), "stop" | "evict");
            if live && a.task_group == self.settings.group {
                *per_node.entry(a.node_id.as_str()).or_default() += 1;
            }
        }
        // Sorted by name so callers (and their logs) see a stable order.
        let mut out: BTreeMap<String, u32> = BTreeMap::new();
        for n in &nodes {
            if n.status == "ready" && n.scheduling_eligibility == "eligible" {
                let containers = per_node.get(n.id.as_str()).copied().unwrap_or(0);
                *out.entry(n.name.clone()).or_default() += containers;
            }
        }
        Ok(out
            .into_iter()
            .map(|(name, containers)| NodeInfo { name, containers })
            .collect())
    }

    async fn add_node(&self) -> TargetResult<String> {
        Err(TargetError::Unsupported {
            target: "nomad",
            op: "add a node (Nomad cannot create machines; use the command target)",
        })
    }

    /// Marks the node ineligible first so nothing new lands on it between the two calls, then
    /// drains it; Nomad migrates what still runs there and stops it by `deadline`.
    async fn remove_node(&self, node: &str, deadline: Duration) -> TargetResult<()> {
        // Nomad keeps a replaced machine's old entry (status "down") under the same name for a
        // while, so a name can match several entries; only a live one can be drained.
        let matches: Vec<NodeStub> = self
            .node_list()
            .await?
            .into_iter()
            .filter(|n| n.name == node && n.status != "down")
            .collect();
        let id = match matches.as_slice() {
            [] => return Err(TargetError::UnknownNode(node.to_string())),
            [one] => one.id.clone(),
            _ => {
                return Err(failed(format!(
                    "nomad has {} live nodes named {node:?}; drain one by ID by hand",
                    matches.len()
                )))
            }
        };
        self.post(
            &["node", &id, "eligibility"],
            &serde_json::json!({ "NodeID": id, "Eligibility": "ineligible" }),
        )
        .await?;
        self.post(
            &["node", &id, "drain"],
            &serde_json::json!({
                "DrainSpec": {
                    "Deadline": drain_deadline_nanos(deadline),
                    "IgnoreSystemJobs": false,
                },
                "MarkEligible": false,
            }),
        )
        .await
    }

    /// Raises the group count by one. Nomad picks the node; `node` only appears in the
    /// message Nomad records with the scaling event.
    async fn start_container(&self, node: &str) -> TargetResult<()> {
        self.scale_by(
            1,
            format!("transcode-scaler: start a worker container (wanted on {node})"),
        )
        .await
    }

    /// Lowers the group count by one so Nomad does not replace the worker, which the scaler
    /// already drained and which exits by itself after its task. Nomad, not this call, picks
    /// the allocation it stops for the lower count.
    async fn stop_container(&self, node: &str, member: &str) -> TargetResult<()> {
        self.scale_by(
            -1,
            format!("transcode-scaler: stop drained worker {member} on {node}"),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_zero_means_now_not_never() {
        assert_eq!(drain_deadline_nanos(Duration::ZERO), -1);
        assert_eq!(
            drain_deadline_nanos(Duration::from_secs(90)),
            90_000_000_000
        );
        assert_eq!(drain_deadline_nanos(Duration::MAX), i64::MAX);
    }

    #[test]
    fn urls_keep_prefix_encode_job_and_carry_namespace_and_region() {
        let mut s = NomadSettings::new("http://nomad.example:4646/proxy/", "trans code", "w");
        s.namespace = "farm".into();
        s.region = Some("eu".into());
        let t = NomadTarget::new(s).expect("valid settings");
        let url = t.url(&["job", "trans code", "scale"]).expect("url");
        assert_eq!(
            url.as_str(),
            "http://nomad.example:4646/proxy/v1/job/trans%20code/scale?namespace=farm&region=eu"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for address in ["nomad:4646", "ftp://x", "not a url"] {
            let s = NomadSettings::new(address, "j", "g");
            assert!(NomadTarget::new(s).is_err(), "{address} accepted");
        }
        let mut s = NomadSettings::new("http://127.0.0.1:4646", "j", "g");
        s.token = Some("bad\ntoken".into());
        assert!(NomadTarget::new(s).is_err());
        let s = NomadSettings::new("http://127.0.0.1:4646", "j", "");
        assert!(NomadTarget::new(s).is_err());
    }

    #[test]
    fn long_bodies_are_clipped_on_a_char_boundary() {
        let body = "é".repeat(MAX_BODY_IN_ERROR);
        let c = clip(&body);
        assert!(c.len() <= MAX_BODY_IN_ERROR + '…'.len_utf8());
        assert!(c.ends_with('…'));
    }
}
