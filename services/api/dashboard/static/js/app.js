// The dashboard shell: sign-in, navigation, the route table, and one alert stream shared by
// the pages through session.js (each page that shows alerts subscribes while it is open).

import { apiKey, get, setApiKey, streamAlerts } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { alertPage, alertsPage } from "./alerts.js";
import { devicePage, devicesPage } from "./devices.js";
import { modeTablesPage } from "./tables.js";
import { notificationsPage } from "./notifications.js";
import { overviewPage } from "./overview.js";
import { rolloutsPage } from "./rollouts.js";
import { can, publishAlert, session } from "./session.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOutButton = document.getElementById("sign-out");

let streamControl = null;
let page = null; // { leave() } of the page on screen

function startStream() {
  streamControl = new AbortController();
  streamAlerts(
    publishAlert,
    streamControl.signal,
    (state) => {
      session.streamState = state;
      document.body.dataset.stream = state;
    },
  );
}

function signInPage() {
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true });
  const message = h("div");
  const form = h(
    "form",
    { class: "signin", onsubmit: async (event) => {
      event.preventDefault();
      setApiKey(input.value.trim());
      try {
        await start();
      } catch (error) {
        setApiKey(null);
        clear(message, errorBox(error.status === 401 ? new Error("That key is unknown or revoked.") : error));
      }
    } },
    h("h1", {}, "Sign in"),
    h("p", {}, "Use an API key of your brand. It is kept in this browser tab only."),
    h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), input),
    message,
    h("button", { type: "submit" }, "Sign in"),
  );
  nav.hidden = true;
  signOutButton.hidden = true;
  who.textContent = "";
  clear(main, form);
  input.focus();
}

async function start() {
  session.me = await get("/v1/me");
  if (!session.me.brand) {
    throw new Error("The dashboard shows one brand: sign in with a brand key, not the operator key.");
  }
  who.textContent = `${session.me.brand} · ${session.me.role}`;
  for (const link of nav.querySelectorAll("a[data-can]")) link.hidden = !can(link.dataset.can);
  nav.hidden = false;
  signOutButton.hidden = false;
  if (!streamControl) startStream();
  route();
}

function signOut() {
  setApiKey(null);
  session.me = null;
  if (streamControl) streamControl.abort();
  streamControl = null;
  if (page) page.leave();
  page = null;
  location.hash = "#/";
  signInPage();
}

const routes = [
  [/^#?\/?$/, () => overviewPage(main)],
  [/^#\/alerts$/, () => alertsPage(main)],
  [/^#\/alerts\/([^/]+)$/, (id) => alertPage(main, decodeURIComponent(id))],
  [/^#\/devices$/, () => devicesPage(main)],
  [/^#\/devices\/([^/]+)$/, (id) => devicePage(main, decodeURIComponent(id))],
  [/^#\/mode-tables$/, () => modeTablesPage(main)],
  [/^#\/rollouts$/, () => rolloutsPage(main)],
  [/^#\/notifications$/, () => notificationsPage(main)],
];

async function route() {
  if (!session.me) return;
  if (page) page.leave();
  page = null;
  const hash = location.hash.split("?")[0];
  for (const link of nav.querySelectorAll("a")) {
    const current = link.getAttribute("href") === (hash || "#/") ||
      (hash.startsWith("#/devices/") && link.getAttribute("href") === "#/devices") ||
      (hash.startsWith("#/alerts/") && link.getAttribute("href") === "#/alerts");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [pattern, render] of routes) {
    const match = hash.match(pattern);
    if (match) {
      try {
        page = (await render(...match.slice(1))) || null;
      } catch (error) {
        clear(main, errorBox(error));
      }
      main.focus();
      return;
    }
  }
  clear(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
}

window.addEventListener("hashchange", route);
window.addEventListener("galvani:unauthorized", () => signOut());
signOutButton.addEventListener("click", signOut);

if (apiKey()) start().catch(() => signOut());
else signInPage();
