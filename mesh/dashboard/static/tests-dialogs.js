/* The tests page's dialogs: load a scenario (YAML text or a file), run one with its parameters,
 * schedule one. Each sends its request itself and stays open with the node's error message (as
 * text) until the request succeeds, so a mistake can be fixed in place.
 */
import { el, clear } from './dom.js';
import { api } from './api.js';

const MAX_SOURCE_BYTES = 64 * 1024; // mesh/scenarios/model.py: the node refuses larger texts

/** A <dialog> with a form, an error box, a place for fields and Cancel / submit buttons, added
 * to the document once and reused. */
function formDialog(id, submitLabel, wide) {
  const d = { pending: null, send: null };
  d.heading = el('h2', { class: 'dialog-title', id: `${id}-title` });
  d.error = el('div', { class: 'form-error', role: 'alert', id: `${id}-error` });
  d.fields = el('div', { class: 'dialog-fields' });
  d.submit = el('button', { type: 'submit', id: `${id}-submit`, class: 'btn btn-primary' }, submitLabel);
  d.form = el('form', { class: 'dialog-body', id: `${id}-form`, novalidate: true },
    d.heading, d.error, d.fields,
    el('div', { class: 'dialog-actions' },
      el('button', { type: 'button', class: 'btn btn-ghost', onclick: () => d.dialog.close() }, 'Cancel'),
      d.submit));
  d.dialog = el('dialog', { id, class: `dialog${wide ? ' dialog-wide' : ''}`, 'aria-labelledby': `${id}-title` }, d.form);
  d.dialog.addEventListener('click', (ev) => {
    if (ev.target === d.dialog) d.dialog.close();
  });
  d.dialog.addEventListener('close', () => settle(d, null));
  d.form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    d.error.textContent = '';
    d.submit.disabled = true;
    try {
      const result = await d.send();
      settle(d, result);
      d.dialog.close();
    } catch (e) {
      d.error.textContent = e && e.message ? e.message : String(e);
    } finally {
      d.submit.disabled = false;
    }
  });
  document.body.appendChild(d.dialog);
  return d;
}

function settle(d, value) {
  const resolve = d.pending;
  d.pending = null;
  if (resolve) resolve(value);
}

/** Shows d with title and fields; send() makes the request (throws to keep the dialog open).
 * Resolves with send()'s answer, or null when cancelled. */
function open(d, title, fields, send) {
  d.heading.textContent = title;
  d.error.textContent = '';
  clear(d.fields).append(...fields);
  d.send = send;
  return new Promise((resolve) => {
    d.pending = resolve;
    d.dialog.showModal();
    const first = d.fields.querySelector('input, textarea, select');
    if (first) first.focus();
  });
}

const made = {};
const dialog = (id, submitLabel, wide) => {
  made[id] = made[id] || formDialog(id, submitLabel, wide);
  return made[id];
};

function field(label, input, hint) {
  return el('div', { class: 'field' }, el('label', { for: input.id }, label), input,
    hint ? el('span', { class: 'muted small' }, hint) : null);
}

// --------------------------------------------------------------------------- load

/** POST /api/tests/load with the YAML typed or read from a file; resolves {name, version}. */
export function askLoadScenario() {
  const d = dialog('tests-load', 'Load', true);
  const text = el('textarea', {
    id: 'tests-load-yaml', rows: 16, spellcheck: 'false', class: 'mono',
    placeholder: 'test:\n  name: smoke\n  steps:\n    - type: sleep\n      duration: 1',
  });
  const file = el('input', { type: 'file', id: 'tests-load-file', accept: '.yaml,.yml,text/yaml,text/plain' });
  file.addEventListener('change', async () => {
    const chosen = file.files && file.files[0];
    if (!chosen) return;
    if (chosen.size > MAX_SOURCE_BYTES) {
      d.error.textContent = `${chosen.name} is ${chosen.size} bytes: a scenario is at most ${MAX_SOURCE_BYTES} bytes`;
      return;
    }
    d.error.textContent = '';
    text.value = await chosen.text();
  });
  return open(d, 'Load a scenario', [
    field('Scenario (YAML, docs/scenarios.md)', text, 'A scenario of the same name is replaced.'),
    field('Or read a file', file),
  ], () => {
    if (!text.value.trim()) throw new Error('paste a scenario or choose a file first');
    return api('/api/tests/load', { method: 'POST', text: text.value, contentType: 'text/yaml' });
  });
}

// --------------------------------------------------------------------------- run

/** An input for one parameter, typed by its default: a checkbox for a boolean, a number field
 * for a number, a text field otherwise. */
function parameterInput(name, value) {
  const id = `tests-param-${name}`;
  if (typeof value === 'boolean') {
    const box = el('input', { type: 'checkbox', id, checked: value, dataset: { param: name, kind: 'boolean' } });
    return el('div', { class: 'field field-check' }, box, el('label', { for: id }, name));
  }
  const kind = typeof value === 'number' ? 'number' : 'string';
  const input = el('input', {
    type: kind === 'number' ? 'number' : 'text', id, step: kind === 'number' ? 'any' : null,
    value: String(value), spellcheck: 'false', dataset: { param: name, kind },
  });
  return field(name, input);
}

/** The form's values with their defaults' types; an unreadable number is an error. */
function parameterValues(fields) {
  const values = {};
  for (const input of fields.querySelectorAll('[data-param]')) {
    const name = input.dataset.param;
    if (input.dataset.kind === 'boolean') values[name] = input.checked;
    else if (input.dataset.kind === 'number') {
      const n = input.value.trim() === '' ? NaN : Number(input.value);
      if (!Number.isFinite(n)) throw new Error(`${name}: a number`);
      values[name] = n;
    } else values[name] = input.value;
  }
  return values;
}

/** POST /api/tests/run with the scenario's parameters (prefilled with its defaults); resolves
 * with the run's id. */
export async function askRunScenario(scenario) {
  const d = dialog('tests-run', 'Run');
  const params = scenario.parameters && typeof scenario.parameters === 'object' ? scenario.parameters : {};
  const inputs = Object.entries(params).map(([name, value]) => parameterInput(name, value));
  const answer = await open(d, `Run ${scenario.name}`,
    inputs.length ? inputs : [el('p', { class: 'muted' }, 'This scenario has no parameters.')],
    () => api('/api/tests/run', { method: 'POST', body: { name: scenario.name, parameters: parameterValues(d.fields) } }));
  return answer ? answer.run_id : null;
}

// --------------------------------------------------------------------------- schedule

/** POST /api/tests/schedule: a run every N seconds or on a cron expression (with the
 * scenario's defaults); resolves with the schedule. */
export function askScheduleScenario(scenario) {
  const d = dialog('tests-schedule', 'Schedule');
  const kind = el('select', { id: 'tests-trigger-type' },
    el('option', { value: 'interval' }, 'every … seconds'), el('option', { value: 'cron' }, 'cron expression'));
  const seconds = el('input', { type: 'number', id: 'tests-trigger-seconds', min: '1', step: 'any', value: '3600' });
  const expr = el('input', { type: 'text', id: 'tests-trigger-cron', placeholder: '0 3 * * *', spellcheck: 'false' });
  const secondsField = field('Seconds between runs', seconds);
  const exprField = field('Cron expression (minute hour day month weekday, UTC)', expr);
  exprField.hidden = true;
  kind.addEventListener('change', () => {
    secondsField.hidden = kind.value !== 'interval';
    exprField.hidden = kind.value !== 'cron';
  });
  return open(d, `Schedule ${scenario.name}`, [
    el('p', { class: 'muted' }, `Each fire queues one run of ${scenario.name} with its default parameters.`),
    field('Trigger', kind), secondsField, exprField,
  ], () => {
    const trigger = kind.value === 'cron'
      ? { type: 'cron', expr: expr.value.trim() }
      : { type: 'interval', seconds: Number(seconds.value) };
    return api('/api/tests/schedule', { method: 'POST', body: { name: scenario.name, trigger } });
  });
}
