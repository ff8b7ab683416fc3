// Who is signed in and the live alert feed, shared by the shell (app.js) and the pages. The
// shell fills it in; pages only read it, so imports run one way: app.js -> pages -> session.js.

export const session = { me: null, streamState: "connecting" };

const listeners = new Set();

export function can(action) {
  const role = session.me && session.me.role;
  if (action === "alerts") return role === "admin" || role === "support";
  if (action === "clear") return role === "admin" || role === "support";
  if (action === "tables") return role === "admin";
  // GET /v1/notification-channels and its deliveries: every brand role; the test send: admin.
  if (action === "channels") return role === "admin" || role === "support" || role === "viewer";
  if (action === "test-channel") return role === "admin";
  return false;
}

export function onAlert(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function publishAlert(alert) {
  listeners.forEach((listener) => listener(alert));
}
