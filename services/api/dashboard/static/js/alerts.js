// The alert queue: filter, read the explanation and the action taken, acknowledge, resolve.
// New and changed alerts arrive on the shared stream and are placed without a reload.
// One alert's page (#/alerts/<id>, the link notifications carry) shares the same actions.

import { ApiError, get, post, query } from "./api.js";
import { can, onAlert } from "./session.js";
import { announce, clear, errorBox, facts, h, severityBadge, when } from "./dom.js";

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

function handledBy(alert) {
  if (alert.state === "acknowledged") return `by ${alert.acknowledged_by}`;
  if (alert.state === "resolved") return `by ${alert.resolved_by}`;
  return "";
}

// Acknowledge and resolve, for those who may: each button posts the step, hands the updated
// alert to done(), and shows a refusal (e.g. 409 when someone else got there first) in message.
function actionButtons(alert, done, message) {
  function act(verb) {
    return async (event) => {
      event.target.disabled = true;
      try {
        const updated = await post(`/v1/alerts/${alert.id}/${verb}`);
        done(updated);
        announce(`Alert ${alert.id} ${verb === "ack" ? "acknowledged" : "resolved"}.`);
      } catch (error) {
        clear(message, errorBox(error));
        event.target.disabled = false;
      }
    };
  }
  const buttons = [];
  if (can("alerts") && alert.state === "open") {
    buttons.push(h("button", { type: "button", onclick: act("ack"), "aria-label": `Acknowledge alert ${alert.id}` }, "Acknowledge"));
  }
  if (can("alerts") && alert.state !== "resolved") {
    buttons.push(h("button", { type: "button", class: "secondary", onclick: act("resolve"), "aria-label": `Resolve alert ${alert.id}` }, "Resolve"));
  }
  return buttons;
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

  function row(alert) {
    return h(
      "tr",
      { id: `alert-${alert.id}`, dataset: { alertId: alert.id, state: alert.state } },
      h("td", {}, severityBadge(alert.severity)),
      h("td", {}, h("a", { href: `#/alerts/${alert.id}`, "aria-label": `Alert ${alert.id}: ${alert.rule}` }, alert.rule), h("div", { class: "hint" }, `v${alert.rule_version}`)),
      h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(alert.device_id)}` }, alert.device_id)),
      h("td", { class: `state-${alert.state}` }, alert.state, h("div", { class: "hint" }, handledBy(alert))),
      h("td", {}, alert.count),
      h("td", {}, when(alert.last_seen), h("div", { class: "hint" }, `first ${when(alert.first_seen)}`)),
      h("td", { class: "explanation" }, alert.explanation.text, h("div", { class: "hint" }, `action: ${alert.explanation.action}`)),
      h("td", {}, actionButtons(alert, place, message)),
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

// One alert: what, where, since when, why, and every transition; live while open. An id that
// is not one of the brand's alerts (or not an id at all) says so instead of an error.
export async function alertPage(main, idText) {
  // Kept as text: ids are bigint, beyond what a Number holds exactly.
  const id = /^[1-9][0-9]{0,18}$/.test(idText) ? idText : null;
  let alert = null;
  try {
    if (id !== null) alert = await get(`/v1/alerts/${id}`);
  } catch (error) {
    // 422: an id past the largest bigint.
    if (!(error instanceof ApiError && (error.status === 404 || error.status === 422))) throw error;
  }
  if (!alert) {
    clear(
      main,
      h("h1", {}, "Alert not found"),
      h("p", { id: "alert-not-found" }, `There is no alert ${idText} for this brand: it may belong to another brand, or the link is wrong.`),
      h("p", {}, h("a", { href: "#/alerts" }, "Back to the alerts")),
    );
    return null;
  }
  const message = h("div");
  const body = h("div", { id: "alert" });

  function render(current) {
    alert = current;
    const trail = current.transitions || [];
    clear(
      body,
      facts([
        ["severity", severityBadge(current.severity)],
        ["rule", `${current.rule} (v${current.rule_version})`],
        ["device", h("a", { href: `#/devices/${encodeURIComponent(current.device_id)}` }, current.device_id)],
        ["state", h("span", { class: `state-${current.state}`, id: "alert-state" }, current.state, " ", h("span", { class: "hint" }, handledBy(current)))],
        ["count", String(current.count)],
        ["first seen", when(current.first_seen)],
        ["last seen", when(current.last_seen)],
        ["explanation", h("span", { class: "explanation" }, current.explanation.text)],
        ["action taken", current.explanation.action],
        current.resolution ? ["resolution", current.resolution] : null,
      ].filter(Boolean)),
      h("div", { class: "actions" }, actionButtons(current, render, message)),
      h("h2", {}, "Transitions"),
      trail.length
        ? h("table", { id: "alert-transitions" },
            h("thead", {}, h("tr", {}, ["when", "from", "to", "by", "note"].map((n) => h("th", { scope: "col" }, n)))),
            h("tbody", {}, trail.map((t) => h("tr", {},
              h("td", {}, when(t.at)), h("td", {}, t.from_state || "—"), h("td", {}, t.to_state), h("td", {}, t.actor), h("td", {}, t.note || "")))))
        : h("p", {}, "No transitions recorded."),
    );
  }

  // The stream and the action answers carry the alert; the transitions come with the detail.
  async function refresh() {
    try {
      render(await get(`/v1/alerts/${id}`));
    } catch (error) {
      clear(message, errorBox(error));
    }
  }

  clear(main, h("h1", {}, `Alert ${id}: ${alert.rule} on ${alert.device_id}`), h("p", { class: "hint" }, h("a", { href: `#/alerts?device=${encodeURIComponent(alert.device_id)}&state=` }, "All alerts of this device")), message, body);
  render(alert);
  const off = onAlert((changed) => {
    if (String(changed.id) === id) refresh();
  });
  return { leave: off };
}
