// The Migrations view: running ones first, each with a bar that only moves
// forward, an ETA that only counts down, the pause it expects against its
// limit and why it is slow; then the queue with positions, then history
// with each report. And the banner of unresolved hand-offs.

import { h, text, sync, stateCell } from "./dom.js";
import { store, migrations, shownProgress } from "./store.js";
import * as fmt from "./format.js";
import * as act from "./actions.js";

/** Why a running migration is not converging, in plain words, or "". */
export function reason(p) {
  if (!p || p.phase !== "precopy") return "";
  const writes = p.dirty_rate_bps, carries = p.throughput_bps;
  if (p.throttle_pct > 0) {
    return `The guest writes ${fmt.rate(writes)}, the link carries ${fmt.rate(carries)}: slowing the guest by ${p.throttle_pct} % so the copy catches up.`;
  }
  if (p.round > 1 && writes > 0.8 * carries && carries > 0) {
    return `The guest writes ${fmt.rate(writes)}, about what the link carries (${fmt.rate(carries)}): each round leaves nearly as much as it sent.`;
  }
  const limit = p.downtime_limit_ms;
  if (p.expected_downtime_ms != null && limit && p.expected_downtime_ms > limit) {
    return `Pausing now would take ${fmt.ms(p.expected_downtime_ms)}, over the ${fmt.ms(limit)} limit: copying another round first.`;
  }
  return "";
}

function card(m) {
  const bar = h("progress", { max: "100", "aria-label": `Progress of ${m.vm}` });
  const cancel = h("button", { type: "button", class: "admin danger", "aria-label": `Cancel migration of ${m.vm}`, onclick: () => act.cancelMigration(m.id) }, "Cancel");
  return h("article", { class: "card migration" },
    h("header", {}, h("strong", { class: "vm" }), h("span", { class: "route" }), h("span", { class: "state" }), h("span", { class: "pct" }), cancel),
    bar,
    h("dl", {}, ...["Phase", "Guest rate", "Wire rate", "Left", "ETA", "Expected pause", "Throttle"].flatMap((t) => [h("dt", {}, t), h("dd")])),
    h("p", { class: "reason" }));
}

function updateCard(el, m) {
  const p = m.progress;
  const { pct, left, over } = shownProgress(m);
  text(el.querySelector(".vm"), m.vm);
  text(el.querySelector(".route"), `${m.source} → ${m.target}`);
  stateCell(el.querySelector("header .state"), m.state, "warn");
  text(el.querySelector(".pct"), fmt.pct(pct));
  const bar = el.querySelector("progress");
  bar.value = pct;
  bar.setAttribute("aria-valuetext", `${fmt.pct(pct)}${left != null ? `, about ${fmt.seconds(left)} left` : ""}`);
  const dd = el.querySelectorAll("dd");
  const vals = p ? [
    `${p.phase}, round ${p.round}`,
    fmt.rate(p.throughput_bps),
    fmt.rate(p.wire_bps),
    fmt.bytes(p.bytes_left),
    left == null ? "–" : left > 0 ? fmt.seconds(left) : over < 1 ? "finishing" : `finishing, ${fmt.seconds(over)} past the estimate`,
    `${fmt.ms(p.expected_downtime_ms)} of ${fmt.ms(p.downtime_limit_ms)} limit`,
    p.throttle_pct ? `${p.throttle_pct} %` : "none",
  ] : [m.phase ?? "starting", "–", "–", "–", "–", "–", "–"];
  vals.forEach((v, i) => text(dd[i], v));
  text(el.querySelector(".reason"), reason(p));
}

function queueRow() {
  return h("tr", {}, h("td", { class: "num" }), h("th", { scope: "row" }), h("td"), h("td"), h("td"),
    h("td", {}, h("button", { type: "button", class: "admin danger" }, "Cancel")));
}

function updateQueueRow(tr, [m, pos, waits, planned]) {
  const [n, vm, route, waited, why, actions] = tr.children;
  text(n, pos);
  text(vm, m.vm);
  text(route, `${m.source} → ${m.target}`);
  text(waited, fmt.clock(m.created_at_ms));
  text(why, waits);
  // A step not yet asked for is cancelled with its operation.
  const b = actions.firstChild;
  b.hidden = !!planned;
  b.setAttribute("aria-label", `Cancel queued migration of ${m.vm}`);
  b.onclick = () => act.cancelMigration(m.id);
}

/** How many of the pages sent each codec compressed: " (lz4 70 %, zstd-stream 12 % of pages)". */
function packedBy(pages) {
  if (!pages || !pages.total) return "";
  const by = pages.compressed_by ?? {};
  const pct = (n) => Math.round((100 * n) / pages.total);
  const parts = [["lz4", by.lz4], ["zstd", by.zstd], ["zstd-stream", by.zstd_stream]]
    .filter(([, n]) => n > 0)
    .map(([name, n]) => `${name} ${pct(n)} %`);
  if (parts.length === 0 && pages.compressed > 0) parts.push(`compressed ${pct(pages.compressed)} %`);
  return parts.length ? ` (${parts.join(", ")} of pages)` : " (none compressed)";
}

function historyRow() {
  return h("tr", {}, h("th", { scope: "row" }), h("td"), h("td"), h("td"), h("td", { class: "num" }), h("td", { class: "num" }), h("td", { class: "num" }), h("td"), h("td"));
}

function updateHistoryRow(tr, m) {
  const r = m.report ?? {};
  const [vm, route, state, ended, rounds, downtime, ratio, codec, chart] = tr.children;
  text(vm, m.vm);
  text(route, `${m.source} → ${m.target}`);
  stateCell(state, m.state, m.state === "completed" ? "good" : "bad");
  state.title = m.error ?? "";
  text(ended, fmt.clock(m.finished_at_ms));
  text(rounds, r.rounds ?? "–");
  text(downtime, r.downtime_ms != null ? fmt.ms(r.downtime_ms) : "–");
  text(ratio, r.compression_ratio != null ? `${Number(r.compression_ratio).toFixed(2)}×` : "–");
  text(codec, r.codec ? `${r.codec}${packedBy(r.pages)}` : "–");
  const left = (r.round_log ?? []).map((x) => x.dirty_pages_after * 4096);
  if (chart.dataset.n !== String(left.length)) {
    chart.dataset.n = String(left.length);
    const top = Math.max(1, ...left);
    chart.replaceChildren(h("span", { class: "spark", "aria-hidden": "true" }, left.map(() => h("span"))),
      h("span", { class: "visually-hidden" }, `bytes left after each round: ${left.map(fmt.bytes).join(", ")}`));
    [...chart.firstChild.children].forEach((s, i) => { s.style.height = `${Math.round((100 * left[i]) / top)}%`; });
  }
}

/** Refreshes the Migrations view. */
export function renderMigrations() {
  const { running, queued, done } = migrations();
  sync(document.getElementById("running"), running, (m) => m.id, card, updateCard);
  document.getElementById("nothing-running").hidden = running.length > 0;
  const pos = new Map();
  const place = (source) => {
    const n = (pos.get(source) ?? 0) + 1;
    pos.set(source, n);
    return n;
  };
  const rows = queued.map((m) => [m, place(m.source), `waits for one of node ${m.source}'s ${store.nodes.get(m.source)?.limits?.max_concurrent_migrations ?? "?"} slots`]);
  // An operation's steps not yet asked for wait behind the node's queue.
  for (const op of store.ops.values()) {
    if (op.state !== "running") continue;
    for (const s of op.steps.filter((x) => x.state === "planned" || x.state === "arriving")) {
      const m = { id: `${op.id}/${s.vm}`, vm: s.vm, source: s.source, target: s.target || "?", created_at_ms: op.started_at_ms };
      rows.push([m, place(s.source), `waits its turn in the ${op.kind} of node ${op.node} (at most ${op.params?.max_concurrent ?? "?"} at once)`, true]);
    }
  }
  table("queued", ["Position", "VM", "Route", "Asked at", "Waits", "Actions"], rows, (x) => x[0].id, queueRow, updateQueueRow);
  table("history", ["VM", "Route", "State", "Ended", "Rounds", "Pause", "Ratio", "Codec", "Left after each round"], done.slice(0, 100), (m) => m.id, historyRow, updateHistoryRow);
}

/** A table in `id`'s box with `heads`, its body kept in step with `rows`. */
function table(id, heads, rows, key, make, update) {
  const box = document.getElementById(id);
  let t = box.querySelector("table");
  if (!t) {
    t = h("table", {}, h("thead", {}, h("tr", {}, heads.map((x) => h("th", { scope: "col" }, x)))), h("tbody"));
    box.replaceChildren(t);
  }
  sync(t.tBodies[0], rows, key, make, update);
}

/** The banner of unresolved hand-offs: stays until each is settled. */
export function renderHandoffs() {
  const { unresolved } = migrations();
  const box = document.getElementById("handoffs");
  box.hidden = unresolved.length === 0;
  sync(box, unresolved, (m) => m.id, (m) => h("p", {}, h("span"), " ",
    h("button", { type: "button", class: "admin", onclick: () => act.resolve(m.id) }, "Resolve…")), (p, m) => {
    text(p.firstChild, `Unresolved hand-off: migration ${m.id} of ${m.vm} from ${m.source} to ${m.target} did not say where the VM runs. Its paused copy is kept until someone decides.`);
    p.lastChild.setAttribute("aria-label", `Resolve the hand-off of ${m.vm}`);
  });
}
