//! The two configuration surfaces of the driver: the agent's `plugin "transcode" { config {} }`
//! block (plugin config) and a task's `config {}` block (task config). This module owns their
//! hclspec schemas (what Nomad's HCL parser enforces), their decoding from go-cty msgpack, and
//! the validation that turns a mistake into a message a Nomad operator can act on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cty::{CtyError, Object};
use crate::proto::hclspec::{self, spec::Block, Spec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cty(#[from] CtyError),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

// ---- hclspec builders ----

fn attr(name: &str, ty: &str, required: bool) -> Spec {
    Spec {
        block: Some(Block::Attr(hclspec::Attr {
            name: name.into(),
            r#type: ty.into(),
            required,
        })),
    }
}

/// `primary` with an HCL-expression default (e.g. `"\"1s\""` or `"1"`).
fn with_default(primary: Spec, literal: &str) -> Spec {
    Spec {
        block: Some(Block::Default(Box::new(hclspec::Default {
            primary: Some(Box::new(primary)),
            default: Some(Box::new(Spec {
                block: Some(Block::Literal(hclspec::Literal {
                    value: literal.into(),
                })),
            })),
        }))),
    }
}

fn object(attrs: Vec<(&str, Spec)>) -> Spec {
    Spec {
        block: Some(Block::Object(hclspec::Object {
            attributes: attrs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<HashMap<_, _>>(),
        })),
    }
}

// ---- plugin config ----

pub const DEFAULT_WORKER_BINARY: &str = "transcode-worker";
pub const DEFAULT_CGROUP_PARENT: &str = "nomad-transcode";
pub const DEFAULT_STATS_INTERVAL: &str = "1s";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nomad-driver-transcode";

/// The agent-level configuration, after defaults and validation.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Path (or bare name looked up in PATH) of the worker binary.
    pub worker_binary: String,
    /// Worker config file used when a task names none.
    pub default_config_file: Option<PathBuf>,
    /// Cgroup under which each task gets its own cgroup (relative to the cgroup mounts).
    pub cgroup_parent: String,
    /// Stats interval used when Nomad asks for stats without one.
    pub stats_interval: Duration,
    /// Where per-task state (spec, exit status, shim log) is kept; must survive plugin
    /// restarts, so it is a directory on disk rather than memory.
    pub state_dir: PathBuf,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            worker_binary: DEFAULT_WORKER_BINARY.into(),
            default_config_file: None,
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            stats_interval: Duration::from_secs(1),
            state_dir: DEFAULT_STATE_DIR.into(),
        }
    }
}

pub fn plugin_schema() -> Spec {
    object(vec![
        (
            "worker_binary",
            with_default(
                attr("worker_binary", "string", false),
                &format!("{DEFAULT_WORKER_BINARY:?}"),
            ),
        ),
        (
            "default_config_file",
            attr("default_config_file", "string", false),
        ),
        (
            "cgroup_parent",
            with_default(
                attr("cgroup_parent", "string", false),
                &format!("{DEFAULT_CGROUP_PARENT:?}"),
            ),
        ),
        (
            "stats_interval",
            with_default(
                attr("stats_interval", "string", false),
                &format!("{DEFAULT_STATS_INTERVAL:?}"),
            ),
        ),
        (
            "state_dir",
            with_default(
                attr("state_dir", "string", false),
                &format!("{DEFAULT_STATE_DIR:?}"),
            ),
        ),
    ])
}

impl PluginConfig {
    /// Decodes and validates the agent's plugin block. Absent attributes take the defaults, so
    /// a config written by a Nomad that applied the hclspec defaults and one that did not
    /// behave the same.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, ConfigError> {
        let o = Object::decode(bytes)?;
        let d = Self::default();
        let worker_binary = o.string("worker_binary")?.unwrap_or(d.worker_binary);
        if worker_binary.trim().is_empty() {
            return Err(invalid(
                "worker_binary",
                "must name the transcode-worker binary (a path or a name found in PATH)",
            ));
        }
        let default_config_file = o
            .string("default_config_file")?
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if let Some(p) = &default_config_file {
            if !p.is_absolute() {
                return Err(invalid(
                    "default_config_file",
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        let cgroup_parent = o.string("cgroup_parent")?.unwrap_or(d.cgroup_parent);
        validate_cgroup_parent(&cgroup_parent)?;
        let stats_interval = match o.string("stats_interval")? {
            None => d.stats_interval,
            Some(s) => parse_go_duration(&s).map_err(|e| invalid("stats_interval", e))?,
        };
        if stats_interval < Duration::from_millis(100) {
            return Err(invalid(
                "stats_interval",
                "must be at least 100ms; reading cgroup files faster only costs CPU",
            ));
        }
        let state_dir = PathBuf::from(o.string("state_dir")?.unwrap_or_else(|| {
            d.state_dir
                .to_str()
                .map(str::to_owned)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
        }));
        if !state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("{} must be an absolute path", state_dir.display()),
            ));
        }
        Ok(Self {
            worker_binary,
            default_config_file,
            cgroup_parent,
            stats_interval,
            state_dir,
        })
    }
}

fn validate_cgroup_parent(p: &str) -> Result<(), ConfigError> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty() {
        return Err(invalid(
            "cgroup_parent",
            "must name a cgroup below the root (e.g. \"nomad-transcode\"); tasks are never placed in the root cgroup",
        ));
    }
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid(
            "cgroup_parent",
            format!("{p:?} must be a plain relative cgroup path without '.', '..' or empty parts"),
        ));
    }
    Ok(())
}

// ---- task config ----

/// The worker's environment overrides the driver sets. The worker (`core/src/config.rs`,
/// `Config::keys()`) reads `TRANSCODE_<SECTION>_<KEY>` and refuses unknown names inside a known
/// section, so these must be spelled exactly as its schema spells them: a wrong name is not
/// ignored, it stops the worker at start with a config error.
pub mod worker_env {
    /// `scaler.dispatch`: the scaler's dispatch endpoint (ZeroMQ ROUTER).
    pub const SCALER_DISPATCH: &str = "TRANSCODE_SCALER_DISPATCH";
    /// `scaler.events_sub`: the scaler's XSUB endpoint, where workers publish events.
    pub const SCALER_EVENTS_SUB: &str = "TRANSCODE_SCALER_EVENTS_SUB";
    /// `store.url`.
    pub const STORE_URL: &str = "TRANSCODE_STORE_URL";
    /// `objects.s3.endpoint`.
    pub const S3_ENDPOINT: &str = "TRANSCODE_OBJECTS_S3_ENDPOINT";
    /// `objects.s3.region`.
    pub const S3_REGION: &str = "TRANSCODE_OBJECTS_S3_REGION";
    /// `worker.id`.
    pub const WORKER_ID: &str = "TRANSCODE_WORKER_ID";
    /// `worker.node`.
    pub const WORKER_NODE: &str = "TRANSCODE_WORKER_NODE";
    /// `worker.slots`.
    pub const WORKER_SLOTS: &str = "TRANSCODE_WORKER_SLOTS";
    /// `worker.drain_timeout_seconds`: whole seconds.
    pub const WORKER_DRAIN_TIMEOUT_SECONDS: &str = "TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS";
}

/// A task's `config {}` block, after validation. Each setting is one key of the worker's own
/// configuration; [`TaskSettings::worker_invocation`] passes them as its env overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSettings {
    /// The scaler's dispatch endpoint (`scaler.dispatch`).
    pub scaler_address: Option<String>,
    /// The scaler's XSUB endpoint for events (`scaler.events_sub`); unset leaves the worker's
    /// own value (config file or its built-in default).
    pub events_address: Option<String>,
    pub store_url: Option<String>,
    /// S3 endpoint for s3:// URLs in task specs; unset means AWS, or the task's `AWS_*` env.
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub config_file: Option<PathBuf>,
    pub slots: u32,
    /// Unset: Nomad's node name (see [`WorkerIdentity`]).
    pub node_label: Option<String>,
    pub args: Vec<String>,
    pub drain_timeout: Duration,
}

/// What the driver knows about a task from Nomad's TaskConfig, beyond the `config {}` block.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerIdentity<'a> {
    pub alloc_id: &'a str,
    pub task_name: &'a str,
    pub node_name: &'a str,
}

impl WorkerIdentity<'_> {
    /// `<first 8 characters of the alloc id>-<task name>`, Nomad's own short alloc id. It is
    /// stable across restarts of the task within its allocation, so the scaler sees a
    /// restarted worker as the same member instead of a new one plus a dead one. `None` when
    /// Nomad gave no alloc id: then the worker's own (unique, per process) id is better than
    /// one that could collide across allocations.
    pub fn worker_id(&self) -> Option<String> {
        if self.alloc_id.is_empty() {
            return None;
        }
        let short: String = self.alloc_id.chars().take(8).collect();
        Some(if self.task_name.is_empty() {
            short
        } else {
            format!("{short}-{}", self.task_name)
        })
    }
}

pub fn task_schema() -> Spec {
    object(vec![
        ("scaler_address", attr("scaler_address", "string", false)),
        ("events_address", attr("events_address", "string", false)),
        ("store_url", attr("store_url", "string", false)),
        ("s3_endpoint", attr("s3_endpoint", "string", false)),
        ("s3_region", attr("s3_region", "string", false)),
        ("config_file", attr("config_file", "string", false)),
        ("slots", with_default(attr("slots", "number", false), "1")),
        ("node_label", attr("node_label", "string", false)),
        ("args", attr("args", "list(string)", false)),
        (
            "drain_timeout",
            with_default(attr("drain_timeout", "string", false), "\"30s\""),
        ),
    ])
}

pub const MAX_SLOTS: i64 = 64;
/// The worker's `drain_timeout_seconds` is a u32 in its schema.
const MAX_DRAIN_SECONDS: u64 = u32::MAX as u64;

/// ZeroMQ endpoints a worker in another process can reach. The worker also accepts
/// `inproc://`, which only works inside one process, so it is refused here.
const ZMQ_SCHEMES: &[&str] = &["tcp://", "ipc://"];
const STORE_SCHEMES: &[&str] = &["postgres://", "postgresql://", "sqlite://"];
const S3_ENDPOINT_SCHEMES: &[&str] = &["http://", "https://"];

/// Checks a URL's scheme the way the worker's schema does (a known prefix and something after
/// it), so a bad value fails StartTask with the field name rather than the worker at start.
fn check_scheme(
    field: &'static str,
    value: Option<&String>,
    schemes: &[&str],
    example: &str,
) -> Result<(), ConfigError> {
    let Some(v) = value else { return Ok(()) };
    if schemes
        .iter()
        .any(|p| v.starts_with(p) && v.len() > p.len())
    {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{v:?} must start with {} (e.g. {example:?})",
            schemes.join(" or ")
        ),
    ))
}

impl TaskSettings {
    /// Decodes and validates a task's config block. `default_config_file` is the plugin's,
    /// which stands in for a task that names no config file.
    pub fn from_msgpack(
        bytes: &[u8],
        default_config_file: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let o = Object::decode(bytes)?;
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let scaler_address = nonempty(o.string("scaler_address")?);
        let events_address = nonempty(o.string("events_address")?);
        let store_url = nonempty(o.string("store_url")?);
        let s3_endpoint = nonempty(o.string("s3_endpoint")?);
        let s3_region = nonempty(o.string("s3_region")?);
        let config_file = nonempty(o.string("config_file")?).map(PathBuf::from);
        let slots = o.integer("slots")?.unwrap_or(1);
        if !(1..=MAX_SLOTS).contains(&slots) {
            return Err(invalid(
                "slots",
                format!("{slots} is out of range: a worker runs 1 to {MAX_SLOTS} tasks at once"),
            ));
        }
        let node_label = nonempty(o.string("node_label")?);
        let args = o.string_list("args")?.unwrap_or_default();
        let drain_timeout_text = o
            .string("drain_timeout")?
            .unwrap_or_else(|| "30s".to_owned());
        let drain_timeout =
            parse_go_duration(&drain_timeout_text).map_err(|e| invalid("drain_timeout", e))?;
        if whole_seconds_up(drain_timeout) > MAX_DRAIN_SECONDS {
            return Err(invalid(
                "drain_timeout",
                format!("{drain_timeout_text:?} is longer than the worker accepts ({MAX_DRAIN_SECONDS}s)"),
            ));
        }

        if let Some(p) = &config_file {
            if !p.is_absolute() {
                return Err(invalid(
                    "config_file",
                    format!(
                        "{} must be an absolute path on the client node",
                        p.display()
                    ),
                ));
            }
        }
        // Without a file the worker would fall back to its embedded defaults (a local SQLite
        // file and a scaler on 127.0.0.1), which is never what a Nomad job means.
        let has_file = config_file.is_some() || default_config_file.is_some();
        if store_url.is_none() && !has_file {
            return Err(invalid(
                "store_url",
                "is required unless a config_file (or the plugin's default_config_file) provides it \
                 (e.g. \"postgres://transcode@db.service.consul/transcode\")",
            ));
        }
        if scaler_address.is_none() && !has_file {
            return Err(invalid(
                "scaler_address",
                "is required unless a config_file (or the plugin's default_config_file) provides it \
                 (e.g. \"tcp://scaler.service.consul:5571\")",
            ));
        }
        check_scheme(
            "scaler_address",
            scaler_address.as_ref(),
            ZMQ_SCHEMES,
            "tcp://scaler.service.consul:5571",
        )?;
        check_scheme(
            "events_address",
            events_address.as_ref(),
            ZMQ_SCHEMES,
            "tcp://scaler.service.consul:5573",
        )?;
        check_scheme(
            "store_url",
            store_url.as_ref(),
            STORE_SCHEMES,
            "postgres://transcode@db.service.consul/transcode",
        )?;
        check_scheme(
            "s3_endpoint",
            s3_endpoint.as_ref(),
            S3_ENDPOINT_SCHEMES,
            "http://minio.service.consul:9000",
        )?;
        Ok(Self {
            scaler_address,
            events_address,
            store_url,
            s3_endpoint,
            s3_region,
            config_file,
            slots: slots as u32,
            node_label,
            args,
            drain_timeout,
        })
    }

    /// The drain timeout as the worker takes it: whole seconds, rounded up so the worker never
    /// gets less time than the job asked for.
    pub fn drain_timeout_seconds(&self) -> u64 {
        whole_seconds_up(self.drain_timeout)
    }

    /// The worker's argv after the binary, and the environment it adds on top of the task's.
    /// Typed settings travel as the worker's `TRANSCODE_<SECTION>_<KEY>` overrides (which win
    /// over its config file); only `--config` and the user's extra args are flags, so `args`
    /// can still override anything with the worker's own flags. Credentials are never part of
    /// this: the worker reads them from the task's `AWS_*` env, which Nomad can fill from
    /// Vault, whereas a task config is readable by anyone who can read the job.
    pub fn worker_invocation(
        &self,
        default_config_file: Option<&Path>,
        who: WorkerIdentity<'_>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        use worker_env as w;
        let mut args = Vec::new();
        if let Some(f) = self.config_file.as_deref().or(default_config_file) {
            args.push("--config".to_owned());
            args.push(f.display().to_string());
        }
        args.extend(self.args.iter().cloned());
        let node = self
            .node_label
            .clone()
            .or_else(|| (!who.node_name.is_empty()).then(|| who.node_name.to_owned()));
        let mut env = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                env.push((k.to_owned(), v));
            }
        };
        put(w::SCALER_DISPATCH, self.scaler_address.clone());
        put(w::SCALER_EVENTS_SUB, self.events_address.clone());
        put(w::STORE_URL, self.store_url.clone());
        put(w::S3_ENDPOINT, self.s3_endpoint.clone());
        put(w::S3_REGION, self.s3_region.clone());
        put(w::WORKER_ID, who.worker_id());
        put(w::WORKER_NODE, node);
        put(w::WORKER_SLOTS, Some(self.slots.to_string()));
        put(
            w::WORKER_DRAIN_TIMEOUT_SECONDS,
            Some(self.drain_timeout_seconds().to_string()),
        );
        (args, env)
    }
}

fn whole_seconds_up(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// Parses Go's `time.ParseDuration` syntax ("1.5s", "2m30s", "300ms"), the form Nomad users
/// write durations in.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration; write e.g. \"30s\" or \"1m\"".into());
    }
    if s.starts_with('-') {
        return Err(format!("{s:?} is negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("{s:?} is not a duration (e.g. \"30s\", \"1m30s\")"));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?} has a bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("{s:?} is missing a unit (ns, us, ms, s, m, h)")),
            other => return Err(format!("{s:?} has an unknown unit {other:?}")),
        };
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn encode(pairs: &[(&str, Value)]) -> Vec<u8> {
        let mut sorted: Vec<_> = pairs.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let map = Value::Map(
            sorted
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        );
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).expect("encode");
        out
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("30").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("5 parsecs").is_err());
    }

    #[test]
    fn plugin_config_defaults_and_errors() {
        let c = PluginConfig::from_msgpack(&[]).expect("defaults");
        assert_eq!(c, PluginConfig::default());
        let bytes = encode(&[
            ("cgroup_parent", Value::from("a/b")),
            ("default_config_file", Value::Nil),
            ("state_dir", Value::from("/tmp/s")),
            ("stats_interval", Value::from("2s")),
            ("worker_binary", Value::from("/opt/w")),
        ]);
        let c = PluginConfig::from_msgpack(&bytes).expect("valid");
        assert_eq!(c.worker_binary, "/opt/w");
        assert_eq!(c.stats_interval, Duration::from_secs(2));
        let bad = encode(&[("cgroup_parent", Value::from("../escape"))]);
        let e = PluginConfig::from_msgpack(&bad).expect_err("invalid");
        assert!(e.to_string().starts_with("cgroup_parent:"), "{e}");
        let bad = encode(&[("stats_interval", Value::from("soon"))]);
        assert!(PluginConfig::from_msgpack(&bad).is_err());
    }

    fn task(pairs: &[(&str, Value)]) -> Result<TaskSettings, ConfigError> {
        TaskSettings::from_msgpack(&encode(pairs), None)
    }

    fn field_of(e: &ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { field, .. } => field,
            ConfigError::Cty(_) => "cty",
        }
    }

    const WHO: WorkerIdentity<'static> = WorkerIdentity {
        alloc_id: "3f2a9c1e-5b7d-4e0a-9c3b-1d2e3f4a5b6c",
        task_name: "worker",
        node_name: "client-7",
    };

    #[test]
    fn task_settings_map_to_the_workers_env_names() {
        let ok = encode(&[
            ("scaler_address", Value::from("tcp://s:5571")),
            ("events_address", Value::from("tcp://s:5573")),
            ("store_url", Value::from("postgres://db/t")),
            ("s3_endpoint", Value::from("http://minio:9000")),
            ("s3_region", Value::from("eu-west-1")),
            ("slots", Value::from(2)),
            ("node_label", Value::from("edge-1")),
            ("args", Value::Array(vec![Value::from("--verbose")])),
            ("drain_timeout", Value::from("45s")),
        ]);
        let t = TaskSettings::from_msgpack(&ok, None).expect("valid");
        assert_eq!(t.slots, 2);
        assert_eq!(t.drain_timeout, Duration::from_secs(45));
        let (args, env) = t.worker_invocation(None, WHO);
        assert_eq!(args, vec!["--verbose"]);
        let want: Vec<(String, String)> = [
            ("TRANSCODE_SCALER_DISPATCH", "tcp://s:5571"),
            ("TRANSCODE_SCALER_EVENTS_SUB", "tcp://s:5573"),
            ("TRANSCODE_STORE_URL", "postgres://db/t"),
            ("TRANSCODE_OBJECTS_S3_ENDPOINT", "http://minio:9000"),
            ("TRANSCODE_OBJECTS_S3_REGION", "eu-west-1"),
            ("TRANSCODE_WORKER_ID", "3f2a9c1e-worker"),
            ("TRANSCODE_WORKER_NODE", "edge-1"),
            ("TRANSCODE_WORKER_SLOTS", "2"),
            ("TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS", "45"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(env, want, "exact names: the worker rejects unknown ones");
    }

    #[test]
    fn optional_settings_are_left_to_the_worker() {
        let t = task(&[
            ("scaler_address", Value::from("tcp://s:5571")),
            ("store_url", Value::from("sqlite:///var/lib/t.db")),
        ])
        .expect("valid");
        let (_, env) = t.worker_invocation(None, WHO);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        for absent in [
            "TRANSCODE_SCALER_EVENTS_SUB",
            "TRANSCODE_OBJECTS_S3_ENDPOINT",
            "TRANSCODE_OBJECTS_S3_REGION",
        ] {
            assert!(!names.contains(&absent), "{absent} set without a value");
        }
        // Defaults: one slot, 30 s, and Nomad's node name as the node.
        assert!(env.contains(&("TRANSCODE_WORKER_SLOTS".into(), "1".into())));
        assert!(env.contains(&("TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS".into(), "30".into())));
        assert!(env.contains(&("TRANSCODE_WORKER_NODE".into(), "client-7".into())));
        // No node name from Nomad and no label: the worker falls back to the host name.
        let (_, env) = t.worker_invocation(
            None,
            WorkerIdentity {
                node_name: "",
                ..WHO
            },
        );
        assert!(!env.iter().any(|(k, _)| k == "TRANSCODE_WORKER_NODE"));
    }

    #[test]
    fn worker_id_is_stable_per_allocation() {
        assert_eq!(WHO.worker_id().as_deref(), Some("3f2a9c1e-worker"));
        let short = WorkerIdentity {
            alloc_id: "a1",
            task_name: "w",
            node_name: "",
        };
        assert_eq!(short.worker_id().as_deref(), Some("a1-w"));
        let none = WorkerIdentity::default();
        assert_eq!(none.worker_id(), None, "the worker makes up a unique id");
    }

    #[test]
    fn drain_timeout_rounds_up_to_whole_seconds() {
        let base = [
            ("scaler_address", Value::from("tcp://s:5571")),
            ("store_url", Value::from("postgres://db/t")),
        ];
        for (text, secs) in [("1500ms", 2), ("1s", 1), ("0", 0), ("1ns", 1), ("2m", 120)] {
            let mut pairs = base.to_vec();
            pairs.push(("drain_timeout", Value::from(text)));
            let t = task(&pairs).expect("valid");
            assert_eq!(t.drain_timeout_seconds(), secs, "{text}");
        }
        let mut pairs = base.to_vec();
        pairs.push(("drain_timeout", Value::from("2000000h")));
        let e = task(&pairs).expect_err("too long for the worker");
        assert_eq!(field_of(&e), "drain_timeout", "{e}");
    }

    #[test]
    fn task_settings_validation() {
        let cases: &[(&str, &[(&str, Value)])] = &[
            // Without a config file both the store and the scaler must be named.
            (
                "store_url",
                &[("scaler_address", Value::from("tcp://s:5571"))],
            ),
            (
                "scaler_address",
                &[("store_url", Value::from("postgres://db/t"))],
            ),
            (
                "store_url",
                &[
                    ("scaler_address", Value::from("tcp://s:5571")),
                    ("store_url", Value::from("mysql://db")),
                ],
            ),
            (
                "scaler_address",
                &[
                    ("scaler_address", Value::from("s:5571")),
                    ("store_url", Value::from("postgres://db/t")),
                ],
            ),
            (
                "events_address",
                &[
                    ("scaler_address", Value::from("tcp://s:5571")),
                    ("events_address", Value::from("inproc://events")),
                    ("store_url", Value::from("postgres://db/t")),
                ],
            ),
            (
                "s3_endpoint",
                &[
                    ("scaler_address", Value::from("tcp://s:5571")),
                    ("store_url", Value::from("postgres://db/t")),
                    ("s3_endpoint", Value::from("minio:9000")),
                ],
            ),
            (
                "slots",
                &[
                    ("config_file", Value::from("/etc/w.hcl")),
                    ("slots", Value::from(0)),
                ],
            ),
            ("config_file", &[("config_file", Value::from("etc/w.hcl"))]),
        ];
        for (field, pairs) in cases {
            let e = task(pairs).expect_err(field);
            assert_eq!(field_of(&e), *field, "{e}");
            assert!(e.to_string().starts_with(&format!("{field}:")), "{e}");
        }

        let nothing = encode(&[]);
        assert!(TaskSettings::from_msgpack(&nothing, None).is_err());
        let via_default =
            TaskSettings::from_msgpack(&nothing, Some(Path::new("/etc/w.hcl"))).expect("valid");
        let (args, env) =
            via_default.worker_invocation(Some(Path::new("/etc/w.hcl")), WorkerIdentity::default());
        assert_eq!(args, vec!["--config", "/etc/w.hcl"]);
        // The file provides the scaler and store; the driver names only what it was given.
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "TRANSCODE_WORKER_SLOTS",
                "TRANSCODE_WORKER_DRAIN_TIMEOUT_SECONDS"
            ]
        );
    }
}
