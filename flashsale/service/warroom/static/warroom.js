/* flashsale war room: polls GET /api/admin/warroom every second and draws it; the
   controls POST to /api/admin/warroom/... after a confirmation. Plain browser JS, no
   libraries, no build step. The admin token arrives once as ?token=, is kept in
   sessionStorage (this tab only) and sent as a Bearer header. */
(function () {
  "use strict";

  var TOKEN_KEY = "flashsale.warroom.token";
  var OPERATOR_KEY = "flashsale.warroom.operator";
  var POLL_MS = 1000;
  var STALE_MS = 3500;

  var COLORS = {
    created: "#3fb950", sold_out: "#8b949e", limited: "#d29922", shed: "#f0883e",
    unknown: "#f85149", other: "#6e7681",
    p50: "#58a6ff", p99: "#d2a8ff", limit: "#f85149",
    target: "#8b949e", actual: "#3fb950", backlog: "#f0883e", writer: "#58a6ff",
  };
  var OUTCOME_LABELS = {
    created: "created", sold_out: "sold out", limited: "limited (per-user or rate)",
    shed: "shed (overloaded)", unknown: "unknown outcome", other: "other (not open, invalid, replayed)",
  };

  // ---------------------------------------------------------------- login page

  if (document.body.dataset.page === "login") {
    var rejected = document.body.dataset.rejected === "1";
    var stored = sessionStorage.getItem(TOKEN_KEY);
    if (rejected) {
      sessionStorage.removeItem(TOKEN_KEY);
    } else if (stored) {
      // A reload of the page: the address no longer carries the token, this tab does.
      var here = new URL(location.href);
      here.searchParams.set("token", stored);
      location.replace(here.pathname + here.search + here.hash);
    }
    return;
  }

  // ---------------------------------------------------------------- token and API

  function takeToken() {
    var url = new URL(location.href);
    var fromUrl = url.searchParams.get("token");
    if (fromUrl) {
      sessionStorage.setItem(TOKEN_KEY, fromUrl);
      url.searchParams.delete("token"); // out of the address bar, history and screenshots
      history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  var token = takeToken();

  function ApiFailure(status, code, message) {
    this.status = status; this.code = code; this.message = message;
  }

  function api(method, path, body, headers) {
    var ctrl = new AbortController();
    var timer = setTimeout(function () { ctrl.abort(); }, 5000);
    var h = { "Authorization": "Bearer " + token, "Accept": "application/json" };
    Object.keys(headers || {}).forEach(function (k) { h[k] = headers[k]; });
    if (body !== undefined) h["Content-Type"] = "application/json";
    return fetch(path, {
      method: method, headers: h, signal: ctrl.signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var json = null;
        try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
        if (!resp.ok) {
          throw new ApiFailure(resp.status, json && json.error || "http_" + resp.status,
                               json && json.message || resp.statusText);
        }
        return { json: json, headers: resp.headers };
      });
    }, function (err) {
      throw new ApiFailure(0, "unreachable", err.name === "AbortError" ? "no answer within 5 s" : "the service is not answering");
    }).finally(function () { clearTimeout(timer); });
  }

  // ---------------------------------------------------------------- formatting

  function $(id) { return document.getElementById(id); }
  function fmtInt(n) { return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"); }
  function fmtRate(n) {
    if (n === null || n === undefined) return "–";
    return n >= 100 ? fmtInt(n) : n.toLocaleString("en-US", { maximumFractionDigits: 1 });
  }
  function fmtMs(n) { return n >= 100 ? fmtInt(n) : n.toLocaleString("en-US", { maximumFractionDigits: 1 }); }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function fmtDuration(ms) {
    var s = Math.floor(Math.abs(ms) / 1000);
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return (h ? h + ":" + pad(m) : pad(m)) + ":" + pad(s % 60);
  }
  function fmtAgo(ms) {
    return ms < 60000 ? (Math.max(0, ms) / 1000).toFixed(1) + " s ago" : fmtDuration(ms) + " ago";
  }
  function fmtClock(ms) {
    var d = new Date(ms);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function fmtT0(ms, t0) {
    var rel = ms - t0;
    return "T0" + (rel < 0 ? " − " : " + ") + fmtDuration(rel);
  }
  function setText(id, text) { var el = $(id); if (el.textContent !== text) el.textContent = text; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------------------------------------------------------------- charts (canvas)

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  /* opts: {x: [...], breaks: [i, ...], series: [{label, color, values, x, breaks, dash, width}],
            lines: [{y, color, label}], xMin, xMax, xFormat(x), vline: {x, label}}
     A line is never drawn across a gap in the data: it stops at a null value and at each
     index in `breaks` (where the server saw a gap: nobody watched, nothing published) and
     starts again after it; a lone point between gaps is drawn as a dot. What was drawn is
     kept on the canvas as data-segments: per series, each stretch's [first x, last x, points]. */
  function drawChart(canvas, opts) {
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var left = 48, right = 10, top = 8, bottom = 22;
    var pw = w - left - right, ph = h - top - bottom;
    var xs = opts.x;
    var xMin = opts.xMin !== undefined ? opts.xMin : (xs.length ? xs[0] : 0);
    var xMax = opts.xMax !== undefined ? opts.xMax : (xs.length ? xs[xs.length - 1] : 1);
    if (xMax <= xMin) xMax = xMin + 1;
    var yTop = 0;
    opts.series.forEach(function (s) {
      (s.values || []).forEach(function (v) { if (v !== null && v > yTop) yTop = v; });
    });
    (opts.lines || []).forEach(function (l) { if (l.y > yTop && l.y < yTop * 4 + 1) yTop = l.y; });
    yTop = niceMax(yTop * 1.08);
    function X(x) { return left + (x - xMin) / (xMax - xMin) * pw; }
    function Y(y) { return top + ph - Math.min(y, yTop) / yTop * ph; }

    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#30363d"; ctx.fillStyle = "#8b949e"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (var i = 0; i <= 4; i++) {
      var yv = yTop * i / 4, yy = Math.round(Y(yv)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
      ctx.fillText(yv >= 1000 ? (yv / 1000).toLocaleString("en-US", { maximumFractionDigits: 1 }) + "k" : String(Math.round(yv * 10) / 10), left - 6, yy);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (var j = 0; j <= 4; j++) {
      var xv = xMin + (xMax - xMin) * j / 4;
      ctx.fillText(opts.xFormat ? opts.xFormat(xv) : String(xv), Math.min(Math.max(X(xv), left + 20), left + pw - 20), top + ph + 6);
    }
    (opts.lines || []).forEach(function (l) {
      if (l.y > yTop) return;
      ctx.save(); ctx.strokeStyle = l.color; ctx.setLineDash([6, 4]); ctx.lineWidth = 1.5;
      ctx.beginPath(); ctx.moveTo(left, Y(l.y)); ctx.lineTo(left + pw, Y(l.y)); ctx.stroke();
      ctx.fillStyle = l.color; ctx.textAlign = "right"; ctx.textBaseline = "bottom";
      ctx.fillText(l.label, left + pw - 4, Y(l.y) - 2); ctx.restore();
    });
    if (opts.vline) {
      ctx.save(); ctx.strokeStyle = "#e6edf3"; ctx.globalAlpha = 0.5; ctx.setLineDash([2, 3]);
      ctx.beginPath(); ctx.moveTo(X(opts.vline.x), top); ctx.lineTo(X(opts.vline.x), top + ph); ctx.stroke();
      ctx.globalAlpha = 1; ctx.fillStyle = "#e6edf3"; ctx.textAlign = "left"; ctx.textBaseline = "top";
      ctx.fillText(opts.vline.label, X(opts.vline.x) + 4, top + 2); ctx.restore();
    }
    ctx.save();
    ctx.beginPath(); ctx.rect(left, top - 2, pw, ph + 4); ctx.clip();
    var drawn = [];
    opts.series.forEach(function (s) {
      var sx = s.x || xs;
      var cut = {};
      (s.breaks || (s.x ? [] : opts.breaks) || []).forEach(function (i) { cut[i] = true; });
      var spans = [], span = null;
      for (var k = 0; k < s.values.length; k++) {
        var v = s.values[k];
        if (v === null || v === undefined) { span = null; continue; }
        if (cut[k] || !span) { span = []; spans.push(span); }
        span.push([sx[k], v]);
      }
      ctx.save(); ctx.strokeStyle = s.color; ctx.fillStyle = s.color;
      ctx.lineWidth = s.width || 2; ctx.lineJoin = "round";
      if (s.dash) ctx.setLineDash(s.dash);
      spans.forEach(function (points) {
        if (points.length === 1) {
          ctx.beginPath(); ctx.arc(X(points[0][0]), Y(points[0][1]), (s.width || 2) + 0.5, 0, 2 * Math.PI); ctx.fill();
          return;
        }
        ctx.beginPath();
        points.forEach(function (q, n) { if (n) ctx.lineTo(X(q[0]), Y(q[1])); else ctx.moveTo(X(q[0]), Y(q[1])); });
        ctx.stroke();
      });
      ctx.restore();
      drawn.push({ label: s.label || "", spans: spans.map(function (q) { return [q[0][0], q[q.length - 1][0], q.length]; }) });
    });
    ctx.restore();
    canvas.dataset.segments = JSON.stringify(drawn);
    if (!xs.length && !opts.series.some(function (s) { return s.values.length; })) {
      ctx.fillStyle = "#8b949e"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText("collecting history…", left + pw / 2, top + ph / 2);
    }
  }

  function legend(id, items) {
    var box = $(id);
    var key = JSON.stringify(items);
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.textContent = "";
    items.forEach(function (it) {
      var s = el("span");
      var sw = el("i", "sw" + (it.dash ? " dashed" : ""));
      sw.style.background = it.dash ? "transparent" : it.color;
      sw.style.borderColor = it.color;
      s.appendChild(sw);
      s.appendChild(document.createTextNode(it.label + (it.value !== undefined ? " " + it.value : "")));
      box.appendChild(s);
    });
  }

  // ---------------------------------------------------------------- state

  var last = null;        // last data answer
  var lastOkAt = 0;       // Date.now() of the last good answer
  var clockOffset = 0;    // server now - browser now
  var failure = null;     // last ApiFailure while polling
  var selectedSale = new URL(location.href).searchParams.get("sale") || "";

  // The operator's pick (the list, or ?sale= in the address) sticks; else the sale the
  // service names as the most recent (data.current_sale: latest T0 among those not closed).
  function pickSale(data) {
    if (selectedSale && data.sales[selectedSale]) return selectedSale;
    return data.current_sale && data.sales[data.current_sale] ? data.current_sale : "";
  }

  // ---------------------------------------------------------------- rendering

  function alertClass(node, firing) { node.classList.toggle("alert", !!firing); }

  function render(data) {
    last = data;
    var saleName = pickSale(data);
    var sale = data.sales[saleName] || null;

    // sale picker
    var sel = $("sale-select");
    var names = Object.keys(data.sales).sort();
    if (sel.dataset.key !== names.join(",")) {
      sel.dataset.key = names.join(",");
      sel.textContent = "";
      if (!names.length) sel.appendChild(el("option", "", "no sale yet"));
      names.forEach(function (n) { var o = el("option", "", n); o.value = n; sel.appendChild(o); });
    }
    if (saleName) sel.value = saleName;

    // health banner
    var health = $("health");
    // Anything but "healthy" is red: a status the service adds later never shows as green.
    health.dataset.status = data.health.status === "healthy" ? "healthy" : "alert";
    setText("health-word", data.health.status === "healthy" ? "HEALTHY" : "ALERT");
    var summary;
    if (data.health.status === "healthy") {
      var skuList = sale ? Object.keys(sale.skus).map(function (k) { return sale.skus[k]; }) : [];
      var allGone = skuList.length && skuList.every(function (s) { return s.available <= 0; });
      var within = "latency, errors and the order queue are within their limits.";
      summary = !sale ? "No sale yet; the service is within its limits."
        : sale.phase === "countdown" ? "Waiting for T0; " + within
        : sale.phase === "closed" ? "The sale is closed; " + within
        : allGone ? "Everything is sold out or held; " + within
        : "Orders are flowing: " + within;
    } else {
      summary = data.health.reasons.length + " thing" + (data.health.reasons.length > 1 ? "s need" : " needs") + " attention:";
    }
    setText("health-summary", summary);
    var reasons = $("health-reasons");
    var rkey = data.health.reasons.join("\n");
    if (reasons.dataset.key !== rkey) {
      reasons.dataset.key = rkey;
      reasons.textContent = "";
      data.health.reasons.forEach(function (r) { reasons.appendChild(el("li", "", r)); });
    }

    // tiles
    var rates = data.rates_now;
    setText("v-created-rate", fmtRate(rates.created));
    setText("v-created-total", fmtInt(data.orders.created));
    var a = data.alerts;
    setText("v-p99", fmtMs(a.p99_ms.value));
    setText("v-p50", fmtMs(data.latency_ms.p50));
    setText("v-p99-limit", fmtMs(a.p99_ms.limit));
    setText("v-error-ratio", (a.error_ratio.value * 100).toLocaleString("en-US", { maximumFractionDigits: 2 }) + " %");
    setText("v-error-limit", (a.error_ratio.limit * 100).toLocaleString("en-US", { maximumFractionDigits: 2 }) + " %");
    setText("v-backlog", fmtInt(a.backlog.value));
    setText("v-backlog-limit", fmtInt(a.backlog.limit));
    var wr = data.history.writer_rate.filter(function (v) { return v !== null; });
    var commit = data.writer.last_commit_ms;
    setText("v-writer", !Object.keys(data.writer).length ? "no order writer has reported yet"
      : "writer " + (wr.length ? fmtRate(wr[wr.length - 1]) : "–") + "/s" +
        (commit ? " · last commit " + fmtAgo(data.now_ms - commit) : ""));
    setText("v-dead", fmtInt(a.dead_letters.value));
    var holds = 0, lapsing = 0, overdue = 0;
    Object.keys(data.sales).forEach(function (n) {
      holds += data.sales[n].holds_pending; lapsing += data.sales[n].holds_lapsing; overdue += data.sales[n].holds_overdue;
    });
    setText("v-holds", fmtInt(holds));
    setText("v-lapsing", fmtInt(lapsing));
    setText("v-overdue", fmtInt(overdue));
    // data-alert names one alert or several (space-separated): red when any of them fires.
    document.querySelectorAll("[data-alert]").forEach(function (node) {
      alertClass(node, node.dataset.alert.split(" ").some(function (name) { return a[name] && a[name].firing; }));
    });

    var t = data.target;
    if (t) {
      // The curve counts demand; stock caps orders: compare with what the stock allowed.
      setText("v-target-ratio", t.ratio === null ? "–" : Math.round(t.ratio * 100) + " %");
      setText("v-target-detail", t.capped_by_stock
        ? fmtInt(t.actual_now) + " of " + fmtInt(t.compared_with) + " the stock allows (target " + fmtInt(t.expected_now) + ") · " + t.scenario
        : fmtInt(t.actual_now) + " of " + fmtInt(t.expected_now) + " expected now · " + t.scenario);
      $("tile-target").dataset.behind = t.ratio !== null && t.ratio < 0.8 ? "1" : "";
    } else {
      setText("v-target-ratio", "–");
      setText("v-target-detail", "no target registered");
      $("tile-target").dataset.behind = "";
    }

    renderCharts(data);
    renderSkus(data, saleName, sale);
    renderControls(data, saleName, sale);
    renderLog(data.log);
  }

  function renderCharts(data) {
    var h = data.history;
    var clock = function (x) { return fmtClock(x); };
    // The last five minutes, or less while the history is younger (at least one minute).
    var xMax = data.now_ms;
    var xMin = Math.max(data.now_ms - h.window_ms, (h.t_ms.length ? h.t_ms[0] : data.now_ms) - 5000);
    xMin = Math.min(xMin, data.now_ms - 60000);
    var groups = ["created", "sold_out", "limited", "shed", "unknown", "other"];
    drawChart($("chart-outcomes"), {
      x: h.t_ms, breaks: h.breaks, xMin: xMin, xMax: xMax, xFormat: clock,
      series: groups.map(function (g) { return { label: g, color: COLORS[g], values: h.rates[g], width: g === "created" ? 2.5 : 1.5 }; }),
    });
    legend("legend-outcomes", groups.map(function (g) {
      return { label: OUTCOME_LABELS[g], color: COLORS[g], value: fmtRate(data.rates_now[g]) + "/s" };
    }));

    var p99Limit = data.thresholds.p99_ms;
    drawChart($("chart-latency"), {
      x: h.t_ms, breaks: h.breaks, xMin: xMin, xMax: xMax, xFormat: clock,
      series: [{ label: "p50", color: COLORS.p50, values: h.p50_ms }, { label: "p99", color: COLORS.p99, values: h.p99_ms }],
      lines: [{ y: p99Limit, color: COLORS.limit, label: "alert above " + fmtMs(p99Limit) + " ms" }],
    });
    legend("legend-latency", [
      { label: "p50", color: COLORS.p50, value: fmtMs(data.latency_ms.p50) + " ms" },
      { label: "p99", color: COLORS.p99, value: fmtMs(data.latency_ms.p99) + " ms" },
      { label: "alert line", color: COLORS.limit, dash: true },
    ]);

    drawChart($("chart-queue"), {
      x: h.t_ms, breaks: h.breaks, xMin: xMin, xMax: xMax, xFormat: clock,
      series: [{ label: "backlog", color: COLORS.backlog, values: h.backlog }, { label: "writer", color: COLORS.writer, values: h.writer_rate }],
      lines: [{ y: data.thresholds.backlog, color: COLORS.limit, label: "alert above " + fmtInt(data.thresholds.backlog) }],
    });
    legend("legend-queue", [
      { label: "backlog (entries)", color: COLORS.backlog, value: fmtInt(data.alerts.backlog.value) },
      { label: "writer (entries/s)", color: COLORS.writer },
      { label: "alert line", color: COLORS.limit, dash: true },
    ]);

    var p = data.progress, t = data.target;
    var rel = function (x) { return (x < 0 ? "−" : "+") + fmtDuration(x); };
    var series = [], items = [];
    var xEnd = 60000, xStart = 0;
    if (t) {
      series.push({ label: "target", x: t.points.map(function (q) { return q[0]; }), values: t.points.map(function (q) { return q[1]; }),
                    color: COLORS.target, dash: [6, 4], width: 2 });
      xEnd = Math.max(xEnd, t.points[t.points.length - 1][0]);
      xStart = Math.min(xStart, t.points[0][0]);
      items.push({ label: "target (" + t.scenario + ")", color: COLORS.target, dash: true });
      setText("target-caption", "(time from T0 of the scenario)");
    } else {
      setText("target-caption", "(no target registered: the rehearsal registers one)");
    }
    if (p) {
      series.push({ label: "orders created", x: p.points.map(function (q) { return q[0]; }), values: p.points.map(function (q) { return q[1]; }),
                    breaks: p.breaks, color: COLORS.actual, width: 2.5 });
      var nowRel = data.now_ms - p.origin_ms;
      xEnd = Math.max(xEnd, nowRel * 1.05);
      items.push({ label: "orders created", color: COLORS.actual,
                   value: fmtInt(p.points.length ? p.points[p.points.length - 1][1] : 0) });
    }
    var capLines = [];
    if (t && t.capped_by_stock) {
      var allows = t.actual_now + t.stock_left;
      capLines.push({ y: allows, color: COLORS.backlog, label: "the stock allows " + fmtInt(allows) + " orders" });
      items.push({ label: "stock cap", color: COLORS.backlog, dash: true });
    }
    drawChart($("chart-target"), {
      x: [], xMin: xStart, xMax: xEnd, xFormat: rel, series: series, lines: capLines,
      vline: p ? { x: Math.max(xStart, Math.min(xEnd, data.now_ms - p.origin_ms)), label: "now" } : undefined,
    });
    legend("legend-target", items);
  }

  function renderSkus(data, saleName, sale) {
    var box = $("skus");
    if (!sale) { if (!box.querySelector(".dim")) { box.textContent = ""; box.appendChild(el("p", "dim", "no sale yet")); } return; }
    if (box.dataset.sale !== saleName) { box.dataset.sale = saleName; box.textContent = ""; }
    var skus = Object.keys(sale.skus).sort();
    skus.forEach(function (sku) {
      var s = sale.skus[sku];
      var row = box.querySelector('.sku[data-sku="' + CSS.escape(sku) + '"]');
      if (!row) { row = buildSkuRow(sku); box.appendChild(row); }
      var total = Math.max(1, s.total);
      row.dataset.available = s.available; row.dataset.held = s.held; row.dataset.sold = s.sold;
      row.dataset.reserve = s.reserve; row.dataset.total = s.total; row.dataset.state = s.state;
      var low = s.available > 0 && s.available <= s.low_stock_line;
      var segs = { available: s.available, reserve: s.reserve, held: s.held, sold: s.sold };
      Object.keys(segs).forEach(function (k) {
        var seg = row.querySelector(".seg." + k);
        seg.style.width = (segs[k] / total * 100) + "%";
        seg.title = k + ": " + fmtInt(segs[k]);
      });
      row.querySelector(".seg.available").classList.toggle("low", low);
      var line = row.querySelector(".low-line");
      line.hidden = !(s.low_stock_line > 0);
      line.style.left = (s.low_stock_line / total * 100) + "%";
      var badge = row.querySelector(".badge");
      badge.className = "badge " + s.state;
      badge.textContent = s.state === "sold_out" ? "SOLD OUT" : s.state === "low" ? "LOW" : "IN STOCK";
      var moment = row.querySelector(".sku-moment");
      var when = function (ms) { return fmtT0(ms, sale.opens_at_ms) + " (" + fmtClock(ms) + ")"; };
      var first = s.first_sold_out_at_ms && s.first_sold_out_at_ms !== s.sold_out_at_ms
        ? "first sold out at " + fmtT0(s.first_sold_out_at_ms, sale.opens_at_ms) : "";
      if (s.sold_out_at_ms) {
        moment.textContent = (s.sold_out_exact ? "sold out at " + when(s.sold_out_at_ms)
          : "already sold out when first watched, " + when(s.sold_out_at_ms)) + (first ? " · " + first : "");
      } else {
        moment.textContent = first ? "back in stock · " + first : "";
      }
      row.querySelector(".sku-nums").textContent =
        "left " + fmtInt(s.available) + " · reserve " + fmtInt(s.reserve) + " · held " + fmtInt(s.held) +
        " · sold " + fmtInt(s.sold) + " of " + fmtInt(s.total) +
        (s.low_stock_line > 0 ? " · low-stock line " + fmtInt(s.low_stock_line) : "") +
        (s.limit_per_user > 0 ? " · limit " + s.limit_per_user + " per buyer" : "");
      var rel = row.querySelector('[data-action="release_reserve"]');
      rel.disabled = s.reserve <= 0;
      rel.textContent = s.reserve > 0 ? "Release reserve pool (" + fmtInt(s.reserve) + ")" : "No reserve pool left";
    });
    box.querySelectorAll(".sku").forEach(function (row) { if (!sale.skus[row.dataset.sku]) row.remove(); });
  }

  function buildSkuRow(sku) {
    var row = el("div", "sku"); row.dataset.sku = sku;
    var head = el("div", "sku-head");
    head.appendChild(el("span", "sku-name", sku));
    head.appendChild(el("span", "badge"));
    head.appendChild(el("span", "sku-moment"));
    var actions = el("span", "sku-actions");
    var rel = el("button", "", "Release reserve pool"); rel.type = "button"; rel.dataset.action = "release_reserve"; rel.dataset.sku = sku;
    var res = el("button", "", "Restock…"); res.type = "button"; res.dataset.action = "restock"; res.dataset.sku = sku;
    actions.appendChild(rel); actions.appendChild(res);
    head.appendChild(actions);
    row.appendChild(head);
    var bar = el("div", "bar");
    ["available", "reserve", "held", "sold"].forEach(function (k) { bar.appendChild(el("div", "seg " + k)); });
    var line = el("div", "low-line"); line.title = "low-stock line";
    bar.appendChild(line);
    row.appendChild(bar);
    row.appendChild(el("div", "sku-nums"));
    return row;
  }

  function renderControls(data, saleName, sale) {
    var label = $("sale-state-label");
    label.textContent = sale ? saleName + " · " + sale.phase : "no sale";
    label.className = "badge " + (sale ? sale.phase : "");
    $("btn-open").disabled = !sale || sale.phase === "open";
    $("btn-close").disabled = !sale || sale.phase === "closed";
    var box = $("switches");
    Object.keys(data.switches).sort().forEach(function (name) {
      var on = data.switches[name];
      var row = box.querySelector('[data-switch="' + name + '"]');
      if (!row) {
        row = el("div", "switch"); row.dataset.switch = name;
        row.appendChild(el("span", "switch-name", name.replace("_", " ")));
        row.appendChild(el("span", "badge"));
        var b = el("button"); b.type = "button"; b.dataset.action = "switches"; b.dataset.switch = name;
        row.appendChild(b);
        box.appendChild(row);
      }
      var badge = row.querySelector(".badge");
      badge.textContent = on ? "ON" : "OFF";
      badge.className = "badge " + (on ? "on" : "off");
      var btn = row.querySelector("button");
      btn.textContent = on ? "Switch off" : "Switch on";
      btn.dataset.to = on ? "off" : "on";
    });
  }

  function renderLog(logData) {
    var pg = logData.postgres === "ok" ? "every entry is in PostgreSQL"
      : logData.postgres === "no_database" ? "no PostgreSQL configured: kept in Redis only"
      : logData.unwritten + " waiting for PostgreSQL" + (logData.postgres_error ? " (" + logData.postgres_error + ")" : "");
    setText("log-pg", pg);
    $("log-pg").classList.toggle("warn", logData.postgres === "pending");
    var body = $("log-rows");
    var key = logData.entries.map(function (e) { return e.id; }).join(",");
    if (body.dataset.key === key) return;
    body.dataset.key = key;
    body.textContent = "";
    if (!logData.entries.length) {
      var tr0 = el("tr"); var td0 = el("td", "dim", "nothing pressed yet"); td0.colSpan = 6; tr0.appendChild(td0); body.appendChild(tr0);
      return;
    }
    logData.entries.forEach(function (e) {
      var tr = el("tr"); tr.dataset.action = e.action; tr.dataset.outcome = e.outcome;
      tr.appendChild(el("td", "mono", fmtClock(e.at_ms)));
      tr.appendChild(el("td", "", e.operator));
      tr.appendChild(el("td", "", e.action.replace("_", " ")));
      tr.appendChild(el("td", "mono", [e.sale, e.sku].filter(Boolean).join(" / ") || "—"));
      var asked = Object.keys(e.params || {}).map(function (k) { return k + "=" + JSON.stringify(e.params[k]); }).join(" ");
      tr.appendChild(el("td", "mono", (asked || "—") + (e.note ? " “" + e.note + "”" : "")));
      tr.appendChild(el("td", e.outcome === "ok" ? "ok" : "bad", e.outcome === "ok" ? "done" : e.status + " " + e.outcome));
      body.appendChild(tr);
    });
  }

  // ---------------------------------------------------------------- countdown and freshness (10 Hz)

  function tick() {
    var now = Date.now() + clockOffset;
    var sale = last && last.sales[pickSale(last)];
    var phaseEl = $("phase"), cd = $("countdown");
    if (!sale) {
      phaseEl.dataset.phase = ""; setText("phase", "—"); setText("countdown", "no sale");
    } else {
      var phase = sale.phase === "countdown" && now >= sale.opens_at_ms ? "open" : sale.phase;
      phaseEl.dataset.phase = phase;
      setText("phase", { countdown: "OPENS IN", open: "OPEN", closed: "CLOSED", fenced: "FENCED" }[phase]);
      setText("countdown", phase === "countdown" ? fmtDuration(sale.opens_at_ms - now) : fmtT0(now, sale.opens_at_ms));
      cd.title = "T0 " + new Date(sale.opens_at_ms).toISOString();
    }
    var age = Date.now() - lastOkAt;
    var fresh = $("freshness");
    if (failure && failure.status === 401) {
      fresh.textContent = "admin token rejected — open the war-room link again";
    } else if (!lastOkAt) {
      fresh.textContent = failure ? "no data: " + failure.message : "connecting…";
    } else {
      fresh.textContent = age > STALE_MS
        ? "NO DATA for " + Math.round(age / 1000) + " s" + (failure ? " — " + failure.message : "")
        : "updated " + (age / 1000).toFixed(1) + " s ago";
    }
    var stale = !lastOkAt || age > STALE_MS;
    document.body.classList.toggle("stale", stale && !!lastOkAt);
    fresh.classList.toggle("bad", stale && (!!failure || !!lastOkAt));
    if (stale && (lastOkAt || failure)) {
      $("health").dataset.status = "stale";
      setText("health-word", "NO DATA");
      setText("health-summary", failure && failure.status === 401
        ? "The admin token was not accepted. Open the war-room link (with ?token=) again."
        : "The page has not heard from the service for a while: the numbers below are old.");
    }
  }

  // ---------------------------------------------------------------- polling

  function poll() {
    var started = performance.now();
    var sent = Date.now();
    api("GET", "/api/admin/warroom").then(function (r) {
      var got = Date.now();
      clockOffset = r.json.now_ms - (sent + got) / 2;
      failure = null;
      lastOkAt = got;
      render(r.json);
    }, function (err) {
      failure = err instanceof ApiFailure ? err : new ApiFailure(0, "page_error", String(err));
      if (!(err instanceof ApiFailure)) console.error(err);
    }).then(function () {
      tick();
      setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started)));
    });
  }

  // ---------------------------------------------------------------- controls

  var dialog = $("confirm");
  var pending = null;

  function ask(title, text, opts) {
    pending = opts;
    setText("confirm-title", title);
    setText("confirm-text", text);
    $("confirm-units-row").hidden = !opts.units;
    $("confirm-note").value = "";
    $("confirm-ok").textContent = opts.ok || "Confirm";
    $("confirm-ok").classList.toggle("danger", !!opts.danger);
    dialog.showModal();
    (opts.units ? $("confirm-units") : $("confirm-ok")).focus();
  }

  function toast(text, bad) {
    var t = $("toast");
    t.textContent = text; t.hidden = false; t.classList.toggle("bad", !!bad);
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { t.hidden = true; }, 8000);
  }

  function press(path, body, what) {
    var headers = {
      "X-Operator": encodeURIComponent($("operator").value.trim()),
      "X-Operator-Note": encodeURIComponent($("confirm-note").value.trim()),
    };
    return api("POST", path, body, headers).then(function (r) {
      var logged = (r.headers.get("X-Operator-Log") || "").split("postgres=")[1] || "?";
      toast(what + ": done · logged (PostgreSQL: " + logged + ")");
    }, function (err) {
      toast(what + ": refused — " + err.message + " (" + err.code + ")", true);
    }).then(function () { return api("GET", "/api/admin/warroom").then(function (r) { lastOkAt = Date.now(); render(r.json); }, function () {}); });
  }

  $("confirm-cancel").addEventListener("click", function () { pending = null; dialog.close(); });
  $("confirm-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var p = pending; pending = null;
    if (!p) { dialog.close(); return; }
    var body = p.body;
    if (p.units) {
      var units = parseInt($("confirm-units").value, 10);
      if (!(units >= 1)) { $("confirm-units").focus(); pending = p; return; }
      body = { units: units };
    }
    var run = press(p.path, body, p.what);
    dialog.close();
    return run;
  });

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest && ev.target.closest("button[data-action]");
    if (!btn || btn.disabled || !last) return;
    var saleName = pickSale(last), sale = last.sales[saleName];
    var enc = encodeURIComponent;
    var action = btn.dataset.action;
    if (action === "open_sale" && sale) {
      ask("Open sale " + saleName + " now?", "Buyers can order at once" +
          (sale.phase === "countdown" ? ", " + fmtDuration(sale.opens_at_ms - Date.now() - clockOffset) + " before the planned T0." : "."),
          { path: "/api/admin/warroom/sales/" + enc(saleName) + "/open", what: "open " + saleName, ok: "Open now" });
    } else if (action === "close_sale" && sale) {
      ask("Close sale " + saleName + "?", "Every new order is refused with 409 sale_closed until it is opened again. Holds already made stay.",
          { path: "/api/admin/warroom/sales/" + enc(saleName) + "/close", what: "close " + saleName, ok: "Close sale", danger: true });
    } else if (action === "release_reserve" && sale) {
      var s = sale.skus[btn.dataset.sku];
      ask("Release the reserve pool of " + btn.dataset.sku + "?",
          fmtInt(s.reserve) + " units held back go on sale now (left for sale: " + fmtInt(s.available) + " → " + fmtInt(s.available + s.reserve) + ").",
          { path: "/api/admin/warroom/sales/" + enc(saleName) + "/skus/" + enc(btn.dataset.sku) + "/release-reserve",
            what: "release reserve pool of " + btn.dataset.sku, ok: "Release " + fmtInt(s.reserve) + " units" });
    } else if (action === "restock" && sale) {
      ask("Restock " + btn.dataset.sku + "?", "The units are added to the stock for sale (the total grows too).",
          { path: "/api/admin/warroom/sales/" + enc(saleName) + "/skus/" + enc(btn.dataset.sku) + "/restock",
            what: "restock " + btn.dataset.sku, units: true, ok: "Restock" });
    } else if (action === "switches") {
      var name = btn.dataset.switch, to = btn.dataset.to === "on";
      var body = {}; body[name] = to;
      ask("Switch " + name.replace("_", " ") + " " + (to ? "on" : "off") + "?",
          to ? "The endpoint answers normally again." : "The endpoint answers 503 degraded until switched on: orders keep working.",
          { path: "/api/admin/warroom/switches", body: body, what: "switch " + name + " " + (to ? "on" : "off"),
            ok: "Switch " + (to ? "on" : "off"), danger: !to });
    }
  });

  $("sale-select").addEventListener("change", function (ev) {
    selectedSale = ev.target.value;
    var url = new URL(location.href);
    url.searchParams.set("sale", selectedSale);
    history.replaceState(null, "", url.pathname + url.search);
    if (last) render(last);
  });

  var op = $("operator");
  op.value = sessionStorage.getItem(OPERATOR_KEY) || "";
  op.addEventListener("change", function () { sessionStorage.setItem(OPERATOR_KEY, op.value.trim()); });
  window.addEventListener("resize", function () { if (last) renderCharts(last); });

  setInterval(tick, 100);
  poll();
})();
