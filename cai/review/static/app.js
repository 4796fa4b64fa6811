// cai review: the page. No framework, no build step, nothing loaded from elsewhere.
// Model text is untrusted: it only ever reaches the document as text nodes (textContent,
// createTextNode), never as HTML. The server's Content-Security-Policy forbids inline script.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const DECISIONS = ["accept", "reject", "swap", "tie", "skip", "edit"];
const KEYS = {a: "accept", r: "reject", s: "swap", t: "tie", k: "skip"};
const LABELS = {accept: "accept", reject: "reject", swap: "swap (the original was better)", tie: "tie", skip: "skip", edit: "edit chosen"};
const PAST = {accept: "accepted", reject: "rejected", swap: "swapped", tie: "tie", skip: "skipped", edit: "edited"};
const FILTERS = ["principle", "tag", "status", "reason", "agree", "margin_min", "margin_max", "edit_min", "edit_max",
                 "reviewed", "decision", "q", "sort"];
const PAGE = 100;

const state = {
  view: "pair", summary: null, order: [], pos: 0, n: null, pair: null, cache: new Map(),
  listOffset: 0, listRows: [], listSel: 0, editing: false, busy: false,
};

// --- small helpers -------------------------------------------------------------------------------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${Math.round(x * 100)}%`);

async function api(path, body) {
  const options = {headers: {"X-Cai-Token": TOKEN}, cache: "no-store"};
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function toast(message, bad) {
  const box = $("toast");
  box.textContent = message;
  box.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, bad ? 6000 : 1600);
}

// --- filters and the order they give --------------------------------------------------------------

function filterValues() {
  const values = {};
  for (const name of FILTERS) {
    const value = $(`f-${name}`).value.trim();
    if (value && !(name === "sort" && value === "file")) values[name] = value;
  }
  return values;
}

function query(extra) {
  const params = new URLSearchParams({...filterValues(), ...(extra || {})});
  return params.toString();
}

async function loadOrder(keepN) {
  const data = await api(`/api/order?${query()}`);
  state.order = data.order;
  const at = keepN === null || keepN === undefined ? -1 : state.order.indexOf(keepN);
  state.pos = at >= 0 ? at : 0;
  $("f-count").textContent = `${state.order.length.toLocaleString()} of ${state.start.total.toLocaleString()} pairs`;
  state.listOffset = Math.floor(state.pos / PAGE) * PAGE;
}

async function filtersChanged() {
  try {
    await loadOrder(state.n);
    saveHash();
    await render();
  } catch (error) {
    toast(error.message, true);
  }
}

function saveHash() {
  const params = new URLSearchParams(filterValues());
  params.set("view", state.view);
  if (state.n !== null) params.set("n", state.n);
  history.replaceState(null, "", `${location.pathname}${location.search}#${params.toString()}`);
}

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const name of FILTERS) {
    if (params.has(name)) $(`f-${name}`).value = params.get(name);
  }
  const n = params.has("n") ? Number(params.get("n")) : null;
  return {view: params.get("view") || "pair", n: Number.isInteger(n) ? n : null};
}

function fillSelect(select, values, labels) {
  const keep = select.value;
  select.replaceChildren(select.options[0]);
  for (const value of values) select.appendChild(h("option", {value}, labels ? labels(value) : value));
  select.value = keep;
}

// --- progress ------------------------------------------------------------------------------------

function showProgress() {
  const s = state.summary;
  $("progress-text").textContent = `${s.reviewed.toLocaleString()} / ${s.total.toLocaleString()} reviewed`;
  $("progress-fill").style.width = `${s.total ? (100 * s.reviewed) / s.total : 0}%`;
}

async function refreshSummary() {
  state.summary = await api("/api/summary");
  showProgress();
}

function tagsOf(principle) {
  const found = state.summary && state.summary.principles ? state.summary.principles.find((p) => p.name === principle) : null;
  return found ? found.tags : [];
}

// --- the pair view -------------------------------------------------------------------------------

async function fetchPair(n) {
  if (state.cache.has(n)) return state.cache.get(n);
  const promise = api(`/api/pair?n=${n}`);
  state.cache.set(n, promise);
  promise.catch(() => state.cache.delete(n));
  if (state.cache.size > 64) state.cache.delete(state.cache.keys().next().value);
  return promise;
}

function prefetch() {
  for (const step of [1, 2, -1]) {
    const n = state.order[state.pos + step];
    if (n !== undefined) fetchPair(n);
  }
}

function message(role, content) {
  return h("div", {class: `msg ${role}`}, h("div", {class: "role", text: role}), h("pre", {class: "text", text: content}));
}

function diffText(pieces, side) {
  // rejected shows the equal and deleted words, chosen the equal and inserted ones
  const pre = h("pre", {class: "text"});
  for (const [op, text] of pieces) {
    if (op === "equal") pre.appendChild(document.createTextNode(text));
    else if ((op === "delete" && side === "rejected") || (op === "insert" && side === "chosen")) {
      pre.appendChild(h("span", {class: op === "delete" ? "del" : "ins", text}));
    }
  }
  return pre;
}

function badge(text, kind, title) {
  return h("span", {class: `badge ${kind || ""}`, title, text});
}

function judgeFacts(record) {
  const judge = record.judge;
  if (!judge || typeof judge !== "object") return [h("span", {class: "muted", text: "not judged"})];
  const orders = Array.isArray(judge.orders) ? judge.orders : [];
  const parts = [
    h("span", {class: "fact", title: "P(revision better), both orders averaged"}, "judge P(revision better) ",
      h("b", {id: "judge-preference", text: fmt(judge.preference)})),
  ];
  if (orders.length === 2) {
    parts.push(h("span", {class: "fact", title: "the revision shown as (B), then as (A)"},
      `revision as B ${fmt(orders[0])} · as A ${fmt(orders[1])}`));
  }
  if (judge.agree === false) parts.push(badge("orders disagree", "warn", "one order prefers the revision, the other the original"));
  else if (judge.agree === true) parts.push(badge("orders agree", "ok"));
  if (judge.swapped) parts.push(badge("swapped: chosen is the original", "warn"));
  if (judge.model) parts.push(h("span", {class: "muted", text: `judge: ${judge.model}`}));
  return parts;
}

function renderPair() {
  const view = $("pair-view");
  const pair = state.pair;
  if (!state.order.length) {
    view.replaceChildren(h("p", {class: "empty", text: "No pair matches these filters."}));
    return;
  }
  if (!pair) {
    view.replaceChildren(h("p", {class: "muted", text: "loading…"}));
    return;
  }
  const record = pair.record;
  const meta = record.meta && typeof record.meta === "object" ? record.meta : {};
  const decided = pair.decision;
  const head = h("div", {class: "pair-head"},
    h("button", {type: "button", class: "nav", title: "previous (← or p)", onclick: () => move(-1)}, "◀"),
    h("span", {id: "position", text: `${(state.pos + 1).toLocaleString()} / ${state.order.length.toLocaleString()}`}),
    h("button", {type: "button", class: "nav", title: "next (→ or n)", onclick: () => move(1)}, "▶"),
    h("code", {id: "pair-id", text: pair.id}),
    badge(pair.principle, "principle", "principle"),
    (pair.tags.length ? pair.tags : tagsOf(pair.principle)).map((t) => badge(t, "tag", "tag")),
    pair.status === "kept" ? badge("kept", "ok") : badge(`dropped: ${pair.reasons.join(", ") || "?"}`, "bad", "filter reasons"),
    h("span", {id: "decision-badge"}, decided ? badge(`${PAST[decided.decision]}${decided.reviewer ? " by " + decided.reviewer : ""}`, `decision ${decided.decision}`, decided.rationale || "") : badge("not reviewed", "muted")));
  const repairs = Array.isArray(meta.repairs) ? meta.repairs : [];
  const facts = h("div", {class: "facts"},
    judgeFacts(record),
    h("span", {class: "fact", title: "word-level edit distance between rejected and chosen (0 same, 1 all changed)"},
      "edit size ", h("b", {text: fmt(pair.edit)}), meta.edit && meta.edit.spans !== undefined ? ` (${meta.edit.spans} spans)` : ""),
    repairs.length ? h("span", {class: "fact", title: "turns made again before the pair passed its filters"},
      `repairs: ${repairs.map((r) => `${r.turn} (${(r.reasons || []).join(", ")})`).join("; ")}`) : null,
    meta.model ? h("span", {class: "muted", text: `model: ${meta.model}`}) : null);
  const parts = [head, facts];
  if (!pair.whole) {
    parts.push(h("p", {class: "empty"}, "This dropped pair's line holds its id and filter reasons only: ",
      "run cai generate with --keep-filtered to keep dropped pairs whole."));
    view.replaceChildren(...parts);
    return;
  }
  parts.push(h("section", {class: "prompt"}, h("h3", {text: pair.conversation.length > 1 ? "conversation" : "prompt"}),
    pair.conversation.map((m) => message(m.role, m.content))));
  const swapped = record.judge && record.judge.swapped;
  const sides = h("div", {class: "sides"},
    h("section", {class: "side rejected", id: "rejected"},
      h("h3", {text: swapped ? "rejected (the revision)" : "rejected (the original answer)"}),
      pair.diff ? diffText(pair.diff, "rejected") : h("pre", {class: "text", text: pair.rejected})),
    h("section", {class: "side chosen", id: "chosen"},
      h("h3", {text: swapped ? "chosen (the original answer)" : "chosen (the revision)"}),
      state.editing ? editor(pair) : (decided && decided.decision === "edit"
        ? [h("pre", {class: "text edited", id: "chosen-text", text: decided.chosen}),
           h("p", {class: "muted", text: "edited by the reviewer; the model's text:"}),
           h("pre", {class: "text was", text: pair.chosen})]
        : (pair.diff ? diffText(pair.diff, "chosen") : h("pre", {class: "text", text: pair.chosen})))));
  if (!pair.diff) sides.classList.add("nodiff");
  parts.push(sides);
  const rounds = Array.isArray(record.rounds) ? record.rounds : [];
  if (rounds.length) {
    parts.push(h("section", {class: "rounds"}, h("h3", {text: `rounds (${rounds.length})`}),
      rounds.map((round, i) => h("details", {class: "round", open: i === rounds.length - 1 ? true : null},
        h("summary", {}, `round ${i + 1}: `, h("b", {text: String(round.principle || "?")})),
        h("div", {class: "label", text: "critique"}), h("pre", {class: "text", text: String(round.critique || "")}),
        h("div", {class: "label", text: "revision"}), h("pre", {class: "text", text: String(round.revision || "")})))));
  }
  parts.push(decisionBar(decided));
  view.replaceChildren(...parts);
  if (state.editing) $("edit-text").focus();
}

function editor(pair) {
  const decided = pair.decision;
  const text = decided && decided.decision === "edit" ? decided.chosen : pair.chosen;
  return h("div", {class: "editor"},
    h("textarea", {id: "edit-text", rows: 12, "aria-label": "edited chosen text"}, text),
    h("div", {class: "row"},
      h("button", {type: "button", id: "edit-save", class: "primary", onclick: saveEdit}, "save edit (Ctrl+Enter)"),
      h("button", {type: "button", id: "edit-cancel", onclick: cancelEdit}, "cancel (Esc)")));
}

function decisionBar(decided) {
  const buttons = DECISIONS.map((d) => {
    const key = d === "edit" ? "e" : Object.keys(KEYS).find((k) => KEYS[k] === d);
    return h("button", {type: "button", id: `do-${d}`, class: `decide ${d}${decided && decided.decision === d ? " current" : ""}`,
      title: `${LABELS[d]} (${key})`, onclick: () => (d === "edit" ? startEdit() : decide(d))},
      h("kbd", {text: key}), ` ${LABELS[d]}`);
  });
  return h("section", {class: "decision-bar"}, buttons,
    h("input", {id: "rationale", type: "text", maxlength: 10000, placeholder: "rationale (c), optional",
      value: decided && decided.rationale ? decided.rationale : null, "aria-label": "rationale"}));
}

async function showPair() {
  state.n = state.order.length ? state.order[state.pos] : null;
  saveHash();
  if (state.n === null) { state.pair = null; renderPair(); return; }
  const wanted = state.n;
  const cached = state.cache.get(wanted);
  if (!cached) { state.pair = null; renderPair(); }
  try {
    const pair = await fetchPair(wanted);
    if (state.n !== wanted) return;
    state.pair = pair;
    state.editing = false;
    renderPair();
    prefetch();
  } catch (error) {
    toast(error.message, true);
  }
}

function move(step) {
  if (!state.order.length) return;
  const pos = Math.min(Math.max(state.pos + step, 0), state.order.length - 1);
  if (pos === state.pos) { toast(step > 0 ? "last pair of this list" : "first pair of this list"); return; }
  state.pos = pos;
  showPair();
}

async function nextUnreviewed() {
  for (let pos = state.pos + 1; pos < state.order.length; pos++) {
    const pair = await fetchPair(state.order[pos]);
    if (!pair.decision) { state.pos = pos; return showPair(); }
    if (pos - state.pos > 200) break;
  }
  toast("no unreviewed pair ahead in this list (within 200)");
}

async function decide(kind, chosen) {
  if (!state.pair || state.busy) return;
  const rationale = $("rationale") ? $("rationale").value : "";
  const body = {id: state.pair.id, decision: kind};
  if (rationale.trim()) body.rationale = rationale;
  if (kind === "edit") body.chosen = chosen;
  state.busy = true;
  try {
    const result = await api("/api/decision", body);
    state.summary.reviewed = result.reviewed;
    showProgress();
    state.pair.decision = result.decision;
    // every pair with this id (a file may hold one in both its kept and dropped files)
    for (const promise of state.cache.values()) {
      promise.then((p) => { if (p.id === result.decision.id) p.decision = result.decision; }, () => {});
    }
    state.editing = false;
    toast(`${PAST[kind]}: ${state.pair.id}`);
    if (state.pos < state.order.length - 1) { state.pos += 1; await showPair(); } else { renderPair(); }
  } catch (error) {
    toast(`not saved: ${error.message}`, true);
  } finally {
    state.busy = false;
  }
}

function startEdit() {
  if (!state.pair || !state.pair.whole) return;
  state.editing = true;
  renderPair();
}

function cancelEdit() {
  state.editing = false;
  renderPair();
}

function saveEdit() {
  const text = $("edit-text").value;
  if (!text.trim()) { toast("an edited chosen text cannot be empty", true); return; }
  decide("edit", text);
}

// --- the list view -------------------------------------------------------------------------------

async function renderList() {
  const view = $("list-view");
  let data;
  try {
    data = await api(`/api/list?${query({offset: state.listOffset, limit: PAGE})}`);
  } catch (error) {
    toast(error.message, true);
    return;
  }
  state.listRows = data.rows;
  state.listSel = Math.min(state.listSel, Math.max(data.rows.length - 1, 0));
  const head = h("tr", {}, ["#", "id", "principle", "pairs", "judge P", "orders", "margin", "edit", "decision", "prompt"]
    .map((c) => h("th", {text: c})));
  const body = h("tbody", {});
  data.rows.forEach((row, i) => {
    body.appendChild(h("tr", {class: `row${i === state.listSel ? " sel" : ""}${row.decision ? " reviewed" : ""}`,
      dataset: {n: String(row.n)}, onclick: () => openFromList(row.n)},
      h("td", {text: String(data.offset + i + 1)}),
      h("td", {}, h("code", {text: row.id})),
      h("td", {text: row.principle}),
      h("td", {class: row.status, text: row.status === "kept" ? "kept" : `dropped: ${row.reasons.join(", ")}`}),
      h("td", {text: fmt(row.preference)}),
      h("td", {text: row.agree === null ? "–" : row.agree ? "agree" : "disagree"}),
      h("td", {text: fmt(row.margin)}),
      h("td", {text: fmt(row.edit)}),
      h("td", {class: row.decision ? `decision ${row.decision}` : "muted", text: row.decision ? PAST[row.decision] : "–"}),
      h("td", {class: "snippet", text: row.prompt})));
  });
  const last = Math.min(data.offset + PAGE, data.total);
  const pager = h("div", {class: "pager"},
    h("button", {type: "button", disabled: data.offset === 0 ? true : null, onclick: () => page(-1)}, "◀ previous"),
    h("span", {text: data.total ? `${(data.offset + 1).toLocaleString()}–${last.toLocaleString()} of ${data.total.toLocaleString()}` : "no pair matches"}),
    h("button", {type: "button", disabled: last >= data.total ? true : null, onclick: () => page(1)}, "next ▶"));
  view.replaceChildren(pager, h("table", {id: "list"}, h("thead", {}, head), body));
  const selected = body.querySelector("tr.sel");
  if (selected) selected.scrollIntoView({block: "nearest"});
}

function page(step) {
  const offset = state.listOffset + step * PAGE;
  if (offset < 0 || offset >= state.order.length) return;
  state.listOffset = offset;
  state.listSel = 0;
  renderList();
}

function openFromList(n) {
  const at = state.order.indexOf(n);
  if (at >= 0) state.pos = at;
  setView("pair");
}

function moveSelection(step) {
  const rows = document.querySelectorAll("#list tbody tr");
  if (!rows.length) return;
  const next = state.listSel + step;
  if (next < 0 || next >= rows.length) { page(step); return; }
  rows[state.listSel].classList.remove("sel");
  state.listSel = next;
  rows[next].classList.add("sel");
  rows[next].scrollIntoView({block: "nearest"});
}

// --- figures -------------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function barChart(title, rows, value, label) {
  // one horizontal bar per principle, 0..1
  const width = 420, bar = 16, gap = 6, left = 150, height = rows.length * (bar + gap) + 8;
  const chart = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title});
  rows.forEach((row, i) => {
    const y = 4 + i * (bar + gap);
    const v = value(row);
    chart.appendChild(svg("text", {x: left - 6, y: y + bar - 4, "text-anchor": "end", class: "axis"}, row.name));
    chart.appendChild(svg("rect", {x: left, y, width: width - left - 60, height: bar, class: "track"}));
    if (v !== null && v !== undefined) chart.appendChild(svg("rect", {x: left, y, width: Math.max(1, (width - left - 60) * Math.min(v, 1)), height: bar, class: "bar"}));
    chart.appendChild(svg("text", {x: width - 54, y: y + bar - 4, class: "axis"}, label(row)));
  });
  return h("figure", {class: "plot"}, h("figcaption", {text: title}), chart);
}

function renderFigures() {
  const s = state.summary;
  const rows = s.principles;
  const decided = DECISIONS.filter((d) => s.decisions[d]).map((d) => `${PAST[d]} ${s.decisions[d]}`).join(" · ");
  $("figures-view").replaceChildren(
    h("p", {class: "facts"},
      h("span", {class: "fact"}, `${s.reviewed.toLocaleString()} of ${s.total.toLocaleString()} pairs reviewed`),
      h("span", {class: "fact"}, `${s.kept.toLocaleString()} kept, ${s.dropped.toLocaleString()} dropped`),
      decided ? h("span", {class: "fact", text: decided}) : null,
      Object.keys(s.reasons).length ? h("span", {class: "fact"}, `drop reasons: ${Object.entries(s.reasons).map(([r, c]) => `${r} ${c}`).join(", ")}`) : null),
    h("div", {class: "plots"},
      barChart("reviewed, per principle", rows, (r) => (r.total ? r.reviewed / r.total : 0), (r) => `${r.reviewed}/${r.total}`),
      barChart("kept rate, per principle", rows, (r) => r.kept_rate, (r) => pct(r.kept_rate)),
      s.judged ? barChart("judge: both orders agree, per principle", rows, (r) => r.agreement, (r) => pct(r.agreement)) : null,
      barChart("mean edit size of kept pairs, per principle", rows, (r) => r.edit_mean, (r) => fmt(r.edit_mean))));
}

// --- help ----------------------------------------------------------------------------------------

const SHORTCUTS = [
  ["a", "accept"], ["r", "reject"], ["s", "swap: the original was better"], ["t", "tie"], ["k", "skip"],
  ["e", "edit the chosen text (Ctrl+Enter saves, Esc cancels)"], ["c", "write a rationale (Enter or Esc to leave it)"],
  ["→ or n", "next pair"], ["← or p", "previous pair"], ["u", "next pair not reviewed"],
  ["v", "pair view"], ["l", "list view (↑ ↓ to move, Enter to open)"], ["g", "figures"], ["/", "search"], ["?", "these keys"],
];

function renderHelp() {
  $("help-view").replaceChildren(h("h3", {text: "keyboard shortcuts"}),
    h("table", {class: "keys"}, SHORTCUTS.map(([k, what]) => h("tr", {}, h("td", {}, h("kbd", {text: k})), h("td", {text: what})))),
    h("p", {class: "muted"}, "Decisions are written to ", h("code", {text: state.summary.decisions_file}),
      " as they are made; the latest decision about a pair wins."));
}

// --- views and keys ------------------------------------------------------------------------------

async function setView(view) {
  state.view = view;
  for (const name of ["pair", "list", "figures", "help"]) {
    $(`${name}-view`).hidden = name !== view;
    $(`tab-${name}`).classList.toggle("active", name === view);
  }
  $("filters").hidden = view === "figures" || view === "help";
  if (view === "list") state.listOffset = Math.floor(state.pos / PAGE) * PAGE;
  saveHash();
  await render();
}

async function render() {
  if (state.view === "pair") await showPair();
  else if (state.view === "list") await renderList();
  else if (state.view === "figures") { await refreshSummary(); renderFigures(); }
  else renderHelp();
}

function typing(target) {
  return target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT");
}

function onKey(event) {
  if (event.target && event.target.id === "edit-text") {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); saveEdit(); }
    else if (event.key === "Escape") { event.preventDefault(); cancelEdit(); }
    return;
  }
  if (typing(event.target)) {
    if (event.key === "Escape" || (event.key === "Enter" && event.target.id === "rationale")) { event.target.blur(); event.preventDefault(); }
    else if (event.key === "Enter" && event.target.id === "f-q") { event.target.blur(); filtersChanged(); }
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key === "?") return setView(state.view === "help" ? "pair" : "help");
  if (key === "v") return setView("pair");
  if (key === "l") return setView("list");
  if (key === "g") return setView("figures");
  if (key === "/") { event.preventDefault(); if (state.view !== "pair" && state.view !== "list") setView("list"); $("f-q").focus(); return; }
  if (key === "Escape") return state.view === "help" ? setView("pair") : undefined;
  if (state.view === "list") {
    if (key === "ArrowDown" || key === "j") { event.preventDefault(); moveSelection(1); }
    else if (key === "ArrowUp") { event.preventDefault(); moveSelection(-1); }
    else if (key === "Enter" && state.listRows[state.listSel]) openFromList(state.listRows[state.listSel].n);
    return;
  }
  if (state.view !== "pair") return;
  if (key === "ArrowRight" || key === "n") { event.preventDefault(); move(1); }
  else if (key === "ArrowLeft" || key === "p") { event.preventDefault(); move(-1); }
  else if (key === "u") nextUnreviewed();
  else if (key === "e") { event.preventDefault(); startEdit(); }
  else if (key === "c") { event.preventDefault(); if ($("rationale")) $("rationale").focus(); }
  else if (KEYS[key]) { event.preventDefault(); decide(KEYS[key]); }
}

// --- start ---------------------------------------------------------------------------------------

async function start() {
  // first what the first pair needs (the server has it at once), then the figures (its index's
  // second pass over a big file may still be running)
  try {
    state.start = await api("/api/start");
  } catch (error) {
    $("pair-view").replaceChildren(h("p", {class: "empty", text: `cannot reach the review: ${error.message}`}));
    return;
  }
  const s = state.start;
  state.summary = {total: s.total, reviewed: s.reviewed, decisions_file: s.decisions_file};
  showProgress();
  $("file").textContent = `${s.pairs}${s.reviewer ? " · reviewer " + s.reviewer : ""}`;
  fillSelect($("f-decision"), DECISIONS, (d) => PAST[d]);
  const wanted = readHash();
  for (const name of FILTERS) {
    const node = $(`f-${name}`);
    node.addEventListener(node.tagName === "SELECT" ? "change" : "change", filtersChanged);
  }
  $("f-clear").addEventListener("click", () => {
    for (const name of FILTERS) $(`f-${name}`).value = name === "sort" ? "file" : "";
    filtersChanged();
  });
  for (const name of ["pair", "list", "figures", "help"]) $(`tab-${name}`).addEventListener("click", () => setView(name));
  document.addEventListener("keydown", onKey);
  // resume: the pair in the address, else the first one not reviewed
  await loadOrder(wanted.n !== null ? wanted.n : s.first_unreviewed);
  await setView(["pair", "list", "figures", "help"].includes(wanted.view) ? wanted.view : "pair");
  try {
    await refreshSummary();
  } catch (error) {
    toast(error.message, true);
    return;
  }
  fillSelect($("f-principle"), state.summary.principles.map((p) => p.name));
  fillSelect($("f-tag"), state.summary.tags);
  $("f-tag-label").hidden = !state.summary.tags.length;
  fillSelect($("f-reason"), Object.keys(state.summary.reasons));
  if (state.pair && state.view === "pair") { state.pair.tags = tagsOf(state.pair.principle); renderPair(); }
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);
