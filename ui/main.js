// The console's entry: sign-in, the views, and the one event stream
// (`/v1/cluster/events`) that keeps them live. Rendering is batched: many
// events make one update of the visible view, at most a few a second, so
// the page stays responsive however busy the cluster is.

import { get, post, del, ApiError } from "./api.js";
import { store, apply } from "./store.js";
import { renderNodes, renderVms, selectedVms } from "./views.js";
import { renderMigrations, renderHandoffs } from "./migrations.js";
import { renderOperations } from "./operations.js";
import * as act from "./actions.js";
import * as rolling from "./rolling.js";

const $ = (id) => document.getElementById(id);
const KINDS = ["resync", "source", "node", "vm", "migration", "operation"];
const RENDERS = { nodes: renderNodes, vms: renderVms, migrations: renderMigrations, operations: () => { renderOperations(); rolling.render(); } };
let view = "nodes";
let stream = null;
let pending = false;

/** Says `msg` in the polite live region (completions and failures, not ticks). */
function announce(msg) {
  const box = $("announce");
  const p = document.createElement("p");
  p.textContent = msg;
  box.append(p);
  while (box.children.length > 5) box.firstElementChild.remove();
}

let measures = 0;

function render() {
  pending = false;
  const start = performance.now();
  RENDERS[view]();
  renderHandoffs();
  // Each render is a measure in the browser's performance timeline (its
  // developer tools show them), a bounded number kept.
  performance.measure("ferry-render", { start });
  if (++measures % 500 === 0) performance.clearMeasures("ferry-render");
}

/** Many events, one render, at most every 200 ms. */
function dirty() {
  if (pending) return;
  pending = true;
  setTimeout(() => requestAnimationFrame(render), 200);
}

function show(v) {
  if (!Object.hasOwn(RENDERS, v)) v = "nodes";
  view = v;
  for (const b of $("tabs").querySelectorAll("button")) {
    if (b.dataset.view === v) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${v}`;
  if (location.hash !== `#${v}`) history.replaceState(null, "", `#${v}`);
  render();
}

function streamState(word, bad) {
  $("stream-state").textContent = word;
  $("stream-state").classList.toggle("down", !!bad);
}

function open() {
  stream?.close();
  stream = new EventSource("/v1/cluster/events");
  for (const k of KINDS) {
    stream.addEventListener(k, (e) => {
      let data;
      try { data = JSON.parse(e.data); } catch { return; }
      apply(k, data);
      dirty();
    });
  }
  stream.onopen = () => streamState("Live.");
  stream.onerror = async () => {
    if (stream.readyState !== EventSource.CLOSED) {
      streamState("The stream broke: reconnecting…", true);
      return;
    }
    // Refused: signed out, or the agent is busy.
    try {
      await get("/v1/session");
      streamState("The agent refused the stream: trying again in 5 s.", true);
      setTimeout(open, 5000);
    } catch (e) {
      if (e.status === 401) signedOut("Your session ended: sign in again.");
      else { streamState(`No answer (${e.message}): trying again in 5 s.`, true); setTimeout(open, 5000); }
    }
  };
}

function clear() {
  for (const m of [store.nodes, store.sources, store.vms, store.migrations, store.ops, store.lastState]) m.clear();
}

async function signedIn(session) {
  document.body.classList.toggle("read-only", session.scope !== "admin");
  $("scope").textContent = session.scope === "admin" ? "Signed in (full access)" : "Signed in (read-only: no actions)";
  $("signin").hidden = true;
  $("tabs").hidden = false;
  $("account").hidden = false;
  try {
    const me = await get("/v1/node");
    $("where").textContent = `served by node ${me.name}`;
  } catch { /* the stream says more */ }
  open();
  show(location.hash.slice(1));
}

function signedOut(why) {
  stream?.close();
  stream = null;
  clear();
  document.body.classList.remove("read-only");
  $("tabs").hidden = true;
  $("account").hidden = true;
  for (const s of document.querySelectorAll(".view")) s.hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = why ?? "";
  streamState("");
  $("token").focus();
}

async function signIn(e) {
  e.preventDefault();
  const token = $("token").value;
  $("token").value = "";
  try {
    const s = await post("/v1/session", { token });
    $("signin-error").textContent = "";
    await signedIn(s);
  } catch (x) {
    $("signin-error").textContent = x.status === 401 ? "That is neither the cluster's token nor its read-only token." : x.message;
  }
}

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("tabs").addEventListener("click", (e) => { if (e.target.dataset.view) show(e.target.dataset.view); });
  $("vm-filter").addEventListener("input", () => render());
  $("migrate-selected").addEventListener("click", () => act.migrate(selectedVms()));
  $("sign-out").addEventListener("click", async () => {
    try {
      await del("/v1/session");
      signedOut("Signed out.");
    } catch (e) {
      announce(`Not signed out: ${e.message}`);
    }
  });
  $("revoke").addEventListener("click", () => act.dialog("Sign everyone out", [
    document.createTextNode("Every session of every agent ends, this one too; scripts with the token are not affected."),
  ], "Sign everyone out", async () => {
    await post("/v1/session/revoke");
    signedOut("Everyone was signed out.");
  }));
  act.onSay(announce);
  store.announcers.push(announce);
  $("rolling-update").addEventListener("click", rolling.start);
  // The ETA counts down between events too; a rolling update is read
  // while its view is open.
  setInterval(() => {
    if (!stream) return;
    if (view === "operations") rolling.refresh().then(dirty);
    dirty();
  }, 1000);
}

async function start() {
  wire();
  try {
    await signedIn(await get("/v1/session"));
  } catch (e) {
    signedOut(e instanceof ApiError && e.status !== 401 ? e.message : "");
  }
}

start();
