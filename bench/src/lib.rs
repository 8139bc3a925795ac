//! What the criterion benches share: an in-process tim server on loopback and clients placed on
//! a chosen shard.

use tim::{client::Client, config::Config};

/// The password of the benches' accounts.
pub const PASSWORD: &str = "bench password";

/// An in-process tim server on `127.0.0.1:0`: 2 shards, the memory store (the default is the
/// embedded store under ./tim-data: a bench measures the server, not SQLite, and a second run
/// would find the first one's accounts), io_uring, no gateway or admin listener, unpinned,
/// cheap argon2 (logins are not what is measured).
pub fn loopback_server() -> tim::server::Server {
    let mut cfg = Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.shards = 2;
    cfg.store.backend = "memory".into();
    cfg.gateway.ws_listen = None;
    cfg.admin.listen = None;
    cfg.server.pin_cores = false;
    cfg.security.argon2_m_kib = 64;
    cfg.security.argon2_t = 1;
    tim::server::start(cfg).expect("server starts")
}

/// A logged-in client of `name` whose session sits on `shard` (logins land on shards as the
/// kernel spreads connections: up to 200 tries).
pub fn login_on(server: &tim::server::Server, name: &str, device_type: u8, shard: u64) -> Client {
    for _ in 0..200 {
        let mut c = Client::connect(server.addr).unwrap();
        let ok = c.login(name, PASSWORD, device_type, "bench").unwrap();
        if ok.session_id >> 48 == shard {
            return c;
        }
        c.logout().unwrap();
    }
    panic!("no session on shard {shard}");
}
