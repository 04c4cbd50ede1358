/* The tests page (#/tests, #/tests?run=<run_id>): the scenario library (load, run, schedule,
 * delete), the live view of one run (GET /api/tests/metrics/<run_id>, SSE read over fetch),
 * and the history of runs with a trend per scenario of a chosen metric.
 *
 * Scenario names, descriptions, parameter values and error texts are user data: they go in as
 * text only (dom.js), like everything else on the dashboard.
 */
import { badge, clear, code, el, emptyRow, errorNote, pageHeader, section, sleep, table, truncated } from './dom.js';
import { fmtNum, jsonText, parseTime, shortLocal, timeEl } from './format.js';
import { api, authHeaders, download } from './api.js';
import { readEventStream } from './events.js';
import { lineChart, chartFigure } from './charts.js';
import { toast, toastError } from './toast.js';
import { askDelete } from './dialogs.js';
import { askLoadScenario, askRunScenario, askScheduleScenario } from './tests-dialogs.js';

const STATUS_KIND = { passed: 'ok', failed: 'bad', error: 'bad', cancelled: 'muted', running: 'info', queued: 'muted' };
const FINISHED = ['passed', 'failed', 'error', 'cancelled'];
// Reported by every run: not "key" metrics of the history table.
const ALWAYS = ['duration_seconds', 'actions_total', 'action_errors', 'fires_total'];
const HISTORY_LIMIT = 100;

const statusBadge = (status) => badge(status, STATUS_KIND[status] || 'muted');
const runPath = (runId) => `#/tests?run=${encodeURIComponent(runId)}`;

/** A measured value: '–' for none, integers as they are, else a few significant digits. */
function fmtValue(value) {
  if (value === null || value === undefined) return '–';
  if (typeof value !== 'number') return String(value);
  if (Number.isInteger(value)) return fmtNum(value);
  const digits = Math.abs(value) >= 100 ? 1 : Math.abs(value) >= 1 ? 2 : 3;
  return value.toLocaleString('en-US', { maximumFractionDigits: digits });
}

function metricText(name, m) {
  return `${name} ${fmtValue(m && m.value)}${m && m.unit ? ` ${m.unit}` : ''}`;
}

function durationText(run) {
  const d = run.metrics && run.metrics.duration_seconds;
  if (d && typeof d.value === 'number') return `${fmtValue(d.value)} s`;
  const start = parseTime(run.started_at);
  const end = parseTime(run.finished_at);
  return start !== null && end !== null ? `${fmtValue((end - start) / 1000)} s` : '–';
}

function opButton(action, label, name, onclick, extra) {
  return el('button', {
    type: 'button', class: `btn btn-small op${extra ? ` ${extra}` : ''}`, dataset: { action },
    'aria-label': `${label} ${name}`, onclick,
  }, label);
}

/** params: the hash's parameters: ?run=<run_id> opens that run's live view. */
export function testsPage(params) {
  const page = { title: 'Tests' };
  const runId = params.get('run');
  let libraryBody = null;
  let historyBody = null;
  let trends = null;
  let metricSelect = null;
  let pickedMetric = null; // the user's choice of trend, kept across refreshes
  let history = [];
  let loadSeq = 0;
  let follower = null;

  page.mount = (main) => {
    const lib = table('tests-library', ['Name', 'Description', 'Parameters', ['Steps', 'num'], 'Last run', ['', 'actions']], 'Scenarios');
    libraryBody = lib.tbody;
    const hist = table('tests-history', ['Run', 'Scenario', 'Status', 'Started', ['Duration', 'num'], 'Key metrics', 'Assertions'], 'Runs');
    historyBody = hist.tbody;
    metricSelect = el('select', {
      id: 'tests-trend-metric',
      onchange: () => {
        pickedMetric = metricSelect.value;
        renderTrends();
      },
    });
    trends = el('div', { class: 'charts', id: 'tests-trends' });
    const live = runId ? el('div', { id: 'tests-live-wrap' }) : null;
    main.appendChild(el('div', null,
      pageHeader('Tests',
        el('button', { type: 'button', class: 'btn btn-primary op', id: 'tests-load', onclick: loadScenario }, 'Load scenario'),
        el('button', { type: 'button', class: 'btn', id: 'tests-refresh', onclick: () => page.refresh() }, 'Refresh')),
      live,
      section('Library', lib.wrap),
      section('History',
        el('div', { class: 'toolbar panel-toolbar' },
          el('div', { class: 'field-inline' }, el('label', { for: 'tests-trend-metric' }, 'Trend of'), metricSelect),
          el('button', {
            type: 'button', class: 'btn btn-small', id: 'tests-history-csv',
            onclick: () => download(`/api/tests/runs?format=csv&limit=1000`, 'scenario-runs.csv').catch(toastError),
          }, 'Export CSV')),
        trends, hist.wrap)));
    if (runId) follower = followRun(live, runId, () => page.refresh());
    page.refresh();
  };

  page.unmount = () => {
    loadSeq += 1;
    if (follower) follower.stop();
  };

  page.refresh = async () => {
    const seq = ++loadSeq;
    const [lib, runs] = await Promise.allSettled([api('/api/tests'), api(`/api/tests/runs?limit=${HISTORY_LIMIT}`)]);
    if (seq !== loadSeq) return;
    renderLibrary(lib);
    renderHistory(runs);
  };

  // ------------------------------------------------------------------------- library

  function renderLibrary(answer) {
    clear(libraryBody);
    if (answer.status === 'rejected') {
      libraryBody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: 6 }, errorNote(answer.reason))));
      return;
    }
    const scenarios = answer.value.scenarios || [];
    if (!scenarios.length) libraryBody.appendChild(emptyRow(6, 'No scenario is loaded: "Load scenario" adds one.'));
    for (const s of scenarios) libraryBody.appendChild(scenarioRow(s));
  }

  function scenarioRow(s) {
    const params = s.parameters && typeof s.parameters === 'object' ? Object.entries(s.parameters) : [];
    const last = s.last_run;
    return el('tr', { dataset: { scenario: s.name } },
      el('td', null, code(s.name)),
      el('td', { class: 'description-cell' }, truncated(s.description || '', 160)),
      el('td', null, el('div', { class: 'chips' }, params.map(([k, v]) => el('span', { class: 'chip' }, `${k}=${jsonText(v)}`)))),
      el('td', { class: 'num' }, fmtNum(s.steps)),
      el('td', { class: 'nowrap' }, last
        ? el('a', { href: runPath(last.run_id), class: 'id-link', title: `run ${last.run_id}` }, statusBadge(last.status))
        : el('span', { class: 'muted' }, 'never')),
      el('td', { class: 'actions nowrap' },
        opButton('run', 'Run', s.name, () => runScenario(s), 'btn-primary'),
        opButton('schedule', 'Schedule', s.name, () => scheduleScenario(s)),
        opButton('delete', 'Delete', s.name, () => deleteScenario(s), 'btn-danger-text')));
  }

  async function loadScenario() {
    const loaded = await askLoadScenario();
    if (!loaded) return;
    toast(`loaded ${loaded.name} (version ${loaded.version})`);
    page.refresh();
  }

  async function runScenario(s) {
    const started = await askRunScenario(s);
    if (started) location.hash = runPath(started);
  }

  async function scheduleScenario(s) {
    const made = await askScheduleScenario(s);
    if (made) toast(`schedule ${made.id} runs ${s.name}`);
  }

  async function deleteScenario(s) {
    const what = { title: 'Delete scenario', note: 'Its runs stay in the history.' };
    if (!(await askDelete(`Delete scenario ${s.name}?`, what))) return;
    try {
      await api(`/api/tests/library/${encodeURIComponent(s.name)}`, { method: 'DELETE' });
      toast(`deleted ${s.name}`);
      page.refresh();
    } catch (e) {
      toastError(e);
    }
  }

  // ------------------------------------------------------------------------- history

  function renderHistory(answer) {
    clear(historyBody);
    if (answer.status === 'rejected') {
      history = [];
      historyBody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: 7 }, errorNote(answer.reason))));
    } else {
      history = answer.value.runs || [];
      if (!history.length) historyBody.appendChild(emptyRow(7, 'No run yet.'));
      for (const r of history) historyBody.appendChild(historyRow(r));
    }
    fillMetricChoices();
    renderTrends();
  }

  function historyRow(r) {
    const metrics = r.metrics && typeof r.metrics === 'object' ? r.metrics : {};
    const key = Object.keys(metrics).filter((n) => !ALWAYS.includes(n)).slice(0, 4);
    const assertions = Array.isArray(r.assertions) ? r.assertions : [];
    const held = assertions.filter((a) => a.passed).length;
    return el('tr', { dataset: { runId: r.run_id } },
      el('td', null, el('a', { href: runPath(r.run_id), class: 'id-link', title: `run ${r.run_id}` }, code(r.run_id))),
      el('td', null, r.name),
      el('td', null, statusBadge(r.status)),
      el('td', { class: 'nowrap' }, timeEl(r.started_at || r.requested_at)),
      el('td', { class: 'num nowrap' }, durationText(r)),
      el('td', null, el('div', { class: 'chips' }, key.map((n) => el('span', { class: 'chip' }, metricText(n, metrics[n]))))),
      el('td', { class: 'nowrap' }, assertions.length ? `${held}/${assertions.length} held` : '–'));
  }

  /** The metrics any run reported; shown: the user's choice, else the first metric an
   *  assertion uses (what the scenario's author cared about), else duration_seconds. */
  function fillMetricChoices() {
    const names = new Set();
    let asserted = null;
    for (const r of history) {
      for (const n of Object.keys(r.metrics || {})) names.add(n);
      for (const a of r.assertions || []) asserted = asserted || a.metric;
    }
    clear(metricSelect).append(...[...names].sort().map((n) => el('option', { value: n }, n)));
    const chosen = [pickedMetric, asserted, 'duration_seconds'].find((n) => n && names.has(n));
    if (chosen) metricSelect.value = chosen;
  }

  /** One sparkline per scenario: the chosen metric over its finished runs, oldest first. */
  function renderTrends() {
    clear(trends);
    const metric = metricSelect.value;
    const byName = new Map();
    for (const r of [...history].reverse()) {
      if (!FINISHED.includes(r.status) || r.status === 'cancelled') continue;
      if (!byName.has(r.name)) byName.set(r.name, []);
      byName.get(r.name).push(r);
    }
    if (!metric || !byName.size) {
      trends.appendChild(el('p', { class: 'muted' }, 'Trends appear once runs have finished.'));
      return;
    }
    for (const [name, runs] of [...byName.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
      const values = runs.map((r) => {
        const m = (r.metrics || {})[metric];
        return m && typeof m.value === 'number' ? m.value : null;
      });
      const unit = runs.map((r) => ((r.metrics || {})[metric] || {}).unit).find(Boolean) || '';
      const labels = runs.map((r) => `${r.run_id} (${r.status})`);
      const times = runs.map((r) => parseTime(r.started_at));
      const ends = [times[0] !== null ? shortLocal(times[0]) : '', times.at(-1) !== null ? shortLocal(times.at(-1)) : ''];
      const latest = values.at(-1);
      const chart = lineChart(values, labels, { label: `${metric} of ${name}`, format: fmtValue });
      const fig = chartFigure(name, `${fmtValue(latest)} ${unit}`.trim(), chart, ends);
      fig.dataset.scenario = name;
      trends.appendChild(fig);
    }
  }

  return page;
}

// ----------------------------------------------------------------------------- live view

/** Shows run runId in box, live from GET /api/tests/metrics/<run_id> until its `done` event
 *  (reconnecting after 1, 2, 4 … 10 s if the stream breaks); onDone() once it finished.
 *  Returns {stop}. */
function followRun(box, runId, onDone) {
  const view = runView(box, runId);
  let stopped = false;
  let controller = null;

  async function loop() {
    let delay = 1000;
    while (!stopped) {
      controller = new AbortController();
      let finished = false;
      try {
        const headers = Object.assign({ Accept: 'text/event-stream' }, authHeaders());
        const res = await fetch(`/api/tests/metrics/${encodeURIComponent(runId)}`, { headers, cache: 'no-store', signal: controller.signal });
        if (!res.ok || !res.body) {
          const message = await errorMessage(res);
          if (res.status !== 503) {
            view.failed(message); // unknown run, refused token: retrying cannot help
            return;
          }
          throw new Error(message);
        }
        view.connected();
        await readEventStream(res.body, () => !stopped, (frame) => {
          let run = null;
          try {
            run = JSON.parse(frame.data);
          } catch (e) {
            return;
          }
          if (frame.event === 'progress' || frame.event === 'done') view.show(run);
          if (frame.event === 'done') finished = true;
        });
      } catch (e) {
        if (stopped) return;
      }
      if (finished) {
        view.ended();
        onDone();
        return;
      }
      if (stopped) return;
      view.reconnecting();
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  }

  loop();
  return {
    stop() {
      stopped = true;
      if (controller) controller.abort();
    },
  };
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && typeof body.error === 'string') return body.error;
  } catch (e) { /* the status line will do */ }
  return `${res.status} ${res.statusText || 'error'}`;
}

/** The live view's elements and how a run's JSON fills them. */
function runView(box, runId) {
  const status = el('span', { id: 'tests-live-status' }, badge('connecting…', 'muted'));
  const stream = el('span', { class: 'muted small', id: 'tests-live-stream' });
  const title = el('span', { id: 'tests-live-name' }, '…');
  const meta = el('div', { class: 'muted small', id: 'tests-live-meta' });
  const stepText = el('span', { id: 'tests-live-step' }, '–');
  const progress = el('progress', { id: 'tests-live-progress', max: '1', value: '0' });
  const metrics = table('tests-live-metrics', ['Metric', ['Value', 'num'], 'Unit'], 'Metrics');
  const assertions = table('tests-live-assertions', ['Assertion', ['Measured', 'num'], 'Result'], 'Assertions');
  const problems = el('div', { id: 'tests-live-errors' });
  const cancel = el('button', {
    type: 'button', class: 'btn btn-small btn-danger op', id: 'tests-cancel',
    onclick: async () => {
      cancel.disabled = true;
      try {
        await api(`/api/tests/runs/${encodeURIComponent(runId)}/cancel`, { method: 'POST' });
        toast(`cancelling run ${runId}`);
      } catch (e) {
        cancel.disabled = false;
        toastError(e);
      }
    },
  }, 'Cancel run');
  const exporter = (format) => () => {
    const path = `/api/tests/results/${encodeURIComponent(runId)}${format === 'csv' ? '?format=csv' : ''}`;
    download(path, `scenario-${runId}.${format}`).catch(toastError);
  };
  clear(box).appendChild(section(`Run ${runId}`,
    el('div', { class: 'run-view', id: 'tests-live', dataset: { runId } },
      el('div', { class: 'run-head' },
        el('strong', null, title), status, stream,
        el('span', { class: 'run-actions' },
          cancel,
          el('button', { type: 'button', class: 'btn btn-small', id: 'tests-export-json', onclick: exporter('json') }, 'Export JSON'),
          el('button', { type: 'button', class: 'btn btn-small', id: 'tests-export-csv', onclick: exporter('csv') }, 'Export CSV'),
          el('a', { href: '#/tests', class: 'btn btn-small btn-ghost', id: 'tests-live-close' }, 'Close'))),
      meta,
      el('div', { class: 'run-step' }, el('label', { for: 'tests-live-progress' }, stepText), progress),
      problems,
      el('div', { class: 'two-col' }, metrics.wrap, assertions.wrap))));

  function show(run) {
    title.textContent = run.name || '?';
    clear(status).appendChild(statusBadge(run.status));
    cancel.hidden = FINISHED.includes(run.status);
    const parts = [`leader ${run.leader || '–'}`, `resumed ${fmtNum(run.resumed || 0)}×`];
    if (run.started_at) parts.push(`started ${shortLocal(parseTime(run.started_at))}`);
    if (run.finished_at) parts.push(`took ${durationText(run)}`);
    const given = run.parameters && typeof run.parameters === 'object' ? Object.entries(run.parameters) : [];
    clear(meta).append(parts.join(' · '), given.length ? ` · ${given.map(([k, v]) => `${k}=${jsonText(v)}`).join(', ')}` : '');
    showStep(run.step || {}, run.status);
    showProblems(run);
    showMetrics(run.metrics || {});
    showAssertions(Array.isArray(run.assertions) ? run.assertions : [], run.status);
  }

  /** A finished run's step says where it stopped: past the last one when it ran to its end. */
  function showStep(step, runStatus) {
    const of = typeof step.of === 'number' && step.of > 0 ? step.of : null;
    const done = typeof step.done === 'number' ? step.done : 0;
    const index = step.index || 0;
    const counted = of ? ` (${fmtNum(done)} / ${fmtNum(of)})` : '';
    let text = `step ${fmtNum(index + 1)}: ${step.name || '–'}${counted}`;
    if (runStatus === 'queued') text = 'queued: waiting for its turn';
    else if (runStatus === 'passed' || runStatus === 'failed') text = `all ${fmtNum(step.steps ?? index)} steps done`;
    else if (FINISHED.includes(runStatus)) text = `stopped in ${text}`;
    stepText.textContent = text;
    const whole = runStatus === 'passed' || runStatus === 'failed';
    progress.max = of && !whole ? of : 1;
    progress.value = of && !whole ? Math.min(done, of) : Number(whole);
  }

  function showProblems(run) {
    clear(problems);
    if (run.error) problems.appendChild(el('p', { class: 'error-note', id: 'tests-live-error' }, String(run.error)));
    const errors = Array.isArray(run.errors) ? run.errors : [];
    if (errors.length) {
      problems.appendChild(el('details', { class: 'run-errors' },
        el('summary', null, `${errors.length} action error${errors.length === 1 ? '' : 's'}`),
        el('ul', null, errors.map((e) => el('li', { class: 'mono' }, jsonText(e))))));
    }
  }

  function showMetrics(values) {
    clear(metrics.tbody);
    const names = Object.keys(values);
    if (!names.length) metrics.tbody.appendChild(emptyRow(3, 'No value yet.'));
    for (const name of names) {
      const m = values[name] || {};
      metrics.tbody.appendChild(el('tr', { dataset: { metric: name } },
        el('td', null, code(name)), el('td', { class: 'num' }, fmtValue(m.value)), el('td', { class: 'muted' }, m.unit || '')));
    }
  }

  function showAssertions(list, runStatus) {
    clear(assertions.tbody);
    if (!list.length) {
      const text = FINISHED.includes(runStatus) ? 'This scenario asserts nothing.' : 'Checked when the run ends.';
      assertions.tbody.appendChild(emptyRow(3, text));
    }
    for (const a of list) {
      const value = a.value === null || a.value === undefined ? 'no value' : fmtValue(a.value);
      assertions.tbody.appendChild(el('tr', { dataset: { passed: String(!!a.passed) } },
        el('td', null, code(a.expr)), el('td', { class: 'num' }, value),
        el('td', null, a.passed ? badge('pass', 'ok') : badge('fail', 'bad'))));
    }
  }

  return {
    show,
    connected: () => { stream.textContent = 'live'; },
    reconnecting: () => { stream.textContent = 'reconnecting…'; },
    ended: () => { stream.textContent = ''; },
    failed: (message) => {
      stream.textContent = '';
      clear(status).appendChild(badge('unavailable', 'bad'));
      clear(problems).appendChild(errorNote(message));
      cancel.hidden = true;
    },
  };
}
