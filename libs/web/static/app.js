/* Surveyor's live page: what the pipeline is doing and what the data shows, from the HTTP API of
 * `surveyor web` (the same origin). No framework: each view is a function of the state below.
 *
 * What each view reads:
 *   header, pipeline graph, scan   /api/status/ws (a StatusSnapshot about once a second, plus
 *                                  `web`: {connected, age_s}); GET /api/status while it is down
 *   scans table                    the snapshot's `scans` (summaries of the finished ones)
 *   event log                      GET /api/events?since=SEQ, then /api/events/ws?since=SEQ
 *   graph edges                    GET /api/pipeline (each stage's inputs); without it, the boxes
 *                                  stand in the pipeline file's order
 *   images and plots               GET /api/previews each second; a preview whose seq changed
 *                                  reloads its PNGs (/api/previews/STAGE/NAME/ARRAY.png) and, for
 *                                  the plots, their arrays (.npy): the hit rate's history and the
 *                                  peaks per frame (the writer's `crystallography`), each writer's
 *                                  `latency` histogram (counts on edges_s, meta p50_s/p95_s/max_s)
 *   overlays                       canvases over two images: the latest hit's peaks circled
 *                                  (`latest_hit`: `peaks` [ss, fs] in raw pixels, meta binning),
 *                                  resolution rings on the virtual powder (the crystallography
 *                                  preview's meta `geometry`: beam centre, pixel size, distance,
 *                                  wavelength, binning) at D_SPACINGS_A
 *   last frame                     /api/frames/last.png, when the receiver's last_frame preview
 *                                  changes (else every 2 s while a scan runs)
 *   parameter panel                GET /api/stages/STAGE/params (what a process runs with)
 *   buttons and parameter panel    POST /api/commands/{start_scan,abort,configure}, with the token
 *
 * Websockets reconnect by themselves with a growing delay (0.5 s to 10 s), and the event log
 * resumes after the last sequence number it holds (a new web process, told by its `stream` id,
 * numbers from 1 again), so a restarted web process or handler only shows as a gap. Kept across
 * a reload (localStorage): the token, the solver's error series (a preview holds only its latest
 * point) and the start form's values; the rest comes back from the API. The page never sends a
 * command by itself.
 */
"use strict";

// --- small tools ----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function fmt(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (typeof value !== "number") return String(value);
  return value.toLocaleString("en-US", {maximumFractionDigits: digits, minimumFractionDigits: 0});
}

function clock(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", {hour12: false});
}

const store = {
  get(key, fallback) {
    try {
      const text = localStorage.getItem(`surveyor.${key}`);
      return text === null ? fallback : JSON.parse(text);
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      localStorage.setItem(`surveyor.${key}`, JSON.stringify(value));
    } catch { /* private mode or full: the page still works, it only forgets on reload */ }
  },
};

// --- state ----------------------------------------------------------------------------------

const state = {
  token: "",
  snapshot: null,          // the latest StatusSnapshot (+ web)
  snapshotAt: 0,           // when it came (performance.now() ms), to age it between messages
  statusLive: false,       // the status websocket is open
  graph: null,             // {stage: [inputs]} when the API says, else null (boxes in file order)
  instances: new Map(),    // process name -> Set of instance ids seen (restarts = size - 1)
  events: [],              // newest last, each with `seq`
  lastSeq: null,
  stream: null,            // the web process's id: a new one restarts the numbering
  previews: new Map(),     // "stage/name" -> the preview entry last shown
  params: {},              // stage -> parameters in force, as the handler last said
  summaries: [],           // from scan_finished events
  scanRate: {scanId: null, points: []},
  errors: store.get("errors", {}),  // scan_id -> [[iterations, error], ...]
  hitRate: {x: [], y: [], times: [], scanId: null, seq: null},  // times: when each of its previews came
  latency: new Map(),      // stage -> {scanId, time, seq, counts, edges, meta}: each writer's histogram
  latencyMarks: [],        // [{stage, p50, p95}]: where the quantile lines were drawn (canvas x)
  peaks: {x: [], y: [], seq: null},   // peaks per frame: frame numbers, peak counts
  latestHit: null,         // {time, seq, meta, peaks: [[ss, fs]], circles: [[x, y, r]], rect}
  geometry: null,          // the crystallography preview's meta.geometry
  rings: [],               // [{d, rx, ry}] drawn on the powder, in CSS px
};
const plots = {};
window.surveyor = {state, plots};  // for the browser tests and the curious

// --- HTTP and websockets --------------------------------------------------------------------

async function getJSON(path) {
  const response = await fetch(path, {cache: "no-store"});
  if (!response.ok) throw new Error(`${path}: ${response.status} ${response.statusText}`);
  return response.json();
}

function errorText(body) {
  const error = body?.error ?? body?.detail;
  if (typeof error === "string") return error;
  if (Array.isArray(error)) return error.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  if (error && typeof error === "object") return error.message ? error.message : JSON.stringify(error);
  return "";
}

/** A command through the web process to the handler: {ok, result} or {ok: false, error}. */
async function command(name, args) {
  const headers = {"Content-Type": "application/json"};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let response;
  try {
    response = await fetch(`/api/commands/${name}`, {method: "POST", headers, body: JSON.stringify(args)});
  } catch (err) {
    return {ok: false, error: `the web process did not answer (${err.message})`};
  }
  let body = null;
  try {
    body = await response.json();
  } catch { /* not JSON: the status line says enough */ }
  if (response.ok && body?.ok !== false) return {ok: true, result: body?.result ?? body};
  let error = errorText(body) || `${response.status} ${response.statusText}`;
  if (response.status === 401 || response.status === 403) {
    error += " — open the URL `surveyor run` printed (…/#token=…) or paste its token above";
  }
  return {ok: false, status: response.status, error};
}

/** A websocket that reopens itself: 0.5 s after a drop, doubling to 10 s, reset once open. */
class LiveSocket {
  constructor(path, {onMessage, onState, beforeOpen}) {
    Object.assign(this, {path, onMessage, onState, beforeOpen, delay: 500});
    this.open();
  }

  async open() {
    if (this.beforeOpen) {
      try {
        await this.beforeOpen();
      } catch { /* the socket will fail too and retry */ }
    }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const path = typeof this.path === "function" ? this.path() : this.path;
    const socket = new WebSocket(`${scheme}://${location.host}${path}`);
    socket.onopen = () => {
      this.delay = 500;
      this.onState(true);
    };
    socket.onmessage = (message) => {
      let body;
      try {
        body = JSON.parse(message.data);
      } catch {
        return;
      }
      try {
        this.onMessage(body);
      } catch (err) {
        console.error(err);
      }
    };
    socket.onclose = () => {
      this.onState(false, this.delay);
      setTimeout(() => this.open(), this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }
}

// --- rates from successive snapshots --------------------------------------------------------

/** Counters sampled with each snapshot; a rate is the change over the last ~3 s. */
class Rates {
  constructor(windowS = 3) {
    this.windowS = windowS;
    this.samples = [];
  }

  add(time, values) {
    this.samples.push({time, values});
    while (this.samples.length > 2 && time - this.samples[1].time >= this.windowS) this.samples.shift();
  }

  rate(key) {
    const first = this.samples.find((sample) => sample.values[key] !== undefined);  // a new scan's key is new
    const last = this.samples[this.samples.length - 1];
    if (!first || first === last || last.time <= first.time) return null;
    const a = first.values[key];
    const b = last.values[key];
    if (b === undefined) return null;
    return Math.max(0, (b - a) / (last.time - first.time));  // a restarted process counts from 0
  }
}

const rates = new Rates();

function sampleCounters(snapshot) {
  const values = {};
  for (const [name, totals] of Object.entries(snapshot.stages || {})) {
    values[`stage:${name}`] = totals.frames_in;
    values[`out:${name}`] = totals.frames_out;
  }
  for (const row of snapshot.services || []) {
    values[`in:${row.instance}`] = row.frames_in || row.frames_out;  // a source only counts out
    values[`busy:${row.instance}`] = row.busy_s;
  }
  if (snapshot.scan) values[`scan:${snapshot.scan.scan_id}`] = scanReceived(snapshot.scan);
  rates.add(snapshot.time, values);
}

// --- status: header, scan, scans, graph -----------------------------------------------------

function onSnapshot(snapshot) {
  if (!snapshot || !snapshot.stages) {  // the web process has not heard the handler yet
    state.snapshot = {...(state.snapshot || {}), web: snapshot?.web};
    state.snapshotAt = performance.now();
    renderHeader();
    return;
  }
  state.snapshot = snapshot;
  state.snapshotAt = performance.now();
  for (const row of snapshot.services || []) {
    if (!state.instances.has(row.name)) state.instances.set(row.name, new Set());
    state.instances.get(row.name).add(row.instance);
  }
  sampleCounters(snapshot);
  renderHeader();
  renderScan(snapshot);
  renderScans();
  renderGraph(snapshot);
  renderPanels();
  renderParamsStages(Object.keys(snapshot.stages));
}

function renderHeader() {
  const snapshot = state.snapshot || {};
  const technique = $("start-form").elements.technique;
  if (snapshot.pipeline && !technique.dataset.chosen) {  // the pipeline's own technique, unless one was picked
    const match = [...technique.options].find((o) => snapshot.pipeline.includes(o.value));
    if (match) technique.value = match.value;
  }
  $("pipeline").textContent = snapshot.pipeline || "—";
  $("version").textContent = snapshot.version ? `v${snapshot.version}` : "";
  document.title = snapshot.pipeline ? `Surveyor · ${snapshot.pipeline}` : "Surveyor";
  const web = snapshot.web || {};
  const age = (web.age_s ?? 0) + (performance.now() - state.snapshotAt) / 1000;
  const handler = $("handler-state");
  if (!state.snapshotAt) {
    setBadge(handler, "handler …", "");
  } else if (!state.snapshot.stages && web.age_s == null) {
    setBadge(handler, "handler: no status yet", "bad");
  } else if (web.connected === false || age > 3) {
    setBadge(handler, `handler: no status for ${fmt(age, 0)} s`, "bad");
  } else {
    setBadge(handler, "handler live", "ok");
  }
}

function setBadge(element, text, kind) {
  element.textContent = text;
  element.className = `badge ${kind}`;
}

/** Frames of the scan so far: what its source sent out (the stage that counts most). */
function scanReceived(scan) {
  return Math.max(0, ...Object.values(scan.stages || {}).map((c) => Math.max(c.frames_in || 0, c.frames_out || 0)));
}

function renderScan(snapshot) {
  const scan = snapshot.scan;
  const bar = $("scan-bar");
  if (!scan) {
    const last = (snapshot.scans || [])[snapshot.scans.length - 1];
    $("scan-now").innerHTML = last
      ? `<span class="muted">no scan running · last:</span> <b>${esc(last.scan_id)}</b> <span class="state ${esc(last.state)}">${esc(last.state)}</span>`
      : `<span class="muted">no scan running</span>`;
    const share = last?.frames_expected ? last.frames_received / last.frames_expected : last?.state === "finished" ? 1 : 0;
    bar.style.width = `${Math.min(100, 100 * share)}%`;
    bar.className = last ? last.state : "";
    const rows = Object.entries(last?.stages || {}).map(([name, c]) =>
      `<tr><td>${esc(name)}</td><td>${fmt(c.frames_in)}</td><td>${fmt(c.frames_out)}</td><td>${fmt(c.busy_s, 1)} s</td></tr>`);
    $("scan-stages").innerHTML = rows.length ? `<table class="grid compact"><thead><tr><th>${esc(last.scan_id)}</th><th>in</th>
      <th>out</th><th>busy</th></tr></thead><tbody>${rows.join("")}</tbody></table>` : "";
    return;
  }
  const received = scanReceived(scan);
  const expected = scan.n_frames == null ? null : scan.n_frames + (scan.n_dark || 0);
  const rate = rates.rate(`scan:${scan.scan_id}`);
  if (state.scanRate.scanId !== scan.scan_id) state.scanRate = {scanId: scan.scan_id, points: []};
  if (rate !== null) state.scanRate.points.push([snapshot.time, rate]);
  const remaining = expected && rate ? (expected - received) / rate : null;
  $("scan-now").innerHTML = `<b>${esc(scan.scan_id)}</b> <span class="state ${esc(scan.state)}">${esc(scan.state)}</span>
    <span>${fmt(received)} / ${expected === null ? "?" : fmt(expected)} frames</span>
    <span><b>${fmt(rate, 1)}</b> frames/s</span>
    ${remaining ? `<span class="muted">~${fmt(remaining, 0)} s left</span>` : ""}
    <span class="muted">epoch ${esc(scan.epoch)}</span>`;
  bar.style.width = expected ? `${Math.min(100, (100 * received) / expected)}%` : "0";
  bar.className = "running";
  const rows = Object.entries(scan.stages).map(([name, c]) =>
    `<tr><td>${esc(name)}</td><td>${fmt(c.frames_in)}</td><td>${fmt(c.frames_out)}</td><td>${fmt(c.written)}</td>` +
    `<td class="${c.rejected ? "bad" : ""}">${fmt(c.rejected)}</td></tr>`).join("");
  $("scan-stages").innerHTML = `<table class="grid compact"><thead><tr><th>this scan</th><th>in</th><th>out</th>
    <th>written</th><th>rejected</th></tr></thead><tbody>${rows}</tbody></table>`;
  const points = state.scanRate.points;
  plotSeries("rate", $("plot-rate"), [points.map((p) => p[0]), points.map((p) => p[1])],
             {label: "frames/s", stroke: "#2364aa", time: true, height: 160});
}

/** The snapshot's summaries, and those of scan_finished events (which come before a snapshot has them). */
function renderScans() {
  const byScan = new Map();
  for (const summary of [...state.summaries, ...(state.snapshot?.scans || [])]) {
    byScan.set(`${summary.scan_id}@${summary.epoch}`, summary);
  }
  const scans = [...byScan.values()].sort((a, b) => a.epoch - b.epoch);
  if (!scans.length) return;
  $("scans-body").innerHTML = scans.reverse().map((s) => {
    const score = [["nrmse", "NRMSE", 3], ["recall", "recall", 3], ["precision", "precision", 3]]
      .filter(([key]) => typeof s[key] === "number").map(([key, label, d]) => `${label} ${fmt(s[key], d)}`).join(" · ");
    return `<tr data-scan="${esc(s.scan_id)}"><td><b>${esc(s.scan_id)}</b></td><td><span class="state ${esc(s.state)}">${esc(s.state)}</span></td>
      <td>${fmt(s.frames_received)}${s.frames_expected == null ? "" : ` / ${fmt(s.frames_expected)}`}</td>
      <td>${fmt(s.frames_written)}</td><td class="${s.frames_lost ? "bad" : ""}" title="${esc((s.losses || []).join("; "))}">${fmt(s.frames_lost)}</td>
      <td class="${s.frames_rejected ? "bad" : ""}">${fmt(s.frames_rejected)}</td><td>${fmt(s.rate_hz, 1)} Hz</td>
      <td>${fmt(s.wall_s, 1)} s</td><td>${esc(score)}</td></tr>`;
  }).join("");
}

// The graph: one box per stage in columns by depth (a stage right of its inputs) when the API
// names the edges; without them, the boxes in the pipeline file's order.

let graphKey = null;

function layers(names, inputs) {
  const depth = {};
  const visit = (name, seen) => {
    if (depth[name] !== undefined) return depth[name];
    if (seen.has(name)) return 0;  // a cycle: the pipeline loader refuses them; draw, do not hang
    seen.add(name);
    const upstream = (inputs?.[name] || []).filter((n) => names.includes(n));
    depth[name] = upstream.length ? 1 + Math.max(...upstream.map((n) => visit(n, seen))) : 0;
    return depth[name];
  };
  names.forEach((name, index) => { depth[name] = inputs ? visit(name, new Set()) : index; });
  return depth;
}

function renderGraph(snapshot) {
  const names = Object.keys(snapshot.stages);
  const inputs = state.graph;
  const key = JSON.stringify([names, inputs]);
  const container = $("graph");
  if (key !== graphKey) {
    graphKey = key;
    const depth = layers(names, inputs);
    const columns = Math.max(1, ...Object.values(depth).map((d) => d + 1));
    const rowsUsed = {};
    container.style.gridTemplateColumns = `repeat(${columns}, minmax(200px, 1fr))`;
    container.querySelectorAll(".stage").forEach((box) => box.remove());
    for (const name of names) {
      const box = document.createElement("div");
      box.className = "stage";
      box.dataset.stage = name;
      box.style.gridColumn = String(depth[name] + 1);
      rowsUsed[depth[name]] = (rowsUsed[depth[name]] || 0) + 1;
      box.style.gridRow = String(rowsUsed[depth[name]]);
      container.appendChild(box);
    }
  }
  for (const name of names) {
    const box = container.querySelector(`.stage[data-stage="${CSS.escape(name)}"]`);
    renderStage(box, name, snapshot.stages[name], (snapshot.services || []).filter((s) => s.stage === name));
  }
  drawEdges();
}

function renderStage(box, name, totals, rows) {
  const latest = new Map();  // a process name's newest instance: the live one if any
  for (const row of rows) {
    const held = latest.get(row.name);
    if (!held || (held.state === "dead" && row.state === "up")) latest.set(row.name, row);
  }
  const shown = [...latest.values()].sort((a, b) => a.name.localeCompare(b.name, "en", {numeric: true}));
  const up = shown.filter((r) => r.state === "up").length;
  const health = shown.length === 0 ? "down" : up === shown.length ? "up" : up === 0 ? "down" : "degraded";
  const restarts = (row) => Math.max(0, (state.instances.get(row.name)?.size || 1) - 1);
  const totalRestarts = shown.reduce((sum, row) => sum + restarts(row), 0);
  const losses = [["rejected", totals.rejected], ["dup", totals.duplicates], ["dropped", totals.dropped]];
  const lost = losses.some(([, n]) => n > 0);
  const source = state.graph ? !(state.graph[name] || []).length : !totals.frames_in && totals.frames_out > 0;
  const inflight = shown.reduce((sum, r) => sum + (r.state === "up" ? r.inflight : 0), 0);
  box.className = `stage ${health}`;
  box.innerHTML = `
    <header><b>${esc(name)}</b><span class="health ${health}">${health === "up" ? "up" : `${up}/${shown.length} up`}</span></header>
    <div class="totals">
      <span title="frames in since the pipeline started">in <b>${fmt(totals.frames_in)}</b></span>
      ${source ? "" : `<span class="rate" title="frames in per second">${fmt(rates.rate(`stage:${name}`), 1)}/s</span>`}
      <span title="frames out">out ${source ? `<b>${fmt(totals.frames_out)}</b>` : fmt(totals.frames_out)}</span>
      ${source ? `<span class="rate" title="frames out per second">${fmt(rates.rate(`out:${name}`), 1)}/s</span>` : ""}
      <span title="frames queued at its processes">queue ${fmt(totals.queue_depth)}</span>
      <span title="frames being processed">in flight ${fmt(inflight)}</span>
    </div>
    <div class="losses ${lost ? "bad" : ""}" title="frames its processes refused (rejected), took twice and dropped
      (duplicates), or dropped (a latest-first edge, an abort)">${losses.map(([label, n]) => `${label} ${fmt(n)}`).join(" · ")}
      ${totalRestarts ? `<span class="bad"> · restarts ${totalRestarts}</span>` : ""}</div>
    <table class="procs"><thead><tr><th>process</th><th title="frames in (a source: out)">frames</th><th>/s</th><th title="queue depth">q</th>
      <th title="share of the time busy">busy</th><th title="seconds since its last heartbeat">beat</th></tr></thead>
    <tbody>${shown.map((row) => {
      const busy = rates.rate(`busy:${row.instance}`);
      return `<tr class="${row.state}" data-process="${esc(row.name)}"
        title="${esc(`${row.name} (${row.instance}) · pid ${row.pid} on ${row.host} · out ${row.frames_out} · in flight ${row.inflight}`)}">
        <td><i class="dot ${row.state}"></i>${esc(shortName(row.name, name))}${restarts(row) ? ` <span class="bad" title="restarts">↻${restarts(row)}</span>` : ""}</td>
        <td>${fmt(row.frames_in || row.frames_out)}</td><td>${fmt(rates.rate(`in:${row.instance}`), 1)}</td><td>${fmt(row.queue_depth)}</td>
        <td>${busy === null ? "—" : `${fmt(Math.min(100, busy * 100), 0)}%`}</td>
        <td class="${row.heartbeat_age_s > 2 ? "bad" : ""}">${fmt(row.heartbeat_age_s, 1)} s</td></tr>`;
    }).join("")}</tbody></table>`;
}

/** `frame_worker.2` in the frame_worker box is `#2` (its full name in the row's title). */
function shortName(process, stage) {
  return process.startsWith(`${stage}.`) ? `#${process.slice(stage.length + 1)}` : process;
}

function drawEdges() {
  const container = $("graph");
  const svg = $("edges");
  const inputs = state.graph;
  svg.setAttribute("width", container.scrollWidth);
  svg.setAttribute("height", container.scrollHeight);
  if (!inputs) {
    svg.innerHTML = "";
    return;
  }
  const origin = container.getBoundingClientRect();
  const box = (name) => container.querySelector(`.stage[data-stage="${CSS.escape(name)}"]`)?.getBoundingClientRect();
  const paths = [];
  for (const [name, upstream] of Object.entries(inputs)) {
    const to = box(name);
    for (const source of upstream) {
      const from = box(source);
      if (!from || !to) continue;
      const x1 = from.right - origin.left, y1 = from.top - origin.top + 22;
      const x2 = to.left - origin.left, y2 = to.top - origin.top + 22;
      const bend = Math.max(20, (x2 - x1) / 2);
      paths.push(`<path d="M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}" marker-end="url(#arrow)"/>`);
    }
  }
  svg.innerHTML = `<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"
    orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>${paths.join("")}`;
}

/** The stages' inputs (and the parameters the pipeline file gives them), if the web process was
 * started with the pipeline file; else the graph shows no edges. */
async function loadGraph() {
  const normal = (body) => {
    const stages = body?.stages ?? body;
    if (!stages || typeof stages !== "object") return null;
    const inputs = {};
    for (const [name, stage] of Object.entries(stages)) {
      const list = Array.isArray(stage) ? stage : stage?.inputs;
      if (!Array.isArray(list)) return null;
      inputs[name] = list;
      if (stage?.params && !state.params[name]) state.params[name] = {...stage.params, from: "the pipeline file"};
    }
    return inputs;
  };
  try {
    state.graph = normal(await getJSON("/api/pipeline"));
  } catch {
    state.graph = null;
  }
  renderParamsValues();
}

// --- events ---------------------------------------------------------------------------------

function addEvents(body) {
  const list = Array.isArray(body) ? body : body?.events ?? (body?.kind ? [body] : []);
  let added = false;
  if (body?.stream && state.stream && body.stream !== state.stream) {
    state.lastSeq = null;  // a new web process: its numbers count from 1 again
    state.events.push({time: Date.now() / 1000, kind: "web_restarted", service: "web",
                       message: "the web process restarted: earlier events are shown as this page kept them"});
    added = true;
  }
  if (body?.stream) state.stream = body.stream;
  if (body?.missed) {
    state.events.push({time: Date.now() / 1000, kind: "events_missed", service: "web",
                       message: `${body.missed} events came and went while this page was away`});
    added = true;
  }
  for (const event of list) {
    if (typeof event.seq === "number") {
      if (state.lastSeq !== null && event.seq <= state.lastSeq) continue;
      state.lastSeq = event.seq;
    }
    state.events.push(event);
    added = true;
    if (event.kind === "scan_finished" && event.summary?.scan_id) {
      state.summaries.push(event.summary);
      renderScans();
    }
    if (event.kind === "config_changed" && event.stage) {
      if (event.params) state.params[event.stage] = {...event.params, from: "the handler"};
      renderParamsValues();
      if (event.stage === $("params-stage").value) loadParams(event.stage);
    }
  }
  if (state.events.length > 2000) state.events.splice(0, state.events.length - 2000);
  if (added) renderEvents();
}

const eventsPath = () => (state.lastSeq === null ? "/api/events" : `/api/events?since=${state.lastSeq}`);

function eventClass(kind) {
  if (/down|fail|refused|abort|reject|lost|error|dead/.test(kind)) return "bad";
  if (/_up$|^scan_started$|finished|_back$|recovered/.test(kind)) return "ok";
  return "";
}

function renderEvents() {
  const filter = $("events-filter").value.trim().toLowerCase();
  const rows = [];
  for (let i = state.events.length - 1; i >= 0 && rows.length < 400; i--) {
    const e = state.events[i];
    if (filter && !`${e.kind} ${e.service} ${e.message}`.toLowerCase().includes(filter)) continue;
    rows.push(`<tr class="${eventClass(e.kind)}"><td class="time">${clock(e.time)}</td><td class="kind-cell"><span class="kind">${esc(e.kind)}</span></td>
      <td class="service">${esc(e.service)}</td><td>${esc(e.message)}</td></tr>`);
  }
  $("events-body").innerHTML = rows.join("") || `<tr><td class="muted">no events yet</td></tr>`;
}

// --- previews: images and plots -------------------------------------------------------------

// Each known preview's arrays: the <img> that shows it, and how the PNG is scaled. `robust` (the
// 0.5-99.5 percentiles) keeps the object's unconstrained rim and the powder's brightest spots
// from flattening everything else into one colour.
const ROBUST = "scale=robust";
const VIEWS = {
  reconstruction: {images: {object_phase: ["img-object_phase", ROBUST], object_amplitude: ["img-object_amplitude", ROBUST],
                            probe_amplitude: ["img-probe_amplitude", ""]}, update: onReconstruction},
  stxm: {images: {transmission: ["img-transmission", ""], dpc_phase: ["img-dpc_phase", ""],
                  probe_amplitude: ["img-stxm_probe", ""]}, update: onStxm},
  crystallography: {images: {virtual_powder: ["img-virtual_powder", ROBUST]}, update: onCrystallography},
  latest_hit: {images: {image: ["img-latest_hit", ROBUST]}, update: onLatestHit},
  latency: {images: {}, update: onLatency},
};

const previewURL = (p, array, ext) =>
  `/api/previews/${encodeURIComponent(p.stage)}/${encodeURIComponent(p.name)}/${encodeURIComponent(array)}.${ext}`;

/** An <img> to a new PNG, swapped in once loaded (no blank flash); data-time says which preview. */
function showImage(img, url, preview, query = "") {
  const next = new Image();
  next.onload = () => {
    img.src = next.src;
    img.dataset.time = String(preview.time);
    img.dataset.scan = preview.scan_id;
    img.classList.remove("missing");
    OVERLAYS[img.id]?.();
  };
  next.src = `${url}?${query ? `${query}&` : ""}t=${preview.time}`;  // t: a new URL for each preview
}

/** A preview array's numbers (its .npy), or null when they cannot be had or belong to a newer preview
 * than `p` (one that came meanwhile: its own notice draws it, so what is drawn stays one preview's). */
async function fetchArray(p, array) {
  try {
    const response = await fetch(previewURL(p, array, "npy"), {cache: "no-store"});
    if (!response.ok || response.headers.get("X-Preview-Seq") !== String(p.seq)) return null;
    return parseNpy(await response.arrayBuffer());
  } catch {
    return null;
  }
}

let previewsBusy = false;

async function pollPreviews() {
  if (previewsBusy) return;
  previewsBusy = true;
  try {
    await showPreviews(await getJSON("/api/previews"));
  } catch { /* the web process is away: the next second tries again */ } finally {
    previewsBusy = false;
  }
}

async function showPreviews(list) {
  for (const preview of Array.isArray(list) ? list : list.previews || []) {
    const key = `${preview.stage}/${preview.name}`;
    const held = state.previews.get(key);
    if (held && (held.seq ?? held.time) === (preview.seq ?? preview.time)) continue;
    state.previews.set(key, preview);
    if (preview.name === "last_frame") {  // the receiver's downsampled frame: the Last frame card
      refreshLastFrame(true);
      continue;
    }
    const view = VIEWS[preview.name];
    const arrays = new Set((preview.arrays || []).map((a) => a.name));
    if (view) {
      for (const [array, [id, query]] of Object.entries(view.images)) {
        if (arrays.has(array)) showImage($(id), previewURL(preview, array, "png"), preview, query);
      }
      await view.update(preview);
    } else {
      showOther(preview);
    }
  }
  renderPanels();
}

function onReconstruction(p) {
  const m = p.meta || {};
  $("ptycho-meta").textContent = `scan ${p.scan_id} · iteration ${fmt(m.iterations)} · error ${fmt(m.error, 4)} · ` +
    `${fmt(m.frames)} frames in the solver · ${clock(p.time)}`;
  if (typeof m.iterations === "number" && typeof m.error === "number" && Number.isFinite(m.error)) {
    const series = (state.errors[p.scan_id] ||= []).filter(([it]) => it !== m.iterations);
    series.push([m.iterations, m.error]);
    series.sort((a, b) => a[0] - b[0]);
    state.errors[p.scan_id] = series;
    const kept = Object.keys(state.errors).slice(-5);  // the last five scans' series
    store.set("errors", Object.fromEntries(kept.map((id) => [id, state.errors[id]])));
  }
  const series = state.errors[p.scan_id] || [];
  plotSeries("error", $("plot-error"), [series.map((s) => s[0]), series.map((s) => s[1])],
             {label: "solver error", stroke: "#c0392b", xLabel: "iterations", logY: series.every((s) => s[1] > 0),
              points: true});
}

function onStxm(p) {
  if (![...state.previews.values()].some((q) => q.name === "reconstruction")) {
    $("ptycho-meta").textContent = `scan ${p.scan_id} · ${fmt(p.meta?.frames)} frames in the STXM images`;
  }
}

async function onCrystallography(p) {
  const m = p.meta || {};
  $("sx-meta").textContent = `scan ${p.scan_id} · ${fmt(m.frames)} frames · ${fmt(m.hits)} hits · ` +
    `hit rate ${fmt(100 * (m.hit_rate ?? NaN), 1)} % · ${clock(p.time)}`;
  if (!(p.arrays || []).some((a) => a.name === "hit_rate")) return;
  const history = (await fetchArray(p, "hit_rate"))?.data;
  if (!history) return;
  // One sample per preview, the newest at the preview's time; the spacing is the previews' own.
  const hr = state.hitRate;
  if (hr.scanId !== p.scan_id) Object.assign(hr, {scanId: p.scan_id, times: []});
  hr.times.push(p.time);
  const gaps = hr.times.slice(1).map((t, i) => t - hr.times[i]).filter((g) => g > 0).sort((a, b) => a - b);
  const step = typeof m.preview_interval_s === "number" ? m.preview_interval_s : gaps.length ? gaps[gaps.length >> 1] : 1;
  hr.seq = p.seq;
  hr.y = Array.from(history, (v) => 100 * v);
  hr.x = hr.y.map((_, i) => p.time - (hr.y.length - 1 - i) * step);
  plotSeries("hitRate", $("plot-hitrate"), [hr.x, hr.y],
             {label: "hit rate (%)", stroke: "#1e8449", time: true, yRange: [0, 100]});
  state.geometry = m.geometry || null;
  drawRings();
  await showPeaksPerFrame(p);
}

/** The peak counts of the newest frames (`n_peaks`, their numbers `n_peaks_frames`), by frame number. */
async function showPeaksPerFrame(p) {
  const names = new Set((p.arrays || []).map((a) => a.name));
  if (!names.has("n_peaks") || !names.has("n_peaks_frames")) return;
  const [counts, frames] = await Promise.all([fetchArray(p, "n_peaks"), fetchArray(p, "n_peaks_frames")]);
  if (!counts || !frames || counts.data.length !== frames.data.length) return;
  const pairs = Array.from(frames.data, (frame, i) => [frame, counts.data[i]]).sort((a, b) => a[0] - b[0]);
  Object.assign(state.peaks, {x: pairs.map((q) => q[0]), y: pairs.map((q) => q[1]), seq: p.seq});
  plotSeries("peaks", $("plot-peaks"), [state.peaks.x, state.peaks.y],
             {label: "peaks", stroke: "#8e44ad", xLabel: "frame", points: true, line: false, height: 160});
}

// --- overlays: the latest hit's peaks, resolution rings on the powder --------------------------

const D_SPACINGS_A = [20, 10, 6, 4, 3, 2.5, 2, 1.5];
const PEAK_COLOUR = "#ff2d55";
const RING_COLOUR = "#ff9f1c";
const OVERLAYS = {"img-latest_hit": () => drawHitOverlay(), "img-virtual_powder": () => drawRings()};

/** Where an <img> (object-fit: contain) draws its picture, in CSS px of its box, and the scale. */
function pictureRect(img) {
  const [w, h] = [img.naturalWidth, img.naturalHeight];
  const [W, H] = [img.clientWidth, img.clientHeight];
  const scale = Math.min(W / w, H / h);
  return {left: (W - w * scale) / 2, top: (H - h * scale) / 2, width: w * scale, height: h * scale, scale};
}

/** The overlay canvas laid over its image and cleared; its 2-D context in CSS px. */
function overlayContext(img, canvas) {
  const ratio = window.devicePixelRatio || 1;
  Object.assign(canvas.style, {left: `${img.offsetLeft}px`, top: `${img.offsetTop}px`,
                               width: `${img.clientWidth}px`, height: `${img.clientHeight}px`});
  canvas.width = Math.round(img.clientWidth * ratio);
  canvas.height = Math.round(img.clientHeight * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, img.clientWidth, img.clientHeight);
  return context;
}

async function onLatestHit(p) {
  const peaks = await fetchArray(p, "peaks");
  if (!peaks) return;
  const rows = [];
  for (let i = 0; i + 1 < peaks.data.length; i += 2) rows.push([peaks.data[i], peaks.data[i + 1]]);
  state.latestHit = {time: p.time, seq: p.seq, meta: p.meta || {}, peaks: rows, circles: [], rect: null};
  const m = p.meta || {};
  $("latest-hit-caption").textContent = `latest hit: frame ${fmt(m.frame)}, ${fmt(m.n_peaks)} peaks circled`;
  drawHitOverlay();
}

/** Circles round the latest hit's peaks, once its image is the one shown (a raw pixel centre
 * (ss, fs) is at ((fs + 0.5) / binning, (ss + 0.5) / binning) of the binned image's corners). */
function drawHitOverlay() {
  const img = $("img-latest_hit");
  const hit = state.latestHit;
  if (!hit || !img.naturalWidth || img.dataset.time !== String(hit.time)) return;
  const context = overlayContext(img, $("overlay-latest_hit"));
  const rect = pictureRect(img);
  const binning = hit.meta.binning || 1;
  const radius = Math.max(5, 3 * rect.scale);
  context.strokeStyle = PEAK_COLOUR;
  context.lineWidth = 1.5;
  hit.circles = hit.peaks.map(([ss, fs]) => [rect.left + ((fs + 0.5) / binning) * rect.scale,
                                             rect.top + ((ss + 0.5) / binning) * rect.scale, radius]);
  for (const [x, y, r] of hit.circles) {
    context.beginPath();
    context.arc(x, y, r, 0, 2 * Math.PI);
    context.stroke();
  }
  hit.rect = rect;
}

/** Resolution rings on the virtual powder: at d (Å), 2θ = 2 asin(λ / 2d) and the ring's radius is
 * distance · tan 2θ, over the pixel size (an ellipse where pixels are not square); only rings
 * that fall on the image. None without energy, distance and pixel size. */
function drawRings() {
  const img = $("img-virtual_powder");
  const g = state.geometry;
  if (!img.naturalWidth) return;
  const context = overlayContext(img, $("overlay-virtual_powder"));
  state.rings = [];
  if (!g || !g.wavelength_a || !g.distance_m || !g.pixel_size_m) {
    $("powder-caption").textContent = "virtual powder (sum of hits); no rings: energy, distance or pixel size unknown";
    return;
  }
  const rect = pictureRect(img);
  const binning = g.binning || 1;
  const [cy, cx] = g.beam_center_px;
  const x0 = rect.left + ((cx + 0.5) / binning) * rect.scale;
  const y0 = rect.top + ((cy + 0.5) / binning) * rect.scale;
  const [py, px] = g.pixel_size_m;
  const farthest = Math.max(...[[rect.left, rect.top], [rect.left + rect.width, rect.top], [rect.left, rect.top + rect.height],
                                [rect.left + rect.width, rect.top + rect.height]].map(([x, y]) => Math.hypot(x - x0, y - y0)));
  context.save();
  context.beginPath();
  context.rect(rect.left, rect.top, rect.width, rect.height);
  context.clip();
  context.strokeStyle = context.fillStyle = RING_COLOUR;
  context.lineWidth = 1.5;
  context.font = "11px system-ui, sans-serif";
  for (const d of D_SPACINGS_A) {
    const sine = g.wavelength_a / (2 * d);
    if (sine >= 1) continue;
    const radius = g.distance_m * Math.tan(2 * Math.asin(sine));  // metres on the detector
    const rx = (radius / px / binning) * rect.scale;
    const ry = (radius / py / binning) * rect.scale;
    if (Math.min(rx, ry) < 4 || Math.min(rx, ry) > farthest) continue;
    context.beginPath();
    context.ellipse(x0, y0, rx, ry, 0, 0, 2 * Math.PI);
    context.stroke();
    context.fillText(`${d} Å`, x0 + rx * Math.SQRT1_2 + 2, y0 - ry * Math.SQRT1_2 - 2);
    state.rings.push({d, rx, ry});
  }
  context.restore();
  $("powder-caption").textContent = state.rings.length
    ? `virtual powder (sum of hits), rings at ${state.rings.map((r) => r.d).join(", ")} Å`
    : "virtual powder (sum of hits); no ring of these d-spacings falls on it";
}

// --- latency: a frame's arrival to its result on disk, per writer -----------------------------

const LATENCY_COLOURS = ["#2364aa", "#b9770e", "#7d3c98", "#117a65"];
let latencyQuantiles = [];  // what the plot's draw hook marks: [{stage, colour, p50, p95}]

/** Whether a positive number is a power of ten (where the log axis is labelled). */
const decade = (v) => typeof v === "number" && v > 0 && Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-6;

function seconds(value) {
  if (typeof value !== "number") return "—";
  if (value < 1e-3) return `${fmt(value * 1e6, 0)} µs`;
  if (value < 1) return `${fmt(value * 1e3, value < 0.01 ? 1 : 0)} ms`;
  return `${fmt(value, 2)} s`;
}

async function onLatency(p) {
  const [counts, edges] = await Promise.all([fetchArray(p, "counts"), fetchArray(p, "edges_s")]);
  if (!counts || !edges || edges.data.length !== counts.data.length + 1) return;
  state.latency.set(p.stage, {scanId: p.scan_id, time: p.time, seq: p.seq, counts: Array.from(counts.data),
                              edges: Array.from(edges.data), meta: p.meta || {}});
  renderLatency();
}

/** The newest scan's histograms, one series per writer (the one furthest down the graph first):
 * steps over the bins that hold frames, with lines at each one's p50 (solid) and p95 (dashed). */
function renderLatency() {
  const all = [...state.latency.entries()];
  if (!all.length) return;
  const newest = all.reduce((a, b) => (b[1].time > a[1].time ? b : a))[1].scanId;
  const depth = state.graph ? layers(Object.keys(state.graph), state.graph) : {};
  const shown = all.filter(([, h]) => h.scanId === newest && h.counts.some((c) => c > 0))
    .sort((a, b) => (depth[b[0]] ?? 0) - (depth[a[0]] ?? 0) || a[0].localeCompare(b[0]));
  if (!shown.length) return;
  const edges = shown[0][1].edges;
  let lo = edges.length, hi = 0;
  for (const [, h] of shown) {
    const first = h.counts.findIndex((c) => c > 0);
    const last = h.counts.length - 1 - [...h.counts].reverse().findIndex((c) => c > 0);
    lo = Math.min(lo, first);
    hi = Math.max(hi, last);
  }
  lo = Math.max(0, lo - 1);
  hi = Math.min(edges.length - 2, hi + 1);
  const x = edges.slice(lo, hi + 2);
  const ys = shown.map(([, h]) => [...h.counts.slice(lo, hi + 1), 0]);
  $("latency-meta").innerHTML = shown.map(([stage, h], i) => `<span data-stage="${esc(stage)}"><i class="swatch"
    style="background:${LATENCY_COLOURS[i % LATENCY_COLOURS.length]}"></i>${esc(stage)}: p50 ${seconds(h.meta.p50_s)} ·
    p95 ${seconds(h.meta.p95_s)} · max ${seconds(h.meta.max_s)} · ${fmt(h.meta.frames)} frames</span>`).join("");
  const key = `${shown.map(([stage]) => stage).join(",")}`;
  const container = $("plot-latency");
  latencyQuantiles = shown.map(([stage, h], i) => ({stage, colour: LATENCY_COLOURS[i % LATENCY_COLOURS.length],
                                                    p50: h.meta.p50_s, p95: h.meta.p95_s}));
  let plot = plots.latency;
  if (!plot || plot.key !== key) {
    plot?.destroy();
    container.innerHTML = "";
    plot = new uPlot({
      width: Math.max(200, container.clientWidth), height: 170,
      scales: {x: {time: false, distr: 3}, y: {range: (u, min, max) => [0, Math.max(1, max) * 1.08]}},
      series: [{label: "latency (s)"}, ...shown.map(([stage], i) => {
        const colour = LATENCY_COLOURS[i % LATENCY_COLOURS.length];
        return {label: stage, stroke: colour, fill: `${colour}33`, width: 1.5, points: {show: false},
                paths: uPlot.paths.stepped({align: 1})};
      })],
      axes: [{label: "from arrival to disk", stroke: "#555", grid: {stroke: "#f3f3f3"},
              values: (u, splits) => splits.map((v) => (decade(v) ? seconds(v) : ""))},
             {label: "frames", stroke: "#555", grid: {stroke: "#eee"}, size: 60}],
      legend: {show: false},
      hooks: {draw: [(u) => {
        const context = u.ctx;
        state.latencyMarks = [];
        for (const mark of latencyQuantiles) {
          const drawn = {stage: mark.stage};
          for (const [q, dash] of [["p50", []], ["p95", [5, 4]]]) {
            if (typeof mark[q] !== "number") continue;
            const at = Math.round(u.valToPos(mark[q], "x", true));
            if (at < u.bbox.left || at > u.bbox.left + u.bbox.width) continue;
            context.save();
            context.strokeStyle = mark.colour;
            context.lineWidth = 2 * (window.devicePixelRatio || 1);
            context.setLineDash(dash.map((v) => v * (window.devicePixelRatio || 1)));
            context.beginPath();
            context.moveTo(at, u.bbox.top);
            context.lineTo(at, u.bbox.top + u.bbox.height);
            context.stroke();
            context.restore();
            drawn[q] = at;
          }
          state.latencyMarks.push(drawn);
        }
      }]},
    }, [x, ...ys], container);
    plot.key = key;
    plots.latency = plot;
    new ResizeObserver(() => plot.setSize({width: Math.max(200, container.clientWidth), height: 170})).observe(container);
  }
  plot.setData([x, ...ys]);
}

function showOther(p) {
  const gallery = $("other-images");
  for (const spec of p.arrays || []) {
    if (spec.shape.length !== 2) continue;
    const id = `other-${p.stage}-${p.name}-${spec.name}`;
    let figure = gallery.querySelector(`figure[data-id="${CSS.escape(id)}"]`);
    if (!figure) {
      figure = document.createElement("figure");
      figure.dataset.id = id;
      figure.innerHTML = `<img alt=""><figcaption>${esc(`${p.stage} · ${p.name} · ${spec.name}`)}</figcaption>`;
      gallery.appendChild(figure);
    }
    showImage(figure.querySelector("img"), previewURL(p, spec.name, "png"), p);
  }
  $("others").hidden = !gallery.children.length;
}

/** A .npy file's numbers (little-endian numeric dtypes, as numpy writes them here). */
function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const wide = bytes[6] >= 2;
  const headerLength = wide ? view.getUint32(8, true) : view.getUint16(8, true);
  const start = (wide ? 12 : 10) + headerLength;
  const header = new TextDecoder().decode(bytes.subarray(wide ? 12 : 10, start));
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(",").filter((s) => s.trim()).map(Number);
  const types = {"<f4": Float32Array, "<f8": Float64Array, "<i4": Int32Array, "<u4": Uint32Array, "<i2": Int16Array,
                 "<u2": Uint16Array, "|u1": Uint8Array, "|i1": Int8Array};
  const Type = types[descr];
  if (!Type) throw new Error(`unsupported .npy dtype ${descr}`);
  return {shape, data: new Type(buffer.slice(start))};
}

// --- plots (uPlot) --------------------------------------------------------------------------

/** Draw [xs, ys] in `container`, making the plot on first data (the placeholder shows before). */
function plotSeries(name, container, data, {label, stroke, time = false, xLabel, yRange, logY = false, points = false,
                                            line = true, height = 200}) {
  if (!data[0].length) return;
  let plot = plots[name];
  if (!plot || plot.logY !== logY) {
    plot?.destroy();
    container.innerHTML = "";
    const y = yRange ? {range: yRange} : logY ? {distr: 3} : {};
    plot = new uPlot({
      width: Math.max(200, container.clientWidth), height,
      scales: {x: {time}, y},
      series: [{label: xLabel || "time"}, {label, stroke, width: 2, points: {show: points, size: 5, fill: stroke},
                                           ...(line ? {} : {paths: () => null})}],
      axes: [{label: xLabel, stroke: "#555", grid: {stroke: "#eee"}},
             {label, stroke: "#555", grid: {stroke: "#eee"}, size: 60}],
      legend: {show: false},
    }, data, container);
    plot.logY = logY;
    plots[name] = plot;
    new ResizeObserver(() => plot.setSize({width: Math.max(200, container.clientWidth), height})).observe(container);
  } else {
    plot.setData(data);
  }
}

// --- the panels shown -----------------------------------------------------------------------

function renderPanels() {
  const snapshot = state.snapshot || {};
  const names = Object.keys(snapshot.stages || {});
  const preview = (name) => [...state.previews.values()].some((p) => p.name === name);
  $("ptycho").hidden = !(preview("reconstruction") || preview("stxm") || /ptycho/.test(snapshot.pipeline || ""));
  $("sx").hidden = !(preview("crystallography") || names.some((n) => /peak/.test(n)) ||
                     /cryst/.test(snapshot.pipeline || ""));
}

// --- last frame -----------------------------------------------------------------------------

let lastFrameAt = 0;

/** The last frame again: when its preview is new (`now`), else every 2 s while a scan runs. */
function refreshLastFrame(now = false) {
  const running = Boolean(state.snapshot?.scan);
  const previewed = [...state.previews.values()].some((p) => p.name === "last_frame");
  if (!now && lastFrameAt && (previewed || !running || performance.now() - lastFrameAt < 2000)) return;
  lastFrameAt = performance.now();
  const img = $("img-last-frame");
  const next = new Image();
  next.onload = () => {
    img.src = next.src;
    img.classList.remove("missing");
    $("frame-meta").textContent = `${next.naturalWidth} × ${next.naturalHeight} · ${clock(Date.now() / 1000)}`;
  };
  next.onerror = () => {
    if (!img.src) img.classList.add("missing");
  };
  next.src = `/api/frames/last.png?t=${Date.now()}`;
}

// --- commands: start, abort, configure ------------------------------------------------------

function reply(element, outcome, success) {
  element.className = `reply ${outcome.ok ? "ok" : "bad"}`;
  element.textContent = outcome.ok ? success(outcome.result || {}) : `refused: ${outcome.error}`;
}

function setupCommands() {
  const form = $("start-form");
  const saved = store.get("start", {});
  for (const [key, value] of Object.entries(saved)) if (form.elements[key]) form.elements[key].value = value;
  if (saved.technique) form.elements.technique.dataset.chosen = "1";
  form.elements.technique.addEventListener("change", (e) => { e.target.dataset.chosen = "1"; });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = Object.fromEntries(new FormData(form));
    store.set("start", values);
    const args = {scan_id: values.scan_id, technique: values.technique};
    if (values.n_frames) args.n_frames = Number(values.n_frames);
    if (values.n_dark) args.n_dark = Number(values.n_dark);
    $("command-reply").textContent = `starting ${args.scan_id} …`;
    reply($("command-reply"), await command("start_scan", args),
          (r) => `scan ${r.scan_id ?? args.scan_id} started (epoch ${r.epoch ?? "?"})`);
  });
  $("abort").addEventListener("click", async () => {
    const scan = state.snapshot?.scan;
    $("command-reply").textContent = "aborting …";
    reply($("command-reply"), await command("abort", scan ? {scan_id: scan.scan_id} : {}),
          (r) => `scan ${r.scan_id ?? "—"} aborted, ${fmt(r.dropped)} frames dropped`);
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    store.set("token", state.token);
    $("token").placeholder = state.token ? "token set" : "paste the token";
  });
}

// The peak finder's parameters (OM's peakfinder8 names; libs/crystallography/params.py). The
// page checks nothing itself: the handler validates, and its refusal is shown as it says it.
const PEAK_PARAMS = [
  ["minimum_snr", "minimum SNR"], ["adc_threshold", "ADC threshold"],
  ["min_pixel_count", "min pixels / peak"], ["max_pixel_count", "max pixels / peak"],
  ["local_bg_radius", "background radius (px)"], ["min_res", "min radius (px)"], ["max_res", "max radius (px)"],
  ["min_peaks", "hit: min peaks"], ["max_peaks", "hit: max peaks"],
];

function setupParams() {
  $("params-fields").innerHTML = PEAK_PARAMS.map(([key, label]) =>
    `<label>${esc(label)}<input name="${key}" type="number" step="any" data-key="${key}">
     <small class="in-force" data-for="${key}"></small></label>`).join("");
  $("params-fields").addEventListener("input", (event) => {
    const input = event.target;
    input.classList.toggle("dirty", input.value !== (input.dataset.inForce ?? ""));
  });
  $("params-stage").addEventListener("change", () => {
    renderParamsValues();
    loadParams($("params-stage").value);
  });
  $("params-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const stage = $("params-stage").value;
    const params = {};
    for (const input of $("params-fields").querySelectorAll("input")) {
      if (input.value === "" || input.value === (input.dataset.inForce ?? "")) continue;
      params[input.dataset.key] = Number(input.value);
    }
    const out = $("params-reply");
    if (!Object.keys(params).length) {
      out.className = "reply";
      out.textContent = "nothing changed";
      return;
    }
    out.className = "reply";
    out.textContent = `sending ${JSON.stringify(params)} …`;
    const outcome = await command("configure", {stage, params});
    if (outcome.ok) {
      if (outcome.result?.params) state.params[stage] = {...outcome.result.params, from: "the handler"};
      for (const input of $("params-fields").querySelectorAll("input")) input.classList.remove("dirty");
      renderParamsValues();
      loadParams(stage);
    }
    reply(out, outcome, () => `in force on ${stage}: ` +
          Object.keys(params).map((k) => `${k} = ${state.params[stage]?.[k] ?? params[k]}`).join(", "));
  });
}

/** The parameters a process of the stage says it runs with (what is in force, not what was sent). */
async function loadParams(stage) {
  if (!stage) return;
  try {
    const body = await getJSON(`/api/stages/${encodeURIComponent(stage)}/params`);
    state.params[stage] = {...body.params, from: body.service || stage};
  } catch { /* no process up, or an older web process: the values last heard stay */ }
  renderParamsValues();
}

function renderParamsStages(names) {
  const select = $("params-stage");
  if (select.dataset.names === names.join(",")) return;
  select.dataset.names = names.join(",");
  const preferred = names.find((n) => /peak/.test(n)) || names[0] || "";
  const current = select.value || preferred;
  select.innerHTML = names.map((n) => `<option${n === current ? " selected" : ""}>${esc(n)}</option>`).join("");
  renderParamsValues();
  loadParams(select.value);
}

function renderParamsValues() {
  const params = state.params[$("params-stage").value] || {};
  for (const input of $("params-fields").querySelectorAll("input")) {
    const key = input.dataset.key;
    const known = params[key] === undefined || params[key] === null ? "" : String(params[key]);
    const wasClean = !input.classList.contains("dirty");
    input.dataset.inForce = known;
    if (wasClean) input.value = known;
    $("params-fields").querySelector(`[data-for="${key}"]`).textContent = known === "" ? "" : `in force: ${known}`;
  }
  $("params-source").textContent = params.from ? `as ${params.from} says` : "";
}

// --- start ----------------------------------------------------------------------------------

function readToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    store.set("token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);  // not left in the address bar
  }
  return store.get("token", "");
}

async function pollStatus() {
  if (state.statusLive) return;
  try {
    onSnapshot(await getJSON("/api/status"));
  } catch { /* the web process is away: the badges say so */ }
}

function start() {
  state.token = readToken();
  $("token").placeholder = state.token ? "token set" : "paste the token";
  setupCommands();
  setupParams();
  $("events-filter").addEventListener("input", renderEvents);
  window.addEventListener("resize", drawEdges);
  for (const [id, draw] of Object.entries(OVERLAYS)) new ResizeObserver(() => draw()).observe($(id));
  pollStatus();
  new LiveSocket("/api/status/ws", {
    onMessage: onSnapshot,
    onState(open, retryMs) {
      state.statusLive = open;
      if (open && !state.graph) loadGraph();  // the web process was away when the page came
      setBadge($("page-state"), open ? "live" : `reconnecting in ${fmt(retryMs / 1000, 1)} s`, open ? "ok" : "warn");
    },
  });
  new LiveSocket(() => `/api/events/ws${eventsPath().slice("/api/events".length)}`, {
    onMessage: addEvents,
    onState() {},
    async beforeOpen() {  // what came while the socket was down, then the socket from there
      addEvents(await getJSON(eventsPath()));
    },
  });
  renderEvents();
  pollPreviews();
  refreshLastFrame();
  setInterval(() => {
    renderHeader();
    pollStatus();
    pollPreviews();
    refreshLastFrame();
  }, 1000);
}

start();
