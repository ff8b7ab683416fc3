// Fleet overview: devices online, sessions today, open alerts by severity and rule; live.

import { get } from "./api.js";
import { onAlert } from "./session.js";
import { clear, h, severityBadge } from "./dom.js";

function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "value", id }, value), h("div", { class: "label" }, label));
}

export async function overviewPage(main) {
  const body = h("div");
  clear(main, h("h1", {}, "Fleet overview"), body);
  let pending = null;

  async function render() {
    const summary = await get("/v1/fleet/summary");
    const alerts = summary.open_alerts;
    const rules = Object.entries(alerts.by_rule).sort((a, b) => b[1] - a[1]);
    clear(
      body,
      h(
        "div",
        { class: "cards" },
        card("devices online", `${summary.online} / ${summary.devices}`, "online"),
        card("sessions today", summary.sessions_today, "sessions-today"),
        card("open alerts", alerts.total, "open-alerts"),
        ...["critical", "warning", "info"].map((severity) =>
          card(`open ${severity}`, alerts.by_severity[severity] || 0, `open-${severity}`),
        ),
      ),
      h("h2", {}, "Open alerts by rule"),
      rules.length
        ? h(
            "table",
            { id: "alerts-by-rule" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "rule"), h("th", { scope: "col" }, "open"))),
            h(
              "tbody",
              {},
              rules.map(([rule, count]) =>
                h("tr", {}, h("td", {}, h("a", { href: `#/alerts?rule=${encodeURIComponent(rule)}` }, rule)), h("td", {}, count)),
              ),
            ),
          )
        : h("p", {}, "No open alerts."),
      h("p", { class: "hint" }, "Updates live as alerts are raised and handled.", " ",
        severityBadge("critical"), " alerts need attention first."),
    );
  }

  await render();
  // Alerts change the counts; coalesce bursts into one refresh a second.
  const off = onAlert(() => {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      render().catch(() => {});
    }, 1000);
  });
  const timer = setInterval(() => render().catch(() => {}), 10000);
  return {
    leave() {
      off();
      clearInterval(timer);
      if (pending) clearTimeout(pending);
    },
  };
}
