// The device list and one device's page: presence, firmware, desired vs reported mode table,
// recent sessions on a timeline, and charts over a chosen range (bucketed telemetry).

import { get, post, query } from "./api.js";
import { can } from "./session.js";
import { chart, columns } from "./charts.js";
import { announce, clear, errorBox, facts, h, when } from "./dom.js";

export async function devicesPage(main) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filters = { online: params.get("online") || "", alerting: params.get("alerting") || "" };
  const page = await get(`/v1/devices${query({ ...filters, limit: 200 })}`);
  const form = h(
    "form",
    { class: "filters", onchange: () => {
      location.hash = `#/devices${query({ online: form.elements.online.value, alerting: form.elements.alerting.value })}`;
    } },
    h("div", {}, h("label", { for: "online" }, "Online"),
      h("select", { id: "online", name: "online" }, [["", "any"], ["true", "online"], ["false", "offline"]].map(([v, t]) => h("option", { value: v, selected: v === filters.online }, t)))),
    h("div", {}, h("label", { for: "alerting" }, "Alerting"),
      h("select", { id: "alerting", name: "alerting" }, [["", "any"], ["true", "with open alerts"]].map(([v, t]) => h("option", { value: v, selected: v === filters.alerting }, t)))),
  );
  clear(
    main,
    h("h1", {}, "Devices"),
    form,
    h(
      "table",
      { id: "devices" },
      h("thead", {}, h("tr", {}, ["device", "model", "online", "last seen", "firmware", "open alerts", "table (desired / reported)"].map((n) => h("th", { scope: "col" }, n)))),
      h("tbody", {}, page.items.map((d) => h(
        "tr",
        {},
        h("td", {}, h("a", { href: `#/devices/${encodeURIComponent(d.device_id)}` }, d.device_id)),
        h("td", {}, d.model),
        h("td", {}, d.online ? "online" : "offline"),
        h("td", {}, when(d.last_seen)),
        h("td", {}, d.fw || "—"),
        h("td", {}, d.open_alerts),
        h("td", {}, `${d.config_desired_version ?? "—"} / ${d.config_reported_version ?? "—"}`),
      ))),
    ),
    page.next_cursor ? h("p", { class: "hint" }, "Showing the first 200 devices; filter to narrow.") : null,
  );
}

const RANGES = { "1h": [3600, "10s", 10], "24h": [86400, "1m", 60], "7d": [604800, "15m", 900] };

function timeline(sessions, from, to) {
  const span = to - from;
  const bar = h("div", { class: "timeline", role: "list", "aria-label": "Sessions in the range" });
  for (const s of sessions) {
    if (!s.started_at) continue;
    const start = Date.parse(s.started_at) / 1000;
    const end = s.ended_at ? Date.parse(s.ended_at) / 1000 : start + (s.duration_s || 60);
    if (end < from || start > to) continue;
    const left = Math.max(0, ((start - from) / span) * 100);
    const width = Math.max(0.3, ((Math.min(end, to) - Math.max(start, from)) / span) * 100);
    const label = `${s.mode} level ${s.level}, ${when(s.started_at)}, ${Math.round(s.duration_s || 0)} s, ended ${s.end_reason || "—"}`;
    bar.append(h("div", { class: `session ended-${s.end_reason || "open"}`, role: "listitem", title: label, "aria-label": label, style: `left:${left}%;width:${width}%` }));
  }
  return bar;
}

export async function devicePage(main, deviceId) {
  const base = `/v1/devices/${encodeURIComponent(deviceId)}`;
  const [device, config] = await Promise.all([get(base), get(`${base}/config`)]);
  const message = h("div");
  const chartsBox = h("div", { class: "charts", id: "charts" });
  const sessionsBox = h("div", { id: "sessions" });
  const rangeSelect = h("select", { id: "range", name: "range" },
    Object.keys(RANGES).map((r) => h("option", { value: r, selected: r === "24h" }, `last ${r}`)));

  const desired = config.desired;
  const restricted = config.history.length && config.history[0].source === "rule";
  const band = desired && Object.values(desired.modes)[0] ? Object.values(desired.modes)[0].z_ok_ohm : [1000, 20000];
  const clearButton = restricted && can("clear")
    ? h("button", { type: "button", onclick: async (event) => {
        event.target.disabled = true;
        try {
          await post(`${base}/clear`, { note: "cleared from the dashboard" });
          announce("Restriction cleared: the device gets its table back.");
          devicePage(main, deviceId);
        } catch (error) {
          clear(message, errorBox(error));
          event.target.disabled = false;
        }
      } }, "Clear restriction")
    : null;

  clear(
    main,
    h("h1", {}, `Device ${device.device_id}`),
    message,
    h("div", { class: "grid2" },
      h("section", { "aria-labelledby": "presence-h" }, h("h2", { id: "presence-h" }, "Presence"),
        facts([
          ["status", device.online ? "online" : "offline"],
          ["last seen", when(device.last_seen)],
          ["firmware", device.fw || "—"],
          ["model", device.model],
          ["user", device.user || "—"],
          ["last seq / gaps", `${device.last_seq ?? "—"} / ${device.seq_gaps}`],
          ["open alerts", h("a", { href: `#/alerts?device=${encodeURIComponent(device.device_id)}&state=` }, String(device.open_alerts))],
        ])),
      h("section", { "aria-labelledby": "config-h" }, h("h2", { id: "config-h" }, "Mode table"),
        facts([
          ["desired", config.desired_version ?? "factory"],
          ["reported", config.reported_version !== null ? `${config.reported_version} (${config.reported_status})` : "—"],
          ["drift", config.drift ? h("span", { class: "drift" }, "yes: the device does not run the desired table yet") : "none"],
          ["locked modes", desired ? (desired.locked_modes.join(", ") || "none") : "none"],
          ["reason", desired ? desired.reason : "—"],
        ]),
        clearButton)),
    h("h2", {}, "Telemetry"),
    h("form", { class: "filters", onchange: () => draw() }, h("div", {}, h("label", { for: "range" }, "Range"), rangeSelect)),
    sessionsBox,
    chartsBox,
  );

  async function draw() {
    const [seconds, bucket, bucketSeconds] = RANGES[rangeSelect.value];
    const to = Math.ceil(Date.now() / 1000);
    const from = to - seconds;
    try {
      const [telemetry, sessions] = await Promise.all([
        get(`${base}/telemetry${query({ from: from * 1000, to: to * 1000, bucket, fields: "i_ua,i_set_ua,z_ohm,t_elec_c,t_batt_c,batt_pct" })}`),
        get(`${base}/sessions${query({ limit: 200 })}`),
      ]);
      clear(sessionsBox, h("h3", {}, "Sessions"), timeline(sessions.items, from, to));
      const specs = [
        ["chart-current", { title: "Current against setpoint", unit: "µA", series: [["i_ua", "avg", "current avg"], ["i_ua", "max", "current max"], ["i_set_ua", "avg", "setpoint"]] }],
        ["chart-impedance", { title: "Impedance (gel band shaded)", unit: "Ω", series: [["z_ohm", "avg", "impedance avg"]], band }],
        ["chart-temperature", { title: "Electrode and battery temperature", unit: "°C", series: [["t_elec_c", "max", "electrode max"], ["t_batt_c", "max", "battery max"]] }],
        ["chart-battery", { title: "Battery level", unit: "%", series: [["batt_pct", "avg", "battery"]] }],
      ];
      // Lay every box out first, so each chart is sized to its final column.
      const boxes = specs.map(([id]) => h("div", { class: "chart", id }));
      chartsBox.replaceChildren(...boxes);
      specs.forEach(([, spec], i) => {
        chart(boxes[i], { ...spec, data: columns(telemetry.points, bucketSeconds, spec.series), range: [from, to] });
      });
    } catch (error) {
      clear(message, errorBox(error));
    }
  }
  await draw();
}
