// tinkerd dashboard: polls the JSON API (/api/v1/dashboard/...) and draws plain SVG charts.
// The API key lives in this tab's sessionStorage and goes out as X-API-Key; it can be handed
// over once in the URL fragment (#key=...), which never reaches the server and is removed
// from the address bar at once. A link's key is taken only by a tab that has none: a tab
// that already uses a key asks before a link may switch it (docs/dashboard.md).
"use strict";

const API = "/api/v1/dashboard";
const POLL_MS = 1500;
const KEY_ITEM = "tinkerd-api-key";
const FIRST = ["loss", "grad_norm", "learning_rate", "tokens", "step_time_s"];
const SVG = "http://www.w3.org/2000/svg";

// `poll` is one loop at a time: each call gets a generation, and a call that finds a newer
// one when its requests come back (the run changed meanwhile) drops its answers.
const state = { run: null, points: new Map(), lastStep: 0, timer: null, generation: 0 };
const $ = (id) => document.getElementById(id);

function fragment() {
  return new URLSearchParams(location.hash.slice(1));
}

// A key offered by a link to a tab that already uses another one, until the user answers.
let offeredKey = null;

// Takes the fragment's key out of the address bar; true if the tab now uses it.
function takeKeyFromFragment() {
  const params = fragment();
  if (!params.has("key")) return false;
  const key = params.get("key");
  params.delete("key");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? "#" + rest : ""));
  const current = sessionStorage.getItem(KEY_ITEM);
  if (current && current !== key) {
    offeredKey = key; // never switched silently: a link could come from anyone
    $("key-offer").hidden = false;
    return false;
  }
  sessionStorage.setItem(KEY_ITEM, key);
  return true;
}

function answerOffer(use) {
  $("key-offer").hidden = true;
  const key = offeredKey;
  offeredKey = null;
  if (!use || key === null) return;
  sessionStorage.setItem(KEY_ITEM, key);
  clearTimeout(state.timer);
  state.generation++;
  Object.assign(state, { run: null, points: new Map(), lastStep: 0 });
  $("charts").replaceChildren();
  start();
}

async function api(path) {
  const key = sessionStorage.getItem(KEY_ITEM) || "";
  const response = await fetch(API + path, { headers: { "X-API-Key": key } });
  if (response.status === 401) throw Object.assign(new Error("unknown API key"), { auth: true });
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function ago(unixSeconds) {
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(unixSeconds * 1000).toLocaleString();
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(2) : v.toPrecision(4).replace(/\.?0+$/, "");
}

function renderRuns(runs) {
  const body = $("runs").querySelector("tbody");
  body.replaceChildren();
  $("no-runs").hidden = runs.length > 0;
  for (const run of runs) {
    const row = el("tr", undefined, { "data-run": run.model_id });
    if (run.model_id === state.run) row.className = "selected";
    const cells = [
      run.model_id, run.base_model, run.lora_rank, run.owner, run.steps,
      ago(run.last_activity), run.status,
    ];
    cells.forEach((c) => row.append(el("td", c)));
    row.lastChild.className = `status-${run.status}`;
    row.addEventListener("click", () => select(run.model_id));
    body.append(row);
  }
}

function renderPaging(bases) {
  // every key's runs together, per base model: the server's resident sets (no run ids)
  const body = $("paging").querySelector("tbody");
  body.replaceChildren();
  for (const [base, p] of Object.entries(bases)) {
    const row = el("tr");
    const limit = p.max_resident_runs === null ? "" : ` / ${p.max_resident_runs}`;
    [
      base, `${p.resident_runs}${limit}`, p.host_runs, p.disk_runs,
      `${p.page_ins} (${p.page_ins_last_minute})`, `${fmt(p.mean_page_in_seconds * 1e3)} ms`,
    ].forEach((c) => row.append(el("td", c)));
    body.append(row);
  }
}

function select(modelId) {
  if (modelId === state.run) return;
  state.run = modelId;
  state.points = new Map();
  state.lastStep = 0;
  const params = fragment();
  params.set("run", modelId);
  history.replaceState(null, "", location.pathname + "#" + params.toString());
  $("charts").replaceChildren();
  poll();
}

// One chart per metric: a polyline over (x, value) with a vertex per point; x is the step
// (run charts) or the time (the server view), `xText` what its axis says.
function chart(name, points, xKey = "step", xText = (v, first) => (first ? `step ${v}` : `${v}`)) {
  const W = 340, H = 150, L = 52, R = 10, T = 22, B = 22;
  const xs = points.map((p) => p[xKey]), ys = points.map((p) => p[name]);
  const [x0, x1] = [xs[0], xs[xs.length - 1]]; // points come in step order
  let [y0, y1] = ys.reduce(([lo, hi], v) => [Math.min(lo, v), Math.max(hi, v)], [ys[0], ys[0]]);
  if (y0 === y1) [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.05, y1 + (Math.abs(y1) || 1) * 0.05];
  const x = (s) => L + (x1 === x0 ? (W - L - R) / 2 : ((s - x0) / (x1 - x0)) * (W - L - R));
  const px = (p) => x(p[xKey]).toFixed(1);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  const box = el("div", undefined, { class: "chart", "data-metric": name });
  const root = svg("svg", { width: W, height: H, "data-points": points.length });
  const last = ys[ys.length - 1];
  root.append(
    svg("text", { x: 4, y: 14, class: "title" }, `${name}  (last ${fmt(last)})`),
    svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "frame" }),
    svg("text", { x: L - 4, y: T + 8, class: "axis", "text-anchor": "end" }, fmt(y1)),
    svg("text", { x: L - 4, y: H - B, class: "axis", "text-anchor": "end" }, fmt(y0)),
    svg("text", { x: L, y: H - 6, class: "axis" }, xText(x0, true)),
    svg("text", { x: W - R, y: H - 6, class: "axis", "text-anchor": "end" }, xText(x1, false)),
    svg("polyline", {
      points: points.map((p) => `${px(p)},${y(p[name]).toFixed(1)}`).join(" "),
    }),
  );
  if (points.length <= 100) {
    for (const p of points) root.append(svg("circle", { cx: px(p), cy: y(p[name]), r: 2 }));
  }
  box.append(root);
  return box;
}

function renderCharts(names) {
  const all = [...state.points.values()].sort((a, b) => a.step - b.step);
  const order = [...FIRST.filter((n) => names.includes(n)), ...names.filter((n) => !FIRST.includes(n))];
  $("charts").replaceChildren(
    ...order.map((n) => [n, all.filter((p) => typeof p[n] === "number")])
      .filter(([, pts]) => pts.length > 0)
      .map(([n, pts]) => chart(n, pts)),
  );
}

// The server view: /metrics' numbers over time (docs/operations.md), every key together.
const SERVER = [
  "train_tokens_per_s", "utilisation", "queued", "in_flight", "requests_per_s",
  "decode_tokens_per_s", "prefill_tokens_per_s",
  "train_latency_p50_s", "train_latency_p90_s", "train_latency_p99_s",
  "sample_latency_p50_s", "sample_latency_p90_s", "sample_latency_p99_s",
];
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function renderServer(points) {
  $("server").hidden = points.length === 0;
  $("server-charts").replaceChildren(
    ...SERVER.map((n) => [n, points.filter((p) => typeof p[n] === "number")])
      .filter(([, pts]) => pts.length > 0)
      .map(([n, pts]) => chart(n, pts, "time", clock)),
  );
}

function renderCheckpoints(checkpoints) {
  const body = $("checkpoints").querySelector("tbody");
  body.replaceChildren();
  $("no-checkpoints").hidden = checkpoints.length > 0;
  for (const c of checkpoints) {
    const row = el("tr");
    const kib = (c.size_bytes / 1024).toFixed(0);
    [c.tinker_path, c.step, ago(c.created_at), `${kib} KiB`].forEach((v) => row.append(el("td", v)));
    row.firstChild.className = "path";
    body.append(row);
  }
}

async function poll() {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  try {
    const [{ runs }, server, { bases }] = await Promise.all([
      api("/runs"), api("/server"), api("/paging"),
    ]);
    if (generation !== state.generation) return;
    renderServer(server.points);
    renderPaging(bases);
    const wanted = fragment().get("run");
    if (!state.run && runs.length) {
      state.run = runs.some((r) => r.model_id === wanted) ? wanted : runs[0].model_id;
    }
    renderRuns(runs);
    if (state.run) {
      const id = encodeURIComponent(state.run);
      const since = state.lastStep; // that step may have grown since: fetch it again
      const [detail, metrics] = await Promise.all([
        api(`/runs/${id}`),
        api(`/runs/${id}/metrics?since_step=${since}`),
      ]);
      if (generation !== state.generation) return;
      for (const p of metrics.steps) {
        state.points.set(p.step, p);
        state.lastStep = Math.max(state.lastStep, p.step);
      }
      const names = new Set(metrics.metric_names);
      for (const p of state.points.values()) Object.keys(p).forEach((k) => names.add(k));
      ["step", "time"].forEach((k) => names.delete(k));
      $("run").hidden = false;
      $("run-id").textContent = detail.model_id;
      renderCharts([...names].sort());
      renderCheckpoints(detail.checkpoints);
    }
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("main").dataset.loaded = "true";
  } catch (e) {
    if (generation !== state.generation) return;
    if (e.auth) return askForKey("That key was not accepted.");
    $("status").textContent = `error: ${e.message}`;
  }
  state.timer = setTimeout(poll, POLL_MS);
}

function askForKey(message) {
  sessionStorage.removeItem(KEY_ITEM);
  clearTimeout(state.timer);
  state.generation++; // a poll in flight stops there
  Object.assign(state, { run: null, points: new Map(), lastStep: 0 });
  $("charts").replaceChildren();
  $("run").hidden = true;
  $("main").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  poll();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
  start();
});
$("forget").addEventListener("click", () => askForKey());
$("use-link-key").addEventListener("click", () => answerOffer(true));
$("keep-key").addEventListener("click", () => answerOffer(false));
// A link followed in an open tab changes only the fragment: no reload, so look again.
window.addEventListener("hashchange", () => {
  const params = fragment();
  if (params.has("key")) {
    if (!takeKeyFromFragment()) return; // asked first, or the same key
    clearTimeout(state.timer);
    state.generation++;
    Object.assign(state, { run: null, points: new Map(), lastStep: 0 });
    $("charts").replaceChildren();
    start(); // its poll opens the run the fragment names
  } else if (params.get("run") && params.get("run") !== state.run) {
    select(params.get("run"));
  }
});

takeKeyFromFragment();
// A server without keys (loopback only) accepts an empty key: try that first.
start();
