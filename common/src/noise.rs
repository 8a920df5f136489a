//! Noise sessions for every link, and the codec between socket bytes and frames.
//!
//! Links and patterns (all `25519_ChaChaPoly_BLAKE2s`):
//! - client → auth: `NX` (the client learns and pins the auth server's static key);
//! - client → relay: `NK` (the auth server handed the client the relay's static key);
//! - relay → auth and relay ↔ relay: `NNpsk0` with the 32-byte cluster secret.
//!
//! On the wire every Noise message is a 2-byte big-endian length and the ciphertext (at
//! most 65,535 bytes). After the handshake the decrypted bytes form a stream of
//! [`crate::frame`]s. [`NoiseCodec`] does all of this without touching a socket, so the
//! mio server connections and the blocking client links share it.

use crate::frame::{FrameBuffer, FrameError};
use serde::Serialize;

/// Largest Noise message, the protocol's limit.
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// Authentication tag added by ChaChaPoly to every transport message.
const TAG_LEN: usize = 16;
/// Most plaintext carried by one transport message.
pub const MAX_PLAINTEXT: usize = MAX_NOISE_MESSAGE - TAG_LEN;

/// Length of static keys and of the cluster secret.
pub const KEY_LEN: usize = 32;

/// The kinds of link and their handshake patterns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Client → auth server.
    Nx,
    /// Client → relay.
    Nk,
    /// Server ↔ server, keyed by the cluster secret.
    NnPsk0,
}

impl Pattern {
    fn params(self) -> &'static str {
        match self {
            Pattern::Nx => "Noise_NX_25519_ChaChaPoly_BLAKE2s",
            Pattern::Nk => "Noise_NK_25519_ChaChaPoly_BLAKE2s",
            Pattern::NnPsk0 => "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
        }
    }
}

/// What went wrong on a Noise link.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("noise handshake failed: {0}")]
    Handshake(snow::Error),
    #[error("could not decrypt a noise message: {0}")]
    Decrypt(snow::Error),
    #[error("noise error: {0}")]
    Other(snow::Error),
    #[error("noise session is unusable after an earlier failure")]
    Broken,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn builder(pattern: Pattern) -> snow::Builder<'static> {
    let params = pattern
        .params()
        .parse()
        .expect("the pattern names above are valid Noise parameter strings");
    snow::Builder::new(params)
}

/// A static X25519 key pair.
#[derive(Clone)]
pub struct StaticKeypair {
    pub private: Vec<u8>,
    pub public: Vec<u8>,
}

impl StaticKeypair {
    /// Generates a fresh key pair from the OS RNG.
    pub fn generate() -> StaticKeypair {
        let kp = builder(Pattern::Nx)
            .generate_keypair()
            .expect("generating an X25519 key pair with the default resolver cannot fail");
        StaticKeypair {
            private: kp.private,
            public: kp.public,
        }
    }
}

/// How this side of a link starts its handshake.
pub enum Role<'a> {
    /// Client → auth server (NX initiator).
    NxInitiator,
    /// Auth server for clients (NX responder).
    NxResponder(&'a StaticKeypair),
    /// Client → relay, knowing the relay's public key (NK initiator).
    NkInitiator(&'a [u8]),
    /// Relay for clients (NK responder).
    NkResponder(&'a StaticKeypair),
    /// Server link initiator with the cluster secret.
    PskInitiator(&'a [u8; KEY_LEN]),
    /// Server link responder with the cluster secret.
    PskResponder(&'a [u8; KEY_LEN]),
}

fn build(role: Role<'_>) -> Result<snow::HandshakeState, snow::Error> {
    match role {
        Role::NxInitiator => builder(Pattern::Nx).build_initiator(),
        Role::NxResponder(kp) => builder(Pattern::Nx)
            .local_private_key(&kp.private)?
            .build_responder(),
        Role::NkInitiator(remote) => builder(Pattern::Nk)
            .remote_public_key(remote)?
            .build_initiator(),
        Role::NkResponder(kp) => builder(Pattern::Nk)
            .local_private_key(&kp.private)?
            .build_responder(),
        Role::PskInitiator(psk) => builder(Pattern::NnPsk0).psk(0, psk)?.build_initiator(),
        Role::PskResponder(psk) => builder(Pattern::NnPsk0).psk(0, psk)?.build_responder(),
    }
}

enum State {
    Handshake(Box<snow::HandshakeState>),
    Transport(Box<snow::TransportState>),
    /// Only while switching from handshake to transport, or after that switch failed.
    Broken,
}

/// Socket bytes in, frames out; frames in, socket bytes out. No I/O of its own.
pub struct NoiseCodec {
    state: State,
    /// Raw bytes from the socket not yet forming a whole Noise message.
    inbound: Vec<u8>,
    /// Decrypted stream, cut into frames.
    frames: FrameBuffer,
    /// Plaintext frames queued since the last [`NoiseCodec::seal`].
    outbound: Vec<u8>,
    /// The remote static key, kept once the handshake is done.
    remote_static: Option<Vec<u8>>,
}

/// Handshake messages here are small (an ephemeral key, maybe a static key, tags).
const HANDSHAKE_BUF: usize = 256;

impl NoiseCodec {
    /// A codec for `role`; if this side speaks first, the first handshake message is
    /// appended to `wire_out`.
    pub fn new(
        role: Role<'_>,
        max_frame: usize,
        wire_out: &mut Vec<u8>,
    ) -> Result<NoiseCodec, NoiseError> {
        let hs = build(role).map_err(NoiseError::Handshake)?;
        let mut codec = NoiseCodec {
            state: State::Handshake(Box::new(hs)),
            inbound: Vec::new(),
            frames: FrameBuffer::new(max_frame),
            outbound: Vec::new(),
            remote_static: None,
        };
        codec.advance_handshake(wire_out)?;
        Ok(codec)
    }

    /// Whether the handshake is complete and frames may flow.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Transport(_))
    }

    /// The peer's static public key, when the pattern transmits or presets one.
    pub fn remote_static(&self) -> Option<&[u8]> {
        self.remote_static.as_deref()
    }

    /// Feeds bytes read from the socket. Handshake replies go to `wire_out`; decrypted
    /// transport bytes become available through [`NoiseCodec::next_frame`].
    pub fn receive(&mut self, bytes: &[u8], wire_out: &mut Vec<u8>) -> Result<(), NoiseError> {
        self.inbound.extend_from_slice(bytes);
        let mut pos = 0;
        let result = loop {
            let rest = &self.inbound[pos..];
            if rest.len() < 2 {
                break Ok(());
            }
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            if rest.len() < 2 + len {
                break Ok(());
            }
            let message = &rest[2..2 + len];
            pos += 2 + len;
            let step = match &mut self.state {
                State::Handshake(hs) => match hs.read_message(message, &mut [0u8; HANDSHAKE_BUF]) {
                    Ok(_) => Ok(true),
                    Err(e) => Err(NoiseError::Handshake(e)),
                },
                // Decrypted straight into the frame buffer: no per-connection scratch.
                State::Transport(ts) => match self
                    .frames
                    .extend_with(message.len(), |buf| ts.read_message(message, buf))
                {
                    Ok(()) => Ok(false),
                    Err(e) => Err(NoiseError::Decrypt(e)),
                },
                State::Broken => Err(NoiseError::Broken),
            };
            match step {
                Ok(true) => {
                    if let Err(e) = self.advance_handshake(wire_out) {
                        break Err(e);
                    }
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        self.inbound.drain(..pos);
        if self.inbound.is_empty() && self.inbound.capacity() > crate::frame::IDLE_CAPACITY {
            self.inbound = Vec::new();
        }
        if self.outbound.is_empty() && self.outbound.capacity() > crate::frame::IDLE_CAPACITY {
            self.outbound = Vec::new();
        }
        result
    }

    /// Writes our handshake messages while it is our turn; switches to transport mode
    /// when the handshake is finished.
    fn advance_handshake(&mut self, wire_out: &mut Vec<u8>) -> Result<(), NoiseError> {
        loop {
            let State::Handshake(hs) = &mut self.state else {
                return Ok(());
            };
            if hs.is_handshake_finished() {
                let remote = hs.get_remote_static().map(<[u8]>::to_vec);
                let State::Handshake(hs) = std::mem::replace(&mut self.state, State::Broken) else {
                    unreachable!("state was just matched as Handshake");
                };
                let ts = hs.into_transport_mode().map_err(NoiseError::Handshake)?;
                self.remote_static = remote;
                self.state = State::Transport(Box::new(ts));
                return Ok(());
            }
            if !hs.is_my_turn() {
                return Ok(());
            }
            let mut buf = [0u8; HANDSHAKE_BUF];
            let n = hs
                .write_message(&[], &mut buf)
                .map_err(NoiseError::Handshake)?;
            wire_out.extend_from_slice(&(n as u16).to_be_bytes());
            wire_out.extend_from_slice(&buf[..n]);
        }
    }

    /// The next complete frame's JSON bytes, `Ok(None)` while incomplete.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        self.frames.next_frame()
    }

    /// Queues one frame; it goes out with the next [`NoiseCodec::seal`].
    pub fn queue<T: Serialize>(&mut self, value: &T) {
        crate::frame::encode_into(value, &mut self.outbound);
    }

    /// Queues raw frame bytes exactly as given (tests of hostile input).
    pub fn queue_raw_bytes(&mut self, bytes: &[u8]) {
        self.outbound.extend_from_slice(bytes);
    }

    /// Takes the frames queued and not sealed (length-prefixed JSON, as queued).
    pub fn take_queued(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outbound)
    }

    /// Whether frames are queued but not sealed.
    pub fn has_queued(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Encrypts every queued frame into as few Noise messages as possible, appending the
    /// wire bytes to `wire_out`. Does nothing before the handshake is complete.
    pub fn seal(&mut self, wire_out: &mut Vec<u8>) -> Result<(), NoiseError> {
        let State::Transport(ts) = &mut self.state else {
            return Ok(());
        };
        for chunk in self.outbound.chunks(MAX_PLAINTEXT) {
            // Encrypted straight into the output buffer, after its length prefix.
            let start = wire_out.len();
            wire_out.resize(start + 2 + chunk.len() + TAG_LEN, 0);
            let n = match ts.write_message(chunk, &mut wire_out[start + 2..]) {
                Ok(n) => n,
                Err(e) => {
                    wire_out.truncate(start);
                    return Err(NoiseError::Other(e));
                }
            };
            wire_out.truncate(start + 2 + n);
            wire_out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
        }
        self.outbound.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pump(a: &mut NoiseCodec, a_out: &mut Vec<u8>, b: &mut NoiseCodec, b_out: &mut Vec<u8>) {
        for _ in 0..4 {
            let to_b = std::mem::take(a_out);
            b.receive(&to_b, b_out).unwrap();
            let to_a = std::mem::take(b_out);
            a.receive(&to_a, a_out).unwrap();
        }
    }

    fn exchange(init: Role<'_>, resp: Role<'_>) -> (NoiseCodec, NoiseCodec) {
        let (mut io, mut ro) = (Vec::new(), Vec::new());
        let mut i = NoiseCodec::new(init, 1 << 20, &mut io).unwrap();
        let mut r = NoiseCodec::new(resp, 1 << 20, &mut ro).unwrap();
        pump(&mut i, &mut io, &mut r, &mut ro);
        assert!(i.is_ready() && r.is_ready());
        (i, r)
    }

    #[test]
    fn nx_reveals_the_server_key_and_carries_big_frames() {
        let kp = StaticKeypair::generate();
        let (mut c, mut s) = exchange(Role::NxInitiator, Role::NxResponder(&kp));
        assert_eq!(c.remote_static(), Some(&kp.public[..]));
        let big = "x".repeat(200_000);
        c.queue(&serde_json::json!({"t": "big", "s": big}));
        c.queue(&serde_json::json!({"t": "small"}));
        let mut wire = Vec::new();
        c.seal(&mut wire).unwrap();
        // Deliver byte by byte to exercise partial Noise messages.
        let mut sink = Vec::new();
        for b in wire.chunks(7777) {
            s.receive(b, &mut sink).unwrap();
        }
        let f1: serde_json::Value =
            serde_json::from_slice(s.next_frame().unwrap().unwrap()).unwrap();
        assert_eq!(f1["s"].as_str().unwrap().len(), 200_000);
        let f2: serde_json::Value =
            serde_json::from_slice(s.next_frame().unwrap().unwrap()).unwrap();
        assert_eq!(f2["t"], "small");
        assert!(s.next_frame().unwrap().is_none());
    }

    #[test]
    fn nk_with_wrong_key_fails() {
        let kp = StaticKeypair::generate();
        let other = StaticKeypair::generate();
        let (mut io, mut ro) = (Vec::new(), Vec::new());
        let _i = NoiseCodec::new(Role::NkInitiator(&other.public), 1024, &mut io).unwrap();
        let mut r = NoiseCodec::new(Role::NkResponder(&kp), 1024, &mut ro).unwrap();
        assert!(r.receive(&io, &mut ro).is_err());
    }

    #[test]
    fn psk_mismatch_fails_and_match_works() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        exchange(Role::PskInitiator(&a), Role::PskResponder(&a));
        let (mut io, mut ro) = (Vec::new(), Vec::new());
        let _i = NoiseCodec::new(Role::PskInitiator(&a), 1024, &mut io).unwrap();
        let mut r = NoiseCodec::new(Role::PskResponder(&b), 1024, &mut ro).unwrap();
        assert!(r.receive(&io, &mut ro).is_err());
    }
}
