/* The executions page (#/executions): filters (schedule, outcome, since), history with Load more,
 * new runs added live at the top.
 */
import { OUTCOMES } from './state.js';
import { badge, clear, code, debounce, el, emptyRow, errorNote, pageHeader, table, truncated } from './dom.js';
import { errorText, fmtMs, fmtNum, parseTime, serverNow, timeEl } from './format.js';
import { api, query } from './api.js';
import { toastError } from './toast.js';

const SINCE_CHOICES = [['all', 'all time', 0], ['300', 'last 5 min', 300], ['3600', 'last 1 h', 3600], ['86400', 'last 24 h', 86400]];

/** params: the hash's parameters (URLSearchParams): ?schedule=<id> presets the filter. */
export function executionsPage(params) {
  const page = { title: 'Executions' };
  const filter = { schedule: params.get('schedule') || '', outcome: '', since: 0 };
  const seen = new Set();
  let tbody = null;
  let moreButton = null;
  let summary = null;
  let next = null;
  let sinceIso = null;
  let loadSeq = 0;
  let count = 0;
  const reload = debounce(() => page.refresh(), 300);

  page.mount = (main) => {
    const scheduleInput = el('input', {
      type: 'search', id: 'exec-schedule', placeholder: 'schedule id', autocomplete: 'off', spellcheck: 'false', value: filter.schedule || null,
      oninput: (ev) => {
        filter.schedule = ev.target.value.trim();
        reload();
      },
    });
    const outcomeSelect = el('select', {
      id: 'exec-outcome',
      onchange: (ev) => {
        filter.outcome = ev.target.value;
        page.refresh();
      },
    }, el('option', { value: '' }, 'any'), OUTCOMES.map((o) => el('option', { value: o }, o)));
    const sinceSelect = el('select', {
      id: 'exec-since',
      onchange: (ev) => {
        filter.since = Number(ev.target.value) || 0;
        page.refresh();
      },
    }, SINCE_CHOICES.map(([value, label]) => el('option', { value }, label)));
    const t = table('executions-table', [
      'Finished', 'Schedule', 'Task', 'Outcome', ['Duration', 'num'], 'Handler', ['Attempt', 'num'], ['Term', 'num'], ['Lateness', 'num'], 'Error',
    ], 'Executions');
    tbody = t.tbody;
    moreButton = el('button', { type: 'button', id: 'executions-more', class: 'btn', hidden: true, onclick: () => load(false) }, 'Load more');
    summary = el('span', { class: 'muted small' });
    main.appendChild(el('div', null,
      pageHeader('Executions'),
      el('div', { class: 'toolbar' },
        el('div', { class: 'field-inline' }, el('label', { for: 'exec-schedule' }, 'Schedule'), scheduleInput),
        el('div', { class: 'field-inline' }, el('label', { for: 'exec-outcome' }, 'Outcome'), outcomeSelect),
        el('div', { class: 'field-inline' }, el('label', { for: 'exec-since' }, 'Since'), sinceSelect),
        summary),
      t.wrap,
      el('div', { class: 'more-row' }, moreButton)));
    page.refresh();
  };

  page.unmount = () => {
    reload.cancel();
    loadSeq += 1;
  };

  page.refresh = () => load(true);

  async function load(reset) {
    const seq = ++loadSeq;
    if (reset) {
      sinceIso = filter.since ? new Date(serverNow() - filter.since * 1000).toISOString() : null;
      moreButton.hidden = true;
    }
    const params = { limit: 100, schedule_id: filter.schedule, outcome: filter.outcome, since: sinceIso, after: reset ? null : next };
    moreButton.disabled = true;
    try {
      const data = await api(`/api/executions${query(params)}`);
      if (seq !== loadSeq) return;
      if (reset) {
        clear(tbody);
        seen.clear();
        count = 0;
      }
      for (const x of data.executions || []) {
        const key = execKey(x);
        if (seen.has(key)) continue;
        seen.add(key);
        tbody.appendChild(execRow(x));
        count += 1;
      }
      next = data.next || null;
      updateEmpty();
    } catch (e) {
      if (seq !== loadSeq) return;
      if (reset) {
        clear(tbody);
        tbody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: 10 }, errorNote(e))));
      } else toastError(e);
    } finally {
      if (seq === loadSeq) {
        moreButton.hidden = !next;
        moreButton.disabled = false;
      }
    }
  }

  function updateEmpty() {
    const placeholder = tbody.querySelector('tr.empty');
    if (count === 0 && !placeholder) tbody.appendChild(emptyRow(10, 'No executions match.'));
    else if (count > 0 && placeholder) placeholder.remove();
    summary.textContent = `${count} shown${next ? ' (more available)' : ''}`;
  }

  const execKey = (x) => `${x.job_id}/${x.attempt}`;

  function matches(x) {
    if (filter.schedule && x.schedule_id !== filter.schedule) return false;
    if (filter.outcome && x.outcome !== filter.outcome) return false;
    if (sinceIso) {
      const at = parseTime(x.scheduled_fire_time || x.started_at || x.finished_at);
      if (at !== null && at < Date.parse(sinceIso)) return false;
    }
    return true;
  }

  function execRow(x) {
    const started = parseTime(x.started_at);
    const finished = parseTime(x.finished_at);
    const scheduled = parseTime(x.scheduled_fire_time);
    const duration = started !== null && finished !== null ? finished - started : null;
    const lateness = started !== null && scheduled !== null ? started - scheduled : null;
    const err = errorText(x.error);
    return el('tr', { dataset: { jobId: x.job_id }, title: `job ${x.job_id}` },
      el('td', { class: 'nowrap' }, timeEl(x.finished_at)),
      el('td', null, x.schedule_id ? code(x.schedule_id) : el('span', { class: 'muted' }, 'run now')),
      el('td', null, x.task),
      el('td', null, badge(x.outcome)),
      el('td', { class: 'num nowrap' }, fmtMs(duration)),
      el('td', null, truncated(x.handler_id || '–', 24)),
      el('td', { class: 'num' }, fmtNum(x.attempt)),
      el('td', { class: 'num' }, fmtNum(x.term)),
      el('td', { class: `num nowrap ${lateness !== null && lateness > 5000 ? 'warn-text' : ''}`.trim() }, fmtMs(lateness)),
      el('td', { class: 'error-cell' }, err ? truncated(err, 80) : ''));
  }

  page.onEvent = (kind, d) => {
    if (kind !== 'execution' || !d.job_id || !matches(d)) return;
    const key = execKey(d);
    if (seen.has(key)) return;
    seen.add(key);
    const tr = execRow(d);
    tr.classList.add('flash');
    tbody.insertBefore(tr, tbody.firstChild);
    count += 1;
    // Keep the page bounded: the oldest live rows go (Load more brings older ones).
    while (count > 1000 && tbody.lastElementChild) {
      tbody.lastElementChild.remove();
      count -= 1;
    }
    updateEmpty();
  };

  return page;
}
