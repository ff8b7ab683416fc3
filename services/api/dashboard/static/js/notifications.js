// Notification channels: where the brand's alerts are sent, what each channel is told of, and a
// channel's delivery log (newest first, by status, paged), refreshed every 5 s so pending rows
// are seen to settle. Admins can send a test notification and watch its outcome arrive.
// Receivers' error texts are hostile input: like every API value they go in as text.

import { get, post, query } from "./api.js";
import { can } from "./session.js";
import { announce, clear, errorBox, facts, h, when } from "./dom.js";

const PAGE_SIZE = 25;
const REFRESH_MS = 5000;
const STATUSES = ["pending", "delivered", "failed"];

function hashParams() {
  return Object.fromEntries(new URLSearchParams(location.hash.split("?")[1] || ""));
}

async function allChannels() {
  const channels = [];
  let cursor = null;
  do {
    const page = await get(`/v1/notification-channels${query({ limit: 100, cursor })}`);
    channels.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return channels;
}

// Migration 0015's quiet hours, flat or grouped, whichever the channel carries.
function quietHours(channel) {
  const q = channel.quiet_hours || {
    start: channel.quiet_hours_start, end: channel.quiet_hours_end, time_zone: channel.quiet_hours_time_zone,
  };
  if (!q || !q.start || !q.end) return null;
  const hhmm = (t) => String(t).slice(0, 5);
  return `${hhmm(q.start)}–${hhmm(q.end)} ${q.time_zone || ""}`.trim();
}

function target(channel) {
  if (channel.kind === "email") {
    return h("span", { class: "target" }, (channel.recipients || []).join(", ") || "—", h("div", { class: "hint" }, "e-mail recipients"));
  }
  const hint = {
    slack: "masked: the full webhook URL is kept secret",
    pagerduty: "PagerDuty Events API v2",
  }[channel.kind];
  return h("span", { class: "target" }, h("code", {}, channel.url || "—"), hint ? h("div", { class: "hint" }, hint) : null);
}

function filterSummary(channel) {
  const quiet = quietHours(channel);
  return [
    channel.rules ? `rules: ${channel.rules.join(", ")}` : "every rule",
    `severity ≥ ${channel.min_severity}`,
    channel.models ? `models: ${channel.models.join(", ")}` : "every model",
    `on: ${channel.transitions.join(", ")}`,
    quiet ? `quiet hours ${quiet} (critical never held)` : null,
  ].filter(Boolean);
}

function latency(ms) {
  if (ms === null || ms === undefined) return "—";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function deliveryRow(d) {
  const statusHints = [];
  if (d.held_until) statusHints.push(h("div", { class: "hint held" }, `held until ${when(d.held_until)} (quiet hours)`));
  if (d.status === "pending" && d.next_attempt_at !== d.held_until) statusHints.push(h("div", { class: "hint" }, `next attempt ${when(d.next_attempt_at)}`));
  const response = [];
  if (d.last_status_code !== null && d.last_status_code !== undefined) response.push(h("div", { class: "status-code" }, `HTTP ${d.last_status_code}`));
  if (d.last_error) response.push(h("div", { class: "last-error" }, d.last_error));
  return h(
    "tr",
    { id: `delivery-${d.id}`, class: `delivery-${d.status}`, dataset: { deliveryId: d.id, status: d.status } },
    h("td", {}, when(d.created_at), h("div", { class: "hint" }, `#${d.id}`)),
    h("td", {}, d.transition, h("div", { class: "hint" }, d.alert_id !== null
      ? h("a", { href: `#/alerts/${d.alert_id}` }, `alert ${d.alert_id}`)
      : "test notification")),
    h("td", {}, h("span", { class: `status status-${d.status}` }, d.status), statusHints),
    h("td", {}, String(d.attempts)),
    h("td", {}, response.length ? response : "—"),
    // A held notification's latency runs from the end of the quiet hours, not its queueing.
    h("td", {}, latency(d.latency_ms), d.held_until && d.latency_ms !== null ? h("div", { class: "hint" }, "from release") : null),
    h("td", {}, when(d.delivered_at)),
    h("td", {}, h("code", { class: "key" }, d.idempotency_key)),
  );
}

function testOutcome(d) {
  if (d.status === "delivered") {
    const tries = d.attempts > 1 ? ` after ${d.attempts} attempts` : "";
    return `Test notification delivered in ${latency(d.latency_ms)}${tries}${d.last_status_code ? ` (HTTP ${d.last_status_code})` : ""}.`;
  }
  if (d.status === "failed") return `Test notification failed after ${d.attempts} attempts: ${d.last_error || "no answer"}`;
  if (d.attempts > 0) return `Test notification not delivered yet (${d.attempts} attempts; last: ${d.last_error || "—"}); the dispatcher retries.`;
  return null;
}

function deliveriesSection(channel, statusFilter, message) {
  const items = new Map();
  let nextCursor = null;
  let testId = null;
  const tbody = h("tbody");
  const result = h("div", { id: "test-result" });
  const more = h("button", { type: "button", class: "secondary", hidden: true, onclick: () => loadMore() }, "Load more");
  const path = `/v1/notification-channels/${channel.id}/deliveries`;

  function render() {
    const sorted = [...items.values()].sort((a, b) => b.id - a.id);
    clear(tbody, sorted.length ? sorted.map(deliveryRow) : h("tr", {}, h("td", { colspan: 8 }, statusFilter ? `No ${statusFilter} deliveries.` : "Nothing sent to this channel yet.")));
    const test = testId !== null ? items.get(testId) : null;
    const outcome = test ? testOutcome(test) : null;
    if (outcome) {
      clear(result, h("p", { class: test.status === "failed" ? "error" : "notice", role: "status" }, outcome));
      if (test.status !== "pending") {
        announce(outcome);
        testId = null;
      }
    }
  }

  async function loadMore() {
    try {
      const page = await get(`${path}${query({ status: statusFilter, limit: PAGE_SIZE, cursor: nextCursor })}`);
      for (const d of page.items) items.set(d.id, d);
      nextCursor = page.next_cursor;
      more.hidden = !nextCursor;
      render();
    } catch (error) {
      clear(message, errorBox(error));
    }
  }

  // The newest page again: new rows go on top, changed rows are replaced, and rows in its span
  // that no longer match the status filter leave. Older pages already loaded stay as they are.
  async function refresh() {
    const page = await get(`${path}${query({ status: statusFilter, limit: PAGE_SIZE })}`);
    const fresh = new Set(page.items.map((d) => d.id));
    const oldest = page.next_cursor ? page.items[page.items.length - 1].id : 0;
    for (const id of [...items.keys()]) if (id >= oldest && !fresh.has(id)) items.delete(id);
    for (const d of page.items) items.set(d.id, d);
    if (items.size === page.items.length) {
      nextCursor = page.next_cursor;
      more.hidden = !nextCursor;
    }
    render();
  }

  const statusSelect = h("select", { id: "delivery-status", name: "status" },
    [["", "any"], ...STATUSES.map((s) => [s, s])].map(([v, t]) => h("option", { value: v, selected: v === (statusFilter || "") }, t)));
  const filterForm = h(
    "form",
    { class: "filters", onsubmit: (event) => event.preventDefault(), onchange: () => {
      location.hash = `#/notifications${query({ channel: channel.id, status: statusSelect.value })}`;
    } },
    h("div", {}, h("label", { for: "delivery-status" }, "Status"), statusSelect),
  );
  if (can("test-channel")) {
    filterForm.append(h("button", { type: "button", id: "send-test", "aria-label": `Send a test notification to ${channel.name}`, onclick: async (event) => {
      event.target.disabled = true;
      clear(result);
      try {
        const queued = await post(`/v1/notification-channels/${channel.id}/test`);
        testId = queued.id;
        clear(result, h("p", { class: "notice", role: "status" },
          `Test notification queued (${queued.status}), key `, h("code", {}, queued.idempotency_key), ". Its outcome appears below when the dispatcher has sent it."));
        announce("Test notification queued.");
        await refresh();
      } catch (error) {
        clear(result, errorBox(error));
      } finally {
        event.target.disabled = false;
      }
    } }, "Send test"));
  }

  const section = h(
    "section",
    { id: "channel", "aria-labelledby": "channel-h", dataset: { channelId: channel.id } },
    h("h2", { id: "channel-h" }, `Deliveries to ${channel.name}`),
    facts([
      ["kind", channel.kind],
      ["target", target(channel)],
      ["filter", filterSummary(channel).join(" · ")],
      ["in flight at most", String(channel.max_concurrency)],
      ["created", when(channel.created_at)],
    ]),
    filterForm,
    result,
    h(
      "table",
      { id: "deliveries" },
      h("caption", { class: "visually-hidden" }, `Deliveries to ${channel.name}, newest first`),
      h("thead", {}, h("tr", {}, ["queued", "event", "status", "attempts", "last answer", "latency", "delivered", "idempotency key"].map((n) => h("th", { scope: "col" }, n)))),
      tbody,
    ),
    more,
  );
  return { section, loadMore, refresh };
}

export async function notificationsPage(main) {
  const params = hashParams();
  const message = h("div");
  if (!can("channels")) {
    clear(main, h("h1", {}, "Notifications"), h("p", {}, "Your role cannot see the brand's notification channels."));
    return null;
  }
  const channels = await allChannels();
  const selected = channels.find((c) => String(c.id) === params.channel) || channels[0] || null;
  const status = STATUSES.includes(params.status) ? params.status : "";

  const list = h(
    "table",
    { id: "channels" },
    h("caption", { class: "visually-hidden" }, "Notification channels, oldest first"),
    h("thead", {}, h("tr", {}, ["name", "kind", "target", "filter", "created"].map((n) => h("th", { scope: "col" }, n)))),
    h("tbody", {}, channels.length ? channels.map((c) => h(
      "tr",
      { id: `channel-${c.id}`, class: c === selected ? "selected" : null, dataset: { channelId: c.id, kind: c.kind } },
      h("td", {}, h("a", { href: `#/notifications${query({ channel: c.id })}`, "aria-current": c === selected ? "true" : null }, c.name)),
      h("td", {}, c.kind),
      h("td", {}, target(c)),
      h("td", { class: "filter" }, filterSummary(c).map((part) => h("div", {}, part))),
      h("td", {}, when(c.created_at)),
    )) : h("tr", {}, h("td", { colspan: 5 }, "No channels yet: an admin adds them with POST /v1/notification-channels."))),
  );

  if (params.channel && String(selected && selected.id) !== params.channel) {
    clear(message, h("p", { class: "error", role: "alert", id: "unknown-channel" },
      `There is no channel ${params.channel} (deleted, or another brand's)${selected ? `: showing ${selected.name}` : ""}.`));
  }
  const parts = [h("h1", {}, "Notifications"), message, list];
  let deliveries = null;
  if (selected) {
    deliveries = deliveriesSection(selected, status, message);
    parts.push(deliveries.section);
  }
  clear(main, ...parts);
  if (!deliveries) return null;
  await deliveries.loadMore();
  const timer = setInterval(() => deliveries.refresh().catch(() => {}), REFRESH_MS);
  return { leave: () => clearInterval(timer) };
}
