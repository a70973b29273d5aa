/* sentinel-proxy operator dashboard.
 *
 * Polls `health` (relative, so the page also works behind a path prefix) every 2 s and updates the
 * DOM in place. Everything in /health is treated as untrusted text: the DOM is built with
 * createElement/textContent only, never innerHTML. Every field may be missing or null (an older
 * gateway, or a node before its first check), so every read goes through a defensive helper.
 *
 * Test hooks: <tbody data-node="URL"> per backend, data-field="..." on its cells, and the epoch
 * strip data-field="epochs" whose children carry data-epoch and data-verdict. <body data-state>
 * is "loading", "live" or "stale".
 *
 * Every 10 s it also fetches `dashboard/history` (same token): the last hour per node, drawn as
 * small SVG charts built here (no library), the timeline of routing changes, one sentence per node
 * that gets no traffic or only fallback traffic, and the callers' errors apart from the nodes'.
 * Hooks: <div data-history-node="NAME"> with <svg data-chart="height|lag|latency|errors|routing"
 * data-points="N">, and <ol id="timeline"> whose items carry data-kind.
 */
(function () {
  "use strict";

  var INTERVAL_MS = 2000;
  var TIMEOUT_MS = 5000;
  var HEALTH_URL = "health";
  var HISTORY_URL = "dashboard/history";
  var HISTORY_EVERY_MS = 10000;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var CHART_W = 220, CHART_H = 44;
  var ROUTING_CLASSES = { preferred: 1, fallback: 1, quarantined: 1, down: 1, drained: 1, "breaker-open": 1 };
  var ROUTING_STATES = ["preferred", "fallback", "quarantined", "down"];
  var VERDICTS = { VALID: 1, WARNING: 1, PARTIAL: 1, INVALID: 1 };
  var NEVER_PREFIX = "0001-01-01"; // Go's zero time: the node was never checked
  var COLUMNS = 14;

  var rows = new Map(); // key -> row object (see createRow)
  var lastOk = null; // Date of the last good answer
  var lastDoc = null; // the last good answer, kept on screen while the gateway is unreachable
  var lastFailure = null; // {since: Date, reason: string}
  var table = null;
  var historyRows = new Map(); // node name -> {box, note, charts}
  var lastHistoryAt = 0; // Date.now() of the last history request
  var notes = new Map(); // node name -> why it gets no (or only fallback) traffic, from the history

  // ---------- defensive readers ----------

  function isObj(x) { return x !== null && typeof x === "object" && !Array.isArray(x); }
  function obj(x) { return isObj(x) ? x : {}; }
  function arr(x) { return Array.isArray(x) ? x : []; }
  function num(x) {
    if (typeof x === "number" && isFinite(x)) { return x; }
    if (typeof x === "string" && x.trim() !== "" && isFinite(Number(x))) { return Number(x); }
    return null;
  }
  function str(x) { return (typeof x === "string" || typeof x === "number") ? String(x) : ""; }
  function first() {
    for (var i = 0; i < arguments.length; i++) {
      if (arguments[i] !== undefined && arguments[i] !== null) { return arguments[i]; }
    }
    return null;
  }

  // ---------- formatting ----------

  var DASH = "\u2014";

  function fmtInt(n) { return n === null ? DASH : Math.round(n).toLocaleString("en-US"); }
  function fmtPlain(n) { return n === null ? DASH : String(Math.round(n)); }
  function fmtMs(n) {
    if (n === null) { return DASH; }
    return n >= 100 ? String(Math.round(n)) : n.toFixed(1);
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds < 0) { return DASH; }
    var s = Math.floor(seconds);
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    var m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d > 0) { return d + "d " + h + "h"; }
    if (h > 0) { return h + "h " + m + "m"; }
    if (m > 0) { return m + "m " + sec + "s"; }
    return sec + "s";
  }
  function pad2(n) { return (n < 10 ? "0" : "") + n; }
  function fmtClock(date) {
    return pad2(date.getHours()) + ":" + pad2(date.getMinutes()) + ":" + pad2(date.getSeconds());
  }
  function fmtAgo(date, now) {
    var secs = (now - date) / 1000;
    if (secs < -5) { return "at " + fmtClock(date); } // clock skew: say when, not how long ago
    if (secs < 1.5) { return "just now"; }
    return fmtDuration(secs) + " ago";
  }
  function fmtList(values, limit) {
    var shown = values.slice(0, limit).join(", ");
    return values.length > limit ? shown + " +" + (values.length - limit) + " more" : shown;
  }

  // ---------- DOM helpers ----------

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }
  function setText(node, text) {
    text = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== text) { node.textContent = text; }
  }
  function setAttr(node, name, value) {
    if (value === null || value === undefined || value === "") {
      if (node.hasAttribute(name)) { node.removeAttribute(name); }
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, String(value));
    }
  }
  /** A hash cut to its ends: "0x1234abcd…9f0e". */
  function shortHash(x) {
    x = str(x);
    return x.length > 16 ? x.slice(0, 10) + "\u2026" + x.slice(-4) : x;
  }
  function field(name) { return document.querySelector('#totals [data-field="' + name + '"]'); }
  function headerField(name) { return document.querySelector('[data-field="' + name + '"]'); }

  // ---------- one node ----------

  function createRow() {
    var body = el("tbody", "node");
    var main = el("tr", "main");
    var notes = el("tr", "notes");
    body.appendChild(main);
    body.appendChild(notes);
    var r = { body: body, cells: {}, sig: {} };

    function cell(name, className) {
      var td = el("td", className || "");
      td.dataset.field = name;
      main.appendChild(td);
      r.cells[name] = td;
      return td;
    }

    var nodeTd = el("td", "c-node");
    r.name = el("div", "name");
    r.name.dataset.field = "name";
    nodeTd.appendChild(r.name);
    main.appendChild(nodeTd);

    r.health = el("span", "badge health");
    cell("health").appendChild(r.health);
    r.routing = el("span", "badge routing");
    cell("routing").appendChild(r.routing);
    cell("type", "c-type");
    cell("block", "r num");
    cell("lag", "r num");
    cell("oldest", "r num");
    cell("score", "r num score");
    r.status = el("span", "badge integrity");
    cell("status").appendChild(r.status);

    var epochsTd = el("td", "c-epochs");
    r.strip = el("div", "strip");
    r.strip.dataset.field = "epochs";
    r.stripRange = el("div", "strip-range mono");
    epochsTd.appendChild(r.strip);
    epochsTd.appendChild(r.stripRange);
    main.appendChild(epochsTd);

    var listsTd = el("td", "c-lists");
    r.missing = el("div", "list missing");
    r.missing.dataset.field = "missing";
    r.inconsistent = el("div", "list inconsistent");
    r.inconsistent.dataset.field = "inconsistent";
    listsTd.appendChild(r.missing);
    listsTd.appendChild(r.inconsistent);
    main.appendChild(listsTd);

    var latTd = cell("latency", "r num c-latency");
    r.latAvg = el("span", "lat-avg");
    r.latRange = el("span", "lat-range");
    latTd.appendChild(r.latAvg);
    latTd.appendChild(r.latRange);
    cell("requests", "r num");
    cell("errors", "r num");

    var notesTd = el("td", "notes-cell");
    notesTd.colSpan = COLUMNS;
    notes.appendChild(notesTd);
    r.quarantine = el("span", "note quarantine");
    r.quarantine.dataset.field = "quarantine";
    r.divergence = el("span", "note divergence");
    r.divergence.dataset.field = "divergence";
    r.lastError = el("span", "note last-error");
    r.lastError.dataset.field = "last-error";
    r.tips = el("span", "note tips");
    r.tips.dataset.field = "tips";
    r.chain = el("span", "note meta");
    r.chain.dataset.field = "chain";
    r.checked = el("span", "note meta");
    r.checked.dataset.field = "last-check";
    r.history = el("span", "note meta");
    r.history.dataset.field = "history";
    r.why = el("span", "note why");
    r.why.dataset.field = "why";
    r.findings = el("details", "findings");
    r.findings.dataset.field = "findings";
    r.findingsSummary = el("summary", "", "findings");
    r.findingsList = el("ul");
    r.findings.appendChild(r.findingsSummary);
    r.findings.appendChild(r.findingsList);
    [r.why, r.quarantine, r.divergence, r.lastError, r.tips, r.chain, r.checked, r.history, r.findings].forEach(function (n) {
      notesTd.appendChild(n);
    });
    return r;
  }

  /** The cells of the epoch strip: analysed epochs, then missing, then not-scored ones, by epoch. */
  function epochCells(b) {
    var integrity = obj(b.integrity);
    var stats = obj(b.integrityStats);
    var byEpoch = new Map();
    function add(epoch, verdict, title) {
      epoch = num(epoch);
      if (epoch === null || byEpoch.has(epoch)) { return; }
      byEpoch.set(epoch, { epoch: epoch, verdict: verdict, title: title });
    }
    arr(integrity.epochs).forEach(function (e) {
      e = obj(e);
      var verdict = VERDICTS[str(e.verdict)] ? str(e.verdict) : "unknown";
      var lines = ["epoch " + str(e.epoch) + " \u2014 " + (str(e.verdict) || "?") +
                   ", score " + (num(e.score) === null ? "?" : num(e.score))];
      var parts = [];
      if (num(e.validators) !== null) { parts.push(e.validators + " validators"); }
      if (num(e.proposerEntries) !== null) { parts.push(e.proposerEntries + " proposer entries"); }
      if (num(e.attestationEntries) !== null) { parts.push(e.attestationEntries + " attestation entries"); }
      if (parts.length) { lines.push(parts.join(", ")); }
      var rules = arr(e.rules).map(str).filter(Boolean);
      lines.push.apply(lines, rules.length ? rules : ["no rule broken"]);
      add(e.epoch, verdict, lines.join("\n"));
    });
    var missing = arr(integrity.missingEpochs).length ? integrity.missingEpochs : stats.missingEpochs;
    arr(missing).forEach(function (epoch) {
      add(epoch, "missing", "epoch " + str(epoch) + " \u2014 missing: no record inside the history window");
    });
    arr(integrity.skippedEpochs).forEach(function (s) {
      s = obj(s);
      add(s.epoch, "skipped", "epoch " + str(s.epoch) + " \u2014 not scored: " + (str(s.reason) || "skipped"));
    });
    if (!arr(integrity.epochs).length) {
      // An older gateway only lists inconsistent epochs, without a per-epoch verdict.
      arr(stats.inconsistentEpochs).forEach(function (epoch) {
        add(epoch, "inconsistent", "epoch " + str(epoch) + " \u2014 inconsistent (score below 100)");
      });
    }
    return Array.from(byEpoch.values()).sort(function (a, b) { return a.epoch - b.epoch; });
  }

  function updateStrip(r, b, checked) {
    var cells = epochCells(b);
    var sig = JSON.stringify(cells);
    if (r.sig.strip === sig) { return; }
    r.sig.strip = sig;
    var children = cells.map(function (c) {
      var i = el("i", "epoch");
      i.dataset.epoch = String(c.epoch);
      i.dataset.verdict = c.verdict;
      i.title = c.title;
      i.setAttribute("role", "img");
      i.setAttribute("aria-label", c.title.split("\n")[0]);
      return i;
    });
    r.strip.replaceChildren.apply(r.strip, children);
    setText(r.stripRange, cells.length ? (cells.length > 1 ? cells[0].epoch + "\u2013" + cells[cells.length - 1].epoch
                                                            : String(cells[0].epoch))
                                       : checked ? "no per-epoch detail" : "not checked");
  }

  function updateRow(r, b, now) {
    // The display name: the configured name, else scheme://host:port. The gateway never sends
    // the URL itself (it may hold the node's credentials), and "url" is the same display name.
    var url = str(b.url);
    var name = str(b.name) || url;
    setAttr(r.body, "data-node", url);
    setText(r.name, name || "(no name)");
    setAttr(r.name, "title", name);

    var healthy = b.healthy === true ? "healthy" : b.healthy === false ? "unhealthy" : "unknown";
    setText(r.health, healthy);
    setAttr(r.health, "data-value", healthy);
    setAttr(r.body, "data-health", healthy);

    var routing = str(b.routing) || DASH;
    setText(r.routing, routing);
    setAttr(r.routing, "data-value", str(b.routing));
    setAttr(r.body, "data-routing", str(b.routing));
    var reasons = Object.keys(obj(b.quarantine));
    setAttr(r.routing, "title", reasons.length ? "quarantined for: " + reasons.join(", ") : "");

    var integrity = obj(b.integrity);
    var stats = obj(b.integrityStats);
    var type = str(first(b.nodeType, integrity.nodeType));
    setText(r.cells.type, type || DASH);
    setAttr(r.cells.type, "data-value", type);

    var block = num(b.blockNumber);
    setText(r.cells.block, fmtPlain(block));
    setAttr(r.cells.block, "data-value", block === null ? "" : String(block));
    var lag = num(b.lag);
    setText(r.cells.lag, fmtPlain(lag));
    setAttr(r.cells.lag, "data-value", lag === null ? "" : String(lag));
    r.cells.lag.classList.toggle("warn", lag !== null && lag > 0);
    var oldest = num(b.oldestBlock);
    setText(r.cells.oldest, fmtPlain(oldest));

    var status = str(first(integrity.status, stats.integrityStatus));
    var score = num(first(integrity.score, stats.integrityScore));
    // Before the first integrity check the prototype's shape says score 0, status "": not a real 0.
    var checked = status !== "";
    setText(r.cells.score, checked && score !== null ? String(score) : DASH);
    setAttr(r.cells.score, "data-value", checked && score !== null ? String(score) : "");
    setText(r.status, checked ? status : "not checked");
    setAttr(r.status, "data-value", status || "unchecked");

    updateStrip(r, b, checked);

    var missing = arr(first(integrity.missingEpochs, stats.missingEpochs)).map(str);
    var inconsistent = arr(first(integrity.inconsistentEpochs, stats.inconsistentEpochs)).map(str);
    setText(r.missing, missing.length ? "missing " + fmtList(missing, 6) : "");
    setAttr(r.missing, "title", missing.length ? "missing epochs: " + missing.join(", ") : "");
    setText(r.inconsistent, inconsistent.length ? "inconsistent " + fmtList(inconsistent, 6) : "");
    setAttr(r.inconsistent, "title", inconsistent.length ? "inconsistent epochs: " + inconsistent.join(", ") : "");
    r.missing.parentNode.classList.toggle("none", !missing.length && !inconsistent.length);

    var rs = obj(b.requestStats);
    var avg = num(rs.avgLatency), min = num(rs.minLatency), max = num(rs.maxLatency);
    setText(r.latAvg, avg === null ? DASH : fmtMs(avg) + " ms");
    setText(r.latRange, min === null && max === null ? "" : fmtMs(min) + " \u2013 " + fmtMs(max));
    setAttr(r.cells.latency, "data-value", avg === null ? "" : String(avg));
    var requests = num(rs.totalRequests), errors = num(rs.totalErrors);
    setText(r.cells.requests, fmtInt(requests));
    setAttr(r.cells.requests, "data-value", requests === null ? "" : String(requests));
    setText(r.cells.errors, fmtInt(errors));
    setAttr(r.cells.errors, "data-value", errors === null ? "" : String(errors));
    r.cells.errors.classList.toggle("bad", errors !== null && errors > 0);

    // notes line
    var quarantine = obj(b.quarantine);
    var divergence = isObj(b.divergence) ? b.divergence : null;
    // A divergence has a line of its own (hashes shortened, in full on hover).
    setText(r.quarantine, reasons.filter(function (k) { return !(divergence && k === "diverged"); })
      .map(function (k) { return k + ": " + str(quarantine[k]); }).join(" \u00b7 "));
    setText(r.divergence, divergence ? "diverged at block " + str(divergence.height) + " (" +
      (str(divergence.source) || str(divergence.kind)) + "): " + shortHash(divergence.hash) + " vs the majority's " +
      shortHash(divergence.majority) + " (" + str(divergence.votes) + " of " + str(divergence.voters) + " nodes)" : "");
    setAttr(r.divergence, "title", divergence ? str(divergence.reason) : "");
    setAttr(r.body, "data-diverged", divergence ? "true" : "");
    var tips = isObj(b.tips) ? b.tips : null;
    var finalized = tips ? obj(tips.finalized) : {};
    if (tips && tips.ok === true) {
      setText(r.tips, "tips: " + (str(tips.method) || "?") +
        (num(finalized.number) !== null ? " \u00b7 finalized " + str(finalized.number) : ""));
    } else {
      setText(r.tips, tips ? "no finalized tip" + (str(tips.method) ? " (" + str(tips.method) + ")" : "") +
        (str(tips.error) ? ": " + str(tips.error) : "") : "");
    }
    setAttr(r.tips, "data-value", tips ? (tips.ok === true ? "ok" : "missing") : "");
    setAttr(r.tips, "title", str(finalized.hash));
    setText(r.lastError, b.lastError === null || b.lastError === undefined || b.lastError === ""
                         ? "" : "last error: " + str(b.lastError));
    var chain = b.chain;
    if (isObj(chain)) {
      setText(r.chain, "L1 chain " + (str(chain.l1ChainId) || "?") + " \u00b7 rollup " + (str(chain.rollupVersion) || "?"));
    } else {
      setText(r.chain, "chain " + (chain === null ? "not verified yet" : "unknown"));
    }
    var lastCheck = str(b.lastCheck);
    var checkedAt = lastCheck && lastCheck.indexOf(NEVER_PREFIX) !== 0 ? new Date(lastCheck) : null;
    setText(r.checked, checkedAt && !isNaN(checkedAt) ? "checked " + fmtAgo(checkedAt, now) : "never checked");
    setAttr(r.checked, "title", lastCheck);
    var es = obj(b.epochStats);
    var bits = [];
    var current = num(first(integrity.currentEpoch, es.currentEpoch));
    var total = num(first(integrity.totalEpochs, es.totalEpochs));
    if (checked && current !== null) { bits.push("epoch " + current); }
    if (checked && total !== null) { bits.push(total + " epochs of history"); }
    if (num(stats.priority) !== null) { bits.push("priority " + stats.priority); }
    setText(r.history, bits.join(" \u00b7 "));

    var findings = arr(integrity.findings).map(str);
    var fsig = JSON.stringify(findings);
    if (r.sig.findings !== fsig) {
      r.sig.findings = fsig;
      setText(r.findingsSummary, findings.length ? "findings (" + findings.length + ")" : "no findings");
      r.findingsList.replaceChildren.apply(r.findingsList, findings.map(function (f) { return el("li", "", f); }));
      r.findings.hidden = findings.length === 0;
    }
  }

  // ---------- the fleet ----------

  function renderTotals(doc, backends, now, receivedAt) {
    var status = str(doc.status) || "unknown";
    var pill = field("overall-status");
    setText(pill, status);
    setAttr(pill, "data-value", status);

    var healthy = backends.filter(function (b) { return obj(b).healthy === true; });
    setText(field("healthy-nodes"), String(healthy.length));
    setText(field("total-nodes"), String(backends.length));

    ROUTING_STATES.forEach(function (state) {
      var n = backends.filter(function (b) { return obj(b).routing === state; }).length;
      var target = field("routing-" + state);
      setText(target, String(n));
      target.parentNode.classList.toggle("zero", n === 0);
    });

    var pool = healthy.length ? healthy : backends;
    var best = null;
    pool.forEach(function (b) {
      var n = num(obj(b).blockNumber);
      if (n !== null && (best === null || n > best)) { best = n; }
    });
    setText(field("best-block"), fmtPlain(best));

    var agreement = obj(doc.agreement);
    var finalizedTip = num(agreement.finalized);
    var contested = isObj(agreement.contested) ? agreement.contested : null;
    var finalizedField = field("finalized");
    setText(finalizedField, contested ? "finalized: contested" : "finalized " + fmtPlain(finalizedTip));
    setAttr(finalizedField, "data-value", contested ? "contested" : finalizedTip !== null ? "agreed" : "none");
    setAttr(finalizedField, "title", contested ? str(contested.reason)
      : finalizedTip !== null ? "agreed by a majority of the healthy nodes that agree on their hashes"
      : "no agreed finalized tip: nothing is cached as immutable");

    renderFleet(doc.fleet);

    var metrics = obj(doc.metrics);
    var requests = num(metrics.totalRequests);
    setText(field("total-requests"), fmtInt(requests));
    setAttr(field("total-requests"), "data-value", requests === null ? "" : String(requests));
    setText(field("uptime"), fmtDuration(num(doc.uptime)));
    setText(field("refreshed"), fmtClock(receivedAt));
    document.title = "sentinel-proxy \u00b7 " + healthy.length + "/" + backends.length + " healthy";
  }

  /** SHARED_STATE's view: this gateway's role and which instance probes (no tile without a fleet). */
  function renderFleet(fleet) {
    var tile = field("fleet-tile");
    tile.hidden = !isObj(fleet);
    if (!isObj(fleet)) { return; }
    var role = str(fleet.role) || "unknown";
    var pill = field("fleet-role");
    setText(pill, role);
    setAttr(pill, "data-value", role);
    var prober = field("fleet-prober");
    setText(prober, role === "prober" ? "this gateway probes (token " + fmtPlain(num(fleet.token)) + ")"
      : role === "alone" ? "Redis " + str(fleet.redis) + ": checking the nodes itself"
      : "prober: " + str(fleet.prober));
    setAttr(prober, "title", "this gateway: " + str(fleet["this"]) + "; prober: " + str(fleet.prober));
  }

  /** Draws `doc` (received at `receivedAt`); `now` only moves the "… ago" texts on. */
  function render(doc, now, receivedAt) {
    doc = obj(doc);
    var backends = arr(doc.backends);
    renderTotals(doc, backends, now, receivedAt);

    var empty = table.querySelector("tbody[data-empty]");
    if (empty) {
      empty.hidden = backends.length > 0;
      setText(empty.querySelector("td"), backends.length ? "" : "The gateway reports no backends.");
    }

    var seen = new Set();
    var ordered = [];
    backends.forEach(function (b, i) {
      b = obj(b);
      var key = str(b.url) || "backend-" + i;
      if (seen.has(key)) { key = key + "#" + i; }
      seen.add(key);
      var r = rows.get(key);
      if (!r) {
        r = createRow();
        rows.set(key, r);
      }
      updateRow(r, b, now);
      // A quarantine has its reasons on the line already.
      showWhy(r, b.routing === "quarantined" ? "" : notes.get(str(b.name) || key) || "");
      ordered.push(r.body);
    });
    rows.forEach(function (r, key) {
      if (!seen.has(key)) {
        r.body.remove();
        rows.delete(key);
      }
    });
    var current = Array.from(table.tBodies).filter(function (t) { return !t.hasAttribute("data-empty"); });
    var same = current.length === ordered.length && current.every(function (t, i) { return t === ordered[i]; });
    if (!same) {
      ordered.forEach(function (t) { table.appendChild(t); });
    }
  }

  function showState(now) {
    var banner = document.getElementById("stale");
    var state = headerField("refresh-state");
    if (lastFailure) {
      document.body.dataset.state = "stale";
      banner.hidden = false;
      var text = lastFailure.reason + " (since " + fmtClock(lastFailure.since) + "). ";
      text += lastOk ? "Showing the last data received, " + fmtAgo(lastOk, now) + "; retrying every 2 s."
                     : "No data received yet; retrying every 2 s.";
      setText(headerField("stale-reason"), text);
      setText(state, lastOk ? "stale \u00b7 last data " + fmtAgo(lastOk, now) : "unreachable");
      if (document.title.indexOf("stale") < 0) { document.title = "stale \u00b7 " + document.title; }
    } else {
      document.body.dataset.state = lastOk ? "live" : "loading";
      banner.hidden = true;
      setText(state, lastOk ? "live \u00b7 every 2 s" : "connecting\u2026");
    }
  }

  // With PROTECT_STATUS the gateway wants the admin token: the operator opens the page as
  // /dashboard#token=... (a fragment is never sent to a server or written to its access log).
  function healthHeaders() {
    var headers = { Accept: "application/json" };
    var match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash || "");
    if (match) { headers.Authorization = "Bearer " + decodeURIComponent(match[1]); }
    return headers;
  }

  function fetchHealth() {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, TIMEOUT_MS) : null;
    return fetch(HEALTH_URL, {
      cache: "no-store",
      credentials: "same-origin",
      headers: healthHeaders(),
      signal: controller ? controller.signal : undefined
    }).then(function (response) {
      // 503 still carries a /health document on some gateways: use it when it parses.
      return response.json().catch(function () {
        throw new Error("HTTP " + response.status + " from health (not JSON)");
      }).then(function (doc) {
        if (!isObj(doc) || !Array.isArray(doc.backends)) {
          throw new Error("HTTP " + response.status + ": health answered without a backends list");
        }
        return doc;
      });
    }, function (error) {
      throw new Error(error && error.name === "AbortError" ? "no answer from health within " + TIMEOUT_MS / 1000 + " s"
                                                           : "health request failed (" + (error && error.message || error) + ")");
    }).finally(function () {
      if (timer) { clearTimeout(timer); }
    });
  }

  // ---------- history: charts, timeline, notes ----------

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    return node;
  }

  /** x of each sample over the chart's width, oldest at the left. */
  function xs(at) {
    var first = at.length ? at[0] : 0, last = at.length ? at[at.length - 1] : 0;
    var span = last - first;
    return at.map(function (t) { return span > 0 ? (t - first) / span * CHART_W : CHART_W; });
  }

  /** Polylines for each series (a gap where a value is null), scaled together. */
  function lineChart(kind, at, series, unit) {
    var chart = svg("svg", { viewBox: "0 0 " + CHART_W + " " + CHART_H, width: CHART_W, height: CHART_H,
                             class: "chart", "data-chart": kind, role: "img", preserveAspectRatio: "none" });
    var x = xs(at);
    var values = [];
    series.forEach(function (s) { s.values.forEach(function (v) { if (num(v) !== null) { values.push(v); } }); });
    chart.setAttribute("data-points", String(values.length));
    var lo = values.length ? Math.min.apply(null, values) : 0, hi = values.length ? Math.max.apply(null, values) : 1;
    if (kind !== "height") { lo = Math.min(lo, 0); }
    if (hi === lo) { hi = lo + 1; }
    function y(v) { return (CHART_H - 3) - (v - lo) / (hi - lo) * (CHART_H - 6); }
    series.forEach(function (s) {
      var runs = [], run = [];
      s.values.forEach(function (v, i) {
        if (num(v) === null) { if (run.length) { runs.push(run); run = []; } return; }
        run.push(x[i].toFixed(1) + "," + y(v).toFixed(1));
      });
      if (run.length) { runs.push(run); }
      runs.forEach(function (points) {
        if (points.length === 1) {
          var xy = points[0].split(",");
          chart.appendChild(svg("circle", { cx: xy[0], cy: xy[1], r: 1.8, class: "dot " + s.cls }));
        } else {
          chart.appendChild(svg("polyline", { points: points.join(" "), class: "line " + s.cls }));
        }
      });
    });
    var latest = series.map(function (s) {
      var v = null;
      for (var i = s.values.length - 1; i >= 0 && v === null; i--) { v = num(s.values[i]); }
      return v;
    });
    var title = svg("title");
    title.textContent = kind + ": " + (values.length ? "from " + lo + " to " + hi + unit : "no data yet");
    chart.appendChild(title);
    return { chart: chart, latest: latest };
  }

  /** One band per sample, coloured by how the node was routed. */
  function routingChart(at, routing) {
    var chart = svg("svg", { viewBox: "0 0 " + CHART_W + " 10", width: CHART_W, height: 10, class: "chart band",
                             "data-chart": "routing", "data-points": routing.length, preserveAspectRatio: "none" });
    var x = xs(at);
    routing.forEach(function (state, i) {
      var left = i === 0 ? 0 : (x[i - 1] + x[i]) / 2;
      var right = i === routing.length - 1 ? CHART_W : (x[i] + x[i + 1]) / 2;
      state = str(state);
      var rect = svg("rect", { x: left.toFixed(1), y: 0, width: Math.max(0.5, right - left).toFixed(1), height: 10,
                               class: "state " + (ROUTING_CLASSES[state] ? state : "unknown") });
      var title = svg("title");
      title.textContent = fmtClock(new Date(at[i] * 1000)) + " " + state;
      rect.appendChild(title);
      chart.appendChild(rect);
    });
    return chart;
  }

  function figure(label, chart, value) {
    var box = el("figure", "mini");
    var caption = el("figcaption", "");
    caption.appendChild(el("span", "mini-label", label));
    caption.appendChild(el("span", "mini-value num", value));
    box.appendChild(caption);
    box.appendChild(chart);
    return box;
  }

  function fmtRate(v) { return v === null ? DASH : (v * 100).toFixed(v < 0.1 ? 1 : 0) + " %"; }
  function noteText(note) {
    note = isObj(note) ? note : null;
    if (!note) { return ""; }
    var since = num(note.since);
    return str(note.text) + (since !== null ? " (since " + fmtClock(new Date(since * 1000)) + ")" : "");
  }

  function renderNodeHistory(container, node) {
    var name = str(node.name);
    var s = obj(node.series);
    var at = arr(s.at).map(num);
    var r = historyRows.get(name);
    if (!r) {
      r = { box: el("div", "history-node") };
      r.box.dataset.historyNode = name;
      r.title = el("div", "history-name", name);
      r.note = el("div", "history-note");
      r.note.dataset.field = "note";
      r.charts = el("div", "charts");
      r.box.appendChild(r.title);
      r.box.appendChild(r.note);
      r.box.appendChild(r.charts);
      historyRows.set(name, r);
    }
    setAttr(r.box, "data-routing", str(node.routing));
    var text = noteText(node.note);
    setText(r.note, text);
    r.note.hidden = text === "";
    var height = lineChart("height", at, [{ values: arr(s.height), cls: "s-height" }], "");
    var lag = lineChart("lag", at, [{ values: arr(s.lag), cls: "s-lag" }], " blocks");
    var latency = lineChart("latency", at, [{ values: arr(s.p50), cls: "s-p50" }, { values: arr(s.p99), cls: "s-p99" }],
                            " ms");
    var errors = lineChart("errors", at, [{ values: arr(s.error_rate), cls: "s-errors" }], "");
    r.charts.replaceChildren(
      figure("block", height.chart, fmtPlain(height.latest[0])),
      figure("lag", lag.chart, fmtPlain(lag.latest[0])),
      figure("latency p50 / p99", latency.chart, fmtMs(latency.latest[0]) + " / " + fmtMs(latency.latest[1]) + " ms"),
      figure("node errors", errors.chart, fmtRate(errors.latest[0])),
      figure("routing", routingChart(at, arr(s.routing)), str(node.routing) || DASH));
    notes.set(name, text);
    var row = rows.get(name);
    if (row) { showWhy(row, str(node.routing) === "quarantined" ? "" : text); }
    return r.box;
  }

  function showWhy(row, text) {
    setText(row.why, text);
    setAttr(row.why, "data-value", text ? "note" : "");
  }

  function renderTimeline(events) {
    var list = document.getElementById("timeline");
    var items = arr(events).slice().reverse().map(function (e) {
      e = obj(e);
      var at = num(e.at);
      var li = el("li", "event");
      li.dataset.kind = str(e.kind);
      li.appendChild(el("time", "mono", at === null ? DASH : fmtClock(new Date(at * 1000))));
      li.appendChild(el("span", "event-text", str(e.text)));
      return li;
    });
    if (!items.length) { items = [el("li", "empty", "No routing change yet.")]; }
    list.replaceChildren.apply(list, items);
  }

  function renderTraffic(doc) {
    var totals = obj(doc.totals);
    var requests = num(totals.requests), nodeErrors = num(totals.nodeErrors), callerErrors = num(totals.callerErrors);
    setText(field("node-errors"), fmtInt(nodeErrors));
    var rate = requests ? nodeErrors / requests : null;
    setText(field("node-error-rate"), rate === null ? "" : "(" + (rate * 100).toFixed(2) + " %)");
    field("node-error-rate").classList.toggle("bad", rate !== null && rate > 0.01);
    setText(field("caller-errors"), fmtInt(callerErrors));
    var detail = [];
    if (num(totals.rateLimited)) { detail.push(fmtInt(num(totals.rateLimited)) + " rate-limited"); }
    if (num(totals.refusedCalls)) { detail.push(fmtInt(num(totals.refusedCalls)) + " calls refused"); }
    setText(field("caller-detail"), detail.join(", "));
    var traffic = obj(doc.traffic);
    var at = arr(traffic.at).map(num);
    var box = document.querySelector('[data-field="traffic"]');
    box.replaceChildren(
      figure("requests / interval", lineChart("requests", at, [{ values: arr(traffic.requests), cls: "s-height" }], "").chart,
             ""),
      figure("caller errors (4xx) / interval",
             lineChart("caller-errors", at, [{ values: arr(traffic.caller_errors), cls: "s-caller" }], "").chart, ""),
      figure("node errors (5xx) / interval",
             lineChart("node-errors", at, [{ values: arr(traffic.node_errors), cls: "s-errors" }], "").chart, ""));
  }

  function renderHistory(doc) {
    doc = obj(doc);
    var container = document.querySelector('[data-field="history-nodes"]');
    var seen = new Set();
    var boxes = arr(doc.nodes).map(function (node) {
      node = obj(node);
      seen.add(str(node.name));
      return renderNodeHistory(container, node);
    });
    historyRows.forEach(function (r, name) { if (!seen.has(name)) { historyRows.delete(name); notes.delete(name); } });
    container.replaceChildren.apply(container, boxes);
    var interval = num(doc.interval);
    setText(headerField("history-scope"), interval === null ? "" : "one sample every " + interval +
            " s, from the gateway process that answered");
    renderTraffic(doc);
    renderTimeline(doc.timeline);
  }

  function fetchHistory() {
    lastHistoryAt = Date.now();
    return fetch(HISTORY_URL, { cache: "no-store", credentials: "same-origin", headers: healthHeaders() })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status + " from " + HISTORY_URL); }
        return response.json();
      })
      .then(renderHistory)
      .catch(function () { lastHistoryAt = 0; }); // the health banner tells of an unreachable gateway
  }

  function tick() {
    if (Date.now() - lastHistoryAt >= HISTORY_EVERY_MS) { fetchHistory(); }
    fetchHealth().then(function (doc) {
      var now = new Date();
      render(doc, now, now);
      lastOk = now;
      lastDoc = doc;
      lastFailure = null;
      showState(now);
    }).catch(function (error) {
      var now = new Date();
      if (!lastFailure) { lastFailure = { since: now, reason: "" }; }
      lastFailure.reason = String(error && error.message || error);
      if (lastDoc) {
        try { render(lastDoc, now, lastOk); } catch (ignored) { /* it rendered before; keep what is shown */ }
      }
      showState(now);
    }).finally(function () {
      setTimeout(tick, INTERVAL_MS);
    });
  }

  function start() {
    table = document.querySelector("table.nodes");
    tick();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
