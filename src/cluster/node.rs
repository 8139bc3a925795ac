//! The node: membership (SWIM, from `foca`), the links to the other nodes, and the gateway
//! between this node's shards and those links. It runs on a thread of its own with a small
//! single-threaded tokio runtime, never on a shard.
//!
//! - **Membership.** Each node is a foca identity (id, incarnation, shards, dial address).
//!   foca's messages travel over the node links as control records, so they are authenticated
//!   and encrypted like everything else. A member foca declares down (no answer to probes and
//!   indirect probes, then a suspicion period: about `failure_detect_ms`) leaves the table; a
//!   member up joins it.
//! - **Placement.** Whenever the live members change, the node computes the partition table by
//!   rendezvous hashing over them ([`Table`]) and hands every shard its own copy
//!   (`Envelope::Placement`). Nodes that see the same members compute the same table.
//! - **Links.** A node dials every member it learns of that has an address (and the `join`
//!   addresses at start); it accepts links on `[cluster] listen`. Between two nodes there may be
//!   two links for a while (both dialed); each node sends on the first that came up, so what it
//!   sends to one node stays in order.
//! - **Gateway.** The node takes the mesh's last endpoint: shards post `Envelope::Remote` there;
//!   the gateway appends each envelope to its node's link buffer ([`super::wire`]); each link's
//!   writer task encrypts and writes what has gathered. Inbound envelopes go to their shard
//!   through the mesh, waiting (and so holding the link) while that queue is full. An envelope
//!   for a node without a link, or over `link_queue_bytes_max` (but answers and shared state,
//!   [`Envelope::never_dropped`], which go anyway), is dropped and counted, and a request among
//!   them (a send, a login, a room or group request, a token) is answered at once with
//!   `NodeUnavailable` so that its client can retry.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    num::NonZeroUsize,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use foca::{Config as FocaConfig, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};
use tim_shards::mesh::MeshPort;
use tokio::{net::TcpListener, sync::mpsc};

use super::{
    link::{self, control, put_record, Hello, Link, LinkReader, LinkWriter},
    wire,
};
use crate::{
    backpressure::{Backpressure, Watermark},
    config::Config,
    envelope::{Envelope, Remote},
    placement::{NodeId, SharedTable, Table},
    protocol::ErrorCode,
    store::memory::{MemoryStore, ReplOp},
};

/// A member as foca knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub incarnation: u64,
    pub shards: u16,
    pub addr: Option<SocketAddr>,
}

impl foca::Identity for NodeIdentity {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        // Declared down while alive (a long pause, a partition): come back as a newer self.
        Some(NodeIdentity { incarnation: self.incarnation + 1, ..self.clone() })
    }

    fn addr(&self) -> NodeId {
        self.id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // A restarted node (a later start time) replaces its earlier self.
        self.incarnation > adversary.incarnation
    }
}

impl NodeIdentity {
    fn hello(&self) -> Hello {
        Hello { node: self.id, incarnation: self.incarnation, shards: self.shards, addr: self.addr }
    }

    fn from_hello(h: &Hello) -> NodeIdentity {
        NodeIdentity { id: h.node, incarnation: h.incarnation, shards: h.shards, addr: h.addr }
    }
}

/// What the rest of the server sees of the node.
pub struct ClusterHandle {
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    /// Set once this node has been seen by another member (or at once, without `join`).
    pub joined: Arc<AtomicBool>,
    /// Envelopes dropped for want of a link, or over a link's byte limit.
    pub dropped: Arc<AtomicU64>,
}

impl ClusterHandle {
    /// Tell the other members this node leaves (they take its partitions at once, without
    /// waiting for failure detection), then end the node's thread.
    pub fn leave(mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Wait until another member has answered (true), or `wait` passed (false).
    pub fn wait_joined(&self, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        while !self.joined.load(Ordering::Acquire) {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Start the node's thread: listen for peers, join through `cfg.cluster.join`, and serve the
/// gateway on `port` (the mesh's endpoint after the shards').
pub fn start(
    cfg: &Config,
    shards: usize,
    port: MeshPort<Envelope>,
    shared_table: Arc<SharedTable>,
    pressure: Arc<Backpressure>,
    dropped: Arc<AtomicU64>,
    replica: Option<(Arc<MemoryStore>, mpsc::Receiver<ReplOp>)>,
) -> anyhow::Result<ClusterHandle> {
    let c = &cfg.cluster;
    let listener = match c.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cluster.listen {addr}: {e}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let advertised = match (c.advertise, &listener) {
        (Some(a), _) => Some(a),
        (None, Some(l)) => Some(l.local_addr()?),
        (None, None) => None,
    };
    if let Some(l) = &listener {
        // Tests and tools read this line to learn a port chosen by the system.
        println!("tim cluster listening on {} (node {})", l.local_addr()?, c.node_id);
    }
    let me = NodeIdentity {
        id: c.node_id,
        incarnation: crate::clock::now_ms(),
        shards: shards as u16,
        addr: advertised,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let joined = Arc::new(AtomicBool::new(c.join.is_empty()));
    let settings = Settings {
        psk: link::psk(&c.secret),
        join: c.join.clone(),
        failure_detect: Duration::from_millis(c.failure_detect_ms),
        dial_timeout: Duration::from_millis(c.dial_timeout_ms),
        link_queue_bytes_max: c.link_queue_bytes_max,
        record_bytes_max: record_bytes_max(cfg),
        shards,
        shared_table,
        pressure,
        replica: replica.as_ref().map(|(m, _)| m.clone()),
    };
    let repl_rx = replica.map(|(_, rx)| rx);
    let (s2, w2, j2, d2) = (stop.clone(), wake.clone(), joined.clone(), dropped.clone());
    let thread = std::thread::Builder::new().name("tim-cluster".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("cluster runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = listener.map(|l| TcpListener::from_std(l).expect("cluster listener"));
            run(settings, me, listener, port, s2, w2, j2, d2, repl_rx).await;
        });
    })?;
    Ok(ClusterHandle { thread: Some(thread), stop, wake, joined, dropped })
}

/// The largest record a link accepts: a whole client frame in an envelope, with room for the
/// envelope's other fields.
pub fn record_bytes_max(cfg: &Config) -> usize {
    // A DeliverMany lists sessions besides its frame; a GroupFanout lists users.
    let lists = 8 * cfg.limits.group_members_max.max(cfg.limits.fanout_slice);
    // A large message's Deliver travels whole between nodes.
    let frame = cfg.limits.frame_bytes_max.max(cfg.limits.large_body_bytes_max + 1024);
    frame + lists + 64 * 1024
}

struct Settings {
    psk: [u8; 32],
    join: Vec<String>,
    failure_detect: Duration,
    dial_timeout: Duration,
    link_queue_bytes_max: usize,
    record_bytes_max: usize,
    shards: usize,
    /// Where the shards find the latest table.
    shared_table: Arc<SharedTable>,
    /// The node's backpressure, raised by links with too much unsent.
    pressure: Arc<Backpressure>,
    /// The memory store's replica on this node (a cluster on the memory store).
    replica: Option<Arc<MemoryStore>>,
}

/// One direction of a link as the node sends on it.
struct LinkOut {
    id: u64,
    peer: NodeIdentity,
    buf: RefCell<Vec<u8>>,
    /// Bytes of the write in progress.
    writing: Cell<usize>,
    /// Unsent bytes (queued and being written) as a source of the node's backpressure.
    mark: Watermark,
    wake: tokio::sync::Notify,
    closed: Cell<bool>,
}

impl LinkOut {
    /// Raise or lower the node's backpressure by the bytes not yet sent.
    fn update_pressure(&self, bp: &Backpressure) {
        self.mark.update(self.buf.borrow().len() + self.writing.get(), bp);
    }

    fn push(&self, f: impl FnOnce(&mut Vec<u8>)) {
        f(&mut self.buf.borrow_mut());
        self.wake.notify_one();
    }
}

/// What the node's tasks tell the membership task.
enum Event {
    LinkUp(Rc<LinkOut>),
    LinkDown { node: NodeId, link: u64 },
    Membership(bytes::Bytes),
    Timer(Timer<NodeIdentity>),
    Status(Rc<LinkOut>),
    Dial(SocketAddr),
}

type Node = Foca<NodeIdentity, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

struct State {
    settings: Settings,
    me: NodeIdentity,
    foca: RefCell<Node>,
    /// Links by node, the one used for sending first.
    links: RefCell<HashMap<NodeId, Vec<Rc<LinkOut>>>>,
    /// Live members (not this node), as foca last said.
    live: RefCell<BTreeMap<NodeId, NodeIdentity>>,
    /// Nodes being dialed now.
    dialing: RefCell<std::collections::HashSet<SocketAddr>>,
    epoch: Cell<u64>,
    table: RefCell<Arc<Table>>,
    next_link: Cell<u64>,
    port: MeshPort<Envelope>,
    /// Envelopes for owners on a node without a link (it may be failing): held until the
    /// table changes or a link to it comes up, then routed again; answered (requests) or
    /// dropped after `2 × failure_detect_ms`.
    /// (when, for whom, from which shard, what).
    parked: RefCell<std::collections::VecDeque<(std::time::Instant, crate::placement::Owner, u16, Envelope)>>,
    /// Bounded ([`EVENTS_MAX`]): a link's reader waits when it is full.
    events: mpsc::Sender<Event>,
    joined: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    settings: Settings,
    me: NodeIdentity,
    listener: Option<TcpListener>,
    port: MeshPort<Envelope>,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    joined: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    repl_rx: Option<mpsc::Receiver<ReplOp>>,
) {
    let mut fc = FocaConfig::new_lan(std::num::NonZeroU32::new(8).expect("non-zero"));
    // Detection within `failure_detect_ms`: a probe round, its indirect probes, then suspicion.
    let fd = settings.failure_detect;
    fc.probe_period = fd / 4;
    fc.probe_rtt = fd / 8;
    fc.suspect_to_down_after = fd / 2;
    fc.max_packet_size = NonZeroUsize::new(32 * 1024).expect("non-zero");
    fc.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(1).expect("non-zero"),
    });
    fc.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: NonZeroUsize::new(2).expect("non-zero"),
    });
    let mut seed = [0u8; 8];
    let _ = getrandom::getrandom(&mut seed);
    let foca = Foca::new(me.clone(), fc, StdRng::seed_from_u64(u64::from_le_bytes(seed)), PostcardCodec);
    let (tx, mut rx) = mpsc::channel(EVENTS_MAX);
    let table = Arc::new(Table::new(0, &[(me.id, me.shards)]));
    let st = Rc::new(State {
        settings,
        me,
        foca: RefCell::new(foca),
        links: RefCell::new(HashMap::new()),
        live: RefCell::new(BTreeMap::new()),
        dialing: RefCell::new(Default::default()),
        epoch: Cell::new(0),
        table: RefCell::new(table),
        next_link: Cell::new(1),
        port,
        parked: RefCell::new(Default::default()),
        events: tx,
        joined,
        dropped,
    });
    if let Some(l) = listener {
        tokio::task::spawn_local(accept_loop(st.clone(), l));
    }
    tokio::task::spawn_local(gateway(st.clone()));
    tokio::task::spawn_local(join_loop(st.clone()));
    if let Some(rx) = repl_rx {
        tokio::task::spawn_local(replicate(st.clone(), rx));
    }
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => st.event(ev),
                None => break,
            },
            _ = wake.notified() => {}
        }
        if stop.load(Ordering::Acquire) {
            st.with_foca(|f, rt| {
                let _ = f.leave_cluster(rt);
            });
            // Let the leave go out on the links.
            tokio::time::sleep(Duration::from_millis(200)).await;
            break;
        }
    }
}

impl State {
    /// Call foca, then carry out what it asked for.
    fn with_foca(self: &Rc<Self>, f: impl FnOnce(&mut Node, &mut foca::AccumulatingRuntime<NodeIdentity>)) {
        let mut rt = foca::AccumulatingRuntime::new();
        f(&mut self.foca.borrow_mut(), &mut rt);
        while let Some((to, data)) = rt.to_send() {
            self.send_membership(&to, &data);
        }
        while let Some((after, timer)) = rt.to_schedule() {
            let tx = self.events.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Event::Timer(timer)).await;
            });
        }
        let mut changed = false;
        while let Some(n) = rt.to_notify() {
            changed |= self.notified(n);
        }
        if changed {
            self.publish_table();
        }
    }

    fn send_membership(self: &Rc<Self>, to: &NodeIdentity, data: &[u8]) {
        match self.link_to(to.id) {
            Some(l) => l.push(|b| put_record(b, control::MEMBERSHIP, data)),
            None => {
                // No link yet: dial it (foca probes again; the next message finds the link).
                if let Some(addr) = to.addr {
                    self.dial(addr);
                }
            }
        }
    }

    /// The link to send to `node` on: the first that came up and is still open (a node sends to
    /// another on one link, so what it sends stays in order).
    fn link_to(&self, node: NodeId) -> Option<Rc<LinkOut>> {
        self.links.borrow().get(&node).and_then(|v| v.iter().find(|l| !l.closed.get()).cloned())
    }

    /// A foca notification; whether the live members changed.
    fn notified(self: &Rc<Self>, n: OwnedNotification<NodeIdentity>) -> bool {
        match n {
            OwnedNotification::MemberUp(m) => {
                log::info!("cluster: node {} up ({:?})", m.id, m.addr);
                if self.link_to(m.id).is_none() {
                    if let Some(addr) = m.addr {
                        self.dial(addr);
                    }
                }
                self.live.borrow_mut().insert(m.id, m);
                true
            }
            OwnedNotification::MemberDown(m) => {
                log::warn!("cluster: node {} down", m.id);
                let mut live = self.live.borrow_mut();
                if live.get(&m.id).is_some_and(|l| l.incarnation <= m.incarnation) {
                    live.remove(&m.id);
                    return true;
                }
                false
            }
            OwnedNotification::Rename(old, new) => {
                log::info!(
                    "cluster: node {} restarted (incarnation {} → {})",
                    new.id,
                    old.incarnation,
                    new.incarnation
                );
                let mut live = self.live.borrow_mut();
                if live.contains_key(&new.id) {
                    live.insert(new.id, new);
                }
                false
            }
            OwnedNotification::Active => {
                log::info!("cluster: node {} joined", self.me.id);
                self.joined.store(true, Ordering::Release);
                false
            }
            OwnedNotification::Idle => {
                log::warn!("cluster: no other member is live");
                false
            }
            OwnedNotification::Rejoin(me) => {
                log::warn!(
                    "cluster: this node was declared down; rejoined as incarnation {}",
                    me.incarnation
                );
                false
            }
            OwnedNotification::Defunct => {
                log::error!("cluster: this node was declared down");
                false
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Compute the table for the live members and give every shard its own copy.
    fn publish_table(&self) {
        // First what the shards have sent so far, by the table they had: it is parked (for the
        // node gone) or sent on, so that what they sent before the change goes back to them
        // with the new table, never after what they (or links) send by it.
        self.take_inbox();
        let mut nodes: Vec<(NodeId, u16)> = vec![(self.me.id, self.me.shards)];
        nodes.extend(self.live.borrow().values().map(|m| (m.id, m.shards)));
        let epoch = self.epoch.get() + 1;
        self.epoch.set(epoch);
        let table = Table::new(epoch, &nodes);
        log::info!("cluster: placement epoch {epoch}: nodes {:?}, partitions {:?}", nodes, table.counts());
        let table = Arc::new(table);
        *self.table.borrow_mut() = table.clone();
        // Each shard gets the table with what it had sent that waited here for a node now
        // gone, to route again first (ahead of what it sends by the new table: a
        // conversation's deliveries stay in order) ...
        let mut returned: Vec<Vec<Envelope>> = (0..self.settings.shards).map(|_| Vec::new()).collect();
        let parked = std::mem::take(&mut *self.parked.borrow_mut());
        log::info!("cluster: {} parked envelopes go back to their shards", parked.len());
        for (_, _, from, env) in parked {
            returned[(from as usize).min(self.settings.shards - 1)].push(env);
        }
        for (shard, returned) in returned.into_iter().enumerate() {
            let update = crate::envelope::PlacementUpdate { table: table.clone(), returned };
            self.to_shard(shard, Envelope::Placement(Box::new(update)));
        }
        // ... and only then is the table published where a shard that sees an envelope placed
        // by it looks (its Placement is queued already: it takes it at once).
        self.settings.shared_table.set(table);
    }

    /// Hand `env` to a shard of this node, now (the queue from the gateway has room for a
    /// table whatever the traffic: it is retried until it goes in).
    fn to_shard(&self, shard: usize, env: Envelope) {
        let mut env = env;
        for _ in 0..1000 {
            match self.port.try_send(shard, env) {
                Ok(()) => return,
                Err(e) => env = e.into_inner(),
            }
            std::thread::yield_now();
        }
        log::error!("cluster: shard {shard}'s queue stayed full; an envelope was dropped");
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn event(self: &Rc<Self>, ev: Event) {
        match ev {
            Event::LinkUp(out) => {
                if let Some(replica) = &self.settings.replica {
                    // Everything this replica holds, ahead of the writes that follow (an op
                    // sent twice is applied once).
                    send_ops(&out, replica.snapshot());
                }
                let peer = out.peer.clone();
                self.links.borrow_mut().entry(peer.id).or_default().push(out);
                self.unpark(|to| to.node == peer.id);
                // Tell foca about it: a new member joins the cluster through this announce.
                self.with_foca(|f, rt| {
                    let _ = f.announce(peer, rt);
                });
            }
            Event::LinkDown { node, link } => {
                let mut links = self.links.borrow_mut();
                if let Some(v) = links.get_mut(&node) {
                    v.retain(|l| l.id != link);
                    if v.is_empty() {
                        links.remove(&node);
                        drop(links);
                        // Still a member: dial it again (a broken link, not a dead node).
                        let addr = self.live.borrow().get(&node).and_then(|m| m.addr);
                        if let Some(addr) = addr {
                            self.dial(addr);
                        }
                    }
                }
            }
            Event::Membership(data) => self.with_foca(|f, rt| {
                let len = crate::frame::Header::read(&data).len as usize;
                if let Err(e) = f.handle_data(&data[crate::frame::HEADER_BYTES..][..len], rt) {
                    log::debug!("cluster: membership message: {e}");
                }
            }),
            Event::Timer(t) => self.with_foca(|f, rt| {
                let _ = f.handle_timer(t, rt);
            }),
            Event::Status(out) => {
                let text = self.status_json();
                out.push(|b| put_record(b, control::STATUS, text.as_bytes()));
            }
            Event::Dial(addr) => self.dial(addr),
        }
    }

    /// The node's view, for `tim cluster status`.
    fn status_json(&self) -> String {
        let table = self.table.borrow().clone();
        let counts: HashMap<NodeId, usize> = table.counts().into_iter().collect();
        let foca = self.foca.borrow();
        let mut members = vec![serde_json_like::member(
            self.me.id,
            "self",
            self.me.addr,
            self.me.shards,
            self.me.incarnation,
            counts.get(&self.me.id).copied().unwrap_or(0),
            true,
        )];
        for m in foca.iter_membership_state() {
            let id = m.id();
            let state = match m.state() {
                foca::State::Alive => "alive",
                foca::State::Suspect => "suspect",
                foca::State::Down => "down",
            };
            let link = self.link_to(id.id).is_some();
            members.push(serde_json_like::member(
                id.id,
                state,
                id.addr,
                id.shards,
                id.incarnation,
                counts.get(&id.id).copied().unwrap_or(0),
                link,
            ));
        }
        format!(
            "{{\"node\":{},\"epoch\":{},\"dropped_envelopes\":{},\"members\":[{}]}}",
            self.me.id,
            table.epoch,
            self.dropped.load(Ordering::Relaxed),
            members.join(",")
        )
    }

    /// Dial `addr` unless a dial to it is under way.
    fn dial(self: &Rc<Self>, addr: SocketAddr) {
        if Some(addr) == self.me.addr || !self.dialing.borrow_mut().insert(addr) {
            return;
        }
        let st = self.clone();
        tokio::task::spawn_local(async move {
            let r = async {
                let s = tokio::time::timeout(st.settings.dial_timeout, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "dial timed out"))??;
                link::establish(s, true, &st.settings.psk, &st.me.hello(), st.settings.dial_timeout).await
            }
            .await;
            st.dialing.borrow_mut().remove(&addr);
            match r {
                Ok(link) => st.serve_link(link),
                Err(e) => log::debug!("cluster: dialing {addr}: {e}"),
            }
        });
    }

    /// Take an established link: a member's (or a status observer's).
    fn serve_link(self: &Rc<Self>, link: Link) {
        let Link { reader, writer, peer } = link;
        if peer.node == self.me.id && peer.incarnation == self.me.incarnation {
            return; // dialed itself (a join list naming this node)
        }
        if peer.node == self.me.id {
            log::error!("cluster: another node uses node id {} ({:?}); link refused", peer.node, peer.addr);
            return;
        }
        let id = self.next_link.get();
        self.next_link.set(id + 1);
        let out = Rc::new(LinkOut {
            id,
            peer: NodeIdentity::from_hello(&peer),
            buf: RefCell::new(Vec::new()),
            writing: Cell::new(0),
            mark: Watermark::new(self.settings.link_queue_bytes_max / 2),
            wake: tokio::sync::Notify::new(),
            closed: Cell::new(false),
        });
        tokio::task::spawn_local(write_loop(self.clone(), out.clone(), writer));
        tokio::task::spawn_local(read_loop(self.clone(), out.clone(), reader));
        if peer.node != 0 {
            log::info!("cluster: link {id} to node {} ({:?}) up", peer.node, peer.addr);
            let tx = self.events.clone();
            tokio::task::spawn_local(async move {
                let _ = tx.send(Event::LinkUp(out)).await;
            });
        }
    }
}

/// Accept links from peers (and status observers).
async fn accept_loop(st: Rc<State>, l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((s, from)) => {
                let st = st.clone();
                tokio::task::spawn_local(async move {
                    match link::establish(
                        s,
                        false,
                        &st.settings.psk,
                        &st.me.hello(),
                        st.settings.dial_timeout,
                    )
                    .await
                    {
                        Ok(link) => st.serve_link(link),
                        Err(e) => log::warn!("cluster: link from {from} refused: {e}"),
                    }
                });
            }
            Err(e) => {
                log::warn!("cluster: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Dial the `join` addresses until this node has joined, then now and then while it has no
/// live member (so that a node that started first finds the others when they come).
async fn join_loop(st: Rc<State>) {
    if st.settings.join.is_empty() {
        return;
    }
    loop {
        if st.live.borrow().is_empty() {
            for a in &st.settings.join {
                match tokio::net::lookup_host(a.as_str()).await {
                    Ok(addrs) => {
                        for addr in addrs {
                            let _ = st.events.send(Event::Dial(addr)).await;
                        }
                    }
                    Err(e) => log::warn!("cluster: join address {a}: {e}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A link record of store ops carries about this much at most (well under `record_bytes_max`).
const STORE_OPS_RECORD_BYTES: usize = 256 * 1024;

/// Append `ops` to `out`'s buffer as `STORE_OPS` records.
fn send_ops(out: &LinkOut, ops: impl IntoIterator<Item = ReplOp>) {
    let mut payload = Vec::new();
    let flush = |payload: &mut Vec<u8>| {
        if !payload.is_empty() {
            out.push(|b| put_record(b, control::STORE_OPS, payload));
            payload.clear();
        }
    };
    for op in ops {
        match postcard::to_extend(&op, std::mem::take(&mut payload)) {
            Ok(p) => payload = p,
            Err(e) => log::error!("cluster: a store op could not be encoded: {e}"),
        }
        if payload.len() >= STORE_OPS_RECORD_BYTES {
            flush(&mut payload);
        }
    }
    flush(&mut payload);
}

/// Apply a `STORE_OPS` record from a peer to this node's replica.
fn apply_ops(replica: &MemoryStore, rec: &bytes::Bytes) -> Result<(), postcard::Error> {
    let len = crate::frame::Header::read(rec).len as usize;
    let mut rest = &rec[crate::frame::HEADER_BYTES..][..len];
    while !rest.is_empty() {
        let (op, tail) = postcard::take_from_bytes::<ReplOp>(rest)?;
        replica.apply_remote(op);
        rest = tail;
    }
    Ok(())
}

/// Send this replica's writes to every member it has a link to (a member linking up later
/// gets them in its snapshot).
async fn replicate(st: Rc<State>, mut rx: mpsc::Receiver<ReplOp>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let links: Vec<Rc<LinkOut>> = {
            let links = st.links.borrow();
            links.values().filter_map(|v| v.first().cloned()).filter(|l| !l.closed.get()).collect()
        };
        for l in links {
            send_ops(&l, batch.iter().cloned());
        }
        batch.clear();
    }
}

/// Write what gathers in a link's buffer.
async fn write_loop(st: Rc<State>, out: Rc<LinkOut>, mut w: LinkWriter) {
    loop {
        out.wake.notified().await;
        loop {
            let batch = std::mem::take(&mut *out.buf.borrow_mut());
            if batch.is_empty() {
                break;
            }
            out.writing.set(batch.len());
            let written = w.write(&batch).await;
            out.writing.set(0);
            out.update_pressure(&st.settings.pressure);
            if let Err(e) = written {
                log::info!("cluster: link {} to node {}: {e}", out.id, out.peer.id);
                out.closed.set(true);
                out.mark.lower(&st.settings.pressure);
                let _ = st.events.send(Event::LinkDown { node: out.peer.id, link: out.id }).await;
                return;
            }
        }
        if out.closed.get() {
            out.mark.lower(&st.settings.pressure);
            w.shutdown().await;
            return;
        }
    }
}

/// Read records: membership to foca, envelopes to their shard.
async fn read_loop(st: Rc<State>, out: Rc<LinkOut>, mut r: LinkReader) {
    let max = st.settings.record_bytes_max;
    loop {
        let (kind, rec) = match r.next_record(max).await {
            Ok(x) => x,
            Err(e) => {
                log::info!("cluster: link {} from node {} ended: {e}", out.id, out.peer.id);
                break;
            }
        };
        if control::is_control(kind) {
            match kind {
                control::MEMBERSHIP if out.peer.id != 0 => {
                    let _ = st.events.send(Event::Membership(rec)).await;
                }
                control::STATUS_REQUEST => {
                    let _ = st.events.send(Event::Status(out.clone())).await;
                }
                control::STORE_OPS if out.peer.id != 0 => {
                    let Some(replica) = &st.settings.replica else {
                        log::warn!(
                            "cluster: node {} replicates a memory store; this node has another",
                            out.peer.id
                        );
                        continue;
                    };
                    if let Err(e) = apply_ops(replica, &rec) {
                        log::warn!("cluster: link {} from node {}: store ops: {e}", out.id, out.peer.id);
                        break;
                    }
                }
                _ => {
                    log::warn!("cluster: link {}: unexpected control record {kind:#x}", out.id);
                    break;
                }
            }
            continue;
        }
        if out.peer.id == 0 {
            break; // an observer sends no envelopes
        }
        match wire::decode(&rec, max) {
            Ok(Some((shard, env, _))) if (shard as usize) < st.settings.shards => {
                deliver(&st, shard as usize, env).await;
            }
            Ok(Some((shard, _, _))) => {
                log::warn!("cluster: link {}: an envelope for shard {shard}, which this node lacks", out.id);
                break;
            }
            Ok(None) => {
                log::warn!("cluster: link {}: a cut record", out.id);
                break;
            }
            Err(e) => {
                log::warn!("cluster: link {} from node {}: {e}", out.id, out.peer.id);
                break;
            }
        }
    }
    out.closed.set(true);
    out.wake.notify_one();
    let _ = st.events.send(Event::LinkDown { node: out.peer.id, link: out.id }).await;
}

/// Hand an inbound envelope to its shard, waiting while that shard's queue is full (the link
/// waits with it: backpressure to the sending node).
async fn deliver(st: &State, shard: usize, env: Envelope) {
    let mut env = env;
    let mut spins = 0u32;
    loop {
        match st.port.try_send(shard, env) {
            Ok(()) => return,
            Err(e) => env = e.into_inner(),
        }
        spins += 1;
        if spins < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
}

/// Take the shards' envelopes for other nodes and append them to those nodes' links.
async fn gateway(st: Rc<State>) {
    let mut batch = Vec::with_capacity(512);
    let mut touched: Vec<Rc<LinkOut>> = Vec::new();
    loop {
        batch.clear();
        // Wake now and then with nothing to carry, to expire what is parked.
        tokio::select! {
            _ = st.port.recv_batch(&mut batch, 512) => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        for env in batch.drain(..) {
            st.carry(env, &mut touched);
        }
        for l in touched.drain(..) {
            l.wake.notify_one();
        }
        st.expire_parked();
        tokio::task::yield_now().await;
    }
}

impl State {
    /// One envelope from a shard: on to its node (or parked, or given back), or a fence echoed
    /// to its shard — behind everything the gateway gave back to that shard before it.
    fn carry(&self, env: Envelope, touched: &mut Vec<Rc<LinkOut>>) {
        match env {
            Envelope::Remote(r) => {
                let Remote { to, from, env } = *r;
                self.send(to, from, env, touched);
            }
            Envelope::Fence { shard, n } if (shard as usize) < self.settings.shards => {
                self.to_shard(shard as usize, Envelope::Fence { shard, n })
            }
            _ => log::error!("cluster: a local envelope reached the gateway"),
        }
    }

    /// Carry every envelope waiting in the gateway's mesh inbox to its link (or park it).
    fn take_inbox(&self) {
        let mut batch = Vec::new();
        let mut touched = Vec::new();
        while self.port.try_recv_batch(&mut batch, 512) > 0 {
            for env in batch.drain(..) {
                self.carry(env, &mut touched);
            }
        }
        for l in touched {
            l.wake.notify_one();
        }
    }
}

/// Events waiting for the membership task at most (membership messages and status requests
/// from links, timers, link ups and downs).
const EVENTS_MAX: usize = 4096;

/// Envelopes parked at most.
const PARKED_MAX: usize = 1 << 20;

impl State {
    /// Append `env` to the link of `to`'s node; park it while that node has no link (an
    /// owner-addressed envelope: it may go elsewhere once the table changes), else answer or
    /// drop it.
    fn send(&self, to: crate::placement::Owner, from: u16, env: Envelope, touched: &mut Vec<Rc<LinkOut>>) {
        let link = self.link_to(to.node).filter(|l| !l.closed.get());
        let Some(link) = link else {
            // Only what is addressed to an owner can go elsewhere; an envelope for a session on
            // a node without a link is answered or dropped.
            let reroutable =
                env.owner(&self.placement()).is_some() || matches!(env, Envelope::GroupFanout(_));
            if !reroutable {
                return self.bounce(env);
            }
            let gone = || !self.table.borrow().nodes.iter().any(|&(n, _)| n == to.node);
            if self.epoch.get() > 0 && gone() {
                // Placed by a table its shard has left behind by now (or is about to): back to
                // it, to be routed again.
                return self.to_shard(from as usize, Envelope::Remote(Box::new(Remote { to, from, env })));
            }
            if self.parked.borrow().len() < PARKED_MAX {
                self.parked.borrow_mut().push_back((std::time::Instant::now(), to, from, env));
            } else {
                self.bounce(env);
            }
            return;
        };
        // Over the limit (what waits and what is being written), a request is answered
        // NodeUnavailable and a delivery dropped; an answer or shared state goes anyway (bounded
        // by the requests in flight), as at a shard's overflow cap.
        let unsent = link.buf.borrow().len() + link.writing.get();
        if unsent >= self.settings.link_queue_bytes_max && !env.never_dropped() {
            return self.bounce(env);
        }
        let r = wire::encode(to.shard, &env, &mut link.buf.borrow_mut());
        if let Err(e) = r {
            log::error!("cluster: an envelope for node {} could not be encoded: {e}", to.node);
            return self.bounce(env);
        }
        link.update_pressure(&self.settings.pressure);
        if !touched.iter().any(|l| Rc::ptr_eq(l, &link)) {
            touched.push(link);
        }
    }

    /// This node's placement by its latest table.
    fn placement(&self) -> crate::placement::Placement {
        crate::placement::Placement::clustered(self.me.id, self.settings.shards, self.table.borrow().clone())
    }

    /// Route again the parked envelopes `which` selects (by the node they waited for), by the
    /// latest table: to this node's shards, or to the links of others.
    fn unpark(&self, which: impl Fn(crate::placement::Owner) -> bool) {
        let parked: Vec<_> = {
            let mut p = self.parked.borrow_mut();
            let (go, stay): (Vec<_>, Vec<_>) = p.drain(..).partition(|(_, to, _, _)| which(*to));
            p.extend(stay);
            go
        };
        let mut touched = Vec::new();
        for (at, to, from, env) in parked {
            if self.link_to(to.node).is_some() {
                self.send(to, from, env, &mut touched);
            } else {
                self.parked.borrow_mut().push_back((at, to, from, env));
            }
        }
        for l in touched {
            l.wake.notify_one();
        }
    }

    /// Parked envelopes older than twice the failure detection time are answered or dropped.
    fn expire_parked(&self) {
        let max_age = self.settings.failure_detect * 2;
        loop {
            let old = {
                let mut p = self.parked.borrow_mut();
                match p.front() {
                    Some((at, _, _, _)) if at.elapsed() > max_age => p.pop_front(),
                    _ => None,
                }
            };
            match old {
                Some((_, _, _, env)) => self.bounce(env),
                None => return,
            }
        }
    }
}

impl State {
    /// An envelope that cannot reach its node: a request gets its answer now (NodeUnavailable),
    /// anything else is dropped and counted.
    fn bounce(&self, env: Envelope) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let code = ErrorCode::NodeUnavailable;
        let back = match env {
            Envelope::Submit(sub) if sub.stream => {
                Envelope::StreamRefused { session: sub.origin, client_msg_id: sub.client_msg_id, code }
            }
            Envelope::Submit(sub) => {
                Envelope::Rejected { session: sub.origin, client_msg_id: sub.client_msg_id, code }
            }
            Envelope::Attach(a) => {
                Envelope::AttachResult { session: a.session, user: a.user, result: Err(code) }
            }
            Envelope::StoreToken { session, .. } => Envelope::TokenResult { session, result: Err(code) },
            Envelope::Room(req) => {
                let id = match req.op {
                    crate::envelope::RoomOp::Publish { client_msg_id, .. } => client_msg_id,
                    _ => req.room,
                };
                Envelope::RoomReply {
                    session: req.origin,
                    room: id,
                    request_kind: req.op.request_kind(),
                    result: Err(code),
                }
            }
            Envelope::Group(req) => Envelope::GroupReply {
                session: req.origin,
                request_kind: req.op.request_kind(),
                result: Err(code),
            },
            _ => return,
        };
        let session = match &back {
            Envelope::StreamRefused { session, .. }
            | Envelope::Rejected { session, .. }
            | Envelope::AttachResult { session, .. }
            | Envelope::TokenResult { session, .. }
            | Envelope::RoomReply { session, .. }
            | Envelope::GroupReply { session, .. } => *session,
            _ => unreachable!("built above"),
        };
        if session.node() == self.me.id && session.shard() < self.settings.shards {
            self.to_shard(session.shard(), back);
        }
    }
}

/// JSON without a JSON crate for the few fields of the status.
mod serde_json_like {
    use std::net::SocketAddr;

    pub fn member(
        id: u16,
        state: &str,
        addr: Option<SocketAddr>,
        shards: u16,
        incarnation: u64,
        partitions: usize,
        link: bool,
    ) -> String {
        let addr = addr.map_or("null".to_string(), |a| format!("\"{a}\""));
        format!(
            "{{\"node\":{id},\"state\":\"{state}\",\"addr\":{addr},\"shards\":{shards},\
             \"incarnation\":{incarnation},\"partitions\":{partitions},\"link\":{link}}}"
        )
    }
}

/// Ask the node at `addr` for its view (`tim cluster status`): a link as an observer (node 0),
/// one status request, its JSON answer.
pub fn ask_status(addr: SocketAddr, secret: &str) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let t = Duration::from_secs(5);
        let s = tokio::time::timeout(t, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {addr} timed out"))??;
        let me = Hello { node: 0, incarnation: crate::clock::now_ms(), shards: 0, addr: None };
        let Link { mut reader, mut writer, peer } = link::establish(s, true, &link::psk(secret), &me, t)
            .await
            .map_err(|e| anyhow::anyhow!("link to {addr}: {e} (is the cluster secret right?)"))?;
        let mut req = Vec::new();
        put_record(&mut req, control::STATUS_REQUEST, &[]);
        writer.write(&req).await?;
        loop {
            let (kind, rec) = tokio::time::timeout(t, reader.next_record(16 << 20))
                .await
                .map_err(|_| anyhow::anyhow!("node {} did not answer", peer.node))??;
            if kind == control::STATUS {
                let len = crate::frame::Header::read(&rec).len as usize;
                return Ok(String::from_utf8_lossy(&rec[crate::frame::HEADER_BYTES..][..len]).into_owned());
            }
        }
    })
}
