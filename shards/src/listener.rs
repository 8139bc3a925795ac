//! Per-shard SO_REUSEPORT listeners. All sockets of a group are bound to the same concrete
//! address (a requested port 0 is resolved by the first bind), so the kernel spreads incoming
//! connections over the shards and each shard accepts and owns its own.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Bind `count` listening sockets with SO_REUSEPORT to `addr`. Returns the bound address (with the
/// real port when `addr` asked for port 0) and the listeners, one per shard.
pub fn bind_reuseport_group(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    assert!(count > 0);
    let mut bound = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let domain = if bound.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_port(true)?;
        socket.set_reuse_address(true)?;
        socket.bind(&bound.into())?;
        socket.listen(backlog)?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no socket address"))?;
        }
        out.push(socket.into());
    }
    Ok((bound, out))
}
