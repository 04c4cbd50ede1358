/* The pause (with a note) and delete confirmation dialogs of index.html, as promises. */
import { $ } from './dom.js';

const dialogs = {
  pause: { resolve: null },
  delete: { resolve: null },
  backfill: { resolve: null },
};

/** Opens the backfill dialog; resolves with {start, end} or null when cancelled. */
export function askBackfillRange(text) {
  const dialog = $('backfill-dialog');
  $('backfill-text').textContent = text;
  return new Promise((resolve) => {
    dialogs.backfill.resolve = resolve;
    dialog.showModal();
    $('backfill-start').focus();
  });
}

/** Opens the pause dialog; resolves with the note ('' for none) or null when cancelled. */
export function askPauseNote(text) {
  const dialog = $('pause-dialog');
  $('pause-text').textContent = text;
  $('pause-note').value = '';
  return new Promise((resolve) => {
    dialogs.pause.resolve = resolve;
    dialog.showModal();
    $('pause-note').focus();
  });
}

const SCHEDULE_DELETE = { title: 'Delete schedule', note: 'This cannot be undone. Its execution history is kept.' };

/** Opens the delete confirmation (what.title / what.note: a schedule's by default); resolves
 * true to delete. */
export function askDelete(text, what) {
  const words = what || SCHEDULE_DELETE;
  const dialog = $('delete-dialog');
  $('delete-title').textContent = words.title;
  $('delete-note').textContent = words.note;
  $('delete-text').textContent = text;
  return new Promise((resolve) => {
    dialogs.delete.resolve = resolve;
    dialog.showModal();
    $('delete-confirm').focus();
  });
}

export function setupDialogs() {
  const finish = (name, dialog, value) => {
    const resolve = dialogs[name].resolve;
    dialogs[name].resolve = null;
    if (dialog.open) dialog.close();
    if (resolve) resolve(value);
  };
  const pause = $('pause-dialog');
  $('pause-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    finish('pause', pause, $('pause-note').value.trim());
  });
  pause.addEventListener('close', () => finish('pause', pause, null));
  const backfill = $('backfill-dialog');
  $('backfill-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    finish('backfill', backfill, { start: $('backfill-start').value.trim(), end: $('backfill-end').value.trim() });
  });
  backfill.addEventListener('close', () => finish('backfill', backfill, null));
  const del = $('delete-dialog');
  $('delete-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    finish('delete', del, true);
  });
  del.addEventListener('close', () => finish('delete', del, false));
  for (const button of document.querySelectorAll('.js-dialog-cancel')) {
    button.addEventListener('click', () => button.closest('dialog').close());
  }
  // A click on the backdrop (outside the dialog's box) closes it too.
  for (const dialog of document.querySelectorAll('dialog')) {
    dialog.addEventListener('click', (ev) => {
      if (ev.target === dialog) dialog.close();
    });
  }
}
