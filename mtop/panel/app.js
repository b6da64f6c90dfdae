// The MTop admin panel: plain JavaScript on the admin API (/api/v1/),
// no build step.  A session cookie logs the browser in; every change
// sends the session's CSRF token.  What the server says is shown as text
// (never as HTML), errors beside the field they name.

const api = "/api/v1";
let csrf = "";
let page = 1;
const perPage = 50;
let linksUser = "";

const $ = (selector) => document.querySelector(selector);

async function call(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = csrf;
  const response = await fetch(api + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const error = new Error(data && data.error ? data.error.message : `HTTP ${response.status}`);
    error.field = data && data.error ? data.error.field : null;
    error.status = response.status;
    throw error;
  }
  return data;
}

function clearErrors(form) {
  form.querySelectorAll(".error").forEach((span) => { span.textContent = ""; });
  $("#banner").hidden = true;
}

function showError(form, error) {
  if (error.status === 401 && form.id !== "login-form") { showLogin(); return; }
  const span = error.field ? form.querySelector(`.error[data-field="${error.field}"]`) : null;
  if (span) { span.textContent = error.message; return; }
  $("#banner").textContent = error.message;
  $("#banner").hidden = false;
}

function showLogin() {
  $("#main").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
}

function showMain(admin) {
  $("#login").hidden = true;
  $("#main").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = admin;
  loadUsers();
  loadTunnels();
  loadTraffic();
}

function human(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = content;
  row.append(td);
  return td;
}

function usage(user) {
  const wrap = document.createElement("div");
  const text = document.createElement("div");
  text.className = "small";
  text.textContent = user.quota_bytes == null ? human(user.used) : `${human(user.used)} of ${human(user.quota_bytes)}`;
  wrap.append(text);
  if (user.quota_bytes != null) {
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    const share = user.quota_bytes ? Math.min(1, user.used / user.quota_bytes) : 1;
    fill.style.width = `${Math.round(share * 100)}%`;
    if (share >= 1) bar.classList.add("over");
    bar.append(fill);
    wrap.append(bar);
  }
  return wrap;
}

async function loadUsers() {
  const query = new URLSearchParams({ page, per_page: perPage, q: $("#search").value });
  let data;
  try {
    data = await call("GET", `/users?${query}`);
  } catch (error) {
    showError($("#add-form"), error);
    return;
  }
  $("#total").textContent = `(${data.total})`;
  $("#page").textContent = `page ${data.page} of ${Math.max(1, Math.ceil(data.total / perPage))}`;
  $("#prev").disabled = page <= 1;
  $("#next").disabled = page * perPage >= data.total;
  const body = $("#users tbody");
  body.replaceChildren();
  for (const user of data.users) {
    const row = document.createElement("tr");
    row.dataset.user = user.username;
    cell(row, user.username);
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.checked = user.enabled !== false;
    toggle.className = "enabled";
    toggle.title = "enabled (unchecked: refused, open tunnels closed)";
    toggle.addEventListener("change", async () => {
      try {
        await call("PATCH", `/users/${encodeURIComponent(user.username)}`, { enabled: toggle.checked });
      } catch (error) {
        toggle.checked = !toggle.checked;
        showError($("#add-form"), error);
      }
    });
    cell(row, toggle);
    cell(row, usage(user));
    cell(row, user.expires_at ? `${user.expires_at} UTC` : "never");
    const actions = document.createElement("span");
    const edit = document.createElement("button");
    edit.textContent = "Edit";
    edit.className = "plain edit-button";
    edit.addEventListener("click", () => openEdit(user));
    const link = document.createElement("button");
    link.textContent = "Link";
    link.className = "plain link-button";
    link.addEventListener("click", () => openLinks(user.username, ""));
    const remove = document.createElement("button");
    remove.textContent = "Delete";
    remove.className = "plain";
    remove.addEventListener("click", async () => {
      if (!window.confirm(`Delete ${user.username}?`)) return;
      try {
        await call("DELETE", `/users/${encodeURIComponent(user.username)}`);
        loadUsers();
      } catch (error) {
        showError($("#add-form"), error);
      }
    });
    actions.append(edit, " ", link, " ", remove);
    cell(row, actions);
    body.append(row);
  }
}

async function loadTunnels() {
  let data;
  try {
    data = await call("GET", "/tunnels");
  } catch (error) {
    showError($("#add-form"), error);
    return;
  }
  const body = $("#tunnels tbody");
  body.replaceChildren();
  for (const tunnel of data.here || []) {
    const row = document.createElement("tr");
    row.dataset.user = tunnel.username;
    cell(row, tunnel.username);
    cell(row, tunnel.client);
    cell(row, tunnel.target);
    cell(row, `${Math.round(tunnel.seconds)} s`);
    cell(row, `${human(tunnel.bytes_up)} / ${human(tunnel.bytes_down)}`);
    const close = document.createElement("button");
    close.textContent = "Close";
    close.className = "plain";
    close.title = "close this user's tunnels on this server";
    close.addEventListener("click", async () => {
      try {
        await call("POST", `/users/${encodeURIComponent(tunnel.username)}/close-tunnels`);
      } catch (error) {
        showError($("#add-form"), error);
      }
      loadTunnels();
    });
    cell(row, close);
    body.append(row);
  }
  const servers = {};
  for (const item of data.servers) servers[item.server] = (servers[item.server] || 0) + item.tunnels;
  const names = Object.keys(servers);
  $("#tunnels-servers").textContent = names.length
    ? `Across servers: ${names.map((name) => `${name} ${servers[name]}`).join(", ")}`
    : (data.here === null ? "This panel runs apart from the servers: per-server counts appear as they publish them." : "");
}

// Traffic charts: bars of bytes up and down per point, drawn as SVG from
// /usage (all users) and /users/{name}/usage (one).

const RANGES = [["last 24 hours", 24], ["last 7 days", 168], ["last 30 days", 720]];
const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (text !== undefined) element.textContent = text;
  return element;
}

function when(seconds, hours) {
  const date = new Date(seconds * 1000);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return hours <= 24 ? time : `${date.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function drawChart(container, data, hours) {
  const width = Math.max(240, container.clientWidth || 600);
  const height = 144;
  const left = 56;
  const top = 8;
  const bottom = 18;
  const plotWidth = width - left - 4;
  const plotHeight = height - top - bottom;
  let up = 0;
  let down = 0;
  let peak = 0;
  for (const point of data.points) {
    up += point.up;
    down += point.down;
    peak = Math.max(peak, point.up + point.down);
  }
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `${human(up)} up and ${human(down)} down` });
  for (const share of [0, 0.5, 1]) {
    const y = top + plotHeight * (1 - share);
    svg.append(svgElement("line", { class: "grid", x1: left, x2: width - 4, y1: y, y2: y }));
    if (peak) svg.append(svgElement("text", { class: "axis", x: left - 4, y: y + 3, "text-anchor": "end" }, human(Math.round(peak * share))));
  }
  const slot = plotWidth / Math.max(1, data.points.length);
  data.points.forEach((point, index) => {
    if (!point.up && !point.down) return;
    const x = left + index * slot;
    const barWidth = Math.max(1, slot * 0.8);
    const downHeight = Math.max(point.down ? 1 : 0, (point.down / peak) * plotHeight);
    const upHeight = Math.max(point.up ? 1 : 0, (point.up / peak) * plotHeight);
    const group = svgElement("g", { class: "point" });
    group.append(svgElement("title", {}, `${when(point.t, hours)}: ${human(point.up)} up, ${human(point.down)} down`));
    group.append(svgElement("rect", { class: "down", x, width: barWidth, y: top + plotHeight - downHeight, height: downHeight }));
    group.append(svgElement("rect", { class: "up", x, width: barWidth, y: top + plotHeight - downHeight - upHeight, height: upHeight }));
    svg.append(group);
  });
  svg.append(svgElement("text", { class: "axis", x: left, y: height - 4 }, when(data.since, hours)));
  svg.append(svgElement("text", { class: "axis", x: width - 4, y: height - 4, "text-anchor": "end" }, "now"));
  const caption = document.createElement("p");
  caption.className = "small caption";
  const upKey = document.createElement("span");
  upKey.className = "key-up";
  upKey.textContent = `${human(up)} up`;
  const downKey = document.createElement("span");
  downKey.className = "key-down";
  downKey.textContent = `${human(down)} down`;
  caption.append(upKey, ", ", downKey, ` (bars of ${data.step / 60} minutes)`);
  container.dataset.up = up;
  container.dataset.down = down;
  container.replaceChildren(svg, caption);
}

function chartError(container, error) {
  if (error.status === 401) { showLogin(); return; }
  const text = document.createElement("p");
  text.className = "small";
  text.textContent = error.message;
  container.replaceChildren(text);
}

async function loadTraffic() {
  const hours = Number($("#traffic-range").value);
  let data;
  try {
    data = await call("GET", `/usage?hours=${hours}`);
  } catch (error) {
    chartError($("#traffic-chart"), error);
    return;
  }
  drawChart($("#traffic-chart"), data, hours);
  const top = $("#traffic-top");
  top.replaceChildren();
  let users = [];
  try {
    users = (await call("GET", "/users?sort=used&order=desc&per_page=10")).users;
  } catch (error) { /* no counters: no list */ }
  for (const user of users.filter((item) => item.used > 0)) {
    const entry = document.createElement("li");
    entry.dataset.user = user.username;
    entry.textContent = `${user.username}: ${human(user.used)}`;
    top.append(entry);
  }
  const servers = $("#traffic-servers");
  servers.replaceChildren();
  for (const item of data.servers) {
    const entry = document.createElement("li");
    entry.textContent = `${item.server}: ${human(item.up)} up, ${human(item.down)} down`;
    servers.append(entry);
  }
}

async function loadUserTraffic() {
  const hours = Number($("#user-range").value);
  const chart = $("#user-chart");
  chart.dataset.user = editUser;
  try {
    const data = await call("GET", `/users/${encodeURIComponent(editUser)}/usage?hours=${hours}`);
    if (chart.dataset.user === editUser) drawChart(chart, data, hours);
  } catch (error) {
    chartError(chart, error);
  }
}

let editUser = "";
let editShown = {};

function openEdit(user) {
  editUser = user.username;
  editShown = {};
  const form = $("#edit-form");
  clearErrors(form);
  $("#edit-user").textContent = user.username;
  form.password.value = "";
  for (const name of ["quota_bytes", "rate_limit", "max_connections", "expires_at"]) {
    form[name].value = user[name] == null ? "" : String(user[name]);
    editShown[name] = form[name].value;
  }
  $("#edit").hidden = false;
  $("#user-chart").replaceChildren();
  loadUserTraffic();
  form.quota_bytes.focus();
}

async function saveEdit() {
  const form = $("#edit-form");
  clearErrors(form);
  const body = {};
  for (const name of ["quota_bytes", "rate_limit", "max_connections", "expires_at"]) {
    const value = form[name].value.trim();
    if (value === editShown[name]) continue;  // only what the admin changed
    body[name] = value === "" ? null : (/^\d+$/.test(value) && name !== "expires_at" ? Number(value) : value);
  }
  if (form.password.value) body.password = form.password.value;
  if (Object.keys(body).length === 0) { $("#edit").hidden = true; return; }
  try {
    await call("PATCH", `/users/${encodeURIComponent(editUser)}`, body);
    $("#edit").hidden = true;
    loadUsers();
  } catch (error) {
    showError(form, error);
  }
}

function openLinks(username, password) {
  linksUser = username;
  $("#links-user").textContent = username;
  $("#links-list").replaceChildren();
  const form = $("#links-form");
  clearErrors(form);
  form.password.value = password;
  $("#links").hidden = false;
  if (password) showLinks(); else form.password.focus();
}

async function showLinks() {
  const form = $("#links-form");
  clearErrors(form);
  const body = { username: linksUser, password: form.password.value };
  if (form.host.value) body.host = form.host.value;
  let data;
  try {
    data = await call("POST", "/links", body);
  } catch (error) {
    showError(form, error);
    return;
  }
  const list = $("#links-list");
  list.replaceChildren();
  for (const item of data.links) {
    const box = document.createElement("div");
    box.className = "link";
    const image = document.createElement("img");
    image.alt = `QR code of the ${item.type} link`;
    image.src = `data:image/svg+xml;base64,${btoa(item.qr_svg)}`;
    const text = document.createElement("code");
    text.textContent = item.url;
    box.append(image, text);
    list.append(box);
  }
}

function policy(form) {
  const body = {};
  for (const name of ["quota_bytes", "rate_limit", "max_connections", "expires_at"]) {
    const value = form[name].value.trim();
    if (value) body[name] = /^\d+$/.test(value) && name !== "expires_at" ? Number(value) : value;
  }
  return body;
}

function init() {
  for (const select of [$("#traffic-range"), $("#user-range")]) {
    for (const [label, hours] of RANGES) select.append(new Option(label, String(hours)));
  }
  $("#traffic-range").addEventListener("change", loadTraffic);
  $("#traffic-refresh").addEventListener("click", loadTraffic);
  $("#user-range").addEventListener("change", loadUserTraffic);
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    clearErrors(form);
    try {
      const session = await call("POST", "/session", { name: form.name.value, password: form.password.value });
      csrf = session.csrf;
      form.password.value = "";
      showMain(session.admin);
    } catch (error) {
      showError(form, error);
    }
  });
  $("#logout").addEventListener("click", async () => {
    try { await call("DELETE", "/session"); } catch (error) { /* gone already */ }
    csrf = "";
    showLogin();
  });
  $("#add-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target;
    clearErrors(form);
    const body = { username: form.username.value, ...policy(form) };
    if (form.password.value) body.password = form.password.value;
    try {
      const created = await call("POST", "/users", body);
      const password = created.password || form.password.value;
      form.reset();
      await loadUsers();
      openLinks(created.user.username, password);
    } catch (error) {
      showError(form, error);
    }
  });
  $("#links-form").addEventListener("submit", (event) => { event.preventDefault(); showLinks(); });
  $("#edit-form").addEventListener("submit", (event) => { event.preventDefault(); saveEdit(); });
  $("#edit-close").addEventListener("click", () => { $("#edit").hidden = true; });
  $("#reset-usage").addEventListener("click", async () => {
    try {
      await call("POST", `/users/${encodeURIComponent(editUser)}/reset-usage`);
      loadUsers();
    } catch (error) {
      showError($("#edit-form"), error);
    }
  });
  $("#links-close").addEventListener("click", () => { $("#links").hidden = true; });
  $("#search").addEventListener("input", () => { page = 1; loadUsers(); });
  $("#prev").addEventListener("click", () => { page -= 1; loadUsers(); });
  $("#tunnels-refresh").addEventListener("click", loadTunnels);
  $("#next").addEventListener("click", () => { page += 1; loadUsers(); });
  call("GET", "/session").then((session) => { csrf = session.csrf; showMain(session.admin); }, showLogin);
}

init();
