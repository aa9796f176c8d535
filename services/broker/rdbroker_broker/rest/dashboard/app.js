// The rdbroker dashboard: the farm at a glance (tiles, logons per minute from GET /v1/history), each
// pool's servers with their sessions by state as stacked bars, drain and power progress, a server's
// sessions on a click of its row, a user search, log off/disconnect/message buttons per session (through
// the server's agent, each after a confirmation), drain/maintenance/enable buttons, a route explain
// for a user (when the broker has GET /v1/route/explain), and operators' recent changes (the audit
// trail, admin token only).
// Plain DOM and hand-written SVG, no build step, no inline style (the CSP): sizes are SVG attributes
// and colours CSS classes. Every value from the API goes in through textContent, never as HTML.
"use strict";

const TOKEN_KEY = "rdbroker-token";
const ACTIONS = [
  ["drain", "Drain", "draining"],
  ["maintenance", "Maintenance", "maintenance"],
  ["enable", "Enable", "enabled"],
];

// [action, button label, confirmation question]; {user} and {server} are filled in.
const SESSION_ACTIONS = [
  ["logoff", "Log off", "Log {user} off {server}? Their programs end; unsaved work is lost."],
  ["disconnect", "Disconnect", "Disconnect {user} from {server}? The session stays there for them to come back to."],
  ["message", "Message…", "Show {user} a message in their session on {server}:"],
];

const $ = (selector) => document.querySelector(selector);
let askedForReadToken = false;
let refreshTimer = null;
// Servers whose session list is open, and the lists as last read (shown at once when the table is
// drawn again, then read anew).
const expanded = new Set();
const serverSessions = new Map();

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

async function api(method, path, payload) {
  const headers = { Accept: "application/json" };
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const options = { method, headers, cache: "no-store" };
  if (payload !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(payload);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, `cannot reach the broker (${err.message})`);
  }
  if (response.status === 204) return null;
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const title = (body && body.title) || response.statusText || "error";
    const detail = body && typeof body.detail === "string" && body.detail !== title ? `: ${body.detail}` : "";
    throw new ApiError(response.status, `${response.status} ${title}${detail}`);
  }
  return body;
}

// --- token dialog ---------------------------------------------------------------------------------

function askToken(title, reason) {
  const dialog = $("#token-dialog");
  $("#token-title").textContent = title;
  $("#token-reason").textContent = reason;
  $("#token-input").value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", onClose);
      $("#token-cancel").removeEventListener("click", onCancel);
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === "ok" ? $("#token-input").value.trim() : null);
    const onCancel = () => {
      dialog.close("cancel");
    };
    dialog.addEventListener("close", onClose);
    $("#token-cancel").addEventListener("click", onCancel);
    dialog.returnValue = "";
    dialog.showModal();
    $("#token-input").focus();
  });
}

// --- servers ---------------------------------------------------------------------------------------

function text(tag, value, className) {
  const node = document.createElement(tag);
  node.textContent = value;
  if (className) node.className = className;
  return node;
}

function formatDuration(seconds) {
  if (typeof seconds !== "number" || seconds < 0) return "";
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  return h ? `${h}h${m ? ` ${m}m` : ""}` : `${m}m`;
}

// Milliseconds as the farm file writes them: 500ms, 30s, 2m, 1h30m.
function formatMs(ms) {
  if (typeof ms !== "number" || ms < 0) return "–";
  if (ms % 1000) return `${ms}ms`;
  let rest = Math.round(ms / 1000);
  let out = "";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count) out += `${count}${unit}`;
  }
  return out || "0s";
}

function formatBytes(size) {
  if (typeof size !== "number" || size < 0) return "–";
  if (size >= 1048576 && size % 1048576 === 0) return `${size / 1048576} MiB`;
  if (size >= 1024 && size % 1024 === 0) return `${size / 1024} KiB`;
  return `${size} bytes`;
}

const pad = (n) => String(n).padStart(2, "0");

function clockTime(value) {
  const moment = new Date(value);
  if (Number.isNaN(moment.getTime())) return String(value);
  return `${pad(moment.getHours())}:${pad(moment.getMinutes())}:${pad(moment.getSeconds())}`;
}

// [setting, label, how to show it]; 0 means the broker's default where the setting allows it.
const POOL_SETTINGS = [
  ["placement", "Placement", (p) => p.placement || "breadth"],
  ["domain", "Domain", (p) => p.domain || "none"],
  ["upn_suffixes", "UPN suffixes", (p) => (p.upn_suffixes && p.upn_suffixes.length ? p.upn_suffixes.join(", ") : "none")],
  ["junk_bytes", "Junk under", (p) => formatBytes(p.junk_bytes)],
  ["confirm_timeout_s", "Confirm within", (p) => formatMs(Math.round(p.confirm_timeout_s * 1000))],
  ["stale_after_ms", "Results stale after", (p) => (p.stale_after_ms ? formatMs(p.stale_after_ms) : "default")],
  ["logon_lag_s", "Logon lag", (p) => formatMs(Math.round(p.logon_lag_s * 1000))],
  ["honor_routing_tokens", "Routing tokens", (p) => (p.honor_routing_tokens === false ? "ignored" : "honoured")],
  ["probe_interval_ms", "Probe every", (p) => (p.probe_interval_ms ? formatMs(p.probe_interval_ms) : "default")],
  ["sessions_interval_ms", "Session lists every", (p) => (p.sessions_interval_ms ? formatMs(p.sessions_interval_ms) : "default")],
];

function poolSettings(pool) {
  if (pool.junk_bytes === undefined) return [];
  return POOL_SETTINGS.map(([setting, label, show]) => {
    const item = document.createElement("li");
    item.dataset.setting = setting;
    item.append(text("span", `${label} `, "label"), text("span", show(pool), "value"));
    return item;
  });
}

function formatTime(value) {
  if (!value) return "–";
  const moment = new Date(value);
  return Number.isNaN(moment.getTime()) ? String(value) : moment.toLocaleString();
}

// A drain until empty (`rdbroker servers drain ... --notify ...`): its step and counts while it runs;
// how it ended while the server is still out of rotation.
// The most sessions each running drain has been seen to have left (by server and start): its bar's
// full length, so the bar shows how far the server has emptied since this page first saw the drain.
const drainPeaks = new Map();

function drainProgress(server, drain) {
  const key = `${server.address} ${drain.started_at}`;
  const peak = Math.max(drainPeaks.get(key) || 0, drain.sessions_left + drain.logged_off, 1);
  drainPeaks.set(key, peak);
  const bar = document.createElement("progress");
  bar.max = peak;
  bar.value = peak - drain.sessions_left;
  bar.className = "drain-progress";
  return bar;
}

function drainCell(server) {
  const drain = server.drain;
  const cell = text("td", "–", "drain");
  if (!drain || (!drain.running && server.admin_state === "enabled")) return cell;
  const counts = [`${drain.messaged} messaged`, `${drain.logged_off} logged off`];
  if (drain.errors) counts.push(`${drain.errors} error${drain.errors === 1 ? "" : "s"}`);
  const title = [drain.detail, `started ${formatTime(drain.started_at)} by ${drain.started_by}`];
  if (drain.running) {
    cell.replaceChildren(
      drainProgress(server, drain),
      text("span", `${drain.step} · ${drain.sessions_left} left · ${counts.join(" · ")}`, "drain-text"),
    );
    if (drain.next_logoff_at) title.push(`next logoff ${formatTime(drain.next_logoff_at)}`);
    cell.classList.add(drain.errors ? "drain-errors" : "drain-running");
  } else {
    cell.textContent = drain.step === "done" ? `drained → ${drain.then}` : "cancelled";
    title.push(`ended ${formatTime(drain.finished_at)}`, counts.join(", "));
  }
  if (drain.last_error) title.push(`last error: ${drain.last_error}`);
  cell.title = title.join("\n");
  return cell;
}

// A server's live sessions by state; a broker without `session_states` counts them all as active.
function statesOf(server) {
  const states = server.session_states;
  if (!states) return { active: server.live_sessions, disconnected: 0, pending: 0 };
  return { active: states.active, disconnected: states.disconnected, pending: states.pending };
}

const STATE_ORDER = ["active", "disconnected", "pending"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attributes) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  return node;
}

function svgText(value, attributes) {
  const node = svg("text", attributes);
  node.textContent = value;
  return node;
}

// Stacked segments left to right (or bottom to top), `length` for `scale` sessions.
function stackedSegments(states, scale, length, horizontal, offset, thickness, base) {
  const parts = [];
  let at = 0;
  for (const state of STATE_ORDER) {
    const count = states[state];
    if (!count) continue;
    const size = (count / scale) * length;
    const rect = horizontal
      ? svg("rect", { x: at, y: offset, width: size, height: thickness })
      : svg("rect", { x: offset, y: base - at - size, width: thickness, height: size });
    rect.setAttribute("class", `seg seg-${state}`);
    rect.dataset.state = state;
    rect.dataset.count = `${count}`;
    parts.push(rect);
    at += size;
  }
  return parts;
}

function describeStates(states) {
  return STATE_ORDER.map((state) => `${states[state]} ${state}`).join(", ");
}

// The number, then a bar against the server's max_sessions (its free room shown as track), or against
// the pool's busiest server when it has no limit.
function sessionsCell(server, scale) {
  const cell = document.createElement("td");
  cell.className = "sessions";
  const states = statesOf(server);
  const total = states.active + states.disconnected + states.pending;
  const full = server.max_sessions ? Math.max(server.max_sessions, total) : scale;
  cell.append(text("span", `${server.live_sessions}`, "count"));
  const bar = svg("svg", { class: "session-bar", viewBox: "0 0 100 8", preserveAspectRatio: "none" });
  bar.append(svg("rect", { class: "track", x: 0, y: 0, width: 100, height: 8 }));
  bar.append(...stackedSegments(states, Math.max(full, 1), 100, true, 0, 8));
  cell.append(bar);
  cell.title = `${describeStates(states)}${server.max_sessions ? ` of at most ${server.max_sessions}` : ""}`;
  return cell;
}

// Power: a badge; a start or stop under way moves (an indeterminate bar) until the server answers.
function powerCell(server) {
  const power = server.power || "on";
  const cell = document.createElement("td");
  cell.className = `power power-${power}`;
  cell.append(text("span", power, "badge"));
  if (power === "starting" || power === "stopping") {
    const bar = document.createElement("progress");
    bar.className = "power-progress";
    bar.title = power === "starting" ? "the pool's start hook was called; waiting for the server to answer" : "drained; the stop hook was called";
    cell.append(bar);
  }
  return cell;
}

function serverRow(server, scale) {
  const row = document.createElement("tr");
  row.dataset.address = server.address;
  row.tabIndex = 0;
  row.setAttribute("aria-expanded", expanded.has(server.address) ? "true" : "false");
  row.className = `server health-${server.health} state-${server.effective_admin_state || server.admin_state}`;
  if (server.stale) row.classList.add("stale");
  row.append(text("td", server.address, "address"));
  const effective = server.effective_admin_state || server.admin_state;
  const stateText = effective === server.admin_state ? server.admin_state : `${server.admin_state} (${effective} by agent)`;
  row.append(text("td", stateText, "state"));
  row.append(drainCell(server));
  // A stale result counts for nothing: health reads unknown; say when the last result was.
  const healthText = server.stale && server.probed_at ? `${server.health} (last result ${clockTime(server.probed_at)})` : server.health;
  const health = text("td", healthText, "health");
  if (server.stale && server.probed_at) health.title = `no health result since ${formatTime(server.probed_at)}`;
  else if (server.health_detail) health.title = server.health_detail;
  row.append(health);
  row.append(powerCell(server));
  row.append(text("td", server.load >= 0 ? `${server.load}` : "–", "load"));
  row.append(sessionsCell(server, scale));
  row.append(text("td", `${server.held_sessions ?? "–"}`, "held"));
  row.append(text("td", `${server.weight}`, "weight"));
  row.append(text("td", server.max_sessions ? `${server.max_sessions}` : "∞", "max"));
  const cell = document.createElement("td");
  cell.className = "actions";
  for (const [action, label, state] of ACTIONS) {
    const button = text("button", label);
    button.type = "button";
    button.dataset.action = action;
    button.disabled = server.admin_state === state;
    button.addEventListener("click", () => changeState(server.address, action, label));
    cell.append(button);
  }
  row.append(cell);
  row.addEventListener("click", (event) => {
    if (event.target.closest("button")) return;
    toggleServer(server.address);
  });
  row.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && event.target === row) {
      event.preventDefault();
      toggleServer(server.address);
    }
  });
  return row;
}

// --- the pool's chart: a stacked bar per server -----------------------------------------------------

const CHART_W = 720;
const CHART_H = 90;

// Stretched to the figure's width (preserveAspectRatio none), so no text inside: the scale is the
// caption's.
function poolChart(article, members, scale) {
  const chart = article.querySelector("svg.pool-bars");
  const count = Math.max(members.length, 1);
  const slot = CHART_W / count;
  const width = Math.min(slot * 0.8, 24);
  chart.setAttribute("viewBox", `0 0 ${CHART_W} ${CHART_H}`);
  chart.setAttribute("preserveAspectRatio", "none");
  chart.setAttribute("aria-label", `live sessions per server, at most ${scale}`);
  const parts = [];
  members.forEach((server, index) => {
    const states = statesOf(server);
    const group = svg("g", { class: "bar" });
    group.dataset.address = server.address;
    const x = index * slot + (slot - width) / 2;
    // The whole slot takes the click and the tooltip, however short its bar.
    group.append(svg("rect", { class: "hit", x: index * slot, y: 0, width: slot, height: CHART_H }));
    group.append(...stackedSegments(states, scale, CHART_H - 4, false, x, width, CHART_H));
    const title = svg("title");
    title.textContent = `${server.address}: ${describeStates(states)}`;
    group.append(title);
    group.addEventListener("click", () => {
      if (!expanded.has(server.address)) toggleServer(server.address);
      const row = article.querySelector(`tr.server[data-address="${CSS.escape(server.address)}"]`);
      if (row) row.scrollIntoView({ block: "center" });
    });
    parts.push(group);
  });
  parts.push(svg("line", { class: "axis", x1: 0, y1: CHART_H, x2: CHART_W, y2: CHART_H, "vector-effect": "non-scaling-stroke" }));
  chart.replaceChildren(...parts);
  const busiest = Math.max(0, ...members.map((s) => { const t = statesOf(s); return t.active + t.disconnected + t.pending; }));
  article.querySelector("figure.pool-chart").classList.toggle("idle", busiest === 0);
  article.querySelector(".pool-scale").textContent = busiest ? `tallest: ${scale} session${scale === 1 ? "" : "s"}` : "no live sessions";
}

function render(servers, pools) {
  const byPool = new Map(pools.map((pool) => [pool.name, { pool, servers: [] }]));
  for (const server of servers) {
    if (!byPool.has(server.pool)) byPool.set(server.pool, { pool: { name: server.pool }, servers: [] });
    byPool.get(server.pool).servers.push(server);
  }
  const section = $("#pools");
  const articles = [];
  for (const { pool, servers: members } of byPool.values()) {
    const article = $("#pool-template").content.firstElementChild.cloneNode(true);
    article.dataset.pool = pool.name;
    article.querySelector(".pool-name").textContent = pool.name;
    const info = [];
    if (pool.default) info.push("default");
    if (pool.disconnect_timeout_s !== undefined) info.push(`disconnected sessions kept ${formatDuration(pool.disconnect_timeout_s)}`);
    info.push(`${members.length} server${members.length === 1 ? "" : "s"}`);
    article.querySelector(".pool-info").textContent = info.join(" · ");
    article.querySelector(".pool-settings").replaceChildren(...poolSettings(pool));
    const scale = Math.max(1, ...members.map((s) => { const t = statesOf(s); return t.active + t.disconnected + t.pending; }));
    poolChart(article, members, scale);
    const rows = [];
    for (const server of members) {
      rows.push(serverRow(server, scale));
      if (expanded.has(server.address)) rows.push(sessionsRow(server.address));
    }
    article.querySelector("tbody").append(...rows);
    articles.push(article);
  }
  if (articles.length) section.replaceChildren(...articles);
  else section.replaceChildren(text("p", "No pools or servers yet.", "empty"));
  renderTiles(servers);
}

// --- the farm at a glance -------------------------------------------------------------------------------

function setTile(name, value, title) {
  const tile = document.querySelector(`#tiles li[data-tile="${name}"]`);
  tile.querySelector(".tile-value").textContent = `${value}`;
  if (title !== undefined) tile.title = title;
}

function renderTiles(servers) {
  const totals = { active: 0, disconnected: 0, pending: 0 };
  for (const server of servers) {
    const states = statesOf(server);
    for (const state of STATE_ORDER) totals[state] += states[state];
  }
  const taking = servers.filter((s) => s.routable).length;
  setTile("servers", `${taking} / ${servers.length}`, "servers that would take a new session now, of all");
  for (const state of STATE_ORDER) setTile(state, totals[state]);
}

function setStatus(message, isError) {
  const status = $("#status");
  status.textContent = message;
  status.classList.toggle("error", Boolean(isError));
}

async function refresh() {
  try {
    const [serverList, poolList] = await Promise.all([api("GET", "/v1/servers"), api("GET", "/v1/pools")]);
    render(serverList.servers, poolList.pools);
    setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
    await Promise.all([refreshHistory(false), probeExplain(), ...[...expanded].map((a) => loadServerSessions(a, serverSessions.get(a)?.outcome))]);
  } catch (err) {
    if (err.status === 401) {
      setStatus("The API needs a token: use “Token…”.", true);
      if (!askedForReadToken) {
        askedForReadToken = true;
        const value = await askToken("API token", "This broker needs a read or admin token to show its servers.");
        if (value) {
          setToken(value);
          return refresh();
        }
      }
    } else {
      setStatus(err.message, true);
    }
  }
  return undefined;
}

async function changeState(address, action, label) {
  // Try first: an open API (no tokens, e.g. `rdbroker demo`) needs none; ask only when refused.
  let asked = false;
  for (;;) {
    try {
      await api("POST", `/v1/servers/${encodeURIComponent(address)}/${action}`);
      break;
    } catch (err) {
      if ((err.status === 401 || err.status === 403) && !asked) {
        asked = true;
        const value = await askToken("Admin token", `${label} ${address} needs the admin token (${err.message}).`);
        if (!value) return;
        setToken(value);
        continue;
      }
      setStatus(`${label} ${address}: ${err.message}`, true);
      return;
    }
  }
  await Promise.all([refresh(), refreshAudit()]);
}

// --- user search -----------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  await lookUp();
}

async function lookUp() {
  const user = $("#search-user").value.trim();
  if (!user) return;
  const query = $("#search-ended").checked ? "?include_ended=true" : "";
  const table = $("#search-results");
  const message = $("#search-message");
  try {
    const answer = await api("GET", `/v1/users/${encodeURIComponent(user)}/sessions${query}`);
    const rows = answer.sessions.map((session) => {
      const row = document.createElement("tr");
      row.dataset.session = session.id;
      row.append(
        text("td", session.user || "–"),
        text("td", session.pool),
        text("td", session.server_address, "server"),
        text("td", session.state, "state"),
        text("td", session.confirmed ? "yes" : session.state === "ended" ? "no" : "claim", "confirmed"),
        text("td", formatTime(session.created_at)),
        text("td", formatTime(session.expires_at)),
        text("td", session.id, "id"),
        sessionButtons(session, afterSearchAction),
      );
      return row;
    });
    table.querySelector("tbody").replaceChildren(...rows);
    table.hidden = rows.length === 0;
    message.textContent = rows.length ? "" : `No sessions for ${user}.`;
  } catch (err) {
    table.hidden = true;
    message.textContent = err.message;
  }
}

// --- session actions (through the session's server's agent) ---------------------------------------

// `after(outcome)`: where the action was started from shows its outcome and reads its list again.
function sessionButtons(session, after) {
  const cell = document.createElement("td");
  cell.className = "actions";
  if (session.state === "ended") return cell;
  for (const [action, label, question] of SESSION_ACTIONS) {
    const button = text("button", label);
    button.type = "button";
    button.dataset.action = action;
    const asked = question.replace("{user}", session.user || "this user").replace("{server}", session.server_address);
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      sessionAction(session, action, label, asked, after);
    });
    cell.append(button);
  }
  return cell;
}

// Resolves to null (cancelled), or to the message's text ("" for the other actions).
function confirmAction(title, question, wantsText) {
  const dialog = $("#action-dialog");
  $("#action-title").textContent = title;
  $("#action-question").textContent = question;
  $("#action-text-field").hidden = !wantsText;
  $("#action-text").required = wantsText;
  $("#action-text").value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", onClose);
      $("#action-cancel").removeEventListener("click", onCancel);
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === "ok" ? $("#action-text").value.trim() : null);
    const onCancel = () => {
      dialog.close("cancel");
    };
    dialog.addEventListener("close", onClose);
    $("#action-cancel").addEventListener("click", onCancel);
    dialog.returnValue = "";
    dialog.showModal();
    (wantsText ? $("#action-text") : $("#action-ok")).focus();
  });
}

async function sessionAction(session, action, label, question, after) {
  const name = label.replace("…", "");
  const text = await confirmAction(`${name} ${session.user || session.id}`, question, action === "message");
  if (text === null) return;
  const body = action === "message" ? { text } : undefined;
  const path = `/v1/sessions/${encodeURIComponent(session.id)}/${action}`;
  let asked = false;
  let outcome;
  for (;;) {
    try {
      const answer = await api("POST", path, body);
      outcome = `${name} ${session.user}: ${answer.detail} on ${answer.server_address}.`;
      break;
    } catch (err) {
      if ((err.status === 401 || err.status === 403) && !asked) {
        asked = true;
        const value = await askToken("Admin token", `${name} ${session.user} needs the admin token (${err.message}).`);
        if (!value) return;
        setToken(value);
        continue;
      }
      outcome = `${name} ${session.user}: ${err.message}`;
      break;
    }
  }
  await after(outcome);
  await Promise.all([refresh(), refreshAudit()]);
}

async function afterSearchAction(outcome) {
  await lookUp();
  $("#search-message").textContent = outcome;
}

// --- a server's sessions (click its row) -------------------------------------------------------------

const SERVER_SESSIONS_LIMIT = 500; // the API's page; a server with more says so

function toggleServer(address) {
  if (expanded.has(address)) expanded.delete(address);
  else expanded.add(address);
  const row = document.querySelector(`tr.server[data-address="${CSS.escape(address)}"]`);
  if (!row) return;
  row.setAttribute("aria-expanded", expanded.has(address) ? "true" : "false");
  const next = row.nextElementSibling;
  if (next && next.classList.contains("server-sessions")) next.remove();
  if (expanded.has(address)) {
    row.after(sessionsRow(address));
    loadServerSessions(address);
  }
}

function sessionsRow(address) {
  const row = $("#server-sessions-template").content.firstElementChild.cloneNode(true);
  row.dataset.address = address;
  const known = serverSessions.get(address);
  if (known) fillSessions(row, known.answer, known.outcome);
  else row.querySelector(".server-sessions-message").textContent = "loading…";
  return row;
}

function fillSessions(row, answer, outcome) {
  const address = row.dataset.address;
  const table = row.querySelector(".server-sessions-list");
  const message = row.querySelector(".server-sessions-message");
  const after = async (said) => {
    serverSessions.set(address, { answer, outcome: said });
    await loadServerSessions(address, said);
  };
  const rows = answer.items.map((session) => {
    const line = document.createElement("tr");
    line.dataset.session = session.id;
    const since = session.state === "disconnected" && session.disconnected_at ? session.disconnected_at : session.created_at;
    line.append(
      text("td", session.user || "–", "user"),
      text("td", session.state, `state session-${session.state}`),
      text("td", formatTime(since), "since"),
      text("td", session.confirmed ? "yes" : "claim", "confirmed"),
      text("td", session.id, "id"),
      sessionButtons(session, after),
    );
    return line;
  });
  row.querySelector("tbody").replaceChildren(...rows);
  table.hidden = rows.length === 0;
  const said = [];
  if (outcome) said.push(outcome);
  if (!rows.length) said.push("No live sessions.");
  else if (answer.total > rows.length) said.push(`The first ${rows.length} of ${answer.total} live sessions.`);
  message.textContent = said.join(" ");
}

async function loadServerSessions(address, outcome) {
  const query = `?server=${encodeURIComponent(address)}&limit=${SERVER_SESSIONS_LIMIT}`;
  let answer;
  try {
    answer = await api("GET", `/v1/sessions${query}`);
  } catch (err) {
    const row = document.querySelector(`tr.server-sessions[data-address="${CSS.escape(address)}"]`);
    if (row) row.querySelector(".server-sessions-message").textContent = err.message;
    return;
  }
  serverSessions.set(address, { answer, outcome });
  const row = document.querySelector(`tr.server-sessions[data-address="${CSS.escape(address)}"]`);
  if (row) fillSessions(row, answer, outcome);
}

// --- logons per minute (GET /v1/history) ------------------------------------------------------------------

const HISTORY_EVERY_MS = 30000; // the chart moves a minute at a time
const HIST_W = 720;
const HIST_H = 150;
const HIST_TOP = 14;
const HIST_BOTTOM = 106; // logons stand on this line; refusals hang below it, down to REFUSED_BOTTOM
const REFUSED_BOTTOM = 132;
let historyReadAt = 0;

async function refreshHistory(force) {
  if (!force && Date.now() - historyReadAt < HISTORY_EVERY_MS) return;
  historyReadAt = Date.now();
  const hours = Number($("#history-hours").value) || 3;
  try {
    const answer = await api("GET", `/v1/history?hours=${hours}`);
    $("#history-message").textContent = "";
    renderHistory(answer);
  } catch (err) {
    historyReadAt = 0;
    if (err.status !== 401) $("#history-message").textContent = `History: ${err.message}`;
  }
}

function renderHistory(answer) {
  const chart = $("#history-chart");
  const since = new Date(answer.since).getTime();
  const until = new Date(answer.until).getTime();
  const slots = Math.max(1, Math.round((until - since) / 60000));
  const slot = HIST_W / slots;
  const peak = Math.max(1, ...answer.minutes.map((m) => m.logons));
  const refusedPeak = Math.max(1, ...answer.minutes.map((m) => m.refused || 0));
  const height = HIST_BOTTOM - HIST_TOP;
  const parts = [svg("line", { class: "axis", x1: 0, y1: HIST_BOTTOM, x2: HIST_W, y2: HIST_BOTTOM })];
  parts.push(svg("line", { class: "grid", x1: 0, y1: HIST_TOP, x2: HIST_W, y2: HIST_TOP }));
  parts.push(svg("line", { class: "grid", x1: 0, y1: REFUSED_BOTTOM, x2: HIST_W, y2: REFUSED_BOTTOM }));
  parts.push(svgText(`${peak} a minute`, { x: 2, y: HIST_TOP - 3, class: "scale" }));
  if (answer.minutes.some((m) => m.refused)) {
    parts.push(svgText(`${refusedPeak} refused`, { x: 2, y: REFUSED_BOTTOM - 2, class: "scale refused-scale" }));
  }
  // An hour mark (or every 10 minutes on the one-hour view), in the page's time zone.
  const step = slots <= 60 ? 10 : slots <= 360 ? 60 : 180;
  for (let minute = Math.ceil(since / 60000 / step) * step; minute * 60000 < until; minute += step) {
    const x = ((minute * 60000 - since) / 60000) * slot;
    parts.push(svg("line", { class: "tick", x1: x, y1: REFUSED_BOTTOM, x2: x, y2: REFUSED_BOTTOM + 4 }));
    const moment = new Date(minute * 60000);
    parts.push(svgText(`${pad(moment.getHours())}:${pad(moment.getMinutes())}`, { x, y: HIST_H - 2, class: "tick-label" }));
  }
  let total = 0;
  let refusedTotal = 0;
  for (const minute of answer.minutes) {
    const at = new Date(minute.at).getTime();
    const x = ((at - since) / 60000) * slot;
    const group = svg("g", { class: "minute" });
    group.dataset.at = minute.at;
    group.dataset.logons = `${minute.logons}`;
    group.dataset.refused = `${minute.refused || 0}`;
    let y = HIST_BOTTOM;
    for (const [kind, count] of [["new", minute.new], ["reconnect", minute.reconnect], ["other", minute.token + minute.no_identity]]) {
      if (!count) continue;
      const size = (count / peak) * height;
      y -= size;
      group.append(svg("rect", { class: `seg seg-${kind}`, x, y, width: Math.max(slot - 0.5, 0.8), height: size }));
    }
    if (minute.refused) {
      const size = (minute.refused / refusedPeak) * (REFUSED_BOTTOM - HIST_BOTTOM - 2);
      group.append(svg("rect", { class: "seg seg-refused", x, y: HIST_BOTTOM + 1, width: Math.max(slot - 0.5, 0.8), height: size }));
    }
    const title = svg("title");
    const moment = new Date(at);
    const refusedBy = Object.entries(minute.refusals || {}).map(([why, n]) => `${n} ${why}`).join(", ");
    title.textContent = `${pad(moment.getHours())}:${pad(moment.getMinutes())}: ${minute.logons} logon${minute.logons === 1 ? "" : "s"} (${minute.new} new, ${minute.reconnect} reconnect, ${minute.token} by token, ${minute.no_identity} without a name)${minute.refused ? `; ${minute.refused} refused (${refusedBy})` : ""}`;
    group.append(title);
    parts.push(group);
    total += minute.logons;
    refusedTotal += minute.refused || 0;
  }
  chart.replaceChildren(...parts);
  chart.dataset.logons = `${total}`;
  chart.dataset.refused = `${refusedTotal}`;
  chart.dataset.minutes = `${answer.minutes.length}`;
  const hourAgo = until - 3600000;
  const lastHour = answer.minutes.filter((m) => new Date(m.at).getTime() >= hourAgo).reduce((n, m) => n + m.logons, 0);
  setTile("logons", lastHour);
  const refusedLastHour = answer.minutes.filter((m) => new Date(m.at).getTime() >= hourAgo).reduce((n, m) => n + (m.refused || 0), 0);
  setTile("refused", refusedLastHour);
  document.querySelector('#tiles li[data-tile="refused"]').classList.toggle("alarm", refusedLastHour > 0);
  if (!answer.minutes.length) $("#history-message").textContent = "No logons or refusals in this time.";
}

// --- route explain (GET /v1/route/explain, where the broker has it) -------------------------------------

// Asked once with no user: a broker that has the route answers 422 (user missing), one without it 404.
let explainKnown = false;

async function probeExplain() {
  if (explainKnown) return;
  try {
    await api("GET", "/v1/route/explain");
    explainKnown = true;
  } catch (err) {
    if (err.status === 401 || err.status === 0) return; // ask again once the page has a token
    explainKnown = true;
    $("#explain").hidden = err.status === 404;
    return;
  }
  $("#explain").hidden = false;
}

function fact(term, value, name) {
  const wrap = document.createElement("div");
  wrap.dataset.fact = name;
  wrap.append(text("dt", term), text("dd", value));
  return wrap;
}

async function explain(event) {
  event.preventDefault();
  const user = $("#explain-user").value.trim();
  const client = $("#explain-client").value.trim();
  if (!user) return;
  const result = $("#explain-result");
  const message = $("#explain-message");
  const params = new URLSearchParams({ user });
  if (client) params.set("client", client);
  let answer;
  try {
    answer = await api("GET", `/v1/route/explain?${params}`);
  } catch (err) {
    result.hidden = true;
    message.textContent = err.message;
    return;
  }
  message.textContent = "";
  const assignment = answer.assignment || {};
  let rule = "the client named the pool";
  if (assignment.consulted !== false) {
    rule = assignment.rule ? `rule ${assignment.rule} of ${assignment.rules}: ${assignment.match}` : `no rule matched (${assignment.rules || 0} rules): the default pool`;
  }
  const decision = { reconnect: "back to the user's live session", new: "a new session", none: "refused: no server can take a new session" }[answer.decision] || answer.decision;
  result.querySelector(".explain-facts").replaceChildren(
    fact("Assignment", rule, "rule"),
    fact("Pool", `${answer.pool}${answer.placement ? ` (${answer.placement})` : ""}`, "pool"),
    fact("Account key", answer.account_key || "–", "account"),
    fact("Decision", decision, "decision"),
    fact("Server", answer.server || "–", "server"),
  );
  result.querySelector(".explain-why").textContent = answer.why || "";
  result.querySelector(".explain-notes").replaceChildren(...(answer.notes || []).map((note) => text("li", note)));
  const candidates = (answer.candidates || []).map((c) => {
    const row = document.createElement("tr");
    row.dataset.address = c.address;
    if (c.address === answer.server) row.className = "picked";
    const effective = typeof c.effective_load === "number" ? c.effective_load.toFixed(2) : "–";
    row.append(
      text("td", c.address, "address"),
      text("td", effective),
      text("td", c.load >= 0 ? `${c.load}` : "–"),
      text("td", `${c.held_sessions ?? "–"}`),
      text("td", c.max_sessions ? `${c.max_sessions}` : "∞"),
      text("td", `${c.weight ?? "–"}`),
    );
    return row;
  });
  result.querySelector(".explain-candidates tbody").replaceChildren(...candidates);
  result.querySelector(".explain-candidates").hidden = candidates.length === 0;
  const unavailable = (answer.unavailable || []).map((u) => `${u.address} (${u.why})`);
  const eligible = typeof answer.eligible === "number" ? `${answer.eligible} server${answer.eligible === 1 ? "" : "s"} take new sessions. ` : "";
  result.querySelector(".explain-unavailable").textContent = unavailable.length ? `${eligible}Not taking new sessions: ${unavailable.join(", ")}.` : eligible;
  result.hidden = false;
}

// --- audit trail -----------------------------------------------------------------------------------

const AUDIT_ENTRIES = 20;

// Read only while the panel is open: a read token would be refused at every refresh.
async function refreshAudit() {
  if (!$("#audit").open) return;
  const table = $("#audit-entries");
  const message = $("#audit-message");
  try {
    const answer = await api("GET", `/v1/audit?limit=${AUDIT_ENTRIES}`);
    const rows = answer.items.map((entry) => {
      const row = document.createElement("tr");
      row.dataset.id = `${entry.id}`;
      row.append(
        text("td", formatTime(entry.at)),
        text("td", entry.actor, "actor"),
        text("td", entry.client || "–"),
        text("td", entry.action, "action"),
        text("td", entry.target || "–", "target"),
        text("td", entry.detail || "–", "detail"),
      );
      return row;
    });
    table.querySelector("tbody").replaceChildren(...rows);
    table.hidden = rows.length === 0;
    message.textContent = rows.length ? "" : "No changes recorded.";
  } catch (err) {
    table.hidden = true;
    message.textContent = err.status === 401 || err.status === 403
      ? "The audit trail needs the admin token: use “Token…”."
      : err.message;
  }
}

// --- start -----------------------------------------------------------------------------------------

async function loop() {
  if (!document.hidden) await Promise.all([refresh(), refreshAudit()]);
  const every = Number(document.body.dataset.refreshMs) || 5000;
  refreshTimer = setTimeout(loop, every);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#search-form").addEventListener("submit", search);
  $("#explain-form").addEventListener("submit", explain);
  $("#history-hours").addEventListener("change", () => refreshHistory(true));
  $("#audit").addEventListener("toggle", refreshAudit);
  $("#token-button").addEventListener("click", async () => {
    const value = await askToken("API token", "A read token shows the farm; the admin token also changes it.");
    if (value !== null) {
      setToken(value);
      clearTimeout(refreshTimer);
      loop();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  loop();
});
