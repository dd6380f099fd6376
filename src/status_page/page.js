"use strict";
// Polls status.json every 2 s and keeps 5 minutes of samples for the chart. Every figure is
// written with textContent (never as HTML), so a query text holding "<" shows as text.
const KEEP_MS = 5 * 60 * 1000, W = 600, H = 160, SVG = "http://www.w3.org/2000/svg";
const samples = [];
const $ = (id) => document.getElementById(id);
const us = (v) => v == null ? "–" : v < 1000 ? v + " µs" : (v / 1000).toFixed(1) + " ms";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function list(id, items) {
  $(id).replaceChildren(...items.map(([text, good]) =>
    el("li", text, good === undefined ? "" : good ? "ok" : "bad")));
}
function rows(id, data) {
  $(id).tBodies[0].replaceChildren(...data.map((cells) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) tr.appendChild(el("td", String(text), cls));
    return tr;
  }));
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
function chart(now) {
  const pts = [];
  for (let i = 0; i < samples.length; i++) {
    const s = samples[i], p = samples[i - 1] || { hits: 0, misses: 0, sum: 0, count: 0 };
    const reads = s.hits - p.hits + s.misses - p.misses, n = s.count - p.count;
    if (reads > 0) pts.push({ t: s.t, ratio: (s.hits - p.hits) / reads, lat: n > 0 ? (s.sum - p.sum) / n : null });
  }
  const x = (t) => (W * (1 - (now - t) / KEEP_MS)).toFixed(1);
  const c = $("chart");
  c.querySelectorAll(".data").forEach((e) => e.remove());
  const maxLat = Math.max(1, ...pts.map((p) => p.lat || 0));
  $("lat-max").textContent = "latency max " + us(Math.round(maxLat));
  const lat = pts.filter((p) => p.lat != null).map((p) => x(p.t) + "," + (H - 4 - (H - 8) * p.lat / maxLat).toFixed(1));
  c.appendChild(svg("polyline", { class: "data lat", points: lat.join(" ") }));
  const ratio = pts.map((p) => x(p.t) + "," + (H - 4 - (H - 8) * p.ratio).toFixed(1));
  c.appendChild(svg("polyline", { class: "data ratio", points: ratio.join(" ") }));
  for (const r of ratio) {
    const [cx, cy] = r.split(",");
    c.appendChild(svg("circle", { class: "data ratio-dot", cx, cy, r: 2.5 }));
  }
}
function render(s) {
  const f = s.figures, h = s.health, d = s.degraded;
  const lat = Object.fromEntries(s.latency.map((l) => [l.family, l]));
  const t = Date.now();
  samples.push({ t, hits: f.hits, misses: f.misses,
    sum: lat.hit.sum_us + lat.miss.sum_us, count: lat.hit.count + lat.miss.count });
  while (samples.length && samples[0].t < t - KEEP_MS) samples.shift();
  $("hit-ratio").textContent = s.hit_ratio;
  $("reads").textContent = f.hits + " hits · " + f.misses + " misses · " + f.fills + " fills · " + f.db_queries + " PostgreSQL queries";
  rows("latency", s.latency.map((v) =>
    [[v.family], [v.count, "n"], [us(v.p50_us), "n"], [us(v.p99_us), "n"]]));
  list("health", [
    ["Valkey: " + (h.valkey_up ? "up" : "down") + (h.valkey_version ? " (" + h.valkey_version + ")" : ""), h.valkey_up],
    ["PostgreSQL pool: " + h.db_pool_size + " open, " + h.db_pool_available + " idle"],
    ["Listener: " + (h.listening ? "listening" : "not listening"), h.listening],
    ["Invalidation lease: " + (h.lease_holder ? "held by this instance" : "held by another instance or none")],
    ["L1 tracking: " + (h.l1_tracking ? "up" : "down")],
  ]);
  list("invalidation", [
    ["Notifications received: " + f.notifications],
    ["Invalidations applied: " + f.invalidations],
    ["Tables pending: " + f.invalidation_pending_tables, f.invalidation_pending_tables === 0],
    ["Failed attempts (retried): " + f.invalidation_failures],
    ["Listener reconnects: " + f.listener_reconnects],
    ["Stale fills rejected: " + f.stale_fill_rejections],
  ]);
  list("verification", [
    ["Mismatches: " + f.verify_mismatches, f.verify_mismatches === 0],
    ["Entries checked: " + f.verify_checks],
    ["Checks skipped: " + f.verify_skipped],
  ]);
  list("degraded", [
    ["All reads bypass the cache: " + (d.all ? "yes" : "no"), !d.all],
    ["Degraded tables: " + (d.tables.length ? d.tables.join(", ") : "none"), d.tables.length === 0],
    ["Unwatched tables: " + (d.unwatched_tables.length ? d.unwatched_tables.join(", ") : "none"), d.unwatched_tables.length === 0],
    ["DDL hook: " + (d.ddl_hook_missing == null ? "in place" : "missing: " + d.ddl_hook_missing), d.ddl_hook_missing == null],
  ]);
  rows("queries", s.queries.map((q) => [[q.query], [q.sql, "sql"], [q.hits, "n"], [q.misses, "n"],
    [q.hit_ratio, "n"], [us(q.hit_p50_us), "n"], [us(q.miss_p99_us), "n"], [q.fills, "n"]]));
  chart(t);
}
async function poll() {
  try {
    const r = await fetch("status.json", { cache: "no-store" });
    const s = await r.json();
    render(s);
    $("updated").textContent = "cachefront " + s.version + " · updated " + new Date(s.now_ms).toLocaleTimeString();
    $("updated").className = "muted";
  } catch (e) {
    $("updated").textContent = "cannot reach cachefront: " + e;
    $("updated").className = "bad";
  }
}
poll();
setInterval(poll, 2000);
