// Roost web app: plain JavaScript, no framework, nothing fetched but this broker.
// The page speaks docs/PROTOCOL.md over one WebSocket (docs/WEB.md): it sends the
// same request envelopes an MQTT client publishes on roost/req/<client id> and gets
// {topic, payload} frames: responses, mailbox events, presence, telemetry.
// Every text a person or device wrote is put on the page with textContent only.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_I53 = 9007199254740991;
  const PAGE = 50;                    // messages per history page
  const RECEIPT_WINDOW = 1000;        // recent mailbox events read for delivered/read marks
  const CHART_POINTS = 360;
  const CHART_SPAN = 3600;            // seconds of telemetry a chart shows

  const state = {
    me: null, name: "", csrf: "", clientId: null, ws: null, wsOpen: false, signedOut: false,
    filesHttp: false, nextId: 1, pending: new Map(), highestN: 0, ackedN: 0, ackTimer: null,
    convs: new Map(), total: 0, contacts: new Map(), incoming: [], outgoing: [], blocked: [], presence: new Map(),
    devices: new Map(), series: new Map(), receipts: new Map(), current: null, thread: null,
    commands: new Map(), deviceEvents: new Map(), fileUrls: new Map(), retry: 1000, reading: false,
    groupInfo: null,
  };

  // ---- small DOM helpers (text only) ----------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === "text") node.textContent = String(v);
        else if (k === "class") node.className = v;
        else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function say(id, text) { $(id).textContent = text || ""; }
  function fmtTime(ts) {
    if (!ts) return "";
    const d = new Date(ts * 1000);
    const now = new Date();
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
  }
  function fmtSize(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }
  function cmid() {
    const a = new Uint8Array(8);
    crypto.getRandomValues(a);
    return "web-" + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function nameOf(id) {
    if (id === state.me) return state.name || id;
    const c = state.contacts.get(id) || state.devices.get(id);
    return c && c.name ? c.name : id;
  }
  function presenceText(p) {
    if (!p) return "";
    if (p.state === "online") return "online";
    return p.last_seen ? `last seen ${fmtTime(p.last_seen)}` : "never seen";
  }
  function dot(p, extra) {
    const online = p && p.state === "online";
    return el("span", { class: `dot${online ? " online" : ""}${extra ? " " + extra : ""}`,
      title: presenceText(p), "aria-hidden": "true" });
  }
  function errText(err) { return err && err.message ? err.message : String(err); }

  // ---- HTTP: session, sign-in, sign-out ------------------------------------------------
  async function api(path, body) {
    const r = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: body === undefined ? {} : { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin", cache: "no-store",
    });
    let doc = {};
    try { doc = await r.json(); } catch (e) { doc = {}; }
    if (!r.ok) throw new Error(doc.error || `HTTP ${r.status}`);
    return doc;
  }

  async function boot() {
    let doc;
    try { doc = await api("/api/session"); } catch (e) { showSignin(errText(e)); return; }
    state.csrf = doc.csrf;
    if (doc.user) start(doc); else showSignin("");
  }

  function showSignin(message) {
    state.signedOut = true;
    $("app").hidden = true;
    $("signin").hidden = false;
    say("signin-error", message);
    $("user").focus();
  }

  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const user = $("user").value.trim();
    const password = $("password").value;
    $("password").value = "";            // not kept anywhere once sent
    $("signin-button").disabled = true;
    say("signin-error", "");
    try {
      if (!state.csrf) state.csrf = (await api("/api/session")).csrf;
      const doc = await api("/api/login", { user, password });
      start(doc);
    } catch (e) {
      say("signin-error", errText(e));
      try { state.csrf = (await api("/api/session")).csrf; } catch (e2) { /* shown above */ }
      $("password").focus();
    } finally {
      $("signin-button").disabled = false;
    }
  });

  $("logout").addEventListener("click", async () => {
    state.signedOut = true;
    try { await api("/api/logout", {}); } catch (e) { /* the session may be gone already */ }
    if (state.ws) state.ws.close();
    resetState();
    try { state.csrf = (await api("/api/session")).csrf; } catch (e) { /* next submit retries */ }
    showSignin("Signed out.");
  });

  function resetState() {
    for (const url of state.fileUrls.values()) if (url.startsWith("blob:")) URL.revokeObjectURL(url);
    Object.assign(state, {
      me: null, clientId: null, ws: null, wsOpen: false, highestN: 0, ackedN: 0, current: null, thread: null,
      convs: new Map(), total: 0, contacts: new Map(), incoming: [], outgoing: [], blocked: [], presence: new Map(),
      devices: new Map(), series: new Map(), receipts: new Map(), commands: new Map(), deviceEvents: new Map(),
      fileUrls: new Map(), groupInfo: null,
    });
    for (const p of state.pending.values()) p.reject(new Error("signed out"));
    state.pending.clear();
  }

  function start(doc) {
    state.me = doc.user;
    state.name = doc.name || doc.user;
    state.csrf = doc.csrf;
    state.signedOut = false;
    $("signin").hidden = true;
    $("app").hidden = false;
    say("me", `${state.name} (${state.me})`);
    connect();
  }

  // ---- the WebSocket -----------------------------------------------------------------
  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws?csrf=${encodeURIComponent(state.csrf)}`);
    state.ws = ws;
    ws.addEventListener("message", (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(frame);
    });
    ws.addEventListener("close", () => {
      if (state.ws !== ws) return;
      state.wsOpen = false;
      for (const p of state.pending.values()) p.reject(new Error("connection lost"));
      state.pending.clear();
      if (state.signedOut) return;
      say("link-state", "offline: reconnecting…");
      setTimeout(reconnect, state.retry);
      state.retry = Math.min(state.retry * 2, 15000);
    });
  }

  async function reconnect() {
    if (state.signedOut) return;
    try {
      const doc = await api("/api/session");
      if (!doc.user) { resetState(); state.csrf = doc.csrf; showSignin("Your session ended: sign in again."); return; }
      state.csrf = doc.csrf;
      connect();
    } catch (e) {
      setTimeout(reconnect, state.retry);
      state.retry = Math.min(state.retry * 2, 15000);
    }
  }

  function request(op, params) {
    return new Promise((resolve, reject) => {
      if (!state.ws || !state.wsOpen) { reject(new Error("not connected")); return; }
      const id = `w${state.nextId++}`;
      const timer = setTimeout(() => {
        state.pending.delete(id);
        reject(new Error(`${op}: no answer`));
      }, 30000);
      state.pending.set(id, {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      state.ws.send(JSON.stringify(Object.assign({ id, op }, params || {})));
    });
  }

  function onFrame(frame) {
    const topic = String(frame.topic || "");
    const payload = frame.payload;
    if (topic === "roost/web/hello") {
      state.clientId = payload.client_id;
      state.filesHttp = Boolean(payload.files);
      state.wsOpen = true;
      state.retry = 1000;
      say("link-state", "");
      loadAll();
    } else if (topic.startsWith("roost/resp/")) {
      const p = state.pending.get(payload.id);
      if (!p) return;
      state.pending.delete(payload.id);
      if (payload.ok) p.resolve(payload.result);
      else p.reject(Object.assign(new Error(payload.error.message), { code: payload.error.code }));
    } else if (topic.startsWith("roost/inbox/")) {
      onEvent(payload);
    } else if (topic.startsWith("roost/presence/")) {
      state.presence.set(topic.slice("roost/presence/".length), payload);
      renderPresence();
    } else if (topic === "roost/web/devices") {
      loadDevices().catch(() => {});
    } else if (topic.startsWith("roost/telemetry/")) {
      onTelemetry(topic.slice("roost/telemetry/".length), payload);
    }
  }

  function scheduleAck() {
    if (state.ackTimer) return;
    state.ackTimer = setTimeout(async () => {
      state.ackTimer = null;
      const n = state.highestN;
      if (n <= state.ackedN) return;
      try { await request("ack", { n }); state.ackedN = Math.max(state.ackedN, n); } catch (e) { /* next event retries */ }
    }, 300);
  }

  // ---- loading ---------------------------------------------------------------------
  async function loadAll() {
    try {
      await Promise.all([loadContacts(), loadDevices(), loadProfile()]);
      await loadConvs();
      await loadReceipts();
      if (state.current) await openConv(state.current, { keepPane: true });
    } catch (e) {
      say("composer-error", errText(e));
    }
  }

  async function loadConvs() {
    const r = await request("convs");
    state.convs = new Map(r.convs.map((c) => [c.conv, c]));
    state.total = r.total_unread;
    renderConvs();
  }

  async function loadContacts() {
    const r = await request("contacts");
    state.contacts = new Map(r.contacts.map((c) => [c.id, c]));
    for (const c of r.contacts) state.presence.set(c.id, c.presence);
    state.incoming = r.incoming || [];
    state.outgoing = r.outgoing || [];
    state.blocked = r.blocked || [];
    for (const select of document.querySelectorAll("select.share-with")) fillShareOptions(select);
    renderPeople();
    renderConvs();
  }

  async function loadProfile() {
    const p = await request("profile.get");
    state.name = p.name;
    $("profile-name").value = p.name;
    $("profile-status").value = p.status || "";
    say("me", `${p.name} (${state.me})`);
  }

  // delivered/read marks: the receipts among the newest mailbox events
  async function loadReceipts() {
    const head = await request("sync", { after: MAX_I53, limit: 1 }).catch(() => null);
    const last = head ? head.last : 0;
    let after = Math.max(0, last - RECEIPT_WINDOW);
    for (let i = 0; i < 5; i++) {
      const r = await request("sync", { after, limit: 1000 });
      for (const ev of r.events) if (ev.kind === "delivered" || ev.kind === "read") noteReceipt(ev);
      if (!r.more) break;
      after = r.last;
    }
    if (state.thread) renderMarks();
  }

  function noteReceipt(ev) {
    let r = state.receipts.get(ev.conv);
    if (!r) { r = { delivered: new Map(), read: new Map() }; state.receipts.set(ev.conv, r); }
    const who = ev.kind === "read" ? ev.by : ev.to;
    const map = ev.kind === "read" ? r.read : r.delivered;
    map.set(who, Math.max(map.get(who) || 0, ev.seq));
  }

  // ---- mailbox events -------------------------------------------------------------
  function onEvent(ev) {
    if (typeof ev.n === "number") {
      if (ev.n <= state.highestN) return;       // a re-push after a reconnect
      state.highestN = ev.n;
      scheduleAck();
    }
    switch (ev.kind) {
      case "msg": onMessage(ev); break;
      case "unread": {
        const c = state.convs.get(ev.conv);
        state.total = ev.total;
        if (c) { c.unread = ev.count; renderConvs(); } else loadConvs().catch(() => {});
        break;
      }
      case "delivered": case "read":
        noteReceipt(ev);
        if (state.current === ev.conv) renderMarks();
        break;
      case "contact":
        loadContacts().catch(() => {});
        if (ev.event === "accepted") loadDevices().catch(() => {});
        break;
      case "group":
        loadConvs().catch(() => {});
        if (state.current === ev.conv) {
          const gone = (ev.event === "removed" || ev.event === "left") && (ev.members || []).includes(state.me);
          if (gone) closeThread(); else loadMembers().catch(() => {});
        }
        break;
      case "dropped":
        loadAll();
        break;
      default: break;
    }
  }

  function onMessage(m) {
    const c = state.convs.get(m.conv);
    if (!c) {
      loadConvs().catch(() => {});
    } else {
      c.last = m;
      c.last_seq = Math.max(c.last_seq || 0, m.seq);
      renderConvs();
    }
    if (state.devices.has(m.from)) onDeviceMessage(m);
    if (state.thread && state.current === m.conv) {
      addMessages([m], "append");
      markRead();
    }
  }

  // ---- conversations ---------------------------------------------------------------
  function convTitle(c) {
    if (c.kind === "group") return c.name || c.conv;
    return nameOf(c.peer);
  }

  function dmOf(peer) {
    const [a, b] = [state.me, peer].sort();
    return `dm:${a}:${b}`;
  }

  function lastLine(m) {
    if (!m) return "";
    const who = m.from === state.me ? "You: " : "";
    return who + bodySummary(m.body);
  }

  function bodySummary(b) {
    if (!b || typeof b !== "object") return "";
    switch (b.type) {
      case "text": return String(b.text);
      case "file": return `[file] ${b.name}`;
      case "command": return `command ${b.name}`;
      case "result": return `result: ${b.status}`;
      case "event": return `event ${b.name}`;
      default: return `[${b.type}]`;
    }
  }

  function renderConvs() {
    const list = $("convs");
    const focusedConv = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.conv : null;
    clear(list);
    const convs = Array.from(state.convs.values());
    convs.sort((a, b) => ((b.last && b.last.ts) || 0) - ((a.last && a.last.ts) || 0));
    for (const c of convs) {
      const unread = c.unread || 0;
      const title = convTitle(c);
      const badge = el("span", { class: "badge", "aria-label": `${unread} unread`, "data-unread": unread,
        text: unread }, );
      badge.hidden = unread === 0;
      const btn = el("button", {
        type: "button", class: "conv-item", "data-conv": c.conv,
        "aria-current": state.current === c.conv ? "true" : "false",
        onclick: () => openConv(c.conv),
      },
      c.kind === "group" ? dot(null, "group") : dot(state.presence.get(c.peer)),
      el("span", { class: "conv-main" }, el("span", { class: "conv-name", text: title }),
        el("span", { class: "conv-last", text: lastLine(c.last) })),
      badge);
      list.append(el("li", { "data-conv": c.conv, "data-unread": unread }, btn));
      if (focusedConv === c.conv) btn.focus();
    }
    $("convs-empty").hidden = convs.length > 0;
    const total = state.total || 0;
    say("convs-total", total ? `(${total} unread)` : "");
    $("convs-total").dataset.total = total;
    const badge = $("total-unread");
    badge.textContent = total;
    badge.hidden = total === 0;
    badge.setAttribute("aria-label", `${total} unread in all`);
  }

  function closeThread() {
    state.current = null;
    state.thread = null;
    clear($("messages"));
    say("thread-title", "Pick a conversation");
    say("thread-presence", "");
    $("members-toggle").hidden = true;
    $("members").hidden = true;
    setComposer(false);
    $("view-chat").dataset.pane = "list";
    renderConvs();
  }

  function setComposer(on) {
    $("message").disabled = !on;
    $("send").disabled = !on;
    $("attach").disabled = !on;
  }

  async function openConv(conv, opts) {
    const keepPane = opts && opts.keepPane;
    state.current = conv;
    const thread = { conv, bySeq: new Map(), oldest: null, newest: 0, more: true, loading: true };
    state.thread = thread;
    clear($("messages"));
    say("composer-error", "");
    setComposer(true);
    renderThreadHead();
    renderConvs();
    if (!keepPane) showView("chat");
    $("view-chat").dataset.pane = "thread";
    const c = state.convs.get(conv);
    if (c && c.kind === "group") loadMembers().catch(() => {});
    try {
      const r = await request("history", { conv, limit: PAGE });
      if (state.thread !== thread) return;
      thread.more = r.more;
      addMessages(r.messages, "append");
    } catch (e) {
      if (e.code !== "not_found" && e.code !== "forbidden") say("composer-error", errText(e));
      thread.more = false;
    } finally {
      thread.loading = false;
    }
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
    markRead();
    if (!keepPane) $("message").focus();
    fillPane(thread);
  }

  function renderThreadHead() {
    const conv = state.current;
    if (!conv) return;
    const c = state.convs.get(conv);
    const isGroup = conv.startsWith("grp:");
    const peer = !isGroup ? conv.split(":").slice(1).find((p) => p !== state.me) || state.me : null;
    say("thread-title", c ? convTitle(c) : (peer ? nameOf(peer) : conv));
    say("thread-presence", peer ? presenceText(state.presence.get(peer)) : "");
    $("members-toggle").hidden = !isGroup;
    if (!isGroup) $("members").hidden = true;
  }

  async function loadOlder() {
    const t = state.thread;
    if (!t || t.loading || !t.more || t.oldest === null) return;
    t.loading = true;
    const box = $("messages");
    try {
      const r = await request("history", { conv: t.conv, before: t.oldest, limit: PAGE });
      if (state.thread !== t) return;
      const before = box.scrollHeight;
      t.more = r.more;
      addMessages(r.messages, "prepend");
      box.scrollTop += box.scrollHeight - before;   // the message in view stays in view
    } catch (e) {
      say("composer-error", errText(e));
    } finally {
      t.loading = false;
    }
  }

  // a page that does not fill the pane cannot be scrolled: load older ones until it does
  async function fillPane(t) {
    const box = $("messages");
    for (let i = 0; i < 20 && state.thread === t && t.more && !t.loading && t.oldest !== null
      && box.scrollHeight <= box.clientHeight + 40; i++) {
      const oldest = t.oldest;
      await loadOlder();
      if (t.oldest === oldest) break;     // nothing older came (an error is shown)
    }
  }

  $("messages").addEventListener("scroll", () => {
    if ($("messages").scrollTop < 80) loadOlder();
  });

  function addMessages(messages, where) {
    const t = state.thread;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
    const fresh = messages.filter((m) => !t.bySeq.has(m.seq)).sort((a, b) => a.seq - b.seq);
    if (!fresh.length) return;
    const nodes = fresh.map((m) => { t.bySeq.set(m.seq, m); return renderMessage(m); });
    if (where === "prepend") {
      box.prepend(...nodes);
    } else {
      // pushes arrive in order; a late page never goes below a newer message
      for (const node of nodes) {
        const seq = Number(node.dataset.seq);
        let after = null;
        for (const li of box.children) if (Number(li.dataset.seq) > seq) { after = li; break; }
        box.insertBefore(node, after);
      }
    }
    for (const m of fresh) {
      t.oldest = t.oldest === null ? m.seq : Math.min(t.oldest, m.seq);
      t.newest = Math.max(t.newest, m.seq);
    }
    if (where === "append" && atBottom) box.scrollTop = box.scrollHeight;
    renderMarks();
  }

  function renderMessage(m) {
    const mine = m.from === state.me;
    const li = el("li", { class: `msg${mine ? " mine" : ""}`, "data-seq": m.seq, "data-from": m.from });
    if (!mine) li.append(el("div", { class: "msg-from", text: nameOf(m.from) }));
    li.append(renderBody(m.body));
    const meta = el("div", { class: "msg-meta" }, el("time", { text: fmtTime(m.ts) }));
    if (mine) meta.append(" ", el("span", { class: "mark", "data-mark": "sent", text: "✓ sent" }));
    li.append(meta);
    return li;
  }

  function renderBody(b) {
    if (!b || typeof b !== "object") return el("div", { class: "msg-text", text: String(b) });
    switch (b.type) {
      case "text": return el("div", { class: "msg-text", text: String(b.text) });
      case "command":
        return el("div", { class: "msg-text", text: `▶ ${b.name} ${b.args ? JSON.stringify(b.args) : ""}` });
      case "result":
        return el("div", { class: "msg-text",
          text: `↩ result for #${b.for}: ${b.status}${b.data ? " " + JSON.stringify(b.data) : ""}` });
      case "event":
        return el("div", { class: "msg-text", text: `● ${b.name}${b.data ? " " + JSON.stringify(b.data) : ""}` });
      case "file": return renderFile(b);
      default: return el("div", { class: "msg-text", text: JSON.stringify(b) });
    }
  }

  // ---- pictures and files ---------------------------------------------------------
  function renderFile(b) {
    const box = el("div", { class: "msg-file" });
    const label = `${b.name} (${fmtSize(Number(b.size) || 0)})`;
    const isImage = /^image\/(png|jpeg|gif|webp)$/.test(String(b.media_type));
    if (isImage) {
      const img = el("img", { alt: String(b.name), "data-file": b.id });
      box.append(img, el("div", { class: "muted", text: label }));
      fileUrl(b).then((url) => { img.src = url; }).catch((e) => { img.alt = `${b.name}: ${errText(e)}`; });
    } else {
      const link = el("a", { href: "#", download: String(b.name), text: `⬇ ${label}` });
      link.addEventListener("click", async (ev) => {
        if (link.dataset.ready) return;
        ev.preventDefault();
        try {
          link.href = await fileUrl(b);
          link.dataset.ready = "1";
          link.click();
        } catch (e) { link.textContent = `${label}: ${errText(e)}`; }
      });
      box.append(link);
    }
    return box;
  }

  async function fileUrl(b) {
    const known = state.fileUrls.get(b.id);
    if (known) return known;
    if (state.filesHttp) {
      const url = `/files/${encodeURIComponent(b.id)}`;
      state.fileUrls.set(b.id, url);
      return url;
    }
    // through the gateway, chunk by chunk (file.download), into a blob the page owns
    const parts = [];
    let offset = 0;
    for (;;) {
      const r = await request("file.download", { file: b.id, offset });
      const bin = atob(r.data);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      parts.push(bytes);
      offset += bytes.length;
      if (r.eof || !bytes.length) break;
    }
    const url = URL.createObjectURL(new Blob(parts, { type: b.media_type }));
    state.fileUrls.set(b.id, url);
    return url;
  }

  function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(s);
  }

  // A big file is more chunks than the request rate's burst: wait and resend (same offset) when limited.
  async function patiently(call) {
    for (let wait = 200; ; wait = Math.min(wait * 2, 3000)) {
      try { return await call(); } catch (e) {
        if (e.code !== "rate_limited" && e.code !== "unavailable") throw e;
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  $("attach").addEventListener("change", async () => {
    const file = $("attach").files[0];
    if (!file || !state.current) return;
    say("composer-error", `Sending ${file.name}…`);
    try {
      const up = await request("file.upload", { name: file.name, media_type: file.type || "application/octet-stream",
        size: file.size });
      let offset = 0;
      while (offset < file.size) {
        const slice = new Uint8Array(await file.slice(offset, offset + up.chunk_size).arrayBuffer());
        const r = await patiently(() => request("file.chunk", { upload: up.upload, offset, data: toBase64(slice) }));
        offset = r.received;
        say("composer-error", `Sending ${file.name}… ${Math.floor((100 * offset) / file.size)}%`);
      }
      const ref = await request("file.finish", { upload: up.upload });
      await sendBody(Object.assign({ type: "file" }, ref));
      say("composer-error", "");
    } catch (e) {
      say("composer-error", `${file.name}: ${errText(e)}`);
    } finally {
      $("attach").value = "";
    }
  });

  // ---- receipts and reading -------------------------------------------------------
  function renderMarks() {
    const t = state.thread;
    if (!t) return;
    const r = state.receipts.get(t.conv);
    const maxOf = (map) => { let best = 0; if (map) for (const v of map.values()) best = Math.max(best, v); return best; };
    const readSeq = r ? maxOf(r.read) : 0;
    const deliveredSeq = Math.max(r ? maxOf(r.delivered) : 0, readSeq);
    for (const li of $("messages").children) {
      const mark = li.querySelector(".mark");
      if (!mark) continue;
      const seq = Number(li.dataset.seq);
      const kind = seq <= readSeq ? "read" : seq <= deliveredSeq ? "delivered" : "sent";
      if (mark.dataset.mark === kind) continue;
      mark.dataset.mark = kind;
      mark.className = `mark ${kind}`;
      mark.textContent = kind === "read" ? "✓✓ read" : kind === "delivered" ? "✓✓ delivered" : "✓ sent";
    }
  }

  async function markRead() {
    const t = state.thread;
    // read only what is on screen: not behind another tab, nor behind the list on a phone
    if (!t || document.visibilityState !== "visible" || state.reading || !$("messages").offsetParent) return;
    const c = state.convs.get(t.conv);
    const seq = Math.max(t.newest, c ? c.last_seq || 0 : 0);
    if (!c || seq <= 0 || (!(c.unread > 0) && (c.read || 0) >= seq)) return;
    state.reading = true;
    let again = false;
    try {
      const r = await request("read", { conv: t.conv, seq });
      c.read = r.seq;
      c.unread = r.unread;
      state.total = r.total_unread;
      renderConvs();
      again = state.thread === t && t.newest > r.seq;   // a message came in while this was asked
    } catch (e) {
      /* the unread event will tell */
    } finally {
      state.reading = false;
    }
    if (again) markRead();
  }
  document.addEventListener("visibilitychange", markRead);
  window.addEventListener("focus", markRead);

  // ---- composing ------------------------------------------------------------------
  async function sendBody(body) {
    const conv = state.current;
    const params = { cmid: cmid(), body };
    if (conv.startsWith("dm:") && !state.convs.has(conv)) {
      params.to = conv.split(":").slice(1).find((p) => p !== state.me);
    } else {
      params.conv = conv;
    }
    const r = await request("send", params);
    if (!state.convs.has(r.conv)) await loadConvs();
    return r;
  }

  $("composer").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $("message");
    const text = box.value;
    if (!text.trim() || !state.current) return;
    $("send").disabled = true;
    try {
      await sendBody({ type: "text", text });
      box.value = "";
      say("composer-error", "");
    } catch (e) {
      say("composer-error", errText(e));
    } finally {
      $("send").disabled = !state.current;
      box.focus();
    }
  });

  $("message").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });

  $("back").addEventListener("click", () => {
    $("view-chat").dataset.pane = "list";
    const btn = document.querySelector(`.conv-item[aria-current="true"]`);
    if (btn) btn.focus();
  });

  // ---- groups -----------------------------------------------------------------------
  async function loadMembers() {
    const conv = state.current;
    if (!conv || !conv.startsWith("grp:")) return;
    const info = await request("group.info", { conv });
    if (state.current !== conv) return;
    state.groupInfo = info;
    const list = $("members-list");
    clear(list);
    for (const m of info.members) {
      const li = el("li", null, dot(state.presence.get(m)), el("span", { text: `${nameOf(m)} (${m})` }));
      if (info.created_by === state.me && m !== state.me) {
        li.append(el("button", { type: "button", class: "secondary", "aria-label": `Remove ${m}`, text: "Remove",
          onclick: () => groupChange("group.remove", m) }));
      }
      list.append(li);
    }
  }

  async function groupChange(op, member) {
    say("members-error", "");
    try {
      await request(op, { conv: state.current, members: [member] });
      await loadMembers();
    } catch (e) { say("members-error", errText(e)); }
  }

  $("members-toggle").addEventListener("click", () => {
    const open = $("members").hidden;
    $("members").hidden = !open;
    $("members-toggle").setAttribute("aria-expanded", String(open));
    if (open) loadMembers().catch((e) => say("members-error", errText(e)));
  });
  $("member-add").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = $("member-id").value.trim();
    if (!id) return;
    await groupChange("group.add", id);
    $("member-id").value = "";
  });
  $("group-leave").addEventListener("click", async () => {
    try {
      await request("group.leave", { conv: state.current });
      closeThread();
      await loadConvs();
    } catch (e) { say("members-error", errText(e)); }
  });
  $("group-create").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const members = $("group-members").value.split(/[\s,]+/).filter(Boolean);
    try {
      const r = await request("group.create", { name: $("group-name").value.trim(), members });
      $("group-name").value = "";
      $("group-members").value = "";
      await loadConvs();
      await openConv(r.conv);
    } catch (e) { say("people-error", errText(e)); }
  });

  // ---- people: requests, contacts, search, profile --------------------------------
  function renderPeople() {
    const incoming = $("incoming");
    clear(incoming);
    for (const r of state.incoming) {
      incoming.append(el("li", { "data-from": r.from },
        el("span", { text: `${r.from}${r.note ? " — " + r.note : ""}` }),
        el("button", { type: "button", "aria-label": `Accept ${r.from}`, text: "Accept",
          onclick: () => people("contact.accept", { from: r.from }) }),
        el("button", { type: "button", class: "secondary", "aria-label": `Reject ${r.from}`, text: "Reject",
          onclick: () => people("contact.reject", { from: r.from }) })));
    }
    if (!state.incoming.length) incoming.append(el("li", { class: "muted", text: "No requests to you." }));
    const outgoing = $("outgoing");
    clear(outgoing);
    for (const r of state.outgoing) outgoing.append(el("li", { text: `Waiting for ${r.to} to accept` }));

    const list = $("contacts");
    const ids = $("contact-ids");
    clear(list);
    clear(ids);
    for (const c of state.contacts.values()) {
      const p = state.presence.get(c.id);
      list.append(el("li", { "data-contact": c.id }, dot(p),
        el("span", { text: `${c.name} (${c.id})` }),
        el("span", { class: "muted presence", text: presenceText(p) }),
        el("button", { type: "button", "aria-label": `Write to ${c.id}`, text: "Write",
          onclick: () => openConv(dmOf(c.id)) }),
        el("button", { type: "button", class: "secondary", "aria-label": `Remove contact ${c.id}`, text: "Remove",
          onclick: () => people("contact.remove", { user: c.id }) }),
        el("button", { type: "button", class: "secondary", "aria-label": `Block ${c.id}`, text: "Block",
          onclick: () => people("contact.block", { user: c.id }) })));
      ids.append(el("option", { value: c.id }));
    }
    if (!state.contacts.size) list.append(el("li", { class: "muted", text: "No contacts yet." }));
    for (const id of state.blocked) {
      list.append(el("li", { class: "muted", "data-blocked": id }, el("span", { text: `${id} (blocked)` }),
        el("button", { type: "button", class: "secondary", "aria-label": `Unblock ${id}`, text: "Unblock",
          onclick: () => people("contact.unblock", { user: id }) })));
    }
  }

  async function people(op, params) {
    say("people-error", "");
    try {
      const r = await request(op, params);
      await loadContacts();
      return r;
    } catch (e) { say("people-error", errText(e)); return null; }
  }

  $("search").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const results = $("results");
    clear(results);
    try {
      const r = await request("user.search", { q: $("search-q").value.trim() });
      for (const u of r.users) {
        const li = el("li", null, el("span", { text: `${u.name} (${u.id}) · ${u.kind}` }));
        if (u.kind === "user" && u.id !== state.me && !state.contacts.has(u.id)) {
          li.append(el("button", { type: "button", "aria-label": `Request ${u.id}`, text: "Request",
            onclick: () => people("contact.request", { to: u.id }) }));
        }
        results.append(li);
      }
      if (!r.users.length) results.append(el("li", { class: "muted", text: "Nobody found." }));
    } catch (e) { say("people-error", errText(e)); }
  });

  $("request").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const params = { to: $("request-to").value.trim() };
    const note = $("request-note").value.trim();
    if (note) params.note = note;
    const r = await people("contact.request", params);
    if (r) { $("request-to").value = ""; $("request-note").value = ""; }
  });

  $("profile").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const p = await request("profile.set", { name: $("profile-name").value.trim(),
        status: $("profile-status").value });
      state.name = p.name;
      say("me", `${p.name} (${state.me})`);
      say("profile-saved", "Saved.");
    } catch (e) { say("profile-saved", errText(e)); }
  });

  function renderPresence() {
    renderConvs();
    renderPeople();
    renderThreadHead();
    for (const d of state.devices.values()) {
      const card = document.querySelector(`.device[data-device="${CSS.escape(d.id)}"]`);
      if (!card) continue;
      const p = state.presence.get(d.id);
      const dotNode = card.querySelector(".dot");
      dotNode.className = `dot${p && p.state === "online" ? " online" : ""}`;
      card.querySelector(".device-presence").textContent = presenceText(p);
    }
  }

  // ---- devices ------------------------------------------------------------------------
  async function loadDevices() {
    const r = await request("devices");
    state.devices = new Map(r.devices.map((d) => [d.id, d]));
    for (const d of r.devices) state.presence.set(d.id, d.presence);
    renderDevices();
    const since = Math.floor(Date.now() / 1000 - CHART_SPAN);
    await Promise.all(r.devices.map(async (d) => {
      try {
        const h = await request("device.history", { device: d.id, since, limit: CHART_POINTS });
        const metric = chartMetric(d);
        const pts = h.points.filter((p) => typeof p.fields[metric] === "number" || typeof p.fields[metric] === "boolean")
          .map((p) => ({ ts: p.ts, v: Number(p.fields[metric]) }));
        const known = state.series.get(d.id) || [];
        // the history is written behind (telemetry.history_interval): the latest reading seeds a chart
        const t = d.last_telemetry || {};
        const latest = (typeof t[metric] === "number" || typeof t[metric] === "boolean") && typeof t.ts === "number"
          ? [{ ts: t.ts, v: Number(t[metric]) }] : [];
        state.series.set(d.id, mergePoints(mergePoints(pts, known), latest));
        drawChart(d.id);
      } catch (e) { /* no history yet */ }
      if (d.kind === "door_sensor") loadDeviceEvents(d).catch(() => {});
    }));
  }

  function mergePoints(a, b) {
    const all = a.concat(b).sort((x, y) => x.ts - y.ts);
    const out = [];
    for (const p of all) if (!out.length || p.ts > out[out.length - 1].ts) out.push(p);
    return out.slice(-CHART_POINTS);
  }

  async function loadDeviceEvents(d) {
    const r = await request("history", { conv: dmOf(d.id), limit: 20 });
    const events = r.messages.filter((m) => m.from === d.id && m.body && m.body.type === "event");
    state.deviceEvents.set(d.id, events.reverse().slice(0, 8));
    renderDeviceEvents(d.id);
  }

  function chartMetric(d) {
    const byKind = { thermostat: "temperature", light: "brightness", door_sensor: "open" };
    if (byKind[d.kind]) return byKind[d.kind];
    const t = d.last_telemetry || {};
    return Object.keys(t).find((k) => k !== "ts" && typeof t[k] === "number") || "value";
  }

  function renderDevices() {
    const cards = $("device-cards");
    clear(cards);
    for (const d of state.devices.values()) cards.append(deviceCard(d));
    $("devices-empty").hidden = state.devices.size > 0;
    for (const d of state.devices.values()) { drawChart(d.id); renderDeviceEvents(d.id); }
  }

  function deviceCard(d) {
    const p = state.presence.get(d.id);
    const metric = chartMetric(d);
    const card = el("article", { class: "device card", role: "listitem", "data-device": d.id,
      "aria-labelledby": `dev-${d.id}` },
    el("div", { class: "device-head" }, dot(p),
      el("h3", { id: `dev-${d.id}`, text: d.name || d.id }),
      el("span", { class: "muted", text: `${d.kind}${d.room ? " · " + d.room : ""} · ${d.role}` })),
    el("div", { class: "muted device-presence", text: presenceText(p) }),
    el("dl", { class: "readings" }),
    el("canvas", { class: "chart", width: 320, height: 90, role: "img", "data-metric": metric, "data-points": 0,
      "aria-label": `${metric} over the last hour` }),
    controlsFor(d),
    el("div", { class: "result", role: "status", "aria-live": "polite" }));
    if (d.kind === "door_sensor") card.append(el("ol", { class: "device-events", "aria-label": `${d.id} events` }));
    if (d.role === "owner") {
      const select = el("select", { class: "share-with", "aria-label": `Share ${d.id} with` });
      fillShareOptions(select);
      card.append(el("form", { class: "row share", onsubmit: async (ev) => {
        ev.preventDefault();
        if (!select.value) return;
        await deviceRequest(d.id, "device.share", { device: d.id, with: select.value }, `shared with ${select.value}`);
        loadDevices().catch(() => {});
      } }, select, el("button", { type: "submit", class: "secondary", text: "Share" })));
      for (const who of d.sharees || []) {
        card.append(el("div", { class: "row muted" }, el("span", { text: `shared with ${nameOf(who)}` }),
          el("button", { type: "button", class: "secondary", "aria-label": `Unshare ${d.id} from ${who}`, text: "Unshare",
            onclick: async () => {
              await deviceRequest(d.id, "device.unshare", { device: d.id, with: who }, `unshared from ${who}`);
              loadDevices().catch(() => {});
            } })));
      }
    }
    renderReadings(card, d);
    return card;
  }

  function fillShareOptions(select) {
    const chosen = select.value;
    clear(select);
    for (const c of state.contacts.values()) select.append(el("option", { value: c.id, text: c.name }));
    if (chosen && state.contacts.has(chosen)) select.value = chosen;
  }

  function controlsFor(d) {
    const box = el("div", { class: "controls" });
    if (d.kind === "light") {
      const range = el("input", { type: "range", min: 0, max: 100, step: 1, value: (d.last_telemetry || {}).brightness || 0,
        "aria-label": `${d.name || d.id} brightness` });
      range.addEventListener("change", () => command(d, "set_brightness", { brightness: Number(range.value) }));
      box.append(
        el("button", { type: "button", text: "On", "aria-label": `Turn ${d.name || d.id} on`,
          onclick: () => command(d, "turn_on", {}) }),
        el("button", { type: "button", class: "secondary", text: "Off", "aria-label": `Turn ${d.name || d.id} off`,
          onclick: () => command(d, "turn_off", {}) }),
        range);
    } else if (d.kind === "thermostat") {
      const input = el("input", { type: "number", min: 5, max: 30, step: 0.5,
        value: (d.last_telemetry || {}).setpoint || 20, "aria-label": `${d.name || d.id} set-point` });
      box.append(input, el("button", { type: "button", text: "Set", "aria-label": `Set ${d.name || d.id} set-point`,
        onclick: () => command(d, "set_setpoint", { setpoint: Number(input.value) }) }),
      el("button", { type: "button", class: "secondary", text: "Heat", onclick: () => command(d, "set_mode", { mode: "heat" }) }),
      el("button", { type: "button", class: "secondary", text: "Heating off", onclick: () => command(d, "set_mode", { mode: "off" }) }));
    } else {
      box.append(el("button", { type: "button", class: "secondary", text: "Ping", "aria-label": `Ping ${d.id}`,
        onclick: () => command(d, "ping", {}) }));
    }
    return box;
  }

  function cardOf(id) { return document.querySelector(`.device[data-device="${CSS.escape(id)}"]`); }

  function setResult(id, text) {
    const card = cardOf(id);
    if (card) card.querySelector(".result").textContent = text;
  }

  async function deviceRequest(id, op, params, done) {
    try { await request(op, params); setResult(id, done); } catch (e) { setResult(id, `${op}: ${errText(e)}`); }
  }

  async function command(d, name, args) {
    setResult(d.id, `${name}: sent…`);
    try {
      const r = await request("send", { to: d.id, cmid: cmid(), body: { type: "command", name, args } });
      state.commands.set(`${r.conv}#${r.seq}`, { device: d.id, name });
      const early = state.commands.get(`${r.conv}#${r.seq}:result`);
      if (early) showResult(d.id, name, early);
    } catch (e) { setResult(d.id, `${name}: ${errText(e)}`); }
  }

  function showResult(id, name, body) {
    const data = body.data && Object.keys(body.data).length ? ` ${JSON.stringify(body.data)}` : "";
    setResult(id, `${name}: ${body.status}${data}`);
    const card = cardOf(id);
    if (card) card.querySelector(".result").dataset.status = body.status;
  }

  function onDeviceMessage(m) {
    const b = m.body || {};
    if (b.type === "result") {
      const key = `${m.conv}#${b.for}`;
      const cmd = state.commands.get(key);
      if (cmd) showResult(cmd.device, cmd.name, b);
      else state.commands.set(`${key}:result`, b);   // the answer can beat the send's response
      if (b.status === "ok" && b.data) onTelemetry(m.from, Object.assign({ ts: m.ts }, b.data), true);
    } else if (b.type === "event") {
      const list = state.deviceEvents.get(m.from) || [];
      list.unshift(m);
      state.deviceEvents.set(m.from, list.slice(0, 8));
      renderDeviceEvents(m.from);
    }
  }

  function renderDeviceEvents(id) {
    const card = cardOf(id);
    const list = card && card.querySelector(".device-events");
    if (!list) return;
    clear(list);
    for (const m of state.deviceEvents.get(id) || []) {
      list.append(el("li", { text: `${fmtTime(m.ts)} ${m.body.name}` }));
    }
  }

  function renderReadings(card, d) {
    const dl = card.querySelector(".readings");
    clear(dl);
    const t = d.last_telemetry || {};
    for (const [k, v] of Object.entries(t)) {
      if (k === "ts") continue;
      dl.append(el("div", { "data-field": k }, el("dt", { text: k }), el("dd", { text: typeof v === "boolean" ? (v ? "yes" : "no") : String(v) })));
    }
    if (t.ts) dl.append(el("div", null, el("dt", { text: "at" }), el("dd", { text: fmtTime(t.ts) })));
    const range = card.querySelector("input[type=range]");
    if (range && typeof t.brightness === "number" && document.activeElement !== range) range.value = t.brightness;
  }

  function onTelemetry(id, reading, fromResult) {
    const d = state.devices.get(id);
    if (!d || !reading || typeof reading !== "object") return;
    d.last_telemetry = Object.assign({}, d.last_telemetry || {}, reading);
    const card = cardOf(id);
    if (card) renderReadings(card, d);
    if (fromResult) return;
    const metric = chartMetric(d);
    const v = reading[metric];
    if (typeof v === "number" || typeof v === "boolean") {
      const ts = typeof reading.ts === "number" ? reading.ts : Date.now() / 1000;
      state.series.set(id, mergePoints(state.series.get(id) || [], [{ ts, v: Number(v) }]));
      drawChart(id);
    }
  }

  function drawChart(id) {
    const card = cardOf(id);
    if (!card) return;
    const canvas = card.querySelector("canvas.chart");
    const pts = state.series.get(id) || [];
    canvas.dataset.points = pts.length;
    canvas.dataset.last = pts.length ? pts[pts.length - 1].v : "";
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 14;
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#5f6b7a";
    if (pts.length < 1) { ctx.fillText("no readings yet", pad, h / 2); return; }
    let lo = Math.min(...pts.map((p) => p.v)), hi = Math.max(...pts.map((p) => p.v));
    if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
    const t1 = pts[pts.length - 1].ts, t0 = Math.min(pts[0].ts, t1 - 60);
    const x = (ts) => pad + (w - 2 * pad) * (ts - t0) / Math.max(1, t1 - t0);
    const y = (v) => h - pad - (h - 2 * pad) * (v - lo) / (hi - lo);
    ctx.strokeStyle = "#d8dde4";
    ctx.beginPath(); ctx.moveTo(pad, h - pad); ctx.lineTo(w - pad, h - pad); ctx.stroke();
    ctx.strokeStyle = "#2458c6";
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(x(p.ts), y(p.v)) : ctx.moveTo(x(p.ts), y(p.v))));
    ctx.stroke();
    if (pts.length === 1) { ctx.fillStyle = "#2458c6"; ctx.fillRect(x(pts[0].ts) - 2, y(pts[0].v) - 2, 4, 4); }
    ctx.fillStyle = "#5f6b7a";
    ctx.fillText(String(Math.round(hi * 10) / 10), 2, 10);
    ctx.fillText(String(Math.round(lo * 10) / 10), 2, h - 2);
    const last = pts[pts.length - 1].v;
    canvas.setAttribute("aria-label", `${canvas.dataset.metric} over the last hour, now ${Math.round(last * 10) / 10}`);
  }

  $("claim").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    say("claim-error", "");
    try {
      await request("device.claim", { device: $("claim-device").value.trim(), code: $("claim-code").value.trim() });
      $("claim-device").value = "";
      $("claim-code").value = "";
      await loadDevices();
    } catch (e) { say("claim-error", errText(e)); }
  });

  // ---- views ---------------------------------------------------------------------------
  function showView(view) {
    $("app").dataset.view = view;
    for (const tab of document.querySelectorAll(".tab")) {
      tab.setAttribute("aria-pressed", String(tab.dataset.view === view));
    }
  }
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      showView(tab.dataset.view);
      if (tab.dataset.view === "chat") $("view-chat").dataset.pane = state.current ? $("view-chat").dataset.pane : "list";
      if (tab.dataset.view === "devices") $("devices-title").scrollIntoView({ block: "nearest" });
    });
  }

  boot();
})();
