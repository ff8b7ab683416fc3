// The alert queue: filter, read the explanation and the action taken, acknowledge, resolve.
// New and changed alerts arrive on the shared stream and are placed without a reload.

import { ApiError, get, post, query } from "./api.js";
import { can, onAlert } from "./session.js";
import { announce, clear, errorBox, h, severityBadge, when } from "./dom.js";

function hashParams() {
  const text = location.hash.split("?")[1] || "";
  return Object.fromEntries(new URLSearchParams(text));
}

function select(id, label, options, value) {
  return h(
    "div",
    {},
    h("label", { for: id }, label),
    h("select", { id, name: id }, options.map(([optionValue, text]) =>
      h("option", { value: optionValue, selected: optionValue === (value || "") }, text))),
  );
}

export async function alertsPage(main) {
  const params = hashParams();
  const filters = { severity: params.severity || "", rule: params.rule || "", state: params.state ?? "open", device: params.device || "" };
  const rules = (await get("/v1/rules")).items.map((rule) => rule.id);
  const items = new Map();
  let nextCursor = null;
  const tbody = h("tbody");
  const message = h("div");
  const more = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => load(false) }, "Load more");

  const form = h(
    "form",
    { class: "filters", onchange: () => {
      for (const name of ["severity", "rule", "state"]) filters[name] = form.elements[name].value;
      location.hash = `#/alerts${query(filters)}`;
    }, onsubmit: (event) => event.preventDefault() },
    select("severity", "Severity", [["", "any"], ["critical", "critical"], ["warning", "warning"], ["info", "info"]], filters.severity),
    select("rule", "Rule", [["", "any"], ...rules.map((rule) => [rule, rule])], filters.rule),
    select("state", "State", [["", "any"], ["open", "open"], ["acknowledged", "acknowledged"], ["resolved", "resolved"]], filters.state),
  );

  const matches = (alert) =>
    (!filters.severity || alert.severity === filters.severity) &&
    (!filters.rule || alert.rule === filters.rule) &&
    (!filters.state || alert.state === filters.state) &&
    (!filters.device || alert.device_id === filters.device);

  function act(alert, verb) {
    return async (event) => {
      event.target.disabled = true;
      try {
        const updated = await post(`/v1/alerts/${alert.id}/${verb}`);
        place(updated);
        announce(`Alert ${alert.id} ${verb === "ack" ? "acknowledged" : "resolved"}.`);
      } catch (error) {
        clear(message, errorBox(error));
        event.target.disabled = false;
      }
    };
  }

  function row(alert) {
    const actions = [];
    if (can("alerts") && alert.state === "open") {
      actions.push(h("button", { type: "button", onclick: act(alert, "ack"), "aria-label": `Acknowledge alert ${alert.id}` }, "Acknowledge"));
    }
    if (can("alerts") && alert.state !== "resolved") {
      actions.push(h("button", { type: "button", class: "secondary", onclick: act(alert, "resolve"), "aria-label": `Resolve alert ${alert.id}` }, "Resolve"));
    }
    const who = alert.state === "acknowledged" ? `by ${alert.acknowledged_by}` : alert.state === "resolved" ? `by ${alert.resolved_by}` : "";
    return h(
      "tr",
      { id: `alert-${alert.id}`, dataset: { alertId: alert.id, state: alert.state } },
      h("td", {}, severityBadge(alert.severity)),
      h("td", {}, alert.rule, h("div", { class: "hint" }, `v${alert.rule_version}`)),
      h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(alert.device_id)}` }, alert.device_id)),
      h("td", { class: `state-${alert.state}` }, alert.state, h("div", { class: "hint" }, who)),
      h("td", {}, alert.count),
      h("td", {}, when(alert.last_seen), h("div", { class: "hint" }, `first ${when(alert.first_seen)}`)),
      h("td", { class: "explanation" }, alert.explanation.text, h("div", { class: "hint" }, `action: ${alert.explanation.action}`)),
      h("td", {}, actions),
    );
  }

  function render() {
    const sorted = [...items.values()].sort((a, b) => b.id - a.id);
    clear(tbody, sorted.length ? sorted.map(row) : h("tr", {}, h("td", { colspan: 8 }, "No alerts match.")));
  }

  function place(alert) {
    if (matches(alert)) items.set(alert.id, alert);
    else items.delete(alert.id);
    render();
  }

  async function load(first) {
    try {
      const page = await get(`/v1/alerts${query({ ...filters, limit: 50, cursor: first ? null : nextCursor })}`);
      if (first) items.clear();
      for (const alert of page.items) items.set(alert.id, alert);
      nextCursor = page.next_cursor;
      more.hidden = !nextCursor;
      render();
    } catch (error) {
      clear(message, errorBox(error instanceof ApiError ? error : new Error(String(error))));
    }
  }

  clear(
    main,
    h("h1", {}, "Alerts"),
    form,
    message,
    h(
      "table",
      { id: "alerts" },
      h("caption", { class: "visually-hidden" }, "Alerts, newest first"),
      h("thead", {}, h("tr", {}, ["severity", "rule", "device", "state", "count", "seen", "explanation", "actions"].map((name) => h("th", { scope: "col" }, name)))),
      tbody,
    ),
    more,
  );
  await load(true);
  const off = onAlert((alert) => {
    const isNew = !items.has(alert.id);
    place(alert);
    if (isNew && matches(alert)) announce(`New ${alert.severity} alert: ${alert.rule} on ${alert.device_id}.`);
  });
  return { leave: off };
}
