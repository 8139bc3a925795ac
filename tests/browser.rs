//! The web chat page (web/) in a real browser: two headless Chromium pages, driven through
//! chromedriver (WebDriver), register and log in on tim's own page, chat 1:1 by user id with
//! delivery states (sending → sent, received → acknowledged) and read receipts ("Seen", "Seen
//! by 1"), make a group and talk in it, take
//! a message back ("message recalled" on both pages, live and from history), use a live room,
//! page back through history with "load older", after a reload find the conversations again
//! from the store, watch a non-friend's presence (bob asks to watch alice, she allows it live
//! from her page, bob's watching list shows her status and follows it, she revokes it), become
//! friends (a request with a note from alice's friends panel, shown live on
//! bob's, accepted there: both list each other), see a friend's presence (alice sets "away" with
//! a status text; bob's friends panel shows it live), send a message that burns after reading ("message
//! burned" on both pages), paste and send a long text (a large message, shown cut with its size and
//! "show all" on both pages), and log out. Screenshots of both pages are saved.
//!
//! Needs Debian's `chromium` and `chromium-driver` packages (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`; or set `CHROME` and `CHROMEDRIVER`). Without them the test fails.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// How long the page gets to show what a step waits for.
const WAIT: Duration = Duration::from_secs(20);
/// The whole browser scenario, WebDriver sessions included.
const SCENARIO_MAX: Duration = Duration::from_secs(240);
/// Messages sent from alice's second device, to make bob's history longer than one page (the
/// page asks for 30).
const BULK: u64 = 40;

/// A chromedriver process on a free loopback port, killed with its browsers on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let path = std::env::var_os("CHROMEDRIVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/bin/chromedriver".into());
        assert!(
            path.exists(),
            "chromedriver not found at {}: the browser test needs Debian's `chromium` and \
             `chromium-driver` packages (apt-get install chromium chromium-driver), or CHROMEDRIVER \
             set to a chromedriver",
            path.display()
        );
        for _ in 0..3 {
            // A free port: bind one, let it go, hand it to chromedriver (another process could
            // take it in between: then try again).
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut cmd = Command::new(&path);
            cmd.args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            // SAFETY: prctl is async-signal-safe. chromedriver dies with the test's thread; its
            // own process group lets Drop kill the browsers it started too.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.process_group(0).pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("start chromedriver");
            let mut driver = Chromedriver { child, url: format!("http://127.0.0.1:{port}") };
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = driver.child.try_wait() {
                    eprintln!("chromedriver exited at start ({status}); trying another port");
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return driver;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(driver);
        }
        panic!("chromedriver did not start listening");
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child (its pid, made a group leader).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A new headless Chromium session (a browser of its own: its own profile and storage).
async fn browser(driver: &Chromedriver) -> anyhow::Result<Client> {
    let chrome = std::env::var("CHROME").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chrome).exists(),
        "chromium not found at {chrome}: apt-get install chromium, or set CHROME"
    );
    let caps = json!({
        "browserName": "chrome",
        "timeouts": {"pageLoad": 20000, "script": 10000, "implicit": 0},
        "goog:chromeOptions": {
            "binary": chrome,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,860", "--no-first-run", "--no-default-browser-check"],
        },
    });
    let Value::Object(caps) = caps else { unreachable!() };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let c = tokio::time::timeout(
        Duration::from_secs(30),
        ClientBuilder::new(connector).capabilities(caps).connect(&driver.url),
    )
    .await
    .context("starting a Chromium session took over 30 s")??;
    Ok(c)
}

/// Run `script` (a function body; `arguments` are `args`) in the page.
async fn js(c: &Client, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
    Ok(c.execute(script, args).await?)
}

/// Poll `script` until it returns something other than null, false or "" (at most [`WAIT`]).
async fn wait_js(c: &Client, what: &str, script: &str, args: Vec<Value>) -> anyhow::Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = js(c, script, args.clone()).await?;
        if !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what} (last value: {v})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Type `text` into `css`, found again if the page redrew it meanwhile (a "stale element").
async fn fill(c: &Client, css: &str, text: &str) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        let e = c.find(Locator::Css(css)).await.with_context(|| format!("find {css}"))?;
        let done = async {
            e.clear().await?;
            e.send_keys(text).await
        };
        match done.await {
            Ok(()) => return Ok(()),
            Err(err) if tries < 5 && err.to_string().contains("stale") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err).with_context(|| format!("fill {css}")),
        }
    }
}

/// Click `css`, found again if the page redrew it meanwhile.
async fn click(c: &Client, css: &str) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        let e = c.find(Locator::Css(css)).await.with_context(|| format!("find {css}"))?;
        match e.click().await {
            Ok(()) => return Ok(()),
            Err(err) if tries < 5 && err.to_string().contains("stale") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err).with_context(|| format!("click {css}")),
        }
    }
}

/// Click the element `css` from within the page, once it is there (for lists the page may draw
/// again at any time, where a WebDriver element can go stale between finding and clicking).
async fn click_now(c: &Client, css: &str) -> anyhow::Result<()> {
    wait_js(
        c,
        &format!("{css} to click"),
        "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true;",
        vec![json!(css)],
    )
    .await?;
    Ok(())
}

/// The message shown with body `text` in the open conversation, once it matches `state` (any
/// state if null): `{from, from_label, state, seq, mine}`.
const MESSAGE_JS: &str = r#"
    const [text, state] = arguments;
    const li = [...document.querySelectorAll('#messages li[data-testid=message]')]
        .find(li => li.querySelector('[data-testid=message-body]')?.textContent === text);
    if (!li || (state !== null && li.dataset.state !== state)) return null;
    return {from: li.dataset.from ?? null, from_label: li.querySelector('[data-testid=message-from]')?.textContent ?? null,
            state: li.dataset.state ?? null, seq: li.dataset.seq ?? null, mine: li.classList.contains('mine')};
"#;

async fn wait_message(c: &Client, text: &str, state: Option<&str>) -> anyhow::Result<Value> {
    wait_js(c, &format!("message {text:?} in state {state:?}"), MESSAGE_JS, vec![json!(text), json!(state)])
        .await
}

/// The long message of `size` bytes in the open conversation, once it is in `state` (any state
/// if null): `{state, seq, shown, note}` (`shown`: the characters of its body on the page).
const LONG_JS: &str = r#"
    const [size, state] = arguments;
    const li = document.querySelector(`#messages li.long[data-size='${size}']`);
    if (!li || (state !== null && li.dataset.state !== state)) return null;
    return {state: li.dataset.state ?? null, seq: li.dataset.seq ?? null,
            shown: li.querySelector('[data-testid=message-body]').textContent.length,
            note: li.querySelector('[data-testid=message-size]').textContent};
"#;

/// Message `seq` of the open conversation, once it shows as recalled: `{text, italic,
/// recall_action, notice_shown}` (`notice_shown`: a bubble for seq + 1, the recall notice).
const RECALLED_JS: &str = r#"
    const [seq] = arguments;
    const li = document.querySelector(`#messages li[data-seq='${seq}']`);
    if (!li || li.dataset.recalled !== 'true') return null;
    const body = li.querySelector('[data-testid=message-body]');
    return {text: body.textContent, italic: getComputedStyle(body).fontStyle === 'italic',
            recall_action: !!li.querySelector('[data-testid=recall]'),
            notice_shown: !!document.querySelector(`#messages li[data-seq='${BigInt(seq) + 1n}']`)};
"#;

async fn wait_recalled(c: &Client, seq: &str) -> anyhow::Result<Value> {
    let v = wait_js(c, &format!("message {seq} recalled"), RECALLED_JS, vec![json!(seq)]).await?;
    assert_eq!(v["text"], json!("message recalled"), "{v}");
    assert_eq!(v["italic"], json!(true), "a recalled message is set apart: {v}");
    assert_eq!(v["recall_action"], json!(false), "{v}");
    assert_eq!(v["notice_shown"], json!(false), "the recall notice is no bubble: {v}");
    Ok(v)
}

/// The read marker shown in the open conversation: `{seq, text}` of the one message that has it.
const SEEN_JS: &str = r#"
    const marks = [...document.querySelectorAll('#messages [data-testid=seen]')];
    if (marks.length !== 1) return marks.length ? {count: marks.length} : null;
    return {seq: marks[0].closest('li[data-testid=message]')?.dataset.seq ?? null, text: marks[0].textContent};
"#;

/// Wait until the open conversation marks message `seq` (and no other) as read with `text`.
async fn wait_seen(c: &Client, seq: &str, text: &str) -> anyhow::Result<()> {
    let want = json!({"seq": seq, "text": text});
    wait_js(
        c,
        &format!("{text:?} under message {seq}"),
        &format!("const v = (() => {{ {SEEN_JS} }})(); return JSON.stringify(v) === JSON.stringify(arguments[0]) ? v : null;"),
        vec![want],
    )
    .await?;
    Ok(())
}

/// The entry of user `arguments[1]` in the friends panel's list `arguments[0]` (`friends`,
/// `incoming`, `outgoing`, `blocked`, `watchers`, `watching`, `watch-incoming`,
/// `watch-outgoing`): `{name, note, lists}` (`lists`: every list that user is in), or null.
const ROSTER_JS: &str = r#"
    const [list, user] = arguments;
    const li = document.querySelector(`#friends-block li[data-testid=roster-entry][data-list='${list}'][data-user='${user}']`);
    if (!li) return null;
    return {name: li.querySelector('[data-testid=roster-name]').textContent,
            note: li.querySelector('[data-testid=roster-note]')?.textContent ?? null,
            lists: [...document.querySelectorAll(`#friends-block li[data-user='${user}']`)].map(l => l.dataset.list)};
"#;

async fn wait_roster(c: &Client, list: &str, user: &str) -> anyhow::Result<Value> {
    wait_js(c, &format!("user {user} in the {list} list"), ROSTER_JS, vec![json!(list), json!(user)]).await
}

/// The presence shown for user `arguments[1]` in the friends panel's list `arguments[0]`
/// (`friends` or `watching`), once it is `arguments[2]` with status text `arguments[3]` (none if
/// null): `{state, label, text, dot}`.
const PRESENCE_JS: &str = r#"
    const [list, user, state, text] = arguments;
    const li = document.querySelector(`#friends-block li[data-testid=roster-entry][data-list='${list}'][data-user='${user}']`);
    if (!li || li.dataset.presence !== state) return null;
    const shown = li.querySelector('[data-testid=presence-status]')?.textContent ?? null;
    if (shown !== text) return null;
    return {state: li.dataset.presence, label: li.querySelector('[data-testid=presence-label]')?.textContent ?? null,
            text: shown, dot: li.querySelector('.presence-dot')?.className ?? null};
"#;

async fn wait_presence(
    c: &Client,
    list: &str,
    user: &str,
    state: &str,
    text: Option<&str>,
) -> anyhow::Result<Value> {
    wait_js(
        c,
        &format!("user {user} in the {list} list shown {state} with text {text:?}"),
        PRESENCE_JS,
        vec![json!(list), json!(user), json!(state), json!(text)],
    )
    .await
}

/// Wait until user `user` is in no list of the friends panel.
async fn wait_no_roster(c: &Client, user: &str) -> anyhow::Result<()> {
    wait_js(
        c,
        &format!("user {user} in no roster list"),
        "return !document.querySelector(`#friends-block li[data-testid=roster-entry][data-user='${arguments[0]}']`);",
        vec![json!(user)],
    )
    .await?;
    Ok(())
}

/// Wait until the page's banner says something containing `text`.
async fn wait_flash(c: &Client, text: &str) -> anyhow::Result<()> {
    wait_js(
        c,
        &format!("{text:?} flashed"),
        "return document.getElementById('flash').textContent.includes(arguments[0]);",
        vec![json!(text)],
    )
    .await?;
    Ok(())
}

/// Set this page's presence from the status form: `state` the option's value (1 online, 2 away,
/// 3 busy), with status `text`; wait until the page shows it set (`name`).
async fn set_presence(c: &Client, state: &str, name: &str, text: &str) -> anyhow::Result<()> {
    fill(c, "#presence-text", text).await?;
    js(c, "document.getElementById('presence-state').value = arguments[0];", vec![json!(state)]).await?;
    click(c, "#presence-btn").await?;
    wait_js(
        c,
        &format!("own status set to {name}"),
        "return document.getElementById('presence-form').dataset.state === arguments[0];",
        vec![json!(name)],
    )
    .await?;
    Ok(())
}

/// The seqs of the open conversation's messages shown as burned, once there are some.
const BURNED_JS: &str = r#"
    const seqs = [...document.querySelectorAll('#messages li[data-burned=true]')]
        .filter(li => li.querySelector('[data-testid=message-body]').textContent === 'message burned')
        .map(li => li.dataset.seq);
    return seqs.length ? seqs : null;
"#;

/// Open the page, register `name` with the form and wait until it is logged in; its user id.
async fn register(c: &Client, url: &str, name: &str) -> anyhow::Result<String> {
    c.goto(url).await?;
    // Content-Security-Policy violations would break the page silently: record them.
    js(
        c,
        "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', \
         e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));",
        vec![],
    )
    .await?;
    fill(c, "#auth-name", name).await?;
    fill(c, "#auth-password", PASSWORD).await?;
    click(c, "#register-btn").await?;
    logged_in(c, name).await
}

/// Wait for the chat view; the user id the page shows.
async fn logged_in(c: &Client, name: &str) -> anyhow::Result<String> {
    let id = wait_js(
        c,
        &format!("{name} logged in"),
        "return document.getElementById('chat-view').hidden ? null : document.getElementById('my-user-id').textContent;",
        vec![],
    )
    .await?;
    let state = js(c, "return document.getElementById('conn-state').dataset.state;", vec![]).await?;
    assert_eq!(state, json!("online"));
    Ok(id.as_str().unwrap().to_string())
}

/// Open the conversation `key` (`d:<user>`, `g:<group>`, `r:<room>`) from the sidebar.
async fn open_conv(c: &Client, key: &str) -> anyhow::Result<()> {
    let sel = format!("button[data-testid=conv-item][data-key='{key}']");
    wait_js(
        c,
        &format!("{key} in the sidebar"),
        "return !!document.querySelector(arguments[0]);",
        vec![json!(sel)],
    )
    .await?;
    click(c, &sel).await?;
    wait_js(
        c,
        &format!("{key} open"),
        "return document.getElementById('conv-pane').dataset.key === arguments[0] && !document.getElementById('conv-pane').hidden;",
        vec![json!(key)],
    )
    .await?;
    Ok(())
}

/// Type `text` into the composer and send it.
async fn send(c: &Client, text: &str) -> anyhow::Result<()> {
    fill(c, "#composer-input", text).await?;
    click(c, "#send-btn").await
}

/// Record the states every message with body `text` is shown in (the page replaces message
/// elements, so each added one shows one state).
async fn watch_states(c: &Client, text: &str) -> anyhow::Result<()> {
    js(
        c,
        "const text = arguments[0]; window.__states = [];
         new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
           if (n.dataset?.testid === 'message' && n.querySelector('[data-testid=message-body]')?.textContent === text)
             window.__states.push(n.dataset.state); })
         .observe(document.getElementById('messages'), {childList: true});",
        vec![json!(text)],
    )
    .await?;
    Ok(())
}

async fn screenshot(c: &Client, dir: &Path, name: &str) {
    match c.screenshot().await {
        Ok(png) => {
            let path = dir.join(format!("{name}.png"));
            std::fs::write(&path, png).unwrap();
            eprintln!("screenshot: {}", path.display());
        }
        Err(e) => eprintln!("screenshot {name} failed: {e}"),
    }
}

/// Everything the two pages do; `a` is alice's page, `b` bob's.
async fn scenario(
    tcp: SocketAddr,
    ws: SocketAddr,
    a: &Client,
    b: &Client,
    shots: &Path,
) -> anyhow::Result<()> {
    let url = format!("http://{ws}/");
    let alice = register(a, &url, "alice").await?;
    let bob = register(b, &url, "bob").await?;
    assert_ne!(alice, bob);

    // Alice starts a chat with bob's id, read off bob's page, and writes.
    fill(a, "#new-chat-id", &bob).await?;
    click(a, "#new-chat-btn").await?;
    wait_js(
        a,
        "chat with bob open",
        "return document.getElementById('conv-pane').dataset.key === 'd:' + arguments[0];",
        vec![json!(bob)],
    )
    .await?;
    let hello = "hello bob, it's alice";
    watch_states(a, hello).await?;
    send(a, hello).await?;
    let mine = wait_message(a, hello, Some("sent")).await?;
    assert_eq!((mine["from"].as_str(), mine["mine"].as_bool()), (Some(&*alice), Some(true)), "{mine}");
    assert!(mine["seq"].is_string(), "an acknowledged message shows its seq: {mine}");
    let mut states: Vec<String> = serde_json::from_value(js(a, "return window.__states;", vec![]).await?)?;
    states.dedup(); // a message is drawn again, in the same state, when others change
    assert_eq!(states, ["sending", "sent"], "delivery states of alice's message");

    // Bob sees it in a new chat with alice, with her as the sender, and acknowledges it.
    open_conv(b, &format!("d:{alice}")).await?;
    let got = wait_message(b, hello, Some("acked")).await?;
    assert_eq!(got["from"], json!(alice), "{got}");
    assert_eq!(got["from_label"], json!(format!("user {alice}")), "{got}");
    assert_eq!(got["mine"], json!(false));
    // Bob's page, visible with the chat open, tells it read; alice's says so under her message.
    let hello_seq = mine["seq"].as_str().unwrap().to_string();
    wait_seen(a, &hello_seq, "Seen").await?;
    assert_eq!(js(b, SEEN_JS, vec![]).await?, Value::Null, "bob has no message of his own yet");
    let reply = "hi alice, bob here";
    send(b, reply).await?;
    wait_message(b, reply, Some("sent")).await?;
    let back = wait_message(a, reply, None).await?;
    assert_eq!(back["from"], json!(bob), "{back}");
    wait_message(a, hello, Some("sent")).await?;
    wait_message(a, reply, Some("acked")).await?;
    // Alice read bob's reply: his page marks it; hers still marks her message.
    let reply_seq = back["seq"].as_str().unwrap().to_string();
    wait_seen(b, &reply_seq, "Seen").await?;
    wait_seen(a, &hello_seq, "Seen").await?;
    screenshot(a, shots, "1-alice-chat").await;
    screenshot(b, shots, "1-bob-chat").await;

    // Typing: alice types without sending; bob's page says so. Alice's page lists its session.
    fill(a, "#composer-input", "still typ").await?;
    wait_js(
        b,
        "alice is typing",
        "return document.getElementById('typing').textContent === arguments[0];",
        vec![json!(format!("user {alice} is typing…"))],
    )
    .await?;
    fill(a, "#composer-input", "").await?;
    click(a, "#sessions-btn").await?;
    wait_js(
        a,
        "alice's sessions",
        "const l = document.querySelectorAll('#session-list li'); return l.length === 1 && l[0].textContent.includes('(this page)');",
        vec![],
    )
    .await?;

    // A group: alice creates it, adds bob by id, writes; bob finds it in his list.
    fill(a, "#new-group-name", "tim fans").await?;
    click(a, "#new-group-btn").await?;
    let key = wait_js(
        a,
        "the new group open",
        "const p = document.getElementById('conv-pane'); return p.dataset.kind === 'group' ? p.dataset.key : null;",
        vec![],
    )
    .await?;
    let group_key = key.as_str().unwrap().to_string();
    wait_message(a, "you created the group", None).await?;
    fill(a, "#add-member-id", &bob).await?;
    click(a, "#add-member-btn").await?;
    wait_js(
        a,
        "2 members",
        "return document.getElementById('group-info').textContent.startsWith('2 members');",
        vec![],
    )
    .await?;
    wait_message(a, &format!("you added user {bob}"), None).await?;
    let to_group = "hello group";
    send(a, to_group).await?;
    wait_message(a, to_group, Some("sent")).await?;
    open_conv(b, &group_key).await?;
    let g = wait_message(b, to_group, None).await?;
    assert_eq!(g["from"], json!(alice), "{g}");
    // Bob read it: alice's page counts him under her message.
    wait_seen(a, g["seq"].as_str().unwrap(), "Seen by 1").await?;
    wait_message(b, &format!("user {alice} added you"), None).await?;
    wait_js(
        b,
        "the group's name",
        "return document.getElementById('conv-title').textContent === 'tim fans';",
        vec![],
    )
    .await?;

    // Alice takes a message back with its "recall" action: both pages show it recalled, live.
    let oops = "oops, wrong chat";
    send(a, oops).await?;
    let sent = wait_message(a, oops, Some("sent")).await?;
    let oops_seq = sent["seq"].as_str().unwrap().to_string();
    wait_message(b, oops, None).await?;
    let theirs = js(
        b,
        "return !!document.querySelector(`#messages li[data-seq='${arguments[0]}'] [data-testid=recall]`);",
        vec![json!(oops_seq)],
    )
    .await?;
    assert_eq!(theirs, json!(false), "only one's own messages have the recall action");
    click(a, &format!("#messages li[data-seq='{oops_seq}'] [data-testid=recall]")).await?;
    wait_recalled(a, &oops_seq).await?;
    wait_recalled(b, &oops_seq).await?;
    assert_eq!(js(b, MESSAGE_JS, vec![json!(oops), json!(null)]).await?, Value::Null, "the text is gone");
    screenshot(b, shots, "1-bob-recalled").await;

    // A live room: alice creates it, bob joins by its id, both publish.
    click(a, "#room-create-btn").await?;
    let room = wait_js(
        a,
        "the new room open",
        "const p = document.getElementById('conv-pane'); return p.dataset.kind === 'room' ? p.dataset.key.slice(2) : null;",
        vec![],
    )
    .await?;
    let room = room.as_str().unwrap().to_string();
    fill(b, "#room-join-id", &room).await?;
    click(b, "#room-join-btn").await?;
    wait_js(
        b,
        "the room open on bob's page",
        "return document.getElementById('conv-pane').dataset.key === arguments[0];",
        vec![json!(format!("r:{room}"))],
    )
    .await?;
    send(a, "live from alice").await?;
    assert_eq!(wait_message(b, "live from alice", None).await?["from"], json!(alice));
    send(b, "live from bob").await?;
    assert_eq!(wait_message(a, "live from bob", None).await?["from"], json!(bob));

    // Alice's second device (the binary protocol, over TCP) writes enough for more than one
    // history page; both pages get the messages live.
    let bob_id: u64 = bob.parse()?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut second = tim::client::Client::connect(tcp)?;
        second.set_timeout(Some(WAIT))?;
        second.login("alice", PASSWORD, 3, "laptop")?;
        for i in 1..=BULK {
            second.send_wait(bob_id, i, format!("bulk {i}").as_bytes())?;
        }
        Ok(())
    })
    .await??;
    open_conv(a, &format!("d:{bob}")).await?;
    wait_message(a, &format!("bulk {BULK}"), Some("sent")).await?;

    screenshot(a, shots, "2-alice-bulk").await;
    screenshot(b, shots, "2-bob-room").await;

    // Alice sets a nickname; bob's page shows it after his next login.
    fill(a, "#nickname", "Alice A").await?;
    click(a, "#nickname-btn").await?;
    wait_js(
        a,
        "the nickname saved",
        "return document.getElementById('flash').textContent.includes('Alice A');",
        vec![],
    )
    .await?;

    // Bob reloads his page and logs in again: his chats come back (the 1:1 list from this
    // browser's storage, groups from the server) and history is read from the store.
    b.refresh().await?;
    wait_js(
        b,
        "the login form after a reload",
        "return !document.getElementById('auth-view').hidden;",
        vec![],
    )
    .await?;
    let name = js(b, "return document.getElementById('auth-name').value;", vec![]).await?;
    assert_eq!(name, json!("bob"), "the page remembers the last name");
    fill(b, "#auth-password", PASSWORD).await?;
    click(b, "#login-btn").await?;
    assert_eq!(logged_in(b, "bob").await?, bob);
    open_conv(b, &format!("d:{alice}")).await?;
    wait_js(
        b,
        "alice's nickname",
        "return document.getElementById('conv-title').textContent === arguments[0];",
        vec![json!(format!("Alice A ({alice})"))],
    )
    .await?;
    wait_message(b, &format!("bulk {BULK}"), None).await?;
    // One page (the newest 30) at first; the rest behind "load older".
    wait_js(b, "the load older button", "return !document.getElementById('load-older-btn').hidden;", vec![])
        .await?;
    let first = js(b, MESSAGE_JS, vec![json!(hello), json!(null)]).await?;
    assert_eq!(first, Value::Null, "the first page holds only the newest messages");
    click(b, "#load-older-btn").await?;
    let old = wait_message(b, hello, None).await?;
    assert_eq!(old["from"], json!(alice), "{old}");
    wait_message(b, reply, Some("sent")).await?;
    wait_js(
        b,
        "the start of the conversation",
        "return document.getElementById('load-older-btn').hidden && document.getElementById('history-state').textContent === 'start of the conversation';",
        vec![],
    )
    .await?;
    let seqs = js(
        b,
        "return [...document.querySelectorAll('#messages li[data-seq]')].map(li => Number(li.dataset.seq));",
        vec![],
    )
    .await?;
    let seqs: Vec<u64> = serde_json::from_value(seqs)?;
    assert_eq!(seqs, (1..=BULK + 2).collect::<Vec<_>>(), "every message once, by seq");
    screenshot(b, shots, "3-bob-reloaded-history").await;
    open_conv(b, &group_key).await?;
    wait_message(b, to_group, Some("acked")).await?;
    // From the store, the recalled message is a tombstone, and the recall notice no bubble.
    wait_recalled(b, &oops_seq).await?;
    screenshot(b, shots, "4-bob-reloaded-group").await;
    let hidden = js(b, "return document.getElementById('burn-toggle').hidden;", vec![]).await?;
    assert_eq!(hidden, json!(true), "no burn after read in a group");

    // Presence watches: bob (no friend of alice) asks to see her status; alice's page shows the
    // ask live and she allows it; bob's watching list shows her presence and follows it live
    // (she goes busy with a text); then she revokes it: bob's page drops her.
    fill(b, "#add-watch-id", &alice).await?;
    click(b, "#add-watch-btn").await?;
    let w = wait_roster(b, "watch-outgoing", &alice).await?;
    assert_eq!(w["lists"], json!(["watch-outgoing"]), "{w}");
    let w = wait_roster(a, "watch-incoming", &bob).await?;
    assert_eq!(w["lists"], json!(["watch-incoming"]), "{w}");
    wait_flash(a, "asks to see your status").await?;
    click_now(a, &format!("#watch-incoming-list li[data-user='{bob}'] [data-testid=allow]")).await?;
    let w = wait_roster(a, "watchers", &bob).await?;
    assert_eq!(w["lists"], json!(["watchers"]), "alice: bob watches her, no longer asks: {w}");
    let w = wait_roster(b, "watching", &alice).await?;
    assert_eq!(w["lists"], json!(["watching"]), "bob: he watches alice, no longer asks: {w}");
    let p = wait_presence(b, "watching", &alice, "online", None).await?;
    assert_eq!(p["dot"], json!("presence-dot presence-online"), "{p}");
    set_presence(a, "3", "busy", "in a meeting").await?;
    let p = wait_presence(b, "watching", &alice, "busy", Some("in a meeting")).await?;
    assert_eq!((&p["label"], &p["dot"]), (&json!("busy"), &json!("presence-dot presence-busy")), "{p}");
    screenshot(b, shots, "5-bob-watching-alice").await;
    click_now(a, &format!("#watchers-list li[data-user='{bob}'] [data-testid=revoke]")).await?;
    wait_no_roster(b, &alice).await?;
    wait_flash(b, "no longer lets you see their status").await?;
    wait_no_roster(a, &bob).await?;

    // Friends: alice asks bob from her friends panel, with a note; bob's page shows the request
    // live, he accepts; both pages list each other as friends, and the requests are gone.
    fill(a, "#add-friend-id", &bob).await?;
    fill(a, "#add-friend-note", "it's alice from the chat").await?;
    click(a, "#add-friend-btn").await?;
    let out = wait_roster(a, "outgoing", &bob).await?;
    assert_eq!(out["note"], json!("“it's alice from the chat”"), "{out}");
    let req = wait_roster(b, "incoming", &alice).await?;
    assert_eq!(
        (&req["name"], &req["note"], &req["lists"]),
        (&json!(format!("Alice A ({alice})")), &json!("“it's alice from the chat”"), &json!(["incoming"])),
        "{req}"
    );
    wait_js(
        b,
        "the request flashed",
        "return document.getElementById('flash').textContent.includes('sent you a friend request');",
        vec![],
    )
    .await?;
    screenshot(b, shots, "5-bob-friend-request").await;
    click_now(b, &format!("#incoming-list li[data-user='{alice}'] [data-testid=accept]")).await?;
    let f = wait_roster(b, "friends", &alice).await?;
    assert_eq!(f["lists"], json!(["friends"]), "bob: alice is a friend, no longer a request: {f}");
    let f = wait_roster(a, "friends", &bob).await?;
    assert_eq!(f["lists"], json!(["friends"]), "alice: bob is a friend, no longer a request: {f}");
    wait_js(
        a,
        "the acceptance flashed",
        "return document.getElementById('flash').textContent.includes('accepted your friend request');",
        vec![],
    )
    .await?;
    screenshot(a, shots, "5-alice-friends").await;

    // Presence: bob's friends panel shows alice as she left it, busy "in a meeting" (read with
    // presence_get when the list loaded, or pushed on the acceptance). Alice sets "away" with a
    // status text on her page; bob's panel shows it live (a presence_notice).
    let p = wait_presence(b, "friends", &alice, "busy", Some("in a meeting")).await?;
    assert_eq!(p["dot"], json!("presence-dot presence-busy"), "{p}");
    set_presence(a, "2", "away", "out for lunch").await?;
    let p = wait_presence(b, "friends", &alice, "away", Some("out for lunch")).await?;
    assert_eq!(p["dot"], json!("presence-dot presence-away"), "{p}");
    assert_eq!(p["label"], json!("away"), "{p}");
    screenshot(b, shots, "5-bob-alice-away").await;

    // Burn after read: alice ticks the toggle and writes; bob has the chat open, so his page
    // reads it and it burns: both pages show "message burned", the burn notice is no bubble.
    click_now(b, &format!("#friend-list li[data-user='{alice}'] [data-testid=chat]")).await?;
    wait_js(
        b,
        "the chat with alice open from the friends list",
        "return document.getElementById('conv-pane').dataset.key === arguments[0];",
        vec![json!(format!("d:{alice}"))],
    )
    .await?;
    let secret = "this message burns";
    click(a, "#burn-check").await?;
    send(a, secret).await?;
    let burned_b = wait_js(b, "the message burned on bob's page", BURNED_JS, vec![]).await?;
    let burned_a = wait_js(a, "the message burned on alice's page", BURNED_JS, vec![]).await?;
    assert_eq!(burned_a, burned_b, "the same message burned on both pages");
    let seq: u64 = burned_a[0].as_str().unwrap().parse()?;
    for c in [a, b] {
        assert_eq!(
            js(c, MESSAGE_JS, vec![json!(secret), json!(null)]).await?,
            Value::Null,
            "the text is gone"
        );
        let notice = js(
            c,
            "return !!document.querySelector(`#messages li[data-seq='${arguments[0]}']`);",
            vec![json!((seq + 1).to_string())],
        )
        .await?;
        assert_eq!(notice, json!(false), "the burn notice is no bubble");
    }
    screenshot(a, shots, "6-alice-burned").await;

    // A large message: alice pastes a long text (over body_bytes_max, so tim.js sends it in
    // send_part chunks); both pages show its start, its size and "show all", which shows it whole.
    click(a, "#burn-check").await?;
    let long: String = (0..4000).map(|i| format!("a long pasted text, line {i}\n")).collect();
    js(
        a,
        "document.getElementById('composer-input').value = arguments[0]; document.getElementById('composer').requestSubmit();",
        vec![json!(long)],
    )
    .await?;
    let size = long.len().to_string();
    let mine = wait_js(a, "alice's large message sent", LONG_JS, vec![json!(size), json!("sent")]).await?;
    let theirs = wait_js(b, "bob's large message", LONG_JS, vec![json!(size), json!(null)]).await?;
    for m in [&mine, &theirs] {
        assert_eq!(m["shown"], json!(2001), "the start of it, and an ellipsis: {m}");
        let note = format!("{:.1} KB message show all", long.len() as f64 / 1024.0);
        assert_eq!(m["note"], json!(note), "{m}");
    }
    assert_eq!(mine["seq"], theirs["seq"], "the same message on both pages");
    screenshot(b, shots, "7-bob-large-message").await;
    click_now(b, &format!("#messages li[data-size='{size}'] [data-testid=show-all]")).await?;
    wait_js(
        b,
        "the large message shown whole",
        "const li = document.querySelector(`#messages li[data-size='${arguments[0]}']`); \
         return li?.querySelector('[data-testid=message-body]').textContent === arguments[1];",
        vec![json!(size), json!(long)],
    )
    .await?;

    // Logging out ends the session and brings back the form.
    click(a, "#logout-btn").await?;
    wait_js(
        a,
        "the login form after logging out",
        "return !document.getElementById('auth-view').hidden && document.getElementById('conn-state').dataset.state === 'offline';",
        vec![],
    )
    .await?;

    for c in [a, b] {
        let v = js(c, "return window.__cspViolations ?? [];", vec![]).await?;
        assert_eq!(v, json!([]), "Content-Security-Policy violations");
    }
    Ok(())
}

/// Two browsers chat through tim's web page on a server with the embedded store.
#[test]
fn chat_in_the_browser() {
    let driver = Chromedriver::start();
    let s = TestServer::start_with_store("io_uring", "backend = \"embedded\"", "");
    let ws = s.ws_addr.expect("the test server has a WebSocket listener");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = Instant::now();
    let result = rt.block_on(async {
        let a = browser(&driver).await?;
        let b = match browser(&driver).await {
            Ok(b) => b,
            Err(e) => {
                let _ = tokio::time::timeout(Duration::from_secs(10), a.close()).await;
                return Err(e);
            }
        };
        let r = match tokio::time::timeout(SCENARIO_MAX, scenario(s.addr, ws, &a, &b, &shots)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("the browser scenario took over {SCENARIO_MAX:?}")),
        };
        if r.is_err() {
            for (c, name) in [(&a, "failed-alice"), (&b, "failed-bob")] {
                let _ = tokio::time::timeout(Duration::from_secs(10), screenshot(c, &shots, name)).await;
            }
        }
        for c in [a, b] {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
        }
        r
    });
    eprintln!("browser scenario: {:.1?}; screenshots in {}", started.elapsed(), shots.display());
    if let Err(e) = result {
        panic!("{e:#}");
    }
}
