// The rolling update: start one (its plan shown first), and follow it as a
// per-node stepper. It runs in the cluster (its record in etcd), so
// closing the browser changes nothing; the console reads it every 2 s
// while the Operations view is open.

import { h, text, sync, stateCell } from "./dom.js";
import { get, post, del } from "./api.js";
import { nodes } from "./store.js";
import { dialog } from "./actions.js";
import * as fmt from "./format.js";

const PHASES = ["pending", "preupdate", "draining", "updating", "resuming", "postupdate", "done"];
let run = null;
let asked = 0;

/** Reads the run again when the last read is 2 s old. */
export async function refresh(now = Date.now()) {
  if (now - asked < 2000) return;
  asked = now;
  try {
    run = await get("/v1/cluster/update");
  } catch (e) {
    run = e.status === 404 ? null : { error: e.message, nodes: [] };
  }
}

/** The plan: the nodes in order, each drained, updated and resumed with failback. */
export function start() {
  const command = h("input", { type: "text", required: true, placeholder: "e.g. apt-get -y upgrade && reboot" });
  const failback = h("input", { type: "checkbox", checked: true });
  const order = nodes().map((n) => n.name);
  dialog("Rolling update", [
    h("p", {}, `One node at a time, in this order: ${order.join(", ")}. Each is drained (its VMs move to the others), runs the command through its update hook, and resumes. The run stops at the first node whose update fails, leaving that node paused.`),
    h("label", { for: "ru-command" }, "Command"), Object.assign(command, { id: "ru-command" }),
    h("label", { for: "ru-failback" }, "Bring each node's VMs back after its update (failback)"), Object.assign(failback, { id: "ru-failback" }),
  ], "Start rolling update", async () => {
    const r = await post("/v1/cluster/update", { command: command.value, failback: failback.checked ? "immediate" : "none", node_order: order });
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

/** Shows the run, if any. */
export function render() {
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
    return "The rolling update stops after the current node's turn.";
  });
}

