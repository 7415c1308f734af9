// The Operations view: drains, resumes and updates as step tables, each
// VM's progress beside its step, an update's output, and cancel.

import { h, text, sync, stateCell } from "./dom.js";
import { store, migrations, shownProgress } from "./store.js";
import * as fmt from "./format.js";
import * as act from "./actions.js";

function opCard(op) {
  const cancel = h("button", { type: "button", class: "admin danger" }, "Cancel");
  return h("article", { class: "card operation" },
    h("header", {}, h("strong", { class: "title" }), h("span", { class: "state" }), h("span", { class: "when muted" }), cancel),
    h("p", { class: "error" }),
    h("table", {}, h("thead", {}, h("tr", {}, ["VM", "Memory", "From", "To", "Step", "Progress"].map((x) => h("th", { scope: "col" }, x)))), h("tbody")),
    h("div", { class: "output" }));
}

function stepRow() {
  return h("tr", {}, h("th", { scope: "row" }), h("td"), h("td"), h("td"), h("td"), h("td", {}, h("progress", { max: "100" }), h("span", { class: "visually-hidden" })));
}

function updateStep(tr, [s, running]) {
  const [vm, memory, from, to, state, progress] = tr.children;
  text(vm, s.vm);
  text(memory, fmt.bytes(s.memory));
  text(from, s.source);
  text(to, s.target || "nowhere");
  stateCell(state, s.error ? `${s.state}: ${s.error}` : s.state,
    s.state === "completed" ? "good" : ["failed", "cancelled", "skipped", "unresolved"].includes(s.state) ? "bad" : "warn");
  const m = running.get(s.migration_id);
  const pct = s.state === "completed" ? 100 : m ? shownProgress(m).pct : 0;
  const [bar, label] = progress.children;
  bar.value = pct;
  bar.setAttribute("aria-label", `Progress of ${s.vm}`);
  text(label, fmt.pct(pct));
}

function updateOp(el, op) {
  text(el.querySelector(".title"), `${op.kind} of node ${op.node}`);
  const tone = { completed: "good", running: "warn", partial: "warn" }[op.state] ?? "bad";
  stateCell(el.querySelector("header .state"), op.state, tone);
  const done = op.steps.filter((s) => s.state === "completed").length;
  text(el.querySelector(".when"), `started ${fmt.clock(op.started_at_ms)}${op.finished_at_ms ? `, ended ${fmt.clock(op.finished_at_ms)}` : ""}; ${done} of ${op.steps.length} VMs moved`);
  const cancel = el.querySelector("header button");
  cancel.hidden = op.state !== "running";
  cancel.setAttribute("aria-label", `Cancel the ${op.kind} of node ${op.node}`);
  cancel.onclick = () => act.cancelOperation(op.node, op.id, op.kind);
  const remaining = (op.remaining ?? []).map((r) => `${r.vm} (${r.state})`).join(", ");
  text(el.querySelector(".error"), [op.error, remaining && `still on the node: ${remaining}`].filter(Boolean).join("; "));
  // Every migration, not only running ones: a step's migration may end
  // before the step says so, and its bar must not fall back meanwhile.
  const all = migrations();
  const running = new Map([...all.running, ...all.done].map((m) => [m.id, m]));
  sync(el.querySelector("tbody"), op.steps.map((s) => [s, running]), ([s]) => s.vm, stepRow, updateStep);
  // An update or a resume without failback moves no VM: no empty table.
  el.querySelector("table").hidden = op.steps.length === 0;
  const out = el.querySelector(".output");
  const u = op.update;
  if (u && out.dataset.ms !== String(u.duration_ms)) {
    out.dataset.ms = String(u.duration_ms);
    out.replaceChildren(h("h4", {}, `Update command on node ${op.node}: exit ${u.exit_code ?? "none"} after ${fmt.seconds(u.duration_ms / 1000)}`),
      h("pre", {}, [u.stdout, u.stderr].filter(Boolean).join("\n")));
  }
}

/** Refreshes the Operations view, running ones first, then newest. */
export function renderOperations() {
  const ops = [...store.ops.values()].sort((a, b) =>
    (b.state === "running") - (a.state === "running") || b.started_at_ms - a.started_at_ms);
  const box = document.getElementById("operations");
  sync(box, ops.slice(0, 50), (o) => `${o.node}/${o.id}`, opCard, updateOp);
}
