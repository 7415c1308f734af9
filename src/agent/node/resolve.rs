//! Settling an unresolved hand-off by asking the target where the VM runs.

use super::*;

impl Node {
    /// `POST /v1/migrations/{id}/resolve`: settles an unresolved migration
    /// after asking the target whether it runs the VM. `destination` needs
    /// the target to host it, and drops the paused copy here; `source` needs
    /// the target not to, and resumes the copy here. When the target cannot
    /// be asked, only `force` (the operator vouches that it is down for
    /// good) lets either through.
    pub async fn resolve(
        self: &Arc<Self>,
        id: &str,
        run_on: &str,
        force: bool,
    ) -> Result<MigrationView, NodeError> {
        let (vm, target) = {
            let mut st = self.state.lock().unwrap();
            // The target's own record of an incoming migration is not the
            // one to settle: not found here, the request goes to the source.
            let e = st
                .entry(id)
                .filter(|e| e.direction == Direction::Outgoing)
                .ok_or_else(|| {
                    NodeError::NotFound(format!("no migration {id:?} from node {}", self.spec.name))
                })?;
            if e.state != MigrationState::Unresolved {
                return Err(NodeError::Conflict(format!(
                    "migration {id} is {}, not an unresolved migration from this node",
                    name_of(&e.state)
                )));
            }
            (e.vm.clone(), e.target.clone())
        };
        if run_on != "source" && run_on != "destination" {
            return Err(NodeError::BadRequest(format!(
                "run_on must be \"source\" or \"destination\", not {run_on:?}"
            )));
        }
        let spec = self
            .member(&target)
            .ok_or_else(|| NodeError::Conflict(format!("node {target} left the cluster")))?;
        // Does the target host the VM?
        let hosted = match self.peers.vm(&spec, &vm).await {
            Ok(v) => Some(crate::agent::client::name_of(v.state)),
            Err(crate::agent::peer::PeerError::Api { status: 404, .. }) => None,
            // Force stands in for a target that cannot be reached, never
            // for one that answered (with an error): that one may run it.
            Err(e @ crate::agent::peer::PeerError::Unreachable { .. }) if force => {
                tracing::warn!(%id, %vm, error = %e, "resolving without the target's word (forced)");
                Some("unknown".into())
            }
            Err(e) => {
                return Err(NodeError::Conflict(format!(
                    "cannot ask node {target} whether it runs {vm} ({e}); settle it with \"force\": true only once {target} is known to be down for good"
                )))
            }
        };
        let checked = match hosted.as_deref() {
            None => format!("node {target} does not host {vm}"),
            Some("unknown") => format!("node {target} could not be asked"),
            Some(s) => format!("node {target} hosts {vm} ({s})"),
        };
        if let Err(why) = settle(run_on, hosted.as_deref()) {
            return Err(NodeError::Conflict(format!("{checked}: {why}")));
        }
        if run_on == "source" {
            // The cluster may have restarted it elsewhere meanwhile.
            self.record_kept(&vm, id).await?;
        }
        let (view, superseded) = {
            let mut st = self.state.lock().unwrap();
            let fenced = st.fenced;
            let forced = hosted.as_deref() == Some("unknown");
            let (mut gone, mut superseded) = (None, false);
            let entry_state = if run_on == "destination" {
                // The target runs it: the paused copy here goes.
                gone = st.vms.remove(&vm);
                MigrationState::Completed
            } else {
                let Some(v) = st.vms.get_mut(&vm) else {
                    return Err(NodeError::Conflict(format!(
                        "the paused copy of {vm} is no longer here"
                    )));
                };
                // Runs here again, unless superseded meanwhile: then the
                // cluster starts it elsewhere.
                v.held = true;
                superseded = !v.run_unless_fenced(fenced);
                MigrationState::Failed
            };
            let e = st.entry(id).expect("found above");
            e.state = entry_state;
            e.resolution = Some(Resolution {
                run_on: run_on.to_string(),
                checked,
                forced,
                at_ms: now_ms(),
            });
            tracing::info!(%id, %vm, run_on, forced, "unresolved migration settled");
            let view = e.view(false);
            drop(st);
            drop(gone);
            (view, superseded)
        };
        // The saved copy goes now, not at the keeper's next look: an agent
        // killed meanwhile would find that stale image at its restart.
        if !superseded {
            self.forget_kept(&vm).await;
        }
        self.journal_migration(id);
        self.record_moved(&vm, &target, id, run_on == "destination");
        if superseded {
            self.restart_superseded(&vm);
        }
        self.changed.notify_waiters();
        Ok(view)
    }
}

/// Whether an unresolved migration may be settled to `run_on` given the
/// target's word on the VM: `None` (it does not host it), its state there,
/// or `"unknown"` (it could not be asked, and the operator forced it). Only
/// a VM `running` or `paused` on the target runs there; any other state
/// (still `migrating-in`: its session has not seen GO yet, and may) keeps
/// the source's paused copy and refuses both ways until it settles.
pub(super) fn settle(run_on: &str, hosted: Option<&str>) -> Result<(), String> {
    match (run_on, hosted) {
        // Forced, the target cannot be asked: only the copy here is known,
        // and it is never dropped on a guess.
        ("source", Some("unknown")) => Ok(()),
        ("destination", Some("unknown")) => Err(
            "the target cannot be asked, so the VM cannot be known to run there: the paused copy here is the one that is known; force may only resume it here".into(),
        ),
        ("destination", Some("running" | "paused")) => Ok(()),
        ("destination", None) => Err("it cannot run there; resolve to the source".into()),
        ("source", None) => Ok(()),
        ("source", Some("running" | "paused")) => {
            Err("resolve to the destination, or delete it there first".into())
        }
        (_, Some(_)) => Err(
            "it does not run there yet and may still start there: the paused copy stays here; resolve once the target's session has ended".into(),
        ),
        _ => Err(format!("run_on must be \"source\" or \"destination\", not {run_on:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_vm_running_or_paused_on_the_target_runs_there() {
        let table = [
            // (run_on, the target's word, allowed)
            ("destination", Some("running"), true),
            ("destination", Some("paused"), true),
            ("destination", Some("migrating-in"), false),
            ("destination", Some("migrating-out"), false),
            ("destination", None, false),
            ("destination", Some("unknown"), false),
            ("source", None, true),
            ("source", Some("running"), false),
            ("source", Some("paused"), false),
            ("source", Some("migrating-in"), false),
            ("source", Some("migrating-out"), false),
            ("source", Some("unknown"), true),
        ];
        for (run_on, hosted, allowed) in table {
            assert_eq!(
                settle(run_on, hosted).is_ok(),
                allowed,
                "{run_on} with the target saying {hosted:?}"
            );
        }
        assert!(settle("destination", Some("migrating-in"))
            .unwrap_err()
            .contains("paused copy stays"));
    }
}
