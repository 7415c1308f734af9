//! What an update would install, before it runs: `POST /v1/node/preview`
//! runs the node's `preview_hook` (never its update hook) with the update
//! command in `FERRY_UPDATE_COMMAND`, and answers with its exit status and
//! output, as CAU's preview shows the updates each node would get.

use super::node::{Node, NodeError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The longest a preview hook may run before it is killed: within the
/// API's default request timeout (30 s) and the CLI's.
pub const PREVIEW_TIMEOUT: Duration = Duration::from_secs(25);
/// The most output kept, per stream.
const MAX_OUTPUT: usize = 64 << 10;

/// The body of `POST /v1/node/preview`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The update command the preview is for.
    pub command: String,
}

/// What the preview hook said.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preview {
    /// The node.
    pub node: String,
    /// The hook run.
    pub argv: Vec<String>,
    /// Its exit status (`None`: killed, or it did not start).
    pub exit_code: Option<i32>,
    /// The end of its standard output.
    pub stdout: String,
    /// The end of its standard error.
    pub stderr: String,
    /// How long it ran, ms.
    pub duration_ms: u64,
    /// Why it did not run to a clean end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Node {
    /// `POST /v1/node/preview`: runs the node's preview hook and waits for
    /// it (at most [`PREVIEW_TIMEOUT`]).
    pub async fn preview(&self, req: PreviewRequest) -> Result<Preview, NodeError> {
        if req.command.len() > super::rolling::MAX_COMMAND {
            return Err(NodeError::BadRequest(format!(
                "command: at most {} bytes",
                super::rolling::MAX_COMMAND
            )));
        }
        let Some(argv) = self.spec.preview_hook.clone() else {
            return Err(NodeError::Conflict(format!(
                "node {} has no preview_hook in the cluster file: it cannot preview an update",
                self.name()
            )));
        };
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("FERRY_NODE", self.name())
            .env("FERRY_UPDATE_COMMAND", &req.command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        super::child::die_with_agent(&mut cmd);
        let (exit_code, stdout, stderr, error) = match cmd.spawn() {
            Err(e) => (
                None,
                String::new(),
                String::new(),
                Some(format!("cannot run {}: {e}", argv[0])),
            ),
            Ok(child) => {
                let ended = super::child::wait_keeping_tail(child, MAX_OUTPUT);
                match tokio::time::timeout(PREVIEW_TIMEOUT, ended).await {
                    Ok(Ok(o)) => {
                        let error = (!o.status.success())
                            .then(|| format!("the preview hook exited with {}", o.status));
                        (o.status.code(), o.stdout, o.stderr, error)
                    }
                    Ok(Err(e)) => (
                        None,
                        String::new(),
                        String::new(),
                        Some(format!("waiting for the preview hook: {e}")),
                    ),
                    // Dropping the child kills it.
                    Err(_) => (
                        None,
                        String::new(),
                        String::new(),
                        Some(format!(
                            "the preview hook ran over {} s: killed",
                            PREVIEW_TIMEOUT.as_secs()
                        )),
                    ),
                }
            }
        };
        Ok(Preview {
            node: self.name().to_string(),
            argv,
            exit_code,
            stdout,
            stderr,
            duration_ms: start.elapsed().as_millis() as u64,
            error,
        })
    }
}
