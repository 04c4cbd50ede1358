/* ScheduleZero Mesh dashboard: plain ES2020, no build step, no dependencies.
 *
 * Security: every value that comes from the API is user data. It is only ever put into the page
 * with textContent / createTextNode / attribute setters (see el()), never as HTML, and into URLs
 * with encodeURIComponent. The page runs under a strict CSP (no inline code or styles).
 *
 * Layout of this file: helpers (DOM, time, formatting) → api() → toast → auth/whoami →
 * live events (SSE over fetch) → pages (overview, schedules, executions, handlers, cluster) →
 * router → start.
 */
(function () {
  'use strict';

  const TOKEN_KEY = 'schedulezero.token';
  const OUTCOMES = ['success', 'error', 'missed_start_deadline', 'deserialization_failed', 'cancelled', 'abandoned'];
  const EVENT_LOG_SIZE = 100;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // ------------------------------------------------------------------------------------ state
  const app = {
    token: null,
    who: null, // GET /api/whoami answer
    clockOffset: 0, // server time - local time, ms
    page: null, // the mounted page object
    route: null,
    eventLog: [], // newest first, ≤ EVENT_LOG_SIZE
    leaderId: undefined,
    term: undefined,
  };

  // ------------------------------------------------------------------------------ DOM helpers
  const $ = (id) => document.getElementById(id);

  /** Applies attrs to an element: class, dataset (data-*), on* listeners, booleans, the rest
   * as attributes. Never innerHTML. */
  function setAttrs(node, attrs) {
    if (!attrs) return node;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.setAttribute('class', value);
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key.startsWith('on') && typeof value === 'function') node.addEventListener(key.slice(2), value);
      else if (key === 'text') node.textContent = String(value);
      else if (value === true) node.setAttribute(key, '');
      else node.setAttribute(key, String(value));
    }
    return node;
  }

  function appendChildren(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** el('td', {class: 'x'}, 'text', otherNode): text children become text nodes. */
  function el(tag, attrs, ...children) {
    return appendChildren(setAttrs(document.createElement(tag), attrs), children);
  }

  function svg(tag, attrs, ...children) {
    return appendChildren(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function debounce(fn, ms) {
    let timer = null;
    const wrapped = (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
    wrapped.cancel = () => clearTimeout(timer);
    return wrapped;
  }

  /** Calls fn at most once per ms (the last call in a burst always runs). */
  function throttle(fn, ms) {
    let last = 0;
    let timer = null;
    const wrapped = () => {
      const wait = last + ms - Date.now();
      if (wait <= 0) {
        last = Date.now();
        fn();
      } else if (!timer) {
        timer = setTimeout(() => {
          timer = null;
          last = Date.now();
          fn();
        }, wait);
      }
    };
    wrapped.cancel = () => {
      clearTimeout(timer);
      timer = null;
    };
    return wrapped;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ------------------------------------------------------------------------ time & formatting
  const serverNow = () => Date.now() + app.clockOffset;

  function parseTime(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  const pad2 = (n) => String(n).padStart(2, '0');

  /** Local short time: HH:MM:SS today, else YYYY-MM-DD HH:MM. */
  function shortLocal(ms) {
    const d = new Date(ms);
    const now = new Date(serverNow());
    const clock = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    if (d.toDateString() === now.toDateString()) return clock;
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock.slice(0, 5)}`;
  }

  /** A <time> element with the local short time and the full ISO value as title. */
  function timeEl(iso) {
    const ms = parseTime(iso);
    if (ms === null) return el('span', { class: 'muted' }, '–');
    return el('time', { datetime: String(iso), title: String(iso) }, shortLocal(ms));
  }

  function spanText(seconds) {
    const s = Math.abs(seconds);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad2(Math.floor(s % 60))}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad2(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  /** "in 4.2 s" / "3 s ago"; a countdown that reached its time says "due" (the leader fires it
   *  and the page gets the next time from the fired event). */
  function relativeText(ms, countdown) {
    const diff = (ms - serverNow()) / 1000;
    if (countdown && diff <= 0) return 'due';
    if (Math.abs(diff) < 0.05) return 'now';
    return diff > 0 ? `in ${spanText(diff)}` : `${spanText(diff)} ago`;
  }

  /** A live relative time ("in 4.2 s" / "3 s ago"), refreshed by the ticker. */
  function relEl(iso, cls) {
    const ms = parseTime(iso);
    if (ms === null) return el('span', { class: 'muted' }, '–');
    return el('span', { class: `rel ${cls || ''}`.trim(), title: String(iso), dataset: { at: String(ms) } }, relativeText(ms, cls === 'countdown'));
  }

  function tick() {
    for (const node of document.querySelectorAll('.rel[data-at]')) {
      const text = relativeText(Number(node.dataset.at), node.classList.contains('countdown'));
      if (node.textContent !== text) node.textContent = text;
    }
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
    if (Math.abs(ms) < 1000) return `${Math.round(ms)} ms`;
    return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  }

  function fmtNum(n) {
    if (n === null || n === undefined) return '–';
    return typeof n === 'number' ? n.toLocaleString('en-US') : String(n);
  }

  /** Any JSON value as one line of text. */
  function jsonText(value) {
    if (value === null || value === undefined) return '';
    if (typeof value === 'string') return value;
    try {
      return JSON.stringify(value);
    } catch (e) {
      return String(value);
    }
  }

  function errorText(error) {
    if (error === null || error === undefined) return '';
    if (typeof error === 'object' && !Array.isArray(error) && (error.type || error.message)) {
      return [error.type, error.message].filter(Boolean).join(': ');
    }
    return jsonText(error);
  }

  /** ISO time as the CLI's short_time: 2026-11-23 10:00:00Z. */
  function shortIso(value) {
    if (!value) return '-';
    const text = String(value);
    const at = text.indexOf('T');
    if (at < 0) return text;
    const date = text.slice(0, at);
    const rest = text.slice(at + 1);
    const m = /^([^+\-Z]*)(.*)$/.exec(rest);
    const clock = m[1].split('.')[0];
    const offset = m[2];
    return `${date} ${clock}${offset === 'Z' || offset === '+00:00' ? 'Z' : offset}`;
  }

  function numberText(n) {
    const r = Math.round(n * 1e6) / 1e6;
    return String(r);
  }

  const INTERVAL_UNITS = [
    ['weeks', 'w', 604800],
    ['days', 'd', 86400],
    ['hours', 'h', 3600],
    ['minutes', 'm', 60],
    ['seconds', 's', 1],
  ];

  /** Port of describe_trigger in mesh/client.py. */
  function describeTrigger(t) {
    if (!t || typeof t !== 'object') return '?';
    if (t.type === 'interval') {
      let left = 0;
      for (const [unit, , size] of INTERVAL_UNITS) left += Number(t[unit] || 0) * size;
      left += Number(t.microseconds || 0) / 1e6;
      if (!Number.isFinite(left)) return 'interval ?';
      const parts = [];
      for (const [, short, size] of INTERVAL_UNITS) {
        const count = short === 's' ? left : Math.floor(left / size);
        if (count > 1e-9) {
          parts.push(`${numberText(count)}${short}`);
          left -= count * size;
        }
      }
      let text = parts.length ? `every ${parts.join(' ')}` : 'interval';
      if (t.end_time) text += ` until ${shortIso(t.end_time)}`;
      return text;
    }
    if (t.type === 'cron') {
      let text;
      if (t.expr) text = `cron ${t.expr}`;
      else {
        const fields = ['year', 'month', 'day', 'week', 'day_of_week', 'hour', 'minute', 'second'];
        text = `cron ${fields.filter((f) => f in t).map((f) => `${f}=${t[f]}`).join(' ')}`;
      }
      return t.timezone ? `${text} (${t.timezone})` : text;
    }
    if (t.type === 'date') return `once at ${shortIso(t.run_time)}`;
    if (t.type === 'calendarinterval') {
      const parts = ['years', 'months', 'weeks', 'days']
        .filter((u) => t[u])
        .map((u) => `${t[u]} ${t[u] === 1 ? u.slice(0, -1) : u}`);
      const clock = ['hour', 'minute', 'second'].map((f) => pad2(parseInt(t[f] || 0, 10))).join(':');
      const text = `every ${parts.join(' ') || '?'} at ${clock}`;
      return t.timezone ? `${text} (${t.timezone})` : text;
    }
    if (t.type === 'unsupported') return String(t.description || t.class || 'unsupported');
    return String(t.type || '?');
  }

  const BADGE_KIND = {
    success: 'ok', alive: 'ok', leader: 'accent', active: 'ok', idle: 'ok', running: 'info', queued: 'muted',
    error: 'bad', dead: 'bad', abandoned: 'bad', deserialization_failed: 'bad',
    missed_start_deadline: 'warn', suspect: 'warn', cancelled: 'muted', paused: 'warn',
    follower: 'muted', candidate: 'warn', precandidate: 'warn', replica: 'info', busy: 'info',
    draining: 'warn', gone: 'muted', elected: 'ok', stepped_down: 'warn', transferred: 'info', observed: 'muted',
  };

  function badge(text, kind) {
    const k = kind || BADGE_KIND[String(text)] || 'muted';
    return el('span', { class: `badge badge-${k}` }, text === null || text === undefined ? '–' : String(text));
  }

  function code(text) {
    return el('code', { class: 'mono' }, String(text === null || text === undefined ? '' : text));
  }

  function truncated(text, max) {
    const s = String(text || '');
    if (s.length <= max) return el('span', { title: s || null }, s);
    return el('span', { title: s, class: 'truncated' }, `${s.slice(0, max)}…`);
  }

  /** A <table> in a horizontal scroll wrapper. columns: [label, className?]. */
  function table(id, columns, caption) {
    const tbody = el('tbody');
    const t = el('table', { id, class: 'data' },
      caption ? el('caption', { class: 'visually-hidden' }, caption) : null,
      el('thead', null, el('tr', null, columns.map((c) => {
        const [label, cls] = Array.isArray(c) ? c : [c];
        return el('th', { scope: 'col', class: cls }, label);
      }))),
      tbody);
    return { wrap: el('div', { class: 'table-wrap' }, t), table: t, tbody };
  }

  function emptyRow(colspan, text) {
    return el('tr', { class: 'empty' }, el('td', { colspan }, text));
  }

  function section(title, ...children) {
    return el('section', { class: 'panel' }, el('h2', { class: 'panel-title' }, title), ...children);
  }

  function pageHeader(title, ...actions) {
    return el('div', { class: 'page-head' }, el('h1', null, title), el('div', { class: 'page-actions' }, ...actions));
  }

  // -------------------------------------------------------------------------------------- api
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    return app.token ? { Authorization: `Bearer ${app.token}` } : {};
  }

  /** fetch() for the JSON API: adds the token, turns {"error"} answers into ApiError. */
  async function api(path, options) {
    const opts = options || {};
    const headers = Object.assign({ Accept: 'application/json' }, authHeaders());
    const init = { method: opts.method || 'GET', headers, cache: 'no-store', signal: opts.signal };
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(opts.body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, `cannot reach the node (${e.message || 'network error'})`);
    }
    noteServerDate(res.headers.get('Date'));
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = text;
      }
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText || 'error'}`;
      if (data && typeof data === 'object' && typeof data.error === 'string') message = data.error;
      else if (typeof data === 'string' && data.trim()) message = data.trim().split('\n')[0].slice(0, 200);
      if (res.status === 401) showAuthMessage(message);
      throw new ApiError(res.status, message);
    }
    return data;
  }

  /** A coarse clock offset (1 s resolution) from an answer's Date header, used until
   * /api/overview's "now" gives a precise one; ignored when within 2 s of the local clock. */
  function noteServerDate(header) {
    if (app.preciseClock || !header) return;
    const server = Date.parse(header);
    if (Number.isNaN(server)) return;
    const offset = server + 500 - Date.now();
    app.clockOffset = Math.abs(offset) > 2000 ? offset : 0;
  }

  function query(params) {
    const parts = [];
    for (const [k, v] of Object.entries(params)) {
      if (v === undefined || v === null || v === '') continue;
      parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
    }
    return parts.length ? `?${parts.join('&')}` : '';
  }

  const schedulePath = (id) => `/api/schedules/${encodeURIComponent(id)}`;

  // ------------------------------------------------------------------------------------ toast
  function toast(message, kind) {
    const region = $('toast');
    const item = el('div', { class: `toast toast-${kind || 'ok'}` },
      el('span', { class: 'toast-text' }, String(message)),
      el('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', title: 'Dismiss', onclick: () => item.remove() }));
    region.appendChild(item);
    while (region.children.length > 5) region.firstChild.remove();
    setTimeout(() => item.remove(), kind === 'error' ? 10000 : 5000);
  }

  const toastError = (e) => {
    if (e && e.name === 'AbortError') return;
    toast(e && e.message ? e.message : String(e), 'error');
  };

  // ------------------------------------------------------------------------------------- auth
  function showAuthMessage(detail) {
    const box = $('auth-message');
    clear(box);
    box.appendChild(el('strong', null, 'A token is needed. '));
    box.appendChild(document.createTextNode(
      app.token
        ? 'The node refused the token in use: paste a valid API token in the field at the top and press "Use token".'
        : 'Paste an API token in the field at the top and press "Use token".'));
    if (detail) box.appendChild(el('span', { class: 'muted' }, ` (${detail})`));
    box.hidden = false;
  }

  function hideAuthMessage() {
    $('auth-message').hidden = true;
  }

  function loadToken() {
    try {
      app.token = sessionStorage.getItem(TOKEN_KEY) || null;
    } catch (e) {
      app.token = null;
    }
  }

  function setToken(token) {
    app.token = token || null;
    try {
      if (app.token) sessionStorage.setItem(TOKEN_KEY, app.token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: keep it in memory only */
    }
    $('token-input').value = '';
    $('token-input').placeholder = app.token ? 'token in use (hidden)' : 'API token';
    hideAuthMessage();
    refreshWhoami().then(() => {
      live.restart();
      renderRoute(true);
    });
  }

  function applyPermissions() {
    const who = app.who;
    const mayOperate = !!(who && who.may_operate);
    document.body.classList.toggle('may-operate', mayOperate);
    document.body.classList.toggle('may-admin', !!(who && who.may_admin));
    const whoText = $('token-who');
    if (!who) whoText.textContent = '';
    else if (who.role === null || who.role === undefined) whoText.textContent = 'open access';
    else whoText.textContent = `${who.name || 'token'} · ${who.role}`;
    if (who) {
      $('node-name').textContent = who.node_id || '?';
      setNodeRole(who.node_role);
    }
    updateReadOnlyBanner();
  }

  async function updateReadOnlyBanner() {
    const banner = $('readonly-banner');
    const who = app.who;
    if (!who || !who.read_only) {
      banner.hidden = true;
      return;
    }
    const role = who.node_role || 'node';
    const show = (zone) => {
      banner.textContent = `This is a read-only ${role}${zone ? ` (zone ${zone})` : ''}: writes go to an admin node.`;
      banner.hidden = false;
    };
    show(who.zone || null);
    if (who.zone === undefined) {
      try {
        const health = await api('/api/health');
        if (health && health.zone) show(health.zone);
      } catch (e) {
        /* the banner without a zone is fine */
      }
    }
  }

  /** The header from GET /api/health (needs no token): node, role, leader, term. */
  async function refreshHealth() {
    try {
      const h = await api('/api/health');
      if (h.node_id && !app.who) $('node-name').textContent = h.node_id;
      if (h.role && !app.who) setNodeRole(h.role);
      setLeader(h.leader_id === undefined ? null : h.leader_id, h.term);
    } catch (e) {
      /* the live stream or the pages will say what is wrong */
    }
  }

  function setNodeRole(role) {
    const node = $('node-role');
    node.textContent = role || '?';
    node.className = `badge badge-${BADGE_KIND[role] || 'muted'}`;
  }

  async function refreshWhoami() {
    try {
      app.who = await api('/api/whoami');
      hideAuthMessage();
    } catch (e) {
      if (e.status === 404) {
        // An older node without /api/whoami: assume no tokens file.
        app.who = { name: null, role: null, may_operate: true, may_admin: true, read_only: false };
      } else {
        app.who = null;
        if (e.status !== 401) toastError(e);
      }
    }
    applyPermissions();
  }

  /** Leader and term shown everywhere at once (header, overview cards, cluster page). An answer
   * older than what is shown (a lower term, e.g. a fetch that started before a leader event) is
   * ignored unless forced (hello: a new stream's truth). Always repaints. */
  function setLeader(leaderId, term, force) {
    const known = term !== undefined && term !== null;
    const stale = !force && known && app.term !== undefined && term < app.term;
    if (!stale) {
      if (leaderId !== undefined) app.leaderId = leaderId;
      if (known) app.term = term;
    }
    const leaderText = app.leaderId === undefined ? '…' : app.leaderId ? String(app.leaderId) : 'none (election)';
    for (const node of document.querySelectorAll('.js-leader')) node.textContent = leaderText;
    for (const node of document.querySelectorAll('.js-term')) {
      node.textContent = app.term === undefined ? '…' : String(app.term);
    }
  }

  // ------------------------------------------------------------------------------ live events
  /** GET /api/events read with fetch (EventSource cannot send Authorization), resumed with
   * Last-Event-ID, reconnected with backoff 1 s, 2 s, 4 s … 10 s. */
  const live = {
    lastId: null,
    controller: null,
    generation: 0,

    setStatus(state) {
      const node = $('live-status');
      const text = { live: 'live', reconnecting: 'reconnecting…', offline: 'offline' }[state];
      node.dataset.state = state;
      if (node.textContent !== text) node.textContent = text;
    },

    start() {
      this.generation += 1;
      this.loop(this.generation);
    },

    stop() {
      this.generation += 1;
      if (this.controller) this.controller.abort();
      this.controller = null;
    },

    restart() {
      this.stop();
      this.start();
    },

    async loop(generation) {
      let delay = 1000;
      while (generation === this.generation) {
        const controller = new AbortController();
        this.controller = controller;
        let gotFrame = false;
        try {
          const headers = Object.assign({ Accept: 'text/event-stream' }, authHeaders());
          if (this.lastId) headers['Last-Event-ID'] = this.lastId;
          const res = await fetch('/api/events', { headers, cache: 'no-store', signal: controller.signal });
          if (res.status === 401) {
            let message = 'the event stream needs a token';
            try {
              const body = await res.json();
              if (body && typeof body.error === 'string') message = body.error;
            } catch (e) { /* keep the default */ }
            showAuthMessage(message);
            this.setStatus('offline');
            return;
          }
          if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
          this.setStatus('live');
          await this.read(res.body, generation, () => { gotFrame = true; });
        } catch (e) {
          if (generation !== this.generation) return;
        }
        if (generation !== this.generation) return;
        if (gotFrame) delay = 1000;
        this.setStatus(navigator.onLine === false ? 'offline' : 'reconnecting');
        await sleep(delay);
        delay = Math.min(delay * 2, 10000);
      }
    },

    async read(body, generation, onFrame) {
      const reader = body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      let frame = { event: 'message', data: [], id: null };
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done || generation !== this.generation) return;
          buffer += decoder.decode(value, { stream: true });
          let match;
          while ((match = /\r\n|\r|\n/.exec(buffer)) !== null) {
            // A lone \r at the end of the buffer may be the first half of \r\n: wait for more.
            if (match[0] === '\r' && match.index === buffer.length - 1) break;
            const line = buffer.slice(0, match.index);
            buffer = buffer.slice(match.index + match[0].length);
            if (line === '') {
              if (frame.data.length || frame.event !== 'message') {
                onFrame();
                this.dispatch(frame.event, frame.data.join('\n'), frame.id);
              }
              frame = { event: 'message', data: [], id: null };
              continue;
            }
            if (line.startsWith(':')) continue; // comment / keep-alive
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            let val = colon < 0 ? '' : line.slice(colon + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'event') frame.event = val;
            else if (field === 'data') frame.data.push(val);
            else if (field === 'id' && !val.includes('\0')) {
              frame.id = val;
              this.lastId = val;
            }
            // retry: ignored, our own backoff applies
          }
        }
      } finally {
        reader.cancel().catch(() => { /* already closed or aborted */ });
      }
    },

    dispatch(kind, dataText, id) {
      let data = null;
      try {
        data = dataText ? JSON.parse(dataText) : null;
      } catch (e) {
        data = dataText;
      }
      logEvent(kind, data, id);
      try {
        handleEvent(kind, data);
      } catch (e) {
        console.error('event handler failed', kind, e);
      }
    },
  };

  function summarizeEvent(kind, d) {
    if (!d || typeof d !== 'object') return jsonText(d);
    switch (kind) {
      case 'hello':
        return `${d.node_id} (${d.role}), leader ${d.leader_id || 'none'}, term ${d.term}, ${d.schedules} schedules`;
      case 'reset':
        return d.reason || '';
      case 'resync':
        return `${d.reason || ''} at index ${d.index}`;
      case 'leader':
        return `leader ${d.leader_id || 'none (election)'}, term ${d.term}`;
      case 'role':
        return `${d.node_id} is ${d.role} (term ${d.term})`;
      case 'peer':
        return `${d.peer} ${d.state}${d.address ? ` (${d.address})` : ''}`;
      case 'voters':
        return `voters ${jsonText(d.voters)} at index ${d.index}`;
      case 'schedule':
        if (d.action === 'fired') return `${d.id} fired, next ${shortIso(d.next_fire_time)}`;
        return `${d.id} ${d.action}`;
      case 'job':
        return `${d.action} ${d.task} (${d.schedule_id || 'run now'}) attempt ${d.attempt}`;
      case 'execution':
        return `${d.task} (${d.schedule_id || 'run now'}): ${d.outcome}`;
      case 'handler':
        return d.action === 'gone' ? `${d.handler_id} gone` : `${d.handler_id} ${d.state || d.action}`;
      default:
        return jsonText(d).slice(0, 160);
    }
  }

  function logEvent(kind, data, id) {
    const entry = { at: Date.now(), kind, id, summary: summarizeEvent(kind, data) };
    app.eventLog.unshift(entry);
    if (app.eventLog.length > EVENT_LOG_SIZE) app.eventLog.length = EVENT_LOG_SIZE;
    if (app.page && app.page.onLog) app.page.onLog(entry);
  }

  function handleEvent(kind, data) {
    const d = data && typeof data === 'object' ? data : {};
    if (kind === 'hello') {
      setLeader(d.leader_id, d.term, true);
      if (d.node_id) $('node-name').textContent = d.node_id;
      if (d.role) setNodeRole(d.role);
    } else if (kind === 'leader') {
      setLeader(d.leader_id, d.term);
    } else if (kind === 'role') {
      if (!app.who || !d.node_id || d.node_id === app.who.node_id) setNodeRole(d.role);
      setLeader(undefined, d.term);
    }
    const page = app.page;
    if (!page) return;
    if (kind === 'hello' || kind === 'reset' || kind === 'resync') {
      // A new stream (or lost events): what is shown may have missed changes.
      if (kind !== 'reset') page.refresh();
      return;
    }
    if (page.onEvent) page.onEvent(kind, d);
  }

  // ------------------------------------------------------------------------------- charts
  /** A small bar chart of values (null = no data) with a <title> per bar. */
  function barChart(values, labels, options) {
    const opts = options || {};
    const w = 240;
    const h = 56;
    const n = Math.max(values.length, 1);
    const nums = values.filter((v) => v !== null && v !== undefined);
    const max = opts.max || Math.max(1, ...nums);
    const gap = 1;
    const bw = w / n;
    const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, class: 'chart', role: 'img', 'aria-label': opts.label, preserveAspectRatio: 'none' });
    chart.appendChild(svg('line', { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: 'chart-axis' }));
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      const bh = Math.max(v > 0 ? 1.5 : 0, (v / max) * (h - 4));
      chart.appendChild(svg('rect', {
        x: (i * bw + gap / 2).toFixed(2), y: (h - bh).toFixed(2), width: Math.max(bw - gap, 0.5).toFixed(2), height: bh.toFixed(2),
        class: opts.barClass ? opts.barClass(v, i) : 'chart-bar',
      }, svg('title', null, `${labels[i]}: ${opts.format ? opts.format(v) : v}`)));
    });
    return chart;
  }

  /** A small line chart (sparkline); null values break the line. */
  function lineChart(values, labels, options) {
    const opts = options || {};
    const w = 240;
    const h = 56;
    const n = Math.max(values.length - 1, 1);
    const nums = values.filter((v) => v !== null && v !== undefined);
    const max = opts.max || Math.max(1, ...nums);
    const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, class: 'chart', role: 'img', 'aria-label': opts.label, preserveAspectRatio: 'none' });
    chart.appendChild(svg('line', { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: 'chart-axis' }));
    const y = (v) => (h - 3 - (v / max) * (h - 6)).toFixed(2);
    const x = (i) => ((i / n) * w).toFixed(2);
    let path = '';
    let pen = false;
    values.forEach((v, i) => {
      if (v === null || v === undefined) {
        pen = false;
        return;
      }
      path += `${pen ? 'L' : 'M'}${x(i)} ${y(v)} `;
      pen = true;
    });
    if (path) chart.appendChild(svg('path', { d: path.trim(), class: 'chart-line' }));
    values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      chart.appendChild(svg('circle', { cx: x(i), cy: y(v), r: 1.6, class: 'chart-dot' },
        svg('title', null, `${labels[i]}: ${opts.format ? opts.format(v) : v}`)));
    });
    return chart;
  }

  function chartFigure(title, summary, chart) {
    return el('figure', { class: 'chart-fig' },
      el('figcaption', null, el('span', { class: 'chart-title' }, title), el('span', { class: 'chart-value' }, summary)),
      chart,
      el('div', { class: 'chart-scale' }, el('span', null, '−10 min'), el('span', null, 'now')));
  }

  // ================================================================================ pages
  /** Each page: {title, mount(main), unmount(), refresh(), onEvent(kind, data), onLog(entry)}. */

  function loadingNote(text) {
    return el('p', { class: 'muted loading' }, text || 'Loading…');
  }

  function errorNote(e) {
    return el('p', { class: 'error-note', role: 'alert' }, e && e.message ? e.message : String(e));
  }

  // ---------------------------------------------------------------------------- overview
  function overviewPage() {
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

  // --------------------------------------------------------------------------- schedules
  const dialogs = {
    pause: { resolve: null },
    delete: { resolve: null },
  };

  /** Opens the pause dialog; resolves with the note ('' for none) or null when cancelled. */
  function askPauseNote(text) {
    const dialog = $('pause-dialog');
    $('pause-text').textContent = text;
    $('pause-note').value = '';
    return new Promise((resolve) => {
      dialogs.pause.resolve = resolve;
      dialog.showModal();
      $('pause-note').focus();
    });
  }

  function askDelete(text) {
    const dialog = $('delete-dialog');
    $('delete-text').textContent = text;
    return new Promise((resolve) => {
      dialogs.delete.resolve = resolve;
      dialog.showModal();
      $('delete-confirm').focus();
    });
  }

  function setupDialogs() {
    const finish = (name, dialog, value) => {
      const resolve = dialogs[name].resolve;
      dialogs[name].resolve = null;
      if (dialog.open) dialog.close();
      if (resolve) resolve(value);
    };
    const pause = $('pause-dialog');
    $('pause-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      finish('pause', pause, $('pause-note').value.trim());
    });
    pause.addEventListener('close', () => finish('pause', pause, null));
    const del = $('delete-dialog');
    $('delete-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      finish('delete', del, true);
    });
    del.addEventListener('close', () => finish('delete', del, false));
    for (const button of document.querySelectorAll('.js-dialog-cancel')) {
      button.addEventListener('click', () => button.closest('dialog').close());
    }
    // A click on the backdrop (outside the dialog's box) closes it too.
    for (const dialog of document.querySelectorAll('dialog')) {
      dialog.addEventListener('click', (ev) => {
        if (ev.target === dialog) dialog.close();
      });
    }
    scheduleForm.setup();
  }

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
      const note = s.metadata && typeof s.metadata.pause_note === 'string' ? s.metadata.pause_note : null;
      if (note) td.appendChild(el('span', { class: 'pause-note', title: note }, ` ${note.length > 60 ? `${note.slice(0, 60)}…` : note}`));
    } else {
      td.appendChild(badge('active', 'ok'));
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

  function schedulesPage() {
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
        let data;
        try {
          data = await api(`${schedulePath(s.id)}/trigger`, { method: 'POST', body: {} });
        } catch (e) {
          if (e.status !== 404 && e.status !== 405) throw e;
          data = await api('/api/jobs', { method: 'POST', body: { task: s.task, args: s.args || [], kwargs: s.kwargs || {} } });
        }
        toast(data && data.job_id ? `started job ${data.job_id}` : `triggered ${s.id}`);
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

  // ------------------------------------------------------------------------ schedule form
  const FORM_FIELDS = ['id', 'task', 'trigger', 'args', 'kwargs', 'coalesce', 'misfire_grace_time', 'max_jitter', 'paused', 'metadata'];

  const scheduleForm = {
    editing: null, // the schedule being edited, or null when creating
    onSaved: null,
    mode: 'form',

    setup() {
      const form = $('schedule-form');
      form.addEventListener('submit', (ev) => {
        ev.preventDefault();
        this.submit();
      });
      $('sf-trigger-type').addEventListener('change', () => this.showTriggerPart());
      $('schedule-tab-form').addEventListener('click', () => this.setMode('form'));
      $('schedule-tab-json').addEventListener('click', () => this.setMode('json'));
      for (const tab of [$('schedule-tab-form'), $('schedule-tab-json')]) {
        tab.addEventListener('keydown', (ev) => {
          if (ev.key === 'ArrowLeft' || ev.key === 'ArrowRight') {
            const other = tab.id === 'schedule-tab-form' ? 'json' : 'form';
            this.setMode(other);
            $(`schedule-tab-${other}`).focus();
          }
        });
      }
    },

    open(schedule, onSaved) {
      this.editing = schedule;
      this.onSaved = onSaved;
      this.clearErrors();
      const form = $('schedule-form');
      form.reset();
      $('schedule-title').textContent = schedule ? `Edit schedule ${schedule.id}` : 'New schedule';
      $('schedule-submit').textContent = schedule ? 'Save' : 'Create';
      const idInput = $('sf-id');
      idInput.readOnly = !!schedule;
      const formOk = this.fill(schedule || { args: [], kwargs: {}, metadata: {}, coalesce: 'latest', trigger: { type: 'interval' } });
      $('schedule-json').value = JSON.stringify(this.bodyOf(schedule) || { task: '', trigger: { type: 'interval', seconds: 60 } }, null, 2);
      this.setMode(formOk ? 'form' : 'json');
      $('schedule-dialog').showModal();
      (schedule ? $('sf-task') : idInput).focus();
    },

    /** The writable part of a schedule (what POST/PUT take). */
    bodyOf(s) {
      if (!s) return null;
      const body = {};
      for (const k of FORM_FIELDS) if (k in s) body[k] = s[k];
      return body;
    },

    /** Fills the form fields; false when the trigger cannot be shown in the form. */
    fill(s) {
      $('sf-id').value = s.id || '';
      $('sf-task').value = s.task || '';
      $('sf-args').value = JSON.stringify(s.args || []);
      $('sf-kwargs').value = JSON.stringify(s.kwargs || {});
      $('sf-metadata').value = JSON.stringify(s.metadata || {});
      $('sf-coalesce').value = s.coalesce || 'latest';
      $('sf-misfire').value = s.misfire_grace_time === null || s.misfire_grace_time === undefined ? '' : String(s.misfire_grace_time);
      $('sf-jitter').value = s.max_jitter === null || s.max_jitter === undefined ? '' : String(s.max_jitter);
      $('sf-paused').checked = !!s.paused;
      const t = s.trigger || { type: 'interval' };
      for (const id of ['sf-int-days', 'sf-int-hours', 'sf-int-minutes', 'sf-int-seconds', 'sf-cron-expr', 'sf-cron-tz', 'sf-date-run']) $(id).value = '';
      let ok = true;
      if (t.type === 'interval') {
        $('sf-trigger-type').value = 'interval';
        const seconds = Number(t.seconds || 0) + Number(t.microseconds || 0) / 1e6;
        const days = Number(t.days || 0) + 7 * Number(t.weeks || 0);
        if (days) $('sf-int-days').value = String(days);
        if (t.hours) $('sf-int-hours').value = String(t.hours);
        if (t.minutes) $('sf-int-minutes').value = String(t.minutes);
        if (seconds) $('sf-int-seconds').value = String(seconds);
      } else if (t.type === 'cron') {
        $('sf-trigger-type').value = 'cron';
        $('sf-cron-expr').value = t.expr || '';
        $('sf-cron-tz').value = t.timezone || '';
        ok = !!t.expr || !this.editing;
      } else if (t.type === 'date') {
        $('sf-trigger-type').value = 'date';
        const ms = parseTime(t.run_time);
        if (ms !== null) $('sf-date-run').value = toLocalInput(ms);
      } else {
        ok = false;
      }
      this.showTriggerPart();
      return ok;
    },

    showTriggerPart() {
      const type = $('sf-trigger-type').value;
      for (const part of document.querySelectorAll('.trigger-part')) part.hidden = part.dataset.trigger !== type;
    },

    setMode(mode) {
      if (mode === this.mode && $('schedule-json-panel').hidden === (mode === 'form')) return;
      this.clearErrors();
      if (mode === 'json' && this.mode === 'form') {
        try {
          $('schedule-json').value = JSON.stringify(this.readForm(), null, 2);
        } catch (e) {
          /* keep the textarea as it was */
        }
      } else if (mode === 'form' && this.mode === 'json') {
        try {
          const parsed = JSON.parse($('schedule-json').value);
          if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) {
            if (!this.fill(Object.assign({}, parsed, this.editing ? { id: this.editing.id } : {}))) {
              this.showError(null, 'This trigger cannot be edited in the form: use Paste JSON.');
              mode = 'json';
            }
          }
        } catch (e) {
          /* invalid JSON: the form keeps its values */
        }
      }
      this.mode = mode;
      $('schedule-fields').hidden = mode !== 'form';
      $('schedule-json-panel').hidden = mode !== 'json';
      $('schedule-tab-form').setAttribute('aria-selected', String(mode === 'form'));
      $('schedule-tab-json').setAttribute('aria-selected', String(mode === 'json'));
      $('schedule-tab-form').tabIndex = mode === 'form' ? 0 : -1;
      $('schedule-tab-json').tabIndex = mode === 'json' ? 0 : -1;
    },

    /** The body from the form fields; throws {field, message} for what cannot be read. */
    readForm() {
      const fail = (field, message) => {
        const err = new Error(message);
        err.field = field;
        throw err;
      };
      const json = (field, inputId, kind) => {
        const text = $(inputId).value.trim();
        if (!text) return kind === 'array' ? [] : {};
        let value;
        try {
          value = JSON.parse(text);
        } catch (e) {
          fail(field, `${field}: not valid JSON (${e.message})`);
        }
        if (kind === 'array' && !Array.isArray(value)) fail(field, `${field}: must be a JSON array`);
        if (kind === 'object' && (value === null || typeof value !== 'object' || Array.isArray(value))) fail(field, `${field}: must be a JSON object`);
        return value;
      };
      const seconds = (field, inputId) => {
        const text = $(inputId).value.trim();
        if (!text) return null;
        const n = Number(text);
        if (!Number.isFinite(n)) fail(field, `${field}: must be a number of seconds`);
        return n;
      };
      const body = {};
      const id = $('sf-id').value.trim();
      if (id) body.id = id;
      body.task = $('sf-task').value.trim();
      body.trigger = this.readTrigger(fail);
      body.args = json('args', 'sf-args', 'array');
      body.kwargs = json('kwargs', 'sf-kwargs', 'object');
      body.coalesce = $('sf-coalesce').value;
      body.misfire_grace_time = seconds('misfire_grace_time', 'sf-misfire');
      body.max_jitter = seconds('max_jitter', 'sf-jitter');
      body.paused = $('sf-paused').checked;
      body.metadata = json('metadata', 'sf-metadata', 'object');
      return body;
    },

    readTrigger(fail) {
      const type = $('sf-trigger-type').value;
      const old = this.editing && this.editing.trigger && this.editing.trigger.type === type ? this.editing.trigger : null;
      if (type === 'interval') {
        const t = { type: 'interval' };
        const units = [['days', 'sf-int-days'], ['hours', 'sf-int-hours'], ['minutes', 'sf-int-minutes'], ['seconds', 'sf-int-seconds']];
        for (const [unit, inputId] of units) {
          const text = $(inputId).value.trim();
          if (!text) continue;
          const n = Number(text);
          if (!Number.isFinite(n)) fail('trigger', `trigger.${unit}: must be a number`);
          if (n) t[unit] = n;
        }
        if (old) {
          // Editing keeps the first fire time and the end, so the fire times stay as they were.
          if (old.start_time) t.start_time = old.start_time;
          if (old.end_time) t.end_time = old.end_time;
        }
        return t;
      }
      if (type === 'cron') {
        const t = { type: 'cron', expr: $('sf-cron-expr').value.trim() };
        const tz = $('sf-cron-tz').value.trim();
        if (tz) t.timezone = tz;
        if (old && old.end_time) t.end_time = old.end_time;
        return t;
      }
      const value = $('sf-date-run').value;
      if (!value) fail('trigger', 'trigger.run_time: give the date and time to run at');
      const ms = new Date(value).getTime();
      if (Number.isNaN(ms)) fail('trigger', 'trigger.run_time: not a valid date and time');
      return { type: 'date', run_time: new Date(ms).toISOString() };
    },

    clearErrors() {
      for (const node of document.querySelectorAll('#schedule-form .field-error')) node.textContent = '';
      $('schedule-form-error').textContent = '';
      for (const node of document.querySelectorAll('#schedule-form [aria-invalid]')) node.removeAttribute('aria-invalid');
    },

    /** Shows a message next to the field its prefix names ("trigger.seconds: …"), else on top. */
    showError(field, message) {
      let name = field;
      if (!name) {
        const m = /^([A-Za-z_]+)[.:[]/.exec(message || '');
        name = m ? m[1] : null;
      }
      const slot = this.mode === 'form' && FORM_FIELDS.includes(name)
        ? document.querySelector(`#schedule-form .field-error[data-field="${name}"]`)
        : null;
      if (slot) {
        slot.textContent = message;
        const input = name === 'trigger'
          ? document.querySelector('#schedule-form .trigger-part:not([hidden]) input')
          : slot.parentElement.querySelector('input, select, textarea');
        if (input) {
          input.setAttribute('aria-invalid', 'true');
          if (!input.readOnly) input.focus();
        }
      } else {
        $('schedule-form-error').textContent = message;
      }
    },

    async submit() {
      this.clearErrors();
      let body;
      try {
        if (this.mode === 'json') {
          try {
            body = JSON.parse($('schedule-json').value);
          } catch (e) {
            throw new Error(`not valid JSON: ${e.message}`);
          }
          if (!body || typeof body !== 'object' || Array.isArray(body)) throw new Error('the schedule must be a JSON object');
        } else {
          body = this.readForm();
        }
      } catch (e) {
        this.showError(e.field || null, e.message);
        return;
      }
      const editing = this.editing;
      const submit = $('schedule-submit');
      submit.disabled = true;
      try {
        let saved;
        if (editing) {
          if (!('id' in body)) body.id = editing.id;
          saved = await api(schedulePath(editing.id), { method: 'PUT', body });
        } else {
          saved = await api('/api/schedules', { method: 'POST', body });
        }
        $('schedule-dialog').close();
        if (this.onSaved) this.onSaved(saved, !editing);
      } catch (e) {
        this.showError(null, e.message);
      } finally {
        submit.disabled = false;
      }
    },
  };

  function toLocalInput(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}T${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  // -------------------------------------------------------------------------- executions
  const SINCE_CHOICES = [['all', 'all time', 0], ['300', 'last 5 min', 300], ['3600', 'last 1 h', 3600], ['86400', 'last 24 h', 86400]];

  function executionsPage() {
    const page = { title: 'Executions' };
    const filter = { schedule: routeParams().get('schedule') || '', outcome: '', since: 0 };
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

  // ---------------------------------------------------------------------------- handlers
  function handlersPage() {
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

  // ----------------------------------------------------------------------------- cluster
  function clusterPage() {
    const page = { title: 'Cluster' };
    let info = null;
    let membersBox = null;
    let logBody = null;
    let loadSeq = 0;
    const refreshSoon = debounce(() => page.refresh(), 500);

    page.mount = (main) => {
      info = el('div', { class: 'cards' }, loadingNote());
      membersBox = el('div', null);
      const t = table('event-log-table', ['Time', 'Event', 'Summary'], 'Event log');
      logBody = t.tbody;
      logBody.id = 'event-log';
      for (const entry of app.eventLog) logBody.appendChild(logRow(entry));
      main.appendChild(el('div', null,
        pageHeader('Cluster'),
        info,
        section('Members', membersBox),
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

  // ------------------------------------------------------------------------------ router
  const ROUTES = {
    overview: overviewPage,
    schedules: schedulesPage,
    executions: executionsPage,
    handlers: handlersPage,
    cluster: clusterPage,
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

  function renderRoute(force) {
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
    const page = ROUTES[route]();
    app.page = page;
    document.title = `${page.title} · ScheduleZero Mesh`;
    page.mount(main);
    setLeader(undefined, undefined);
  }

  // ------------------------------------------------------------------------------- start
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
      setToken(value);
      toast('token in use for this tab');
    });
    $('token-clear').addEventListener('click', () => {
      setToken(null);
      toast('token forgotten');
    });
    setupDialogs();
    window.addEventListener('hashchange', () => {
      renderRoute(false);
      $('main').focus({ preventScroll: true });
    });
    window.addEventListener('online', () => live.restart());
    setInterval(tick, 250);
    refreshHealth();
    refreshWhoami();
    renderRoute(true);
    live.start();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
