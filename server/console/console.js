// keygate's web console: a client of the admin API (/v1/admin/), nothing
// more. Every value from the server is put on the page as text (never as
// HTML), so what an instance or a person wrote cannot become markup.
'use strict';

const API = '/v1/admin/';
const RANK = { viewer: 0, approver: 1, admin: 2 };
let me = null;
let shownRequests = null;  // the requests on the page (ids and approvals), null: none drawn yet

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function say(text, kind) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.className = kind || '';
}

async function call(method, path, body) {
  const init = { method, credentials: 'same-origin', cache: 'no-store', headers: { Accept: 'application/json' } };
  if (method === 'POST') {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body || {});
  }
  const res = await fetch(API + path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const msg = data && data.error ? data.error.message : 'HTTP ' + res.status;
    throw new Error(msg);
  }
  return data;
}

function may(role) { return me !== null && RANK[me.role] >= RANK[role]; }

function age(seconds) {
  if (seconds < 60) return seconds + ' s';
  if (seconds < 3600) return Math.floor(seconds / 60) + ' min';
  return Math.floor(seconds / 3600) + ' h ' + Math.floor((seconds % 3600) / 60) + ' min';
}

function utc(unix) { return new Date(unix * 1000).toISOString().replace('T', ' ').replace('.000Z', ''); }

// Approval requests ---------------------------------------------------------

function whyAsked(r) {
  const parts = ['policy ' + r.policy + ' (' + r.mode + ')'];
  if (r.pcr_changes) parts.push('PCR values changed: ' + JSON.stringify(r.pcr_changes));
  if (r.issued_by) parts.push('token issued by ' + r.issued_by);
  return parts.join('; ');
}

function requestRow(r) {
  const claims = el('ul', { class: 'claims' });
  for (const [k, v] of Object.entries(r.claims || {})) claims.append(el('li', {}, el('span', { class: 'mono' }, k + ': ' + v)));
  const now = Math.floor(Date.now() / 1000);
  const row = el('tr', { dataset: { requestId: r.request_id } },
    el('td', { class: 'mono' }, r.request_id),
    el('td', { class: 'mono' }, r.volume_id),
    el('td', { class: 'mono' }, r.instance, el('br'), r.platform),
    el('td', {}, claims),
    el('td', {}, whyAsked(r)),
    el('td', {}, age(Math.max(0, now - r.created_at))),
    el('td', {}, r.approvals + ' of ' + r.approvals_needed));
  if (may('approver')) {
    const reason = el('input', { class: 'reason', type: 'text', maxlength: '256', placeholder: 'reason (a change number…)', 'aria-label': 'reason for ' + r.request_id });
    const approve = el('button', { type: 'button', class: 'approve' }, 'Approve');
    const deny = el('button', { type: 'button', class: 'deny' }, 'Deny');
    const decide = async (verb) => {
      if (!reason.value.trim()) { say('A decision needs a reason.', 'error'); reason.focus(); return; }
      approve.disabled = deny.disabled = true;
      try {
        const d = await call('POST', 'requests/' + encodeURIComponent(r.request_id) + '/' + verb, { reason: reason.value });
        say(r.request_id + ': ' + (verb === 'approve' ? 'approved' : 'denied') + ' (' + d.state + ')', 'done');
        shownRequests = null;
        await loadRequests();
      } catch (e) {
        say(r.request_id + ': ' + e.message, 'error');
        approve.disabled = deny.disabled = false;
      }
    };
    approve.addEventListener('click', () => decide('approve'));
    deny.addEventListener('click', () => decide('deny'));
    row.append(el('td', { class: 'decide' }, reason, approve, ' ', deny));
  }
  return row;
}

async function loadRequests() {
  const data = await call('GET', 'requests');
  const list = data.requests || [];
  const key = list.map((r) => r.request_id + ':' + r.approvals).join(',');
  if (key === shownRequests) return;  // unchanged: keep what is being typed
  shownRequests = key;
  const body = document.querySelector('#requests tbody');
  body.replaceChildren(...list.map(requestRow));
  document.getElementById('requests-empty').hidden = list.length > 0;
}

// Volumes -------------------------------------------------------------------

// A button that acts on its second click (no dialog to dismiss): `act`
// runs, then the view reloads; an error is shown and the button offered again.
function twoClickButton(label, armed, what, act) {
  const b = el('button', { type: 'button', class: 'revoke' }, label);
  b.addEventListener('click', async () => {
    if (b.dataset.armed !== '1') {
      b.dataset.armed = '1';
      b.textContent = armed;
      return;
    }
    b.disabled = true;
    try {
      await act();
      say(what + ': revoked', 'done');
      await loadVolumes();
    } catch (e) {
      say(what + ': ' + e.message, 'error');
      b.disabled = false;
    }
  });
  return b;
}

async function loadVolumes() {
  const [vols, inst] = await Promise.all([call('GET', 'volumes'), call('GET', 'instances')]);
  const byVolume = {};
  for (const i of inst.instances || []) (byVolume[i.volume_id] = byVolume[i.volume_id] || []).push(i);
  const rows = (vols.volumes || []).map((v) => {
    const instances = el('ul', { class: 'claims' });
    for (const i of byVolume[v.id] || []) {
      const item = el('li', { class: 'mono' }, i.instance + ' (' + i.relation + ')');
      // One instance of an image group: revoked alone, the group stays open.
      if (may('admin') && i.relation === 'known' && v.state !== 'revoked') {
        item.append(' ', twoClickButton('Revoke instance', 'Revoke ' + i.instance + '?', i.instance, () =>
          call('POST', 'volumes/' + encodeURIComponent(v.id) + '/revoke-instance', { instance: i.instance })));
      }
      instances.append(item);
    }
    const row = el('tr', { dataset: { volumeId: v.id } },
      el('td', { class: 'mono' }, v.id),
      el('td', {}, v.state),
      el('td', {}, v.description || ''),
      el('td', {}, instances),
      el('td', { class: 'mono' }, v.policy ? JSON.stringify(v.policy) : ''));
    if (may('admin')) {
      const cell = el('td', {});
      if (v.state !== 'revoked') {
        cell.append(twoClickButton('Revoke', 'Revoke for good?', v.id, () =>
          call('POST', 'volumes/' + encodeURIComponent(v.id) + '/revoke', {})));
      }
      row.append(cell);
    }
    return row;
  });
  document.querySelector('#volumes tbody').replaceChildren(...rows);
}

// Audit trail ---------------------------------------------------------------

function unixOf(local) { return local ? Math.floor(Date.parse(local + 'Z') / 1000) : null; }

async function loadAudit() {
  const form = document.getElementById('audit-filter');
  const q = new URLSearchParams();
  for (const name of ['volume', 'instance', 'event', 'outcome']) {
    const v = form.elements[name].value.trim();
    if (v) q.set(name, v);
  }
  const since = unixOf(form.elements.since.value), until = unixOf(form.elements.until.value);
  if (since !== null) q.set('since', since);
  if (until !== null) q.set('until', until);
  const data = await call('GET', 'audit' + (q.toString() ? '?' + q.toString() : ''));
  const chain = document.getElementById('chain');
  if (data.chain.verified) {
    chain.className = 'chain ok';
    chain.textContent = 'Chain verified: ' + data.chain.records + ' records, head ' + data.chain.head;
  } else {
    chain.className = 'chain broken';
    chain.textContent = 'Chain BROKEN: ' + data.chain.error;
  }
  document.getElementById('audit-count').textContent =
    data.matched + ' matching record(s)' + (data.matched > data.records.length ? ', newest ' + data.records.length + ' shown' : '');
  const rows = data.records.map((r) => el('tr', { dataset: { seq: r.seq } },
    el('td', {}, r.seq), el('td', { class: 'nowrap' }, utc(r.time)), el('td', { class: 'mono nowrap' }, r.event),
    el('td', { class: 'outcome-' + r.outcome }, r.outcome), el('td', { class: 'mono' }, r.volume_id),
    el('td', { class: 'mono nowrap' }, r.peer), el('td', { class: 'detail' }, r.detail)));
  document.querySelector('#audit tbody').replaceChildren(...rows);
}

// Views ---------------------------------------------------------------------

const loaders = { requests: loadRequests, volumes: loadVolumes, audit: loadAudit };
let current = 'requests';

async function show(view) {
  if (view !== current) say('');
  current = view;
  for (const t of document.querySelectorAll('.tab')) t.classList.toggle('active', t.dataset.view === view);
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== 'view-' + view;
  try {
    await loaders[view]();
  } catch (e) {
    say(view + ': ' + e.message, 'error');
  }
}

async function start() {
  try {
    me = await call('GET', 'whoami');
  } catch (e) {
    document.getElementById('who').textContent = 'not signed in: ' + e.message;
    return;
  }
  const who = document.getElementById('who');
  who.replaceChildren('Signed in as ', el('strong', {}, me.name), ' (' + me.role + ')');
  document.body.dataset.role = me.role;
  if (!may('approver')) for (const c of document.querySelectorAll('th.decide')) c.remove();
  if (!may('admin')) for (const c of document.querySelectorAll('th.admin-only')) c.remove();
  for (const t of document.querySelectorAll('.tab')) t.addEventListener('click', () => show(t.dataset.view));
  document.getElementById('audit-filter').addEventListener('submit', (ev) => { ev.preventDefault(); show('audit'); });
  await show(location.hash === '#audit' ? 'audit' : location.hash === '#volumes' ? 'volumes' : 'requests');
  document.body.dataset.ready = '1';
  setInterval(() => { if (current === 'requests') loadRequests().catch((e) => say(e.message, 'error')); }, 3000);
}

document.addEventListener('DOMContentLoaded', start);
