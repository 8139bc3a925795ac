// app.js — tim's web chat page: accounts, 1:1 chats by user id, friends and presence watches, groups, live rooms. Built on the
// client module tim.js (docs/CLIENTS.md); the DOM ids and data-testid attributes are what
// tests/browser.rs drives. Nothing here is persisted but the device id, the last name typed and
// the list of 1:1 chats per user (the protocol has no "my conversations" request).

import {
  TimClient, Conv, DeviceType, ErrorCode, GroupRole, NoticeEvent, PresenceState, RoomPublishPolicy, RosterAction, RosterList,
  SendFlags, TimError, bodyText, burnedSeqs, compareU64, isBurned, isNotice, isRecalled, newClientMsgId, pageUrl,
  peerOf, recalledSeq, u64,
} from "./tim.js";

const $ = (id) => document.getElementById(id);

/** Messages asked for per history page. */
const HISTORY_PAGE = 30;
/** How long received messages wait to be acknowledged together (one delivery_ack per chat). */
const ACK_DELAY_MS = 150;
/** Messages kept per live room (rooms have no history; older ones are dropped from view). */
const ROOM_MESSAGES_MAX = 500;
/** A message body longer than this (in characters) is shown cut, with its size and "show all". */
const LONG_TEXT_CHARS = 2000;
/** The open chat tells how far it was read (`read`) at most this often. */
const READ_EVERY_MS = 1000;

/** A stable id for this browser installation (PROTOCOL.md 5.3: one device, one cursor). */
function deviceId() {
  let id = localStorage.getItem("tim.device_id");
  if (!id) {
    id = "web-" + newClientMsgId();
    localStorage.setItem("tim.device_id", id);
  }
  return id;
}

const state = {
  /** The connection (a TimClient), or null. */
  client: null,
  /** Nicknames from users' profiles, by user id. */
  nicknames: new Map(),
  /** When this page last told the open conversation it types (ms), and the timer that hides
   * the "is typing" line. */
  typingSentAt: 0,
  typingTimer: null,
  /** When this page last sent a `read`, and the timer of the next one. */
  readSentAt: 0,
  readTimer: null,
  /** The logged-in user's id and name, kept after a disconnect to resend to the same account. */
  me: null,
  name: null,
  /** Conversations by key: `d:<user id>`, `g:<group id>`, `r:<room id>`. */
  convs: new Map(),
  /** The key of the conversation on screen, or null. */
  current: null,
  /** Messages sent and not acknowledged, by client_msg_id: resent after the next login. */
  outbox: new Map(),
  /** A logout is under way (its close is no surprise). */
  loggingOut: false,
  /** The roster (JSON.md 3.4): entries `{user, since_ms, note}` by user id, per list (the keys
   * of ROSTER_LISTS). */
  roster: null,
  /** The presence (PROTOCOL.md 5.21) of friends and of watched users: entries `{user, state,
   * since_ms, text}` by user id. */
  presence: new Map(),
};

// ---- conversations and messages ----

/**
 * A conversation: `kind` "direct" | "group" | "room", `id` the peer, group or room id, `msgs` by
 * key (`s<seq>` once stored, `c<client_msg_id>` while sending, `n<counter>` for room and system
 * lines), `oldest` the lowest seq loaded, `more` whether history goes further back, `recalled`
 * the seqs of recall notices seen whose message is not (or not yet) shown, `burned` the same for
 * burn notices (burn after read). Read receipts:
 * `readSeq` how far this user read it (told or learnt), `reads` the others' positions by user
 * id (1:1: the peer; groups of up to 100 members), `readCount` `{seq, count}` from the last
 * `read_get` (what larger groups tell).
 */
function conv(kind, id) {
  const key = `${kind[0]}:${id}`;
  let c = state.convs.get(key);
  if (!c) {
    c = {
      key, kind, id, title: kind === "direct" ? userLabel(id) : kind === "group" ? `group ${id}` : `room ${id}`,
      msgs: new Map(), oldest: null, more: false, historyLoaded: false, unread: 0,
      ackedSeq: "0", ackTimer: null, info: null, closed: false, nextLocal: 0, recalled: new Set(), burned: new Set(),
      readSeq: "0", reads: new Map(), readCount: null,
    };
    state.convs.set(key, c);
    if (kind === "direct") {
      saveContacts();
      if (state.client?.session && !state.nicknames.has(String(id))) loadNicknames([id]).catch(() => {});
    }
    renderLists();
  }
  return c;
}

function userLabel(id) {
  if (String(id) === state.me) return "you";
  const nick = state.nicknames.get(String(id));
  return nick ? `${nick} (${id})` : `user ${id}`;
}

/** Read the profiles of `ids` (100 a request) and show their nicknames. */
async function loadNicknames(ids) {
  const all = [...new Set(ids.map(String))];
  for (let i = 0; i < all.length; i += 100) {
    const list = await state.client.profileGet(all.slice(i, i + 100));
    for (const p of list.profiles) {
      if (p.profile.nickname) state.nicknames.set(p.user_id, p.profile.nickname);
      else state.nicknames.delete(p.user_id);
    }
  }
  for (const c of state.convs.values()) if (c.kind === "direct") c.title = userLabel(c.id);
  $("nickname").value = state.nicknames.get(state.me) || "";
  renderLists();
  renderRoster();
  if (state.current) $("conv-title").textContent = state.convs.get(state.current)?.title || "";
}

const DEVICE_NAMES = { 0: "other", 1: "phone", 2: "tablet", 3: "desktop", 4: "web" };

/** List the account's sessions, each with a button that logs it out. */
async function showSessions(list) {
  const ul = $("session-list");
  ul.replaceChildren();
  for (const s of list.sessions) {
    const li = document.createElement("li");
    li.dataset.testid = "session";
    const since = new Date(Number(s.login_ms)).toLocaleString();
    li.textContent = `${DEVICE_NAMES[s.device_type] || s.device_type}${s.device_id ? ` “${s.device_id}”` : ""}, since ${since}${s.current ? " (this page)" : ""} `;
    if (!s.current) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "secondary";
      b.textContent = "Log out";
      b.addEventListener("click", async () => {
        try {
          await showSessions(await state.client.sessionLogout(s.session_id));
        } catch (e) {
          flash(`${e.codeName}: ${e.message}`);
        }
      });
      li.append(b);
    }
    ul.append(li);
  }
}

// ---- friends (JSON.md 3.4) ----

/** The roster lists the page keeps: the key in `state.roster`, and the `RosterList` read into
 * it. The watch lists (PROTOCOL.md 5.20): `watchers` see this user's presence, this user sees
 * `watching`'s; `watchIncoming` ask this user to watch it, `watchOutgoing` are its own asks. */
const ROSTER_LISTS = [
  ["friends", RosterList.FRIENDS], ["incoming", RosterList.INCOMING],
  ["outgoing", RosterList.OUTGOING], ["blocked", RosterList.BLOCKED],
  ["watchers", RosterList.WATCHERS], ["watching", RosterList.WATCHING],
  ["watchIncoming", RosterList.WATCH_INCOMING], ["watchOutgoing", RosterList.WATCH_OUTGOING],
];

const ROSTER_VERBS = {
  [RosterAction.REQUEST]: "add friend", [RosterAction.ACCEPT]: "accept", [RosterAction.REJECT]: "reject",
  [RosterAction.REMOVE]: "remove friend", [RosterAction.BLOCK]: "block", [RosterAction.UNBLOCK]: "unblock",
  [RosterAction.CANCEL]: "cancel request", [RosterAction.WATCH]: "watch", [RosterAction.ALLOW]: "allow",
  [RosterAction.DENY]: "deny", [RosterAction.UNWATCH]: "unwatch", [RosterAction.REVOKE]: "revoke",
};

function emptyRoster() {
  return Object.fromEntries(ROSTER_LISTS.map(([name]) => [name, new Map()]));
}

/** The users whose presence the page shows (and is told of): friends and watched users. */
function presenceUsers() {
  return [...new Set([...state.roster.friends.keys(), ...state.roster.watching.keys()])];
}

/** Forget the presence of `user` once it is neither a friend nor watched (it is told no more). */
function forgetPresence(user) {
  if (!state.roster.friends.has(user) && !state.roster.watching.has(user)) state.presence.delete(user);
}

/** Read the roster lists from the server and draw them (and the nicknames in them). */
async function loadRoster() {
  const client = state.client;
  if (!client?.session) return;
  const lists = await Promise.all(ROSTER_LISTS.map(async ([name, list]) => [name, await client.rosterGetAll(list)]));
  if (client !== state.client) return;
  for (const [name, entries] of lists) state.roster[name] = new Map(entries.map((e) => [e.user, e]));
  for (const user of [...state.presence.keys()]) forgetPresence(user);
  renderRoster();
  const shown = presenceUsers();
  if (shown.length) await loadPresence(shown);
  const unnamed = lists.flatMap(([, entries]) => entries.map((e) => e.user)).filter((u) => !state.nicknames.has(u));
  if (unnamed.length) await loadNicknames(unnamed);
}

// ---- presence (PROTOCOL.md 5.21) ----

const PRESENCE_NAMES = {
  [PresenceState.OFFLINE]: "offline", [PresenceState.ONLINE]: "online", [PresenceState.AWAY]: "away",
  [PresenceState.BUSY]: "busy", [PresenceState.INVISIBLE]: "invisible",
};

/** Read the presence of `ids` (100 a request) into `state.presence`, and draw the roster again. */
async function loadPresence(ids) {
  const client = state.client;
  const all = [...new Set(ids.map(String))];
  for (let i = 0; i < all.length; i += 100) {
    const list = await client.presenceGet(all.slice(i, i + 100));
    if (client !== state.client) return;
    for (const e of list.entries) applyPresence(e);
  }
  renderRoster();
}

/** One presence entry (of `presence_list` or a `presence_notice`): a friend's or a watched
 * user's, or this user's own. */
function applyPresence(e) {
  if (e.user === state.me) {
    $("presence-state").value = String(e.state === PresenceState.OFFLINE ? PresenceState.ONLINE : e.state);
    if (document.activeElement !== $("presence-text")) $("presence-text").value = e.text || "";
    $("presence-form").dataset.state = PRESENCE_NAMES[e.state] || "online";
  } else {
    state.presence.set(e.user, e);
  }
}

/** Read the roster again soon (after a burst of notices: once). */
function rosterSoon() {
  clearTimeout(rosterSoon.timer);
  rosterSoon.timer = setTimeout(() => loadRoster().catch(() => {}), 200);
}

/** A roster change pushed by the server, shown at once (the lists are read again after it). */
function applyRosterNotice(n) {
  const r = state.roster;
  const mine = n.from === state.me; // this user acted, on another device
  const other = mine ? n.to : n.from;
  const entry = { user: other, since_ms: String(Date.now()), note: n.note || "" };
  switch (n.event) {
    case RosterAction.REQUEST:
      (mine ? r.outgoing : r.incoming).set(other, entry);
      break;
    case RosterAction.ACCEPT:
      r.incoming.delete(other);
      r.outgoing.delete(other);
      r.friends.set(other, { ...entry, note: "" });
      break;
    case RosterAction.REJECT:
    case RosterAction.CANCEL:
      r.incoming.delete(other);
      r.outgoing.delete(other);
      break;
    case RosterAction.REMOVE:
      r.friends.delete(other);
      forgetPresence(other);
      break;
  }
  // Presence watches (PROTOCOL.md 5.20): who acted decides which side of the watch changed.
  const asked = r.watchIncoming.has(other); // before the notice: `other` asked to watch this user
  switch (n.event) {
    case RosterAction.WATCH:
      (mine ? r.watchOutgoing : r.watchIncoming).set(other, entry);
      break;
    case RosterAction.ALLOW:
      if (mine) {
        r.watchIncoming.delete(other);
        r.watchers.set(other, entry);
      } else {
        r.watchOutgoing.delete(other);
        r.watching.set(other, entry); // its presence comes in a presence_notice (unless offline)
      }
      break;
    case RosterAction.DENY:
      (mine ? r.watchIncoming : r.watchOutgoing).delete(other);
      break;
    case RosterAction.UNWATCH:
      if (mine) {
        r.watching.delete(other);
        r.watchOutgoing.delete(other);
        forgetPresence(other);
      } else {
        r.watchers.delete(other);
        r.watchIncoming.delete(other);
      }
      break;
    case RosterAction.REVOKE:
      if (mine) r.watchers.delete(other);
      else {
        r.watching.delete(other);
        forgetPresence(other);
      }
      break;
  }
  if (!mine) {
    const who = userLabel(other);
    const text = {
      [RosterAction.REQUEST]: `${who} sent you a friend request${n.note ? `: “${n.note}”` : ""}`,
      [RosterAction.ACCEPT]: `${who} accepted your friend request`,
      [RosterAction.REJECT]: `${who} turned down your friend request`,
      [RosterAction.REMOVE]: `${who} is no longer your friend`,
      [RosterAction.CANCEL]: `${who} withdrew their friend request`,
      [RosterAction.WATCH]: `${who} asks to see your status`,
      [RosterAction.ALLOW]: `${who} lets you see their status`,
      [RosterAction.DENY]: `${who} turned down your request to see their status`,
      [RosterAction.UNWATCH]: asked ? `${who} withdrew their request to see your status` : `${who} no longer watches your status`,
      [RosterAction.REVOKE]: `${who} no longer lets you see their status`,
    }[n.event];
    if (text) flash(text);
  }
  renderRoster();
  if (!state.nicknames.has(other)) loadNicknames([other]).catch(() => {});
}

/** One roster action from the page; the lists are read again after it. */
async function rosterDo(action, user, note = "") {
  if (!state.client?.session) return;
  try {
    const ok = await state.client.rosterAction(action, user, note);
    if (action === RosterAction.REQUEST) {
      flash(ok.friends ? `You and ${userLabel(user)} are friends now.` : `Friend request sent to ${userLabel(user)}.`);
    } else if (action === RosterAction.WATCH) {
      flash(`Asked ${userLabel(user)} to let you see their status.`);
    }
  } catch (e) {
    flash(`${ROSTER_VERBS[action] || "roster"}: ${e.codeName}: ${e.message}`);
  }
  try {
    await loadRoster();
  } catch (e) {
    flash(`friends: ${e.codeName}: ${e.message}`);
  }
}

/** Draw the friends panel: requests to this user (accept, reject, block), this user's requests
 * (cancel), friends (chat, remove, block; with their presence) and the blocked (unblock); then
 * the presence watches: asks to watch this user (allow, deny, block), this user's asks (cancel), the
 * users it watches (unwatch; with their presence) and its watchers (revoke). */
function renderRoster() {
  const r = state.roster;
  const button = (label, testid, fn, cls = "secondary") => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = cls;
    b.dataset.testid = testid;
    b.textContent = label;
    b.addEventListener("click", fn);
    return b;
  };
  const withPresence = (list) => list === "friends" || list === "watching";
  const draw = (ulId, entries, list, what, actions) => {
    const ul = $(ulId);
    ul.replaceChildren();
    for (const e of [...entries.values()].sort((x, y) => compareU64(x.user, y.user))) {
      const li = document.createElement("li");
      li.className = "roster-entry";
      li.dataset.testid = "roster-entry";
      li.dataset.list = list;
      li.dataset.user = e.user;
      const name = document.createElement("span");
      name.className = "roster-name";
      name.dataset.testid = "roster-name";
      name.textContent = userLabel(e.user);
      name.title = `since ${time(e.since_ms)}`;
      if (withPresence(list)) {
        const p = state.presence.get(e.user);
        const st = PRESENCE_NAMES[p?.state ?? PresenceState.OFFLINE] || "offline";
        li.dataset.presence = st;
        const dot = document.createElement("span");
        dot.className = `presence-dot presence-${st}`;
        dot.setAttribute("aria-hidden", "true");
        li.append(dot);
      }
      li.append(name);
      if (withPresence(list)) {
        const p = state.presence.get(e.user);
        const label = document.createElement("span");
        label.className = "presence-label";
        label.dataset.testid = "presence-label";
        label.textContent = li.dataset.presence;
        li.append(label);
        if (p?.text) {
          const t = document.createElement("span");
          t.className = "presence-status";
          t.dataset.testid = "presence-status";
          t.textContent = p.text;
          li.append(t);
        }
      }
      if (what) {
        const k = document.createElement("span");
        k.className = "roster-kind";
        k.textContent = what;
        li.append(k);
      }
      li.append(...actions(e));
      if (e.note) {
        const n = document.createElement("span");
        n.className = "roster-note";
        n.dataset.testid = "roster-note";
        n.textContent = `“${e.note}”`;
        li.append(n);
      }
      ul.append(li);
    }
  };
  draw("incoming-list", r.incoming, "incoming", "wants to be friends", (e) => [
    button("Accept", "accept", () => rosterDo(RosterAction.ACCEPT, e.user), ""),
    button("Reject", "reject", () => rosterDo(RosterAction.REJECT, e.user)),
    button("Block", "block", () => rosterDo(RosterAction.BLOCK, e.user)),
  ]);
  draw("outgoing-list", r.outgoing, "outgoing", "request sent", (e) => [
    button("Cancel", "cancel", () => rosterDo(RosterAction.CANCEL, e.user)),
  ]);
  draw("friend-list", r.friends, "friends", "", (e) => [
    button("Chat", "chat", () => openConv(conv("direct", e.user).key), ""),
    button("Remove", "unfriend", () => rosterDo(RosterAction.REMOVE, e.user)),
    button("Block", "block", () => rosterDo(RosterAction.BLOCK, e.user)),
  ]);
  draw("blocked-list", r.blocked, "blocked", "", (e) => [
    button("Unblock", "unblock", () => rosterDo(RosterAction.UNBLOCK, e.user)),
  ]);
  draw("watch-incoming-list", r.watchIncoming, "watch-incoming", "wants to see your status", (e) => [
    button("Allow", "allow", () => rosterDo(RosterAction.ALLOW, e.user), ""),
    button("Deny", "deny", () => rosterDo(RosterAction.DENY, e.user)),
    button("Block", "block", () => rosterDo(RosterAction.BLOCK, e.user)),
  ]);
  draw("watch-outgoing-list", r.watchOutgoing, "watch-outgoing", "asked to see their status", (e) => [
    button("Cancel", "cancel-watch", () => rosterDo(RosterAction.UNWATCH, e.user)),
  ]);
  draw("watching-list", r.watching, "watching", "", (e) => [
    button("Unwatch", "unwatch", () => rosterDo(RosterAction.UNWATCH, e.user)),
  ]);
  draw("watchers-list", r.watchers, "watchers", "sees your status", (e) => [
    button("Revoke", "revoke", () => rosterDo(RosterAction.REVOKE, e.user)),
  ]);
  $("no-friends").hidden = r.friends.size + r.incoming.size + r.outgoing.size > 0;
  $("blocked-count").textContent = r.blocked.size ? `(${r.blocked.size})` : "";
  $("blocked-block").hidden = r.blocked.size === 0;
}

/** Show (or hide, `text` empty) the "is typing" line of the open conversation. */
function showTyping(text) {
  clearTimeout(state.typingTimer);
  $("typing").textContent = text;
  $("typing").hidden = !text;
  if (text) state.typingTimer = setTimeout(() => showTyping(""), 6000);
}

/** The user types in the open conversation: tell it, at most every 3 s. */
function typed() {
  const c = state.convs.get(state.current);
  if (!c || c.kind === "room" || !state.client?.session || Date.now() - state.typingSentAt < 3000) return;
  state.typingSentAt = Date.now();
  state.client.typing(c.kind === "group" ? Conv.GROUP : Conv.DIRECT, c.id, true);
}

function contactsKey() {
  return `tim.contacts.${state.me}`;
}

function saveContacts() {
  if (!state.me) return;
  const ids = [...state.convs.values()].filter((c) => c.kind === "direct").map((c) => c.id);
  localStorage.setItem(contactsKey(), JSON.stringify(ids));
}

function loadContacts() {
  try {
    for (const id of JSON.parse(localStorage.getItem(contactsKey()) || "[]")) conv("direct", u64(id));
  } catch {
    localStorage.removeItem(contactsKey());
  }
}

/** A stored message (deliver or history_msg) into its conversation; returns the conversation. */
function addStored(msg, how) {
  const c = msg.conv === Conv.GROUP ? conv("group", msg.to) : conv("direct", peerOf(msg, state.me));
  const key = `s${msg.seq}`;
  const mine = msg.from === state.me;
  const taken = recalledSeq(msg);
  const burned = burnedSeqs(msg);
  const old = c.msgs.get(key);
  if (old) {
    // A repeat (PROTOCOL.md 8.3): keep the first, but a tombstone tells it was recalled (or
    // burned) since.
    if (isRecalled(msg)) markRecalled(c, msg.seq);
    if (isBurned(msg)) markBurned(c, msg.seq);
    return c;
  }
  if (c.oldest === null || compareU64(msg.seq, c.oldest) < 0) c.oldest = msg.seq;
  if (taken !== null || burned !== null) {
    // A recall or burn notice: not shown itself, but kept (hidden) so that it is acknowledged
    // and its repeats dropped; the messages it changes are shown as recalled or burned.
    c.msgs.set(key, { seq: msg.seq, from: msg.from, ts: Number(msg.ts_ms), hidden: true, mine, state: mine ? "sent" : "received" });
    if (taken !== null) markRecalled(c, taken);
    for (const seq of burned ?? []) markBurned(c, seq);
    return c;
  }
  // Our own message that this page is still sending (its ack not yet in): the stored copy wins.
  if (mine) c.msgs.delete(`c${msg.client_msg_id}`);
  c.msgs.set(key, {
    seq: msg.seq, from: msg.from, ts: Number(msg.ts_ms), text: isNotice(msg) ? noticeText(msg.notice) : bodyText(msg),
    notice: isNotice(msg), mine, state: mine ? "sent" : "received",
    recalled: isRecalled(msg) || c.recalled.has(msg.seq),
    burned: isBurned(msg) || c.burned.has(msg.seq),
    burn: (msg.flags & SendFlags.BURN_AFTER_READ) !== 0,
  });
  const m = c.msgs.get(key);
  if (m.burned) m.text = "";
  c.recalled.delete(msg.seq);
  c.burned.delete(msg.seq);
  if (how !== "history" && !mine && state.current !== c.key) c.unread++;
  return c;
}

/** Message `seq` of conversation `c` was recalled: shown as such from now on (also if it is
 * loaded only later, from a history page read before the recall). */
function markRecalled(c, seq) {
  const m = c.msgs.get(`s${seq}`);
  if (!m) {
    c.recalled.add(seq);
    return;
  }
  m.recalled = true;
  m.text = "";
}

/** Message `seq` of conversation `c` was burned after reading: shown as such from now on (also
 * if it is loaded only later). */
function markBurned(c, seq) {
  const m = c.msgs.get(`s${seq}`);
  if (!m) {
    c.burned.add(seq);
    return;
  }
  m.burned = true;
  m.text = "";
}

/** Take back one of this user's messages (the "recall" action of its bubble). */
async function recallMessage(c, m) {
  if (!state.client?.session || m.recalling) return;
  m.recalling = true;
  renderMessages();
  try {
    const ack = await state.client.recall(c.kind === "group" ? Conv.GROUP : Conv.DIRECT, c.id, m.seq);
    // The recall is a stored message of its own (this session is not sent it): kept hidden.
    if (!c.msgs.has(`s${ack.seq}`)) c.msgs.set(`s${ack.seq}`, { seq: ack.seq, from: state.me, ts: Number(ack.ts_ms), hidden: true, mine: true, state: "sent" });
    markRecalled(c, m.seq);
  } catch (e) {
    flash(`recall: ${e.codeName}: ${e.message}`);
  } finally {
    m.recalling = false;
  }
  if (state.current === c.key) renderMessages();
}

/** What a group notice says (PROTOCOL.md 7.3), in words. */
function noticeText(n) {
  if (!n) return "(a group change)";
  const a = userLabel(n.actor), t = userLabel(n.target);
  switch (n.event) {
    case NoticeEvent.CREATED: return `${a} created the group`;
    case NoticeEvent.JOINED: return `${a} joined`;
    case NoticeEvent.LEFT: return `${a} left`;
    case NoticeEvent.KICKED: return `${a} removed ${t}`;
    case NoticeEvent.ADDED: return `${a} added ${t}`;
    case NoticeEvent.MANAGER_ADDED: return `${a} made ${t} a manager`;
    case NoticeEvent.MANAGER_REMOVED: return `${a} made ${t} a plain member`;
    case NoticeEvent.TRANSFERRED: return `${a} handed the group to ${t}`;
    case NoticeEvent.MUTED: return n.until_ms === "0" ? `${a} unmuted ${t}` : `${a} muted ${t} until ${time(n.until_ms)}`;
    case NoticeEvent.MUTED_ALL: return n.until_ms === "0" ? `${a} unmuted the group` : `${a} muted the group until ${time(n.until_ms)}`;
    case NoticeEvent.PROFILE_CHANGED: return `${a} changed the group's profile`;
    case NoticeEvent.BLOCKED: return `${a} blocked ${t}`;
    case NoticeEvent.DISSOLVED: return `${a} dissolved the group`;
    case NoticeEvent.UNBLOCKED: return `${a} unblocked ${t}`;
    case NoticeEvent.MEMBERS_ADDED: return `${a} added ${n.users.map(userLabel).join(", ")}`;
    default: return `(group change ${n.event})`;
  }
}

function time(ms) {
  const d = new Date(Number(ms));
  return d.toLocaleString(undefined, { hour: "2-digit", minute: "2-digit", day: "numeric", month: "short" });
}

/** Acknowledge a conversation up to its newest received seq, once received messages settle. */
function scheduleAck(c) {
  if (c.kind === "room") return;
  clearTimeout(c.ackTimer);
  c.ackTimer = setTimeout(() => {
    let top = c.ackedSeq;
    for (const m of c.msgs.values()) if (m.seq && compareU64(m.seq, top) > 0) top = m.seq;
    if (compareU64(top, c.ackedSeq) <= 0 || !state.client?.session) return;
    state.client.deliveryAck(c.kind === "group" ? Conv.GROUP : Conv.DIRECT, c.id, top);
    c.ackedSeq = top;
    for (const m of c.msgs.values()) if (m.state === "received" && compareU64(m.seq, top) <= 0) m.state = "acked";
    if (state.current === c.key) renderMessages();
  }, ACK_DELAY_MS);
}

// ---- read receipts (PROTOCOL.md 5.18) ----

/** Conv.DIRECT or Conv.GROUP for a chat. */
function convOf(c) {
  return c.kind === "group" ? Conv.GROUP : Conv.DIRECT;
}

/** The highest seq of a chat's stored messages (`others`: of those not this user's), or "0". */
function newestSeq(c, others = false) {
  let top = "0";
  for (const m of c.msgs.values()) if (m.seq && !(others && m.mine) && compareU64(m.seq, top) > 0) top = m.seq;
  return top;
}

/** The open chat is read up to its newest message from others while the page is visible: tell
 * the server, at most every READ_EVERY_MS and only when that moved on. */
function markRead() {
  const c = state.convs.get(state.current);
  if (!c || c.kind === "room" || !state.client?.session || document.visibilityState !== "visible") return;
  if (compareU64(newestSeq(c, true), c.readSeq) <= 0) return;
  const wait = state.readSentAt + READ_EVERY_MS - Date.now();
  if (wait > 0) {
    if (!state.readTimer) state.readTimer = setTimeout(() => { state.readTimer = null; markRead(); }, wait);
    return;
  }
  const top = newestSeq(c, true);
  state.readSentAt = Date.now();
  c.readSeq = top;
  state.client.read(convOf(c), c.id, top);
}

/** Someone's position in a chat moved to `seq` (positions never go back). */
function noteRead(c, user, seq) {
  if (user === state.me) {
    if (compareU64(seq, c.readSeq) > 0) c.readSeq = seq;
    return;
  }
  const had = c.reads.get(user);
  if (!had || compareU64(seq, had) > 0) c.reads.set(user, seq);
}

/** On opening a chat: how far it was read (`read_get` about this user's newest message). */
async function loadReads(c) {
  if (c.kind === "room" || !state.client?.session) return;
  let seq = null;
  for (const m of c.msgs.values()) if (m.mine && m.seq && !m.hidden && (!seq || compareU64(m.seq, seq) > 0)) seq = m.seq;
  seq ??= newestSeq(c);
  if (seq === "0") return;
  try {
    const r = await state.client.readGet(convOf(c), c.id, seq);
    for (const p of r.reads || []) noteRead(c, p.user, p.seq);
    c.readCount = { seq, count: r.read_count };
  } catch {
    return; // read receipts are a nicety: a refusal leaves the chat as it is
  }
  if (state.current === c.key) renderMessages();
}

/** The key of the message to mark as read, and the words: "Seen" under this user's newest
 * message the peer read (1:1), "Seen by N" under this user's newest message (groups). */
function seenMark(c, entries) {
  if (c.kind === "direct") {
    const peer = c.reads.get(String(c.id));
    if (!peer) return null;
    for (let i = entries.length - 1; i >= 0; i--) {
      const [key, m] = entries[i];
      if (m.mine && m.seq && !m.recalled && !m.burned && compareU64(m.seq, peer) <= 0) return { key, text: "Seen" };
    }
    return null;
  }
  if (c.kind !== "group") return null;
  const last = [...entries].reverse().find(([, m]) => m.mine && m.seq && !m.recalled);
  if (!last) return null;
  const [key, m] = last;
  let n = 0;
  for (const [user, seq] of c.reads) if (user !== state.me && compareU64(seq, m.seq) >= 0) n++;
  // Groups of over 100 members push no receipts: the count read_get gave, if about this message.
  if (c.reads.size === 0 && c.readCount?.seq === m.seq) n = c.readCount.count;
  return n > 0 ? { key, text: `Seen by ${n}` } : null;
}

// ---- sending ----

async function sendText(c, text) {
  if (c.kind === "room") return publishToRoom(c, text);
  const clientMsgId = newClientMsgId();
  // Burn after read is for 1:1 chats only (the toggle shows there only).
  const burn = c.kind === "direct" && $("burn-check").checked;
  const entry = { clientMsgId, convKey: c.key, group: c.kind === "group", to: c.id, text, burn };
  state.outbox.set(clientMsgId, entry);
  c.msgs.set(`c${clientMsgId}`, { seq: null, from: state.me, ts: Date.now(), text, mine: true, state: "sending", clientMsgId, burn });
  renderMessages();
  await trySend(entry);
}

/** Send (or resend, with the same client_msg_id) one message of the outbox. */
async function trySend(entry) {
  const c = state.convs.get(entry.convKey);
  const local = () => c.msgs.get(`c${entry.clientMsgId}`);
  if (local()) local().state = "sending";
  try {
    const ack = await state.client.send(entry.to, entry.text, { group: entry.group, clientMsgId: entry.clientMsgId, burnAfterRead: entry.burn });
    state.outbox.delete(entry.clientMsgId);
    c.msgs.delete(`c${entry.clientMsgId}`);
    if (!c.msgs.has(`s${ack.seq}`)) {
      c.msgs.set(`s${ack.seq}`, { seq: ack.seq, from: state.me, ts: Number(ack.ts_ms), text: entry.text, mine: true, state: "sent", burn: entry.burn });
    }
    // Burned before its ack came in (the peer read it at once): the notice was kept.
    if (c.burned.delete(ack.seq)) markBurned(c, ack.seq);
    if (c.oldest === null || compareU64(ack.seq, c.oldest) < 0) c.oldest = ack.seq;
  } catch (e) {
    const l = local();
    if (e.code === ErrorCode.Closed || e.code === ErrorCode.NotConnected || e.code === ErrorCode.NoAnswer) {
      // Outcome unknown: resent with the same client_msg_id after the next login (PROTOCOL.md 8.4).
      if (l) { l.state = "unsent"; l.error = "not sent yet: resent when you log in again"; }
    } else {
      state.outbox.delete(entry.clientMsgId);
      if (l) { l.state = "failed"; l.error = `${e.codeName}: ${e.message}`; }
    }
  }
  if (state.current === c.key) renderMessages();
}

function publishToRoom(c, text) {
  if (c.closed) return flash("This room is closed.");
  const clientMsgId = state.client.roomPublish(c.id, text);
  addRoomLine(c, { from: state.me, text, mine: true, state: "published", clientMsgId });
}

function addRoomLine(c, line) {
  c.msgs.set(`n${c.nextLocal++}`, { ts: Date.now(), ...line });
  while (c.msgs.size > ROOM_MESSAGES_MAX) c.msgs.delete(c.msgs.keys().next().value);
  if (state.current === c.key) renderMessages();
  else if (!line.mine && !line.system) { c.unread++; renderLists(); }
}

// ---- history ----

async function loadHistory(c, older) {
  if (c.kind === "room" || !state.client?.session) return;
  const anchor = older && c.oldest ? c.oldest : "0";
  $("history-state").textContent = "loading…";
  try {
    const page = await state.client.history(c.kind === "group" ? Conv.GROUP : Conv.DIRECT, c.id, { anchorSeq: anchor, direction: 0, limit: HISTORY_PAGE });
    for (const m of page.messages) addStored(m, "history");
    c.historyLoaded = true;
    c.more = page.more;
    // Messages read from the store are acknowledged like received ones (PROTOCOL.md 5.8).
    if (!older && page.messages.length) scheduleAck(c);
    if (state.current === c.key) $("history-state").textContent = page.more ? "" : c.msgs.size ? "start of the conversation" : "no messages yet";
  } catch (e) {
    if (state.current === c.key) $("history-state").textContent = `history: ${e.codeName}: ${e.message}`;
  }
  if (state.current === c.key) renderMessages({ keepTop: older });
}

// ---- rendering ----

function renderLists() {
  const lists = { direct: $("direct-list"), group: $("group-list"), room: $("room-list") };
  for (const ul of Object.values(lists)) ul.replaceChildren();
  for (const c of state.convs.values()) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "conv-item";
    b.dataset.testid = "conv-item";
    b.dataset.key = c.key;
    b.dataset.kind = c.kind;
    b.dataset.id = c.id;
    if (state.current === c.key) b.classList.add("active");
    if (c.closed) b.classList.add("closed");
    const t = document.createElement("span");
    t.className = "conv-name";
    t.textContent = c.title;
    b.append(t);
    if (c.unread > 0) {
      const u = document.createElement("span");
      u.className = "unread";
      u.dataset.testid = "unread";
      u.textContent = String(c.unread);
      b.append(u);
    }
    b.addEventListener("click", () => openConv(c.key));
    li.append(b);
    lists[c.kind].append(li);
  }
}

/** Draw the lists and the open conversation once the messages that already arrived are in (a
 * catch-up brings thousands: one drawing for all of them, not one each). */
function renderSoon() {
  if (renderSoon.timer) return;
  renderSoon.timer = setTimeout(() => {
    renderSoon.timer = null;
    renderLists();
    if (state.current) renderMessages();
  }, 0);
}

function renderMessages({ keepTop = false } = {}) {
  const c = state.convs.get(state.current);
  if (!c) return;
  const box = $("messages-box");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const ol = $("messages");
  // Recall notices are kept, hidden: they show as the change of the message they recall.
  const entries = [...c.msgs.entries()].filter(([, m]) => !m.hidden);
  if (c.kind !== "room") {
    // Stored messages by seq (PROTOCOL.md 8.3: never by arrival), then those still sending.
    entries.sort(([, a], [, b]) => (a.seq && b.seq ? compareU64(a.seq, b.seq) : a.seq ? -1 : b.seq ? 1 : a.ts - b.ts));
  }
  const seen = seenMark(c, entries);
  ol.replaceChildren(...entries.map(([key, m]) => messageItem(c, key, m, seen?.key === key ? seen.text : null)));
  // The first message of a new conversation ends "no messages yet".
  const hs = $("history-state");
  if (c.kind !== "room" && entries.length && hs.textContent === "no messages yet") hs.textContent = "start of the conversation";
  $("load-older-btn").hidden = !(c.kind !== "room" && c.more);
  if (keepTop) box.scrollTop = box.scrollHeight - fromBottom;
  else if (atBottom || entries.length < 8) box.scrollTop = box.scrollHeight;
  markRead();
}

const STATE_LABEL = {
  sending: "sending…", sent: "sent", failed: "not sent", unsent: "waiting to resend",
  received: "received", acked: "received ✓", published: "published",
};

/** A long message (a large one can be megabytes): its start, its size, and a "show all" button. */
function longBody(li, body, m) {
  m.size ??= new TextEncoder().encode(m.text).length;
  li.dataset.size = String(m.size);
  li.classList.add("long");
  if (!m.expanded) body.textContent = `${m.text.slice(0, LONG_TEXT_CHARS)}…`;
  const more = document.createElement("span");
  more.className = "long-note";
  more.dataset.testid = "message-size";
  more.textContent = `${formatBytes(m.size)} message `;
  const b = document.createElement("button");
  b.type = "button";
  b.className = "show-all-btn";
  b.dataset.testid = "show-all";
  b.textContent = m.expanded ? "show less" : "show all";
  b.addEventListener("click", () => {
    m.expanded = !m.expanded;
    const box = $("messages-box");
    const top = box.scrollTop;
    renderMessages({ keepTop: true });
    box.scrollTop = top;
  });
  more.append(b);
  li.append(more);
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

function messageItem(c, key, m, seen) {
  const li = document.createElement("li");
  li.dataset.testid = "message";
  li.dataset.key = key;
  li.className = m.notice || m.system ? "msg system" : m.mine ? "msg mine" : "msg theirs";
  if (m.recalled) {
    li.classList.add("recalled");
    li.dataset.recalled = "true";
  } else if (m.burned) {
    li.classList.add("burned");
    li.dataset.burned = "true";
  }
  if (m.burn) li.dataset.burn = "true";
  if (m.seq) li.dataset.seq = m.seq;
  if (m.from) li.dataset.from = m.from;
  if (m.state) li.dataset.state = m.state;
  if (m.clientMsgId) li.dataset.clientMsgId = m.clientMsgId;
  if (!m.notice && !m.system) {
    const from = document.createElement("span");
    from.className = "from";
    from.dataset.testid = "message-from";
    from.textContent = userLabel(m.from);
    li.append(from);
  }
  const body = document.createElement("span");
  body.className = "body";
  body.dataset.testid = "message-body";
  body.textContent = m.recalled ? "message recalled" : m.burned ? "message burned" : m.text;
  li.append(body);
  if (!m.recalled && !m.burned && typeof m.text === "string" && m.text.length > LONG_TEXT_CHARS) longBody(li, body, m);
  const meta = document.createElement("span");
  meta.className = "meta";
  const when = document.createElement("time");
  when.textContent = time(m.ts);
  meta.append(when);
  if (m.burn && !m.burned && !m.recalled) {
    const f = document.createElement("span");
    f.className = "burn-mark";
    f.dataset.testid = "burn-mark";
    f.textContent = "🔥 burns after reading";
    meta.append(f);
  }
  if (m.mine && m.seq && !m.recalled && !m.burned && !m.notice && !m.system && c.kind !== "room") {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "recall-btn";
    b.dataset.testid = "recall";
    b.textContent = m.recalling ? "recalling…" : "recall";
    b.title = "Take this message back, for everyone in the chat";
    b.disabled = !!m.recalling;
    b.addEventListener("click", () => recallMessage(c, m));
    meta.append(b);
  }
  if (m.state && !m.notice && !m.system && !m.recalled && !m.burned) {
    const s = document.createElement("span");
    s.className = `state state-${m.state}`;
    s.dataset.testid = "message-state";
    s.textContent = STATE_LABEL[m.state] || m.state;
    if (m.error) s.title = m.error;
    meta.append(s);
  }
  li.append(meta);
  if (seen) {
    const s = document.createElement("span");
    s.className = "seen";
    s.dataset.testid = "seen";
    s.textContent = seen;
    li.append(s);
  }
  return li;
}

async function openConv(key) {
  const c = state.convs.get(key);
  if (!c) return;
  state.current = key;
  c.unread = 0;
  showTyping("");
  $("empty-pane").hidden = true;
  $("conv-pane").hidden = false;
  $("conv-title").textContent = c.title;
  $("conv-id").textContent = c.kind === "direct" ? `user id ${c.id}` : c.kind === "group" ? `group id ${c.id}` : `room id ${c.id}`;
  $("conv-pane").dataset.key = key;
  $("conv-pane").dataset.kind = c.kind;
  $("group-tools").hidden = c.kind !== "group";
  $("room-tools").hidden = c.kind !== "room";
  $("burn-toggle").hidden = c.kind !== "direct";
  $("burn-check").checked = false;
  $("composer-input").disabled = c.closed;
  $("send-btn").disabled = c.closed;
  $("history-state").textContent = "";
  renderLists();
  renderMessages();
  if (c.kind === "group") refreshGroupInfo(c);
  if (c.kind === "room") $("room-info").textContent = c.closed ? "closed" : c.info || "";
  if (c.kind !== "room" && !c.historyLoaded) await loadHistory(c, false);
  else if (c.kind !== "room") $("history-state").textContent = c.more ? "" : c.msgs.size ? "start of the conversation" : "no messages yet";
  loadReads(c);
  $("composer-input").focus();
}

async function refreshGroupInfo(c) {
  try {
    const info = await state.client.groupGet(c.id);
    c.title = info.profile.name || `group ${c.id}`;
    const role = { [GroupRole.FOUNDER]: "founder", [GroupRole.MANAGER]: "manager", [GroupRole.MEMBER]: "member" }[info.my_role] || "not a member";
    c.info = `${info.members} member${info.members === 1 ? "" : "s"} · you: ${role}`;
  } catch (e) {
    c.info = `${e.codeName}: ${e.message}`;
  }
  renderLists();
  if (state.current === c.key) {
    $("conv-title").textContent = c.title;
    $("group-info").textContent = c.info;
  }
}

// ---- session ----

function flash(text) {
  const f = $("flash");
  f.textContent = text;
  f.hidden = !text;
  clearTimeout(flash.timer);
  if (text) flash.timer = setTimeout(() => (f.hidden = true), 8000);
}

function setConnState(s) {
  const el = $("conn-state");
  el.dataset.state = s;
  el.textContent = s;
}

function showAuthError(text) {
  $("auth-error").textContent = text;
  $("auth-error").hidden = !text;
}

/** A connection for the auth form (a new one after a close: one connection is one session). */
async function openClient() {
  if (state.client?.connected && !state.client.session) return state.client;
  state.client?.close();
  const client = new TimClient();
  setConnState("connecting");
  await client.connect(pageUrl());
  state.client = client;
  setConnState("connected");
  wire(client);
  return client;
}

function wire(client) {
  client.on("typing_notice", (t) => {
    if (client !== state.client || t.from === state.me) return;
    const key = t.conv === Conv.GROUP ? `g:${t.to}` : `d:${t.from}`;
    if (state.current !== key) return;
    showTyping(t.state === 1 ? `${userLabel(t.from)} is typing…` : "");
  });
  client.on("read_notice", (r) => {
    if (client !== state.client) return;
    const key = r.conv === Conv.GROUP ? `g:${r.to}` : `d:${r.from === state.me ? r.to : r.from}`;
    const c = state.convs.get(key);
    if (!c) return;
    noteRead(c, r.from, r.seq);
    if (state.current === key) renderSoon();
  });
  client.on("presence_notice", (e) => {
    if (client !== state.client) return;
    applyPresence(e);
    if (e.user !== state.me) renderRoster();
  });
  client.on("roster_notice", (n) => {
    if (client !== state.client) return;
    applyRosterNotice(n);
    rosterSoon();
  });
  client.on("deliver", (msg) => {
    if (client !== state.client) return;
    if (msg.from !== state.me && $("typing").textContent.startsWith(userLabel(msg.from))) showTyping("");
    const c = addStored(msg, "live");
    scheduleAck(c);
    if (c.kind === "group" && isNotice(msg) && msg.notice?.event !== NoticeEvent.CREATED) refreshGroupInfo(c);
    renderSoon();
  });
  client.on("catch_up_end", (m) => {
    if (m.more) flash("More missed messages are waiting than one catch-up sends: open a chat and load older messages.");
    if (m.unavailable > 0) flash(`The catch-up is partial (${m.unavailable} store ranges did not answer); log in again later.`);
  });
  client.on("resync", () => flash("The server is resynchronising after a failure: messages may come again."));
  client.on("room_msg", (m) => {
    const c = conv("room", m.room_id);
    addRoomLine(c, { seq: m.seq, from: m.from, ts: Number(m.ts_ms), text: bodyText(m), mine: m.from === state.me, state: null });
  });
  client.on("room_closed", (m) => {
    const c = conv("room", m.room_id);
    c.closed = true;
    const why = { 1: "deleted by its creator", 2: "closed after no one published for a while", 3: "lost with its server node" }[m.reason] || `closed (${m.reason})`;
    addRoomLine(c, { system: true, text: `The room was ${why}.` });
    renderLists();
    if (state.current === c.key) openConv(c.key);
  });
  client.on("missed", (m) => {
    if (m.source === 1) addRoomLine(conv("room", m.source_id), { system: true, text: `${m.count} message(s) missed: the page read too slowly.` });
  });
  client.on("broadcast", (m) => {
    const b = $("broadcast");
    b.textContent = `Announcement: ${bodyText(m)}`;
    b.hidden = false;
  });
  client.on("group_join_request", (m) => flash(`${userLabel(m.request.user_id)} asks to join group ${m.group_id}${m.request.note ? `: “${m.request.note}”` : ""}`));
  client.on("group_decision", (m) => {
    flash(m.approved ? `You were let into group ${m.group_id}.` : `Your request to join group ${m.group_id} was turned down.`);
    if (m.approved) refreshGroupInfo(conv("group", m.group_id));
  });
  client.on("error", (e) => {
    if (client !== state.client) return;
    if (e.code === ErrorCode.LoginTimeout && !client.session) return; // the form reconnects on use
    flash(`${e.codeName}: ${e.message}`);
  });
  client.on("close", (d) => {
    if (client !== state.client) return;
    state.client = null;
    setConnState("offline");
    if (!d.wasLoggedIn) return;
    const why = d.kick ? `${d.kick.reason_name}: ${d.kick.message}` : d.error ? `${d.error.code_name}: ${d.error.message}` : `connection closed (${d.code})`;
    leaveChatView(state.loggingOut ? "" : `Disconnected — ${why}. Log in again to go on${state.outbox.size ? "; unsent messages will be sent then" : ""}.`);
  });
}

async function authenticate(register) {
  const name = $("auth-name").value.trim();
  const password = $("auth-password").value;
  showAuthError("");
  if (!name || password.length < 8) return showAuthError("A name and a password of 8 characters or more, please.");
  localStorage.setItem("tim.last_name", name);
  for (const b of [$("login-btn"), $("register-btn")]) b.disabled = true;
  try {
    let client = await openClient();
    if (register) {
      try {
        await client.register(name, password);
      } catch (e) {
        if (e.code !== ErrorCode.Closed) throw e;
        client = await openClient(); // login timeout while typing: once more on a new connection
        await client.register(name, password);
      }
    }
    let ok;
    try {
      ok = await client.login(name, password, { deviceType: DeviceType.WEB, deviceId: deviceId() });
    } catch (e) {
      if (e.code !== ErrorCode.Closed && e.code !== ErrorCode.NotConnected) throw e;
      client = await openClient();
      ok = await client.login(name, password, { deviceType: DeviceType.WEB, deviceId: deviceId() });
    }
    await enterChatView(ok, name);
  } catch (e) {
    showAuthError(e instanceof TimError ? `${e.codeName}: ${e.message}` : String(e.message || e));
    if (!state.client?.session) setConnState(state.client?.connected ? "connected" : "offline");
  } finally {
    for (const b of [$("login-btn"), $("register-btn")]) b.disabled = false;
  }
}

async function enterChatView(ok, name) {
  if (state.me !== ok.user_id) {
    // Another account than before on this page: start clean.
    state.convs.clear();
    state.outbox.clear();
    state.current = null;
    state.roster = emptyRoster();
    state.presence.clear();
  } else {
    // The same account again: a new session, so live rooms are gone and history is re-read.
    for (const [k, c] of state.convs) {
      if (c.kind === "room") state.convs.delete(k);
      else c.historyLoaded = false;
    }
    if (state.current?.startsWith("r:")) state.current = null;
  }
  state.me = ok.user_id;
  state.name = name;
  state.loggingOut = false;
  setConnState("online");
  $("my-name").textContent = name;
  $("my-user-id").textContent = ok.user_id;
  $("empty-my-id").textContent = ok.user_id;
  $("me").hidden = false;
  $("logout-btn").hidden = false;
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("auth-password").value = "";
  loadContacts();
  renderLists();
  if (state.current) openConv(state.current);
  else {
    $("empty-pane").hidden = false;
    $("conv-pane").hidden = true;
  }
  // Sends whose outcome the last connection did not tell: again, with the same client_msg_id.
  for (const entry of state.outbox.values()) trySend(entry);
  renderRoster();
  try {
    for (const g of await state.client.myGroupsAll()) refreshGroupInfo(conv("group", g));
  } catch (e) {
    flash(`groups: ${e.codeName}: ${e.message}`);
  }
  try {
    await loadPresence([ok.user_id]);
  } catch (e) {
    flash(`presence: ${e.codeName}: ${e.message}`);
  }
  try {
    await loadRoster();
  } catch (e) {
    flash(`friends: ${e.codeName}: ${e.message}`);
  }
  try {
    const direct = [...state.convs.values()].filter((c) => c.kind === "direct").map((c) => c.id);
    await loadNicknames([state.me, ...direct]);
  } catch (e) {
    flash(`profiles: ${e.codeName}: ${e.message}`);
  }
}

function leaveChatView(message) {
  $("chat-view").hidden = true;
  $("auth-view").hidden = false;
  $("me").hidden = true;
  $("logout-btn").hidden = true;
  showAuthError(message);
  for (const c of state.convs.values()) for (const m of c.msgs.values()) if (m.state === "sending") m.state = "unsent";
  $("auth-password").focus();
}

// ---- forms ----

function onSubmit(id, fn) {
  $(id).addEventListener("submit", (e) => {
    e.preventDefault();
    fn(e);
  });
}

function idFrom(inputId) {
  const el = $(inputId);
  try {
    const v = u64(el.value);
    if (v === "0") throw new RangeError("0");
    return v;
  } catch {
    flash("An id is a number, like the one shown next to “your user id”.");
    return null;
  }
}

function setup() {
  state.roster = emptyRoster();
  $("auth-name").value = localStorage.getItem("tim.last_name") || "";
  onSubmit("auth-form", () => authenticate(false));
  $("register-btn").addEventListener("click", () => {
    if ($("auth-form").reportValidity()) authenticate(true);
  });
  $("logout-btn").addEventListener("click", async () => {
    state.loggingOut = true;
    const client = state.client;
    try {
      await client?.logout();
    } catch {
      client?.close();
    }
    state.convs.clear();
    state.outbox.clear();
    state.current = null;
    state.me = null;
    state.roster = emptyRoster();
    leaveChatView("");
  });

  onSubmit("new-chat-form", () => {
    const id = idFrom("new-chat-id");
    if (!id) return;
    $("new-chat-id").value = "";
    openConv(conv("direct", id).key);
  });

  onSubmit("presence-form", async () => {
    if (!state.client?.session) return;
    try {
      const list = await state.client.presenceSet(Number($("presence-state").value), $("presence-text").value.trim());
      for (const e of list.entries) applyPresence(e);
    } catch (e) {
      flash(`status: ${e.codeName}: ${e.message}`);
    }
  });

  $("presence-state").addEventListener("change", () => $("presence-form").requestSubmit());

  onSubmit("add-friend-form", async () => {
    const id = idFrom("add-friend-id");
    if (!id) return;
    const note = $("add-friend-note").value.trim();
    $("add-friend-id").value = "";
    $("add-friend-note").value = "";
    await rosterDo(RosterAction.REQUEST, id, note);
  });

  onSubmit("add-watch-form", async () => {
    const id = idFrom("add-watch-id");
    if (!id) return;
    $("add-watch-id").value = "";
    await rosterDo(RosterAction.WATCH, id);
  });

  onSubmit("new-group-form", async () => {
    const name = $("new-group-name").value.trim();
    if (!name) return;
    try {
      const ok = await state.client.groupCreate({ name });
      $("new-group-name").value = "";
      const c = conv("group", ok.group_id);
      c.title = name;
      await openConv(c.key);
    } catch (e) {
      flash(`create group: ${e.codeName}: ${e.message}`);
    }
  });

  onSubmit("join-group-form", async () => {
    const id = idFrom("join-group-id");
    if (!id) return;
    try {
      const ok = await state.client.groupAction(id, 1 /* JOIN */);
      $("join-group-id").value = "";
      if (ok.seq === "0") flash("Join request sent: a manager of the group decides.");
      else openConv(conv("group", id).key);
    } catch (e) {
      flash(`join group: ${e.codeName}: ${e.message}`);
    }
  });

  onSubmit("add-member-form", async () => {
    const c = state.convs.get(state.current);
    const id = idFrom("add-member-id");
    if (!c || c.kind !== "group" || !id) return;
    try {
      await state.client.groupAddMembers(c.id, [id]);
      $("add-member-id").value = "";
      refreshGroupInfo(c);
    } catch (e) {
      flash(`add member: ${e.codeName}: ${e.message}`);
    }
  });

  $("room-create-btn").addEventListener("click", async () => {
    try {
      // Anyone subscribed may publish: a room for everyone who joins it by id.
      const ok = await state.client.roomCreate({ publish: RoomPublishPolicy.SUBSCRIBERS });
      const sub = await state.client.roomSubscribe(ok.room_id);
      const c = conv("room", ok.room_id);
      c.info = `${sub.subscribers} in the room · give others the room id to join`;
      await openConv(c.key);
    } catch (e) {
      flash(`create room: ${e.codeName}: ${e.message}`);
    }
  });

  onSubmit("room-join-form", async () => {
    const id = idFrom("room-join-id");
    if (!id) return;
    try {
      const sub = await state.client.roomSubscribe(id);
      $("room-join-id").value = "";
      const c = conv("room", id);
      c.closed = false;
      c.info = `${sub.subscribers} in the room`;
      await openConv(c.key);
    } catch (e) {
      flash(`join room: ${e.codeName}: ${e.message}`);
    }
  });

  $("room-leave-btn").addEventListener("click", async () => {
    const c = state.convs.get(state.current);
    if (!c || c.kind !== "room") return;
    try {
      if (!c.closed) await state.client.roomUnsubscribe(c.id);
    } catch (e) {
      if (e.code !== ErrorCode.RoomNotFound) flash(`leave room: ${e.codeName}: ${e.message}`);
    }
    state.convs.delete(c.key);
    state.current = null;
    $("conv-pane").hidden = true;
    $("empty-pane").hidden = false;
    renderLists();
  });

  $("load-older-btn").addEventListener("click", () => {
    const c = state.convs.get(state.current);
    if (c) loadHistory(c, true);
  });

  onSubmit("composer", () => {
    const c = state.convs.get(state.current);
    const input = $("composer-input");
    const text = input.value;
    if (!c || !text.trim() || !state.client?.session) return;
    input.value = "";
    state.typingSentAt = 0;
    sendText(c, text);
  });
  $("composer-input").addEventListener("input", typed);
  document.addEventListener("visibilitychange", markRead);
  onSubmit("nickname-form", async () => {
    if (!state.client?.session) return;
    try {
      const saved = await state.client.profileUpdate({ nickname: $("nickname").value.trim() });
      const nick = saved.profiles[0].profile.nickname;
      if (nick) state.nicknames.set(state.me, nick);
      else state.nicknames.delete(state.me);
      flash(nick ? `Your nickname is now “${nick}”.` : "Your nickname is cleared.");
    } catch (e) {
      flash(`${e.codeName}: ${e.message}`);
    }
  });
  $("sessions-btn").addEventListener("click", async () => {
    if (!state.client?.session) return;
    try {
      await showSessions(await state.client.mySessions());
    } catch (e) {
      flash(`${e.codeName}: ${e.message}`);
    }
  });
  $("composer-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
}

setup();
