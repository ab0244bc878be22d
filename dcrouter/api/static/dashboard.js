// The dcrouter dashboard: reads the management API with the token the operator typed in (kept in this tab's
// sessionStorage), polls every few seconds, and follows the event stream with fetch() (EventSource cannot
// send an Authorization header). Everything is written with textContent: nothing from the API is parsed as
// HTML. No build step, no dependency.
"use strict";

const POLL_MS = 3000;
const EVENTS_KEPT = 50;
const TOKEN_KEY = "dcrouter.token";

let token = sessionStorage.getItem(TOKEN_KEY);
let previous = null; // the last stats, for the rates
let pollTimer = null;
let stream = null; // AbortController of the event stream

const $ = (id) => document.getElementById(id);

function setNotice(text, isError) {
  const notice = $("notice");
  notice.textContent = text;
  notice.className = isError ? "error" : "";
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + token, Accept: "application/json" };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const type = response.headers.get("content-type") || "";
  const data = type.startsWith("application/json") ? await response.json() : await response.text();
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiFailure(response.status, error.code || "http", error.message || response.statusText);
  }
  return data;
}

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) {
      td.appendChild(cell);
    } else if (cell && typeof cell === "object") {
      td.textContent = cell.text === null || cell.text === undefined ? "" : String(cell.text);
      if (cell.className) td.className = cell.className;
    } else {
      td.textContent = cell === null || cell === undefined ? "" : String(cell);
    }
    tr.appendChild(td);
  }
  table.querySelector("tbody").appendChild(tr);
  return tr;
}

function clear(table) {
  table.querySelector("tbody").replaceChildren();
}

function showStats(stats) {
  $("version").textContent = "version " + stats.version + ", up " + Math.round(stats.uptime) + " s";
  const table = $("queue-status");
  clear(table);
  for (const [status, count] of Object.entries(stats.queue || {})) {
    row(table, [status, { text: count, className: "number" }]);
  }
  const now = Date.now() / 1000;
  if (previous) {
    const seconds = Math.max(0.001, now - previous.at);
    const rate = (key) => ((stats.messages[key] - previous.stats.messages[key]) / seconds).toFixed(2);
    $("rates").textContent =
      "in: " + rate("received") + " msg/s, delivered: " + rate("delivered") + " msg/s; " +
      stats.smtpSessions + " SMTP sessions, " + stats.proxyConnections + " proxy connections";
  } else {
    $("rates").textContent = "received " + stats.messages.received + ", delivered " + stats.messages.delivered;
  }
  previous = { at: now, stats };
}

function showDestinations(delivery, items) {
  const waiting = {};
  for (const item of items) {
    if (item.destination && (item.status === "queued" || item.status === "deferred")) {
      waiting[item.destination] = (waiting[item.destination] || 0) + 1;
    }
  }
  const names = new Set([
    ...Object.keys(delivery.inFlightByDestination || {}),
    ...Object.keys(delivery.lastErrors || {}),
    ...Object.keys(waiting),
    ...(delivery.pausedDestinations || []),
  ]);
  const table = $("destinations");
  clear(table);
  for (const name of [...names].sort()) {
    const error = (delivery.lastErrors || {})[name];
    row(table, [
      name,
      { text: (delivery.inFlightByDestination || {})[name] || 0, className: "number" },
      { text: waiting[name] || 0, className: "number" },
      delivery.paused || (delivery.pausedDestinations || []).includes(name) ? "paused" : "",
      { text: error ? error.reply + " (" + error.at + ")" : "", className: error ? "error" : "" },
    ]);
  }
}

function retryButton(item) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Retry";
  button.className = "retry";
  button.dataset.id = item.id;
  button.disabled = !(item.status === "queued" || item.status === "deferred");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const answer = await api("POST", "/api/v1/queue/" + encodeURIComponent(item.id) + "/retry", {});
      setNotice(item.id + ": retry asked, next attempt " + (answer.item.nextAttemptAt || "now"), false);
      await refresh();
    } catch (error) {
      setNotice(item.id + ": retry refused: " + error.message, true);
      button.disabled = false;
    }
  });
  return button;
}

function showMessages(items) {
  const table = $("messages");
  clear(table);
  for (const item of items.slice(0, 50)) {
    const tr = row(table, [
      item.id,
      item.status,
      item.createdAt,
      item.sender || "<>",
      item.recipients.join(", "),
      item.destination || "",
      item.nextAttemptAt || "",
      { text: item.lastError || "", className: item.lastError ? "error" : "" },
      retryButton(item),
    ]);
    tr.dataset.id = item.id;
  }
}

// Prometheus text: `name{label="value"} number` lines (the dashboard reads only a few of them).
function metricValues(text, name, label) {
  const found = {};
  const pattern = new RegExp("^" + name + "\\{[^}]*" + label + "=\"((?:[^\"\\\\]|\\\\.)*)\"[^}]*\\} (\\S+)$");
  for (const line of text.split("\n")) {
    const match = pattern.exec(line);
    if (match) found[match[1]] = Number(match[2]);
  }
  return found;
}

function showMetrics(text) {
  const open = metricValues(text, "dcrouter_proxy_active_connections", "route");
  const total = metricValues(text, "dcrouter_proxy_connections_total", "route");
  const routes = $("routes");
  clear(routes);
  for (const name of [...new Set([...Object.keys(open), ...Object.keys(total)])].sort()) {
    row(routes, [name, { text: open[name] || 0, className: "number" }, { text: total[name] || 0, className: "number" }]);
  }
  const notAfter = metricValues(text, "dcrouter_certificate_not_after_timestamp", "name");
  const days = metricValues(text, "dcrouter_certificate_expiry_days", "name");
  const certificates = $("certificates");
  clear(certificates);
  for (const name of Object.keys(notAfter).sort()) {
    row(certificates, [
      name,
      new Date(notAfter[name] * 1000).toISOString().slice(0, 10),
      { text: Math.floor(days[name]), className: days[name] < 14 ? "number error" : "number" },
    ]);
  }
}

async function refresh() {
  try {
    const [stats, delivery, page, metrics] = await Promise.all([
      api("GET", "/api/v1/stats"),
      api("GET", "/api/v1/delivery").catch(() => ({})),
      api("GET", "/api/v1/queue?limit=500").catch(() => ({ items: [] })),
      api("GET", "/metrics"),
    ]);
    showStats(stats);
    showDestinations(delivery, page.items);
    showMessages(page.items);
    showMetrics(metrics);
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (error) {
    if (error.status === 401) {
      logout("the token was refused");
      return;
    }
    setStatus("cannot read the API: " + error.message, true);
  }
}

function addEvent(event) {
  const list = $("events");
  const item = document.createElement("li");
  const ids = [event.queueId, event.sessionId].filter(Boolean).join(" ");
  const time = new Date(event.time * 1000).toLocaleTimeString();
  const { type, time: _t, queueId: _q, sessionId: _s, ...fields } = event;
  item.textContent = time + " " + type + (ids ? " [" + ids + "]" : "") + " " + JSON.stringify(fields);
  list.prepend(item);
  while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
}

// Server-Sent Events read from a fetch() body: blocks separated by a blank line, `data:` lines joined.
async function followEvents() {
  stream = new AbortController();
  try {
    const response = await fetch("/api/v1/events", {
      headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
      cache: "no-store",
      signal: stream.signal,
    });
    if (!response.ok || !response.body) throw new Error("event stream: HTTP " + response.status);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim());
        if (data.length) addEvent(JSON.parse(data.join("\n")));
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return;
  }
  // Ended or failed (the router restarted, a proxy timed it out): follow again shortly.
  if (token) setTimeout(followEvents, POLL_MS);
}

function start() {
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  refresh();
  pollTimer = setInterval(refresh, POLL_MS);
  followEvents();
}

function logout(reason) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (pollTimer) clearInterval(pollTimer);
  if (stream) stream.abort();
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  setStatus(reason || "", Boolean(reason));
}

function login() {
  const value = $("token").value.trim();
  if (!value) return;
  token = value;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  setStatus("", false);
  start();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-button").addEventListener("click", login);
  $("token").addEventListener("keydown", (event) => {
    if (event.key === "Enter") login();
  });
  $("logout").addEventListener("click", () => logout(""));
  if (token) start();
  else $("login").hidden = false;
});
