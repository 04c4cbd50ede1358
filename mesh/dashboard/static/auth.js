/* The API token (kept in sessionStorage for this tab), GET /api/whoami and /api/health: who we
 * are, what we may do (body classes may-operate / may-admin), the read-only banner.
 */
import { app, TOKEN_KEY } from './state.js';
import { $ } from './dom.js';
import { api } from './api.js';
import { hideAuthMessage, toastError } from './toast.js';
import { setLeader, setNodeRole } from './header.js';

export function loadToken() {
  try {
    app.token = sessionStorage.getItem(TOKEN_KEY) || null;
  } catch (e) {
    app.token = null;
  }
}

/** Uses token (null: none) for this tab; once whoami has answered, calls afterWhoami. */
export function setToken(token, afterWhoami) {
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
  refreshWhoami().then(() => afterWhoami());
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
export async function refreshHealth() {
  try {
    const h = await api('/api/health');
    if (h.node_id && !app.who) $('node-name').textContent = h.node_id;
    if (h.role && !app.who) setNodeRole(h.role);
    setLeader(h.leader_id === undefined ? null : h.leader_id, h.term);
  } catch (e) {
    /* the live stream or the pages will say what is wrong */
  }
}

export async function refreshWhoami() {
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
