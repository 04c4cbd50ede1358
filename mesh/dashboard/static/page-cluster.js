/* The cluster page (#/cluster): leader, term, quorum, members (with voters), and the live event
 * log.
 */
import { app, EVENT_LOG_SIZE } from './state.js';
import { badge, clear, code, debounce, el, emptyRow, errorNote, loadingNote, pageHeader, section, table, truncated } from './dom.js';
import { fmtNum, jsonText, relEl, shortLocal } from './format.js';
import { api } from './api.js';
import { setLeader } from './header.js';

export function clusterPage() {
  const page = { title: 'Cluster' };
  let info = null;
  let membersBox = null;
  let replicasBox = null;
  let logBody = null;
  let loadSeq = 0;
  const refreshSoon = debounce(() => page.refresh(), 500);

  page.mount = (main) => {
    info = el('div', { class: 'cards' }, loadingNote());
    membersBox = el('div', null);
    replicasBox = el('div', null);
    const t = table('event-log-table', ['Time', 'Event', 'Summary'], 'Event log');
    logBody = t.tbody;
    logBody.id = 'event-log';
    for (const entry of app.eventLog) logBody.appendChild(logRow(entry));
    main.appendChild(el('div', null,
      pageHeader('Cluster'),
      info,
      section('Members', membersBox),
      section('Read-only replicas following this node', replicasBox),
      section(`Event log (last ${EVENT_LOG_SIZE} events)`, t.wrap)));
    page.refresh();
  };

  page.unmount = () => {
    refreshSoon.cancel();
    loadSeq += 1;
  };

  page.refresh = async () => {
    const seq = ++loadSeq;
    try {
      const [cluster, voters, health] = await Promise.all([
        api('/api/cluster'),
        api('/api/cluster/members').catch(() => null),
        api('/api/health').catch(() => null),
      ]);
      if (seq !== loadSeq) return;
      render(cluster, voters, health);
    } catch (e) {
      if (seq !== loadSeq) return;
      clear(info).appendChild(errorNote(e));
    }
  };

  function render(cluster, voters, health) {
    setLeader(cluster.leader_id, cluster.term);
    const cards = [
      ['Leader', el('span', { class: 'js-leader mono' }, '')],
      ['Term', el('span', { class: 'js-term mono' }, '')],
      ['Quorum', cluster.has_quorum === undefined ? '–' : cluster.has_quorum ? 'yes' : 'no'],
    ];
    if (health) {
      cards.push(['This node', `${health.node_id} (${health.role})`]);
      cards.push(['Commit index', fmtNum(health.commit_index)]);
      if (health.zone !== undefined) cards.push(['Zone', health.zone || '–']);
      if (health.upstream !== undefined) cards.push(['Upstream', health.upstream || '–']);
      if (health.lag_seconds !== undefined) {
        cards.push(['Lag', health.lag_seconds === null ? '–' : `${Number(health.lag_seconds).toFixed(1)} s`]);
      }
    }
    clear(info);
    for (const [label, value] of cards) {
      info.appendChild(el('div', { class: 'card' }, el('div', { class: 'card-label' }, label), el('div', { class: 'card-value card-value-sm' }, value)));
    }
    setLeader(cluster.leader_id, cluster.term);

    const byId = new Map();
    for (const m of cluster.members || []) byId.set(m.node_id, Object.assign({}, m));
    if (voters) {
      for (const m of voters.members || []) byId.set(m.node_id, Object.assign(byId.get(m.node_id) || {}, m));
    }
    const t = table('cluster-members-table', ['Node', 'Role', 'State', 'Voter', 'Removed', 'Mesh address', 'HTTP address', ['Last seen', 'num']], 'Members');
    const ids = [...byId.keys()].sort();
    for (const id of ids) {
      const m = byId.get(id);
      t.tbody.appendChild(el('tr', { dataset: { nodeId: id } },
        el('td', { class: 'nowrap' }, code(id), id === cluster.leader_id ? el('span', { class: 'crown', title: 'leader' }, ' ★') : null),
        el('td', null, m.role ? badge(m.role) : '–'),
        el('td', null, m.state ? badge(m.state) : '–'),
        el('td', null, m.voter === undefined ? '–' : m.voter ? 'yes' : 'no'),
        el('td', null, m.removed ? badge('removed', 'bad') : 'no'),
        el('td', { class: 'mono small' }, m.mesh_address || '–'),
        el('td', { class: 'mono small' }, m.http_address || '–'),
        el('td', { class: 'num nowrap' }, relEl(m.last_seen))));
    }
    if (!ids.length) t.tbody.appendChild(emptyRow(8, 'No members known.'));
    clear(membersBox).appendChild(t.wrap);
    if (voters && voters.auto_join !== undefined) {
      membersBox.appendChild(el('p', { class: 'muted small' }, `auto join: ${jsonText(voters.auto_join)}`));
    }
    renderReplicas(cluster.replicas, health);
  }

  /** The replicas following this voter (from /api/cluster), or, on a replica, its own lag. */
  function renderReplicas(replicas, health) {
    const t = table('replicas-table', ['Replica', 'Zone', ['Acknowledged', 'num'], ['Behind (changes)', 'num'], ['Last ack', 'num']], 'Replicas');
    for (const r of replicas || []) {
      t.tbody.appendChild(el('tr', { dataset: { replicaId: r.replica_id } },
        el('td', null, code(r.replica_id)),
        el('td', null, r.zone ? badge(r.zone, 'muted') : '–'),
        el('td', { class: 'num' }, fmtNum(r.acked)),
        el('td', { class: 'num' }, fmtNum(r.lag_changes)),
        el('td', { class: 'num nowrap' }, `${Number(r.last_ack_seconds).toFixed(1)} s ago`)));
    }
    if (!(replicas || []).length) {
      const none = health && health.role === 'replica'
        ? 'This is a replica: its own lag is shown above.'
        : 'No replica follows this node.';
      t.tbody.appendChild(emptyRow(5, none));
    }
    clear(replicasBox).appendChild(t.wrap);
  }

  function logRow(entry) {
    return el('tr', null,
      el('td', { class: 'nowrap mono small', title: entry.id || '' }, shortLocal(entry.at)),
      el('td', null, badge(entry.kind, 'muted')),
      el('td', null, truncated(entry.summary, 160)));
  }

  page.onLog = (entry) => {
    if (!logBody) return;
    logBody.insertBefore(logRow(entry), logBody.firstChild);
    while (logBody.children.length > EVENT_LOG_SIZE) logBody.lastElementChild.remove();
  };

  page.onEvent = (kind) => {
    if (kind === 'peer' || kind === 'voters' || kind === 'role' || kind === 'leader') refreshSoon();
  };

  return page;
}
