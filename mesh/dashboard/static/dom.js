/* DOM helpers: el() / svg() build elements, clear(), $(), badges, tables, sections, page headers,
 * loading and error notes; and debounce / throttle / sleep.
 *
 * Security: every value that comes from the API is user data. It is only ever put into the page
 * with textContent / createTextNode / attribute setters (see el()), never as HTML, and into URLs
 * with encodeURIComponent. The page runs under a strict CSP (no inline code or styles). Every
 * module builds its elements with these helpers: none uses innerHTML.
 */

const SVG_NS = 'http://www.w3.org/2000/svg';

// ------------------------------------------------------------------------------ DOM helpers
export const $ = (id) => document.getElementById(id);

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
export function el(tag, attrs, ...children) {
  return appendChildren(setAttrs(document.createElement(tag), attrs), children);
}

export function svg(tag, attrs, ...children) {
  return appendChildren(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** Calls fn at most once per ms (the last call in a burst always runs). */
export function throttle(fn, ms) {
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

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const BADGE_KIND = {
  success: 'ok', alive: 'ok', leader: 'accent', active: 'ok', idle: 'ok', running: 'info', queued: 'muted',
  error: 'bad', dead: 'bad', abandoned: 'bad', deserialization_failed: 'bad',
  missed_start_deadline: 'warn', suspect: 'warn', cancelled: 'muted', paused: 'warn',
  follower: 'muted', candidate: 'warn', precandidate: 'warn', replica: 'info', busy: 'info',
  draining: 'warn', gone: 'muted', elected: 'ok', stepped_down: 'warn', transferred: 'info', observed: 'muted',
};

export function badge(text, kind) {
  const k = kind || BADGE_KIND[String(text)] || 'muted';
  return el('span', { class: `badge badge-${k}` }, text === null || text === undefined ? '–' : String(text));
}

export function code(text) {
  return el('code', { class: 'mono' }, String(text === null || text === undefined ? '' : text));
}

export function truncated(text, max) {
  const s = String(text || '');
  if (s.length <= max) return el('span', { title: s || null }, s);
  return el('span', { title: s, class: 'truncated' }, `${s.slice(0, max)}…`);
}

/** A <table> in a horizontal scroll wrapper. columns: [label, className?]. */
export function table(id, columns, caption) {
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

export function emptyRow(colspan, text) {
  return el('tr', { class: 'empty' }, el('td', { colspan }, text));
}

export function section(title, ...children) {
  return el('section', { class: 'panel' }, el('h2', { class: 'panel-title' }, title), ...children);
}

export function pageHeader(title, ...actions) {
  return el('div', { class: 'page-head' }, el('h1', null, title), el('div', { class: 'page-actions' }, ...actions));
}

export function loadingNote(text) {
  return el('p', { class: 'muted loading' }, text || 'Loading…');
}

export function errorNote(e) {
  return el('p', { class: 'error-note', role: 'alert' }, e && e.message ? e.message : String(e));
}
