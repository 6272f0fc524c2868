/* The report's interactive charts (loadtests/charts.py): reads the run's charts from the
   JSON in #run-charts and draws each into its figure with uPlot, inlined in the page.
   Drag across a chart to zoom into those seconds: every chart follows. Double-click zooms
   out. The legend shows each series' value at the cursor (every chart's cursor follows the
   one under the mouse); click a legend entry to hide its series. No network, no build step. */
(function () {
  "use strict";

  var spec = JSON.parse(document.getElementById("run-charts").textContent);
  var frame = spec.frame;
  var HEIGHT = 300;
  var plots = [];
  var zooming = false;

  function fmt(v) {
    if (v == null) return "—";
    if (Number.isInteger(v)) return v.toLocaleString("en");
    var a = Math.abs(v);
    if (a >= 1000) return Math.round(v).toLocaleString("en");
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return String(Math.round(v * 100) / 100);
  }

  function translucent(hex, alpha) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  /* The countdown band, the T0 line, the run's actions and (where asked) the windows' names. */
  function drawMarks(u, chart) {
    var ctx = u.ctx, top = u.bbox.top, height = u.bbox.height, px = uPlot.pxRatio;
    ctx.save();
    ctx.beginPath();
    ctx.rect(u.bbox.left, top, u.bbox.width, height);
    ctx.clip();
    ctx.font = Math.round(11 * px) + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    frame.bands.forEach(function (b) {
      var x0 = u.valToPos(b[0], "x", true), x1 = u.valToPos(b[1], "x", true);
      ctx.fillStyle = "rgba(0,0,0,0.06)";
      ctx.fillRect(x0, top, x1 - x0, height);
    });
    function vline(t, colour, dash) {
      var x = Math.round(u.valToPos(t, "x", true));
      ctx.strokeStyle = colour;
      ctx.lineWidth = px;
      ctx.setLineDash(dash.map(function (d) { return d * px; }));
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      return x;
    }
    if (frame.t0) vline(0, "#000", [5, 4]);
    frame.events.forEach(function (e) {
      var x = vline(e[0], "#9467bd", [2, 3]);
      ctx.fillStyle = "#9467bd";
      ctx.fillText(e[1], x + 3 * px, top + 3 * px);
    });
    if (chart.name_windows) {
      ctx.fillStyle = "#595959";
      frame.windows.forEach(function (w) {
        ctx.fillText(w[1], u.valToPos(w[0], "x", true) + 2 * px, top + 16 * px);
      });
    }
    ctx.restore();
  }

  function pathsFor(style) {
    if (style === "step") return uPlot.paths.stepped({ align: 1 });
    if (style === "bars") return uPlot.paths.bars({ align: 1, size: [1, Infinity] });
    return uPlot.paths.linear();
  }

  function scaleFor(kind) {
    if (kind === "log") return { distr: 3, log: 10 };
    if (kind === "symlog") {
      // Stock and the like never go below 0: no negative half of the axis.
      return {
        distr: 4,
        asinh: 10,
        range: function (u, min, max) { return [0, uPlot.rangeAsinh(0, Math.max(max, 1), 10, true)[1]]; },
      };
    }
    // Counts and rates: the axis starts at 0 (uPlot would start bars at their smallest value).
    return {
      range: function (u, min, max) {
        var r = uPlot.rangeNum(Math.min(0, min), Math.max(max, 1), 0.1, true);
        return [Math.min(0, r[0]), r[1]];
      },
    };
  }

  function build(chart, el) {
    var own = chart.series.map(function (s) {
      // A log scale has no place for 0: leave those seconds out rather than break the axis.
      return chart.scale === "log" ? s.values.map(function (v) { return v > 0 ? v : null; }) : s.values;
    });
    var drawn = own, order = chart.series.map(function (_, i) { return i; });
    if (chart.stacked) {
      // Each bar is drawn up to the sum of those below it, tallest first so the shorter
      // ones stay visible; the legend still shows each series' own value.
      var sum = frame.x.map(function () { return 0; });
      drawn = own.map(function (vals) {
        return vals.map(function (v, i) { sum[i] += v || 0; return sum[i] || null; });
      });
      order = order.reverse();
    }
    var series = [{ label: "s", value: function (u, v) { return v == null ? "—" : fmt(v) + " s"; } }];
    var data = [frame.x];
    order.forEach(function (i) {
      var s = chart.series[i];
      series.push({
        label: s.label,
        stroke: s.style === "points" ? "transparent" : (s.faint ? translucent(s.colour, 0.45) : s.colour),
        fill: s.style === "bars" ? translucent(s.colour, chart.stacked ? 0.9 : 0.55) : undefined,
        width: s.style === "points" ? 0 : (s.faint ? 5 : s.width),
        dash: s.dash ? [6, 4] : undefined,
        scale: s.right ? "y2" : "y",
        paths: s.style === "points" ? function () { return null; } : pathsFor(s.style),
        points: s.style === "points"
          ? { show: true, size: 10, stroke: s.colour, fill: s.colour }
          : { show: false },
        spanGaps: false,
        value: function (u, v, si, idx) { return idx == null ? "—" : fmt(s.values[idx]); },
      });
      data.push(drawn[i]);
    });
    var axes = [
      { label: frame.x_label, grid: { stroke: "rgba(0,0,0,0.07)" } },
      { label: chart.y_label, scale: "y", grid: { stroke: "rgba(0,0,0,0.07)" }, size: 60 },
    ];
    if (chart.scale === "symlog") {
      // uPlot's asinh axis always labels a tick below 0, under the plot: the scale starts at 0.
      axes[1].values = function (u, splits) {
        return splits.map(function (v) { return v == null || v < 0 ? "" : v.toLocaleString("en"); });
      };
    }
    var scales = { x: { time: false }, y: scaleFor(chart.scale) };
    if (chart.series.some(function (s) { return s.right; })) {
      axes.push({ label: chart.y2_label, scale: "y2", side: 1, grid: { show: false }, size: 60 });
      scales.y2 = scaleFor("linear");
    }
    var opts = {
      width: Math.max(el.clientWidth, 320),
      height: HEIGHT,
      scales: scales,
      axes: axes,
      series: series,
      legend: { live: true },
      // Only the time follows the mouse across charts: a horizontal line means nothing in the others.
      cursor: { y: false, sync: { key: "run" }, drag: { x: true, y: false } },
      hooks: {
        draw: [function (u) { drawMarks(u, chart); }],
        setScale: [
          function (u, key) {
            if (key !== "x" || zooming) return;
            zooming = true;
            plots.forEach(function (p) {
              if (p !== u) p.setScale("x", { min: u.scales.x.min, max: u.scales.x.max });
            });
            zooming = false;
          },
        ],
      },
    };
    var plot = new uPlot(opts, data, el);
    plot.chartName = chart.name;
    return plot;
  }

  spec.charts.forEach(function (chart) {
    var figure = document.getElementById("chart-" + chart.name);
    if (figure) plots.push(build(chart, figure.querySelector(".plot")));
  });
  window.addEventListener("resize", function () {
    plots.forEach(function (p) {
      p.setSize({ width: Math.max(p.root.parentNode.clientWidth, 320), height: HEIGHT });
    });
  });
  window.runCharts = plots; // for the curious, and for the report's browser test
})();
