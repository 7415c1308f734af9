// The Nodes and VMs views: real tables, kept in step with the store row by
// row, each state written out in words.

import { h, text, sync, stateCell } from "./dom.js";
import { store, nodes, vms, migrations } from "./store.js";
import * as fmt from "./format.js";
import * as act from "./actions.js";

/** Each node's recent outgoing rate, one sample a second, for its sparkline. */
const rates = new Map();
let lastSample = 0;

function sampleRates(now) {
  if (now - lastSample < 1000) return;
  lastSample = now;
  const out = new Map();
  for (const m of migrations().running) {
    out.set(m.source, (out.get(m.source) ?? 0) + (m.progress?.wire_bps ?? 0));
  }
  for (const { name } of nodes()) {
    const r = rates.get(name) ?? [];
    r.push(out.get(name) ?? 0);
    if (r.length > 30) r.shift();
    rates.set(name, r);
  }
}

/** A node's state in a word and a tone. */
export function nodeState(n, now = Date.now()) {
  if (!n.source.connected) return ["down", "bad", `its agent does not answer: ${n.source.error ?? ""}`];
  const v = n.view;
  if (!v) return ["unknown", "", "not heard from yet"];
  if (v.quarantined_until_ms && v.quarantined_until_ms > now) {
    return ["quarantined", "bad", `until ${fmt.clock(v.quarantined_until_ms)}`];
  }
  const tone = { active: "good", draining: "warn", paused: "warn" }[v.state] ?? "";
  return [v.state, tone, ""];
}

function nodeRow(n) {
  const cells = Array.from({ length: 7 }, (_, i) => h(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {}));
  const name = n.name;
  cells[6].append(
    h("button", { type: "button", class: "admin", "aria-label": `Drain node ${name}`, onclick: () => act.drain(name) }, "Drain…"),
    " ",
    h("button", { type: "button", class: "admin", "aria-label": `Resume node ${name}`, onclick: () => act.resume(name) }, "Resume…"),
    " ",
    h("button", { type: "button", class: "admin", "aria-label": `Update node ${name}`, onclick: () => act.update(name) }, "Update…"),
  );
  return h("tr", {}, cells);
}

function updateNode(tr, n) {
  const [name, state, memory, count, migs, rate] = tr.children;
  const v = n.view;
  text(name, n.name);
  const [word, tone, why] = nodeState(n);
  stateCell(state, word, tone);
  state.title = why;
  if (v) {
    const used = v.memory_used - (v.memory_reclaimable ?? 0);
    text(memory, `${fmt.bytes(used)} of ${fmt.bytes(v.memory_capacity)}`);
    text(migs, `${v.migrations_in_flight} running of ${v.limits.max_concurrent_migrations}, ${v.migrations_queued} queued`);
  }
  text(count, n.vms);
  const r = rates.get(n.name) ?? [];
  const top = Math.max(1, ...r);
  if (rate.children.length !== 2) {
    rate.replaceChildren(h("span", { class: "spark", "aria-hidden": "true" }), h("span", { class: "visually-hidden" }));
  }
  const [spark, label] = rate.children;
  sync(spark, r.map((x, i) => [i, x]), ([i]) => String(i), () => h("span"), (el, [, x]) => {
    el.style.height = `${Math.round((100 * x) / top)}%`;
  });
  const now = r.length ? r[r.length - 1] : 0;
  text(label, `sending ${fmt.rate(now)}`);
  rate.title = `sending ${fmt.rate(now)}`;
}

/** Refreshes the Nodes table. */
export function renderNodes() {
  sampleRates(Date.now());
  const body = document.querySelector("#nodes-table tbody");
  const count = new Map();
  for (const vm of vms()) count.set(vm.node, (count.get(vm.node) ?? 0) + 1);
  const list = nodes().map((n) => ({ ...n, vms: count.get(n.name) ?? 0 }));
  sync(body, list, (n) => n.name, nodeRow, updateNode);
}

const selected = new Set();

/** The VMs ticked in the table. */
export function selectedVms() {
  return [...selected];
}

function vmRow(vm) {
  const box = h("input", { type: "checkbox", class: "admin", "aria-label": `Select ${vm.name}` });
  box.addEventListener("change", () => (box.checked ? selected.add(vm.name) : selected.delete(vm.name)));
  const cells = [h("td", {}, box), h("th", { scope: "row" })];
  for (let i = 0; i < 4; i++) cells.push(h("td"));
  cells.push(h("td", {}, h("button", {
    type: "button", class: "admin", "aria-label": `Migrate ${vm.name}`, onclick: () => act.migrate([vm.name]),
  }, "Migrate…")));
  return h("tr", {}, cells);
}

function updateVm(tr, [vm, running]) {
  const [, name, node, memory, state, priority] = tr.children;
  text(name, vm.name);
  const going = running.get(vm.name);
  text(node, going && vm.state === "migrating-out" ? `${vm.node} → ${going.target}` : vm.node);
  text(memory, fmt.bytes(vm.memory));
  const tone = { running: "good", "migrating-out": "warn", paused: "warn", fenced: "bad" }[vm.state] ?? "";
  stateCell(state, vm.state, tone);
  text(priority, vm.priority ?? "");
}

/** Refreshes the VMs table, filtered by the filter box. */
export function renderVms() {
  const q = document.getElementById("vm-filter").value.trim().toLowerCase();
  const list = vms().filter((v) => !q || [v.name, v.node, v.state].some((s) => s && s.toLowerCase().includes(q)));
  const running = new Map(migrations().running.map((m) => [m.vm, m]));
  sync(document.querySelector("#vms-table tbody"), list.map((v) => [v, running]), ([v]) => v.name, ([v]) => vmRow(v), updateVm);
}

/** Node names, for choosers. */
export function nodeNames() {
  return nodes().map((n) => n.name);
}

export { store };
