/* The handlers page (#/handlers): one card per handler, kept live from handler events. */
import { badge, clear, el, errorNote, loadingNote, pageHeader } from './dom.js';
import { fmtMs, fmtNum, jsonText, relEl } from './format.js';
import { api, query } from './api.js';

export function handlersPage() {
  const page = { title: 'Handlers' };
  const cards = new Map();
  let grid = null;
  let summary = null;
  let loadSeq = 0;

  page.mount = (main) => {
    grid = el('div', { class: 'handler-grid', id: 'handlers-grid' }, loadingNote());
    summary = el('span', { class: 'muted small' });
    main.appendChild(el('div', null, pageHeader('Handlers', summary), grid));
    page.refresh();
  };

  page.unmount = () => {
    loadSeq += 1;
  };

  page.refresh = async () => {
    const seq = ++loadSeq;
    try {
      const all = [];
      let after = null;
      for (let i = 0; i < 10; i += 1) {
        const data = await api(`/api/handlers${query({ limit: 1000, after })}`);
        all.push(...(data.handlers || []));
        after = data.next || null;
        if (!after) break;
      }
      if (seq !== loadSeq) return;
      clear(grid);
      cards.clear();
      all.sort((a, b) => (a.handler_id < b.handler_id ? -1 : 1));
      for (const h of all) upsert(h);
      updateEmpty();
    } catch (e) {
      if (seq !== loadSeq) return;
      clear(grid).appendChild(errorNote(e));
    }
  };

  function updateEmpty() {
    const placeholder = grid.querySelector('.empty-note');
    if (!cards.size && !placeholder) grid.appendChild(el('p', { class: 'muted empty-note' }, 'No handlers connected.'));
    else if (cards.size && placeholder) placeholder.remove();
    summary.textContent = `${cards.size} handler${cards.size === 1 ? '' : 's'}`;
  }

  function stat(label, value, cls) {
    return el('div', { class: 'stat' }, el('dt', null, label), el('dd', { class: cls }, value));
  }

  function handlerCard(h) {
    const tags = h.tags && typeof h.tags === 'object' ? Object.entries(h.tags) : [];
    const tasks = Array.isArray(h.tasks) ? h.tasks : [];
    const host = [h.host, h.pid ? `pid ${h.pid}` : null].filter(Boolean).join(' · ');
    return el('article', { class: 'handler-card', dataset: { handlerId: h.handler_id } },
      el('header', { class: 'handler-head' },
        el('h2', { class: 'handler-id mono', title: h.handler_id }, h.handler_id),
        badge(h.state)),
      host ? el('div', { class: 'muted small' }, host) : null,
      el('dl', { class: 'stats' },
        stat('Active', fmtNum(h.active_jobs) + (h.concurrency ? ` / ${h.concurrency}` : '')),
        stat('Succeeded', fmtNum(h.succeeded), 'ok-text'),
        stat('Failed', fmtNum(h.failed), h.failed ? 'bad-text' : null),
        stat('Avg', fmtMs(h.avg_ms)),
        stat('Last seen', relEl(h.last_seen))),
      tags.length ? el('div', { class: 'chips', 'aria-label': 'tags' },
        tags.map(([k, v]) => el('span', { class: 'chip' }, `${k}=${jsonText(v)}`))) : null,
      el('div', { class: 'tasks' },
        el('span', { class: 'muted small' }, `${tasks.length} task${tasks.length === 1 ? '' : 's'}: `),
        tasks.slice(0, 30).map((t, i) => [i ? ', ' : '', el('code', { class: 'mono' }, String(t))]),
        tasks.length > 30 ? ` … +${tasks.length - 30}` : null));
  }

  function upsert(h) {
    if (!h || !h.handler_id) return;
    const card = handlerCard(h);
    const old = cards.get(h.handler_id);
    if (old) old.replaceWith(card);
    else {
      let before = null;
      for (const [id, node] of cards) {
        if (id > h.handler_id) {
          before = node;
          break;
        }
      }
      grid.insertBefore(card, before);
      const entries = [...cards.entries(), [h.handler_id, card]].sort((a, b) => (a[0] < b[0] ? -1 : 1));
      cards.clear();
      for (const [id, node] of entries) cards.set(id, node);
    }
  }

  page.onEvent = (kind, d) => {
    if (kind !== 'handler') return;
    if (d.action === 'gone') {
      const card = cards.get(d.handler_id);
      if (card) card.remove();
      cards.delete(d.handler_id);
    } else {
      const h = Object.assign({}, d);
      delete h.action;
      upsert(h);
    }
    updateEmpty();
  };

  return page;
}
