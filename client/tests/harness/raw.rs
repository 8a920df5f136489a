//! Raw Noise links, as a hostile client would open them, from a chosen loopback
//! address (127.0.0.2, …), so per-address limits can be seen apart from the normal
//! users on 127.0.0.1.

use super::*;
use fastchat_common::link::Link;
use fastchat_common::noise::Role;
use fastchat_common::proto::{AuthToClient, ClientToAuth};
use fastchat_common::PROTOCOL_VERSION;
use std::net::{SocketAddr, TcpStream};

/// A TCP connection to `to` from the local address `from` (port chosen by the OS).
pub fn tcp_from(from: &str, to: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = to.parse().expect("a socket address");
    let local: SocketAddr = format!("{from}:0").parse().expect("an IP address");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&local.into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// A link to the auth server from `from`, handshake done (no hello yet).
pub fn auth_from(net: &TestNet, from: &str) -> Result<Link, fastchat_common::link::LinkError> {
    let local = from.parse().expect("an IP address");
    Link::connect_from(
        &net.auth_addr,
        Some(local),
        Role::NxInitiator,
        1 << 20,
        Duration::from_secs(5),
    )
}

/// A link to the auth server from `from` past `hello`.
pub fn auth_hello_from(net: &TestNet, from: &str) -> Link {
    let mut link = auth_from(net, from).expect("a link to the auth server");
    link.send(&ClientToAuth::Hello {
        version: PROTOCOL_VERSION,
    })
    .unwrap();
    match link.recv::<AuthToClient>(Some(Instant::now() + Duration::from_secs(10))) {
        Ok(Some(AuthToClient::Hello { .. })) => link,
        other => panic!("expected hello, got {other:?}"),
    }
}
