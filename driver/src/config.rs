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

/// A task's `config {}` block, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSettings {
    pub scaler_address: Option<String>,
    pub store_url: Option<String>,
    pub objects_url: Option<String>,
    pub config_file: Option<PathBuf>,
    pub slots: u32,
    pub node_label: Option<String>,
    pub args: Vec<String>,
    pub drain_timeout: Duration,
    /// Kept in the textual form the user wrote, to hand to the worker unchanged.
    pub drain_timeout_text: String,
}

pub fn task_schema() -> Spec {
    object(vec![
        ("scaler_address", attr("scaler_address", "string", false)),
        ("store_url", attr("store_url", "string", false)),
        ("objects_url", attr("objects_url", "string", false)),
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
        let store_url = nonempty(o.string("store_url")?);
        let objects_url = nonempty(o.string("objects_url")?);
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
        let has_file = config_file.is_some() || default_config_file.is_some();
        match (&store_url, &objects_url) {
            (Some(_), None) => {
                return Err(invalid(
                    "objects_url",
                    "is required when store_url is set (e.g. \"s3://media/\" or \"file:///srv/media\")",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "store_url",
                    "is required when objects_url is set (e.g. \"postgres://user@db/transcode\")",
                ))
            }
            (None, None) if !has_file => {
                return Err(invalid(
                    "store_url",
                    "set store_url and objects_url, or config_file (or the plugin's default_config_file)",
                ))
            }
            _ => {}
        }
        if scaler_address.is_none() && !has_file {
            return Err(invalid(
                "scaler_address",
                "is required unless a config_file provides it (e.g. \"tcp://scaler.service.consul:5571\")",
            ));
        }
        if let Some(u) = &store_url {
            let ok = ["postgres://", "postgresql://", "sqlite://"]
                .iter()
                .any(|p| u.starts_with(p));
            if !ok {
                return Err(invalid(
                    "store_url",
                    format!("{u:?} must start with postgres://, postgresql:// or sqlite://"),
                ));
            }
        }
        if let Some(u) = &objects_url {
            if !(u.starts_with("s3://") || u.starts_with("file://")) {
                return Err(invalid(
                    "objects_url",
                    format!("{u:?} must start with s3:// or file://"),
                ));
            }
        }
        Ok(Self {
            scaler_address,
            store_url,
            objects_url,
            config_file,
            slots: slots as u32,
            node_label,
            args,
            drain_timeout,
            drain_timeout_text,
        })
    }

    /// The worker's argv after the binary, and the environment it adds on top of the task's.
    /// The worker reads `TRANSCODE_*` variables as overrides of its config file (see
    /// docs/driver.md), so typed settings travel as environment, and only `--config` and the
    /// user's extra args are flags.
    pub fn worker_invocation(
        &self,
        default_config_file: Option<&Path>,
    ) -> (Vec<String>, Vec<(String, String)>) {
        let mut args = Vec::new();
        if let Some(f) = self.config_file.as_deref().or(default_config_file) {
            args.push("--config".to_owned());
            args.push(f.display().to_string());
        }
        args.extend(self.args.iter().cloned());
        let mut env = Vec::new();
        let mut put = |k: &str, v: Option<&String>| {
            if let Some(v) = v {
                env.push((k.to_owned(), v.clone()));
            }
        };
        put("TRANSCODE_SCALER_ADDRESS", self.scaler_address.as_ref());
        put("TRANSCODE_STORE_URL", self.store_url.as_ref());
        put("TRANSCODE_OBJECTS_URL", self.objects_url.as_ref());
        put("TRANSCODE_NODE", self.node_label.as_ref());
        env.push(("TRANSCODE_SLOTS".into(), self.slots.to_string()));
        env.push((
            "TRANSCODE_DRAIN_TIMEOUT".into(),
            self.drain_timeout_text.clone(),
        ));
        (args, env)
    }
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

    #[test]
    fn task_settings_validation() {
        let ok = encode(&[
            ("scaler_address", Value::from("tcp://s:5571")),
            ("store_url", Value::from("postgres://db/t")),
            ("objects_url", Value::from("s3://media/")),
            ("slots", Value::from(2)),
            ("args", Value::Array(vec![Value::from("--verbose")])),
            ("drain_timeout", Value::from("45s")),
        ]);
        let t = TaskSettings::from_msgpack(&ok, None).expect("valid");
        assert_eq!(t.slots, 2);
        assert_eq!(t.drain_timeout, Duration::from_secs(45));
        let (args, env) = t.worker_invocation(None);
        assert_eq!(args, vec!["--verbose"]);
        assert!(env.contains(&("TRANSCODE_SLOTS".into(), "2".into())));
        assert!(env.contains(&("TRANSCODE_SCALER_ADDRESS".into(), "tcp://s:5571".into())));

        let missing_objects = encode(&[
            ("scaler_address", Value::from("tcp://s:5571")),
            ("store_url", Value::from("postgres://db/t")),
        ]);
        let e = TaskSettings::from_msgpack(&missing_objects, None).expect_err("invalid");
        assert!(e.to_string().starts_with("objects_url:"), "{e}");

        let zero_slots = encode(&[
            ("config_file", Value::from("/etc/w.hcl")),
            ("slots", Value::from(0)),
        ]);
        let e = TaskSettings::from_msgpack(&zero_slots, None).expect_err("invalid");
        assert!(e.to_string().starts_with("slots:"), "{e}");

        let nothing = encode(&[]);
        assert!(TaskSettings::from_msgpack(&nothing, None).is_err());
        let via_default =
            TaskSettings::from_msgpack(&nothing, Some(Path::new("/etc/w.hcl"))).expect("valid");
        assert_eq!(
            via_default
                .worker_invocation(Some(Path::new("/etc/w.hcl")))
                .0,
            vec!["--config", "/etc/w.hcl"]
        );
    }
}
