// Mode tables: the brand's tables, and a form that starts from the defaults and shows each
// envelope error next to its field (the API's 422 names the field and the limit).

import { ApiError, get, post } from "./api.js";
import { can } from "./session.js";
import { announce, clear, errorBox, h, when } from "./dom.js";

const MODES = ["LIFT", "TIGHTEN", "INFUSE", "SAFE"];
const FIELDS = [
  "i_target_ua", "i_max_ua", "freq_hz", "pulse_ms", "v_max_v", "session_default_s", "session_cap_s",
  "cooldown_s", "max_sessions_24h", "max_sessions_7d", "min_batt_pct", "t_elec_max_c",
];

function inputId(path) {
  return `f-${path.replace(/\./g, "-")}`;
}

function numberField(path, label, value, hint) {
  const id = inputId(path);
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    h("input", { id, name: path, type: "number", step: "1", value, required: true, "aria-describedby": `${id}-hint ${id}-error` }),
    h("div", { class: "hint", id: `${id}-hint` }, hint || ""),
    h("div", { class: "field-error", id: `${id}-error` }),
  );
}

function modeFieldset(mode, spec, limits, included) {
  const limitOf = (field) => {
    const limit = limits.find((l) => l.field === field);
    if (!limit) return "";
    return [limit.min !== null ? `at least ${limit.min}` : "", limit.max !== null ? `at most ${limit.max}` : ""].filter(Boolean).join(", ");
  };
  const include = h("input", { type: "checkbox", id: `include-${mode}`, name: `include-${mode}`, checked: included });
  const lock = h("input", { type: "checkbox", id: `lock-${mode}`, name: `lock-${mode}` });
  return h(
    "fieldset",
    { id: `mode-${mode}` },
    h("legend", {}, mode),
    h("div", { class: "field" }, include, " ", h("label", { for: `include-${mode}`, style: "display:inline" }, `Include ${mode}`), "  ",
      lock, " ", h("label", { for: `lock-${mode}`, style: "display:inline" }, `Lock ${mode}`)),
    h(
      "div",
      { class: "specs" },
      h("div", { class: "field" }, h("label", { for: inputId(`modes.${mode}.waveform`) }, "waveform"),
        h("select", { id: inputId(`modes.${mode}.waveform`), name: `modes.${mode}.waveform` },
          ["mono_alt", "dc"].map((w) => h("option", { value: w, selected: w === spec.waveform }, w))),
        h("div", { class: "field-error", id: `${inputId(`modes.${mode}.waveform`)}-error` })),
      FIELDS.map((field) => numberField(`modes.${mode}.${field}`, field, spec[field], limitOf(field))),
      numberField(`modes.${mode}.z_ok_ohm.0`, "z_ok_ohm low", spec.z_ok_ohm[0], "gel band, Ω"),
      numberField(`modes.${mode}.z_ok_ohm.1`, "z_ok_ohm high", spec.z_ok_ohm[1], "gel band, Ω"),
    ),
  );
}

function readForm(form) {
  const body = { name: form.elements.name.value, modes: {}, locked_modes: [] };
  for (const mode of MODES) {
    if (!form.elements[`include-${mode}`].checked) continue;
    const spec = { waveform: form.elements[`modes.${mode}.waveform`].value };
    for (const field of FIELDS) spec[field] = Number(form.elements[`modes.${mode}.${field}`].value);
    spec.z_ok_ohm = [0, 1].map((i) => Number(form.elements[`modes.${mode}.z_ok_ohm.${i}`].value));
    body.modes[mode] = spec;
    if (form.elements[`lock-${mode}`].checked) body.locked_modes.push(mode);
  }
  return body;
}

function showErrors(form, problem) {
  for (const element of form.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
  for (const element of form.querySelectorAll(".field-error")) element.textContent = "";
  let first = null;
  for (const error of problem.errors || []) {
    // Envelope errors name "modes.LIFT.i_max_ua"; shape errors "body.modes.LIFT.i_max_ua".
    const path = String(error.field).replace(/^body\./, "");
    const input = form.querySelector(`#${CSS.escape(inputId(path))}`);
    if (!input) continue;
    input.setAttribute("aria-invalid", "true");
    form.querySelector(`#${CSS.escape(inputId(path))}-error`).textContent = error.message;
    first = first || input;
  }
  if (first) first.focus();
}

export async function modeTablesPage(main) {
  const [tables, envelope] = await Promise.all([get("/v1/mode-tables?limit=100"), get("/v1/mode-tables/envelope")]);
  const message = h("div");
  const list = h(
    "table",
    { id: "mode-tables" },
    h("thead", {}, h("tr", {}, ["name", "modes", "locked", "created", "id"].map((n) => h("th", { scope: "col" }, n)))),
    h("tbody", {}, tables.items.length ? tables.items.map((t) => h("tr", {},
      h("td", {}, t.name), h("td", {}, Object.keys(t.modes).join(", ")), h("td", {}, t.locked_modes.join(", ") || "none"),
      h("td", {}, when(t.created_at), h("div", { class: "hint" }, t.created_by)), h("td", {}, h("code", {}, t.id)))) : h("tr", {}, h("td", { colspan: 5 }, "No tables yet."))),
  );
  const parts = [h("h1", {}, "Mode tables"), message, list];
  if (can("tables")) {
    const form = h(
      "form",
      { id: "new-table", novalidate: true, onsubmit: async (event) => {
        event.preventDefault();
        clear(message);
        try {
          const created = await post("/v1/mode-tables", readForm(form));
          announce(`Mode table ${created.name} created.`);
          clear(message, h("p", { class: "notice", role: "status" }, `Created ${created.name} (${created.id}).`));
          modeTablesPage(main);
        } catch (error) {
          if (error instanceof ApiError && error.status === 422) {
            showErrors(form, error.problem);
            clear(message, h("p", { class: "error", role: "alert", id: "form-error" }, error.problem.detail));
          } else {
            clear(message, errorBox(error));
          }
        }
      } },
      h("h2", {}, "New mode table"),
      h("div", { class: "field" }, h("label", { for: "f-name" }, "Name"), h("input", { id: "f-name", name: "name", required: true, value: "" }),
        h("div", { class: "field-error", id: "f-name-error" })),
      MODES.map((mode) => modeFieldset(mode, envelope.defaults[mode], envelope.limits, mode !== "INFUSE")),
      h("button", { type: "submit" }, "Create table"),
    );
    parts.push(form);
  }
  clear(main, ...parts);
}
