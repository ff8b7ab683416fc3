// Time-series charts on uPlot (vendored, loaded as a classic script: window.uPlot).

import { h } from "./dom.js";

const COLORS = ["#0b5cad", "#a4161a", "#1a6b35", "#8a5300", "#5b2a86"];

// Bucketed points -> uPlot columns; a gap of more than two buckets becomes a null so lines
// break between sessions instead of joining them.
export function columns(points, bucketSeconds, series) {
  const xs = [];
  const ys = series.map(() => []);
  let previous = null;
  for (const point of points) {
    const t = Date.parse(point.ts) / 1000;
    if (previous !== null && t - previous > 2 * bucketSeconds) {
      xs.push(previous + bucketSeconds);
      ys.forEach((column) => column.push(null));
    }
    xs.push(t);
    series.forEach(([field, stat], i) => {
      const value = point[field];
      ys[i].push(value && value[stat] !== undefined ? value[stat] : null);
    });
    previous = t;
  }
  return [xs, ...ys];
}

// A chart in `container`: `series` is [[field, stat, label], ...]; `band` optional [low, high]
// shaded behind the lines (the gel band of impedance).
export function chart(container, { title, unit, data, series, band, range }) {
  const width = Math.max(300, container.clientWidth - 16);
  const plot = h("div", { class: "plot" });
  container.replaceChildren(h("h3", {}, title), plot);
  container.dataset.points = String(data[0].length);
  if (data[0].length === 0) {
    plot.append(h("p", { class: "hint" }, "No samples in this range."));
    return null;
  }
  const hooks = {};
  if (band) {
    hooks.drawClear = [
      (u) => {
        const top = u.valToPos(band[1], "y", true);
        const bottom = u.valToPos(band[0], "y", true);
        const { left, width: w, top: plotTop, height } = u.bbox;
        const y0 = Math.max(plotTop, Math.min(top, bottom));
        const y1 = Math.min(plotTop + height, Math.max(top, bottom));
        u.ctx.save();
        u.ctx.fillStyle = "rgba(26, 107, 53, 0.12)";
        u.ctx.fillRect(left, y0, w, Math.max(0, y1 - y0));
        u.ctx.restore();
      },
    ];
  }
  const options = {
    width,
    height: 220,
    scales: { x: { time: true, range: () => range } },
    axes: [{}, { label: unit, size: 60 }],
    series: [{}, ...series.map(([, , label], i) => ({ label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
    hooks,
  };
  const instance = new window.uPlot(options, data, plot);
  plot.setAttribute("role", "img");
  plot.setAttribute("aria-label", `${title}: ${data[0].length} points`);
  return instance;
}
