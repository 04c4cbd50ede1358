/* Messages to the user: toasts (bottom corner) and the "a token is needed" box. */
import { app } from './state.js';
import { $, clear, el } from './dom.js';

export function toast(message, kind) {
  const region = $('toast');
  const item = el('div', { class: `toast toast-${kind || 'ok'}` },
    el('span', { class: 'toast-text' }, String(message)),
    el('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', title: 'Dismiss', onclick: () => item.remove() }));
  region.appendChild(item);
  while (region.children.length > 5) region.firstChild.remove();
  setTimeout(() => item.remove(), kind === 'error' ? 10000 : 5000);
}

export const toastError = (e) => {
  if (e && e.name === 'AbortError') return;
  toast(e && e.message ? e.message : String(e), 'error');
};

export function showAuthMessage(detail) {
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

export function hideAuthMessage() {
  $('auth-message').hidden = true;
}
