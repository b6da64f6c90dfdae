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
