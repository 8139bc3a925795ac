//! Shards start on both drivers, exchange messages through the mesh (parking and waking each
//! other), and stop when their main futures end.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use tim_shards::{start, Driver, DriverKind, RuntimeConfig};

fn ping_pong(driver: Driver) -> Vec<DriverKind> {
    const ROUNDS: u64 = 2000;
    let total = Arc::new(AtomicU64::new(0));
    let t2 = total.clone();
    let cfg = RuntimeConfig {
        shards: 2,
        driver,
        pin_cores: false,
        mesh_capacity: 8,
        spin_rounds: 4,
        ..Default::default()
    };
    let shards = start::<u64, _, _>(&cfg, move |ctx| {
        let total = t2.clone();
        async move {
            let other = 1 - ctx.id;
            let mut buf = Vec::new();
            if ctx.id == 0 {
                ctx.port.try_send(other, 0).unwrap();
            }
            loop {
                buf.clear();
                let n = ctx.port.recv_batch(&mut buf, 16).await;
                assert_eq!(n, 1, "one message in flight at a time");
                let v = buf[0];
                total.fetch_add(1, Ordering::Relaxed);
                if v + 1 >= ROUNDS {
                    if v + 1 == ROUNDS {
                        ctx.port.try_send(other, v + 1).unwrap();
                    }
                    return;
                }
                ctx.port.try_send(other, v + 1).unwrap();
                if v + 2 >= ROUNDS {
                    return;
                }
            }
        }
    })
    .unwrap();
    let drivers = shards.drivers.clone();
    shards.join().unwrap();
    assert_eq!(total.load(Ordering::Relaxed), ROUNDS);
    drivers
}

/// Ping-pong on the epoll driver.
#[test]
fn mesh_ping_pong_epoll() {
    assert_eq!(ping_pong(Driver::Epoll), vec![DriverKind::Epoll; 2]);
}

/// Ping-pong on the default driver (io_uring where available).
#[test]
fn mesh_ping_pong_auto() {
    let d = ping_pong(Driver::Auto);
    assert_eq!(d.len(), 2);
}
