/* The overview page (#/overview): cards, activity charts, next fires, running jobs, members,
 * recent leader changes; from GET /api/overview.
 */
import { app } from './state.js';
import { badge, clear, code, el, emptyRow, errorNote, loadingNote, pageHeader, section, table, throttle, truncated } from './dom.js';
import { describeTrigger, fmtMs, fmtNum, jsonText, parseTime, relEl, shortLocal, timeEl } from './format.js';
import { api } from './api.js';
import { setLeader } from './header.js';
import { barChart, chartFigure, lineChart } from './charts.js';

export function overviewPage() {
  const page = { title: 'Overview' };
  let root = null;
  let controller = null;
  const refreshSoon = throttle(() => page.refresh(), 2500);

  page.mount = (main) => {
    root = el('div', { class: 'overview' }, loadingNote());
    main.appendChild(el('div', null, pageHeader('Overview'), root));
    page.refresh();
  };

  page.unmount = () => {
    refreshSoon.cancel();
    if (controller) controller.abort();
  };

  page.refresh = async () => {
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const data = await api('/api/overview', { signal: controller.signal });
      const now = parseTime(data.now);
      if (now !== null) {
        app.clockOffset = now - Date.now();
        app.preciseClock = true;
      }
      render(data);
    } catch (e) {
      if (e.name === 'AbortError') return;
      clear(root).appendChild(errorNote(e));
    }
  };

  page.onEvent = (kind, d) => {
    if (['schedule', 'job', 'execution', 'handler', 'peer', 'voters', 'role'].includes(kind)) refreshSoon();
  };

  function card(label, valueNode, sub, extra) {
    return el('div', { class: `card ${extra || ''}`.trim() },
      el('div', { class: 'card-label' }, label),
      el('div', { class: 'card-value' }, valueNode),
      sub ? el('div', { class: 'card-sub' }, sub) : null);
  }

  function render(d) {
    setLeader(d.leader_id, d.term);
    const quorum = d.has_quorum
      ? el('span', { id: 'quorum', class: 'ok-text' }, 'yes')
      : el('span', { id: 'quorum', class: 'bad-text' }, 'no');
    const cards = el('div', { class: 'cards' },
      card('Leader', el('span', { id: 'leader-id', class: 'js-leader mono' }, ''), `this node: ${d.node_id} (${d.role})`),
      card('Term', el('span', { id: 'term', class: 'js-term mono' }, ''), `commit index ${fmtNum(d.commit_index)}`),
      card('Quorum', quorum, d.read_only ? 'read-only node' : null, d.has_quorum ? '' : 'card-bad'),
      card('Schedules', el('span', { id: 'count-schedules' }, fmtNum(d.schedules)), `${fmtNum(d.paused)} paused`),
      card('Paused', el('span', { id: 'count-paused' }, fmtNum(d.paused))),
      card('Running', el('span', { id: 'count-running' }, fmtNum(d.jobs_running)), `${fmtNum(d.jobs_pending)} pending`),
      card('Handlers', el('span', { id: 'count-handlers' }, fmtNum(d.handlers))));

    clear(root).append(
      cards,
      renderCharts(d.activity),
      el('div', { class: 'two-col' }, renderNextFires(d.next_fires || []), renderRunning(d.running || [])),
      el('div', { class: 'two-col' }, renderMembers(d.members || []), renderLeadership(d.leadership || [])));
    setLeader(d.leader_id, d.term);
  }

  function renderCharts(activity) {
    const buckets = (activity && activity.buckets) || [];
    const labels = buckets.map((b) => {
      const ms = parseTime(b.start);
      return ms === null ? '?' : shortLocal(ms);
    });
    const fires = buckets.map((b) => b.fires || 0);
    const rates = buckets.map((b) => {
      const total = (b.succeeded || 0) + (b.failed || 0);
      return total ? (100 * (b.succeeded || 0)) / total : null;
    });
    const late = buckets.map((b) => (b.lateness_p50_ms === null || b.lateness_p50_ms === undefined ? null : b.lateness_p50_ms));
    const totalFires = fires.reduce((a, b) => a + b, 0);
    const ok = buckets.reduce((a, b) => a + (b.succeeded || 0), 0);
    const failed = buckets.reduce((a, b) => a + (b.failed || 0), 0);
    const lateNums = late.filter((v) => v !== null);
    const lateMax = buckets.reduce((a, b) => Math.max(a, b.lateness_max_ms || 0), 0);
    const bucketSeconds = (activity && activity.bucket_seconds) || 10;
    return section('Last 10 minutes',
      el('div', { class: 'charts' },
        chartFigure(`Fires per ${bucketSeconds} s`, `${fmtNum(totalFires)} total`,
          barChart(fires, labels, { label: 'fires per bucket' })),
        chartFigure('Success rate', ok + failed ? `${((100 * ok) / (ok + failed)).toFixed(1)} % (${fmtNum(failed)} failed)` : 'no runs',
          barChart(rates, labels, {
            label: 'success rate per bucket', max: 100, format: (v) => `${v.toFixed(1)} %`,
            barClass: (v) => (v >= 99.95 ? 'chart-bar chart-ok' : v >= 90 ? 'chart-bar chart-warn' : 'chart-bar chart-bad'),
          })),
        chartFigure('Lateness p50', lateNums.length ? `${fmtMs(lateNums[lateNums.length - 1])} latest · max ${fmtMs(lateMax)}` : 'no data',
          lineChart(late, labels, { label: 'lateness p50 per bucket in ms', format: fmtMs }))));
  }

  function renderNextFires(rows) {
    const t = table('next-fires-table', ['Schedule', 'Task', 'Trigger', ['Next fire', 'num']], 'Next fires');
    for (const r of rows) {
      t.tbody.appendChild(el('tr', { dataset: { scheduleId: r.schedule_id } },
        el('td', null, code(r.schedule_id)),
        el('td', null, r.task),
        el('td', null, describeTrigger(r.trigger)),
        el('td', { class: 'num nowrap' }, relEl(r.next_fire_time, 'countdown'), ' ', el('span', { class: 'muted small' }, timeEl(r.next_fire_time)))));
    }
    if (!rows.length) t.tbody.appendChild(emptyRow(4, 'No upcoming fires.'));
    return section('Next fires', t.wrap);
  }

  function renderRunning(rows) {
    const t = table('running-table', ['Task', 'Schedule', 'Handler', ['Attempt', 'num'], ['Scheduled', 'num']], 'Running jobs');
    for (const r of rows) {
      t.tbody.appendChild(el('tr', { dataset: { jobId: r.job_id } },
        el('td', { title: r.job_id }, r.task),
        el('td', null, r.schedule_id ? code(r.schedule_id) : el('span', { class: 'muted' }, 'run now')),
        el('td', null, r.handler_id || '–'),
        el('td', { class: 'num' }, fmtNum(r.attempt)),
        el('td', { class: 'num nowrap' }, relEl(r.scheduled_fire_time))));
    }
    if (!rows.length) t.tbody.appendChild(emptyRow(5, 'Nothing running.'));
    return section('Running jobs', t.wrap);
  }

  function renderMembers(rows) {
    const t = table('members-table', ['Node', 'Role', 'State', ['Last seen', 'num']], 'Members');
    for (const m of rows) {
      t.tbody.appendChild(el('tr', { dataset: { nodeId: m.node_id } },
        el('td', { class: 'nowrap' }, code(m.node_id), m.node_id === app.leaderId ? el('span', { class: 'crown', title: 'leader' }, ' ★') : null),
        el('td', null, badge(m.role)),
        el('td', null, badge(m.state)),
        el('td', { class: 'num nowrap' }, relEl(m.last_seen))));
    }
    if (!rows.length) t.tbody.appendChild(emptyRow(4, 'No members known.'));
    return section('Members', t.wrap);
  }

  function renderLeadership(rows) {
    const t = table('leadership-table', ['When', 'Event', 'Node', ['Term', 'num'], 'Detail'], 'Recent leader changes');
    for (const r of rows) {
      t.tbody.appendChild(el('tr', null,
        el('td', { class: 'nowrap' }, timeEl(r.ts)),
        el('td', null, badge(r.event)),
        el('td', null, code(r.node_id)),
        el('td', { class: 'num' }, fmtNum(r.term)),
        el('td', null, truncated(jsonText(r.detail), 80))));
    }
    if (!rows.length) t.tbody.appendChild(emptyRow(5, 'No leader changes recorded.'));
    return section('Recent leader changes', t.wrap);
  }

  return page;
}
