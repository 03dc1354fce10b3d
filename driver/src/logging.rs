//! hclog-compatible logging. go-plugin's host parses each stderr line of a plugin as JSON with
//! `@level`, `@message`, `@timestamp` (and optional `@module`), and re-logs it at that level in
//! the Nomad agent's log; anything else is logged at debug and loses its level. This module owns
//! a `tracing` layer that writes exactly that shape, one JSON object per line.

use std::io::Write;
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// Writes hclog JSON lines to a sink (stderr in the plugin, a buffer in tests).
pub struct HclogLayer<W: Write + Send + 'static> {
    sink: Mutex<W>,
}

impl<W: Write + Send + 'static> HclogLayer<W> {
    pub fn new(sink: W) -> Self {
        Self {
            sink: Mutex::new(sink),
        }
    }
}

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(key(field), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(key(field), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(key(field), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(key(field), Value::Bool(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(key(field), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(key(field), Value::String(format!("{value:?}")));
    }
}

/// The event's `message` field becomes hclog's `@message`; other fields keep their names.
fn key(field: &Field) -> String {
    if field.name() == "message" {
        "@message".to_owned()
    } else {
        field.name().to_owned()
    }
}

fn hclog_level(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// Formats one event as an hclog JSON line (without the newline).
pub fn format_line(level: &Level, module: &str, fields: Map<String, Value>) -> String {
    let mut obj = fields;
    obj.insert("@level".into(), Value::String(hclog_level(level).into()));
    obj.insert(
        "@timestamp".into(),
        // hclog's JSON time format: RFC 3339 with microseconds and a numeric offset.
        Value::String(
            chrono::Local::now()
                .format("%Y-%m-%dT%H:%M:%S%.6f%:z")
                .to_string(),
        ),
    );
    obj.insert("@module".into(), Value::String(module.into()));
    obj.entry("@message")
        .or_insert_with(|| Value::String(String::new()));
    Value::Object(obj).to_string()
}

impl<S: Subscriber, W: Write + Send + 'static> Layer<S> for HclogLayer<W> {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let line = format_line(event.metadata().level(), event.metadata().target(), fields);
        // A poisoned lock only means another thread panicked mid-write; keep logging.
        let mut sink = match self.sink.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // Logging must never take the plugin down, so write errors are dropped.
        let _ = writeln!(sink, "{line}");
        let _ = sink.flush();
    }
}

/// Installs the hclog layer on stderr. The level comes from `NOMAD_DRIVER_TRANSCODE_LOG`
/// (env-filter syntax), default `info`.
pub fn init() {
    let filter = EnvFilter::try_from_env("NOMAD_DRIVER_TRANSCODE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(HclogLayer::new(std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_hclog_keys() {
        let mut f = Map::new();
        f.insert("@message".into(), Value::String("hello".into()));
        f.insert("task_id".into(), Value::String("t1".into()));
        let line = format_line(&Level::WARN, "driver", f);
        let v: Value = serde_json::from_str(&line).expect("valid json");
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["@message"], "hello");
        assert_eq!(v["task_id"], "t1");
        let ts = v["@timestamp"].as_str().expect("timestamp string");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    }
}
