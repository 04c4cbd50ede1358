/* ScheduleZero Mesh dashboard: plain ES2020 modules, no build step, no dependencies. This is the
 * entry point (index.html loads it with <script type="module">): it wires the token form, the
 * dialogs, the router, the ticker and the live event stream.
 *
 * Security: see dom.js (API data only ever goes in as text or attributes, never as HTML).
 *
 * Layout (each module imports only modules above it in this list; no cycles):
 *   state.js            the shared `app` state object and constants
 *   dom.js              DOM helpers (el, svg, clear, $, badge, table…), debounce / throttle
 *   format.js           time & formatting, live relative times, a trigger in words
 *   toast.js            toasts and the "a token is needed" box
 *   api.js              fetch wrapper for the JSON API
 *   header.js           node role, leader and term in the header and on the pages
 *   auth.js             token, whoami, health, permissions, read-only banner
 *   events.js           live events (SSE over fetch), the event log
 *   charts.js           small SVG charts
 *   dialogs.js          pause / delete confirmation dialogs
 *   schedule-form.js    the create / edit schedule dialog
 *   page-overview.js, page-schedules.js, page-executions.js, page-handlers.js, page-cluster.js,
 *   page-tests.js
 *   router.js           hash routes → pages
 *   main.js             start
 */
import { app } from './state.js';
import { $ } from './dom.js';
import { tick } from './format.js';
import { toast } from './toast.js';
import { loadToken, refreshHealth, refreshWhoami, setToken } from './auth.js';
import { live } from './events.js';
import { setupDialogs } from './dialogs.js';
import { scheduleForm } from './schedule-form.js';
import { renderRoute } from './router.js';

/** Wait (briefly) for the event stream, then mount the page: its data is then fetched once,
 *  after the stream was registered, so no change can fall between the two. */
const STREAM_WAIT_MS = 1500;

function renderWhenLive() {
  live.whenConnected(STREAM_WAIT_MS).then(() => renderRoute(true));
}

/** After a token change (and its whoami): reopen the event stream, re-render the page. */
function restart() {
  live.restart();
  renderWhenLive();
}

function start() {
  loadToken();
  $('token-input').placeholder = app.token ? 'token in use (hidden)' : 'API token';
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('token-input').value.trim();
    if (!value) {
      toast('paste a token first', 'error');
      return;
    }
    setToken(value, restart);
    toast('token in use for this tab');
  });
  $('token-clear').addEventListener('click', () => {
    setToken(null, restart);
    toast('token forgotten');
  });
  setupDialogs();
  scheduleForm.setup();
  window.addEventListener('hashchange', () => {
    renderRoute(false);
    $('main').focus({ preventScroll: true });
  });
  window.addEventListener('online', () => live.restart());
  setInterval(tick, 250);
  refreshHealth();
  refreshWhoami();
  live.start();
  renderWhenLive();
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
