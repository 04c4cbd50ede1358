/* Small inline SVG charts (bar chart, sparkline) for the overview and tests pages. */
import { el, svg } from './dom.js';

/** A small bar chart of values (null = no data) with a <title> per bar. */
export function barChart(values, labels, options) {
  const opts = options || {};
  const w = 240;
  const h = 56;
  const n = Math.max(values.length, 1);
  const nums = values.filter((v) => v !== null && v !== undefined);
  const max = opts.max || Math.max(1, ...nums);
  const gap = 1;
  const bw = w / n;
  const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, class: 'chart', role: 'img', 'aria-label': opts.label, preserveAspectRatio: 'none' });
  chart.appendChild(svg('line', { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: 'chart-axis' }));
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const bh = Math.max(v > 0 ? 1.5 : 0, (v / max) * (h - 4));
    chart.appendChild(svg('rect', {
      x: (i * bw + gap / 2).toFixed(2), y: (h - bh).toFixed(2), width: Math.max(bw - gap, 0.5).toFixed(2), height: bh.toFixed(2),
      class: opts.barClass ? opts.barClass(v, i) : 'chart-bar',
    }, svg('title', null, `${labels[i]}: ${opts.format ? opts.format(v) : v}`)));
  });
  return chart;
}

/** A small line chart (sparkline); null values break the line. */
export function lineChart(values, labels, options) {
  const opts = options || {};
  const w = 240;
  const h = 56;
  const n = Math.max(values.length - 1, 1);
  const nums = values.filter((v) => v !== null && v !== undefined);
  const max = opts.max || Math.max(1, ...nums);
  const chart = svg('svg', { viewBox: `0 0 ${w} ${h}`, class: 'chart', role: 'img', 'aria-label': opts.label, preserveAspectRatio: 'none' });
  chart.appendChild(svg('line', { x1: 0, y1: h - 0.5, x2: w, y2: h - 0.5, class: 'chart-axis' }));
  const y = (v) => (h - 3 - (v / max) * (h - 6)).toFixed(2);
  const x = (i) => ((i / n) * w).toFixed(2);
  let path = '';
  let pen = false;
  values.forEach((v, i) => {
    if (v === null || v === undefined) {
      pen = false;
      return;
    }
    path += `${pen ? 'L' : 'M'}${x(i)} ${y(v)} `;
    pen = true;
  });
  if (path) chart.appendChild(svg('path', { d: path.trim(), class: 'chart-line' }));
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    chart.appendChild(svg('circle', { cx: x(i), cy: y(v), r: 1.6, class: 'chart-dot' },
      svg('title', null, `${labels[i]}: ${opts.format ? opts.format(v) : v}`)));
  });
  return chart;
}

/** A chart with its title, a summary and the labels of its two ends (default: the overview's
 * last ten minutes). */
export function chartFigure(title, summary, chart, ends) {
  const [first, last] = ends || ['−10 min', 'now'];
  return el('figure', { class: 'chart-fig' },
    el('figcaption', null, el('span', { class: 'chart-title' }, title), el('span', { class: 'chart-value' }, summary)),
    chart,
    el('div', { class: 'chart-scale' }, el('span', null, first), el('span', null, last)));
}
