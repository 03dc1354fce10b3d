//! An in-process fake of the few Nomad HTTP API endpoints the scaler's `nomad` target calls:
//! job scale status and scaling, job allocations, the node list, node eligibility and node
//! drain. It owns a small model of a cluster (nodes, one job's group counts, allocations),
//! answers with Nomad's JSON field names, and records every request exactly as it arrived
//! (method, path, raw query, `X-Nomad-Token`, JSON body) so tests can assert the wire format.
//! It can also refuse scale calls as Nomad does during a deployment, or fail the next requests
//! with any status, to exercise the target's error paths.
//!
//! It checks no ACLs and no namespaces: tests assert what was sent instead.

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// What Nomad answers while a deployment blocks scaling.
pub const DEPLOYMENT_BLOCKED: &str = "job scaling blocked due to active deployment";

/// A client node as `GET /v1/nodes` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeNode {
    pub id: String,
    pub name: String,
    pub node_class: String,
    /// `ready`, `down`, `initializing`, `disconnected`.
    pub status: String,
    /// `eligible` or `ineligible`.
    pub eligibility: String,
    /// The last drain asked for: the `DrainSpec` object (`Value::Null` for a cancelled drain).
    pub drain: Option<Value>,
}

impl FakeNode {
    /// A ready, eligible node of class `class`.
    pub fn ready(id: &str, name: &str, class: &str) -> FakeNode {
        FakeNode {
            id: id.to_string(),
            name: name.to_string(),
            node_class: class.to_string(),
            status: "ready".to_string(),
            eligibility: "eligible".to_string(),
            drain: None,
        }
    }
}

/// An allocation of the fake's job as `GET /v1/job/:job/allocations` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeAlloc {
    pub id: String,
    pub node_id: String,
    pub node_name: String,
    pub task_group: String,
    /// `pending`, `running`, `complete`, `failed`, `lost`.
    pub client_status: String,
    /// `run`, `stop`, `evict`.
    pub desired_status: String,
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// The raw query string, `None` without one.
    pub query: Option<String>,
    /// The `X-Nomad-Token` header, `None` without one.
    pub token: Option<String>,
    /// The body parsed as JSON; `None` for an empty body, `Some(Value::String)` with the raw
    /// text for a body that is not JSON.
    pub body: Option<Value>,
}

#[derive(Default)]
struct Cluster {
    job: String,
    /// Group name → desired count.
    groups: BTreeMap<String, i64>,
    nodes: Vec<FakeNode>,
    allocs: Vec<FakeAlloc>,
    requests: Vec<Recorded>,
    /// Answers for the next scale calls (POST), before any state changes.
    scale_failures: Vec<(StatusCode, String)>,
    failures: Vec<(StatusCode, String)>,
    index: u64,
}

type Shared = Arc<Mutex<Cluster>>;

/// The running fake; the server stops when this is dropped.
pub struct NomadFake {
    addr: SocketAddr,
    cluster: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for NomadFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl NomadFake {
    /// Starts the fake on 127.0.0.1 with one job whose groups start at the given counts.
    pub async fn start(job: &str, groups: &[(&str, i64)]) -> Result<NomadFake> {
        let cluster: Shared = Arc::new(Mutex::new(Cluster {
            job: job.to_string(),
            groups: groups.iter().map(|(g, c)| (g.to_string(), *c)).collect(),
            index: 100,
            ..Cluster::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Nomad fake")?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(cluster.clone());
        let server = tokio::spawn(async move {
            // The fake lives as long as the test; an accept error ends it and the test then
            // fails on its next request, which is the report we want.
            let _ = axum::serve(listener, app).await;
        });
        Ok(NomadFake {
            addr,
            cluster,
            server,
        })
    }

    /// The address to give the target, `http://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Cluster> {
        // A panicking handler must not hide the state from the test's own assertions.
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_node(&self, node: FakeNode) {
        self.lock().nodes.push(node);
    }

    pub fn node(&self, id: &str) -> Option<FakeNode> {
        self.lock().nodes.iter().find(|n| n.id == id).cloned()
    }

    /// Adds an allocation of `group` on the node with ID `node_id` (which need not exist).
    pub fn add_alloc(&self, id: &str, node_id: &str, group: &str, client_status: &str) {
        let mut c = self.lock();
        let node_name = c
            .nodes
            .iter()
            .find(|n| n.id == node_id)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        c.allocs.push(FakeAlloc {
            id: id.to_string(),
            node_id: node_id.to_string(),
            node_name,
            task_group: group.to_string(),
            client_status: client_status.to_string(),
            desired_status: "run".to_string(),
        });
    }

    pub fn add_alloc_full(&self, alloc: FakeAlloc) {
        self.lock().allocs.push(alloc);
    }

    /// The group's desired count now.
    pub fn count(&self, group: &str) -> Option<i64> {
        self.lock().groups.get(group).copied()
    }

    /// Answers the next `n` scale requests (POST) with 400 and [`DEPLOYMENT_BLOCKED`].
    pub fn block_next_scales(&self, n: u32) {
        self.fail_next_scales(n, 400, DEPLOYMENT_BLOCKED);
    }

    /// Answers the next `n` scale requests (POST) with `status` and `body`, changing nothing.
    pub fn fail_next_scales(&self, n: u32, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut c = self.lock();
        for _ in 0..n {
            c.scale_failures.push((status, body.to_string()));
        }
    }

    /// Answers the next request, whatever it is, with `status` and `body` (queued in order).
    pub fn fail_next(&self, status: u16, body: &str) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        self.lock().failures.push((status, body.to_string()));
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Forgets the requests so far, to assert on the next call alone.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }
}

fn error(status: StatusCode, text: &str) -> Response {
    // Nomad answers errors as plain text, not JSON.
    (status, text.to_string()).into_response()
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn handle(
    State(cluster): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed_body = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
        )
    };
    let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
    c.requests.push(Recorded {
        method: method.to_string(),
        path: uri.path().to_string(),
        query: uri.query().map(str::to_string),
        token: headers
            .get("x-nomad-token")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        body: parsed_body.clone(),
    });
    if !c.failures.is_empty() {
        let (status, text) = c.failures.remove(0);
        return error(status, &text);
    }
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let body = parsed_body.unwrap_or(Value::Null);
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "job", job, "scale"]) if *job == c.job => scale_status(&c),
        ("POST", ["v1", "job", job, "scale"]) if *job == c.job => scale(&mut c, &body),
        ("GET", ["v1", "job", job, "allocations"]) if *job == c.job => allocations(&c),
        ("GET" | "POST", ["v1", "job", _, ..]) => error(StatusCode::NOT_FOUND, "job not found"),
        ("GET", ["v1", "nodes"]) => nodes(&c),
        ("POST", ["v1", "node", id, "eligibility"]) => eligibility(&mut c, id, &body),
        ("POST", ["v1", "node", id, "drain"]) => drain(&mut c, id, &body),
        _ => error(StatusCode::NOT_FOUND, "Invalid URL"),
    }
}

fn scale_status(c: &Cluster) -> Response {
    let groups: serde_json::Map<String, Value> = c
        .groups
        .iter()
        .map(|(g, desired)| {
            let in_group = |status: &str| {
                c.allocs
                    .iter()
                    .filter(|a| &a.task_group == g && a.client_status == status)
                    .count()
            };
            let placed = c.allocs.iter().filter(|a| &a.task_group == g).count();
            (
                g.clone(),
                json!({
                    "Desired": desired,
                    "Placed": placed,
                    "Running": in_group("running"),
                    "Healthy": in_group("running"),
                    "Unhealthy": 0,
                    "Events": [],
                }),
            )
        })
        .collect();
    ok(json!({
        "JobID": c.job,
        "Namespace": "default",
        "JobCreateIndex": 10,
        "JobModifyIndex": c.index,
        "JobStopped": false,
        "TaskGroups": groups,
    }))
}

fn scale(c: &mut Cluster, body: &Value) -> Response {
    if !c.scale_failures.is_empty() {
        let (status, text) = c.scale_failures.remove(0);
        return error(status, &text);
    }
    let Some(group) = body["Target"]["Group"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "missing task group name");
    };
    let Some(desired) = c.groups.get_mut(group) else {
        return error(StatusCode::BAD_REQUEST, "task group not found in job");
    };
    let count = match body.get("Count") {
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Some(n),
            _ => return error(StatusCode::BAD_REQUEST, "invalid count"),
        },
        // Nomad takes a request without Count as "record a scaling event only".
        None => None,
    };
    if let Some(n) = count {
        *desired = n;
    }
    c.index += 1;
    ok(json!({
        "EvalID": format!("eval-{}", c.index),
        "EvalCreateIndex": c.index,
        "JobModifyIndex": c.index,
        "Warnings": "",
        "Index": c.index,
        "LastContact": 0,
        "KnownLeader": true,
    }))
}

fn allocations(c: &Cluster) -> Response {
    let list: Vec<Value> = c
        .allocs
        .iter()
        .map(|a| {
            json!({
                "ID": a.id,
                "Name": format!("{}.{}[0]", c.job, a.task_group),
                "Namespace": "default",
                "NodeID": a.node_id,
                "NodeName": a.node_name,
                "JobID": c.job,
                "TaskGroup": a.task_group,
                "DesiredStatus": a.desired_status,
                "ClientStatus": a.client_status,
                "CreateIndex": 10,
                "ModifyIndex": c.index,
            })
        })
        .collect();
    ok(Value::Array(list))
}

fn nodes(c: &Cluster) -> Response {
    let list: Vec<Value> = c
        .nodes
        .iter()
        .map(|n| {
            json!({
                "ID": n.id,
                "Name": n.name,
                "Address": "127.0.0.1",
                "Datacenter": "dc1",
                "NodeClass": n.node_class,
                "NodePool": "default",
                "Version": "1.9.0",
                "Drain": matches!(&n.drain, Some(d) if !d.is_null()),
                "SchedulingEligibility": n.eligibility,
                "Status": n.status,
                "StatusDescription": "",
                "Drivers": {},
                "CreateIndex": 5,
                "ModifyIndex": c.index,
            })
        })
        .collect();
    ok(Value::Array(list))
}

fn eligibility(c: &mut Cluster, id: &str, body: &Value) -> Response {
    let Some(want) = body["Eligibility"].as_str() else {
        return error(StatusCode::BAD_REQUEST, "missing eligibility");
    };
    if want != "eligible" && want != "ineligible" {
        return error(StatusCode::BAD_REQUEST, "invalid scheduling eligibility");
    }
    c.index += 1;
    let index = c.index;
    let Some(node) = c.nodes.iter_mut().find(|n| n.id == id) else {
        return error(StatusCode::NOT_FOUND, "node not found");
    };
    node.eligibility = want.to_string();
    ok(json!({ "EvalIDs": [], "EvalCreateIndex": 0, "NodeModifyIndex": index }))
}

fn drain(c: &mut Cluster, id: &str, body: &Value) -> Response {
    let Some(spec) = body.get("DrainSpec") else {
        return error(StatusCode::BAD_REQUEST, "missing DrainSpec");
    };
    if !spec.is_null() && !spec["Deadline"].is_i64() {
        return error(
            StatusCode::BAD_REQUEST,
            "DrainSpec.Deadline must be an integer",
        );
    }
    c.index += 1;
    let index = c.index;
    let Some(node) = c.nodes.iter_mut().find(|n| n.id == id) else {
        return error(StatusCode::NOT_FOUND, "node not found");
    };
    node.drain = Some(spec.clone());
    // As in Nomad: a drain makes the node ineligible, and ending one may make it eligible.
    if !spec.is_null() {
        node.eligibility = "ineligible".to_string();
    } else if body["MarkEligible"].as_bool() == Some(true) {
        node.eligibility = "eligible".to_string();
    }
    ok(json!({ "EvalIDs": [], "EvalCreateIndex": 0, "NodeModifyIndex": index }))
}
