// linkpulse page: overview, live graphs (SSE /api/v1/live), history (/api/v1/series).
// Plain JS and canvas; everything comes from this server.
"use strict";
const $ = (id) => document.getElementById(id);
const LIVE_SPAN_MS = 10000;
const state = { links: [], live: new Map(), es: null, hist: [], cursor: null, range: null };
window.linkpulse = state; // for tests and curious engineers

function bps(v) {
  if (v === null || v === undefined) return "–";
  const u = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
  let i = 0;
  while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
  return v.toFixed(v < 10 ? 2 : 1) + " " + u[i];
}
function ago(ns) {
  const s = Math.max(0, Math.round((Date.now() - ns / 1e6) / 1000));
  const t = s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min" : s < 172800 ? Math.round(s / 3600) + " h" : Math.round(s / 86400) + " d";
  return new Date(ns / 1e6).toLocaleString() + " (" + t + " ago)";
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (r.status === 401) { showLogin(); throw new Error("login needed"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function showLogin() {
  $("login").hidden = false; $("main").hidden = true;
  if (state.es) { state.es.close(); state.es = null; }
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await fetch("/api/v1/login", { method: "POST", credentials: "same-origin",
    headers: { "content-type": "application/json" }, body: JSON.stringify({ token: $("token").value }) });
  if (r.ok) { $("token").value = ""; $("login-error").textContent = ""; start(); }
  else { const b = await r.json().catch(() => ({})); $("login-error").textContent = b.error || "login failed"; }
});
$("logout").addEventListener("click", async () => {
  await fetch("/api/v1/logout", { method: "POST", credentials: "same-origin" });
  showLogin();
});

// ---- overview ----
async function refreshLinks() {
  const d = await api("/api/v1/links");
  $("router").textContent = d.router_id + " · " + d.site;
  $("clock").textContent = d.clock && d.clock.synced === false ? "clock NOT synchronised" : "";
  const changed = d.links.length !== state.links.length;
  state.links = d.links;
  const rows = d.links.map((l) => {
    const st = l.health || l.state;
    const rtt = l.rtt_ms === null || l.rtt_ms === undefined ? "–" : Number(l.rtt_ms).toFixed(1) + " ms";
    const loss = l.loss_ratio === null || l.loss_ratio === undefined ? "–" : (100 * l.loss_ratio).toFixed(2) + " %";
    return `<tr data-link="${l.index}"><td>${esc(l.label)} <span class="muted">${esc(l.interface)}</span></td>` +
      `<td><span class="state ${esc(String(st))}">${esc(String(st))}</span></td><td>${esc(l.operator || "–")}</td>` +
      `<td class="num">${bps(l.throughput_down_bps)}</td><td class="num">${bps(l.throughput_up_bps)}</td>` +
      `<td class="num">${rtt}</td><td class="num">${loss}</td><td>${ago(l.since_utc_ns)}</td></tr>`;
  });
  document.querySelector("#links tbody").innerHTML = rows.join("");
  if (changed) { buildLive(); buildHistory(); }
}
function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

// ---- charts ----
// withRtt: a second canvas (`${id}-rtt`) under the rates, probe RTT and passive TCP RTT in ms.
function chartBox(parent, id, title, withRtt) {
  const d = document.createElement("div");
  d.className = "chart";
  const rttLegend = withRtt ? ` <span class="rtt">■ RTT</span> <span class="tcp">■ TCP RTT</span>` : "";
  const rttCanvas = withRtt ? `<canvas id="${id}-rtt" class="rtt"></canvas>` : "";
  d.innerHTML = `<div class="title"><strong>${esc(title)}</strong><span class="legend"><span class="down">■ down</span> <span class="up">■ up</span>${rttLegend} <span class="val muted"></span></span></div><canvas id="${id}"></canvas>${rttCanvas}`;
  parent.appendChild(d);
  return d;
}
function fit(c) {
  const r = window.devicePixelRatio || 1;
  const w = Math.max(100, Math.round(c.clientWidth * r)), h = Math.max(60, Math.round(c.clientHeight * r));
  if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
  return r;
}
const RATE_LINES = [["down", "#0969da"], ["up", "#8250df"]];
const RTT_LINES = [["rtt", "#1a7f37"], ["tcp", "#bf8700"]];
const ms = (v) => v.toFixed(v < 10 ? 2 : 1) + " ms";
// series: [{t0, t1, partial, <key>: value}] in ms; lines: [[key, colour]] (default: down and up
// in bit/s); a null value is a gap (no sample), never drawn as 0.
function draw(c, series, t0, t1, cursor, lines = RATE_LINES, fmt = bps) {
  const r = fit(c), ctx = c.getContext("2d"), W = c.width, H = c.height, pad = 4 * r, axis = 14 * r;
  ctx.clearRect(0, 0, W, H);
  let max = lines === RATE_LINES ? 1 : 0.001;
  for (const p of series) for (const [key] of lines) if (p[key] !== null && p[key] !== undefined) max = Math.max(max, p[key]);
  const x = (t) => ((t - t0) / (t1 - t0)) * W, y = (v) => H - axis - (v / max) * (H - axis - pad);
  ctx.font = `${10 * r}px sans-serif`; ctx.fillStyle = "#6a737d";
  ctx.fillText(fmt(max), 2 * r, 11 * r);
  // Ranges longer than a day name the date too.
  const stamp = (t) => (t1 - t0 > 86400000 ? new Date(t).toLocaleString() : new Date(t).toLocaleTimeString());
  ctx.fillText(stamp(t0), 2 * r, H - 2 * r);
  const right = stamp(t1);
  ctx.fillText(right, W - ctx.measureText(right).width - 2 * r, H - 2 * r);
  for (const [key, colour] of lines) {
    ctx.lineWidth = 1.5 * r;
    let prev = null;
    for (const p of series) {
      if (p[key] === null || p[key] === undefined) { prev = null; continue; }
      const xa = x(p.t0), xb = x(p.t1), yv = y(p[key]);
      ctx.strokeStyle = colour;
      ctx.setLineDash(p.partial ? [3 * r, 3 * r] : []);
      ctx.globalAlpha = p.partial ? 0.5 : 1;
      ctx.beginPath();
      if (prev && prev.t1 === p.t0) ctx.moveTo(xa, y(prev[key])), ctx.lineTo(xa, yv); else ctx.moveTo(xa, yv);
      ctx.lineTo(xb, yv); ctx.stroke();
      prev = p;
    }
    ctx.setLineDash([]); ctx.globalAlpha = 1;
  }
  if (cursor !== null && cursor >= t0 && cursor <= t1) {
    ctx.strokeStyle = "#1b1f24"; ctx.lineWidth = r; ctx.beginPath(); ctx.moveTo(x(cursor), 0); ctx.lineTo(x(cursor), H - axis); ctx.stroke();
  }
}

// ---- live ----
function buildLive() {
  const box = $("live"); box.innerHTML = "";
  state.live = new Map();
  for (const l of state.links) {
    chartBox(box, "live-" + l.index, l.label);
    state.live.set(l.index, []);
  }
  connectLive();
}
function connectLive() {
  if (state.es) state.es.close();
  state.livePoints = 0; state.liveLost = 0;
  const es = new EventSource("/api/v1/live");
  state.es = es;
  es.addEventListener("points", (e) => {
    const d = JSON.parse(e.data);
    state.liveLost += d.lost;
    for (const p of d.points) {
      const t0 = p.start_utc_ns / 1e6, t1 = t0 + p.width_ns / 1e6, s = p.width_ns / 1e9;
      for (const l of p.links) {
        const arr = state.live.get(l.index);
        if (!arr) continue;
        arr.push({ t0, t1, down: (l.down_bytes * 8) / s, up: (l.up_bytes * 8) / s, partial: !l.valid });
      }
      state.livePoints++;
      state.liveLast = t1;
    }
    $("live-status").textContent = `${state.livePoints} points` + (state.liveLost ? `, ${state.liveLost} lost (slow connection)` : "");
  });
  es.onerror = () => { $("live-status").textContent = "reconnecting…"; };
}
function drawLive() {
  const t1 = state.liveLast || Date.now(), t0 = t1 - LIVE_SPAN_MS;
  for (const [i, arr] of state.live) {
    while (arr.length && arr[0].t1 < t0) arr.shift();
    const c = $("live-" + i);
    if (c) draw(c, arr, t0, t1, null);
  }
  requestAnimationFrame(drawLive);
}

// ---- history ----
function buildHistory() {
  const box = $("history"); box.innerHTML = "";
  for (const l of state.links) {
    const d = chartBox(box, "hist-" + l.index, l.label, true);
    const a = document.createElement("a");
    a.textContent = "CSV"; a.className = "csv"; a.id = "csv-" + l.index; a.setAttribute("download", "");
    d.querySelector(".title").appendChild(a);
    for (const c of d.querySelectorAll("canvas")) {
      const move = (ev) => {
        const rect = c.getBoundingClientRect(), rg = state.range;
        if (!rg) return;
        state.cursor = rg.from + ((ev.clientX - rect.left) / rect.width) * (rg.to - rg.from);
        drawHistory();
      };
      c.addEventListener("pointermove", move);
      c.addEventListener("pointerleave", () => { state.cursor = null; drawHistory(); });
    }
  }
  loadHistory(false);
}
// Steps are multiples of the rollup width (500 ms) giving ≤ ~600 points, taken from a ladder whose
// steps of 10 s and more are multiples of the store's aggregate tiers (10 s, 5 min, 1 h), so long
// ranges are read from those (30 days: 2 h steps, 720 rows of the 1 h tier). The range is aligned
// to the step, so the same range always asks for the same windows.
const STEPS_MS = [500, 1000, 2000, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000,
  7200000, 14400000, 43200000, 86400000];
function pickRange(keep) {
  if (keep && state.range) return state.range;
  const span = Number($("range").value), win = state.windowMs || 500;
  const want = span / 600;
  const step = STEPS_MS.find((s) => s >= want && s % win === 0) ||
    Math.max(win, Math.ceil(want / win) * win);
  // Ends a few seconds back: the newest windows are still on their way to the store (the live
  // graph shows them), and a range must give the same values on every reload. With steps of an
  // hour and more (30 days) that would hide up to a step of recent data: the range then ends
  // with the current step, drawn as partial, the only point that can change on a reload.
  const back = Date.now() - 3000;
  const to = (step >= 3600000 ? Math.ceil(back / step) : Math.floor(back / step)) * step;
  return { from: to - span, to, step };
}
async function loadHistory(keep) {
  const rg = pickRange(keep);
  state.range = rg;
  $("hist-status").textContent = "loading…";
  const t = performance.now();
  try {
    const res = await Promise.all(state.links.map((l) =>
      api(`/api/v1/series?link=${l.index}&from=${rg.from}&to=${rg.to}&step=${rg.step}&partial=true`)));
    state.hist = res;
    for (const s of res) {
      state.windowMs = s.window_ms;
      const a = $("csv-" + s.link);
      if (a) a.href = `/api/v1/series.csv?link=${s.link}&from=${rg.from}&to=${rg.to}&step=${rg.step}&partial=true`;
    }
    state.histLoads = (state.histLoads || 0) + 1;
    state.histJson = JSON.stringify(res);
    $("hist-status").textContent = `${new Date(rg.from).toLocaleString()} – ${new Date(rg.to).toLocaleString()}, step ${rg.step / 1000} s (${Math.round(performance.now() - t)} ms)`;
  } catch (e) {
    $("hist-status").textContent = String(e.message || e);
  }
  drawHistory();
  state.histRenderMs = performance.now() - t; // requests + drawing (the benchmark reads it)
}
function drawHistory() {
  const rg = state.range;
  if (!rg) return;
  for (const s of state.hist) {
    const c = $("hist-" + s.link);
    if (!c) continue;
    // Probe RTT (mean) and passive TCP RTT (mean) of the step; null: no sample, a gap.
    const series = s.points.map((p) => {
      const sec = (p.end_ms - p.start_ms) / 1000;
      return { t0: p.start_ms, t1: p.end_ms, down: (p.down_bytes * 8) / sec, up: (p.up_bytes * 8) / sec,
        rtt: p.rtt_mean_ms, tcp: p.tcp_rtt_mean_ms, partial: !p.complete };
    });
    draw(c, series, rg.from, rg.to, state.cursor);
    const rc = $("hist-" + s.link + "-rtt");
    if (rc) draw(rc, series, rg.from, rg.to, state.cursor, RTT_LINES, ms);
    const val = c.parentElement.querySelector(".val");
    const p = state.cursor === null ? null : series.find((q) => q.t0 <= state.cursor && state.cursor < q.t1);
    const rtt = (label, v) => (v === null || v === undefined ? "" : ` ${label} ${ms(v)}`);
    val.textContent = p ? `${new Date(p.t0).toLocaleString()} ↓ ${bps(p.down)} ↑ ${bps(p.up)}${rtt("RTT", p.rtt)}${rtt("TCP", p.tcp)}${p.partial ? " (partial)" : ""}` : "";
  }
  // First render: every link's row and the history charts drawn with data (the benchmark reads
  // it; ms since navigation start).
  const rows = document.querySelectorAll("#links tbody tr").length;
  if (state.firstRenderMs === undefined && state.hist.length > 0 && rows === state.links.length) {
    state.firstRenderMs = performance.now();
    performance.mark("lp-first-render");
    document.documentElement.dataset.firstRender = String(Math.round(state.firstRenderMs));
  }
}
$("range").addEventListener("change", () => loadHistory(false));
$("refresh").addEventListener("click", () => loadHistory(true));
$("now").addEventListener("click", () => loadHistory(false));
window.addEventListener("resize", drawHistory);

let timer = null;
async function start() {
  try {
    await refreshLinks();
  } catch (e) {
    if (String(e.message) !== "login needed") $("clock").textContent = String(e.message);
    return;
  }
  $("login").hidden = true; $("main").hidden = false;
  $("logout").hidden = false;

  if (!timer) timer = setInterval(() => refreshLinks().catch(() => {}), 1000);
  state.started = true;
}
requestAnimationFrame(drawLive);
start();
