// Rollouts: start one (table, target, canary share), watch progress, pause, resume, promote,
// abort. Progress comes from the devices' answers; the page refreshes it every 5 s.

import { ApiError, get, post } from "./api.js";
import { can } from "./session.js";
import { announce, clear, errorBox, h, when } from "./dom.js";

const STATES = ["applied", "rejected", "pending", "offline", "superseded"];

function progressBar(group) {
  const total = Math.max(1, group.targets);
  const label = STATES.map((s) => `${group[s]} ${s}`).join(", ") + `, ${group.waiting} waiting`;
  return h(
    "div",
    {},
    h("div", { class: "progress", role: "img", "aria-label": label },
      STATES.map((s) => h("span", { class: `p-${s}`, style: `width:${(group[s] / total) * 100}%` }))),
    h("div", { class: "hint" }, label),
  );
}

export async function rolloutsPage(main) {
  const message = h("div");
  const tbody = h("tbody");
  const actions = can("tables");
  const tables = await get("/v1/mode-tables?limit=200");
  const tableName = new Map(tables.items.map((t) => [t.id, t.name]));

  async function act(rollout, verb) {
    try {
      await post(`/v1/rollouts/${rollout.id}/${verb}`);
      announce(`Rollout ${verb}d.`);
      await refresh();
    } catch (error) {
      clear(message, errorBox(error));
    }
  }

  async function refresh() {
    const page = await get("/v1/rollouts?limit=50");
    clear(tbody, page.items.length ? page.items.map((r) => {
      const buttons = [];
      if (actions) {
        if (r.status === "canary") buttons.push(h("button", { type: "button", onclick: () => act(r, "promote") }, "Promote"), h("button", { type: "button", class: "secondary", onclick: () => act(r, "pause") }, "Pause"));
        if (r.status === "paused") buttons.push(h("button", { type: "button", onclick: () => act(r, "resume") }, "Resume"));
        if (!["aborted", "completed"].includes(r.status)) buttons.push(h("button", { type: "button", class: "secondary", onclick: () => act(r, "abort") }, "Abort"));
      }
      return h(
        "tr",
        { id: `rollout-${r.id}`, dataset: { status: r.status } },
        h("td", {}, when(r.created_at), h("div", { class: "hint" }, tableName.get(r.mode_table_id) || h("code", {}, r.mode_table_id))),
        h("td", {}, r.target.all ? "all devices" : r.target.model ? `model ${r.target.model}` : `${r.target.device_ids.length} devices`,
          r.canary_share ? h("div", { class: "hint" }, `canary ${Math.round(r.canary_share * 100)} %`) : null),
        h("td", {}, h("strong", {}, r.status), r.status_reason ? h("div", { class: "hint" }, r.status_reason) : null),
        h("td", {}, progressBar(r.progress.total),
          r.canary_health ? h("div", { class: "hint" }, `critical alerts per device: canary ${r.canary_health.canary_rate.toFixed(3)}, rest ${r.canary_health.rest_rate.toFixed(3)}`) : null),
        h("td", {}, buttons),
      );
    }) : h("tr", {}, h("td", { colspan: 5 }, "No rollouts yet.")));
  }

  const parts = [h("h1", {}, "Rollouts"), message];
  if (actions) {
    const form = h(
      "form",
      { id: "new-rollout", onsubmit: async (event) => {
        event.preventDefault();
        const kind = form.elements.target.value;
        const value = form.elements["target-value"].value.trim();
        const target = kind === "all" ? { all: true } : kind === "model" ? { model: value } : { device_ids: value.split(/[\s,]+/).filter(Boolean) };
        const share = Number(form.elements.canary.value);
        const body = { mode_table_id: form.elements.table.value, target };
        if (share > 0) body.canary_share = share / 100;
        try {
          await post("/v1/rollouts", body);
          announce("Rollout started.");
          clear(message);
          await refresh();
        } catch (error) {
          clear(message, error instanceof ApiError ? h("p", { class: "error", role: "alert" }, error.problem.detail) : errorBox(error));
        }
      } },
      h("h2", {}, "Start a rollout"),
      h("div", { class: "filters" },
        h("div", {}, h("label", { for: "table" }, "Mode table"),
          h("select", { id: "table", name: "table", required: true }, tables.items.map((t) => h("option", { value: t.id }, `${t.name} (${when(t.created_at)})`)))),
        h("div", {}, h("label", { for: "target" }, "Target"),
          h("select", { id: "target", name: "target" }, [["all", "the whole fleet"], ["model", "a model"], ["devices", "device ids"]].map(([v, t]) => h("option", { value: v }, t)))),
        h("div", {}, h("label", { for: "target-value" }, "Model or device ids"), h("input", { id: "target-value", name: "target-value" })),
        h("div", {}, h("label", { for: "canary" }, "Canary share (%)"), h("input", { id: "canary", name: "canary", type: "number", min: 0, max: 99, value: 10 })),
        h("button", { type: "submit", disabled: tables.items.length === 0 }, "Start rollout")),
    );
    parts.push(form);
  }
  parts.push(h("table", { id: "rollouts" },
    h("thead", {}, h("tr", {}, ["started / table", "target", "status", "progress", "actions"].map((n) => h("th", { scope: "col" }, n)))), tbody));
  clear(main, ...parts);
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 5000);
  return { leave: () => clearInterval(timer) };
}
