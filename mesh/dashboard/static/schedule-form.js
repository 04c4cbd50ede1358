/* The create / edit schedule dialog: a form or pasted JSON, sent as POST/PUT /api/schedules, with
 * the API's validation error shown next to the field it names.
 */
import { $ } from './dom.js';
import { pad2, parseTime } from './format.js';
import { api, schedulePath } from './api.js';

// The added fields (docs/scheduling.md, "Controls"): one JSON object in the form.
const CONTROL_FIELDS = ['overlap', 'retry', 'timeout', 'target', 'history', 'remaining_runs', 'notify', 'note'];
const FORM_FIELDS = ['id', 'task', 'trigger', 'args', 'kwargs', 'coalesce', 'misfire_grace_time', 'max_jitter', 'paused', 'metadata', ...CONTROL_FIELDS];

/** The schedule's controls that differ from their defaults (an empty object when none). */
function controlsOf(s) {
  const out = {};
  for (const k of CONTROL_FIELDS) {
    const v = s[k];
    if (v === null || v === undefined || v === '' || (k === 'overlap' && v === 'allow_all')) continue;
    out[k] = v;
  }
  return out;
}

export const scheduleForm = {
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
    $('sf-controls').value = JSON.stringify(controlsOf(s));
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
    const controls = json('controls', 'sf-controls', 'object');
    for (const k of Object.keys(controls)) {
      if (!CONTROL_FIELDS.includes(k)) fail('controls', `controls: unknown field ${JSON.stringify(k)} (allowed: ${CONTROL_FIELDS.join(', ')})`);
    }
    Object.assign(body, controls);
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
