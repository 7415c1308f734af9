// Small DOM helpers: build elements, and keep a table's rows in step with
// a list without rebuilding them (so focus, selection and scroll stay put).

/** An element with attributes (`on*` functions become listeners) and children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) {
      if (typeof v !== "function") throw new TypeError(`${k}: only a function listens`);
      el.addEventListener(k.slice(2), v);
    }
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** Sets `el`'s text only when it changed. */
export function text(el, value) {
  const v = String(value);
  if (el.textContent !== v) el.textContent = v;
}

/**
 * Makes `parent`'s keyed children match `items`: `make(item)` builds a new
 * child, `update(child, item)` refreshes one; children of keys no longer
 * listed go. Order follows `items`.
 */
export function sync(parent, items, key, make, update) {
  const have = new Map();
  for (const el of parent.children) have.set(el.dataset.key, el);
  let prev = null;
  for (const item of items) {
    const k = key(item);
    let el = have.get(k);
    if (el) have.delete(k);
    else { el = make(item); el.dataset.key = k; }
    update(el, item);
    const want = prev ? prev.nextElementSibling : parent.firstElementChild;
    if (want !== el) parent.insertBefore(el, want);
    prev = el;
  }
  for (const el of have.values()) el.remove();
}

/** A state written out, with a colour class that only adds to the word. */
export function stateCell(el, word, tone) {
  text(el, word);
  el.className = `state ${tone || ""}`;
}
