// What the console knows of the cluster, kept from the merged event stream
// (`/v1/cluster/events`): every node's view, VMs, migrations and
// operations, keyed by the node that reported them. Also what must never
// run backwards on screen: each migration's progress and the end its ETA
// promised.

const FINAL = new Set(["completed", "failed", "cancelled", "partial"]);

export const store = {
  nodes: new Map(),
  /** Per node: whether its stream is read (`source` events). */
  sources: new Map(),
  vms: new Map(),
  migrations: new Map(),
  ops: new Map(),
  /** Migration id -> { pct, end }: the most shown, the soonest end promised. */
  shown: new Map(),
  /** Migration or operation id -> the state last seen, for announcements. */
  lastState: new Map(),
  listeners: [],
  announcers: [],
};

const tables = { vm: "vms", migration: "migrations", operation: "ops" };

/** Takes one event of the merged stream. */
export function apply(kind, data) {
  const node = data.node;
  if (kind === "resync" || (kind === "source" && data.left)) {
    // The whole state of `node` follows, or it left the cluster: what it
    // no longer lists is gone.
    for (const t of [store.vms, store.migrations, store.ops]) {
      for (const [k, v] of t) if (v.node === node) t.delete(k);
    }
    store.nodes.delete(node);
    if (kind === "source") store.sources.delete(node);
  } else if (kind === "source") {
    store.sources.set(node, data);
  } else if (kind === "node") {
    if (data.gone) store.nodes.delete(node);
    else store.nodes.set(node, data);
  } else if (tables[kind]) {
    const id = kind === "vm" ? data.name : data.id;
    const key = `${node}/${id}`;
    if (data.gone) store[tables[kind]].delete(key);
    else {
      store[tables[kind]].set(key, data);
      // A migration is told of once, from its source's view.
      if (kind === "operation" || (kind === "migration" && data.direction === "outgoing")) noteState(kind, data);
    }
  }
  for (const f of store.listeners) f(kind);
}

/** Announces a migration's or an operation's end, once, when seen to happen. */
function noteState(kind, v) {
  const id = `${kind}/${v.node}/${v.id}`;
  const before = store.lastState.get(id);
  store.lastState.set(id, v.state);
  if (before === undefined || before === v.state || !FINAL.has(v.state) && v.state !== "unresolved") return;
  if (FINAL.has(before)) return;
  let say;
  if (kind === "migration") {
    say = v.state === "completed" ? `Migration of ${v.vm} to node ${v.target} completed: it runs on ${v.target}.`
      : v.state === "unresolved" ? `Migration of ${v.vm} to node ${v.target} is unresolved: it needs a decision.`
      : `Migration of ${v.vm} to node ${v.target} ${v.state}${v.error ? `: ${v.error}` : ""}. It runs on ${v.source}.`;
  } else {
    say = `${v.kind} of node ${v.node} ${v.state}${v.error ? `: ${v.error}` : ""}.`;
  }
  for (const f of store.announcers) f(say);
}

/** Every migration once (the source's view, which has the progress), newest first within each group. */
export function migrations() {
  const byId = new Map();
  for (const m of store.migrations.values()) {
    const have = byId.get(m.id);
    if (!have || (have.direction === "incoming" && m.direction === "outgoing")) byId.set(m.id, m);
  }
  const all = [...byId.values()];
  const running = all.filter((m) => m.state === "running").sort((a, b) => (a.started_at_ms ?? 0) - (b.started_at_ms ?? 0));
  const queued = all.filter((m) => m.state === "queued").sort((a, b) => a.created_at_ms - b.created_at_ms);
  const unresolved = all.filter((m) => m.state === "unresolved");
  const done = all.filter((m) => FINAL.has(m.state)).sort((a, b) => (b.finished_at_ms ?? 0) - (a.finished_at_ms ?? 0));
  return { running, queued, unresolved, done };
}

/** Every VM once: where it runs (not where it is still arriving). */
export function vms() {
  const byName = new Map();
  for (const v of store.vms.values()) {
    const have = byName.get(v.name);
    if (!have || have.state === "migrating-in" || have.state === "superseded") byName.set(v.name, v);
  }
  return [...byName.values()].sort((a, b) => a.name.localeCompare(b.name));
}

/** Every node, by name, with whether its stream is read. */
export function nodes() {
  const names = new Set([...store.nodes.keys(), ...store.sources.keys()]);
  return [...names].sort().map((name) => ({
    name,
    view: store.nodes.get(name),
    source: store.sources.get(name) ?? { connected: true },
  }));
}

/** The memory of VM `name`, as any node reports it. */
export function memoryOf(name) {
  for (const v of store.vms.values()) if (v.name === name) return v.memory;
  return undefined;
}

/**
 * What a migration's bar and ETA show: its share done, never less than
 * shown before, the seconds left to the soonest end promised, and how far
 * past that end it runs.
 */
export function shownProgress(m, now = Date.now()) {
  const s = store.shown.get(m.id) ?? { pct: 0, end: undefined };
  if (m.state === "completed") s.pct = 100;
  const p = m.progress;
  if (p && m.state === "running") {
    const total = memoryOf(m.vm) || p.bytes_left || 1;
    const done = 100 * (1 - Math.min(p.bytes_left, total) / total);
    // The last round and the switch-over hold the last percent.
    s.pct = Math.max(s.pct, Math.min(done, p.phase === "precopy" ? 99 : 99.9));
    if (p.eta_s != null) {
      const end = now + p.eta_s * 1000;
      // Sooner only: an ETA never rises. Past the end it promised, the
      // view says by how much instead.
      s.end = s.end === undefined ? end : Math.min(s.end, end);
    }
  }
  store.shown.set(m.id, s);
  const left = s.end === undefined ? undefined : Math.max(0, (s.end - now) / 1000);
  const over = s.end === undefined ? 0 : Math.max(0, (now - s.end) / 1000);
  return { pct: s.pct, left, over };
}
