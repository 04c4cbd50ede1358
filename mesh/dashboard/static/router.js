/* The hash router: #/<page>?<params> → the page object mounted in <main> (a page is made
 * with the hash's parameters).
 *
 * Each page: {title, mount(main), unmount(), refresh(), onEvent(kind, data), onLog(entry)}.
 */
import { app } from './state.js';
import { $, clear } from './dom.js';
import { setLeader } from './header.js';
import { overviewPage } from './page-overview.js';
import { schedulesPage } from './page-schedules.js';
import { executionsPage } from './page-executions.js';
import { handlersPage } from './page-handlers.js';
import { clusterPage } from './page-cluster.js';
import { testsPage } from './page-tests.js';

const ROUTES = {
  overview: overviewPage,
  schedules: schedulesPage,
  executions: executionsPage,
  handlers: handlersPage,
  cluster: clusterPage,
  tests: testsPage,
};

function currentRoute() {
  const m = /^#\/([a-z]+)/.exec(location.hash || '');
  return m && ROUTES[m[1]] ? m[1] : 'overview';
}

/** The parameters after "?" in the hash: #/executions?schedule=nightly. */
function routeParams() {
  const hash = location.hash || '';
  const at = hash.indexOf('?');
  return new URLSearchParams(at < 0 ? '' : hash.slice(at + 1));
}

export function renderRoute(force) {
  const route = currentRoute();
  if (!force && location.hash === app.hash && app.page) return;
  app.hash = location.hash;
  if (app.page && app.page.unmount) app.page.unmount();
  app.route = route;
  for (const name of Object.keys(ROUTES)) {
    const link = $(`nav-${name}`);
    if (name === route) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const main = clear($('main'));
  const page = ROUTES[route](routeParams());
  app.page = page;
  document.title = `${page.title} · ScheduleZero Mesh`;
  app.mountedAt = performance.now(); // the page fetches its data now (see events.js, hello)
  page.mount(main);
  setLeader(undefined, undefined);
}
