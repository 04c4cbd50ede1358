/* The state shared by all modules (the token, who we are, the clock offset, the mounted page, the
 * event log, leader and term) and the dashboard's constants.
 */

export const TOKEN_KEY = 'schedulezero.token';
export const OUTCOMES = ['success', 'error', 'missed_start_deadline', 'deserialization_failed', 'cancelled', 'abandoned'];
export const EVENT_LOG_SIZE = 100;

export const app = {
  token: null,
  who: null, // GET /api/whoami answer
  clockOffset: 0, // server time - local time, ms
  page: null, // the mounted page object
  route: null,
  hash: null, // location.hash the page was mounted for
  mountedAt: -1, // performance.now() when the page was mounted (and fetched its data)
  eventLog: [], // newest first, ≤ EVENT_LOG_SIZE
  leaderId: undefined,
  term: undefined,
};
