/* Live events: GET /api/events (Server-Sent Events read over fetch), the event log, and their
 * dispatch to the header and the mounted page.
 */
import { app, EVENT_LOG_SIZE } from './state.js';
import { $, sleep } from './dom.js';
import { jsonText, shortIso } from './format.js';
import { authHeaders } from './api.js';
import { showAuthMessage } from './toast.js';
import { setLeader, setNodeRole } from './header.js';

/** Reads a text/event-stream body until it ends or wanted() turns false: onFrame({event, data,
 * id}) per frame (data: its data lines joined; id: null when the frame has none). Shared by the
 * live events and the scenario runs' live view (EventSource cannot send Authorization). */
export async function readEventStream(body, wanted, onFrame) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let frame = { event: 'message', data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || !wanted()) return;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r\n|\r|\n/.exec(buffer)) !== null) {
        // A lone \r at the end of the buffer may be the first half of \r\n: wait for more.
        if (match[0] === '\r' && match.index === buffer.length - 1) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === '') {
          if (frame.data.length || frame.event !== 'message') {
            onFrame({ event: frame.event, data: frame.data.join('\n'), id: frame.id });
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
        else if (field === 'id' && !val.includes('\0')) frame.id = val;
        // retry: ignored, the caller's own backoff applies
      }
    }
  } finally {
    reader.cancel().catch(() => { /* already closed or aborted */ });
  }
}

/** GET /api/events read with fetch (EventSource cannot send Authorization), resumed with
 * Last-Event-ID, reconnected with backoff 1 s, 2 s, 4 s … 10 s. */
export const live = {
  lastId: null,
  controller: null,
  generation: 0,
  // performance.now() when the current stream's answer arrived. The node registers a stream
  // before it answers, so data fetched after this moment misses no event of the stream.
  connectedAt: null,
  waiting: [], // resolvers of whenConnected()

  /** Resolves once a stream is answered, or after ``timeoutMs`` (a refused or slow stream
   *  must not keep the page empty). */
  whenConnected(timeoutMs) {
    if (this.connectedAt !== null) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      setTimeout(resolve, timeoutMs);
    });
  },

  connected() {
    this.connectedAt = performance.now();
    for (const resolve of this.waiting.splice(0)) resolve();
  },

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
    this.connectedAt = null;
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
        this.connected();
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
    await readEventStream(body, () => generation === this.generation, (frame) => {
      onFrame();
      if (frame.id !== null) this.lastId = frame.id;
      this.dispatch(frame.event, frame.data, frame.id);
    });
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
    // A new stream (or lost events): what is shown may have missed changes, unless the page
    // fetched its data after this stream was registered (then nothing fell in between).
    const fresh = kind === 'hello' && live.connectedAt !== null && app.mountedAt >= live.connectedAt;
    if (kind !== 'reset' && !fresh) page.refresh();
    return;
  }
  if (page.onEvent) page.onEvent(kind, d);
}
