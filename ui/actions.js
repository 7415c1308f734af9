// What an operator does from the console, each behind a dialog that says
// what will happen first: migrate, drain (its plan shown), resume (the VMs
// that come back listed), update, cancel, and settling a hand-off.

import { h } from "./dom.js";
import { call, post, del, seg } from "./api.js";
import { store, nodes, vms, migrations } from "./store.js";
import * as fmt from "./format.js";

let say = () => {};
let opened = 0;
/** Where actions report what they did (the live region). */
export function onSay(f) { say = f; }

/**
 * Shows the dialog: `body` (nodes), an OK button named `ok` (none: only
 * Close); `run()` on OK, kept open with its error if it throws.
 */
export function dialog(title, body, ok, run) {
  const d = document.getElementById("dialog");
  document.getElementById("dialog-title").textContent = title;
  document.getElementById("dialog-body").replaceChildren(...body.filter(Boolean));
  const err = document.getElementById("dialog-error");
  err.textContent = "";
  const okButton = document.getElementById("dialog-ok");
  okButton.hidden = !ok;
  okButton.textContent = ok ?? "OK";
  okButton.disabled = false;
  const form = document.getElementById("dialog-form");
  // A dialog closed while its request runs, and another opened, is not
  // touched by the first one's answer.
  const mine = ++opened;
  form.onsubmit = async (e) => {
    e.preventDefault();
    okButton.disabled = true;
    try {
      const done = await run();
      if (mine === opened) d.close();
      if (done) say(done);
    } catch (x) {
      if (mine !== opened) { say(x.message); return; }
      err.textContent = x.message;
      okButton.disabled = false;
    }
  };
  document.getElementById("dialog-cancel").onclick = () => d.close();
  if (!d.open) d.showModal();
  const first = d.querySelector("#dialog-body input, #dialog-body select, #dialog-ok:not([hidden])");
  (first ?? document.getElementById("dialog-cancel")).focus();
}

function field(label, input) {
  const id = `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  return [h("label", { for: id }, label), input];
}

function choice(options, value) {
  return h("select", {}, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

/**
 * The active node with the most free memory that can hold `memory`, but
 * `not`; `given` (node -> bytes) is already promised to other VMs.
 */
export function bestNode(memory, not, given = new Map()) {
  let best = null;
  for (const n of nodes()) {
    const v = n.view;
    if (!v || !n.source.connected || v.state !== "active" || n.name === not) continue;
    const free = v.memory_capacity - (v.memory_used - (v.memory_reclaimable ?? 0)) - (given.get(n.name) ?? 0);
    if (free >= memory && (!best || free > best[1])) best = [n.name, free];
  }
  return best?.[0];
}

/** Migrate `names` to a chosen node or each to the best one. */
export function migrate(names) {
  if (!names.length) { say("Select the VMs to migrate first."); return; }
  const target = choice([["", "the best node for each"], ...nodes().map((n) => [n.name, `node ${n.name}`])], "");
  const bandwidth = h("input", { type: "text", placeholder: "e.g. 100MB/s (none: the node's)" });
  const codec = choice([["", "the node's (auto by default)"], ["auto", "auto"], ["none", "none"], ["lz4", "lz4"], ["zstd", "zstd"]], "");
  const title = names.length === 1 ? `Migrate ${names[0]}` : `Migrate ${names.length} VMs`;
  dialog(title, [
    h("p", {}, `VMs: ${names.join(", ")}. Each keeps running while its memory is copied, then pauses briefly to switch over.`),
    ...field("To", target), ...field("Bandwidth cap", bandwidth), ...field("Codec", codec),
  ], "Migrate", async () => {
    const all = vms();
    const given = new Map();
    const out = [];
    let failed = 0;
    // Each VM on its own: one refused does not stop the others, and the
    // memory given to one is not offered to the next.
    for (const name of names) {
      const vm = all.find((v) => v.name === name);
      const to = target.value || bestNode(vm?.memory ?? 0, vm?.node, given);
      try {
        if (!to) throw new Error("no active node has room");
        if (to === vm?.node) throw new Error(`it already runs on node ${to}`);
        const body = { vm: name, target: to };
        if (bandwidth.value.trim()) body.max_bandwidth = bandwidth.value.trim();
        if (codec.value) body.codec = codec.value;
        const m = await post("/v1/migrations", body);
        given.set(to, (given.get(to) ?? 0) + (vm?.memory ?? 0));
        out.push(`${name} to ${to}: ${m.state}`);
      } catch (e) {
        failed++;
        out.push(`${name}: ${e.message}`);
      }
    }
    if (failed === names.length) throw new Error(out.join("; "));
    return `Migrations asked for: ${out.join("; ")}.`;
  });
}

/** What a drain's target keeps that a VM starts from, as its plan says. */
const HELD = { own: " (it keeps this VM's image: only changes travel)", kin: " (it keeps a kin's copy: only differences travel)" };

/** Drain `node`: its plan first, then the drain. */
export async function drain(node) {
  let plan;
  try {
    plan = await post(`/v1/nodes/${seg(node)}/drain`, { dry_run: true });
  } catch (e) {
    dialog(`Drain node ${node}`, [h("p", { class: "error" }, e.message)]);
    return;
  }
  const row = (vm, memory, where) => h("tr", {}, h("th", { scope: "row" }, vm), h("td", {}, memory), h("td", {}, where));
  const rows = [
    ...plan.moves.map((m) => row(m.vm, fmt.bytes(m.memory), `node ${m.target}${HELD[m.base] ?? ""}`)),
    ...plan.unplaced.map((m) => row(m.vm, fmt.bytes(m.memory), "nowhere: no node has room")),
    ...(plan.arriving ?? []).map((vm) => row(vm, "", "still arriving here: placed once it lands")),
    ...(plan.staying ?? []).map((x) => row(x.vm, "", `stays: it is ${x.state}`)),
  ];
  const moving = plan.moves.length + plan.unplaced.length + (plan.arriving?.length ?? 0);
  const partial = h("input", { type: "checkbox" });
  const body = [
    h("p", {}, `Node ${node} stops taking VMs, and ${moving} of its VMs move away, at most ${plan.max_concurrent} at once${plan.auto ? ` (${plan.auto})` : ""}.`),
    h("table", {}, h("caption", {}, "The plan"), h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "VM"), h("th", { scope: "col" }, "Memory"), h("th", { scope: "col" }, "Goes to"))), h("tbody", {}, rows)),
    h("p", {}, `Room: ${plan.room.map((r) => `${r.node} ${fmt.bytes(r.free)} free`).join(", ") || "no other node is active"}${plan.excluded.length ? `; not used: ${plan.excluded.join(", ")}` : ""}.`),
  ];
  if (plan.refused) {
    body.push(h("p", { class: "error" }, `The other nodes lack ${fmt.bytes(plan.shortfall)}: ${plan.unplaced.length} VMs cannot move. The drain is refused unless you move what fits.`));
    body.push(...field("Move what fits and leave the rest", partial));
  }
  dialog(`Drain node ${node}`, body, "Drain", async () => {
    const op = await post(`/v1/nodes/${seg(node)}/drain`, plan.refused ? { allow_partial: partial.checked } : {});
    return `Drain of node ${node} started (${op.steps?.length ?? 0} VMs).`;
  });
}

/** What a resume with failback of `node` brings back: its last drain's moves still where they went. */
export function failbackList(node) {
  const drains = [...store.ops.values()].filter((o) => o.kind === "drain" && o.node === node)
    .sort((a, b) => b.started_at_ms - a.started_at_ms);
  const last = drains[0];
  if (!last) return [];
  const all = vms();
  return last.steps.filter((s) => s.state === "completed").map((s) => {
    const now = all.find((v) => v.name === s.vm);
    const back = now && now.node === s.target && now.state === "running";
    return { vm: s.vm, from: s.target, back, why: back ? "" : now ? `it is ${now.state} on node ${now.node}` : "it no longer exists" };
  });
}

/** Resume `node`, with or without failback. */
export function resume(node) {
  const list = failbackList(node);
  const failback = h("input", { type: "checkbox", checked: list.some((x) => x.back) });
  const items = list.length ? h("ul", {}, list.map((x) => h("li", {}, x.back ? `${x.vm} comes back from node ${x.from}` : `${x.vm} stays: ${x.why}`)))
    : h("p", {}, "Its last drain moved no VM that could come back.");
  dialog(`Resume node ${node}`, [
    h("p", {}, `Node ${node} takes VMs again.`), ...field("Fail back what its last drain moved", failback), items,
  ], "Resume", async () => {
    const op = await post(`/v1/nodes/${seg(node)}/resume`, { failback: failback.checked });
    return `Node ${node} resumed${failback.checked ? `; ${op.steps?.length ?? 0} VMs come back` : ""}.`;
  });
}

/** Run an update command on `node` through its hook (the node must be drained). */
export function update(node) {
  const command = h("input", { type: "text", required: true, placeholder: "e.g. apt-get -y upgrade" });
  dialog(`Update node ${node}`, [
    h("p", {}, `Runs the command through node ${node}'s update hook. The node must be drained first; its output shows under Operations.`),
    ...field("Command", command),
  ], "Run update", async () => {
    await post(`/v1/nodes/${seg(node)}/update`, { command: command.value });
    return `Update of node ${node} started.`;
  });
}

/** Cancel migration `id`, saying where its VM runs afterwards. */
export function cancelMigration(id) {
  const m = migrations();
  const it = [...m.running, ...m.queued].find((x) => x.id === id);
  if (!it) return;
  const late = it.progress && ["switchover", "handoff"].includes(it.progress.phase);
  dialog(`Cancel the migration of ${it.vm}`, [
    h("p", {}, late
      ? `It is switching over: if node ${it.target} has already taken the VM, the cancel comes too late and it runs there; otherwise it keeps running on node ${it.source}. The answer says which.`
      : `${it.vm} keeps running on node ${it.source}; what was copied to node ${it.target} is dropped.`),
  ], "Cancel migration", async () => {
    const v = await del(`/v1/migrations/${seg(id)}`);
    if (v.state === "running") return `Cancel of ${it.vm}'s migration asked for: its end is announced with where it runs.`;
    const where = v.state === "completed" ? v.target : v.source;
    return `Migration of ${it.vm} ${v.state}: it runs on node ${where}.`;
  });
}

/** Cancel operation `id` of `node`. */
export function cancelOperation(node, id, kind) {
  dialog(`Cancel the ${kind} of node ${node}`, [
    h("p", {}, "Steps not yet started do not start; running migrations are cancelled and each VM stays where it runs."),
  ], "Cancel operation", async () => {
    const v = await del(`/v1/nodes/${seg(node)}/operations/${seg(id)}`);
    return `The ${kind} of node ${node} is ${v.state}.`;
  });
}

/**
 * What node `target` says of VM `vm`: its state there, `null` (it does not
 * host it) or `undefined` (it cannot be asked), with why.
 */
async function askTarget(target, vm) {
  try {
    const n = await call("GET", `/v1/nodes/${seg(target)}`);
    const here = (n.vms ?? []).find((v) => v.name === vm);
    return { state: here ? here.state : null };
  } catch (e) {
    // 503: the target (or the relay to it) did not answer; anything else
    // is no answer about the target at all.
    return { state: undefined, why: e.message, unreachable: e.status === 503 };
  }
}

/**
 * Settle an unresolved hand-off. The target is asked first, and only the
 * choices that are safe given its answer are offered (as the agent checks
 * again when it settles): the destination when the VM runs or is paused
 * there, the source when it is not there, neither while it is still
 * arriving, and the source with force, explained, only when the target
 * cannot be asked.
 */
export async function resolve(id) {
  const m = migrations().unresolved.find((x) => x.id === id);
  if (!m) return;
  say(`Asking node ${m.target} where ${m.vm} is…`);
  const t = await askTarget(m.target, m.vm);
  const intro = h("p", {}, `The migration of ${m.vm} stopped while handing it over, so ferry does not know which copy ran last. The paused copy on node ${m.source} is kept until this is settled.`);
  const settle = (runOn, force) => async () => {
    const v = await call("POST", `/v1/migrations/${seg(id)}/resolve`, { run_on: runOn, force });
    return `The hand-off of ${m.vm} is settled: it runs on node ${v.resolution?.run_on === "source" ? m.source : m.target}.`;
  };
  if (t.state === "running" || t.state === "paused") {
    dialog(`Resolve the hand-off of ${m.vm}`, [intro,
      h("p", {}, `Node ${m.target} says ${m.vm} is ${t.state} there: it runs on node ${m.target}, and the paused copy on node ${m.source} is dropped.`)],
    `Run it on node ${m.target}`, settle("destination", false));
  } else if (t.state === null) {
    dialog(`Resolve the hand-off of ${m.vm}`, [intro,
      h("p", {}, `Node ${m.target} says it does not host ${m.vm}, so the paused copy on node ${m.source} resumes (unless the cluster has already started the VM elsewhere: then it is refused, saying so).`)],
    `Run it on node ${m.source}`, settle("source", false));
  } else if (t.state !== undefined) {
    dialog(`Resolve the hand-off of ${m.vm}`, [intro,
      h("p", {}, `Node ${m.target} says ${m.vm} is ${t.state} there, neither running nor paused: neither choice is safe now. ${t.state === "migrating-in" ? "Its session may still start it there: try again once that session has ended." : `Settle what it is on node ${m.target} first.`}`)]);
  } else if (!t.unreachable) {
    dialog(`Resolve the hand-off of ${m.vm}`, [intro,
      h("p", { class: "error" }, `Node ${m.target} could not be asked (${t.why}). Nothing is offered until it can be: try again.`)]);
  } else {
    const sure = h("input", { type: "checkbox", required: true });
    dialog(`Resolve the hand-off of ${m.vm}`, [intro,
      h("p", {}, `Node ${m.target} cannot be asked (${t.why}). Wait for it to come back if it may: ferry will then see where the VM is. Only if node ${m.target} is gone for good, force the VM to run on node ${m.source}: a copy that node ${m.target} may hold must then never be started.`),
      ...field(`Node ${m.target} is gone for good`, sure)],
    `Force it to run on node ${m.source}`, settle("source", true));
  }
}
