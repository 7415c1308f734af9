//! `ferry cluster update --analyze` and `--preview`, as Cluster-Aware
//! Updating's readiness analyzer and update preview: whether the cluster is
//! ready for a rolling update (every node online and reachable, hooks
//! present, each node's VMs fitting on the others, etcd healthy, one
//! version everywhere), and what each node's `preview_hook` says it would
//! install.

use super::orchestrate::{print_json, Ctx, Output};
use anyhow::Result;
use ferry::agent::fence::FenceState;
use ferry::agent::preview::PreviewRequest;
use ferry::agent::NodeView;
use serde::Serialize;
use std::process::ExitCode;

/// One readiness check.
#[derive(Debug, Serialize)]
struct Check {
    check: String,
    ok: bool,
    detail: String,
}

fn check(check: String, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        check,
        ok,
        detail: detail.into(),
    }
}

/// `--analyze`: every check, then exit 1 if one failed.
pub fn analyze(ctx: &Ctx, out: &Output) -> Result<ExitCode> {
    let mut checks = Vec::new();
    let mut views: Vec<Option<NodeView>> = Vec::new();
    for n in &ctx.cluster.nodes {
        let what = format!("node {} online", n.name);
        match ctx.run(ctx.peers.node(n)) {
            Ok(v) => {
                let fenced = v
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.state == FenceState::Fenced);
                checks.push(match (&v.lease, fenced) {
                    (_, true) => check(
                        what,
                        false,
                        "reachable, but fenced: it cannot renew its lease",
                    ),
                    (None, _) => check(what, false, "reachable, but holds no lease in etcd"),
                    _ => check(
                        what,
                        true,
                        format!("reachable, {}", super::orchestrate::name_of(v.state)),
                    ),
                });
                views.push(Some(v));
            }
            Err(e) => {
                checks.push(check(what, false, e.to_string()));
                views.push(None);
            }
        }
    }
    for (n, view) in ctx.cluster.nodes.iter().zip(&views) {
        let what = format!("node {} update_hook", n.name);
        // The file's, or the one its agent says it runs (a joined node's).
        let hook = n
            .update_hook
            .as_ref()
            .or_else(|| view.as_ref()?.update_hook.as_ref());
        checks.push(match hook {
            Some(h) => check(what, true, format!("{h:?}")),
            None => check(
                what,
                false,
                "none in the cluster file or from its agent: it runs no update commands",
            ),
        });
    }
    checks.push(fit(ctx, &views));
    checks.extend(etcd_health(ctx));
    let mine = env!("CARGO_PKG_VERSION");
    let others: Vec<String> = views
        .iter()
        .flatten()
        .filter(|v| v.version != mine)
        .map(|v| format!("node {} runs {:?}", v.name, v.version))
        .collect();
    checks.push(if others.is_empty() {
        check(
            "versions".into(),
            true,
            format!("every agent that answers runs {mine}"),
        )
    } else {
        check(
            "versions".into(),
            false,
            format!("this ferry is {mine}; {}", others.join(", ")),
        )
    });
    let ready = checks.iter().all(|c| c.ok);
    if out.json {
        print_json(&serde_json::json!({ "ready": ready, "checks": checks }));
    } else {
        for c in &checks {
            println!(
                "{:<4} {:<28} {}",
                if c.ok { "ok" } else { "FAIL" },
                c.check,
                c.detail
            );
        }
        println!(
            "{}",
            if ready {
                "ready for a rolling update"
            } else {
                "not ready: fix what FAILs first"
            }
        );
    }
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether each node's VMs fit on the others while it is updated.
fn fit(ctx: &Ctx, views: &[Option<NodeView>]) -> Check {
    let what = "VMs fit while a node is out".to_string();
    let Some(states) = views.iter().cloned().collect::<Option<Vec<NodeView>>>() else {
        return check(what, false, "not every node answers: no plan");
    };
    let plan = super::update::plan_update(ctx, &states, true);
    let stuck: Vec<String> = plan
        .iter()
        .filter(|p| !p.unplaced.is_empty())
        .map(|p| format!("node {}: {} VMs fit nowhere", p.node, p.unplaced.len()))
        .collect();
    if stuck.is_empty() {
        check(what, true, "every node's VMs fit on the others")
    } else {
        check(what, false, stuck.join("; "))
    }
}

/// Each etcd endpoint, asked on its own.
fn etcd_health(ctx: &Ctx) -> Vec<Check> {
    let Some(store) = &ctx.cluster.store else {
        return vec![check(
            "etcd".into(),
            false,
            "the cluster file names no etcd: agents need it",
        )];
    };
    store
        .client
        .endpoints
        .iter()
        .map(|ep| {
            let what = format!("etcd {ep}");
            let mut cfg = store.client.clone();
            cfg.endpoints = vec![ep.clone()];
            // The client's channel starts on the runtime.
            let status = ctx.run(async move {
                let etcd = ferry::agent::etcd::Etcd::new(&cfg)?;
                etcd.status().await
            });
            match status {
                Ok(s) if s.errors.is_empty() && s.leader != 0 => check(
                    what,
                    true,
                    format!("etcd {}, leader {:x}", s.version, s.leader),
                ),
                Ok(s) if s.leader == 0 => check(what, false, "no leader"),
                Ok(s) => check(what, false, s.errors.join("; ")),
                Err(e) => check(what, false, e.to_string()),
            }
        })
        .collect()
}

/// `--preview`: each node's preview hook's answer; exit 1 if a node did not
/// answer or its hook failed.
pub fn preview(ctx: &Ctx, command: &str, out: &Output) -> Result<ExitCode> {
    let req = PreviewRequest {
        command: command.to_string(),
    };
    let mut all = Vec::new();
    let mut failed = false;
    for n in &ctx.cluster.nodes {
        let answer = ctx.run(ctx.peers.preview(n, &req));
        match &answer {
            Ok(p) => {
                failed |= p.error.is_some();
                if !out.json {
                    let exit = p.exit_code.map_or("abnormally".into(), |c| c.to_string());
                    println!(
                        "== node {}: `{}` exited {exit} in {} ms",
                        n.name,
                        p.argv.join(" "),
                        p.duration_ms
                    );
                    print!("{}{}", p.stdout, p.stderr);
                    if let Some(e) = &p.error {
                        println!("({e})");
                    }
                }
            }
            Err(e) => {
                // A node without a preview hook says so; that is no failure.
                let no_hook = matches!(e, ferry::agent::peer::PeerError::Api { status: 409, .. });
                failed |= !no_hook;
                if !out.json {
                    println!("== {e}");
                }
            }
        }
        all.push(match answer {
            Ok(p) => serde_json::json!({ "node": n.name, "preview": p }),
            Err(e) => serde_json::json!({ "node": n.name, "error": e.to_string() }),
        });
    }
    if out.json {
        print_json(&all);
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
