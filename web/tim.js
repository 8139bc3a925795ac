// tim.js — a client for tim's protocol v1 in JSON over a WebSocket (docs/JSON.md), for browsers
// and any JavaScript runtime with a standard WebSocket. One plain ES module: no build step, no
// dependencies. API reference and examples: docs/CLIENTS.md.
//
// Shape: a `TimClient` is one connection = one session (PROTOCOL.md 8.1). Requests return
// promises matched to their answers by request id (JSON.md 5); pushes (deliveries, room
// messages, kicks, ...) are events. Results are the server's messages exactly as docs/JSON.md
// writes them (snake_case members, every u64 as a decimal string). Ids are strings throughout:
// never pass a user, group, room or message id through Number.

/** Conversation kinds (`conv`). */
export const Conv = Object.freeze({ DIRECT: 1, GROUP: 2 });

/** `device_type` of login (PROTOCOL.md 4). */
export const DeviceType = Object.freeze({ OTHER: 0, MOBILE: 1, TABLET: 2, DESKTOP: 3, WEB: 4 });

/** `action` of groupAction (PROTOCOL.md 5.13). */
export const GroupAction = Object.freeze({
  JOIN: 1, LEAVE: 2, INVITE: 3, KICK: 4, APPROVE: 5, REJECT: 6, ADD_MANAGER: 7,
  REMOVE_MANAGER: 8, TRANSFER: 9, MUTE: 10, MUTE_ALL: 11, BLOCK: 12, UNBLOCK: 13, DISSOLVE: 14,
});

/** `notice.event` of a group notice (PROTOCOL.md 7.3). */
export const NoticeEvent = Object.freeze({
  CREATED: 1, JOINED: 2, LEFT: 3, KICKED: 4, ADDED: 5, MANAGER_ADDED: 6, MANAGER_REMOVED: 7,
  TRANSFERRED: 8, MUTED: 9, MUTED_ALL: 10, PROFILE_CHANGED: 11, BLOCKED: 12, DISSOLVED: 13,
  UNBLOCKED: 14, MEMBERS_ADDED: 15,
});

/** `my_role` / member `role` in group answers. */
export const GroupRole = Object.freeze({ MEMBER: 0, MANAGER: 1, FOUNDER: 2, NOT_MEMBER: 255 });

/** `flags` of a message (JSON.md 3.1, 4.3): a recall notice has RECALL. */
export const SendFlags = Object.freeze({ BURN_AFTER_READ: 1, RECALL: 2, BURNED: 4 });

/** `state` of a stored message (JSON.md 4.3): a tombstone's is not PLAIN. */
export const MsgState = Object.freeze({ PLAIN: 0, RECALLED: 1, BURNED: 2 });

/**
 * `action` of rosterAction, and `event` of a `roster_notice` (JSON.md 3.4). REQUEST to CANCEL
 * are about friendship; WATCH to REVOKE about presence watches (PROTOCOL.md 5.20): seeing a
 * user's presence without being friends, once that user allows it (one way).
 */
export const RosterAction = Object.freeze({
  REQUEST: 1, ACCEPT: 2, REJECT: 3, REMOVE: 4, BLOCK: 5, UNBLOCK: 6, CANCEL: 7,
  /** Ask to see a user's presence (again while pending: a reminder). */
  WATCH: 8,
  /** Let a user who asked see this user's presence (it is told it at once, and every change). */
  ALLOW: 9,
  /** Turn a user's watch request down. */
  DENY: 10,
  /** Stop watching a user's presence, or withdraw this user's own watch request. */
  UNWATCH: 11,
  /** Stop a user watching this user's presence. */
  REVOKE: 12,
});

/**
 * `list` of rosterGet (JSON.md 3.4): friends, friend requests to and from this user, blocked
 * users; then the watches: WATCHERS (users who see this user's presence), WATCHING (users whose
 * presence this user sees), and watch requests to (WATCH_INCOMING) and from (WATCH_OUTGOING) it.
 */
export const RosterList = Object.freeze({
  FRIENDS: 0, INCOMING: 1, OUTGOING: 2, BLOCKED: 3,
  WATCHERS: 4, WATCHING: 5, WATCH_INCOMING: 6, WATCH_OUTGOING: 7,
});

/** `state` of presenceSet and of presence entries (PROTOCOL.md 5.21). OFFLINE is
 * only ever reported; INVISIBLE shows as OFFLINE to others (only one's own entry says INVISIBLE). */
export const PresenceState = Object.freeze({ OFFLINE: 0, ONLINE: 1, AWAY: 2, BUSY: 3, INVISIBLE: 4 });

/** `publish` policy of roomCreate (PROTOCOL.md 5.11). */
export const RoomPublishPolicy = Object.freeze({ CREATOR: 0, LISTED: 1, SUBSCRIBERS: 2 });

/**
 * Error codes (PROTOCOL.md 9) a client commonly switches on, plus this module's own, which are
 * negative: the server never sends them.
 */
export const ErrorCode = Object.freeze({
  Malformed: 1, UnknownKind: 2, NotLoggedIn: 10, AlreadyLoggedIn: 11, UnknownUser: 12,
  WrongPassword: 13, NameTaken: 14, InvalidName: 15, InvalidPassword: 16, InvalidToken: 17,
  UnknownRecipient: 30, InvalidConversation: 31, Busy: 33, BodyTooLarge: 34, NotRecallable: 35, RecallExpired: 36,
  BurnNotAllowed: 37,
  LoginTimeout: 40, IdleTimeout: 41,
  Replaced: 42, ShuttingDown: 43, RateLimited: 47, KickedByOperator: 48, Banned: 49, UnknownSession: 21, InvalidProfile: 22, LoggedOutElsewhere: 54, Internal: 50, StoreUnavailable: 51,
  Timeout: 52, RoomNotFound: 60, GroupNotFound: 70, NotMember: 71, NotManager: 72, Muted: 73,
  Blocked: 90, NotFriends: 91, AlreadyFriends: 92, NoFriendRequest: 93, TooManyFriends: 94, InvalidRoster: 95,
  InvalidPresence: 96, AlreadyWatching: 97, NoWatch: 98,
  // This module's own:
  /** The connection closed before the answer came. */
  Closed: -1,
  /** No answer within the client's request timeout. */
  NoAnswer: -2,
  /** The client is not connected (never was, or closed). */
  NotConnected: -3,
});

const CLIENT_CODE_NAMES = { [-1]: "Closed", [-2]: "NoAnswer", [-3]: "NotConnected" };

/** Send refusals after which the same message is sent again, with the same client_msg_id. */
const SEND_RETRY_CODES = new Set([ErrorCode.Busy, ErrorCode.StoreUnavailable, ErrorCode.Timeout]);

/** v1 kind of `send_part` (JSON.md 3.1): refusals of a large message's chunks carry it. */
const PART_KIND = 27;

/** Bytes a `send_part` chunk may have beside `frame_bytes_max` (JSON.md 3.1: chunk size). */
const PART_CHUNK_OVERHEAD = 64;

/** While the socket holds this many bytes unsent, a large message's next chunk waits. */
const LARGE_BUFFERED_MAX = 1 << 20;

/**
 * A refusal: the server's `error` message (JSON.md 4.2), or one of this module's own failures
 * (negative `code`). `code` is the number to switch on; `codeName` its name, for logs.
 */
export class TimError extends Error {
  constructor({ code, code_name, codeName, message, request_kind, requestKind, client_msg_id, clientMsgId, id } = {}) {
    super(message || codeName || code_name || "error");
    this.name = "TimError";
    this.code = code ?? 0;
    this.codeName = codeName ?? code_name ?? CLIENT_CODE_NAMES[this.code] ?? "Unknown";
    this.requestKind = requestKind ?? request_kind ?? 0;
    this.clientMsgId = clientMsgId ?? client_msg_id ?? "0";
    this.id = id;
  }
}

/** A u64 for a request: a decimal string (from a string, a BigInt or a safe integer). */
export function u64(v) {
  if (typeof v === "bigint") {
    if (v < 0n || v > 0xffffffffffffffffn) throw new RangeError(`not a u64: ${v}`);
    return v.toString();
  }
  if (typeof v === "number") {
    if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`not a safe u64: ${v}`);
    return String(v);
  }
  const s = String(v ?? "").trim();
  if (!/^\d{1,20}$/.test(s) || BigInt(s) > 0xffffffffffffffffn) throw new RangeError(`not a u64: ${JSON.stringify(v)}`);
  return BigInt(s).toString(); // canonical: no leading zeros
}

/** Compare two u64 decimal strings (for sorting by seq): negative, 0 or positive. */
export function compareU64(a, b) {
  const x = BigInt(a), y = BigInt(b);
  return x < y ? -1 : x > y ? 1 : 0;
}

/** A fresh client_msg_id: 63 random bits, never 0 (PROTOCOL.md 8.4), as a decimal string. */
export function newClientMsgId() {
  const a = new BigUint64Array(1);
  do crypto.getRandomValues(a); while ((a[0] & 0x7fffffffffffffffn) === 0n);
  return (a[0] & 0x7fffffffffffffffn).toString();
}

/** The other side of a message's conversation: the group for conv 2, else the user who is not `me`. */
export function peerOf(msg, me) {
  if (msg.conv === Conv.GROUP) return msg.to;
  return msg.from === String(me) ? msg.to : msg.from;
}

/** Whether a message is a group notice (JSON.md 4.3). */
export function isNotice(msg) {
  return msg.conv === Conv.GROUP && msg.from === "0";
}

/** The seq a recall notice takes back (a string), or null for any other message. */
export function recalledSeq(msg) {
  return (msg.flags & SendFlags.RECALL) !== 0 && typeof msg.recall_seq === "string" ? msg.recall_seq : null;
}

/** Whether a message is a recall notice (JSON.md 4.3): it changes another message, and is no message to show. */
export function isRecall(msg) {
  return recalledSeq(msg) !== null;
}

/** Whether a message was recalled: a tombstone (`state` RECALLED), its body gone. */
export function isRecalled(msg) {
  return msg.state === MsgState.RECALLED;
}

/** Whether a message was burned after reading: a tombstone (`state` BURNED), its body gone. */
export function isBurned(msg) {
  return msg.state === MsgState.BURNED;
}

/** The seqs a burn notice says were burned (strings), or null for any other message. */
export function burnedSeqs(msg) {
  return (msg.flags & SendFlags.BURNED) !== 0 && Array.isArray(msg.burned_seqs) ? msg.burned_seqs : null;
}

/** Whether a message is a burn notice (JSON.md 4.3): it changes other messages, and is no message to show. */
export function isBurnNotice(msg) {
  return burnedSeqs(msg) !== null;
}

/** The text of a message body (`body`, or `body_b64` decoded as UTF-8 with replacement). */
export function bodyText(msg) {
  if (typeof msg.body === "string") return msg.body;
  if (typeof msg.body_b64 === "string") return new TextDecoder().decode(b64decode(msg.body_b64));
  return "";
}

/** The bytes of a message body. */
export function bodyBytes(msg) {
  if (typeof msg.body === "string") return new TextEncoder().encode(msg.body);
  if (typeof msg.body_b64 === "string") return b64decode(msg.body_b64);
  return new Uint8Array(0);
}

function b64decode(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function b64encode(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

/** `body` or `body_b64` for a request: a string is sent as text, bytes as base64. */
function bodyFields(body) {
  if (body == null) return {};
  if (typeof body === "string") return { body };
  if (body instanceof Uint8Array) return { body_b64: b64encode(body) };
  if (body instanceof ArrayBuffer) return { body_b64: b64encode(new Uint8Array(body)) };
  throw new TypeError("body: a string or a Uint8Array");
}

function profileFields(p = {}) {
  const out = {};
  for (const k of ["name", "topic", "avatar_url", "join_policy", "invite_policy"]) if (p[k] !== undefined) out[k] = p[k];
  if (p.avatarUrl !== undefined) out.avatar_url = p.avatarUrl;
  if (p.joinPolicy !== undefined) out.join_policy = p.joinPolicy;
  if (p.invitePolicy !== undefined) out.invite_policy = p.invitePolicy;
  if (p.extra !== undefined) Object.assign(out, typeof p.extra === "string" ? { extra: p.extra } : { extra_b64: b64encode(p.extra) });
  return out;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Server message types that are pushes: they never answer a request. */
const PUSH_TYPES = new Set([
  "deliver", "stream_msg", "catch_up_end", "resync", "broadcast", "kick", "room_msg",
  "room_closed", "missed", "group_join_request", "group_decision", "typing_notice", "read_notice",
  "roster_notice", "presence_notice",
]);

/** Message types whose `flags` and `state` are filled in as 0 when the server leaves them out. */
const MESSAGE_TYPES = new Set(["deliver", "history_msg", "stream_msg"]);

/**
 * One connection to a tim server, speaking JSON. Events (`addEventListener`, or `on`), each a
 * CustomEvent whose `detail` is the server message unless said otherwise:
 *
 * - `deliver`: a message (live, or of the catch-up after login); group notices carry `notice`,
 *   recall notices `recall_seq` (`isRecall`), recalled messages `state` 1 (`isRecalled`).
 * - `catch_up_end`, `resync`, `stream_msg`, `room_msg`, `room_closed`, `missed`, `broadcast`,
 *   `group_join_request`, `group_decision`, `kick` (the server closes after it).
 * - `typing_notice`: someone types (`from`, `to`, `conv`, `state`).
 * - `read_notice`: someone read a conversation up to `seq` (`from` the reader, `to` the other
 *   user or the group, `conv`): the peer, a group member, or this user on another device.
 * - `roster_notice`: a friendship or a presence watch changed (`event` a RosterAction: REQUEST,
 *   ACCEPT, REJECT, REMOVE, CANCEL, WATCH, ALLOW, DENY, UNWATCH or REVOKE, and BLOCK or UNBLOCK
 *   from this user's other devices; `from` who acted, `to` the other user, `note` a request's):
 *   another user acting on this one, or this user on another device. A blocked user is never
 *   told of the block, only of what it lost (REMOVE, REJECT, CANCEL, REVOKE, DENY, UNWATCH).
 * - `presence_notice`: one presence entry (`user`, `state` a PresenceState, `since_ms`, `text`,
 *   `extra` or `extra_b64`): the presence of a friend or of a user this one watches changed
 *   (coalesced over 250 ms; also told at once after an ACCEPT or ALLOW), or this user's own,
 *   set from another session.
 * - `error`: a TimError (`detail`) that answers no pending request: connection-level errors
 *   (IdleTimeout, LoginTimeout, SlowConsumer ...), catch-up failures (request kind 2), refusals
 *   of `deliveryAck`, `read` (request kind 16), `typing`, `stream` and `roomPublish`.
 * - `close`: `detail` = `{code, reason, wasClean, kick, error}`: the WebSocket close, with the
 *   `kick` or closing `error` message that said why, if one came.
 * - `message`: every server message, before it is dispatched (for logging).
 */
export class TimClient extends EventTarget {
  /**
   * @param {object} [options]
   * @param {number} [options.requestTimeoutMs=40000] reject a request with NoAnswer after this
   *   (the server answers within its answer_timeout_ms, 30 s by default).
   * @param {number} [options.connectTimeoutMs=10000]
   * @param {number} [options.sendRetries=3] resends of a send refused Busy, StoreUnavailable or
   *   Timeout (with the same client_msg_id, PROTOCOL.md 8.4), with backoff.
   */
  constructor(options = {}) {
    super();
    this.requestTimeoutMs = options.requestTimeoutMs ?? 40000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this.sendRetries = options.sendRetries ?? 3;
    /** The `login_ok` message once logged in, else null. */
    this.session = null;
    /** The logged-in user's id (a string), else null. */
    this.userId = null;
    this.ws = null;
    this._nextId = 1;
    /** Pending requests by request id. */
    this._pending = new Map();
    /** Sends waiting for their answer, by client_msg_id: {conv, to, body, clientMsgId}. */
    this._inflight = new Map();
    /** Sends held back while `inflight_max` are unanswered (the server would stop reading). */
    this._held = [];
    this._pingTimer = null;
    this._lastSentAt = 0;
    this._closing = { kick: null, error: null };
    /** Large messages go one at a time: the last one's upload and answer. */
    this._largeChain = Promise.resolve();
  }

  /** Subscribe to an event; returns a function that unsubscribes. `fn` gets `event.detail`. */
  on(type, fn) {
    const h = (e) => fn(e.detail);
    this.addEventListener(type, h);
    return () => this.removeEventListener(type, h);
  }

  /** True while the WebSocket is open. */
  get connected() {
    return this.ws !== null && this.ws.readyState === 1;
  }

  /** Open the WebSocket (subprotocol `tim.json`). Resolves with this client once open. */
  connect(url) {
    if (this.ws) return Promise.reject(new Error("connect: already connected (one connection per client)"));
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, "tim.json");
      this.ws = ws;
      const timer = setTimeout(() => {
        ws.close();
        reject(new TimError({ code: ErrorCode.NoAnswer, message: `connect: no answer from ${url}` }));
      }, this.connectTimeoutMs);
      ws.onopen = () => {
        clearTimeout(timer);
        resolve(this);
      };
      ws.onmessage = (e) => this._onText(e.data);
      ws.onerror = () => {}; // a close event follows with what there is to know
      ws.onclose = (e) => {
        clearTimeout(timer);
        reject(new TimError({ code: ErrorCode.Closed, message: `connect: closed (${e.code})` }));
        this._onClose(e);
      };
    });
  }

  /** Close the connection without logging out. */
  close() {
    if (this.ws) this.ws.close(1000);
  }

  // ---- accounts and sessions ----

  /** Create an account. Resolves with `register_ok` (`user_id`). Does not log in. */
  register(name, password) {
    return this._request({ op: "register", name, password });
  }

  /**
   * Log in (once per connection). Resolves with `login_ok`; on a durable store the catch-up
   * follows as `deliver` events and one `catch_up_end`. Starts the keep-alive pings.
   */
  async login(name, password, { deviceType = DeviceType.WEB, deviceId = "" } = {}) {
    const ok = await this._request({ op: "login", name, password, device_type: deviceType, device_id: deviceId });
    return this._loggedIn(ok);
  }

  /** Log in with a one-shot token (from `issueToken`). As `login`. */
  async loginToken(token, { deviceType = DeviceType.WEB, deviceId = "" } = {}) {
    const ok = await this._request({ op: "login_token", token, device_type: deviceType, device_id: deviceId });
    return this._loggedIn(ok);
  }

  /** A one-shot login token. Resolves with `token_issued` (`token`, `expires_at_ms`). */
  issueToken(ttlSecs = 0) {
    return this._request({ op: "issue_token", ttl_secs: ttlSecs });
  }

  /** Resolves with `pong`. */
  ping(nonce = 0) {
    return this._request({ op: "ping", nonce: u64(nonce) });
  }

  /** End the session. Resolves with `bye`; the server then closes the connection. */
  logout() {
    return this._request({ op: "logout" });
  }

  // ---- messages ----

  /**
   * Send a message to a user (or, with `{group: true}`, to a group). Resolves with the
   * `send_ack` (`msg_id`, `seq`, `ts_ms`, `duplicate`); rejects with a TimError whose
   * `clientMsgId` names the message. `body`: a string, or a Uint8Array of bytes.
   * `clientMsgId`: give the id of an earlier attempt to resend it (after a reconnect); left out,
   * a fresh one is drawn. `onId(clientMsgId)` is called at once with the id used.
   * Refusals Busy, StoreUnavailable and Timeout are retried `sendRetries` times.
   * `burnAfterRead: true` (or `flags: SendFlags.BURN_AFTER_READ`; 1:1 only, else
   * BurnNotAllowed) makes it burn once the peer reads it, or `burnSecs` after it was sent.
   * A body over the server's `body_bytes_max` (login_ok) goes as a large message, in
   * `send_part` chunks (JSON.md 3.1), up to `large_body_bytes_max` (8 MiB by default; longer
   * ones are refused here with BodyTooLarge); large messages are sent one at a time, and the
   * request timeout counts from the last chunk. Recipients get it whole, like any message.
   */
  send(to, body, { group = false, clientMsgId, onId, flags = 0, burnAfterRead = false, burnSecs = 0 } = {}) {
    const extra = {};
    if (burnAfterRead) flags |= SendFlags.BURN_AFTER_READ;
    if (flags) extra.flags = flags;
    if (burnSecs) extra.burn_secs = burnSecs;
    const m = {
      op: "send",
      conv: group ? Conv.GROUP : Conv.DIRECT,
      to: u64(to),
      clientMsgId: clientMsgId !== undefined ? u64(clientMsgId) : newClientMsgId(),
      fields: extra,
    };
    if (onId) onId(m.clientMsgId);
    const large = this._largeBytes(body);
    if (large === null) {
      Object.assign(m.fields, bodyFields(body));
    } else {
      const max = this.session.large_body_bytes_max;
      if (large.length > max) {
        return Promise.reject(new TimError({
          code: ErrorCode.BodyTooLarge, codeName: "BodyTooLarge", requestKind: 6, clientMsgId: m.clientMsgId,
          message: `send: a body of ${large.length} bytes, over the server's large_body_bytes_max (${max})`,
        }));
      }
      m.op = "send_part";
      m.bytes = large;
    }
    return this._sendWithRetries(m);
  }

  /**
   * A body's bytes when it is too long for one `send` (over `body_bytes_max`) and the server
   * takes large messages (`large_body_bytes_max` > 0): it then goes in `send_part` chunks
   * (JSON.md 3.1). Else null: a plain `send`.
   */
  _largeBytes(body) {
    const small = this.session?.body_bytes_max ?? 32768;
    if (!this.session?.large_body_bytes_max || body == null) return null;
    let bytes;
    if (typeof body === "string") {
      // At most 3 UTF-8 bytes per UTF-16 unit: shorter strings are surely small.
      if (body.length * 3 <= small) return null;
      bytes = new TextEncoder().encode(body);
    } else if (body instanceof Uint8Array) {
      bytes = body;
    } else if (body instanceof ArrayBuffer) {
      bytes = new Uint8Array(body);
    } else {
      return null; // bodyFields refuses it
    }
    return bytes.length > small ? bytes : null;
  }

  /**
   * Take back message `seq` of a conversation (`conv`: Conv.DIRECT with the peer's user id as
   * `to`, or Conv.GROUP with the group id): your own message, or in a group anyone's if you
   * manage it. Resolves with the recall's `send_ack` (the recall notice's own `seq`); rejects
   * with a TimError: NotRecallable (35), RecallExpired (36), or a send's refusals. The peer and
   * your other sessions get the recall notice as a `deliver` (`isRecall`). Retried and
   * resendable with `{clientMsgId}` as `send` is.
   */
  recall(conv, to, seq, { clientMsgId, onId } = {}) {
    const m = {
      op: "recall",
      conv,
      to: u64(to),
      clientMsgId: clientMsgId !== undefined ? u64(clientMsgId) : newClientMsgId(),
      fields: { seq: u64(seq) },
    };
    if (onId) onId(m.clientMsgId);
    return this._sendWithRetries(m);
  }

  /**
   * Acknowledge every message of a conversation up to `seq` for this device (PROTOCOL.md 5.8).
   * No answer; a refusal comes as an `error` event. `peer`: the other user (conv 1) or the group.
   */
  deliveryAck(conv, peer, seq) {
    this._post({ op: "delivery_ack", conv, peer: u64(peer), seq: u64(seq) });
  }

  /**
   * One page of a conversation's stored messages (PROTOCOL.md 5.10). Resolves with
   * `{messages, more, count, conv, peer}`: `messages` are the `history_msg`s in the page's
   * order (older: newest first; newer: oldest first). `direction`: 0 older, 1 newer.
   */
  async history(conv, peer, { anchorSeq = 0, direction = 0, limit = 0 } = {}) {
    const messages = [];
    const end = await this._request(
      { op: "history", conv, peer: u64(peer), anchor_seq: u64(anchorSeq), direction, limit },
      (m) => messages.push(m),
    );
    return { messages, more: end.more, count: end.count, conv: end.conv, peer: end.peer };
  }

  /**
   * Tell that this device has read a conversation up to `seq` (PROTOCOL.md 5.18): `conv`
   * Conv.DIRECT with the other user as `peer`, or Conv.GROUP with the group. No answer; a
   * refusal comes as an `error` event (request kind 16). The peer (or, in a group of up to 100
   * members, the members) and this user's other sessions get a `read_notice`.
   */
  read(conv, peer, seq) {
    this._post({ op: "read", conv, peer: u64(peer), seq: u64(seq) });
  }

  /**
   * How far a conversation was read, asked about message `seq`. Resolves with `read_state`:
   * `read_count` users other than you read `seq`, of `member_count` (1 in a 1:1 chat); `reads`
   * holds `{user, seq}` positions: both users (1:1) or every member (groups of up to 100).
   */
  readGet(conv, peer, seq) {
    return this._request({ op: "read_get", conv, peer: u64(peer), seq: u64(seq) });
  }

  /** A stream message (never stored; typing indicators and such, PROTOCOL.md 5.12). No answer. */
  stream(to, body, { group = false, clientMsgId } = {}) {
    const id = clientMsgId !== undefined ? u64(clientMsgId) : newClientMsgId();
    this._post({ op: "stream", conv: group ? Conv.GROUP : Conv.DIRECT, to: u64(to), client_msg_id: id, ...bodyFields(body) });
    return id;
  }

  // ---- groups (PROTOCOL.md 5.13, 8.15) ----

  /** Create a group. `profile`: {name, topic, avatar_url, extra, join_policy, invite_policy}. Resolves with `group_ok` (`group_id`). */
  groupCreate(profile = {}) {
    return this._request({ op: "group_create", profile: profileFields(profile) });
  }

  /** Replace a group's profile (fields left out become empty). Resolves with `group_ok`. */
  groupUpdate(groupId, profile = {}) {
    return this._request({ op: "group_update", group_id: u64(groupId), profile: profileFields(profile) });
  }

  /** Resolves with `group_info` (`profile`, `founder`, `members`, `my_role`, ...). */
  groupGet(groupId) {
    return this._request({ op: "group_get", group_id: u64(groupId) });
  }

  /** One page of members. Resolves with `group_member_page` (`members`, `more`). */
  groupMembers(groupId, { afterUser = 0, limit = 0 } = {}) {
    return this._request({ op: "group_members", group_id: u64(groupId), after_user: u64(afterUser), limit });
  }

  /** One page of the caller's groups. Resolves with `group_list` (`groups`: ids, `more`). */
  myGroups({ afterGroup = 0, limit = 0 } = {}) {
    return this._request({ op: "my_groups", after_group: u64(afterGroup), limit });
  }

  /** Every group of the caller (pages through `myGroups`). Resolves with an array of ids. */
  async myGroupsAll() {
    const all = [];
    let after = "0";
    for (;;) {
      const page = await this.myGroups({ afterGroup: after });
      all.push(...page.groups);
      if (!page.more || page.groups.length === 0) return all;
      after = page.groups[page.groups.length - 1];
    }
  }

  /** Tell a peer (`conv` 1) or a group (`conv` 2) this user is typing (`typing` true) or
   * stopped. Nothing answers but a refusal (an `error` event); pushes arrive as
   * `typing_notice` events. */
  typing(conv, to, typing = true) {
    this._post({ op: "typing", conv, to: u64(to), state: typing ? 1 : 0 });
  }

  /** Replace this account's profile (`{nickname, avatar_url, gender, birthday, area,
   * extra}`). Resolves with `profile_list` holding the stored entry. */
  profileUpdate(profile) {
    return this._request({ op: "profile_update", profile });
  }

  /** Profiles of some users. Resolves with `profile_list` (`profiles`: `{user_id,
   * updated_ms, profile}`, accounts only, in the order asked). */
  profileGet(userIds) {
    return this._request({ op: "profile_get", user_ids: userIds.map(u64) });
  }

  // ---- friends (JSON.md 3.4) ----

  /**
   * One roster action on `user` (see `RosterAction`): REQUEST (with a `note`), ACCEPT, REJECT,
   * REMOVE, BLOCK, UNBLOCK, CANCEL; and presence watches: WATCH (ask to see `user`'s presence),
   * ALLOW or DENY (answer `user`'s ask), UNWATCH (stop watching, or withdraw the ask), REVOKE
   * (stop `user` watching). Resolves with `roster_ok` (`friends`: whether the two are friends
   * now); rejects with a TimError: Blocked (90), NotFriends (91), AlreadyFriends (92),
   * NoFriendRequest (93), TooManyFriends (94: also WATCH or ALLOW past the roster limit),
   * InvalidRoster (95), AlreadyWatching (97: WATCH of a user watched already), NoWatch (98: ALLOW,
   * DENY, UNWATCH or REVOKE without the watch or request it needs), UnknownUser (12).
   */
  rosterAction(action, user, note = "") {
    return this._request({ op: "roster_action", action, user: u64(user), note });
  }

  /**
   * One page of a roster list (see `RosterList`). Resolves with `roster_list` (`entries`:
   * `{user, since_ms, note}` by rising user, `more`: ask again with `after` = the last user).
   */
  rosterGet(list, after = 0, limit = 0) {
    return this._request({ op: "roster_get", list, after: u64(after), limit });
  }

  /** A whole roster list (pages through `rosterGet`). Resolves with an array of entries. */
  async rosterGetAll(list) {
    const all = [];
    let after = "0";
    for (;;) {
      const page = await this.rosterGet(list, after);
      all.push(...page.entries);
      if (!page.more || page.entries.length === 0) return all;
      after = page.entries[page.entries.length - 1].user;
    }
  }

  // ---- presence (PROTOCOL.md 5.21) ----

  /**
   * Set this user's presence: `state` a PresenceState (ONLINE, AWAY, BUSY or INVISIBLE), a
   * status `text`, and `extra` (a string or bytes). Resolves with `presence_list` holding the
   * user's own entry. Friends and allowed watchers get a `presence_notice`.
   */
  presenceSet(state, text = "", extra) {
    const m = { op: "presence_set", state, text };
    if (extra !== undefined && extra !== null) {
      if (typeof extra === "string") m.extra = extra;
      else m.extra_b64 = b64encode(extra instanceof ArrayBuffer ? new Uint8Array(extra) : extra);
    }
    return this._request(m);
  }

  /**
   * Presence of some users, friends or not (one who blocks you, or is invisible, shows OFFLINE). Resolves with
   * `presence_list` (`entries`: `{user, state, since_ms, text, extra}`, in the order asked).
   */
  presenceGet(userIds) {
    return this._request({ op: "presence_get", user_ids: userIds.map(u64) });
  }

  /** The account's live sessions. Resolves with `session_list` (`sessions`: `{session_id,
   * login_ms, device_type, current, device_id}`, oldest first). */
  mySessions() {
    return this._request({ op: "my_sessions" });
  }

  /** Log one of the account's sessions out (another device's, or this one's). Resolves with
   * the `session_list` of the sessions left. */
  sessionLogout(sessionId) {
    return this._request({ op: "session_logout", session_id: u64(sessionId) });
  }

  /** Pending join requests (managers). Resolves with `group_request_page`. */
  groupRequests(groupId) {
    return this._request({ op: "group_requests", group_id: u64(groupId) });
  }

  /** One GroupAction (see `GroupAction`). Resolves with `group_ok`. */
  groupAction(groupId, action, { userId = 0, untilMs = 0, note = "" } = {}) {
    return this._request({
      op: "group_action", group_id: u64(groupId), action, user_id: u64(userId), until_ms: u64(untilMs), note,
    });
  }

  /** Add users to a group in one change. Resolves with `group_ok`. */
  groupAddMembers(groupId, userIds) {
    return this._request({ op: "group_add_members", group_id: u64(groupId), user_ids: userIds.map(u64) });
  }

  // ---- live rooms (PROTOCOL.md 5.11, 8.14) ----

  /** Create a room. Resolves with `room_ok` (`room_id`). The creator is not subscribed by it. */
  roomCreate({ publish = RoomPublishPolicy.CREATOR, subscribersMax = 0, publishers = [] } = {}) {
    return this._request({ op: "room_create", publish, subscribers_max: subscribersMax, publishers: publishers.map(u64) });
  }

  /** Subscribe this session. Resolves with `room_ok` (`subscribers`). */
  roomSubscribe(roomId) {
    return this._request({ op: "room_subscribe", room_id: u64(roomId) });
  }

  /** Resolves with `room_ok`. */
  roomUnsubscribe(roomId) {
    return this._request({ op: "room_unsubscribe", room_id: u64(roomId) });
  }

  /** Delete a room (its creator). Resolves with `room_ok`. */
  roomDelete(roomId) {
    return this._request({ op: "room_delete", room_id: u64(roomId) });
  }

  /**
   * Publish to a room. No answer when it goes through (the publishing session does not get its
   * own message back); a refusal comes as an `error` event with this `clientMsgId`. Returns the
   * `client_msg_id` used.
   */
  roomPublish(roomId, body, { clientMsgId } = {}) {
    const id = clientMsgId !== undefined ? u64(clientMsgId) : newClientMsgId();
    this._post({ op: "room_publish", room_id: u64(roomId), client_msg_id: id, ...bodyFields(body) });
    return id;
  }

  // ---- internals ----

  _loggedIn(ok) {
    this.session = ok;
    this.userId = ok.user_id;
    this._startPings(ok.idle_timeout_ms);
    return ok;
  }

  /**
   * Ping whenever nothing was sent for a quarter of the idle timeout (PROTOCOL.md 8.1). The
   * margin is for browsers, which run the timers of a tab hidden for a while once a minute.
   */
  _startPings(idleMs) {
    clearInterval(this._pingTimer);
    const every = Math.max(1000, Math.floor((idleMs || 90000) / 4));
    this._pingTimer = setInterval(() => {
      if (!this.connected || Date.now() - this._lastSentAt < every) return;
      this.ping(Date.now()).catch((e) => {
        // No pong: the connection is dead or the server stopped reading; give it up.
        if (e.code === ErrorCode.NoAnswer) this.close();
      });
    }, Math.max(250, Math.floor(every / 4)));
  }

  async _sendWithRetries(m) {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this._sendOnce(m);
      } catch (e) {
        if (!(e instanceof TimError) || !SEND_RETRY_CODES.has(e.code) || attempt >= this.sendRetries) throw e;
        await sleep(250 * 2 ** attempt);
      }
    }
  }

  _sendOnce(m) {
    const inflightMax = this.session?.inflight_max ?? 256;
    if (this._inflight.size >= inflightMax) {
      return new Promise((resolve, reject) => this._held.push({ m, resolve, reject }));
    }
    this._inflight.set(m.clientMsgId, m);
    const done = () => {
      this._inflight.delete(m.clientMsgId);
      const next = this._held.shift();
      if (next) this._sendOnce(next.m).then(next.resolve, next.reject);
    };
    const sent = m.op === "send_part"
      ? this._requestLarge(m)
      : this._request({ op: m.op, conv: m.conv, to: m.to, client_msg_id: m.clientMsgId, ...m.fields });
    return sent.then(
      (ack) => { done(); return ack; },
      (e) => {
        done();
        if (e instanceof TimError && e.clientMsgId === "0") e.clientMsgId = m.clientMsgId;
        e.send = m;
        throw e;
      },
    );
  }

  /** Send a request with a fresh id; resolves with its answer. `onPart` takes history_msg parts. */
  _request(req, onPart) {
    if (!this.connected) {
      return Promise.reject(new TimError({ code: ErrorCode.NotConnected, message: `${req.op}: not connected`, clientMsgId: req.client_msg_id }));
    }
    const id = `t${this._nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new TimError({ code: ErrorCode.NoAnswer, message: `${req.op}: no answer in ${this.requestTimeoutMs} ms`, id, clientMsgId: req.client_msg_id }));
      }, this.requestTimeoutMs);
      this._pending.set(id, { op: req.op, resolve, reject, timer, onPart });
      this._post({ ...req, id });
    });
  }

  /**
   * Send a large message (`m.bytes`) in `send_part` chunks (JSON.md 3.1), one message at a time
   * (the server takes one upload per session until it is answered, else UploadInProgress).
   * Resolves with its `send_ack`; rejects with its refusal, a chunk's (request kind 27) or the
   * message's (6).
   */
  _requestLarge(m) {
    const run = this._largeChain.then(() => this._uploadOnce(m));
    this._largeChain = run.catch(() => {});
    return run;
  }

  _uploadOnce(m) {
    if (!this.connected) {
      return Promise.reject(new TimError({ code: ErrorCode.NotConnected, message: "send: not connected", clientMsgId: m.clientMsgId }));
    }
    // Every chunk carries the same request id: whichever answer comes (a chunk's refusal, or
    // the message's send_ack or error) settles the send.
    const id = `t${this._nextId++}`;
    return new Promise((resolve, reject) => {
      const entry = { op: "send_part", resolve, reject, timer: null };
      this._pending.set(id, entry);
      this._postChunks(m, id, entry).then(() => {
        if (this._pending.get(id) !== entry) return; // answered (refused) already, or closed
        entry.timer = setTimeout(() => {
          this._pending.delete(id);
          reject(new TimError({ code: ErrorCode.NoAnswer, message: `send: no answer in ${this.requestTimeoutMs} ms`, id, clientMsgId: m.clientMsgId }));
        }, this.requestTimeoutMs);
      });
    });
  }

  /** Post a large message's chunks in order, pausing while the socket's buffer is full; stops at a refusal. */
  async _postChunks(m, id, entry) {
    const bytes = m.bytes;
    const size = Math.max(1, (this.session?.frame_bytes_max ?? 65536) - PART_CHUNK_OVERHEAD);
    const base = { op: "send_part", id, conv: m.conv, to: m.to, client_msg_id: m.clientMsgId, body_bytes: bytes.length, ...m.fields };
    let at = 0;
    do {
      while (this.connected && this.ws.bufferedAmount > LARGE_BUFFERED_MAX && this._pending.get(id) === entry) await sleep(5);
      if (!this.connected || this._pending.get(id) !== entry) return;
      const end = Math.min(bytes.length, at + size);
      this._post({ ...base, offset: at, body_b64: b64encode(bytes.subarray(at, end)) });
      at = end;
    } while (at < bytes.length);
  }

  _post(obj) {
    if (!this.connected) {
      this._emit("error", new TimError({ code: ErrorCode.NotConnected, message: `${obj.op}: not connected` }));
      return;
    }
    this._lastSentAt = Date.now();
    this.ws.send(JSON.stringify(obj));
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _onText(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return; // the server sends JSON only; nothing to do with anything else
    }
    if (MESSAGE_TYPES.has(msg.type)) {
      msg.flags ??= 0;
      msg.state ??= MsgState.PLAIN;
    }
    this._emit("message", msg);
    const p = msg.id !== undefined && msg.id !== null ? this._pending.get(msg.id) : undefined;
    if (p && !PUSH_TYPES.has(msg.type)) {
      if (msg.type === "history_msg" && p.onPart) return p.onPart(msg);
      this._pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.type === "error") p.reject(new TimError(msg));
      else p.resolve(msg);
      return;
    }
    switch (msg.type) {
      case "error": {
        // Refusals of the chunks after a large message's first refused one: that send was
        // settled by the first.
        if (msg.request_kind === PART_KIND && msg.id !== undefined) break;
        const e = new TimError(msg);
        if (msg.request_kind === 0) this._closing.error = msg; // errors that close say why
        this._emit("error", e);
        break;
      }
      case "kick":
        this._closing.kick = msg;
        this._emit("kick", msg);
        break;
      default:
        // Pushes, and answers whose request is gone (timed out): skip types we do not know.
        if (PUSH_TYPES.has(msg.type)) this._emit(msg.type, msg);
    }
  }

  _onClose(e) {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    const why = this._closing.kick || this._closing.error;
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new TimError({
        code: ErrorCode.Closed, id,
        message: `${p.op}: connection closed${why ? ` (${why.reason_name || why.code_name}: ${why.message})` : ""}`,
      }));
    }
    this._pending.clear();
    for (const h of this._held.splice(0)) h.reject(Object.assign(new TimError({ code: ErrorCode.Closed, message: "send: connection closed", clientMsgId: h.m.clientMsgId }), { send: h.m }));
    this._inflight.clear();
    this.ws = null;
    const wasLoggedIn = this.session !== null;
    this.session = null;
    this._emit("close", { code: e.code, reason: e.reason, wasClean: e.wasClean, wasLoggedIn, kick: this._closing.kick, error: this._closing.error });
  }
}

/** Open a connection: `const tim = await connect("ws://host:7180/ws")`. */
export function connect(url, options) {
  return new TimClient(options).connect(url);
}

/** The WebSocket URL of the tim server that served this page (`/ws` on the same host). */
export function pageUrl(loc = globalThis.location) {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}
