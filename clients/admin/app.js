// The relay admin page: served from the binary (/admin/app.js), no build step, no library.
// Talks only to /admin/api/* with the session cookie; builds every node with textContent, never
// HTML from data.
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLES = 60;
const state = {
  rates: [], // {pub, del} per second, oldest first
  last: null, // previous status totals {published, delivered, at}
  cursor: "", // current channels page
  nextCursor: null,
  pageNo: 1,
  inspect: null, // channel under inspection
  histNext: null,
  presNext: null,
  tail: null, // EventSource
  timers: [],
};

async function api(path, opts = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...opts });
  if (res.status === 401) {
    showLogin();
    throw new Error("logged out");
  }
  const body = res.status === 204 ? {} : await res.json();
  if (!res.ok) throw new Error((body.error && body.error.message) || res.statusText);
  return body;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, rows, render) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    render(tr, r);
    body.appendChild(tr);
  }
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "none", "dim");
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    body.appendChild(tr);
  }
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(u.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${u[i]}`;
}

function duration(s) {
  if (s == null) return "?";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function memoryUsed(st) {
  const m = st.memory || {};
  const used = Object.values(m.bytes || {}).reduce((a, b) => a + b, 0);
  return m.limit ? `${bytes(used)} / ${bytes(m.limit)}` : bytes(used);
}

// ---- login -----------------------------------------------------------------------------------

function showLogin() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  closeTail();
  $("dash").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("who").textContent = "";
  $("password").focus();
}

async function login(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  const res = await fetch("/admin/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ password: $("password").value }),
  });
  if (res.status === 204) {
    $("password").value = "";
    start();
    return;
  }
  const body = await res.json().catch(() => ({}));
  $("login-error").textContent = (body.error && body.error.message) || `login failed (${res.status})`;
}

async function logout() {
  showLogin(); // stops the polling first
  await fetch("/admin/logout", { method: "POST", credentials: "same-origin" });
}

// ---- status, rates, nodes --------------------------------------------------------------------

function card(label, value) {
  const d = document.createElement("div");
  d.className = "card";
  const v = document.createElement("b");
  v.textContent = value;
  const l = document.createElement("span");
  l.textContent = label;
  d.append(v, l);
  return d;
}

async function refreshStatus() {
  const st = await api("/admin/api/status");
  $("who").textContent = `node ${st.node} · v${st.version}`;
  const bp = st.backplane || {};
  $("cards").replaceChildren(
    card("connections", st.connections),
    card("subscriptions", st.subscriptions),
    card("channels", st.channels),
    card("memory", memoryUsed(st)),
    card("backplane", `${bp.kind}${bp.ready ? "" : " (down)"}`),
    card("uptime", duration(st.uptime)),
  );
  fill("shards", st.shards || [], (tr, s) => {
    cell(tr, s.shard);
    cell(tr, s.ws);
    cell(tr, s.sse);
    cell(tr, s.subscriptions);
  });
  const now = performance.now();
  if (state.last) {
    const dt = Math.max(0.001, (now - state.last.at) / 1000);
    const pub = Math.max(0, (st.published - state.last.published) / dt);
    const del = Math.max(0, (st.delivered - state.last.delivered) / dt);
    state.rates.push({ pub, del });
    if (state.rates.length > SAMPLES) state.rates.shift();
    $("rate-pub").textContent = pub.toFixed(1);
    $("rate-del").textContent = del.toFixed(1);
    draw();
  }
  state.last = { published: st.published, delivered: st.delivered, at: now };
}

function draw() {
  const c = $("chart");
  const g = c.getContext("2d");
  const w = c.width;
  const h = c.height;
  const pad = 4;
  g.clearRect(0, 0, w, h);
  c.dataset.samples = String(state.rates.length);
  const max = Math.max(1, ...state.rates.map((r) => Math.max(r.pub, r.del)));
  g.strokeStyle = "#e3e7ef";
  g.lineWidth = 1;
  for (let i = 1; i < 4; i++) {
    const y = Math.round((h * i) / 4) + 0.5;
    g.beginPath();
    g.moveTo(0, y);
    g.lineTo(w, y);
    g.stroke();
  }
  g.fillStyle = "#6b7385";
  g.font = "11px system-ui, sans-serif";
  g.fillText(`${max.toFixed(max < 10 ? 1 : 0)}/s`, pad, 12);
  const line = (key, color) => {
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    state.rates.forEach((r, i) => {
      const x = w - (state.rates.length - 1 - i) * (w / (SAMPLES - 1));
      const y = h - pad - (r[key] / max) * (h - 2 * pad - 12);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  line("del", "#2f9e6b");
  line("pub", "#3466d6");
}

async function refreshNodes() {
  const { nodes } = await api("/admin/api/nodes");
  fill("nodes", nodes, (tr, n) => {
    cell(tr, n.self ? `${n.node} (this node)` : n.node);
    cell(tr, n.version || "?");
    cell(tr, duration(n.uptime));
    cell(tr, n.connections ?? "?");
    cell(tr, n.channels ?? "?");
    cell(tr, memoryUsed(n));
    const bp = n.backplane || {};
    cell(tr, `${bp.kind || "?"}${bp.ready === false ? " (down)" : ""}`);
  });
}

// ---- channels --------------------------------------------------------------------------------

async function refreshChannels() {
  const q = new URLSearchParams({ limit: "20" });
  if (state.cursor) q.set("cursor", state.cursor);
  const page = await api(`/admin/api/channels?${q}`);
  fill("channels", page.channels, (tr, c) => {
    const td = cell(tr, "");
    const a = document.createElement("a");
    a.href = "#inspector";
    a.textContent = c.channel;
    a.addEventListener("click", (ev) => {
      ev.preventDefault();
      $("inspect-channel").value = c.channel;
      inspect(c.channel);
    });
    td.appendChild(a);
    cell(tr, c.subscribers);
    cell(tr, c.presence ? `${c.presence.clients} clients, ${c.presence.users} users` : "–");
    cell(tr, c.seq);
  });
  state.nextCursor = page.next || null;
  $("ch-next").disabled = !state.nextCursor;
  $("ch-first").disabled = !state.cursor;
  $("ch-page").textContent = `page ${state.pageNo}`;
}

// ---- publish ---------------------------------------------------------------------------------

async function publish(ev) {
  ev.preventDefault();
  const channel = $("pub-channel").value.trim();
  const raw = $("pub-data").value;
  let data;
  try {
    data = JSON.parse(raw);
  } catch {
    data = raw; // plain text goes as a JSON string
  }
  try {
    const r = await api("/admin/api/publish", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ channel, data }),
    });
    $("pub-result").textContent = `published to ${r.channel}: seq ${r.seq} (epoch ${r.epoch})`;
  } catch (e) {
    $("pub-result").textContent = `not published: ${e.message}`;
  }
}

// ---- inspector -------------------------------------------------------------------------------

async function loadHistory(more) {
  const q = new URLSearchParams({ limit: "50" });
  if (more && state.histNext != null) q.set("since", String(state.histNext));
  const h = await api(`/admin/api/history/${encodeURIComponent(state.inspect)}?${q}`);
  const rows = h.messages.map((m) => ({ seq: m.seq, data: JSON.stringify(m.data) }));
  if (more) {
    const body = $("history").tBodies[0];
    for (const r of rows) {
      const tr = document.createElement("tr");
      cell(tr, r.seq);
      cell(tr, r.data, "mono");
      body.appendChild(tr);
    }
  } else {
    fill("history", rows, (tr, r) => {
      cell(tr, r.seq);
      cell(tr, r.data, "mono");
    });
  }
  state.histNext = h.next ?? null;
  $("hist-next").hidden = state.histNext == null;
  $("hist-info").textContent = `top seq ${h.seq}${h.epoch ? `, epoch ${h.epoch}` : ""}${h.complete ? "" : " (older messages expired)"}`;
}

async function loadPresence(more) {
  const q = new URLSearchParams({ limit: "50" });
  if (more && state.presNext) q.set("cursor", state.presNext);
  let p;
  try {
    p = await api(`/admin/api/presence/${encodeURIComponent(state.inspect)}?${q}`);
  } catch (e) {
    fill("presence", [], () => {});
    $("pres-info").textContent = e.message;
    $("pres-next").hidden = true;
    return;
  }
  const render = (tr, m) => {
    cell(tr, m.client, "mono");
    cell(tr, m.user);
    cell(tr, m.info === undefined ? "" : JSON.stringify(m.info), "mono");
  };
  if (more) {
    const body = $("presence").tBodies[0];
    for (const m of p.members) {
      const tr = document.createElement("tr");
      render(tr, m);
      body.appendChild(tr);
    }
  } else {
    fill("presence", p.members, render);
  }
  state.presNext = p.next || null;
  $("pres-next").hidden = !state.presNext;
  $("pres-info").textContent = p.presence === false ? "(not a presence channel: see --presence-channels)" : "";
}

function closeTail() {
  if (state.tail) state.tail.close();
  state.tail = null;
}

function tailLine(text) {
  const li = document.createElement("li");
  li.textContent = text;
  const ol = $("tail");
  ol.prepend(li);
  while (ol.children.length > 200) ol.lastChild.remove();
}

function openTail(channel) {
  closeTail();
  $("tail").replaceChildren();
  const es = new EventSource(`/admin/api/tail?channel=${encodeURIComponent(channel)}`);
  state.tail = es;
  es.addEventListener("open", () => ($("tail-state").textContent = "(live)"));
  es.addEventListener("error", () => ($("tail-state").textContent = "(reconnecting…)"));
  es.addEventListener("message", (ev) => {
    const m = JSON.parse(ev.data);
    tailLine(`#${m.seq} ${JSON.stringify(m.data)}`);
  });
  es.addEventListener("presence", (ev) => {
    const p = JSON.parse(ev.data);
    tailLine(`${p.event}: ${p.user} (${p.client})`);
  });
  es.addEventListener("gap", (ev) => tailLine(`gap: ${ev.data}`));
}

async function inspect(channel) {
  state.inspect = channel;
  state.histNext = null;
  state.presNext = null;
  $("inspector").hidden = false;
  openTail(channel);
  await Promise.all([loadHistory(false), loadPresence(false)]);
}

// ---- start -----------------------------------------------------------------------------------

function every(ms, f) {
  const run = () => f().catch((e) => e.message !== "logged out" && console.warn(e));
  run();
  state.timers.push(setInterval(run, ms));
}

function start() {
  $("login").hidden = true;
  $("dash").hidden = false;
  $("logout").hidden = false;
  state.last = null;
  every(1000, refreshStatus);
  every(2000, refreshNodes);
  every(5000, refreshChannels);
}

async function boot() {
  $("login-form").addEventListener("submit", (ev) => login(ev).catch((e) => ($("login-error").textContent = e.message)));
  $("logout").addEventListener("click", () => logout());
  $("publish-form").addEventListener("submit", publish);
  $("inspect-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    inspect($("inspect-channel").value.trim()).catch((e) => ($("hist-info").textContent = e.message));
  });
  $("ch-next").addEventListener("click", () => {
    if (!state.nextCursor) return;
    state.cursor = state.nextCursor;
    state.pageNo += 1;
    refreshChannels();
  });
  $("ch-first").addEventListener("click", () => {
    state.cursor = "";
    state.pageNo = 1;
    refreshChannels();
  });
  $("hist-next").addEventListener("click", () => loadHistory(true));
  $("pres-next").addEventListener("click", () => loadPresence(true));
  // The session cookie is HttpOnly: ask the server whether it is still good.
  const s = await fetch("/admin/session", { credentials: "same-origin" }).then((r) => r.json());
  if (s.session) start();
  else showLogin();
}

boot();
