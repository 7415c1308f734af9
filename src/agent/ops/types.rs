//! What node operations are made of, as the API shows them: an
//! operation's kind, state and steps, what interrupted it, the VMs it left,
//! an update's run, and a drain's request.

use super::*;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Pause the node and move its VMs away.
    Drain,
    /// Take VMs again (and bring back what the drain moved, with failback).
    Resume,
    /// Run an update command on the (drained) node through its hook.
    Update,
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    /// Moving VMs.
    Running,
    /// Every step completed, and (a drain) the node hosts nothing.
    Completed,
    /// A drain whose steps ended, but VMs are still on the node: those that
    /// fit nowhere, paused ones (listed in `remaining`).
    Partial,
    /// A step failed; the others ran to their end.
    Failed,
    /// Cancelled by an operator; steps not yet started were not.
    Cancelled,
}

/// How long a drain waits for another node to say how much room it has.
pub(super) const ASK_NODE: Duration = Duration::from_secs(3);

/// One VM's move within an operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// The VM.
    pub vm: String,
    /// Its memory, bytes.
    pub memory: u64,
    /// Where it moves from.
    pub source: String,
    /// Where it moves to (empty when no node had room).
    pub target: String,
    /// `planned`, then the migration's state (`queued`, `running`,
    /// `completed`, `failed`, `cancelled`, `unresolved`), or `skipped`; a
    /// drain's step starts `arriving` while its VM is still arriving on the
    /// drained node, and is planned once it lands.
    pub state: String,
    /// The migration, once asked for (on the source node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Why it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it started moving memory, ms since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Targets a drain tried before this one, each of whose migrations
    /// failed with the VM still running on the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<String>,
}

impl Step {
    /// A step of `vm` (`memory` bytes) from `source` to `target`, in
    /// `state`, not yet asked for.
    pub(in crate::agent) fn new(
        (vm, memory): (String, u64),
        source: &str,
        target: &str,
        (state, error): (&str, Option<String>),
    ) -> Self {
        Step {
            vm,
            memory,
            source: source.to_string(),
            target: target.to_string(),
            state: state.to_string(),
            migration_id: None,
            error,
            started_at_ms: None,
            finished_at_ms: None,
            tried: Vec::new(),
        }
    }

    /// Records the answer to asking for the step's migration: queued under
    /// its id, or failed saying why.
    pub(in crate::agent) fn asked(&mut self, answer: Result<String, impl std::fmt::Display>) {
        match answer {
            Ok(id) => {
                self.migration_id = Some(id);
                self.state = "queued".into();
            }
            Err(e) => {
                self.state = "failed".into();
                self.error = Some(e.to_string());
            }
        }
    }

    /// It never starts, for `why`.
    pub(in crate::agent) fn skip(&mut self, why: String) {
        self.state = "skipped".into();
        self.error = Some(why);
    }

    /// Whether it ended (or never starts).
    pub fn is_final(&self) -> bool {
        step_ended(&self.state)
    }
}

/// An operation as `GET /v1/operations/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationView {
    /// Its id.
    pub id: String,
    /// Drain or resume.
    pub kind: OpKind,
    /// The node it was asked of.
    pub node: String,
    /// Where it is.
    pub state: OpState,
    /// What it was asked with.
    pub params: Value,
    /// Ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Once ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Per VM.
    pub steps: Vec<Step>,
    /// What went wrong, once ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An update's command run, once it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateRun>,
    /// A drain, once ended: the VMs still on the node, with their state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remaining: Vec<RemainingVm>,
    /// It was running when its agent stopped: a restarted agent ended it
    /// `failed` (an update command may restart the agent on purpose).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// How its agent stopped, when `interrupted`: `stop` (a clean stop,
    /// such as SIGTERM, marked it) or `crash` (the agent ended without
    /// one; its restart found it still running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption: Option<Interruption>,
}

/// How an operation's agent stopped while it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interruption {
    /// A clean stop.
    Stop,
    /// No clean stop: killed, or it failed.
    Crash,
}

/// A VM a drain left on its node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemainingVm {
    /// The VM.
    pub vm: String,
    /// Its state there (`running`, `paused`, ...).
    pub state: String,
}

/// What an update command did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateRun {
    /// The program and arguments run (the hook, then the command).
    pub argv: Vec<String>,
    /// Its exit status (`None`: killed by a signal, or it did not start).
    pub exit_code: Option<i32>,
    /// The end of its standard output.
    pub stdout: String,
    /// The end of its standard error.
    pub stderr: String,
    /// How long it ran, ms.
    pub duration_ms: u64,
}

/// The most output of an update command kept, per stream.
pub(super) const MAX_OUTPUT: usize = 64 << 10;

pub(crate) struct Operation {
    pub(crate) view: OperationView,
    pub(crate) cancel: CancellationToken,
    /// An update whose command has been started (a clean stop before that
    /// ends it as not run, never as a restart the command caused).
    pub(crate) command_started: bool,
}

/// The body of `POST /v1/node/drain`.
#[derive(Debug, Clone, Default)]
pub struct DrainRequest {
    /// Migrations of this drain at once (default: the node's limit, which
    /// also bounds it), or `Auto`: chosen when it starts.
    pub max_concurrent: Option<crate::agent::request::Concurrency>,
    /// Move what fits instead of refusing when the other nodes cannot hold
    /// every VM.
    pub allow_partial: bool,
    /// The asker's key: the drain it started before is answered again.
    pub request_id: Option<String>,
    /// Offer each VM's arrival as a delta base where it goes back to the
    /// node it came from (`--delta`, default on).
    pub delta: bool,
}

/// Whether a step in `state` ended (or never starts): not `planned`,
/// `queued`, `running` or `arriving`.
pub fn step_ended(state: &str) -> bool {
    !matches!(state, "planned" | "queued" | "running" | "arriving")
}
