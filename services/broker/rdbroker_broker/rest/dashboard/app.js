// The rdbroker dashboard: servers of each pool, a user search with log off/disconnect/message buttons
// per session (through the server's agent, each after a confirmation), drain/maintenance/enable
// buttons, and operators' recent changes (the audit trail, admin token only).
// Plain DOM, no build step. Every value from the API goes in through textContent, never as HTML.
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
function drainCell(server) {
  const drain = server.drain;
  const cell = text("td", "–", "drain");
  if (!drain || (!drain.running && server.admin_state === "enabled")) return cell;
  const counts = [`${drain.messaged} messaged`, `${drain.logged_off} logged off`];
  if (drain.errors) counts.push(`${drain.errors} error${drain.errors === 1 ? "" : "s"}`);
  const title = [drain.detail, `started ${formatTime(drain.started_at)} by ${drain.started_by}`];
  if (drain.running) {
    cell.textContent = `${drain.step} · ${drain.sessions_left} left · ${counts.join(" · ")}`;
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

function serverRow(server) {
  const row = document.createElement("tr");
  row.dataset.address = server.address;
  row.className = `health-${server.health} state-${server.effective_admin_state || server.admin_state}`;
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
  row.append(text("td", server.power || "on", "power"));
  row.append(text("td", server.load >= 0 ? `${server.load}` : "–", "load"));
  row.append(text("td", `${server.live_sessions}`, "sessions"));
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
  return row;
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
    article.querySelector("tbody").append(...members.map(serverRow));
    articles.push(article);
  }
  if (articles.length) section.replaceChildren(...articles);
  else section.replaceChildren(text("p", "No pools or servers yet.", "empty"));
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
        sessionButtons(session),
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

function sessionButtons(session) {
  const cell = document.createElement("td");
  cell.className = "actions";
  if (session.state === "ended") return cell;
  for (const [action, label, question] of SESSION_ACTIONS) {
    const button = text("button", label);
    button.type = "button";
    button.dataset.action = action;
    const asked = question.replace("{user}", session.user || "this user").replace("{server}", session.server_address);
    button.addEventListener("click", () => sessionAction(session, action, label, asked));
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

async function sessionAction(session, action, label, question) {
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
  await lookUp();
  $("#search-message").textContent = outcome;
  await Promise.all([refresh(), refreshAudit()]);
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
