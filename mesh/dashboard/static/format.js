/* Time and formatting: server clock, short local times, live relative times (the ticker),
 * durations, numbers, JSON and error text, and a trigger in words (describeTrigger).
 */
import { app } from './state.js';
import { el } from './dom.js';

export const serverNow = () => Date.now() + app.clockOffset;

export function parseTime(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

export const pad2 = (n) => String(n).padStart(2, '0');

/** Local short time: HH:MM:SS today, else YYYY-MM-DD HH:MM. */
export function shortLocal(ms) {
  const d = new Date(ms);
  const now = new Date(serverNow());
  const clock = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  if (d.toDateString() === now.toDateString()) return clock;
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock.slice(0, 5)}`;
}

/** A <time> element with the local short time and the full ISO value as title. */
export function timeEl(iso) {
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
export function relEl(iso, cls) {
  const ms = parseTime(iso);
  if (ms === null) return el('span', { class: 'muted' }, '–');
  return el('span', { class: `rel ${cls || ''}`.trim(), title: String(iso), dataset: { at: String(ms) } }, relativeText(ms, cls === 'countdown'));
}

export function tick() {
  for (const node of document.querySelectorAll('.rel[data-at]')) {
    const text = relativeText(Number(node.dataset.at), node.classList.contains('countdown'));
    if (node.textContent !== text) node.textContent = text;
  }
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '–';
  if (Math.abs(ms) < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function fmtNum(n) {
  if (n === null || n === undefined) return '–';
  return typeof n === 'number' ? n.toLocaleString('en-US') : String(n);
}

/** Any JSON value as one line of text. */
export function jsonText(value) {
  if (value === null || value === undefined) return '';
  if (typeof value === 'string') return value;
  try {
    return JSON.stringify(value);
  } catch (e) {
    return String(value);
  }
}

export function errorText(error) {
  if (error === null || error === undefined) return '';
  if (typeof error === 'object' && !Array.isArray(error) && (error.type || error.message)) {
    return [error.type, error.message].filter(Boolean).join(': ');
  }
  return jsonText(error);
}

/** ISO time as the CLI's short_time: 2026-11-23 10:00:00Z. */
export function shortIso(value) {
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
export function describeTrigger(t) {
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
