//! `tim chat`, the terminal client: the built `tim` binary as watcher, sender, history reader and
//! interactive client, against real `tim serve` processes over real sockets on dynamic ports.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use common::{TestServer, PASSWORD};
use tim::protocol::{
    conv, group_action, join_policy, presence_state, roster_action, roster_list, GroupProfile,
};

/// The longest any `tim chat` run may take; then it is killed and the test fails.
const WAIT: Duration = Duration::from_secs(30);
const EMBEDDED: &str = "backend = \"embedded\"";
/// Cursors reach the store quickly, so a second login sees the first one's acks.
const FAST_CURSORS: &str = "[limits]\ncursor_flush_ms = 20\n";

/// A running `tim chat`, killed if the test ends first.
struct Running {
    child: Child,
    stdout: Stream,
    stderr: Stream,
    /// Its stdin, while the test types into it ([`chat_typed`]).
    input: Option<ChildStdin>,
}

/// One output of a child, line by line, as it comes.
struct Stream {
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Stream {
    fn new(pipe: impl Read + Send + 'static) -> Stream {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Stream { lines, seen: Vec::new() }
    }

    /// Read until a line contains `needle`, or fail after `WAIT`.
    fn wait_for(&mut self, needle: &str, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no {what} line with {needle:?} within {WAIT:?}; got {:?}", self.seen),
            }
        }
    }

    /// Everything, once the child has exited.
    fn rest(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(WAIT) {
            self.seen.push(line);
        }
        std::mem::take(&mut self.seen)
    }
}

#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Running {
    /// Wait for the exit, or kill the child and fail after `WAIT`.
    fn finish(mut self) -> Finished {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("tim chat still running after {WAIT:?}; stderr so far: {:?}", self.stderr.seen);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Finished { status, stdout: self.stdout.rest(), stderr: self.stderr.rest().join("\n") }
    }

    /// Type one line into an interactive `tim chat` ([`chat_typed`]).
    fn type_line(&mut self, line: &str) {
        let input = self.input.as_mut().expect("started with chat_typed");
        writeln!(input, "{line}").and_then(|()| input.flush()).unwrap();
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tim chat --addr SERVER --user USER ARGS…`, the password in TIM_PASSWORD, `stdin` piped in
/// (then closed) or none.
fn chat(s: &TestServer, user: &str, args: &[&str], stdin: Option<&str>) -> Running {
    chat_as(s, &["--user", user], args, stdin)
}

/// `tim chat --addr SERVER --user USER interactive`, its stdin kept open for
/// [`Running::type_line`] (closing it, on drop of the input, ends the chat).
fn chat_typed(s: &TestServer, user: &str) -> Running {
    let mut r = spawn_chat(s, &["--user", user], &["interactive"], true);
    r.input = r.child.stdin.take();
    r
}

/// As [`chat`], logging in with the options `login`.
fn chat_as(s: &TestServer, login: &[&str], args: &[&str], stdin: Option<&str>) -> Running {
    let mut r = spawn_chat(s, login, args, stdin.is_some());
    if let Some(text) = stdin {
        let mut pipe = r.child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    r
}

fn spawn_chat(s: &TestServer, login: &[&str], args: &[&str], stdin: bool) -> Running {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tim"));
    // SAFETY: prctl is async-signal-safe. The child dies with the test's thread.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.args(["chat", "--addr", &s.addr.to_string()])
        .args(login)
        .args(args)
        .env("TIM_PASSWORD", PASSWORD)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start tim chat");
    let stdout = Stream::new(child.stdout.take().unwrap());
    let stderr = Stream::new(child.stderr.take().unwrap());
    Running { child, stdout, stderr, input: None }
}

/// The lines without their `[time] ` prefix.
fn messages(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| match l.split_once("] ") {
            Some((time, rest)) if time.starts_with('[') => rest.to_string(),
            _ => panic!("not a message line: {l:?}"),
        })
        .collect()
}

fn json(lines: &[String]) -> Vec<serde_json::Value> {
    lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

/// Lines piped into `send` reach a `watch --count` of the recipient in order, with their sender
/// (the empty line skipped); both exit 0.
#[test]
fn piped_lines_reach_a_watcher_in_order() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut watcher = chat(&s, &bob, &["watch", "--count", "3"], None);
    let login = watcher.stderr.wait_for("logged in as", "stderr");
    assert!(login.contains(&format!("(user {bob_id})")), "{login}");

    let to = bob_id.to_string();
    let lines = "hello bob\nsecond line\n\nthird ✓\n";
    let sent = chat(&s, &alice, &["send", "--to", &to], Some(lines)).finish();
    assert!(sent.status.success(), "{sent:?}");
    assert!(sent.stdout.is_empty(), "{sent:?}");

    let watched = watcher.finish();
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(
        messages(&watched.stdout),
        [
            format!("{alice_id} → you: hello bob"),
            format!("{alice_id} → you: second line"),
            format!("{alice_id} → you: third ✓"),
        ]
    );
}

/// A wrong password and a refused send exit 1 with the error code's name on stderr.
#[test]
fn refusals_exit_nonzero_with_the_error_code_name() {
    let s = TestServer::start("io_uring", "");
    let (alice, _) = s.register("alice");
    let wrong =
        chat(&s, &alice, &["--password", "not the password", "send", "--to", "1", "hi"], None).finish();
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(wrong.stderr.contains("WrongPassword"), "{wrong:?}");

    let nobody = chat(&s, &alice, &["send", "--to", "999999", "hi"], None).finish();
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
    assert!(nobody.stderr.contains("UnknownRecipient"), "{nobody:?}");

    let by_name = chat(&s, &alice, &["send", "--to", "bob", "hi"], None).finish();
    assert_eq!(by_name.status.code(), Some(2), "{by_name:?}");
    assert!(by_name.stderr.contains("no lookup by name"), "{by_name:?}");
}

/// `--register` creates the account (and, run again, logs in to it); `history` then prints what
/// was sent, oldest first, on both sides, and as JSON.
#[test]
fn history_prints_the_sent_messages() {
    let s = TestServer::start_with_store("io_uring", EMBEDDED, "");
    let (bob, bob_id) = s.register("bob");
    let carol = s.name("carol");
    let to = bob_id.to_string();

    let first = chat(&s, &carol, &["--register", "send", "--to", &to, "first", "words"], None).finish();
    assert!(first.status.success(), "{first:?}");
    let carol_id: u64 = first
        .stderr
        .split_once(&format!("registered {carol} (user "))
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(id, _)| id.parse().unwrap())
        .unwrap_or_else(|| panic!("{first:?}"));
    let again = chat(&s, &carol, &["--register", "send", "--to", &to], Some("second\nthird\n")).finish();
    assert!(again.status.success(), "{again:?}");
    assert!(again.stderr.contains("registered already"), "{again:?}");

    let with_carol = carol_id.to_string();
    let page = chat(&s, &bob, &["history", "--with", &with_carol], None).finish();
    assert!(page.status.success(), "{page:?}");
    assert_eq!(
        messages(&page.stdout),
        [
            format!("{carol_id} → you: first words"),
            format!("{carol_id} → you: second"),
            format!("{carol_id} → you: third"),
        ]
    );
    let mine = chat(&s, &carol, &["history", "--with", &to], None).finish();
    assert_eq!(messages(&mine.stdout)[0], format!("you → {bob_id}: first words"), "{mine:?}");

    let newest = chat(&s, &bob, &["history", "--with", &with_carol, "--limit", "2", "--json"], None).finish();
    let got = json(&newest.stdout);
    let seqs: Vec<_> =
        got.iter().map(|v| (v["seq"].as_u64(), v["text"].as_str(), v["from"].as_u64())).collect();
    assert_eq!(seqs, [(Some(2), Some("second"), Some(carol_id)), (Some(3), Some("third"), Some(carol_id))]);
    let older = chat(&s, &bob, &["history", "--with", &with_carol, "--before", "2"], None).finish();
    assert_eq!(messages(&older.stdout), [format!("{carol_id} → you: first words")]);
}

/// `watch` prints what the device missed (the login's catch-up) and acknowledges it: the same
/// device's next watch starts after what was printed, another device gets everything.
#[test]
fn watch_catches_up_and_moves_the_device_cursor() {
    let s = TestServer::start_with_store("io_uring", EMBEDDED, FAST_CURSORS);
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let to = bob_id.to_string();
    let sent = chat(&s, &alice, &["send", "--to", &to], Some("one\ntwo\nthree\n")).finish();
    assert!(sent.status.success(), "{sent:?}");

    let laptop = ["--device-id", "laptop", "watch", "--json"];
    let first = chat(&s, &bob, &[&laptop[..], &["--count", "2"]].concat(), None).finish();
    assert!(first.status.success(), "{first:?}");
    let got = json(&first.stdout);
    let texts: Vec<_> = got.iter().map(|v| (v["seq"].as_u64(), v["text"].as_str())).collect();
    assert_eq!(texts, [(Some(1), Some("one")), (Some(2), Some("two"))]);
    assert!(got.iter().all(|v| v["from"].as_u64() == Some(alice_id) && v["type"] == "message"));

    std::thread::sleep(Duration::from_millis(200)); // > cursor_flush_ms
    let next = chat(&s, &bob, &[&laptop[..], &["--count", "1"]].concat(), None).finish();
    let texts: Vec<_> = json(&next.stdout).iter().map(|v| v["text"].as_str().map(String::from)).collect();
    assert_eq!(texts, [Some("three".to_string())], "{next:?}");

    let phone = chat(&s, &bob, &["--device-id", "phone", "watch", "--count", "3"], None).finish();
    assert_eq!(phone.stdout.len(), 3, "another device has its own cursor: {phone:?}");
}

/// A group message sent with `send --group` reaches a member's watch, named by group; a
/// non-member's send is refused with NotMember.
#[test]
fn group_messages_reach_a_members_watch() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, _) = s.register("bob");
    let (carol, _) = s.register("carol");
    let (mut founder, _) = s.login(&alice, 3);
    let profile = GroupProfile {
        name: "chat test".into(),
        topic: String::new(),
        avatar_url: String::new(),
        extra: Vec::new(),
        join_policy: join_policy::OPEN,
        invite_policy: 0,
    };
    let group = founder.group_create(profile).unwrap();
    let (mut member, _) = s.login(&bob, 3);
    member.group_action(group, group_action::JOIN, 0, 0, "").unwrap();

    let mut watcher = chat(&s, &bob, &["watch", "--count", "2"], None);
    watcher.stderr.wait_for("logged in as", "stderr");
    let g = group.to_string();
    let sent = chat(&s, &alice, &["send", "--group", "--to", &g], Some("hi all\nsecond\n")).finish();
    assert!(sent.status.success(), "{sent:?}");
    let watched = watcher.finish();
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(
        messages(&watched.stdout),
        [format!("{alice_id} → group {group}: hi all"), format!("{alice_id} → group {group}: second")]
    );

    let outsider = chat(&s, &carol, &["send", "--to", &g, "let me in"], None).finish();
    assert_eq!(outsider.status.code(), Some(1), "{outsider:?}");
    assert!(outsider.stderr.contains("NotMember"), "{outsider:?}");
}

/// A watch pings, so it outlives the server's idle timeout several times over, and Ctrl-C
/// (SIGINT) ends it cleanly with status 0.
#[test]
fn a_watch_outlives_the_idle_timeout_and_stops_on_ctrl_c() {
    let s = TestServer::start("io_uring", "[limits]\nidle_timeout_ms = 600\n");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut watcher = chat(&s, &bob, &["watch"], None);
    watcher.stderr.wait_for("logged in as", "stderr");
    std::thread::sleep(Duration::from_millis(2_000));
    let (mut a, _) = s.login(&alice, 3);
    a.send_wait(bob_id, 1, b"still there?").unwrap();
    watcher.stdout.wait_for("still there?", "stdout");
    watcher.signal(libc::SIGINT);
    let watched = watcher.finish();
    assert!(watched.status.success(), "{watched:?}");
}

/// A kick (a newer login past the device limit) ends a watch with status 1 and says why.
#[test]
fn a_kick_ends_a_watch_with_its_reason() {
    let s = TestServer::start("io_uring", "[sessions]\nper_device_type_max = 1\n");
    let (bob, _) = s.register("bob");
    let mut watcher = chat(&s, &bob, &["watch", "--device-type", "web"], None);
    watcher.stderr.wait_for("logged in as", "stderr");
    let _newer = s.login(&bob, 4); // web
    let watched = watcher.finish();
    assert_eq!(watched.status.code(), Some(1), "{watched:?}");
    assert!(watched.stderr.contains("Replaced"), "{watched:?}");
}

/// Interactive mode reads commands and lines from stdin: `/to`, a plain line, `@ID text`,
/// `/quit`; both messages arrive, and each is echoed once acknowledged.
#[test]
fn interactive_mode_sends_what_is_typed() {
    let s = TestServer::start("io_uring", "");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    let script = format!("/to {bob_id}\nhello from a script\n@{bob_id} and again\n/whoami\n/quit\n");
    let typed = chat(&s, &alice, &["interactive"], Some(&script)).finish();
    assert!(typed.status.success(), "{typed:?}");
    assert_eq!(
        messages(&typed.stdout),
        [format!("you → {bob_id}: hello from a script"), format!("you → {bob_id}: and again")]
    );
    assert!(typed.stderr.contains(&format!("talking to user {bob_id}")), "{typed:?}");
    assert_eq!(b.next_delivery().unwrap().body, b"hello from a script");
    assert_eq!(b.next_delivery().unwrap().body, b"and again");
}

/// `/recall SEQ` takes back a message of the current conversation (interactive lines carry
/// their seq): the recall is echoed, the peer's watch shows the notice, `/history` the
/// tombstone; refusals are noted on stderr and the chat goes on.
#[test]
fn interactive_recall() {
    let s = TestServer::start_with_store("io_uring", EMBEDDED, "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut watcher = chat(&s, &bob, &["watch", "--count", "2"], None);
    watcher.stderr.wait_for("logged in as", "stderr");
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    typed.type_line(&format!("/to {bob_id}"));
    typed.type_line("oops, not for you");
    let line = typed.stdout.wait_for(&format!("you → {bob_id}: oops, not for you"), "stdout");
    // `[12:00:01 #1] you → 2: …`: the seq to recall.
    let seq: u64 = line
        .split_once(" #")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {line:?}"));
    typed.type_line(&format!("/recall {seq}"));
    let recalled = typed.stdout.wait_for(&format!("[seq {seq} recalled by you]"), "stdout");
    assert!(recalled.contains(&format!("#{}] you → {bob_id}: ", seq + 1)), "{recalled}");
    // Refusals: recalled already, not a seq; then the tombstone in the history page.
    typed.type_line(&format!("/recall {seq}"));
    let refused = typed.stderr.wait_for("not recalled", "stderr");
    assert!(
        refused.contains(&format!("seq {seq} of user {bob_id} not recalled: NotRecallable (35)")),
        "{refused}"
    );
    typed.type_line("/recall soon");
    typed.stderr.wait_for("soon is no message seq", "stderr");
    typed.type_line("/history");
    typed.stdout.wait_for(&format!("#{seq}] you → {bob_id}: (recalled)"), "stdout");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");

    let watched = watcher.finish();
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(
        messages(&watched.stdout),
        [
            format!("{alice_id} → you: oops, not for you"),
            format!("{alice_id} → you: [seq {seq} recalled by {alice_id}]"),
        ]
    );
}

/// Read receipts in interactive mode: the peer's `Read` prints `[seen up to #N by PEER]` once
/// per position, `/seen` asks how many read the newest message (`#N read by K of M`), and a
/// message of the peer printed in the current conversation is told read (the peer gets the
/// `ReadNotice`).
#[test]
fn interactive_read_receipts() {
    let s = TestServer::start("io_uring", FAST_CURSORS);
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    typed.type_line("/seen");
    typed.stderr.wait_for("no conversation yet", "stderr");
    typed.type_line(&format!("/to {bob_id}"));
    typed.type_line("are you there?");
    typed.stdout.wait_for(&format!("#1] you → {bob_id}: are you there?"), "stdout");
    typed.type_line("/seen");
    typed.stderr.wait_for("#1 read by 0 of 1", "stderr");

    // Bob reads it (twice: the same position prints once); alice's chat says so.
    assert_eq!(b.next_delivery().unwrap().body, b"are you there?");
    b.read(1, alice_id, 1).unwrap();
    b.read(1, alice_id, 1).unwrap();
    typed.stdout.wait_for(&format!("[seen up to #1 by {bob_id}]"), "stdout");
    std::thread::sleep(Duration::from_millis(200)); // > cursor_flush_ms: the position is stored
    typed.type_line("/seen");
    typed.stderr.wait_for("#1 read by 1 of 1", "stderr");

    // Bob answers; alice's chat prints it and tells it read.
    b.send_wait(alice_id, 7, b"yes").unwrap();
    typed.stdout.wait_for(&format!("#2] {bob_id} → you: yes"), "stdout");
    let notice = loop {
        match b.recv().unwrap() {
            tim::client::Event::ReadNotice(n) => break n,
            _ => continue,
        }
    };
    assert_eq!((notice.from, notice.to, notice.conv, notice.seq), (alice_id, bob_id, 1, 2));
    typed.type_line("/seen 2");
    typed.stderr.wait_for("#2 read by 0 of 1", "stderr");
    typed.type_line("/seen soon");
    typed.stderr.wait_for("soon is no message seq", "stderr");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
    let seen: Vec<_> = done.stdout.iter().filter(|l| l.starts_with("[seen up to")).collect();
    assert_eq!(seen, [&format!("[seen up to #1 by {bob_id}]")], "{done:?}");
}

/// `/nick` sets the nickname (kept with the rest of the profile), `/profile` shows one,
/// `/sessions` lists the account's sessions and `/logout` closes another of them.
#[test]
fn interactive_profile_and_sessions() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (mut other, _) = s.login(&alice, 1);
    let other_id = other.my_sessions().unwrap().sessions[0].session_id;
    let script =
        format!("/nick Ali\n/profile {alice_id}\n/sessions\n/logout {other_id}\n/logout 12\n/quit\n");
    let typed = chat(&s, &alice, &["interactive"], Some(&script)).finish();
    assert!(typed.status.success(), "{typed:?}");
    let err = &typed.stderr;
    assert!(err.contains("your nickname is now Ali"), "{err}");
    assert!(err.contains(&format!("user {alice_id}, nickname Ali")), "{err}");
    assert!(err.contains(&format!("  {other_id}  phone")) && err.contains("(this one)"), "{err}");
    assert!(err.contains(&format!("logged session {other_id} out")), "{err}");
    assert!(err.contains("UnknownSession"), "{err}");
    assert!(matches!(other.recv(), Ok(tim::client::Event::Kick(k)) if k.reason == 54));
    assert_eq!(
        other.profile_get(&[alice_id]).err().map(|_| ()),
        Some(()),
        "the logged-out session is closed"
    );
    let (mut b, _) = s.login(&alice, 3);
    assert_eq!(b.profile_get(&[alice_id]).unwrap()[0].profile.nickname, "Ali");
}

/// A one-shot token logs in instead of a name and password, and only once.
#[test]
fn a_token_logs_in_once() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (mut a, _) = s.login(&alice, 3);
    let token = a.issue_token(60).unwrap().token;
    let mut watcher = chat_as(&s, &["--token", &token], &["watch"], None);
    let login = watcher.stderr.wait_for("logged in as", "stderr");
    assert!(login.contains(&format!("(user {alice_id})")), "{login}");
    watcher.signal(libc::SIGTERM);
    assert!(watcher.finish().status.success());
    let again = chat_as(&s, &["--token", &token], &["watch"], None).finish();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(again.stderr.contains("InvalidToken"), "{again:?}");
}

/// Friends from the terminal: `/add` with a note (the other side, a binary client, gets the
/// request), its acceptance printed as one line, `/friends` and `/requests` list, `/block`
/// refuses the other's messages, `/unblock`; an incoming request printed with its note;
/// refusals are noted and the chat goes on.
#[test]
fn interactive_friends() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (carol, carol_id) = s.register("carol");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    typed.type_line("/friends");
    typed.stderr.wait_for("no friends yet", "stderr");
    typed.type_line(&format!("/add {bob_id} hi bob, it's alice"));
    typed.stderr.wait_for(&format!("asked user {bob_id} to be friends"), "stderr");
    let n = loop {
        if let tim::client::Event::RosterNotice(n) = b.recv().unwrap() {
            break n;
        }
    };
    assert_eq!((n.event, n.from, n.to, n.note.as_str()), (1, alice_id, bob_id, "hi bob, it's alice"));
    typed.type_line("/requests");
    let line = typed.stderr.wait_for(&format!("  {bob_id}  since "), "stderr");
    assert!(line.ends_with("\"hi bob, it's alice\""), "{line}");
    typed.stderr.wait_for("no friend requests to you", "stderr");

    // Bob accepts: alice's chat prints it; both are friends.
    assert!(b.roster_action(roster_action::ACCEPT, alice_id, "").unwrap().friends);
    typed.stdout.wait_for(&format!("[{bob_id} accepted your friend request]"), "stdout");
    typed.type_line("/friends");
    typed.stderr.wait_for("friends (1):", "stderr");
    typed.type_line(&format!("/add {bob_id}"));
    typed.stderr.wait_for("AlreadyFriends", "stderr");

    // Carol asks alice; alice's chat prints the request with its note, she accepts it.
    let mut c = s.client();
    c.login(&carol, PASSWORD, 3, "dev").unwrap();
    c.roster_action(roster_action::REQUEST, alice_id, "carol here").unwrap();
    typed.stdout.wait_for(&format!("[friend request from {carol_id}: \"carol here\"]"), "stdout");
    typed.type_line(&format!("/accept {carol_id}"));
    typed.stderr.wait_for(&format!("you and user {carol_id} are friends now"), "stderr");
    let friends = c.roster_get(roster_list::FRIENDS, 0, 0).unwrap();
    assert_eq!(friends.entries.iter().map(|e| e.user).collect::<Vec<_>>(), [alice_id]);

    // Alice blocks bob: bob hears only that the friendship ended, and his messages are refused.
    typed.type_line(&format!("/block {bob_id}"));
    typed.stderr.wait_for(&format!("blocked user {bob_id}"), "stderr");
    let n = loop {
        if let tim::client::Event::RosterNotice(n) = b.recv().unwrap() {
            break n;
        }
    };
    assert_eq!((n.event, n.from), (roster_action::REMOVE, alice_id));
    let refused = b.send_wait(alice_id, 1, b"still there?").unwrap_err();
    assert!(refused.to_string().contains("Blocked"), "{refused}");
    typed.type_line("/friends");
    typed.stderr.wait_for("blocked (1):", "stderr");
    typed.type_line(&format!("/unblock {bob_id}"));
    typed.stderr.wait_for(&format!("unblocked user {bob_id}"), "stderr");
    typed.type_line(&format!("/unfriend {bob_id}"));
    typed.stderr.wait_for("NotFriends", "stderr");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
    b.send_wait(alice_id, 2, b"unblocked").unwrap();
}

/// Presence watches from the terminal: `/watch` asks, the other's ALLOW prints and so do its
/// presence changes after it; `/watches` lists; an ask to alice prints with how to answer, and
/// `/allow` answers it; a revoke prints; a refusal names its code.
#[test]
fn interactive_watches() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    typed.type_line(&format!("/watch {bob_id}"));
    typed.stderr.wait_for(&format!("asked to see user {bob_id}'s presence"), "stderr");
    b.presence_set(presence_state::AWAY, "lunch", b"").unwrap();
    b.roster_action(roster_action::ALLOW, alice_id, "").unwrap();
    typed.stdout.wait_for(&format!("[{bob_id} lets you see their presence]"), "stdout");
    typed.stdout.wait_for(&format!("[{bob_id} is away: lunch]"), "stdout");
    b.presence_set(presence_state::BUSY, "", b"").unwrap();
    typed.stdout.wait_for(&format!("[{bob_id} is busy]"), "stdout");
    typed.type_line("/watches");
    typed.stderr.wait_for("you watch (/unwatch ID) (1):", "stderr");
    typed.stderr.wait_for("nobody watches your presence", "stderr");
    typed.type_line(&format!("/watch {bob_id}"));
    typed.stderr.wait_for("AlreadyWatching", "stderr");
    // Bob asks too: alice allows from the terminal.
    b.roster_action(roster_action::WATCH, alice_id, "").unwrap();
    typed.stdout.wait_for(
        &format!("[{bob_id} asks to see your presence (/allow {bob_id} or /deny {bob_id})]"),
        "stdout",
    );
    typed.type_line(&format!("/allow {bob_id}"));
    typed.stderr.wait_for(&format!("user {bob_id} sees your presence now"), "stderr");
    let watching = b.roster_get(roster_list::WATCHING, 0, 0).unwrap();
    assert_eq!(watching.entries.iter().map(|e| e.user).collect::<Vec<_>>(), [alice_id]);
    b.roster_action(roster_action::REVOKE, alice_id, "").unwrap();
    typed.stdout.wait_for(&format!("[you no longer see {bob_id}'s presence]"), "stdout");
    typed.type_line(&format!("/revoke {bob_id}"));
    typed.stderr.wait_for(&format!("user {bob_id} no longer sees your presence"), "stderr");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
}

/// Presence from the terminal: a friend's change printed as one line, `/status` sets this
/// user's (the friend, a binary client, is told), `/presence` prints users' states and texts;
/// an unknown state is not understood and the chat goes on.
#[test]
fn interactive_presence() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (_carol, carol_id) = s.register("carol");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    b.roster_action(roster_action::REQUEST, alice_id, "").unwrap();
    typed.stdout.wait_for(&format!("[friend request from {bob_id}]"), "stdout");
    typed.type_line(&format!("/accept {bob_id}"));
    typed.stderr.wait_for(&format!("you and user {bob_id} are friends now"), "stderr");

    // Bob goes away: alice's chat prints it as one line.
    let e = b.presence_set(presence_state::AWAY, "lunch", b"").unwrap();
    assert_eq!((e.user, e.state, e.text.as_str()), (bob_id, presence_state::AWAY, "lunch"));
    typed.stdout.wait_for(&format!("[{bob_id} is away: lunch]"), "stdout");

    // Alice sets busy with a text: bob is told.
    typed.type_line("/status busy in a meeting");
    typed.stderr.wait_for("you are busy: in a meeting", "stderr");
    let n = loop {
        if let tim::client::Event::PresenceNotice(n) = b.recv().unwrap() {
            if n.state != presence_state::ONLINE {
                break n;
            }
        }
    };
    assert_eq!((n.user, n.state, n.text.as_str()), (alice_id, presence_state::BUSY, "in a meeting"));

    // `/presence`: a friend's state and text; a user never logged in is offline.
    typed.type_line(&format!("/presence {bob_id} {carol_id}"));
    let line = typed.stderr.wait_for(&format!("  {bob_id}  away: lunch"), "stderr");
    assert!(line.contains("since "), "{line}");
    let line = typed.stderr.wait_for(&format!("  {carol_id}  "), "stderr");
    assert!(line.ends_with(&format!("  {carol_id}  offline")), "{line}");

    // Invisible: bob sees alice offline; alice sees herself invisible.
    typed.type_line("/status invisible");
    typed.stderr.wait_for("you are invisible", "stderr");
    let n = loop {
        if let tim::client::Event::PresenceNotice(n) = b.recv().unwrap() {
            if n.state != presence_state::BUSY {
                break n;
            }
        }
    };
    assert_eq!((n.user, n.state), (alice_id, presence_state::OFFLINE));
    assert_eq!(b.presence_get(&[alice_id]).unwrap()[0].state, presence_state::OFFLINE);
    typed.type_line(&format!("/presence {alice_id}"));
    typed.stderr.wait_for(&format!("  {alice_id} (you)  invisible"), "stderr");

    typed.type_line("/status gone");
    typed.stderr.wait_for("not understood: /status gone", "stderr");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
}

/// A peer's typing notices print as one line each on stdout — a repeat within a few seconds does
/// not, the stop after them does.
#[test]
fn interactive_typing_notices() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    b.typing(conv::DIRECT, alice_id, 1).unwrap();
    b.typing(conv::DIRECT, alice_id, 1).unwrap();
    typed.stdout.wait_for(&format!("* {bob_id} is typing…"), "stdout");
    b.typing(conv::DIRECT, alice_id, 0).unwrap();
    typed.stdout.wait_for(&format!("* {bob_id} stopped typing"), "stdout");
    b.typing(conv::DIRECT, alice_id, 1).unwrap();
    b.send_wait(alice_id, 1, b"done typing").unwrap();
    typed.stdout.wait_for(&format!("{bob_id} → you: done typing"), "stdout");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
    let typing: Vec<&String> = done.stdout.iter().filter(|l| l.starts_with("* ")).collect();
    let (on, off) = (format!("* {bob_id} is typing…"), format!("* {bob_id} stopped typing"));
    assert_eq!(typing, [&on, &off, &on], "{done:?}");
}

/// `/file PATH` sends a file's bytes as one message (in parts: it is over body_bytes_max), and a
/// typed line over body_bytes_max goes in parts too, after it; the binary client gets both
/// intact; the echoes print sizes. A file over large_body_bytes_max, or missing, is refused with
/// a note and the chat goes on.
#[test]
fn interactive_file_and_long_lines_go_in_parts() {
    let s = TestServer::start("io_uring", "[limits]\nlarge_body_bytes_max = 2097152\n");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blob: Vec<u8> =
        (0..(1u32 << 20) + 12_345).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    assert!(std::str::from_utf8(&blob).is_err());
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &blob).unwrap();
    let too_big = dir.path().join("big.bin");
    std::fs::write(&too_big, vec![b'x'; 3 << 20]).unwrap();
    let long = "0123456789".repeat(4_000);

    let mut typed = chat_typed(&s, &alice);
    typed.stderr.wait_for("logged in as", "stderr");
    typed.type_line(&format!("/to {bob_id}"));
    typed.type_line(&format!("/file {}", file.display()));
    typed.type_line(&long);
    typed.stdout.wait_for(&format!("#1] you → {bob_id}: [binary message, 1.0 MiB]"), "stdout");
    let echo = typed.stdout.wait_for(&format!("#2] you → {bob_id}: 0123"), "stdout");
    assert!(echo.ends_with("… [text, 39.1 KiB]"), "{echo}");
    assert!(echo.len() < 3_000, "cut: {} bytes", echo.len());
    // The line (under frame_bytes_max once stamped) may overtake the file's parts (PROTOCOL
    // 6.26): the two are taken by seq.
    let mut got = [b.next_delivery().unwrap(), b.next_delivery().unwrap()];
    got.sort_by_key(|d| d.stamp.seq);
    let [file_msg, line_msg] = got;
    assert!(file_msg.stamp.seq == 1 && file_msg.body == blob, "the file arrives intact");
    assert!(line_msg.stamp.seq == 2 && line_msg.body == long.as_bytes(), "the line arrives intact");
    assert!(b.parts_received > 16, "{} parts", b.parts_received);

    typed.type_line(&format!("/file {}", too_big.display()));
    typed.stderr.wait_for("big.bin not sent: BodyTooLarge: 3145728 bytes (3.0 MiB)", "stderr");
    typed.type_line(&format!("/file {}", dir.path().join("missing").display()));
    typed.stderr.wait_for("missing not sent: No such file", "stderr");
    typed.type_line("after the refusals");
    typed.stdout.wait_for(&format!("#3] you → {bob_id}: after the refusals"), "stdout");
    typed.type_line("/quit");
    let done = typed.finish();
    assert!(done.status.success(), "{done:?}");
    assert_eq!(b.next_delivery().unwrap().body, b"after the refusals");
}

/// Large messages from a binary client (sent in Part frames, delivered in PartOut frames) reach
/// a watch whole and print as their size: binary as `[binary message, 3.0 MiB]`, long text cut.
#[test]
fn large_messages_from_a_binary_client_are_shown() {
    let s = TestServer::start("io_uring", "");
    let (alice, alice_id) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let mut watcher = chat(&s, &bob, &["watch", "--count", "2"], None);
    watcher.stderr.wait_for("logged in as", "stderr");
    let mut json_watcher = chat(&s, &bob, &["watch", "--json", "--count", "2"], None);
    json_watcher.stderr.wait_for("logged in as", "stderr");
    let (mut a, _) = s.login(&alice, 3);
    let binary: Vec<u8> = (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    a.send_large_wait(conv::DIRECT, bob_id, 1, &binary).unwrap();
    let text = "ab".repeat(50_000);
    a.send_large_wait(conv::DIRECT, bob_id, 2, text.as_bytes()).unwrap();

    let watched = watcher.finish();
    assert!(watched.status.success(), "{watched:?}");
    assert_eq!(
        messages(&watched.stdout),
        [
            format!("{alice_id} → you: [binary message, 3.0 MiB]"),
            format!("{alice_id} → you: {}… [text, 97.7 KiB]", "ab".repeat(1024)),
        ]
    );
    let watched = json_watcher.finish();
    assert!(watched.status.success(), "{:?}", watched.stderr);
    let v = json(&watched.stdout);
    assert_eq!(v[0]["body_hex"].as_str().map(str::len), Some(binary.len() * 2));
    assert_eq!(v[1]["text"].as_str(), Some(text.as_str()), "JSON carries the whole text");
}

/// `send` sends piped lines over body_bytes_max in parts, one large message at a time and in
/// order among the small ones; a line over 1 MiB is refused whole (exit 1).
#[test]
fn send_mode_sends_long_lines_in_parts() {
    let s = TestServer::start("io_uring", "");
    let (alice, _) = s.register("alice");
    let (bob, bob_id) = s.register("bob");
    let (mut b, _) = s.login(&bob, 3);
    b.set_timeout(Some(WAIT)).unwrap();
    let to = bob_id.to_string();
    let (l1, l2) = ("a".repeat(50_000), "b".repeat(60_000));
    let sent = chat(&s, &alice, &["send", "--to", &to], Some(&format!("{l1}\nshort\n{l2}\n"))).finish();
    assert!(sent.status.success(), "{sent:?}");
    let mut got: Vec<_> = (0..3).map(|_| b.next_delivery().unwrap()).collect();
    got.sort_by_key(|d| d.stamp.seq);
    let bodies: Vec<&[u8]> = got.iter().map(|d| d.body.as_slice()).collect();
    assert_eq!(bodies, [l1.as_bytes(), b"short", l2.as_bytes()]);

    let huge = "c".repeat((1 << 20) + 1);
    let refused = chat(&s, &alice, &["send", "--to", &to], Some(&format!("{huge}\n"))).finish();
    assert_eq!(refused.status.code(), Some(1), "{:?}", refused.stderr);
    assert!(
        refused.stderr.contains("line 1 not sent: BodyTooLarge: over 1048576 bytes"),
        "{:?}",
        refused.stderr
    );
}
