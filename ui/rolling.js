// The rolling update: start one (its plan shown first), and follow it as a
// per-node stepper. It runs in the cluster (its record in etcd), so
// closing the browser changes nothing; the console reads it every 2 s
// while the Operations view is open.

import { h, text, sync, stateCell } from "./dom.js";
import { get, post, del, call } from "./api.js";
import { nodes } from "./store.js";
import { dialog } from "./actions.js";
import * as fmt from "./format.js";

const PHASES = ["pending", "preupdate", "draining", "updating", "resuming", "postupdate", "done"];
let run = null;
let schedule = null;
let asked = 0;
/** Bumped by every change made here: an older read does not undo it. */
let changed = 0;

/** Reads the run again when the last read is 2 s old. */
export async function refresh(now = Date.now()) {
  if (now - asked < 2000) return;
  asked = now;
  const at = changed;
  let r, s = schedule;
  try {
    r = await get("/v1/cluster/update");
  } catch (e) {
    r = e.status === 404 ? null : { error: e.message, nodes: [] };
  }
  try {
    s = await get("/v1/cluster/update/schedule");
  } catch (e) {
    // Only "none" clears it: an error says nothing of the schedule.
    if (e.status === 404) s = null;
  }
  if (at !== changed) return;
  run = r;
  schedule = s;
}

/** The schedule, if any, with a way to remove it. */
function renderSchedule() {
  const box = document.getElementById("update-schedule");
  if (!schedule) { box.replaceChildren(); return; }
  if (!box.firstChild) {
    box.append(h("p", {}, h("span"), " ", h("button", { type: "button", class: "admin danger", onclick: unschedule }, "Remove schedule")));
  }
  const last = schedule.last_run ? `; last: ${schedule.last_run}` : "";
  text(box.firstChild.firstChild, `Scheduled rolling update "${schedule.request?.command ?? ""}" (${schedule.schedule}, UTC): next at ${new Date(schedule.next_at_ms).toUTCString()}${last}.`);
}

function unschedule() {
  dialog("Remove the schedule", [h("p", {}, "No rolling update starts by itself any more; one running now goes on.")],
    "Remove schedule", async () => {
      await del("/v1/cluster/update/schedule");
      changed++;
      schedule = null;
      return "The rolling update schedule is removed.";
    });
}

/** One node's turn in the plan: where its VMs would go were it drained now. */
function planItem(node, plan) {
  if (plan instanceof Error) return h("li", {}, `node ${node}: its drain plan cannot be read (${plan.message})`);
  const moves = plan.moves.map((m) => `${m.vm} → ${m.target}`);
  const stuck = plan.unplaced.map((m) => m.vm);
  return h("li", {}, `node ${node}: drain, run the command, resume`,
    moves.length ? ` (moving ${moves.join(", ")})` : " (no VM to move)",
    stuck.length ? h("strong", {}, `; no node has room for ${stuck.join(", ")}: the run would stop here`) : null);
}

/**
 * The plan, then the run: the nodes in order, each drained (where each of
 * its VMs would go, the others as they are now: each node's VMs come back
 * before the next is drained), updated and resumed; now or on a schedule.
 */
export async function start() {
  const order = nodes().map((n) => n.name);
  const plans = await Promise.all(order.map((n) =>
    post(`/v1/nodes/${encodeURIComponent(n)}/drain`, { dry_run: true }).catch((e) => e)));
  const command = h("input", { type: "text", id: "ru-command", required: true, placeholder: "e.g. apt-get -y upgrade && reboot" });
  const failback = h("input", { type: "checkbox", id: "ru-failback", checked: true });
  const when = h("input", { type: "text", id: "ru-schedule", placeholder: "now; or \"sun 03:00\" (UTC), \"every 24h\"" });
  dialog("Rolling update", [
    h("p", {}, `One node at a time, in this order: ${order.join(", ")} (a schedule takes every node of the cluster at each run). The run stops at the first node whose update fails, leaving that node paused. It runs in the cluster: closing the browser changes nothing.`),
    h("ol", {}, order.map((n, i) => planItem(n, plans[i]))),
    h("label", { for: "ru-command" }, "Command (through each node's update hook)"), command,
    h("label", { for: "ru-failback" }, "Bring each node's VMs back after its update (failback)"), failback,
    h("label", { for: "ru-schedule" }, "When (empty: now)"), when,
  ], "Start rolling update", async () => {
    const body = { command: command.value, failback: failback.checked ? "immediate" : "none" };
    if (when.value.trim()) {
      // A schedule takes the cluster's nodes as they are at each run.
      const s = await call("PUT", "/v1/cluster/update/schedule", { schedule: when.value.trim(), ...body });
      changed++;
      schedule = s;
      return `Rolling update scheduled: next at ${new Date(s.next_at_ms).toUTCString()}.`;
    }
    const r = await post("/v1/cluster/update", { ...body, node_order: order });
    changed++;
    run = r;
    return `Rolling update started on ${r.nodes.length} nodes.`;
  });
}

function turnRow() {
  return h("tr", {}, h("th", { scope: "row" }), h("td"), h("td"), h("td"));
}

function updateTurn(tr, t) {
  const [node, phase, since, error] = tr.children;
  text(node, t.node);
  const step = PHASES.indexOf(t.phase);
  const word = step >= 0 ? `${t.phase} (step ${step + 1} of ${PHASES.length})` : t.phase;
  stateCell(phase, word, t.phase === "done" ? "good" : t.phase === "failed" ? "bad" : t.phase === "pending" ? "" : "warn");
  text(since, fmt.clock(t.since_ms));
  text(error, t.error ?? "");
}

/** Shows the schedule and the run, if any. */
export function render() {
  renderSchedule();
  const box = document.getElementById("update-run");
  if (!run) { box.replaceChildren(); return; }
  if (!box.firstChild) {
    box.append(h("article", { class: "card" },
      h("header", {}, h("strong", {}, "Rolling update"), h("span", { class: "state" }), h("span", { class: "muted what" }),
        h("button", { type: "button", class: "admin danger", onclick: cancel }, "Cancel rolling update")),
      h("p", { class: "error" }),
      h("table", {}, h("thead", {}, h("tr", {}, ["Node", "Phase", "Since", "Error"].map((x) => h("th", { scope: "col" }, x)))), h("tbody"))));
  }
  const card = box.firstChild;
  stateCell(card.querySelector("header .state"), run.state ?? "unknown", { completed: "good", running: "warn" }[run.state] ?? "bad");
  text(card.querySelector(".what"), run.command ? `"${run.command}", started ${fmt.clock(run.started_at_ms)}` : "");
  card.querySelector("header button").hidden = run.state !== "running";
  text(card.querySelector(".error"), run.error ?? "");
  sync(card.querySelector("tbody"), run.nodes ?? [], (t) => t.node, turnRow, updateTurn);
}

function cancel() {
  dialog("Cancel the rolling update", [
    h("p", {}, "The run stops once the current node's turn ends: no further node starts."),
  ], "Cancel rolling update", async () => {
    run = await del("/v1/cluster/update");
    changed++;
    return "The rolling update stops after the current node's turn.";
  });
}

