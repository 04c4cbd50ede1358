/* fetch() for the JSON API: the token header, {"error"} answers as ApiError, the server clock
 * from the Date header, query strings.
 */
import { app } from './state.js';
import { showAuthMessage } from './toast.js';

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function authHeaders() {
  return app.token ? { Authorization: `Bearer ${app.token}` } : {};
}

/** fetch() for the JSON API: adds the token, turns {"error"} answers into ApiError.
 * options.body is sent as JSON; options.text as it is, with options.contentType (a YAML file). */
export async function api(path, options) {
  const opts = options || {};
  const headers = Object.assign({ Accept: 'application/json' }, authHeaders());
  const init = { method: opts.method || 'GET', headers, cache: 'no-store', signal: opts.signal };
  if (opts.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  } else if (opts.text !== undefined) {
    headers['Content-Type'] = opts.contentType || 'text/plain';
    init.body = opts.text;
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

/** Saves what path answers as a file named filename. A link cannot send the token header, so
 * the answer is fetched with it and handed to the browser as a blob. */
export async function download(path, filename) {
  let res;
  try {
    res = await fetch(path, { headers: authHeaders(), cache: 'no-store' });
  } catch (e) {
    throw new ApiError(0, `cannot reach the node (${e.message || 'network error'})`);
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText || 'error'}`;
    try {
      const body = await res.json();
      if (body && typeof body.error === 'string') message = body.error;
    } catch (e) { /* keep the status line */ }
    throw new ApiError(res.status, message);
  }
  const url = URL.createObjectURL(await res.blob());
  const link = document.createElement('a');
  link.href = url;
  link.download = filename;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
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

export function query(params) {
  const parts = [];
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === '') continue;
    parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

export const schedulePath = (id) => `/api/schedules/${encodeURIComponent(id)}`;
