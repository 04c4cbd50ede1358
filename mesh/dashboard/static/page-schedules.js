/* The schedules page (#/schedules): search, filter, rows with live countdowns, run now, pause,
 * resume, edit, delete, bulk pause/resume.
 */
import { $, badge, clear, debounce, el, emptyRow, errorNote, pageHeader, table } from './dom.js';
import { describeTrigger, relEl, timeEl } from './format.js';
import { api, query, schedulePath } from './api.js';
import { toast, toastError } from './toast.js';
import { askBackfillRange, askDelete, askPauseNote } from './dialogs.js';
import { scheduleForm } from './schedule-form.js';

function scheduleMatches(s, filter) {
  if (filter.paused === 'true' && !s.paused) return false;
  if (filter.paused === 'false' && s.paused) return false;
  if (filter.q) {
    const q = filter.q.toLowerCase();
    if (!String(s.id).toLowerCase().includes(q) && !String(s.task).toLowerCase().includes(q)) return false;
  }
  return true;
}

function stateCell(s) {
  const td = el('td', { class: 'state-cell' });
  if (s.paused) {
    td.appendChild(badge('paused', 'warn'));
    const note = typeof s.note === 'string' && s.note ? s.note : null;
    if (note) td.appendChild(el('span', { class: 'pause-note', title: note }, ` ${note.length > 60 ? `${note.slice(0, 60)}…` : note}`));
  } else {
    td.appendChild(badge('active', 'ok'));
  }
  if (Number.isInteger(s.remaining_runs)) {
    const left = s.remaining_runs;
    td.appendChild(el('span', { class: 'runs-left muted', title: 'remaining_runs' }, left === 0 ? ' run limit reached' : ` ${left} run${left === 1 ? '' : 's'} left`));
  }
  return td;
}

function actionButton(action, label, id, extraClass) {
  return el('button', {
    type: 'button', class: `btn btn-small op ${extraClass || ''}`.trim(), dataset: { action },
    'aria-label': `${label} ${id}`,
  }, label);
}

function scheduleRow(s, checked) {
  const next = el('td', { class: 'nowrap next-cell' });
  const last = el('td', { class: 'nowrap last-cell' });
  fillFireCells(next, last, s.next_fire_time, s.last_fire_time, s.paused);
  return el('tr', { dataset: { scheduleId: s.id }, class: s.paused ? 'is-paused' : null },
    el('td', { class: 'check-col' },
      el('input', { type: 'checkbox', class: 'row-check', id: `select-${s.id}`, checked: !!checked }),
      el('label', { for: `select-${s.id}`, class: 'visually-hidden' }, `select ${s.id}`)),
    el('td', null, el('a', {
      href: `#/executions?schedule=${encodeURIComponent(s.id)}`, class: 'id-link', title: `executions of ${s.id}`,
    }, el('code', { class: 'mono sched-id' }, s.id))),
    el('td', null, s.task),
    el('td', { class: 'trigger-cell' }, describeTrigger(s.trigger)),
    next,
    last,
    stateCell(s),
    el('td', { class: 'actions nowrap' },
      actionButton('run', 'Run now', s.id),
      actionButton('backfill', 'Backfill', s.id, 'btn-ghost'),
      s.paused ? actionButton('resume', 'Resume', s.id) : actionButton('pause', 'Pause', s.id),
      actionButton('edit', 'Edit', s.id, 'btn-ghost'),
      actionButton('delete', 'Delete', s.id, 'btn-ghost btn-danger-text')));
}

function fillFireCells(next, last, nextIso, lastIso, paused) {
  clear(next);
  if (paused) next.appendChild(el('span', { class: 'muted' }, 'paused'));
  else if (nextIso) next.append(relEl(nextIso, 'countdown'), el('br'), el('span', { class: 'muted small' }, timeEl(nextIso)));
  else next.appendChild(el('span', { class: 'muted' }, 'never'));
  clear(last).appendChild(timeEl(lastIso));
}

export function schedulesPage() {
  const page = { title: 'Schedules' };
  const filter = { q: '', paused: '' };
  const rows = new Map(); // id -> {tr, schedule}
  const selected = new Set();
  let next = null;
  let tbody = null;
  let moreButton = null;
  let summary = null;
  let selectAll = null;
  let loadSeq = 0;
  const search = debounce(() => page.refresh(), 250);

  page.mount = (main) => {
    const searchBox = el('input', {
      type: 'search', id: 'schedule-search', placeholder: 'id or task contains…', autocomplete: 'off', spellcheck: 'false',
      oninput: (ev) => {
        filter.q = ev.target.value.trim();
        search();
      },
    });
    const filterSelect = el('select', {
      id: 'schedule-filter',
      onchange: (ev) => {
        filter.paused = { active: 'false', paused: 'true' }[ev.target.value] || '';
        page.refresh();
      },
    }, el('option', { value: 'all' }, 'all'), el('option', { value: 'active' }, 'active'), el('option', { value: 'paused' }, 'paused'));
    selectAll = el('input', { type: 'checkbox', id: 'schedule-select-all', onchange: onSelectAll });
    const t = table('schedules-table', [
      ['', 'check-col'], 'Id', 'Task', 'Trigger', 'Next fire', 'Last fire', 'State', ['Actions', 'actions'],
    ], 'Schedules');
    t.table.querySelector('th.check-col').append(selectAll,
      el('label', { for: 'schedule-select-all', class: 'visually-hidden' }, 'select all shown schedules'));
    tbody = t.tbody;
    tbody.addEventListener('click', onTableClick);
    tbody.addEventListener('change', onRowCheck);
    moreButton = el('button', { type: 'button', id: 'schedules-more', class: 'btn', hidden: true, onclick: () => load(false) }, 'Load more');
    summary = el('span', { class: 'muted small', id: 'schedules-summary' });
    main.appendChild(el('div', null,
      pageHeader('Schedules',
        el('button', { type: 'button', id: 'schedule-new', class: 'btn btn-primary op', onclick: () => scheduleForm.open(null, onSaved) }, 'New schedule')),
      el('div', { class: 'toolbar' },
        el('div', { class: 'field-inline' }, el('label', { for: 'schedule-search' }, 'Search'), searchBox),
        el('div', { class: 'field-inline' }, el('label', { for: 'schedule-filter' }, 'Show'), filterSelect),
        el('div', { class: 'bulk op' },
          el('button', { type: 'button', id: 'bulk-pause', class: 'btn btn-small op', onclick: () => bulk('pause') }, 'Pause selected'),
          el('button', { type: 'button', id: 'bulk-resume', class: 'btn btn-small op', onclick: () => bulk('resume') }, 'Resume selected'),
          el('span', { id: 'bulk-count', class: 'muted small' }, '')),
        summary),
      t.wrap,
      el('div', { class: 'more-row' }, moreButton)));
    updateBulk();
    page.refresh();
  };

  page.unmount = () => {
    search.cancel();
    loadSeq += 1;
  };

  page.refresh = () => load(true);

  async function load(reset) {
    const seq = ++loadSeq;
    const params = { limit: 50, q: filter.q, paused: filter.paused, after: reset ? null : next };
    if (reset) moreButton.hidden = true;
    moreButton.disabled = true;
    try {
      const data = await api(`/api/schedules${query(params)}`);
      if (seq !== loadSeq) return;
      if (reset) {
        clear(tbody);
        rows.clear();
      }
      for (const s of data.schedules || []) {
        if (!scheduleMatches(s, filter)) continue; // an older node may ignore q/paused
        const old = rows.get(s.id);
        const tr = scheduleRow(s, selected.has(s.id));
        if (old) old.tr.replaceWith(tr);
        else tbody.appendChild(tr);
        rows.set(s.id, { tr, schedule: s });
      }
      next = data.next || null;
      if (reset) pruneSelection();
      updateEmpty();
      updateBulk();
    } catch (e) {
      if (seq !== loadSeq) return;
      if (reset) {
        clear(tbody);
        rows.clear();
        tbody.appendChild(el('tr', { class: 'empty' }, el('td', { colspan: 8 }, errorNote(e))));
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
    if (rows.size === 0 && !placeholder) {
      tbody.appendChild(emptyRow(8, filter.q || filter.paused ? 'No schedule matches.' : 'No schedules yet.'));
    } else if (rows.size > 0 && placeholder) placeholder.remove();
    summary.textContent = `${rows.size} shown${next ? ' (more available)' : ''}`;
  }

  function pruneSelection() {
    for (const id of [...selected]) if (!rows.has(id)) selected.delete(id);
  }

  function updateBulk() {
    const count = selected.size;
    for (const id of ['bulk-pause', 'bulk-resume']) {
      const b = $(id);
      if (b) b.disabled = count === 0;
    }
    const label = $('bulk-count');
    if (label) label.textContent = count ? `${count} selected` : '';
    if (selectAll) {
      selectAll.checked = count > 0 && count === rows.size;
      selectAll.indeterminate = count > 0 && count < rows.size;
    }
  }

  function onSelectAll() {
    selected.clear();
    for (const [id, row] of rows) {
      const box = row.tr.querySelector('.row-check');
      box.checked = selectAll.checked;
      if (selectAll.checked) selected.add(id);
    }
    updateBulk();
  }

  function onRowCheck(ev) {
    if (!ev.target.classList.contains('row-check')) return;
    const id = ev.target.closest('tr').dataset.scheduleId;
    if (ev.target.checked) selected.add(id);
    else selected.delete(id);
    updateBulk();
  }

  function onTableClick(ev) {
    const button = ev.target.closest('button[data-action]');
    if (!button) return;
    const tr = button.closest('tr');
    const row = rows.get(tr.dataset.scheduleId);
    if (!row) return;
    const action = button.dataset.action;
    if (action === 'run') runNow(row.schedule);
    else if (action === 'backfill') backfillOne(row.schedule);
    else if (action === 'pause') pauseOne(row.schedule);
    else if (action === 'resume') resumeOne(row.schedule);
    else if (action === 'edit') editOne(row.schedule);
    else if (action === 'delete') deleteOne(row.schedule);
  }

  /** Puts a schedule into the table (in id order), replaces its row, or drops it. */
  function upsert(s) {
    const old = rows.get(s.id);
    if (!scheduleMatches(s, filter)) {
      if (old) removeRow(s.id);
      return;
    }
    if (old) {
      const tr = scheduleRow(s, selected.has(s.id));
      old.tr.replaceWith(tr);
      rows.set(s.id, { tr, schedule: s });
      return;
    }
    // A new row: only if it sorts within what is loaded (else "Load more" brings it).
    const ids = [...rows.keys()];
    if (next && ids.length && s.id > ids[ids.length - 1]) return;
    const tr = scheduleRow(s, false);
    let before = null;
    for (const [id, row] of rows) {
      if (id > s.id) {
        before = row.tr;
        break;
      }
    }
    tbody.insertBefore(tr, before);
    // keep the Map in id order
    const entries = [...rows.entries(), [s.id, { tr, schedule: s }]].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    rows.clear();
    for (const [id, row] of entries) rows.set(id, row);
    tr.classList.add('flash');
    updateEmpty();
    updateBulk();
  }

  function removeRow(id) {
    const row = rows.get(id);
    if (!row) return;
    row.tr.remove();
    rows.delete(id);
    selected.delete(id);
    updateEmpty();
    updateBulk();
  }

  page.onEvent = (kind, d) => {
    if (kind !== 'schedule') return;
    if ((d.action === 'added' || d.action === 'updated') && d.schedule) upsert(d.schedule);
    else if (d.action === 'removed') removeRow(d.id);
    else if (d.action === 'fired') {
      const row = rows.get(d.id);
      if (!row) return;
      row.schedule = Object.assign({}, row.schedule, { next_fire_time: d.next_fire_time, last_fire_time: d.last_fire_time });
      fillFireCells(row.tr.querySelector('.next-cell'), row.tr.querySelector('.last-cell'), d.next_fire_time, d.last_fire_time, row.schedule.paused);
    }
  };

  function onSaved(s, created) {
    if (s && s.id) upsert(s);
    toast(`${created ? 'created' : 'saved'} ${s.id}${s.warnings && s.warnings.length ? ` (${s.warnings.join('; ')})` : ''}`, s.warnings && s.warnings.length ? 'warn' : 'ok');
  }

  async function runNow(s) {
    try {
      const data = await api(`${schedulePath(s.id)}/trigger`, { method: 'POST', body: {} });
      toast(`triggered ${s.id}: job ${data.job_id}`);
    } catch (e) {
      toastError(e);
    }
  }

  async function backfillOne(s) {
    const range = await askBackfillRange(`Run each fire time of ${s.id} in [start, end) that has not run, one after another (at most 1000).`);
    if (range === null) return;
    try {
      const data = await api(`${schedulePath(s.id)}/backfill`, { method: 'POST', body: range });
      toast(`backfill of ${s.id}: ${data.fire_times} fire times, ${data.already_run} already ran, ${data.job_ids.length} queued`);
    } catch (e) {
      toastError(e);
    }
  }

  async function pauseOne(s) {
    const note = await askPauseNote(`Pause ${s.id}: it will not fire until resumed.`);
    if (note === null) return;
    try {
      const updated = await api(`${schedulePath(s.id)}/pause`, { method: 'POST', body: note ? { note } : {} });
      if (updated && updated.id) upsert(updated);
      toast(`paused ${s.id}`);
    } catch (e) {
      toastError(e);
    }
  }

  async function resumeOne(s) {
    try {
      const updated = await api(`${schedulePath(s.id)}/resume`, { method: 'POST', body: {} });
      if (updated && updated.id) upsert(updated);
      toast(`resumed ${s.id}`);
    } catch (e) {
      toastError(e);
    }
  }

  function editOne(s) {
    scheduleForm.open(s, onSaved);
  }

  async function deleteOne(s) {
    if (!(await askDelete(`Delete schedule ${s.id} (${s.task})?`))) return;
    try {
      await api(schedulePath(s.id), { method: 'DELETE' });
      removeRow(s.id);
      toast(`deleted ${s.id}`);
    } catch (e) {
      toastError(e);
    }
  }

  async function bulk(action) {
    const wantPaused = action === 'pause';
    const ids = [...selected].filter((id) => {
      const row = rows.get(id);
      return !row || !!row.schedule.paused !== wantPaused;
    });
    const skipped = selected.size - ids.length;
    if (!ids.length) {
      toast(`the selected schedules are already ${wantPaused ? 'paused' : 'active'}`, 'warn');
      return;
    }
    let note = '';
    if (action === 'pause') {
      note = await askPauseNote(`Pause ${ids.length} schedule${ids.length === 1 ? '' : 's'}.`);
      if (note === null) return;
    }
    let done = 0;
    const failures = [];
    for (const id of ids) {
      try {
        const body = action === 'pause' && note ? { note } : {};
        const updated = await api(`${schedulePath(id)}/${action}`, { method: 'POST', body });
        if (updated && updated.id) upsert(updated);
        done += 1;
      } catch (e) {
        failures.push(`${id}: ${e.message}`);
      }
    }
    const verb = action === 'pause' ? 'paused' : 'resumed';
    if (done) toast(`${verb} ${done} schedule${done === 1 ? '' : 's'}${skipped ? ` (${skipped} already ${wantPaused ? 'paused' : 'active'})` : ''}`);
    if (failures.length) toast(`${failures.length} failed: ${failures.slice(0, 3).join('; ')}`, 'error');
    selected.clear();
    for (const row of rows.values()) row.tr.querySelector('.row-check').checked = false;
    updateBulk();
  }

  return page;
}
