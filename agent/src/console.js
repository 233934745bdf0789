/* Kiln console capture: forwards this preview's console, errors and failed loads to the app
   generator that frames it, with postMessage. Message shapes are documented in Kiln's README. */
(function (cfg) {
  if (window.parent === window) return;
  var origins = cfg.origins.length ? cfg.origins : ["*"];
  var ancestors = window.location.ancestorOrigins;
  if (ancestors && ancestors.length && cfg.origins.length) {
    // Post only to the origin that frames us, when the browser tells us which one it is.
    var framing = ancestors[0];
    origins = origins.indexOf(framing) >= 0 ? [framing] : [];
  }
  // A runaway console.log loop must not flood the parent: a budget of 200 messages that
  // refills at 50 a second, and one notice when messages were dropped.
  var budget = 200, dropped = 0, last = Date.now();
  function send(msg) {
    var now = Date.now();
    budget = Math.min(200, budget + (now - last) / 20);
    last = now;
    if (budget < 1) { dropped++; return; }
    budget--;
    if (dropped) {
      var note = { type: "dropped", count: dropped };
      dropped = 0;
      send(note);
    }
    msg.kiln = 1;
    msg.project = cfg.project;
    msg.build = cfg.build;
    msg.time = now;
    msg.page = String(window.location.href);
    for (var i = 0; i < origins.length; i++) {
      try { window.parent.postMessage(msg, origins[i]); } catch (e) { /* never break the app */ }
    }
  }
  function show(v) {
    try {
      if (typeof v === "string") return v.slice(0, 10000);
      if (v instanceof Error) return String(v.stack || v.message || v).slice(0, 10000);
      if (v === undefined || typeof v === "function" || typeof v === "symbol") return String(v);
      var seen = [];
      var s = JSON.stringify(v, function (k, x) {
        if (x && typeof x === "object") {
          if (seen.indexOf(x) >= 0) return "[Circular]";
          seen.push(x);
        }
        return x;
      });
      return (s === undefined ? String(v) : s).slice(0, 10000);
    } catch (e) {
      return String(v);
    }
  }
  ["log", "info", "warn", "error", "debug"].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      try {
        send({ type: "console", level: level, args: Array.prototype.map.call(arguments, show) });
      } catch (e) { /* never break the app */ }
      return original.apply(this, arguments);
    };
  });
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {
      send({ type: "resource", tag: String(t.tagName).toLowerCase(), url: String(t.src || t.href || "") });
      return;
    }
    send({
      type: "error", message: String(e.message), source: e.filename || null,
      line: e.lineno || null, column: e.colno || null,
      stack: e.error && e.error.stack ? String(e.error.stack) : null
    });
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    send({
      type: "unhandledrejection",
      message: r && r.message ? String(r.message) : show(r),
      stack: r && r.stack ? String(r.stack) : null
    });
  });
  if (cfg.status) send({ type: "status", state: cfg.status.state, error: cfg.status.error });
})
