//! The admin HTTP API (docs/ADMIN.md): accounts, login tokens, messages sent as a user,
//! broadcasts, kicks, the online users, group administration, the cluster's members, and
//! `/metrics`, `/healthz`, `/readyz`.
//!
//! It runs on a thread of its own with a small single-threaded tokio runtime and hyper's
//! HTTP/1.1 server, never on the shards. It reaches them through a mesh endpoint of its own: an
//! [`AdminTask`] runs a function on a shard's thread and answers through a oneshot channel
//! ([`ops`] holds those functions). Every request but the health checks needs the bearer
//! token; JSON in and out; u64 ids are written as strings (as in docs/JSON.md) and read from
//! numbers or strings.
//!
//! Key items: [`start`], [`AdminServer`].

pub mod ops;
mod prometheus;

use std::{
    convert::Infallible,
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tim_shards::mesh::{MeshPort, SendError};

use crate::{
    client::Event,
    config::Config,
    envelope::{AdminTask, Envelope},
    frame,
    protocol::{self, group_action, kind, ErrorCode},
    shard::{Shard, Shared},
    store::BANNED_FOREVER,
};

/// Bytes of a request body at most; beyond: 413.
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Connections open at once at most; beyond: closed at once.
pub const CONNECTIONS_MAX: usize = 64;
/// Time a client has to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an operation may take on the shards (beyond: 504).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Online users one page lists at most.
pub const ONLINE_PAGE_MAX: usize = 1000;
/// Users one `POST /v1/groups/{id}/members` adds at most (the group limit is lower by default).
pub const ADD_MEMBERS_MAX: usize = 10_000;

/// A running admin API.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Stop accepting and end the thread.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every request handler shares.
struct State {
    shared: Arc<Shared>,
    port: Mutex<MeshPort<Envelope>>,
    shards: usize,
    token: String,
    /// Set once every listener is up.
    ready: Arc<AtomicBool>,
    cfg: Config,
}

/// Bind the admin listener and start its thread. `port` is the admin's mesh endpoint; `ready`
/// is set by the server once it is fully started.
pub fn start(
    cfg: &Config,
    addr: SocketAddr,
    shared: Arc<Shared>,
    port: MeshPort<Envelope>,
    shards: usize,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<AdminServer> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("binding admin.listen {addr}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if cfg.admin.token.is_empty() {
        log::warn!("admin API on {addr} without a token: any local process may use it (set admin.token)");
    }
    let state = Arc::new(State {
        shared,
        port: Mutex::new(port),
        shards,
        token: cfg.admin.token.clone(),
        ready,
        cfg: cfg.clone(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new().name("tim-admin".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("admin: runtime: {e}");
                return;
            }
        };
        rt.block_on(serve(listener, state, stopped));
    })?;
    Ok(AdminServer { addr, stop: Some(stop), thread: Some(thread) })
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("admin: listener: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("admin: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over CONNECTIONS_MAX: closed at once.
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("admin: connection: {e}");
            }
            drop(slot);
        });
    }
}

/// A refused request: HTTP status, tim error code (0: none), message.
struct ApiError(StatusCode, u16, String);

impl ApiError {
    fn http(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError(status, 0, message.into())
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, ErrorCode::Malformed.code(), message.into())
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> ApiError {
        use ErrorCode::*;
        let status = match code {
            Malformed | InvalidName | InvalidPassword | InvalidDevice | InvalidGroup
            | InvalidConversation | BodyTooLarge => StatusCode::BAD_REQUEST,
            NameTaken | AlreadyMember | FounderMustTransfer | GroupDissolved => StatusCode::CONFLICT,
            UnknownUser | UnknownRecipient | GroupNotFound | RoomNotFound | NoJoinRequest => {
                StatusCode::NOT_FOUND
            }
            Banned => StatusCode::FORBIDDEN,
            Busy | StoreUnavailable | NodeUnavailable | RateLimited => StatusCode::SERVICE_UNAVAILABLE,
            Timeout => StatusCode::GATEWAY_TIMEOUT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, code.code(), code.text().to_string())
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, content_type.parse().expect("valid header"));
    r
}

fn json_response(status: StatusCode, v: Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    let name = ErrorCode::from_u16(e.1).map_or(String::new(), |c| format!("{c:?}"));
    json_response(e.0, json!({ "error": { "code": e.1, "name": name, "message": e.2 } }))
}

/// Constant-time comparison of the presented token with the configured one.
fn token_ok(state: &State, req: &Request<Incoming>) -> bool {
    if state.token.is_empty() {
        return true;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (presented.as_bytes(), state.token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(state: &Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => return json_response(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => return readyz(state).await,
        _ => {}
    }
    if !token_ok(state, &req) {
        let mut r = error_response(ApiError::http(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
        r.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid header"));
        return r;
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), BODY_BYTES_MAX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(ApiError::http(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body over 1 MiB, or broken",
            ))
        }
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["metrics"]) => return metrics(state).await,
        (&Method::POST, ["v1", "accounts"]) => register(state, &body).await,
        (&Method::POST, ["v1", "tokens"]) => issue_token(state, &body).await,
        (&Method::POST, ["v1", "messages"]) => send_message(state, &body).await,
        (&Method::POST, ["v1", "broadcasts"]) => broadcast(state, &body).await,
        (&Method::POST, ["v1", "kicks"]) => kick(state, &body).await,
        (&Method::PUT, ["v1", "bans", user]) => ban(state, user, &body).await,
        (&Method::DELETE, ["v1", "bans", user]) => unban(state, user).await,
        (&Method::GET, ["v1", "bans", user]) => ban_status(state, user).await,
        (&Method::GET, ["v1", "users", user, "profile"]) => profile_get(state, user).await,
        (&Method::PUT, ["v1", "users", user, "profile"]) => profile_put(state, user, &body).await,
        (&Method::GET, ["v1", "users", user, "sessions"]) => user_sessions(state, user).await,
        (&Method::GET, ["v1", "users", user, "roster"]) => user_roster(state, user, &query).await,
        (&Method::GET, ["v1", "users", user, "presence"]) => user_presence(state, user).await,
        (&Method::GET, ["v1", "online"]) => online_count(state).await,
        (&Method::GET, ["v1", "online", "users"]) => online_users(state, &query).await,
        (&Method::POST, ["v1", "groups"]) => group_create(state, &body).await,
        (&Method::POST, ["v1", "groups", id, "members"]) => group_add(state, id, &body).await,
        (&Method::DELETE, ["v1", "groups", id, "members", user]) => group_remove(state, id, user).await,
        (&Method::DELETE, ["v1", "groups", id]) => group_dissolve(state, id).await,
        (&Method::GET, ["v1", "cluster"]) => cluster(state).await,
        (
            _,
            ["metrics"]
            | ["v1", "accounts" | "tokens" | "messages" | "broadcasts" | "kicks" | "online" | "groups" | "cluster"]
            | ["v1", "online", "users"]
            | ["v1", "bans", _]
            | ["v1", "users", _, "profile" | "sessions" | "roster" | "presence"]
            | ["v1", "groups", _]
            | ["v1", "groups", _, "members"]
            | ["v1", "groups", _, "members", _],
        ) => {
            Err(ApiError::http(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}")))
        }
        _ => Err(ApiError::http(StatusCode::NOT_FOUND, format!("no such operation: {path}"))),
    };
    match result {
        Ok((status, v)) => json_response(status, v),
        Err(e) => error_response(e),
    }
}

type ApiResult = Result<(StatusCode, Value), ApiError>;

/// Run `f` on `shard`'s thread and wait for its result.
async fn on_shard<R, F>(state: &State, shard: usize, f: F) -> Result<R, ApiError>
where
    R: Send + 'static,
    F: FnOnce(Rc<Shard>) -> std::pin::Pin<Box<dyn std::future::Future<Output = R>>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = AdminTask(Box::new(move |s: &dyn std::any::Any| {
        let Some(s) = s.downcast_ref::<Rc<Shard>>() else {
            log::error!("admin: a task was given something that is not a shard");
            return;
        };
        let fut = f(s.clone());
        monoio::spawn(async move {
            let _ = tx.send(fut.await);
        });
    }));
    let mut env = Envelope::Admin(task);
    for _ in 0..1000 {
        let sent = state.port.lock().expect("not poisoned").try_send(shard, env);
        match sent {
            Ok(()) => {
                return match tokio::time::timeout(CALL_TIMEOUT, rx).await {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(_)) => Err(ErrorCode::ShuttingDown.into()),
                    Err(_) => Err(ErrorCode::Timeout.into()),
                };
            }
            Err(SendError::Full(e)) => {
                env = e;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(SendError::ToSelf(_)) => unreachable!("the admin endpoint is no shard"),
        }
    }
    Err(ErrorCode::Busy.into())
}

/// Run `f` on every shard; the results in shard order.
async fn on_every_shard<R, F>(state: &State, f: F) -> Result<Vec<R>, ApiError>
where
    R: Send + 'static,
    F: Fn(&Shard) -> R + Send + Sync + Clone + 'static,
{
    let mut out = Vec::with_capacity(state.shards);
    for shard in 0..state.shards {
        let f = f.clone();
        out.push(on_shard(state, shard, move |s| Box::pin(async move { f(&s) })).await?);
    }
    Ok(out)
}

/// Run one request frame as `user` (see [`ops::as_user`]) and return its answers, or the
/// error code of an `Error` answer.
async fn as_user(
    state: &State,
    user: u64,
    request: Vec<u8>,
    done: fn(&Event) -> bool,
) -> Result<Vec<Event>, ApiError> {
    let shard = (user as usize) % state.shards;
    let events = on_shard(state, shard, move |s| Box::pin(ops::as_user(s, user, request, done))).await??;
    if let Some(Event::Error(e)) = events.iter().find(|e| matches!(e, Event::Error(_))) {
        return Err(ErrorCode::from_u16(e.code).unwrap_or(ErrorCode::Internal).into());
    }
    Ok(events)
}

fn answered(e: &Event) -> bool {
    !matches!(e, Event::Deliver(_) | Event::StreamMsg(_) | Event::Broadcast(_) | Event::Resync)
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("body must be a JSON object"));
    }
    Ok(v)
}

fn u64_field(v: &Value, name: &str) -> Result<Option<u64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_u64().map(Some).ok_or_else(|| ApiError::bad(format!("`{name}`: expected a u64")))
        }
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad(format!("`{name}`: expected a u64 (number or decimal string)"))),
        Some(_) => Err(ApiError::bad(format!("`{name}`: expected a u64"))),
    }
}

fn need_u64(v: &Value, name: &str) -> Result<u64, ApiError> {
    u64_field(v, name)?.ok_or_else(|| ApiError::bad(format!("`{name}` is required")))
}

fn str_field<'a>(v: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad(format!("`{name}`: expected a string"))),
    }
}

fn need_str<'a>(v: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    str_field(v, name)?.ok_or_else(|| ApiError::bad(format!("`{name}` is required")))
}

fn u64_list(v: &Value, name: &str) -> Result<Vec<u64>, ApiError> {
    let Some(list) = v.get(name) else { return Ok(Vec::new()) };
    let Some(items) = list.as_array() else {
        return Err(ApiError::bad(format!("`{name}`: expected an array")));
    };
    items
        .iter()
        .map(|i| match i {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| ApiError::bad(format!("`{name}`: expected an array of u64")))
}

/// A message body: `body` (UTF-8 text) or `body_b64` (standard base64).
fn body_field(v: &Value) -> Result<Vec<u8>, ApiError> {
    bytes_field(v, "body")?.ok_or_else(|| ApiError::bad("`body` or `body_b64` is required"))
}

/// Bytes given as `NAME` (UTF-8 text) or `NAME_b64` (standard base64), or neither.
fn bytes_field(v: &Value, name: &str) -> Result<Option<Vec<u8>>, ApiError> {
    use base64::Engine as _;
    let b64 = format!("{name}_b64");
    match (str_field(v, name)?, str_field(v, &b64)?) {
        (Some(t), None) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(Some)
            .map_err(|e| ApiError::bad(format!("`{b64}`: {e}"))),
        (Some(_), Some(_)) => Err(ApiError::bad(format!("give `{name}` or `{b64}`, not both"))),
        (None, None) => Ok(None),
    }
}

fn id(v: u64) -> Value {
    Value::String(v.to_string())
}

async fn readyz(state: &State) -> Response<Full<Bytes>> {
    if !state.ready.load(Ordering::Acquire) {
        return json_response(StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "starting" }));
    }
    let store = state.shared.store.clone();
    let probe = tokio::task::spawn_blocking(move || store.account_exists(0));
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(Ok(_))) => json_response(StatusCode::OK, json!({ "status": "ready" })),
        Ok(Ok(Err(e))) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "store unavailable", "reason": e.to_string() }),
        ),
        _ => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "store unavailable", "reason": "no answer in 2 s" }),
        ),
    }
}

async fn metrics(state: &State) -> Response<Full<Bytes>> {
    match on_every_shard(state, ops::snapshot).await {
        Ok(snaps) => {
            let dropped = state.shared.dropped_envelopes.load(Ordering::Relaxed);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                prometheus::render(
                    &snaps,
                    dropped,
                    state.shared.pressure.raised(),
                    state.shared.cluster_bounced.load(Ordering::Relaxed),
                ),
            )
        }
        Err(e) => error_response(e),
    }
}

async fn register(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let name = need_str(&v, "name")?.to_string();
    let password = need_str(&v, "password")?.to_string();
    let req = frame::encode(kind::REGISTER, &protocol::Register { name, password });
    let events = as_user(state, 0, req, answered).await?;
    match events.first() {
        Some(Event::RegisterOk(ok)) => Ok((StatusCode::CREATED, json!({ "user_id": id(ok.user_id) }))),
        _ => Err(ErrorCode::Internal.into()),
    }
}

async fn issue_token(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let user = need_user(state, &v, "user_id").await?;
    let ttl_secs = u64_field(&v, "ttl_secs")?.unwrap_or(0).min(u64::from(u32::MAX)) as u32;
    let req = frame::encode(kind::ISSUE_TOKEN, &protocol::IssueToken { ttl_secs });
    let events = as_user(state, user, req, answered).await?;
    match events.first() {
        Some(Event::TokenIssued(t)) => {
            Ok((StatusCode::CREATED, json!({ "token": t.token, "expires_at_ms": id(t.expires_at_ms) })))
        }
        _ => Err(ErrorCode::Internal.into()),
    }
}

/// 404 for `user`, which is no account.
fn no_user(user: u64) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, ErrorCode::UnknownUser.code(), format!("no user {user}"))
}

/// The u64 field `name`, which must be an existing account.
async fn need_user(state: &State, v: &Value, name: &str) -> Result<u64, ApiError> {
    existing_user(state, need_u64(v, name)?).await
}

/// `user`, if it is an existing account.
async fn existing_user(state: &State, user: u64) -> Result<u64, ApiError> {
    let store = state.shared.store.clone();
    match tokio::task::spawn_blocking(move || store.account_exists(user)).await {
        Ok(Ok(true)) => Ok(user),
        Ok(Ok(false)) => Err(no_user(user)),
        _ => Err(ErrorCode::Internal.into()),
    }
}

async fn send_message(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let from = need_user(state, &v, "from").await?;
    let body = body_field(&v)?;
    let (conv, to) = match (u64_field(&v, "to")?, u64_field(&v, "group_id")?) {
        (Some(to), None) => (protocol::conv::DIRECT, to),
        (None, Some(g)) => (protocol::conv::GROUP, g),
        _ => return Err(ApiError::bad("give `to` (a user id) or `group_id`, one of them")),
    };
    // A fresh id unless the caller gives one (to retry without a second message).
    let client_msg_id = u64_field(&v, "client_msg_id")?.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        u64::from_le_bytes(b) | 1
    });
    let req =
        frame::encode(kind::SEND, &protocol::Send { conv, flags: 0, burn_secs: 0, to, client_msg_id, body });
    let events = as_user(state, from, req, |e| matches!(e, Event::SendAck(_) | Event::Error(_))).await?;
    match events.iter().find(|e| matches!(e, Event::SendAck(_))) {
        Some(Event::SendAck(a)) => Ok((
            StatusCode::CREATED,
            json!({
                "msg_id": id(a.msg_id), "seq": id(a.seq), "ts_ms": id(a.ts_ms),
                "client_msg_id": id(a.client_msg_id), "duplicate": a.duplicate,
            }),
        )),
        _ => Err(ErrorCode::Internal.into()),
    }
}

async fn broadcast(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let body = body_field(&v)?;
    if body.len() > state.cfg.limits.body_bytes_max {
        return Err(ErrorCode::BodyTooLarge.into());
    }
    match u64_field(&v, "group_id")? {
        None => {
            let frame = ops::broadcast_frame(0, body);
            let counts = on_every_shard(state, move |s| ops::broadcast_local(s, &frame)).await?;
            Ok((StatusCode::OK, json!({ "sessions": counts.iter().sum::<usize>() })))
        }
        Some(group) => {
            let store = state.shared.store.clone();
            let loaded = tokio::task::spawn_blocking(move || store.load_group(group))
                .await
                .map_err(|_| ApiError::from(ErrorCode::Internal))?
                .map_err(|_| ApiError::from(ErrorCode::StoreUnavailable))?;
            let Some(g) = loaded.filter(|g| !g.row.dissolved) else {
                return Err(ErrorCode::GroupNotFound.into());
            };
            let users: Vec<u64> = g.members.iter().map(|m| m.user).collect();
            let frame = ops::broadcast_frame(group, body);
            let n = users.len();
            on_shard(state, 0, move |s| {
                Box::pin(async move {
                    ops::fan_out(&s, &users, &frame);
                })
            })
            .await?;
            Ok((StatusCode::OK, json!({ "members": n })))
        }
    }
}

async fn kick(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let user = need_u64(&v, "user_id")?;
    let session = u64_field(&v, "session_id")?;
    let counts = on_every_shard(state, move |s| ops::kick(s, user, session)).await?;
    Ok((StatusCode::OK, json!({ "kicked": counts.iter().sum::<usize>() })))
}

fn user_seg(seg: &str) -> Result<u64, ApiError> {
    seg.parse().ok().filter(|&u| u != 0).ok_or_else(|| ApiError::bad(format!("`{seg}` is not a user id")))
}

/// Store `user`'s ban (0: lifted), then tell its user owner (wherever it is in the cluster):
/// sessions kicked, tokens void, logins refused.
async fn set_ban(state: &State, user: u64, until_ms: u64) -> Result<(), ApiError> {
    let store = state.shared.store.clone();
    match tokio::task::spawn_blocking(move || store.set_ban(user, until_ms)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Err(no_user(user)),
        Ok(Err(e)) => {
            log::warn!("admin: ban of {user}: {e}");
            return Err(ErrorCode::StoreUnavailable.into());
        }
        Err(_) => return Err(ErrorCode::Internal.into()),
    }
    on_shard(state, 0, move |s| {
        Box::pin(async move {
            let owner = s.place(|p| p.user(user));
            s.post(owner, Envelope::Ban { user, until_ms });
        })
    })
    .await
}

/// `PUT /v1/bans/{user}`, body `{"until_ms": ...}` (optional; absent: for good).
async fn ban(state: &State, seg: &str, body: &[u8]) -> ApiResult {
    let user = user_seg(seg)?;
    let v = if body.iter().all(u8::is_ascii_whitespace) { json!({}) } else { parse(body)? };
    let until = u64_field(&v, "until_ms")?.unwrap_or(BANNED_FOREVER).min(BANNED_FOREVER);
    if until <= crate::clock::now_ms() {
        return Err(ApiError::bad("`until_ms` is not in the future (DELETE lifts a ban)"));
    }
    set_ban(state, user, until).await?;
    Ok((StatusCode::OK, json!({ "user_id": id(user), "banned": true, "banned_until_ms": id(until) })))
}

/// `DELETE /v1/bans/{user}`.
async fn unban(state: &State, seg: &str) -> ApiResult {
    let user = user_seg(seg)?;
    set_ban(state, user, 0).await?;
    Ok((StatusCode::OK, json!({ "user_id": id(user), "banned": false })))
}

/// `GET /v1/bans/{user}`.
async fn ban_status(state: &State, seg: &str) -> ApiResult {
    let user = user_seg(seg)?;
    let store = state.shared.store.clone();
    match tokio::task::spawn_blocking(move || store.ban_of(user)).await {
        Ok(Ok(Some(until))) => {
            let banned = until > crate::clock::now_ms();
            let until = if banned { id(until) } else { Value::Null };
            Ok((StatusCode::OK, json!({ "user_id": id(user), "banned": banned, "banned_until_ms": until })))
        }
        Ok(Ok(None)) => Err(no_user(user)),
        Ok(Err(_)) => Err(ErrorCode::StoreUnavailable.into()),
        Err(_) => Err(ErrorCode::Internal.into()),
    }
}

/// Opaque extra data into `v`: as `extra` when it is UTF-8 text, else as `extra_b64`.
fn put_extra(v: &mut Value, extra: &[u8]) {
    use base64::Engine as _;
    match std::str::from_utf8(extra) {
        Ok(text) => v["extra"] = json!(text),
        Err(_) => v["extra_b64"] = json!(base64::engine::general_purpose::STANDARD.encode(extra)),
    }
}

/// A profile entry as JSON (the WebSocket mapping's `profile_list` entry).
fn profile_json(e: &protocol::ProfileEntry) -> Value {
    let p = &e.profile;
    let mut profile = json!({
        "nickname": p.nickname, "avatar_url": p.avatar_url, "gender": p.gender,
        "birthday": p.birthday, "area": p.area,
    });
    put_extra(&mut profile, &p.extra);
    json!({ "user_id": id(e.user_id), "updated_ms": id(e.updated_ms), "profile": profile })
}

/// `GET /v1/users/{user}/profile`.
async fn profile_get(state: &State, seg: &str) -> ApiResult {
    let user = user_seg(seg)?;
    let store = state.shared.store.clone();
    match tokio::task::spawn_blocking(move || store.profiles(&[user])).await {
        Ok(Ok(found)) => match found.into_iter().next() {
            Some((user_id, updated_ms, profile)) => {
                Ok((StatusCode::OK, profile_json(&protocol::ProfileEntry { user_id, updated_ms, profile })))
            }
            None => Err(no_user(user)),
        },
        Ok(Err(_)) => Err(ErrorCode::StoreUnavailable.into()),
        Err(_) => Err(ErrorCode::Internal.into()),
    }
}

/// `PUT /v1/users/{user}/profile`: the whole new profile, checked as a user's own update is.
async fn profile_put(state: &State, seg: &str, body: &[u8]) -> ApiResult {
    let user = user_seg(seg)?;
    let v = parse(body)?;
    let text = |k: &str| -> Result<String, ApiError> { Ok(str_field(&v, k)?.unwrap_or_default().to_owned()) };
    let small = |k: &str, max: u64| -> Result<u64, ApiError> {
        match u64_field(&v, k)? {
            Some(n) if n > max => Err(ApiError::bad(format!("`{k}` is too large"))),
            n => Ok(n.unwrap_or(0)),
        }
    };
    let extra = bytes_field(&v, "extra")?.unwrap_or_default();
    let profile = protocol::UserProfile {
        nickname: text("nickname")?,
        avatar_url: text("avatar_url")?,
        gender: small("gender", u8::MAX.into())? as u8,
        birthday: small("birthday", u32::MAX.into())? as u32,
        area: text("area")?,
        extra,
    };
    let user = existing_user(state, user).await?;
    let req = frame::encode(kind::PROFILE_UPDATE, &protocol::ProfileUpdate { profile });
    let events = as_user(state, user, req, answered).await?;
    match events.iter().find_map(|e| match e {
        Event::ProfileList(l) => l.profiles.first().cloned(),
        _ => None,
    }) {
        Some(e) => Ok((StatusCode::OK, profile_json(&e))),
        None => Err(ErrorCode::Internal.into()),
    }
}

/// `GET /v1/users/{user}/sessions`: the account's live sessions on every node.
async fn user_sessions(state: &State, seg: &str) -> ApiResult {
    let user = existing_user(state, user_seg(seg)?).await?;
    let req = frame::encode(kind::MY_SESSIONS, &protocol::MySessions { reserved: 0 });
    let events = as_user(state, user, req, answered).await?;
    let Some(list) = events.iter().find_map(|e| match e {
        Event::SessionList(l) => Some(l.clone()),
        _ => None,
    }) else {
        return Err(ErrorCode::Internal.into());
    };
    let sessions: Vec<Value> = list
        .sessions
        .iter()
        .map(|s| {
            json!({
                "session_id": id(s.session_id), "login_ms": id(s.login_ms),
                "device_type": s.device_type, "device_id": s.device_id,
            })
        })
        .collect();
    Ok((StatusCode::OK, json!({ "user_id": id(user), "sessions": sessions })))
}

/// The names of the roster lists ([`protocol::roster_list`]) in `GET /v1/users/{user}/roster`.
const ROSTER_LIST_NAMES: [&str; 8] = [
    "friends",
    "incoming",
    "outgoing",
    "blocked",
    "watchers",
    "watching",
    "watch_incoming",
    "watch_outgoing",
];

/// `GET /v1/users/{user}/roster?list=NAME&after=USER&limit=N`: a page of one of the user's
/// roster lists, read as the user's own `RosterGet`.
async fn user_roster(state: &State, seg: &str, query: &str) -> ApiResult {
    let user = user_seg(seg)?;
    let (mut list, mut after, mut limit) = (0u8, 0u64, 0u32);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
        let number =
            || val.parse::<u64>().map_err(|_| ApiError::bad(format!("query `{k}`: expected a number")));
        match k {
            "list" => {
                list = ROSTER_LIST_NAMES.iter().position(|&n| n == val).ok_or_else(|| {
                    ApiError::bad(format!("unknown list `{val}` (one of {})", ROSTER_LIST_NAMES.join(", ")))
                })? as u8
            }
            "after" => after = number()?,
            "limit" => limit = number()?.min(u32::MAX.into()) as u32,
            _ => return Err(ApiError::bad(format!("unknown query parameter `{k}`"))),
        }
    }
    let user = existing_user(state, user).await?;
    let req = frame::encode(kind::ROSTER_GET, &protocol::RosterGet { list, after, limit });
    let events = as_user(state, user, req, answered).await?;
    let Some(page) = events.iter().find_map(|e| match e {
        Event::RosterList(l) => Some(l.clone()),
        _ => None,
    }) else {
        return Err(ErrorCode::Internal.into());
    };
    let entries: Vec<Value> = page
        .entries
        .iter()
        .map(|e| json!({ "user_id": id(e.user), "since_ms": id(e.since_ms), "note": e.note }))
        .collect();
    let list = ROSTER_LIST_NAMES[usize::from(list)];
    Ok((StatusCode::OK, json!({ "user_id": id(user), "list": list, "entries": entries, "more": page.more })))
}

/// `GET /v1/users/{user}/presence`: the user's presence as the user itself sees it (an invisible
/// user is `invisible`, not `offline`).
async fn user_presence(state: &State, seg: &str) -> ApiResult {
    let user = existing_user(state, user_seg(seg)?).await?;
    let req = frame::encode(kind::PRESENCE_GET, &protocol::PresenceGet { user_ids: vec![user] });
    let events = as_user(state, user, req, answered).await?;
    let Some(e) = events.iter().find_map(|e| match e {
        Event::PresenceList(l) => l.entries.first().cloned(),
        _ => None,
    }) else {
        return Err(ErrorCode::Internal.into());
    };
    let mut v = json!({
        "user_id": id(e.user), "state": crate::chat::presence_name(e.state), "since_ms": id(e.since_ms),
        "text": e.text,
    });
    put_extra(&mut v, &e.extra);
    Ok((StatusCode::OK, v))
}

async fn online_all(state: &State) -> Result<Vec<(u64, u64)>, ApiError> {
    let mut all: Vec<(u64, u64)> = on_every_shard(state, ops::online).await?.into_iter().flatten().collect();
    all.sort_unstable();
    Ok(all)
}

async fn online_count(state: &State) -> ApiResult {
    let all = online_all(state).await?;
    let mut users: Vec<u64> = all.iter().map(|&(u, _)| u).collect();
    users.dedup();
    Ok((StatusCode::OK, json!({ "sessions": all.len(), "users": users.len() })))
}

async fn online_users(state: &State, query: &str) -> ApiResult {
    let mut after = 0u64;
    let mut limit = 100usize;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
        let n: u64 = val.parse().map_err(|_| ApiError::bad(format!("query `{k}`: expected a number")))?;
        match k {
            "after" => after = n,
            "limit" => limit = (n as usize).clamp(1, ONLINE_PAGE_MAX),
            _ => return Err(ApiError::bad(format!("unknown query parameter `{k}`"))),
        }
    }
    let all = online_all(state).await?;
    let mut page: Vec<Value> = Vec::new();
    let mut more = false;
    let mut i = all.partition_point(|&(u, _)| u <= after);
    while i < all.len() {
        let user = all[i].0;
        let sessions: Vec<Value> =
            all[i..].iter().take_while(|&&(u, _)| u == user).map(|&(_, s)| id(s)).collect();
        i += sessions.len();
        if page.len() == limit {
            more = true;
            break;
        }
        page.push(json!({ "user_id": id(user), "sessions": sessions }));
    }
    Ok((StatusCode::OK, json!({ "users": page, "more": more })))
}

/// A group id from a path segment.
fn group_id(seg: &str) -> Result<u64, ApiError> {
    seg.parse().map_err(|_| ApiError::bad(format!("`{seg}` is not a group id")))
}

/// The founder of a live group (the admin acts as the founder).
async fn founder_of(state: &State, group: u64) -> Result<u64, ApiError> {
    let store = state.shared.store.clone();
    let loaded = tokio::task::spawn_blocking(move || store.load_group(group))
        .await
        .map_err(|_| ApiError::from(ErrorCode::Internal))?
        .map_err(|_| ApiError::from(ErrorCode::StoreUnavailable))?;
    match loaded {
        Some(g) if g.row.dissolved => Err(ErrorCode::GroupDissolved.into()),
        Some(g) => Ok(g.row.founder),
        None => Err(ErrorCode::GroupNotFound.into()),
    }
}

fn group_ok(events: &[Event]) -> ApiResult {
    match events.first() {
        Some(Event::GroupOk(ok)) => {
            Ok((StatusCode::OK, json!({ "group_id": id(ok.group_id), "seq": id(ok.seq) })))
        }
        _ => Err(ErrorCode::Internal.into()),
    }
}

async fn group_create(state: &State, body: &[u8]) -> ApiResult {
    let v = parse(body)?;
    let founder = need_user(state, &v, "founder").await?;
    let text = |n: &str| -> Result<String, ApiError> { Ok(str_field(&v, n)?.unwrap_or("").to_string()) };
    let profile = protocol::GroupProfile {
        name: text("name")?,
        topic: text("topic")?,
        avatar_url: text("avatar_url")?,
        extra: Vec::new(),
        join_policy: u64_field(&v, "join_policy")?.unwrap_or(0).min(255) as u8,
        invite_policy: u64_field(&v, "invite_policy")?.unwrap_or(0).min(255) as u8,
    };
    let members = u64_list(&v, "members")?;
    if members.len() > ADD_MEMBERS_MAX {
        return Err(ApiError::bad(format!("at most {ADD_MEMBERS_MAX} members at once")));
    }
    let req = frame::encode(kind::GROUP_CREATE, &protocol::GroupCreate { profile });
    let events = as_user(state, founder, req, answered).await?;
    let (status, created) = group_ok(&events)?;
    let group = created["group_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or(ApiError::from(ErrorCode::Internal))?;
    if !members.is_empty() {
        let req = frame::encode(
            kind::GROUP_ADD_MEMBERS,
            &protocol::GroupAddMembers { group_id: group, user_ids: members },
        );
        as_user(state, founder, req, answered).await?;
    }
    Ok((if status == StatusCode::OK { StatusCode::CREATED } else { status }, created))
}

async fn group_add(state: &State, seg: &str, body: &[u8]) -> ApiResult {
    let group = group_id(seg)?;
    let v = parse(body)?;
    let users = u64_list(&v, "user_ids")?;
    if users.is_empty() || users.len() > ADD_MEMBERS_MAX {
        return Err(ApiError::bad(format!("`user_ids`: 1 to {ADD_MEMBERS_MAX} user ids")));
    }
    let founder = founder_of(state, group).await?;
    let req = frame::encode(
        kind::GROUP_ADD_MEMBERS,
        &protocol::GroupAddMembers { group_id: group, user_ids: users },
    );
    group_ok(&as_user(state, founder, req, answered).await?)
}

fn action(group: u64, action: u8, user_id: u64) -> Vec<u8> {
    frame::encode(
        kind::GROUP_ACTION,
        &protocol::GroupAction { group_id: group, action, user_id, until_ms: 0, note: String::new() },
    )
}

async fn group_remove(state: &State, seg: &str, user: &str) -> ApiResult {
    let group = group_id(seg)?;
    let user: u64 = user.parse().map_err(|_| ApiError::bad(format!("`{user}` is not a user id")))?;
    let founder = founder_of(state, group).await?;
    if user == founder {
        return Err(ErrorCode::FounderMustTransfer.into());
    }
    group_ok(&as_user(state, founder, action(group, group_action::KICK, user), answered).await?)
}

async fn group_dissolve(state: &State, seg: &str) -> ApiResult {
    let group = group_id(seg)?;
    let founder = founder_of(state, group).await?;
    group_ok(&as_user(state, founder, action(group, group_action::DISSOLVE, 0), answered).await?)
}

async fn cluster(state: &State) -> ApiResult {
    let Some(addr) = state.cfg.cluster.enabled().then(|| state.cfg.cluster.advertised()).flatten() else {
        return Ok((StatusCode::OK, json!({ "clustered": false })));
    };
    let secret = state.cfg.cluster.secret.clone();
    let text = tokio::task::spawn_blocking(move || crate::cluster::node::ask_status(addr, &secret))
        .await
        .map_err(|_| ApiError::from(ErrorCode::Internal))?
        .map_err(|e| {
            ApiError(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NodeUnavailable.code(), format!("{e:#}"))
        })?;
    let status: Value = serde_json::from_str(&text).map_err(|_| ApiError::from(ErrorCode::Internal))?;
    Ok((StatusCode::OK, json!({ "clustered": true, "status": status })))
}
