//! The `command` target: each scaling operation is a shell command the operator configures,
//! e.g. `terraform apply -auto-approve -var worker_nodes=$TRANSCODE_SCALE_COUNT` to add or
//! remove a node. This module owns running those commands: the `TRANSCODE_SCALE_*`
//! environment they get, the time limit (past it the command's whole process group is
//! killed, so a `terraform` that forked providers leaves nothing behind), and reading their
//! answers (a new node's name, the node list).
//!
//! The contract for commands: a command is finished when it has exited and closed its stdout
//! and stderr (as with `$(…)` in a shell), so anything it leaves running in the background
//! must redirect its output; a non-zero exit is a failure; `add_node` prints the new node's
//! name as its last non-empty stdout line; `list_nodes` prints one `name [containers]` line
//! per node. An operation without a command is unsupported.

use super::{NodeInfo, Target, TargetError, TargetResult};
use async_trait::async_trait;
use std::collections::HashSet;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// After the time limit the group gets SIGTERM, and this long later SIGKILL: `terraform`
/// releases its state lock on SIGTERM, which saves the operator a `force-unlock`.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Failed commands report this many of their last stderr lines.
const STDERR_LINES: usize = 10;

#[derive(Debug, Clone, Default)]
pub struct CommandSettings {
    pub add_node: Option<String>,
    pub remove_node: Option<String>,
    pub start_container: Option<String>,
    pub stop_container: Option<String>,
    pub list_nodes: Option<String>,
    /// The limit for one command, from start until its output is closed.
    pub timeout: Duration,
}

impl CommandSettings {
    /// Settings from the `scaling.command` block; an empty command means "not configured".
    pub fn from_config(c: &transcode_core::config::CommandTargetConfig) -> CommandSettings {
        let some = |v: &str| (!v.trim().is_empty()).then(|| v.to_string());
        CommandSettings {
            add_node: some(&c.add_node),
            remove_node: some(&c.remove_node),
            start_container: some(&c.start_container),
            stop_container: some(&c.stop_container),
            list_nodes: some(&c.list_nodes),
            timeout: Duration::from_secs(c.timeout_seconds),
        }
    }
}

pub struct CommandTarget {
    settings: CommandSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AddNode,
    RemoveNode,
    StartContainer,
    StopContainer,
    ListNodes,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AddNode => "add_node",
            Op::RemoveNode => "remove_node",
            Op::StartContainer => "start_container",
            Op::StopContainer => "stop_container",
            Op::ListNodes => "list_nodes",
        }
    }
}

/// What a command that exited 0 printed.
struct Finished {
    stdout: String,
}

async fn read_all<R: AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        // A read error just ends the output early; the exit status still decides success.
        let _ = pipe.read_to_end(&mut buf).await;
    }
    buf
}

fn signal_group(pgid: Option<u32>, signal: nix::sys::signal::Signal) {
    let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    // ESRCH (the group is already gone) is the outcome we want anyway.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "an unknown exit status".to_string(),
    }
}

/// Parses `list_nodes` output: one `name [containers]` per line, blank lines ignored.
fn parse_node_list(stdout: &str) -> TargetResult<Vec<NodeInfo>> {
    let mut nodes = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in stdout.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = |why: &str| {
            TargetError::Failed(format!(
                "list_nodes output line {}: {line:?}: {why} (expected `name [containers]`)",
                i + 1
            ))
        };
        let (name, containers) = match fields.as_slice() {
            [] => continue,
            [name] => (*name, 0),
            [name, count] => (
                *name,
                count
                    .parse::<u32>()
                    .map_err(|_| bad("containers is not a whole number"))?,
            ),
            _ => return Err(bad("too many fields")),
        };
        if !seen.insert(name.to_string()) {
            return Err(bad("node listed twice"));
        }
        nodes.push(NodeInfo {
            name: name.to_string(),
            containers,
        });
    }
    Ok(nodes)
}

impl CommandTarget {
    pub fn new(settings: CommandSettings) -> CommandTarget {
        CommandTarget { settings }
    }

    fn command_for(&self, op: Op) -> TargetResult<&str> {
        let cmd = match op {
            Op::AddNode => &self.settings.add_node,
            Op::RemoveNode => &self.settings.remove_node,
            Op::StartContainer => &self.settings.start_container,
            Op::StopContainer => &self.settings.stop_container,
            Op::ListNodes => &self.settings.list_nodes,
        };
        match cmd.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => Ok(c),
            _ => Err(TargetError::Unsupported {
                target: "command",
                op: op.name(),
            }),
        }
    }

    /// Runs the command for `op` with `TRANSCODE_SCALE_OP` plus `env`.
    async fn run(&self, op: Op, env: &[(&str, String)]) -> TargetResult<Finished> {
        let script = self.command_for(op)?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .env("TRANSCODE_SCALE_OP", op.name())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so the time limit reaches everything the command forked,
            // not just `sh`.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            TargetError::Failed(format!("{} command: cannot run sh: {e}", op.name()))
        })?;
        let pgid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let limit = self.settings.timeout;
        let finished = tokio::time::timeout(limit, async {
            tokio::join!(read_all(stdout), read_all(stderr), child.wait())
        })
        .await;
        let (out, err, status) = match finished {
            Ok(done) => done,
            Err(_) => {
                signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
                let _ = tokio::time::timeout(TERM_GRACE, child.wait()).await;
                // Whether `sh` left on SIGTERM or not, whatever it forked may still ignore it.
                signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill().await;
                tracing::warn!(op = op.name(), ?limit, "scaling command timed out; killed");
                return Err(TargetError::Timeout(limit));
            }
        };
        let status = status.map_err(|e| {
            TargetError::Failed(format!("{} command: waiting for it: {e}", op.name()))
        })?;
        if !status.success() {
            let err = String::from_utf8_lossy(&err);
            let tail = last_lines(&err, STDERR_LINES);
            return Err(TargetError::Failed(if tail.is_empty() {
                format!(
                    "{} command failed with {}",
                    op.name(),
                    describe_exit(status)
                )
            } else {
                format!(
                    "{} command failed with {}: {tail}",
                    op.name(),
                    describe_exit(status)
                )
            }));
        }
        Ok(Finished {
            stdout: String::from_utf8_lossy(&out).into_owned(),
        })
    }

    /// The node list from a fresh `list_nodes` run, or `None` without that command.
    async fn current_nodes(&self) -> TargetResult<Option<Vec<NodeInfo>>> {
        match self.nodes().await {
            Ok(nodes) => Ok(Some(nodes)),
            Err(TargetError::Unsupported { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// `TRANSCODE_SCALE_DEADLINE_SECONDS`, rounded up so a sub-second deadline is not 0.
fn deadline_seconds(deadline: Duration) -> String {
    let whole = deadline.as_secs();
    let extra = u64::from(deadline.subsec_nanos() > 0);
    whole.saturating_add(extra).to_string()
}

#[async_trait]
impl Target for CommandTarget {
    fn kind(&self) -> &'static str {
        "command"
    }

    async fn nodes(&self) -> TargetResult<Vec<NodeInfo>> {
        let done = self.run(Op::ListNodes, &[]).await?;
        parse_node_list(&done.stdout)
    }

    /// `TRANSCODE_SCALE_COUNT` is the node count after the change, counted by `list_nodes`
    /// just before; without a `list_nodes` command it is not set.
    async fn add_node(&self) -> TargetResult<String> {
        self.command_for(Op::AddNode)?;
        let mut env = Vec::new();
        if let Some(nodes) = self.current_nodes().await? {
            env.push(("TRANSCODE_SCALE_COUNT", (nodes.len() + 1).to_string()));
        }
        let done = self.run(Op::AddNode, &env).await?;
        done.stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                TargetError::Failed(
                    "add_node command succeeded but printed no node name on stdout".to_string(),
                )
            })
    }

    async fn remove_node(&self, node: &str, deadline: Duration) -> TargetResult<()> {
        self.command_for(Op::RemoveNode)?;
        let mut env = vec![
            ("TRANSCODE_SCALE_NODE", node.to_string()),
            (
                "TRANSCODE_SCALE_DEADLINE_SECONDS",
                deadline_seconds(deadline),
            ),
        ];
        if let Some(nodes) = self.current_nodes().await? {
            // A count computed for a node that is not there would shrink the wrong one.
            if !nodes.iter().any(|n| n.name == node) {
                return Err(TargetError::UnknownNode(node.to_string()));
            }
            env.push(("TRANSCODE_SCALE_COUNT", (nodes.len() - 1).to_string()));
        }
        self.run(Op::RemoveNode, &env).await.map(drop)
    }

    async fn start_container(&self, node: &str) -> TargetResult<()> {
        let env = [("TRANSCODE_SCALE_NODE", node.to_string())];
        self.run(Op::StartContainer, &env).await.map(drop)
    }

    async fn stop_container(&self, node: &str, member: &str) -> TargetResult<()> {
        let env = [
            ("TRANSCODE_SCALE_NODE", node.to_string()),
            ("TRANSCODE_SCALE_MEMBER", member.to_string()),
        ];
        self.run(Op::StopContainer, &env).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn target(f: impl FnOnce(&mut CommandSettings)) -> CommandTarget {
        let mut s = CommandSettings {
            timeout: Duration::from_secs(10),
            ..CommandSettings::default()
        };
        f(&mut s);
        CommandTarget::new(s)
    }

    fn alive(pid: i32) -> bool {
        // Signal 0 only checks; a zombie would still answer, so look at its state too.
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
        !matches!(state, Some('Z') | None)
    }

    #[tokio::test]
    async fn add_node_answers_the_last_stdout_line() {
        let t = target(|s| {
            s.add_node = Some("echo planning; echo; echo '  node-7  '; echo".into());
        });
        assert_eq!(t.add_node().await.expect("add_node"), "node-7");
        assert_eq!(t.kind(), "command");
    }

    #[tokio::test]
    async fn add_node_without_a_name_fails() {
        let t = target(|s| s.add_node = Some("echo only-stderr >&2".into()));
        let e = t.add_node().await.expect_err("no name");
        assert!(e.to_string().contains("no node name"), "{e}");
    }

    #[tokio::test]
    async fn non_zero_exit_carries_code_and_last_stderr_lines() {
        let t = target(|s| {
            s.start_container =
                Some("for i in $(seq 1 30); do echo line-$i >&2; done; echo out; exit 3".into());
        });
        let e = t.start_container("n1").await.expect_err("exit 3");
        let TargetError::Failed(msg) = &e else {
            panic!("not Failed: {e:?}");
        };
        assert!(msg.contains("start_container"), "{msg}");
        assert!(msg.contains("exit code 3"), "{msg}");
        assert!(msg.contains("line-30") && msg.contains("line-21"), "{msg}");
        assert!(!msg.contains("line-20"), "only the last lines: {msg}");
        assert!(!msg.contains("out"), "stdout is not stderr: {msg}");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("grandchild");
        let t = target(|s| {
            s.timeout = Duration::from_millis(500);
            s.stop_container = Some(format!(
                "sleep 30 & echo $! > {}; sleep 30",
                pidfile.display()
            ));
        });
        let started = Instant::now();
        let e = t.stop_container("n1", "w1").await.expect_err("timeout");
        let took = started.elapsed();
        assert!(
            matches!(e, TargetError::Timeout(d) if d == Duration::from_millis(500)),
            "{e:?}"
        );
        // sleep dies on SIGTERM, so the grace period is not used up.
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("the command wrote the background pid")
            .trim()
            .parse()
            .expect("a pid");
        let gone_by = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < gone_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "background sleep {pid} survived the timeout");
    }

    #[tokio::test]
    async fn timeout_escalates_to_sigkill_for_what_ignores_sigterm() {
        let t = target(|s| {
            s.timeout = Duration::from_millis(200);
            s.start_container = Some("trap '' TERM; sleep 30 & wait".into());
        });
        let started = Instant::now();
        let e = t.start_container("n1").await.expect_err("timeout");
        assert!(matches!(e, TargetError::Timeout(_)), "{e:?}");
        let took = started.elapsed();
        assert!(
            took >= TERM_GRACE && took < TERM_GRACE + Duration::from_secs(3),
            "took {took:?}"
        );
    }

    #[tokio::test]
    async fn env_vars_are_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dump = |name: &str| {
            format!(
                "env | grep '^TRANSCODE_SCALE_' | sort > {}",
                dir.path().join(name).display()
            )
        };
        let read = |name: &str| {
            std::fs::read_to_string(dir.path().join(name)).expect("the command wrote its env")
        };
        let t = target(|s| {
            s.list_nodes = Some("printf 'a 2\\nb\\n'".into());
            s.add_node = Some(format!("{}; echo c", dump("add")));
            s.remove_node = Some(dump("remove"));
            s.start_container = Some(dump("start"));
            s.stop_container = Some(dump("stop"));
        });
        assert_eq!(t.add_node().await.expect("add"), "c");
        assert_eq!(
            read("add"),
            "TRANSCODE_SCALE_COUNT=3\nTRANSCODE_SCALE_OP=add_node\n"
        );
        t.remove_node("b", Duration::from_millis(1500))
            .await
            .expect("remove");
        assert_eq!(
            read("remove"),
            "TRANSCODE_SCALE_COUNT=1\nTRANSCODE_SCALE_DEADLINE_SECONDS=2\n\
             TRANSCODE_SCALE_NODE=b\nTRANSCODE_SCALE_OP=remove_node\n"
        );
        t.start_container("a").await.expect("start");
        assert_eq!(
            read("start"),
            "TRANSCODE_SCALE_NODE=a\nTRANSCODE_SCALE_OP=start_container\n"
        );
        t.stop_container("a", "w-9").await.expect("stop");
        assert_eq!(
            read("stop"),
            "TRANSCODE_SCALE_MEMBER=w-9\nTRANSCODE_SCALE_NODE=a\n\
             TRANSCODE_SCALE_OP=stop_container\n"
        );
    }

    #[tokio::test]
    async fn remove_of_an_unlisted_node_runs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let t = target(|s| {
            s.list_nodes = Some("echo a".into());
            s.remove_node = Some(format!("touch {}", marker.display()));
        });
        let e = t.remove_node("zz", Duration::from_secs(1)).await;
        assert!(
            matches!(e, Err(TargetError::UnknownNode(ref n)) if n == "zz"),
            "{e:?}"
        );
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn without_list_nodes_the_count_is_not_set() {
        let t = target(|s| {
            s.add_node = Some("test -z \"${TRANSCODE_SCALE_COUNT+set}\" && echo n1".into());
        });
        // With the variable set, `test` fails and so does the command.
        assert_eq!(t.add_node().await.expect("add"), "n1");
    }

    #[tokio::test]
    async fn list_nodes_parses_and_reports_bad_lines() {
        let t = target(|s| s.list_nodes = Some("printf 'n1 3\\n\\n  n2  \\nn3 0\\n'".into()));
        assert_eq!(
            t.nodes().await.expect("list"),
            vec![
                NodeInfo {
                    name: "n1".into(),
                    containers: 3
                },
                NodeInfo {
                    name: "n2".into(),
                    containers: 0
                },
                NodeInfo {
                    name: "n3".into(),
                    containers: 0
                },
            ]
        );
        for (out, why) in [
            (
                "n1 3\nn2 many\n",
                "line 2: \"n2 many\": containers is not a whole number",
            ),
            ("n1 -1\n", "containers is not a whole number"),
            ("n1 1 extra\n", "line 1: \"n1 1 extra\": too many fields"),
            ("n1\nn1 2\n", "node listed twice"),
        ] {
            let e = parse_node_list(out).expect_err(out);
            assert!(e.to_string().contains(why), "{out:?}: {e}");
        }
    }

    #[tokio::test]
    async fn missing_commands_are_unsupported() {
        let t = target(|s| s.list_nodes = Some("   ".into()));
        for e in [
            t.nodes().await.map(drop).expect_err("list"),
            t.add_node().await.map(drop).expect_err("add"),
            t.remove_node("n", Duration::ZERO)
                .await
                .expect_err("remove"),
            t.start_container("n").await.expect_err("start"),
            t.stop_container("n", "m").await.expect_err("stop"),
        ] {
            assert!(
                matches!(
                    e,
                    TargetError::Unsupported {
                        target: "command",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn deadline_rounds_up() {
        assert_eq!(deadline_seconds(Duration::ZERO), "0");
        assert_eq!(deadline_seconds(Duration::from_millis(1)), "1");
        assert_eq!(deadline_seconds(Duration::from_secs(60)), "60");
    }
}
