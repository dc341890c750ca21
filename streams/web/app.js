// The loyalty dashboard: vanilla JS over the JSON API (see /api/openapi.json), no framework, no build step.
// The page state (range, period, dimension, customer) lives in the URL fragment so a view can be shared;
// the API token never does: it is read from `#token=...` once, kept in sessionStorage and removed from the URL.
"use strict";

(() => {
  const TOKEN_KEY = "loyalty.api.token";
  const TOP_EARNERS_SHOWN = 20;
  const SOURCES_IN_CHART_MAX = 12;
  const HISTORY_PAGE_SIZE = 200;
  const GRANULARITIES = ["day", "week", "month"];
  const DIMENSIONS = ["source", "rule", "product", "category"];
  const DIMENSION_TITLES = { source: "Source", rule: "Rule", product: "Product (SKU)", category: "Category" };
  const COLORS = {
    issued: "#2e7d5b",
    redeemed: "#3867d6",
    expired: "#d9822b",
    outstanding: "#6b4fbb",
    bars: ["#2e7d5b", "#3867d6", "#d9822b", "#6b4fbb", "#c2416b", "#1f8a9e", "#8a6d1f", "#5f6b7a"],
  };

  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const money = new Intl.NumberFormat("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  const $ = (selector, root = document) => root.querySelector(selector);

  const state = { from: "", to: "", granularity: "day", by: "source", customer: "" };
  const charts = { status: null, sources: null };
  let ruleset = null;
  let dashboardRequest = 0;
  let historyRequest = 0;
  let historyOffset = 0;

  class Unauthorized extends Error {}

  // ---- token and URL state -------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function readFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (params.get("token")) {
      sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    }
    const today = new Date();
    const monthAgo = new Date(today.getTime() - 29 * 86400000);
    const validDay = (value) => /^\d{4}-\d{2}-\d{2}$/.test(value || "");
    state.to = validDay(params.get("to")) ? params.get("to") : isoDay(today);
    state.from = validDay(params.get("from")) ? params.get("from") : isoDay(monthAgo);
    state.granularity = GRANULARITIES.includes(params.get("granularity")) ? params.get("granularity") : "day";
    state.by = DIMENSIONS.includes(params.get("by")) ? params.get("by") : "source";
    state.customer = (params.get("customer") || "").slice(0, 200);
    writeFragment();
  }

  function writeFragment() {
    const params = new URLSearchParams({ from: state.from, to: state.to, granularity: state.granularity, by: state.by });
    if (state.customer) params.set("customer", state.customer);
    history.replaceState(null, "", `${location.pathname}${location.search}#${params}`);
  }

  function askForToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    const error = $("#token-error");
    error.hidden = !message;
    error.textContent = message || "";
    const dialog = $("#token-dialog");
    if (!dialog.open) dialog.showModal();
    $("#token-input").focus();
  }

  // ---- API -----------------------------------------------------------------------------------------

  async function api(path, params = {}) {
    const query = new URLSearchParams(params).toString();
    const response = await fetch(query ? `${path}?${query}` : path, {
      headers: { Authorization: `Bearer ${token()}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (response.status === 401) throw new Unauthorized("The token was not accepted.");
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
    return body;
  }

  function failed(error) {
    if (error instanceof Unauthorized) {
      askForToken(error.message);
      return;
    }
    showBanner(error.message || String(error));
  }

  function showBanner(message) {
    const banner = $("#banner");
    banner.hidden = !message;
    banner.textContent = message || "";
  }

  // ---- rendering helpers ---------------------------------------------------------------------------

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function setTile(root, name, value, text) {
    const tile = $(`[data-tile="${name}"]`, root);
    const element = $(".value", tile);
    element.dataset.value = String(value);
    element.textContent = text === undefined ? integer.format(value) : text;
  }

  function setActive(group, value) {
    for (const button of group.querySelectorAll("button")) {
      button.classList.toggle("active", button.dataset.value === value);
      button.setAttribute("aria-pressed", String(button.dataset.value === value));
    }
  }

  function periodLabel(period) {
    if (state.granularity === "month") return period.period_start.slice(0, 7);
    if (state.granularity === "week") return `${period.period_start}…${period.period_end.slice(5)}`;
    return period.period_start;
  }

  function drawChart(name, canvas, config) {
    if (typeof Chart === "undefined") {
      showBanner("The chart library did not load (/static/vendor/chart.umd.js).");
      return;
    }
    if (charts[name]) charts[name].destroy();
    charts[name] = new Chart(canvas, config);
  }

  // ---- dashboard sections --------------------------------------------------------------------------

  async function loadDashboard() {
    const request = ++dashboardRequest;
    document.body.dataset.dashboard = "loading";
    try {
      const document_ = await api("/api/dashboard", {
        from: state.from,
        to: state.to,
        granularity: state.granularity,
        by: state.by,
        limit: TOP_EARNERS_SHOWN,
      });
      if (request !== dashboardRequest) return;
      showBanner("");
      renderStatus(document_);
      renderSources(document_);
      renderTopEarners(document_);
      document.body.dataset.dashboard = `${state.granularity}|${state.by}|${state.from}|${state.to}`;
    } catch (error) {
      if (request === dashboardRequest) document.body.dataset.dashboard = "error";
      failed(error);
    }
  }

  function renderStatus(document_) {
    const status = document_.points_status;
    const totals = status.totals;
    const root = $("#status");
    $("#status-range").textContent = `${document_.from} – ${document_.to}`;
    setTile(root, "issued", totals.issued);
    setTile(root, "redeemed", totals.redeemed);
    setTile(root, "expired", totals.expired);
    setTile(root, "outstanding", totals.outstanding);
    const lastDay = document_.liability[document_.liability.length - 1];
    const value = lastDay ? lastDay.outstanding_value : "0";
    setTile(root, "liability", value, money.format(Number(value)));
    $("#status-more").textContent =
      `Also in this range: ${integer.format(totals.reversed)} reversed, ${integer.format(totals.adjusted)} adjusted, ` +
      `${integer.format(totals.pending_issued)} awarded as pending. Outstanding and liability are at the end of ` +
      `${document_.to}` + (ruleset ? ` (1 point = ${ruleset.redemption.point_value}).` : ".");

    const periods = status.periods;
    drawChart("status", $("#status-chart"), {
      type: "bar",
      data: {
        labels: periods.map(periodLabel),
        datasets: [
          { label: "Issued", data: periods.map((p) => p.issued), backgroundColor: COLORS.issued, yAxisID: "points" },
          { label: "Redeemed", data: periods.map((p) => p.redeemed), backgroundColor: COLORS.redeemed, yAxisID: "points" },
          { label: "Expired", data: periods.map((p) => p.expired), backgroundColor: COLORS.expired, yAxisID: "points" },
          {
            label: "Outstanding",
            type: "line",
            data: periods.map((p) => p.outstanding),
            borderColor: COLORS.outstanding,
            backgroundColor: COLORS.outstanding,
            pointRadius: periods.length > 60 ? 0 : 2,
            yAxisID: "outstanding",
          },
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          points: { position: "left", beginAtZero: true, title: { display: true, text: "points in period" } },
          outstanding: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: "outstanding" } },
        },
      },
    });
  }

  function renderSources(document_) {
    const sources = document_.point_sources;
    const total = sources.reduce((sum, source) => sum + source.points, 0);
    const label = (source) => (source.key === null ? "(none)" : source.key);
    $("#sources-key").textContent = DIMENSION_TITLES[state.by];
    const body = $("#sources-table tbody");
    body.replaceChildren(
      ...sources.map((source) => {
        const row = document.createElement("tr");
        row.append(
          cell(label(source)),
          cell(integer.format(source.points), "num"),
          cell(integer.format(source.entries), "num"),
          cell(total ? `${((100 * source.points) / total).toFixed(1)}%` : "–", "num"),
        );
        return row;
      }),
    );
    if (!sources.length) {
      const row = document.createElement("tr");
      const empty = cell("No points given in this range.", "muted");
      empty.colSpan = 4;
      row.append(empty);
      body.append(row);
    }
    const shown = sources.slice(0, SOURCES_IN_CHART_MAX);
    const rest = sources.slice(SOURCES_IN_CHART_MAX).reduce((sum, source) => sum + source.points, 0);
    const labels = shown.map(label).concat(rest ? ["(others)"] : []);
    const data = shown.map((source) => source.points).concat(rest ? [rest] : []);
    $("#sources-note").textContent =
      (document_.point_sources_truncated ? "Only the largest keys are listed. " : "") +
      "Positive points of kinds earned, confirmed and adjusted; pending points count when confirmed.";
    drawChart("sources", $("#sources-chart"), {
      type: "bar",
      data: {
        labels,
        datasets: [{ label: "Points", data, backgroundColor: labels.map((_, i) => COLORS.bars[i % COLORS.bars.length]) }],
      },
      options: {
        indexAxis: "y",
        animation: false,
        maintainAspectRatio: false,
        plugins: { legend: { display: false } },
        scales: { x: { beginAtZero: true } },
      },
    });
  }

  function renderTopEarners(document_) {
    $("#top-range").textContent = `${document_.from} – ${document_.to}`;
    const body = $("#top-table tbody");
    body.replaceChildren(
      ...document_.top_earners.map((earner, index) => {
        const row = document.createElement("tr");
        row.dataset.customer = earner.customer_id;
        row.tabIndex = 0;
        row.append(
          cell(String(index + 1), "num"),
          cell(earner.customer_id),
          cell(integer.format(earner.points_earned), "num"),
          cell(integer.format(earner.balance), "num"),
        );
        return row;
      }),
    );
    if (!document_.top_earners.length) {
      const row = document.createElement("tr");
      const empty = cell("Nobody earned points in this range.", "muted");
      empty.colSpan = 4;
      row.append(empty);
      body.append(row);
    }
  }

  // ---- customer history ----------------------------------------------------------------------------

  function openCustomer(customerId) {
    state.customer = customerId.trim();
    $("#customer-input").value = state.customer;
    writeFragment();
    loadHistory(true);
    $("#history").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  async function loadHistory(fresh) {
    if (!state.customer) return;
    const request = ++historyRequest;
    const customer = encodeURIComponent(state.customer);
    if (fresh) historyOffset = 0;
    document.body.dataset.history = "loading";
    try {
      const [balance, page] = await Promise.all([
        fresh ? api(`/api/customers/${customer}/balance`) : null,
        api(`/api/customers/${customer}/history`, { limit: HISTORY_PAGE_SIZE, offset: historyOffset }),
      ]);
      if (request !== historyRequest) return;
      showBanner("");
      if (balance) renderBalance(balance);
      renderHistory(page.entries, fresh);
      historyOffset += page.entries.length;
      $("#history-more").hidden = page.entries.length < HISTORY_PAGE_SIZE;
      document.body.dataset.history = state.customer;
    } catch (error) {
      if (request === historyRequest) document.body.dataset.history = "error";
      failed(error);
    }
  }

  function renderBalance(balance) {
    const root = $("#customer-summary");
    root.hidden = false;
    for (const name of ["balance", "pending", "lifetime_earned", "lifetime_redeemed", "debt"]) {
      setTile(root, name, balance[name]);
    }
    const expiry = ruleset ? ruleset.expiry : null;
    let note;
    if (!expiry || expiry.mode === "none") {
      note = "Points do not expire under the active rule set.";
    } else {
      note =
        `Points expire (${expiry.mode === "lot" ? `each award ${expiry.days} days after it was made` : `after ${expiry.days} days without activity`}). ` +
        "There is no query for points about to expire yet: the available balance and the pending points are shown instead.";
    }
    if (balance.entries === 0) note = `No ledger entry for ${balance.customer_id}. ${note}`;
    $("#expiry-note").textContent = `${note} Pending points become available when their return window ends (see "available from" in the history).`;
  }

  function renderHistory(entries, fresh) {
    const body = $("#history-table tbody");
    if (fresh) body.replaceChildren();
    for (const entry of entries) {
      const row = document.createElement("tr");
      row.dataset.sequence = String(entry.sequence);
      row.className = `kind-${entry.kind}`;
      const explanation = entry.available_at
        ? `${entry.explanation} (available from ${entry.available_at.replace("T", " ").slice(0, 16)})`
        : entry.explanation;
      row.append(
        cell(entry.occurred_at.replace("T", " ").slice(0, 19), "time"),
        cell(entry.kind),
        cell(entry.source),
        cell(entry.rule_id),
        cell(integer.format(entry.points), entry.points < 0 ? "num negative" : "num"),
        cell(entry.pending_points ? integer.format(entry.pending_points) : "", "num"),
        cell(integer.format(entry.balance_after), "num"),
        cell(explanation, "explanation"),
      );
      body.append(row);
    }
    const shown = body.querySelectorAll("tr").length;
    $("#history-note").textContent = shown
      ? `${shown} entr${shown === 1 ? "y" : "ies"} of ${state.customer}, oldest first.`
      : `No ledger entry for ${state.customer}.`;
  }

  // ---- settings ------------------------------------------------------------------------------------

  async function loadSettings() {
    try {
      const settings = await api("/api/settings");
      ruleset = settings.ruleset;
      $("#ruleset-version").textContent = ruleset.version;
      const facts = [
        ["Version", ruleset.version],
        ["Time zone", ruleset.timezone],
        ["Rounding", ruleset.rounding],
        ["Points per currency unit", ruleset.purchase.points_per_unit],
        ["Pending days (return window)", String(ruleset.purchase.pending_days)],
        ["Point value", ruleset.redemption.point_value],
        ["Expiry", ruleset.expiry.mode === "none" ? "none" : `${ruleset.expiry.mode}, ${ruleset.expiry.days} days`],
        ["Promotions", String(ruleset.promotions.length)],
        ["Caps", String(ruleset.caps.length)],
      ];
      $("#settings-summary").replaceChildren(
        ...facts.flatMap(([term, value]) => {
          const dt = document.createElement("dt");
          dt.textContent = term;
          const dd = document.createElement("dd");
          dd.textContent = value;
          return [dt, dd];
        }),
      );
      $("#ruleset-json").textContent = JSON.stringify(ruleset, null, 2);
      document.body.dataset.settings = ruleset.version;
    } catch (error) {
      failed(error);
    }
  }

  // ---- wiring --------------------------------------------------------------------------------------

  function loadAll() {
    $("#date-from").value = state.from;
    $("#date-to").value = state.to;
    setActive($("#granularity"), state.granularity);
    setActive($("#source-dimension"), state.by);
    loadSettings().then(() => {
      loadDashboard();
      if (state.customer) {
        $("#customer-input").value = state.customer;
        loadHistory(true);
      }
    });
  }

  function wire() {
    $("#range").addEventListener("submit", (event) => {
      event.preventDefault();
      const from = $("#date-from").value;
      const to = $("#date-to").value;
      if (from > to) {
        showBanner("The start of the range is after its end.");
        return;
      }
      state.from = from;
      state.to = to;
      writeFragment();
      loadDashboard();
    });
    $("#granularity").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button || button.dataset.value === state.granularity) return;
      state.granularity = button.dataset.value;
      setActive($("#granularity"), state.granularity);
      writeFragment();
      loadDashboard();
    });
    $("#source-dimension").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button || button.dataset.value === state.by) return;
      state.by = button.dataset.value;
      setActive($("#source-dimension"), state.by);
      writeFragment();
      loadDashboard();
    });
    const top = $("#top-table tbody");
    top.addEventListener("click", (event) => {
      const row = event.target.closest("tr[data-customer]");
      if (row) openCustomer(row.dataset.customer);
    });
    top.addEventListener("keydown", (event) => {
      const row = event.target.closest("tr[data-customer]");
      if (row && event.key === "Enter") openCustomer(row.dataset.customer);
    });
    $("#history-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("#customer-input").value.trim();
      if (value) openCustomer(value);
    });
    $("#history-more").addEventListener("click", () => loadHistory(false));
    $("#token-form").addEventListener("submit", () => {
      sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
      $("#token-input").value = "";
      loadAll();
    });
    $("#sign-out").addEventListener("click", () => askForToken(""));
  }

  readFragment();
  wire();
  if (token()) {
    loadAll();
  } else {
    askForToken("");
  }
})();
