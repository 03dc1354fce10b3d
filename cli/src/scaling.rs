//! `transcode scaling status`: what the leading scaler's autoscaler sees and decides, read from
//! its `/v1/scaling` document: the policies in force, the inputs of the last evaluation, the
//! streaks and cooldowns, the actions in progress and the recent decisions.

use crate::output;
use anyhow::{Context, Result};
use serde_json::Value;

/// The scaler's HTTP endpoint did not answer (exit code 5, like an unreachable bus).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the scaler at {url} (scaler.http, or --scaler-http): {source}")]
pub struct Unreachable {
    url: String,
    source: reqwest::Error,
}

pub async fn status(addr: &str, json: bool) -> Result<()> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}/v1/scaling", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}/v1/scaling")
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .context("http client")?;
    let doc = client
        .get(&url)
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the scaler at {url} (scaler.http, or --scaler-http)")
        })?
        .error_for_status()
        .with_context(|| url.clone())?
        .bytes()
        .await
        .with_context(|| format!("{url}: reading the answer"))?;
    // reqwest is built without its `json` feature (shared with object_store's build), so parse here.
    let doc: Value =
        serde_json::from_slice(&doc).with_context(|| format!("{url}: not a JSON answer"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{}", render(&doc));
    Ok(())
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{f:.0}"),
        Some(f) => format!("{f:.1}"),
        None if v.is_null() => "-".into(),
        None => v.to_string().trim_matches('"').to_string(),
    }
}

fn policy_line(p: &Value) -> String {
    let keys = [
        "min",
        "max",
        "cpu_low",
        "cpu_high",
        "mem_high",
        "within_bounds_trigger",
        "cooldown_up_ms",
        "cooldown_down_ms",
        "evaluation_interval_ms",
        "dry_run",
    ];
    keys.iter()
        .map(|k| format!("{k}={}", num(&p[*k])))
        .collect::<Vec<_>>()
        .join(" ")
}

fn state_line(s: &Value) -> String {
    match s.as_object() {
        Some(o) => o
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array())
            .map(|(k, v)| format!("{k}={}", num(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => "-".into(),
    }
}

/// The human view of the status document.
pub fn render(doc: &Value) -> String {
    if doc["enabled"] != Value::Bool(true) {
        return "autoscaling is off on this scaler (scaling.enabled = false)\n".into();
    }
    let mut out = String::new();
    let node = &doc["node"];
    out.push_str(&format!(
        "leader: {}\n\nnode policy (target {}): {}\n",
        num(&doc["leader"]),
        num(&node["target"]),
        policy_line(&node["policy"])
    ));
    let inputs = &node["last"]["inputs"];
    out.push_str(&format!(
        "  inputs: nodes={} cpu={} mem={} queued={} free_slots={}\n  state: {}\n  last decision: {}\n",
        num(&inputs["current"]),
        num(&inputs["cpu"]),
        num(&inputs["mem"]),
        num(&inputs["queued"]),
        num(&inputs["free_slots"]),
        state_line(&node["state"]),
        num(&node["last"]["decision"]["reason"]),
    ));
    if node["action_in_progress"] == Value::Bool(true) {
        out.push_str("  an action is in progress\n");
    }
    let rows: Vec<Vec<String>> = node["last"]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    vec![
                        num(&n["name"]),
                        num(&n["containers"]),
                        num(&n["cpu"]),
                        num(&n["mem"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&output::table(
            &["NODE", "CONTAINERS", "CPU%", "MEM%"],
            &rows,
        ));
    }
    let c = &doc["container"];
    out.push_str(&format!(
        "\ncontainer policy (target {}, per node): {}\n",
        num(&c["target"]),
        policy_line(&c["policy"])
    ));
    let rows: Vec<Vec<String>> = c["nodes"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, n)| {
                    vec![
                        name.clone(),
                        num(&n["containers"]),
                        num(&n["cpu"]),
                        num(&n["mem"]),
                        state_line(&n["state"]),
                        num(&n["reason"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !rows.is_empty() {
        out.push_str(&output::table(
            &[
                "NODE",
                "CONTAINERS",
                "CPU%",
                "MEM%",
                "STATE",
                "LAST DECISION",
            ],
            &rows,
        ));
    }
    let recent: Vec<Vec<String>> = doc["recent"]
        .as_array()
        .map(|a| {
            a.iter()
                .rev()
                .map(|r| {
                    let what = if r["done"].is_null() {
                        let d = &r["decision"];
                        if d.is_null() {
                            num(&r["action"])
                        } else {
                            num(&d["action"])
                        }
                    } else {
                        num(&r["done"])
                    };
                    let why = if r["reason"].is_null() {
                        num(&r["decision"]["reason"])
                    } else {
                        num(&r["reason"])
                    };
                    vec![num(&r["at"]), num(&r["level"]), num(&r["node"]), what, why]
                })
                .collect()
        })
        .unwrap_or_default();
    if !recent.is_empty() {
        out.push_str("\nrecent decisions (newest first):\n");
        out.push_str(&output::table(
            &["TIME", "LEVEL", "NODE", "WHAT", "WHY"],
            &recent,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn off_and_on() {
        assert!(super::render(&serde_json::json!({"enabled": false})).contains("is off"));
        let doc = serde_json::json!({
            "enabled": true,
            "leader": "scaler-a",
            "node": {"target": "local", "policy": {"min": 1, "max": 4, "cpu_high": 80.0},
                     "state": {"up_streak": 2},
                     "last": {"inputs": {"current": 2, "cpu": 91.5, "queued": 7},
                              "decision": {"reason": "cpu 91.5 > 80"},
                              "nodes": [{"name": "local-1", "containers": 2, "cpu": 91.5, "mem": 20.0}]}},
            "container": {"target": "local", "policy": {"max": 3},
                          "nodes": {"local-1": {"containers": 2, "cpu": 91.5, "reason": "overload"}}},
            "recent": [{"level": "node", "at": "t1", "done": "scaled up", "from": 1, "to": 2}],
        });
        let s = super::render(&doc);
        for want in [
            "scaler-a",
            "target local",
            "cpu=91.5",
            "up_streak=2",
            "local-1",
            "overload",
            "scaled up",
        ] {
            assert!(s.contains(want), "{want:?} missing from:\n{s}");
        }
    }
}
