/* The header's node role badge, and the leader and term shown everywhere at once. */
import { app } from './state.js';
import { $, BADGE_KIND } from './dom.js';

export function setNodeRole(role) {
  const node = $('node-role');
  node.textContent = role || '?';
  node.className = `badge badge-${BADGE_KIND[role] || 'muted'}`;
}

/** Leader and term shown everywhere at once (header, overview cards, cluster page). An answer
 * older than what is shown (a lower term, e.g. a fetch that started before a leader event) is
 * ignored unless forced (hello: a new stream's truth). Always repaints. */
export function setLeader(leaderId, term, force) {
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
