//! A small Prometheus registry: counters and gauges with labels, rendered in the text
//! exposition format at `/metrics`. Hand-rolled because each process exports a few dozen series
//! and a full client library would cost more build time than it saves.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: Kind,
    series: BTreeMap<String, f64>,
}

/// The metrics of one process. Names should carry the `transcode_` prefix.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

fn label_key(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let escaped = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{escaped}\"");
    }
    s.push('}');
    s
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a family so it renders (with HELP and TYPE) before its first sample.
    pub fn describe(&self, name: &str, kind: Kind, help: &str) {
        if let Ok(mut f) = self.families.lock() {
            f.entry(name.to_string()).or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                series: BTreeMap::new(),
            });
        }
    }

    fn update(&self, name: &str, kind: Kind, labels: &[(&str, &str)], op: impl FnOnce(&mut f64)) {
        if let Ok(mut f) = self.families.lock() {
            let fam = f.entry(name.to_string()).or_insert_with(|| Family {
                help: name.to_string(),
                kind,
                series: BTreeMap::new(),
            });
            op(fam.series.entry(label_key(labels)).or_insert(0.0));
        }
    }

    pub fn inc(&self, name: &str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1.0);
    }

    pub fn add(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.update(name, Kind::Counter, labels, |x| *x += v);
    }

    pub fn set(&self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.update(name, Kind::Gauge, labels, |x| *x = v);
    }

    /// Drops every series of a gauge family, for gauges rebuilt from scratch each time.
    pub fn clear(&self, name: &str) {
        if let Ok(mut f) = self.families.lock() {
            if let Some(fam) = f.get_mut(name) {
                fam.series.clear();
            }
        }
    }

    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = self.families.lock().ok()?;
        f.get(name)?.series.get(&label_key(labels)).copied()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(f) = self.families.lock() else {
            return out;
        };
        for (name, fam) in f.iter() {
            let kind = match fam.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", fam.help);
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in &fam.series {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::new();
        r.describe(
            "transcode_frames_rejected_total",
            Kind::Counter,
            "Frames refused.",
        );
        r.inc(
            "transcode_frames_rejected_total",
            &[("socket", "intake"), ("code", "malformed")],
        );
        r.inc(
            "transcode_frames_rejected_total",
            &[("socket", "intake"), ("code", "malformed")],
        );
        r.set("transcode_workers", &[], 3.0);
        let text = r.render();
        assert!(text.contains("# TYPE transcode_frames_rejected_total counter"));
        assert!(text
            .contains("transcode_frames_rejected_total{socket=\"intake\",code=\"malformed\"} 2"));
        assert!(text.contains("transcode_workers 3"));
        assert_eq!(r.get("transcode_workers", &[]), Some(3.0));
        r.set("g", &[("l", "a\"b")], 1.0);
        assert!(r.render().contains("g{l=\"a\\\"b\"} 1"));
    }
}
