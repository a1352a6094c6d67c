// The Zerotouch console: one page, no build step, no third-party code. It calls the same
// management and hub APIs as every other client; the session cookie stands in for the
// Authorization header and the API enforces the rights. Every text that comes from the
// server is put into the page as text (never as HTML).
"use strict";

const DPS_API = "2021-10-01";
const HUB_API = "2021-04-12";
const PAGE_SIZE = 20;

let session = null;

// ----- DOM helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const main = () => document.getElementById("main");

function show(...nodes) {
  main().replaceChildren(...nodes);
}

function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
}

function errorBox(error) {
  const code = error.code ? `${error.code}: ` : "";
  return h("div", { class: "error", "data-error-code": error.code || "" }, code + error.message);
}

function badge(text, kind) {
  return h("span", { class: `badge ${kind || ""}` }, text);
}

function date(text) {
  if (!text) return "";
  const d = new Date(text);
  return isNaN(d) ? String(text) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

// ----- API ---------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

// Calls the API. `hub: true` uses the hub's api-version. Returns { body, headers, status }.
async function api(method, path, options = {}) {
  const url = new URL(path, location.origin);
  url.searchParams.set("api-version", options.hub ? HUB_API : DPS_API);
  for (const [k, v] of Object.entries(options.query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const headers = Object.assign({}, options.headers || {});
  if (method !== "GET" && method !== "HEAD" && session) headers["X-CSRF-Token"] = session.csrfToken;
  let body;
  if (options.body !== undefined) {
    if (typeof options.body === "string") {
      body = options.body;
      headers["Content-Type"] = headers["Content-Type"] || "text/plain";
    } else {
      body = JSON.stringify(options.body);
      headers["Content-Type"] = "application/json";
    }
  }
  const response = await fetch(url, { method, headers, body, credentials: "same-origin" });
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch (_) { parsed = text; }
  if (!response.ok) {
    const code = (parsed && (parsed.errorCode || parsed.ErrorCode || parsed.code)) || response.status;
    const message = (parsed && (parsed.message || parsed.Message)) || response.statusText;
    if (response.status === 401 && path !== "/console/session") {
      session = null;
      renderSignIn("Your session ended: " + message);
    }
    throw new ApiFailure(response.status, code, message, parsed);
  }
  return { body: parsed, headers: response.headers, status: response.status };
}

function can(right) {
  return !!session && session.rights.includes(right);
}

// ----- session -----------------------------------------------------------------------------

async function loadSession() {
  try {
    session = (await api("GET", "/console/session")).body;
  } catch (_) {
    session = null;
  }
  renderHeader();
}

function renderHeader() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  nav.hidden = !session;
  if (!session) {
    who.replaceChildren();
    return;
  }
  who.replaceChildren(
    h("span", { id: "principal" }, session.principal),
    h("span", { class: "rights", title: session.rights.join(", ") }, `${session.rights.length} rights`),
    h("button", { class: "secondary", id: "add-credential", onclick: () => renderSignIn(null, true) }, "Add credential"),
    h("button", { class: "secondary", id: "sign-out", onclick: signOut }, "Sign out"),
  );
}

function renderSignIn(message, adding) {
  renderHeader();
  const input = h("textarea", {
    id: "credential", rows: 4, autocomplete: "off", spellcheck: "false",
    placeholder: "HostName=…;SharedAccessKeyName=…;SharedAccessKey=…   or a token from `zerotouch token create`",
  });
  const problem = h("div");
  const submit = async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    try {
      session = (await api("POST", "/console/session", { body: { credential: input.value } })).body;
      input.value = "";
      renderHeader();
      if (!location.hash || location.hash === "#/signin") location.hash = "#/overview";
      else route();
    } catch (e) {
      problem.replaceChildren(errorBox(e));
    }
  };
  show(h("div", { class: "panel signin" },
    h("h1", {}, adding ? "Add a credential" : "Sign in"),
    message ? h("div", { class: "error" }, message) : null,
    h("p", { class: "muted" },
      adding
        ? "Add a second credential to this session, for example the hub's iothubowner connection string next to a provisioning one. The session holds the rights of all of them."
        : "Paste a management credential: a connection string of an authorization policy (zerotouch credentials prints them) or a token from zerotouch token create. The session lasts eight hours and has exactly that credential's rights."),
    h("form", { onsubmit: submit },
      h("label", {}, "Credential", input),
      h("div", { class: "row" }, h("button", { type: "submit", id: "sign-in" }, adding ? "Add" : "Sign in")),
      problem)));
}

async function signOut() {
  try { await api("DELETE", "/console/session"); } catch (_) { /* the cookie is gone either way */ }
  session = null;
  location.hash = "#/signin";
  renderSignIn();
}

// ----- paged lists -------------------------------------------------------------------------

// A list with a search box (on the loaded rows) and "Load more" (the next page from the API).
function pagedTable({ id, columns, fetchPage, rowActions, searchOf }) {
  const rows = [];
  let continuation = null;
  let done = false;
  const tbody = h("tbody");
  const search = h("input", { type: "search", placeholder: "Search", id: `${id}-search`, oninput: () => draw() });
  const more = h("button", { class: "secondary", id: `${id}-more`, onclick: () => load() }, "Load more");
  const status = h("span", { class: "muted" });
  const problem = h("div");
  const table = h("table", { id },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.title)), rowActions ? h("th", {}, "") : null)),
    tbody);
  function draw() {
    const needle = search.value.trim().toLowerCase();
    const shown = rows.filter((r) => !needle || searchOf(r).toLowerCase().includes(needle));
    tbody.replaceChildren(...shown.map((r) => h("tr", { "data-id": searchOf(r) },
      columns.map((c) => h("td", {}, c.cell(r))),
      rowActions ? h("td", { class: "actions" }, rowActions(r)) : null)));
    if (!shown.length) tbody.append(h("tr", {}, h("td", { colspan: columns.length + 1, class: "muted" }, "Nothing here yet.")));
    status.textContent = `${shown.length} shown of ${rows.length} loaded${done ? "" : " (more on the server)"}`;
    more.disabled = done;
  }
  async function load(reset) {
    if (reset) { rows.length = 0; continuation = null; done = false; }
    problem.replaceChildren();
    try {
      const page = await fetchPage(continuation);
      rows.push(...page.items);
      continuation = page.continuation;
      done = !continuation;
    } catch (e) {
      problem.replaceChildren(errorBox(e));
    }
    draw();
  }
  load();
  return { node: h("div", {}, h("div", { class: "row" }, search, more, status), problem, table), reload: () => load(true) };
}

async function queryPage(path, continuation, options = {}) {
  const headers = { "x-ms-max-item-count": String(PAGE_SIZE) };
  if (continuation) headers["x-ms-continuation"] = continuation;
  const r = await api(options.method || "POST", path, {
    headers, body: options.method === "GET" ? undefined : { query: "*" }, query: options.query,
  });
  const items = Array.isArray(r.body) ? r.body : (r.body && r.body.value) || [];
  return { items, continuation: r.headers.get("x-ms-continuation") };
}

// ----- enrollments and groups --------------------------------------------------------------

function attestationType(e) {
  return (e.attestation && e.attestation.type) || "";
}

function enrollmentPage(kind) {
  const group = kind === "group";
  const base = group ? "/enrollmentGroups" : "/enrollments";
  const idOf = (e) => (group ? e.enrollmentGroupId : e.registrationId);
  const writable = can("EnrollmentWrite");
  const detail = h("div");
  const list = pagedTable({
    id: group ? "groups" : "enrollments",
    searchOf: idOf,
    fetchPage: (c) => queryPage(`${base}/query`, c),
    columns: [
      { title: group ? "Group" : "Registration id", cell: (e) => h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); openEditor(e); } }, idOf(e)) },
      { title: "Attestation", cell: (e) => attestationType(e) },
      { title: "Status", cell: (e) => badge(e.provisioningStatus || "enabled", e.provisioningStatus === "disabled" ? "bad" : "ok") },
      { title: "Allocation", cell: (e) => e.allocationPolicy || "" },
      { title: "Updated", cell: (e) => date(e.lastUpdatedDateTimeUtc) },
    ],
    rowActions: (e) => [
      h("button", { class: "secondary", onclick: () => revealKeys(e) }, "Reveal keys"),
      writable ? h("button", { class: "secondary", onclick: () => toggle(e) }, e.provisioningStatus === "disabled" ? "Enable" : "Disable") : null,
      writable ? h("button", { class: "danger", onclick: () => remove(e) }, "Delete") : null,
    ],
  });

  async function revealKeys(e) {
    try {
      const r = await api("POST", `${base}/${encodeURIComponent(idOf(e))}/attestationmechanism`);
      detail.replaceChildren(h("div", { class: "panel", id: "revealed" },
        h("h2", {}, `Attestation of ${idOf(e)}`), h("pre", {}, JSON.stringify(r.body, null, 2))));
    } catch (err) { detail.replaceChildren(errorBox(err)); }
  }
  async function toggle(e) {
    try {
      const current = (await api("GET", `${base}/${encodeURIComponent(idOf(e))}`)).body;
      current.provisioningStatus = current.provisioningStatus === "disabled" ? "enabled" : "disabled";
      await api("PUT", `${base}/${encodeURIComponent(idOf(e))}`, { body: current, headers: { "If-Match": current.etag } });
      toast(`${idOf(e)} is ${current.provisioningStatus}`);
      list.reload();
    } catch (err) { detail.replaceChildren(errorBox(err)); }
  }
  async function remove(e) {
    if (!confirm(`Delete ${idOf(e)}?`)) return;
    try {
      await api("DELETE", `${base}/${encodeURIComponent(idOf(e))}`, { headers: { "If-Match": e.etag } });
      toast(`${idOf(e)} deleted`);
      list.reload();
    } catch (err) { detail.replaceChildren(errorBox(err)); }
  }
  function openEditor(e) {
    const text = h("textarea", { id: "editor", rows: 16 }, JSON.stringify(e, null, 2));
    const problem = h("div");
    const save = async () => {
      problem.replaceChildren();
      let body;
      try { body = JSON.parse(text.value); } catch (err) { problem.replaceChildren(errorBox({ message: "not JSON: " + err.message })); return; }
      try {
        await api("PUT", `${base}/${encodeURIComponent(idOf(e))}`, { body, headers: { "If-Match": e.etag } });
        toast(`${idOf(e)} saved`);
        detail.replaceChildren();
        list.reload();
      } catch (err) {
        if (err.status === 412) {
          problem.replaceChildren(h("div", { class: "error", id: "etag-conflict" },
            `Someone changed ${idOf(e)} after you opened it (your etag ${e.etag}). Reload it, apply your change again and save.`));
        } else problem.replaceChildren(errorBox(err));
      }
    };
    detail.replaceChildren(h("div", { class: "panel" },
      h("h2", {}, `${group ? "Group" : "Enrollment"} ${idOf(e)}`),
      h("p", { class: "muted" }, "Keys are not shown here; saving without them keeps the current ones."),
      text, problem,
      writable ? h("div", { class: "row" }, h("button", { id: "save", onclick: save }, "Save")) : null));
  }

  const createForm = writable ? createEnrollmentForm(kind, base, () => list.reload()) : null;
  show(h("h1", {}, group ? "Enrollment groups" : "Individual enrollments"),
    createForm, detail, list.node);
}

function createEnrollmentForm(kind, base, done) {
  const group = kind === "group";
  const id = h("input", { id: "new-id", placeholder: group ? "group id" : "registration id", required: true });
  const type = h("select", { id: "new-type" },
    h("option", { value: "symmetricKey" }, "Symmetric key"),
    h("option", { value: "x509" }, group ? "X.509 (CA reference)" : "X.509 (device certificate)"),
    group ? null : h("option", { value: "tpm" }, "TPM"));
  const caSelect = h("select", { id: "new-ca" });
  const pem = h("textarea", { id: "new-pem", rows: 5, placeholder: "-----BEGIN CERTIFICATE-----" });
  const ek = h("input", { id: "new-ek", placeholder: "endorsement key (base64 TPM2B_PUBLIC)", size: 60 });
  const extra = h("div");
  const problem = h("div");
  async function drawExtra() {
    if (type.value === "x509" && group) {
      caSelect.replaceChildren();
      try {
        const cas = (await api("GET", "/certificates")).body.value || [];
        for (const ca of cas.filter((c) => c.properties && c.properties.isVerified)) caSelect.append(h("option", { value: ca.name }, ca.name));
        if (!caSelect.options.length) caSelect.append(h("option", { value: "" }, "no verified CA certificate yet"));
      } catch (e) { problem.replaceChildren(errorBox(e)); }
      extra.replaceChildren(h("label", {}, "Verified CA certificate", caSelect));
    } else if (type.value === "x509") {
      extra.replaceChildren(h("label", {}, "Device certificate (PEM)", pem));
    } else if (type.value === "tpm") {
      extra.replaceChildren(h("label", {}, "Endorsement key", ek));
    } else {
      extra.replaceChildren(h("span", { class: "muted" }, "Keys are generated by the service."));
    }
  }
  type.addEventListener("change", drawExtra);
  drawExtra();
  const submit = async (event) => {
    event.preventDefault();
    problem.replaceChildren();
    let attestation;
    if (type.value === "symmetricKey") attestation = { type: "symmetricKey", symmetricKey: {} };
    else if (type.value === "x509" && group) attestation = { type: "x509", x509: { caReferences: { primary: caSelect.value } } };
    else if (type.value === "x509") attestation = { type: "x509", x509: { clientCertificates: { primary: { certificate: pem.value } } } };
    else attestation = { type: "tpm", tpm: { endorsementKey: ek.value.trim() } };
    const body = { attestation, provisioningStatus: "enabled" };
    body[group ? "enrollmentGroupId" : "registrationId"] = id.value.trim();
    try {
      await api("PUT", `${base}/${encodeURIComponent(id.value.trim())}`, { body });
      toast(`${id.value.trim()} created`);
      id.value = "";
      done();
    } catch (e) { problem.replaceChildren(errorBox(e)); }
  };
  return h("form", { class: "panel", id: "create-enrollment", onsubmit: submit },
    h("h2", {}, group ? "New enrollment group" : "New individual enrollment"),
    h("div", { class: "row" }, h("label", {}, "Id", id), h("label", {}, "Attestation", type), extra),
    h("p", { class: "muted" }, "Devices that send a CSR when they register get a certificate from the built-in CA."),
    h("div", { class: "row" }, h("button", { type: "submit", id: "create" }, "Create")),
    problem);
}

// ----- CA certificates ---------------------------------------------------------------------

async function casPage() {
  const writable = can("ServiceConfig");
  const tbody = h("tbody");
  const problem = h("div");
  const detail = h("div");
  async function load() {
    problem.replaceChildren();
    try {
      const cas = (await api("GET", "/certificates")).body.value || [];
      tbody.replaceChildren(...cas.map((ca) => {
        const p = ca.properties || {};
        return h("tr", { "data-id": ca.name },
          h("td", {}, ca.name),
          h("td", {}, p.subject || ""),
          h("td", {}, p.isVerified ? badge("verified", "ok") : badge("unverified", "warn")),
          h("td", {}, date(p.expiry)),
          h("td", { class: "actions" },
            writable && !p.isVerified ? h("button", { class: "secondary", onclick: () => prove(ca) }, "Prove possession") : null,
            writable ? h("button", { class: "danger", onclick: () => remove(ca) }, "Delete") : null));
      }));
      if (!cas.length) tbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No CA certificate uploaded.")));
    } catch (e) { problem.replaceChildren(errorBox(e)); }
  }
  async function prove(ca) {
    try {
      const r = await api("POST", `/certificates/${encodeURIComponent(ca.name)}/generateVerificationCode`, { headers: { "If-Match": ca.etag } });
      const code = r.body.properties.verificationCode;
      const pem = h("textarea", { id: "verification-pem", rows: 6, placeholder: "-----BEGIN CERTIFICATE-----" });
      const file = h("input", { type: "file", accept: ".pem,.crt,.cer", onchange: async () => { pem.value = await file.files[0].text(); } });
      const inner = h("div");
      const verify = async () => {
        inner.replaceChildren();
        try {
          await api("POST", `/certificates/${encodeURIComponent(ca.name)}/verify`, { body: { certificate: pem.value }, headers: { "If-Match": r.body.etag } });
          toast(`${ca.name} is verified`);
          detail.replaceChildren();
          load();
        } catch (e) { inner.replaceChildren(errorBox(e)); }
      };
      detail.replaceChildren(h("div", { class: "panel" },
        h("h2", {}, `Proof of possession for ${ca.name}`),
        h("p", {}, "Sign a certificate whose subject CN is this code with the CA's private key, then upload it:"),
        h("p", {}, h("code", { id: "verification-code" }, code)),
        h("pre", {}, `openssl req -new -key ca.key -subj "/CN=${code}" -out verify.csr\nopenssl x509 -req -in verify.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out verify.pem`),
        file, pem, inner,
        h("div", { class: "row" }, h("button", { id: "verify", onclick: verify }, "Verify"))));
    } catch (e) { detail.replaceChildren(errorBox(e)); }
  }
  async function remove(ca) {
    if (!confirm(`Delete ${ca.name}?`)) return;
    try {
      await api("DELETE", `/certificates/${encodeURIComponent(ca.name)}`, { headers: { "If-Match": ca.etag } });
      load();
    } catch (e) { problem.replaceChildren(errorBox(e)); }
  }
  let upload = null;
  if (writable) {
    const name = h("input", { id: "ca-name", placeholder: "name", required: true });
    const pem = h("textarea", { id: "ca-pem", rows: 6, placeholder: "-----BEGIN CERTIFICATE-----" });
    const file = h("input", { type: "file", accept: ".pem,.crt,.cer", onchange: async () => { pem.value = await file.files[0].text(); } });
    const inner = h("div");
    upload = h("form", { class: "panel", id: "upload-ca", onsubmit: async (event) => {
      event.preventDefault();
      inner.replaceChildren();
      try {
        await api("PUT", `/certificates/${encodeURIComponent(name.value.trim())}`, { body: { certificate: pem.value } });
        toast(`${name.value.trim()} uploaded: prove possession to use it`);
        name.value = ""; pem.value = "";
        load();
      } catch (e) { inner.replaceChildren(errorBox(e)); }
    } },
    h("h2", {}, "Upload a CA certificate"),
    h("div", { class: "row" }, h("label", {}, "Name", name), file), pem, inner,
    h("div", { class: "row" }, h("button", { type: "submit", id: "upload" }, "Upload")));
  }
  show(h("h1", {}, "CA certificates"), upload, detail, problem,
    h("table", { id: "cas" }, h("thead", {}, h("tr", {}, ["Name", "Subject", "State", "Expires", ""].map((t) => h("th", {}, t)))), tbody));
  load();
}

// ----- registrations -----------------------------------------------------------------------

async function registrationsPage() {
  const groupSelect = h("select", { id: "registration-group" });
  const one = h("input", { id: "registration-id", placeholder: "registration id" });
  const out = h("div");
  const columns = [
    { title: "Registration id", cell: (r) => r.registrationId },
    { title: "Status", cell: (r) => badge(r.status, r.status === "assigned" ? "ok" : r.status === "failed" ? "bad" : "") },
    { title: "Hub", cell: (r) => r.assignedHub || "" },
    { title: "Device id", cell: (r) => r.deviceId ? h("a", { href: `#/device/${encodeURIComponent(r.deviceId)}` }, r.deviceId) : "" },
    { title: "Error", cell: (r) => r.errorCode ? `${r.errorCode}: ${r.errorMessage || ""}` : "" },
    { title: "Updated", cell: (r) => date(r.lastUpdatedDateTimeUtc) },
  ];
  function listGroup() {
    if (!groupSelect.value) return;
    const t = pagedTable({
      id: "registrations", columns, searchOf: (r) => r.registrationId,
      fetchPage: (c) => queryPage(`/registrations/${encodeURIComponent(groupSelect.value)}/query`, c),
    });
    out.replaceChildren(t.node);
  }
  async function lookup(event) {
    event.preventDefault();
    try {
      const r = (await api("GET", `/registrations/${encodeURIComponent(one.value.trim())}`)).body;
      out.replaceChildren(h("table", { id: "registrations" },
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.title)))),
        h("tbody", {}, h("tr", { "data-id": r.registrationId }, columns.map((c) => h("td", {}, c.cell(r)))))));
    } catch (e) { out.replaceChildren(errorBox(e)); }
  }
  groupSelect.addEventListener("change", listGroup);
  show(h("h1", {}, "Registrations"),
    h("div", { class: "panel" },
      h("div", { class: "row" }, h("label", {}, "Devices of group", groupSelect),
        h("form", { class: "row", onsubmit: lookup }, h("label", {}, "Or one registration", one), h("button", { type: "submit" }, "Show")))),
    out);
  try {
    const groups = (await queryPage("/enrollmentGroups/query", null)).items;
    groupSelect.replaceChildren(h("option", { value: "" }, "choose a group"),
      ...groups.map((g) => h("option", { value: g.enrollmentGroupId }, g.enrollmentGroupId)));
    const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("group");
    if (wanted) { groupSelect.value = wanted; listGroup(); }
  } catch (e) { out.replaceChildren(errorBox(e)); }
}

// ----- hubs --------------------------------------------------------------------------------

async function hubsPage() {
  const writable = can("ServiceConfig");
  const tbody = h("tbody");
  const problem = h("div");
  const token = h("div");
  async function act(method, path, done) {
    problem.replaceChildren();
    try { await api(method, path); toast(done); load(); } catch (e) { problem.replaceChildren(errorBox(e)); }
  }
  async function load() {
    try {
      const hubs = (await api("GET", "/hubs")).body.value || [];
      tbody.replaceChildren(...hubs.map((hub) => {
        const path = `/hubs/${encodeURIComponent(hub.name)}`;
        return h("tr", { "data-id": hub.name },
          h("td", {}, hub.name, hub.builtIn ? h("span", { class: "muted" }, " (built in)") : null),
          h("td", {}, badge(hub.state, hub.state === "active" ? "ok" : "warn")),
          h("td", {}, badge(hub.health, hub.health === "healthy" ? "ok" : "bad")),
          h("td", {}, String(hub.allocationWeight ?? "")),
          h("td", {}, hub.location || ""),
          h("td", {}, date(hub.lastHeartbeatUtc)),
          h("td", { class: "actions" }, writable && !hub.builtIn ? [
            hub.state === "active"
              ? h("button", { class: "secondary", onclick: () => act("POST", `${path}/drain`, `${hub.name} is draining`) }, "Drain")
              : h("button", { class: "secondary", onclick: () => act("POST", `${path}/activate`, `${hub.name} is active`) }, "Activate"),
            h("button", { class: "danger", onclick: () => confirm(`Remove ${hub.name}?`) && act("DELETE", path, `${hub.name} removed`) }, "Remove"),
          ] : null));
      }));
    } catch (e) { problem.replaceChildren(errorBox(e)); }
  }
  const mint = async () => {
    try {
      const r = (await api("POST", "/hubs/joinTokens", { body: { ttlSeconds: 900 } })).body;
      token.replaceChildren(h("div", { class: "panel" },
        h("p", {}, `Join token (single use, expires ${date(r.expiresAtUtc)}). Give it to the new hub: zerotouch serve --role hub --join-token …`),
        h("pre", { id: "join-token" }, r.token)));
    } catch (e) { token.replaceChildren(errorBox(e)); }
  };
  show(h("h1", {}, "Hubs"), problem,
    writable ? h("div", { class: "row" }, h("button", { id: "mint-join-token", onclick: mint }, "Mint a join token")) : null,
    token,
    h("table", { id: "hubs" }, h("thead", {}, h("tr", {}, ["Hub", "State", "Health", "Weight", "Location", "Last heartbeat", ""].map((t) => h("th", {}, t)))), tbody));
  load();
}

// ----- issued certificates, revocation, audit ------------------------------------------------

const REASONS = ["unspecified", "keyCompromise", "caCompromise", "affiliationChanged", "superseded", "cessationOfOperation", "certificateHold", "privilegeWithdrawn"];

async function certificatesPage() {
  const writable = can("EnrollmentWrite");
  const registration = h("input", { id: "cert-registration", placeholder: "registration id" });
  const status = h("select", { id: "cert-status" }, ["", "good", "revoked"].map((s) => h("option", { value: s }, s || "any status")));
  const expiring = h("input", { type: "checkbox", id: "cert-expiring" });
  const pki = h("div", { class: "panel", id: "pki-status" }, "CRL and OCSP…");
  const out = h("div");
  const soon = Date.now() + 30 * 86400 * 1000;
  function draw() {
    const t = pagedTable({
      id: "issued", searchOf: (c) => `${c.serial} ${c.registrationId} ${c.subject}`,
      fetchPage: async (c) => {
        const page = await queryPage("/certificates/issued", c, { method: "GET", query: { registrationId: registration.value.trim(), status: status.value } });
        if (expiring.checked) page.items = page.items.filter((x) => x.status === "good" && x.notAfter * 1000 < soon);
        return page;
      },
      columns: [
        { title: "Serial", cell: (c) => h("span", { class: "mono" }, c.serial) },
        { title: "Registration", cell: (c) => c.registrationId || "" },
        { title: "Subject", cell: (c) => c.subject || "" },
        { title: "Status", cell: (c) => c.status === "revoked" ? badge(`revoked (${c.reason || "unspecified"})`, "bad") : (c.notAfter * 1000 < soon ? badge("expires soon", "warn") : badge("good", "ok")) },
        { title: "Not after", cell: (c) => date(c.notAfterUtc) },
      ],
      rowActions: (c) => writable && c.status !== "revoked" ? revokeControl(c, () => draw()) : null,
    });
    out.replaceChildren(t.node);
  }
  function revokeControl(c, done) {
    const reason = h("select", { class: "revoke-reason" }, REASONS.map((r) => h("option", { value: r }, r)));
    const go = async () => {
      if (!confirm(`Revoke ${c.serial} (${reason.value})?`)) return;
      try {
        await api("POST", `/certificates/issued/${encodeURIComponent(c.serial)}/revoke`, { body: { reason: reason.value } });
        toast(`${c.serial} revoked`);
        done();
        loadPki();
      } catch (e) { out.prepend(errorBox(e)); }
    };
    return [reason, h("button", { class: "danger revoke", onclick: go }, "Revoke")];
  }
  async function loadPki() {
    try {
      const p = (await api("GET", "/console/pki")).body;
      pki.replaceChildren(
        h("strong", {}, "CRL "), `#${p.crl.number ?? "?"}: ${p.crl.revokedCount} revoked, signed ${date(p.crl.thisUpdateUtc)}, next update ${date(p.crl.nextUpdateUtc)}. `,
        p.crl.url ? h("a", { href: p.crl.url }, "Download") : null,
        h("br"), h("strong", {}, "OCSP "), p.ocsp.url ? `responder at ${p.ocsp.url}; it answers from the same records as this list.` : "responder not published yet");
    } catch (e) { pki.replaceChildren(errorBox(e)); }
  }
  const filters = h("form", { class: "panel row", onsubmit: (e) => { e.preventDefault(); draw(); } },
    h("label", {}, "Registration", registration), h("label", {}, "Status", status),
    h("label", {}, "Expiring within 30 days", expiring), h("button", { type: "submit" }, "Filter"));
  show(h("h1", {}, "Issued certificates"), pki, filters, out);
  loadPki();
  draw();
}

async function auditPage() {
  const action = h("select", { id: "audit-action" }, ["", "issue", "renew", "revoke"].map((s) => h("option", { value: s }, s || "any action")));
  const registration = h("input", { id: "audit-registration", placeholder: "registration id" });
  const serial = h("input", { id: "audit-serial", placeholder: "serial (hex)" });
  const out = h("div");
  function draw() {
    const t = pagedTable({
      id: "audit", searchOf: (e) => JSON.stringify(e),
      fetchPage: (c) => queryPage("/audit", c, { method: "GET", query: { action: action.value, registrationId: registration.value.trim(), serial: serial.value.trim() } }),
      columns: [
        { title: "When", cell: (e) => date(e.at) },
        { title: "Action", cell: (e) => badge(e.action, e.action === "revoke" ? "bad" : "") },
        { title: "Actor", cell: (e) => e.actor || "" },
        { title: "Registration", cell: (e) => e.registrationId || "" },
        { title: "Serial", cell: (e) => h("span", { class: "mono" }, e.serial || "") },
        { title: "Reason", cell: (e) => e.reason || "" },
        { title: "Detail", cell: (e) => e.detail ? (typeof e.detail === "string" ? e.detail : JSON.stringify(e.detail)) : "" },
      ],
    });
    out.replaceChildren(t.node);
  }
  show(h("h1", {}, "Audit log"),
    h("form", { class: "panel row", onsubmit: (e) => { e.preventDefault(); draw(); } },
      h("label", {}, "Action", action), h("label", {}, "Registration", registration), h("label", {}, "Serial", serial),
      h("button", { type: "submit" }, "Filter")),
    out);
  draw();
}

// ----- devices and twins -------------------------------------------------------------------

async function devicesPage() {
  const query = h("input", { id: "device-query", size: 70, value: "SELECT * FROM devices" });
  const out = h("div");
  const run = async (event) => {
    if (event) event.preventDefault();
    out.replaceChildren(h("p", { class: "muted" }, "Querying…"));
    try {
      const r = await api("POST", "/devices/query", { hub: true, body: { query: query.value }, headers: { "x-ms-max-item-count": "100" } });
      const rows = Array.isArray(r.body) ? r.body : [];
      // Whole twins get a table; a projection (SELECT deviceId, tags.x …) is shown as it came.
      const twins = !rows.length || rows.every((d) => d.deviceId && d.properties);
      if (!twins) {
        out.replaceChildren(h("pre", { id: "query-result" }, JSON.stringify(rows, null, 2)));
        return;
      }
      out.replaceChildren(h("table", { id: "devices" },
        h("thead", {}, h("tr", {}, ["Device", "Status", "Connection", "Last activity", "Tags"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows.map((d) => h("tr", { "data-id": d.deviceId },
          h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.deviceId)}` }, d.deviceId)),
          h("td", {}, badge(d.status || "", d.status === "enabled" ? "ok" : "bad")),
          h("td", {}, badge(d.connectionState || "", d.connectionState === "Connected" ? "ok" : "")),
          h("td", {}, date(d.lastActivityTime)),
          h("td", {}, d.tags ? JSON.stringify(d.tags) : ""))))),
        rows.length ? null : h("p", { class: "muted" }, "No device matches."));
    } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  show(h("h1", {}, "Devices"),
    h("form", { class: "panel row", onsubmit: run },
      h("label", {}, "Query (the twin query language)", query), h("button", { type: "submit", id: "run-query" }, "Run")),
    out);
  run();
}

async function devicePage(id) {
  const writable = can("ServiceConnect");
  const twinBox = h("div");
  const desired = h("textarea", { id: "desired", rows: 6 });
  const methodName = h("input", { id: "method-name", placeholder: "method name" });
  const methodPayload = h("textarea", { id: "method-payload", rows: 3 }, "{}");
  const methodOut = h("div");
  const c2dBody = h("textarea", { id: "c2d-body", rows: 3 }, "{\"hello\": \"device\"}");
  const c2dOut = h("div");
  const chart = h("div", { class: "chart", id: "telemetry-chart" });
  let twin = null;
  async function loadTwin() {
    try {
      twin = (await api("GET", `/twins/${encodeURIComponent(id)}`, { hub: true })).body;
      desired.value = JSON.stringify((twin.properties && twin.properties.desired) || {}, (k, v) => (k.startsWith("$") ? undefined : v), 2);
      twinBox.replaceChildren(h("pre", { id: "twin" }, JSON.stringify(twin, null, 2)));
    } catch (e) { twinBox.replaceChildren(errorBox(e)); }
  }
  const saveDesired = async () => {
    let patch;
    try { patch = JSON.parse(desired.value); } catch (e) { twinBox.prepend(errorBox({ message: "not JSON: " + e.message })); return; }
    try {
      await api("PATCH", `/twins/${encodeURIComponent(id)}`, { hub: true, body: { properties: { desired: patch } }, headers: { "If-Match": twin.etag || "*" } });
      toast("desired properties sent");
      loadTwin();
    } catch (e) {
      twinBox.prepend(e.status === 412 ? h("div", { class: "error" }, "The twin changed since you loaded it: reload it and edit again.") : errorBox(e));
    }
  };
  const invoke = async () => {
    methodOut.replaceChildren();
    let payload;
    try { payload = JSON.parse(methodPayload.value || "null"); } catch (e) { methodOut.replaceChildren(errorBox({ message: "not JSON: " + e.message })); return; }
    try {
      const r = await api("POST", `/twins/${encodeURIComponent(id)}/methods`, { hub: true, body: { methodName: methodName.value, payload, responseTimeoutInSeconds: 20 } });
      methodOut.replaceChildren(h("pre", { id: "method-result" }, JSON.stringify(r.body, null, 2)));
    } catch (e) { methodOut.replaceChildren(errorBox(e)); }
  };
  const sendC2d = async () => {
    c2dOut.replaceChildren();
    try {
      const r = await api("POST", `/devices/${encodeURIComponent(id)}/messages/deviceBound`, { hub: true, body: c2dBody.value, headers: { "Content-Type": "application/json" } });
      c2dOut.replaceChildren(h("p", { id: "c2d-result" }, `queued as ${r.headers.get("iothub-messageid") || "a message"}`));
    } catch (e) { c2dOut.replaceChildren(errorBox(e)); }
  };
  async function loadTelemetry() {
    try {
      // The latest messages: read forwards from an offset near the end.
      const first = (await api("GET", "/messages/events", { hub: true, query: { deviceId: id, limit: 1000 } })).body;
      let messages = first.messages;
      let next = first.nextOffset;
      for (let i = 0; i < 20 && messages.length === 1000; i++) {
        const r = (await api("GET", "/messages/events", { hub: true, query: { deviceId: id, from: next, limit: 1000 } })).body;
        if (!r.messages.length) break;
        messages = messages.concat(r.messages).slice(-1000);
        next = r.nextOffset;
      }
      drawTelemetry(messages.slice(-200));
    } catch (e) { chart.replaceChildren(errorBox(e)); }
  }
  function drawTelemetry(messages) {
    const series = {};
    for (const m of messages) {
      let body;
      try { body = JSON.parse(atob(m.body)); } catch (_) { continue; }
      if (!body || typeof body !== "object") continue;
      for (const [k, v] of Object.entries(body)) {
        if (typeof v === "number" && isFinite(v)) (series[k] = series[k] || []).push([Date.parse(m.enqueuedTimeUtc), v]);
      }
    }
    // One small chart per numeric field, each on its own scale.
    const names = Object.keys(series).slice(0, 6);
    chart.replaceChildren(...(names.length
      ? names.map((n) => h("div", {}, h("h3", { class: "muted" }, n), lineChart([{ name: n, points: series[n] }], { id: `telemetry-${n}` })))
      : [h("p", { class: "muted" }, `No numeric telemetry from ${id} yet (${messages.length} messages read).`)]));
  }
  show(h("h1", {}, `Device ${id}`),
    h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h2", {}, "Telemetry"), chart,
        h("div", { class: "row" }, h("button", { class: "secondary", id: "refresh-telemetry", onclick: loadTelemetry }, "Refresh"))),
      h("div", { class: "panel" }, h("h2", {}, "Twin"), twinBox,
        h("label", {}, "Desired properties", desired),
        writable ? h("div", { class: "row" }, h("button", { id: "save-desired", onclick: saveDesired }, "Update desired")) : null),
      writable ? h("div", { class: "panel" }, h("h2", {}, "Direct method"),
        h("div", { class: "row" }, h("label", {}, "Method", methodName)), h("label", {}, "Payload (JSON)", methodPayload),
        h("div", { class: "row" }, h("button", { id: "invoke", onclick: invoke }, "Invoke")), methodOut) : null,
      writable ? h("div", { class: "panel" }, h("h2", {}, "Cloud-to-device message"),
        h("label", {}, "Body", c2dBody),
        h("div", { class: "row" }, h("button", { id: "send-c2d", onclick: sendC2d }, "Send")), c2dOut) : null));
  loadTwin();
  loadTelemetry();
}

// ----- charts ------------------------------------------------------------------------------

const COLORS = ["#1f6feb", "#d9480f", "#2e7d32", "#8e24aa", "#00838f", "#6d4c41"];

// A line chart of series [{ name, points: [[timeMs, value], …] }], drawn as SVG.
function lineChart(series, { id, unit }) {
  const W = 800, H = 220, L = 56, R = 12, T = 12, B = 28;
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(...ys);
  if (!(x1 > x0)) { x0 -= 1000; x1 += 1000; }
  if (!(y1 > y0)) { y1 = y0 + 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const fmt = (v) => Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(3)).toString();
  const time = (t) => new Date(t).toISOString().slice(11, 19);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", id: `${id}-svg` },
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svg("text", { x: L - 6, y: T + 8, "text-anchor": "end" }, fmt(y1)),
    svg("text", { x: L - 6, y: H - B, "text-anchor": "end" }, fmt(y0)),
    svg("text", { x: L, y: H - 8 }, time(x0)),
    svg("text", { x: W - R, y: H - 8, "text-anchor": "end" }, time(x1)),
    unit ? svg("text", { x: W - R, y: T + 8, "text-anchor": "end" }, unit) : null,
    series.map((s, i) => svg("polyline", {
      class: "line", stroke: COLORS[i % COLORS.length], "data-series": s.name, "data-points": s.points.length,
      points: s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
    })));
  const legend = h("div", { class: "legend" }, series.map((s, i) => {
    const swatch = h("i");
    swatch.style.background = COLORS[i % COLORS.length]; // CSSOM, which the CSP allows
    return h("span", {}, swatch, `${s.name} (${s.points.length})`);
  }));
  return h("div", {}, root, legend);
}

// ----- overview: live rates ----------------------------------------------------------------

async function overviewPage() {
  const regs = h("div", { class: "chart", id: "registrations-chart" });
  const tele = h("div", { class: "chart", id: "telemetry-rate-chart" });
  const facts = h("div", { class: "panel", id: "facts" });
  async function load() {
    try {
      const r = (await api("GET", "/console/rates")).body;
      const pts = r.points;
      if (!pts.length) {
        const wait = `The first figures arrive ${r.intervalSeconds} seconds after the server starts.`;
        regs.replaceChildren(h("p", { class: "muted" }, wait));
        tele.replaceChildren(h("p", { class: "muted" }, wait));
        return;
      }
      regs.replaceChildren(lineChart([
        { name: "registrations/s", points: pts.map((p) => [p.at, p.registrationsPerSecond]) },
        { name: "not assigned/s", points: pts.map((p) => [p.at, p.failedRegistrationsPerSecond]) },
      ], { id: "registrations", unit: "per second" }));
      tele.replaceChildren(lineChart([
        { name: "telemetry messages/s", points: pts.map((p) => [p.at, p.telemetryPerSecond]) },
      ], { id: "telemetry-rate", unit: "per second" }));
    } catch (e) { regs.replaceChildren(errorBox(e)); }
  }
  facts.replaceChildren(
    h("div", {}, "Signed in as ", h("strong", {}, session.principal), ` until ${date(session.expiresUtc)}`),
    h("div", {}, "Rights: ", session.rights.join(", ")),
    h("div", {}, `ID scope ${session.idScope}; this process runs ${[session.runsProvisioning && "provisioning", session.runsHub && "a hub"].filter(Boolean).join(" and ") || "nothing"}.`));
  show(h("h1", {}, "Overview"), facts,
    h("div", { class: "grid" },
      h("div", { class: "panel" }, h("h2", {}, "Registrations per second, last hour"), regs),
      h("div", { class: "panel" }, h("h2", {}, "Telemetry per second, last hour"), tele)));
  await load();
  clearInterval(overviewPage.timer);
  overviewPage.timer = setInterval(() => {
    if (location.hash.startsWith("#/overview") || location.hash === "") load();
    else clearInterval(overviewPage.timer);
  }, 10000);
}

// ----- routing -----------------------------------------------------------------------------

const PAGES = {
  overview: overviewPage,
  groups: () => enrollmentPage("group"),
  enrollments: () => enrollmentPage("individual"),
  cas: casPage,
  registrations: registrationsPage,
  hubs: hubsPage,
  certificates: certificatesPage,
  audit: auditPage,
  devices: devicesPage,
  device: (id) => devicePage(id),
};

function route() {
  if (!session) { renderSignIn(); return; }
  const [name, ...rest] = location.hash.replace(/^#\//, "").split("?")[0].split("/");
  const page = PAGES[name] || PAGES.overview;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("current", a.getAttribute("href") === `#/${name}`);
  document.body.dataset.page = PAGES[name] ? name : "overview";
  Promise.resolve(page(decodeURIComponent(rest.join("/")))).catch((e) => show(errorBox(e)));
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  await loadSession();
  route();
});
