// fedmoe operator dashboard: reads /api/* (bearer token) and redraws on server-sent events.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || sessionStorage.getItem("fedmoe_token") || "";
  if (params.get("token")) {
    sessionStorage.setItem("fedmoe_token", token);
    history.replaceState(null, "", location.pathname);  // keep the token out of the address bar and history
  }

  const state = { overview: null, refreshes: 0, events: [], live: false, refused: false, settled: false };
  window.fedmoe = state;  // for automation and the browser test

  const $ = (id) => document.getElementById(id);
  const COLORS = ["#3b6fd8", "#e07b39", "#2e9e6a", "#c2417d", "#8a63d2", "#b59b17", "#1fa2b5", "#7f7f7f"];
  const PLOT_CONFIG = { displayModeBar: false, responsive: true };
  const BASE_LAYOUT = {
    margin: { l: 50, r: 10, t: 10, b: 40 }, font: { size: 12 }, paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)", legend: { orientation: "h", y: -0.2 }, hovermode: "closest",
  };
  const expertColor = {};
  function colorOf(expert) {
    if (!(expert in expertColor)) expertColor[expert] = COLORS[Object.keys(expertColor).length % COLORS.length];
    return expertColor[expert];
  }
  const label = (e) => (e === "all" ? "all (single-model FedAvg baseline)" : e);

  async function api(path) {
    const r = await fetch(path, { headers: token ? { Authorization: "Bearer " + token } : {}, cache: "no-store" });
    if (r.status === 401) { refused(); throw new Error("unauthorized"); }
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  function refused() {
    state.refused = true;
    $("refused").hidden = false;
    $("main").hidden = true;
  }

  // -- formatting ---------------------------------------------------------------------------------
  function fmtDuration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
  }
  function fmtBytes(b) {
    if (!b) return "0 B";
    const u = ["B", "kB", "MB", "GB", "TB"];
    const i = Math.min(u.length - 1, Math.floor(Math.log10(b) / 3));
    return (b / Math.pow(1000, i)).toFixed(i ? 1 : 0) + " " + u[i];
  }
  function fmtAgo(t) {
    if (!t) return "never";
    const s = Date.now() / 1000 - t;
    return s < 90 ? `${Math.max(0, Math.round(s))} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago`
      : new Date(t * 1000).toLocaleString();
  }
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function fillTable(id, rows, cols, rowClass) {
    const tbody = $(id).querySelector("tbody");
    tbody.replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      if (rowClass) tr.className = rowClass(r) || "";
      for (const [fn, cls] of cols) tr.appendChild(cell(fn(r), cls));
      return tr;
    }));
  }

  // -- drawing ------------------------------------------------------------------------------------
  function drawOverview(o) {
    state.overview = o;
    $("run-name").textContent = `${o.name}${o.preset ? " · preset " + o.preset : ""}`;
    const badge = $("run-state");
    badge.textContent = o.state;
    badge.className = "badge " + o.state;
    $("run-round").textContent = `${o.current_round} / ${o.total_rounds || "?"}`;
    const inFlight = o.committed_rounds !== o.current_round ? `${o.committed_rounds} committed, 1 in flight` : "";
    const served = o.serving ? `serving round ${o.serving.round ?? "—"}` : "";  // fedmoe serve's dashboard
    $("run-round-sub").textContent = [inFlight, served].filter(Boolean).join(" · ");
    tickClock();
    $("run-eta").textContent = o.state === "running" ? fmtDuration(o.eta_seconds) : o.state === "waiting" ? "—" : "done";
    $("run-sites").textContent = o.sites;
    $("run-bytes").textContent = `${fmtBytes(o.bytes_sent)} / ${fmtBytes(o.bytes_received)}`;
    $("run-rejections").textContent = o.rejections;
  }

  function tickClock() {
    const o = state.overview;
    if (!o) return;
    const elapsed = o.state === "running" && o.started ? Date.now() / 1000 - o.started : o.elapsed_seconds;
    $("run-elapsed").textContent = o.started ? fmtDuration(elapsed) : "—";
  }

  function lineTraces(byExpert) {
    return Object.keys(byExpert).sort().map((e) => ({
      name: label(e), x: byExpert[e].map((p) => p[0]), y: byExpert[e].map((p) => p[1]), type: "scatter",
      mode: "lines+markers", line: { color: colorOf(e), dash: e === "all" ? "dash" : "solid" }, meta: e,
    }));
  }

  function roundAxis() { return { title: { text: "round" }, dtick: 1, zeroline: false }; }
  function show(id, on) { $(id).classList.toggle("empty", !on); }

  function drawLoss(loss) {
    Plotly.react("chart-loss", lineTraces(loss), { ...BASE_LAYOUT, xaxis: roundAxis(), yaxis: { title: { text: "site train loss" } } }, PLOT_CONFIG);
  }

  function drawFinalBars(id, final, metric) {
    const methods = Object.keys(final);
    const domains = [...new Set(methods.flatMap((m) => Object.keys(final[m])))].filter((d) => d !== "mixed").sort();
    domains.push("mixed");
    const traces = methods.map((m, i) => ({
      name: m, type: "bar", x: domains, y: domains.map((d) => final[m][d] ?? null), marker: { color: COLORS[i % COLORS.length] },
    }));
    Plotly.react(id, traces, { ...BASE_LAYOUT, barmode: "group", yaxis: { title: { text: metric || "exact-match accuracy" }, range: [0, 1] } }, PLOT_CONFIG);
  }

  function drawAccuracy(acc) {
    // Per-round curves (the sites' evaluation of each expert) when the run store has them;
    // the final report's bars beside them (or alone, for a run without per-round evaluation).
    $("accuracy-note").textContent = acc.note || "";
    if (acc.per_round) {
      show("chart-accuracy", true);
      Plotly.react("chart-accuracy", lineTraces(acc.per_round),
        { ...BASE_LAYOUT, xaxis: roundAxis(), yaxis: { title: { text: "site eval accuracy" }, range: [0, 1] } }, PLOT_CONFIG);
      show("chart-final", Boolean(acc.final));
      if (acc.final) drawFinalBars("chart-final", acc.final, acc.metric); else Plotly.purge("chart-final");
    } else {
      show("chart-final", false);
      Plotly.purge("chart-final");
      show("chart-accuracy", Boolean(acc.final));
      if (acc.final) drawFinalBars("chart-accuracy", acc.final, acc.metric); else Plotly.purge("chart-accuracy");
    }
  }

  function drawSites(sites) {
    fillTable("sites-table", sites, [
      [(s) => s.site || s.node_id], [(s) => s.domain], [(s) => s.rank, "num"], [(s) => fmtAgo(s.last_seen)],
      [(s) => s.rounds_joined, "num"], [(s) => s.failures, "num"], [(s) => s.rejections, "num"],
      [(s) => fmtBytes(s.bytes_sent), "num"], [(s) => fmtBytes(s.bytes_received), "num"],
    ], (s) => (s.failures || s.rejections ? "bad" : ""));
    // /api/sites sends one page (100 sites by name); the overview counts them all
    const total = state.overview ? state.overview.sites : sites.length;
    $("sites-shown").textContent = total > sites.length ? `first ${sites.length} of ${total} sites, by name` : "";
  }

  function drawExperts(ex) {
    Plotly.react("chart-norm", lineTraces(ex.update_norm || {}),
      { ...BASE_LAYOUT, xaxis: roundAxis(), yaxis: { title: { text: "‖ΔW‖_F of the round's aggregate" } } }, PLOT_CONFIG);
    const experts = ex.experts.filter((e) => !e.error);
    const layers = ex.layers;
    const z = experts.map((e) => layers.map((l) => e.layers[l] ?? null));
    Plotly.react("chart-layers", [{
      type: "heatmap", x: layers.map((l) => (/^\d+$/.test(l) ? "layer " + l : l)),
      y: experts.map((e) => `${e.expert === "all" ? "all (baseline)" : e.expert} · r${e.rank} · round ${e.round}`),
      z, colorscale: "Blues", reversescale: true, colorbar: { title: { text: "‖sBA‖_F" } }, hovertemplate: "%{y}<br>%{x}: %{z:.4f}<extra></extra>",
    }], { ...BASE_LAYOUT, margin: { l: 170, r: 10, t: 10, b: 40 } }, PLOT_CONFIG);
    const share = ex.routing_share;
    if (share && Object.keys(share).length) {
      $("routing-note").textContent = "";
      show("chart-routing", true);
      const names = Object.keys(share).sort();
      Plotly.react("chart-routing", [{ type: "bar", x: names, y: names.map((n) => share[n]), marker: { color: names.map(colorOf) } }],
        { ...BASE_LAYOUT, yaxis: { title: { text: "share of requests" }, range: [0, 1] } }, PLOT_CONFIG);
    } else {
      $("routing-note").textContent = "No gate in this run yet: the routing share appears once a gate routes requests.";
      Plotly.purge("chart-routing");
      show("chart-routing", false);
    }
  }

  function drawPrivacy(p) {
    if (p.enabled) {
      $("privacy-note").textContent = "";
      show("chart-privacy", true);
      const name = p.series.epsilon ? "epsilon" : p.series.dp_epsilon ? "dp_epsilon" : Object.keys(p.series)[0];
      Plotly.react("chart-privacy", lineTraces(p.series[name]),
        { ...BASE_LAYOUT, xaxis: roundAxis(), yaxis: { title: { text: name.replace("dp_", "") + " spent" } } }, PLOT_CONFIG);
    } else {
      $("privacy-note").textContent = "Differential privacy is not enabled in this run: no privacy spend recorded.";
      Plotly.purge("chart-privacy");
      show("chart-privacy", false);
    }
  }

  function drawRounds(rounds) {
    fillTable("rounds-table", rounds.slice().reverse(), [
      [(r) => r.round, "num"], [(r) => r.state], [(r) => fmtDuration(r.seconds)], [(r) => fmtBytes(r.bytes_sent), "num"],
      [(r) => fmtBytes(r.bytes_received), "num"], [(r) => r.rejections, "num"],
    ]);
  }

  function drawRejections(rej) {
    fillTable("rejections-table", rej.slice(-50).reverse(), [
      [(r) => r.round, "num"], [(r) => r.site || r.node_id], [(r) => r.expert], [(r) => r.reason, "reason"],
    ]);
  }

  // -- refresh ------------------------------------------------------------------------------------
  let pending = null, running = false, again = false;
  async function refresh() {
    if (running) { again = true; return; }
    running = true;
    try {
      // Each part draws as soon as its data arrives; a slow one (per-layer norms) holds up no other.
      const parts = [["/api/run", drawOverview], ["/api/loss", drawLoss], ["/api/accuracy", drawAccuracy],
        ["/api/sites", drawSites], ["/api/experts", drawExperts], ["/api/privacy", drawPrivacy],
        ["/api/rounds", drawRounds], ["/api/rejections", drawRejections]];
      await Promise.all(parts.map(([path, draw]) => api(path).then(draw)));
      state.refreshes += 1;
      // A run that is no longer running does not change: the stream's opening snapshot
      // must not redraw (and so replace) tables someone is reading.
      state.settled = !["running", "waiting"].includes(state.overview && state.overview.state);
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (!state.refused) console.error(err);
    } finally {
      running = false;
      if (again) { again = false; schedule(); }
    }
  }
  function schedule() {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(); }, 150);
  }

  function logEvent(ev) {
    state.events.push(ev);
    const li = document.createElement("li");
    li.textContent = `${new Date(ev.time * 1000).toLocaleTimeString()}  ${ev.message}`;
    $("events").prepend(li);
    while ($("events").children.length > 100) $("events").lastChild.remove();
  }

  function connect() {
    // EventSource cannot send headers: the HttpOnly cookie set on the first page load carries the token.
    const es = new EventSource("/api/events");
    const setLive = (on) => {
      state.live = on;
      $("live").className = "live " + (on ? "on" : "off");
      $("live").textContent = on ? "● live" : "○ reconnecting";
    };
    es.onopen = () => setLive(true);
    es.onerror = () => {
      setLive(false);
      // A 401 closes the stream for good; ask the API whether that is why.
      if (es.readyState === EventSource.CLOSED) api("/api/run").then(() => setTimeout(connect, 2000), () => {});
    };
    for (const kind of ["snapshot", "run_state", "round_started", "round_committed", "rejection", "sites"]) {
      es.addEventListener(kind, (msg) => {
        const ev = JSON.parse(msg.data);
        if (kind === "snapshot") {
          drawOverview(ev.overview);
          if (state.settled && !["running", "waiting"].includes(ev.overview.state)) return;
        } else logEvent(ev);
        schedule();
      });
    }
  }

  window.addEventListener("DOMContentLoaded", () => {
    refresh().then(() => { if (!state.refused) connect(); });
    setInterval(tickClock, 1000);
  });
})();
