//! End-to-end encryption between two clients; the servers only ever see the output.
//!
//! - An [`Identity`] is a user's RSA-3072 key pair, made at registration. Its public half
//!   (SubjectPublicKeyInfo PEM) is stored with the account; the private half never leaves
//!   the client (it lives in the encrypted [`crate::store`]).
//! - A [`PeerKey`] is another user's public key, pinned on first use; [`safety_number`]
//!   prints a fingerprint of both keys for `verify PEER`.
//! - A [`ConversationKey`] is a Fernet key with a random id. The first sender wraps it for
//!   the peer with RSA-OAEP (SHA-256) and signs the offer with RSA-PSS (SHA-256)
//!   ([`make_offer`]); the receiver checks the signature *before* decrypting anything
//!   ([`open_offer`]). Both sides keep every key by id, so two crossing offers both work.
//! - Texts are Fernet tokens of a JSON [`TextPayload`] ([`seal_text`] / [`open_text`]).
//!
//! What crosses the wire is an [`Envelope`], carried as JSON in the opaque `body` string
//! of a `send` frame:
//!
//! ```text
//! {"type":"offer","v":2,"key_id":"<16 hex>","wrapped":"<std base64>","sig":"<std base64>"}
//! {"type":"text","v":2,"key_id":"<16 hex>","token":"<Fernet token>"}
//! ```
//!
//! All randomness comes from the operating system RNG (`getrandom`).
//!
//! Timing: the private-key operations here are `rsa` 0.10's (blinded, and said to fix the
//! Marvin side channel of 0.9). Errors from a decryption are deliberately coarse
//! ([`E2eError::Decrypt`]); callers must not make what they send back depend on them.

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use fernet::Fernet;
use rand::rngs::SysRng;
use rand::TryRng;
use rsa::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};
use rsa::sha2::{Digest, Sha256, Sha512};
use rsa::traits::PublicKeyParts;
use rsa::{Generate, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The only envelope version this client writes and accepts.
pub const ENVELOPE_VERSION: u32 = 2;

/// Smallest RSA modulus accepted from a peer or a stored identity (we make 3072-bit keys).
pub const MIN_RSA_BITS: usize = 2048;

/// Domain separator at the start of the bytes an offer signature covers.
const OFFER_SIG_CONTEXT: &str = "fastchat-offer-v1";

/// Errors of the end-to-end layer. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    /// The offer's signature does not verify with the sender's (pinned) public key.
    #[error("offer signature does not verify with the sender's public key")]
    BadSignature,
    /// A key could not be parsed, encoded, or is unacceptable (too small, not a Fernet key).
    #[error("bad key: {0}")]
    BadKey(String),
    /// Decryption failed: wrong key, a message for someone else, or tampered data.
    /// Deliberately carries no detail.
    #[error("could not decrypt (wrong key or tampered data)")]
    Decrypt,
    /// An envelope or payload is not in the expected format.
    #[error("malformed payload: {0}")]
    BadPayload(String),
    /// The operating system RNG failed.
    #[error("the operating system random number generator failed: {0}")]
    Rng(String),
    /// An RSA encryption or signing operation failed.
    #[error("RSA operation failed: {0}")]
    Crypto(String),
    /// The sender, recipient or group sealed inside a payload is not the one it came
    /// with (a reflected, re-attributed or re-routed message), or is missing.
    #[error("refused: {0}")]
    Context(String),
}

/// Who a payload is from and for, sealed inside it (PROTOCOL.md §7.3): a receiver
/// compares it with who the relay says sent it, itself, and the group, so a message
/// cannot be reflected to its sender, shown under another name, or moved between a
/// direct chat and a group.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The sender's user name.
    pub from: String,
    /// The recipient's user name (direct payloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The group (group texts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<i64>,
    /// The group key's epoch (group texts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i32>,
    /// The sending store's random id (16 hex): see [`Stamp`].
    #[serde(default)]
    pub sid: String,
    /// The sender's counter in this conversation (the peer, or the group), from 1: see
    /// [`Stamp`]. Not compared by [`Context::check`]; the receiver's window is.
    #[serde(default)]
    pub n: u64,
}

/// Where a payload stands in its sender's sequence (PROTOCOL.md §7.3): the sending
/// store's random id and its counter in the conversation. Receivers keep a replay
/// window per (sender, conversation, `sid`) — `crate::replay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub sid: String,
    pub n: u64,
}

impl Context {
    /// A direct payload `from` → `to`.
    pub fn direct(from: &str, to: &str) -> Context {
        Context {
            from: from.to_string(),
            to: Some(to.to_string()),
            group_id: None,
            epoch: None,
            sid: String::new(),
            n: 0,
        }
    }

    /// A group text `from` to group `group_id`, sealed with a key of `epoch`.
    pub fn group(from: &str, group_id: i64, epoch: i32) -> Context {
        Context {
            from: from.to_string(),
            to: None,
            group_id: Some(group_id),
            epoch: Some(epoch),
            sid: String::new(),
            n: 0,
        }
    }

    /// The same context with the sender's stamp (what a sender seals).
    pub fn stamped(mut self, stamp: Stamp) -> Context {
        self.sid = stamp.sid;
        self.n = stamp.n;
        self
    }

    /// Refuses a sealed context that is missing, has no counter, or differs from `self`
    /// (the expected); gives the sealed stamp.
    fn check(&self, sealed: Option<Context>) -> Result<Stamp, E2eError> {
        match sealed {
            None => Err(E2eError::Context(
                "the payload names no sender and recipient (an older client, or forged)".into(),
            )),
            Some(c) if c.from != self.from => Err(E2eError::Context(format!(
                "sealed by {:?}, delivered as from {:?}",
                c.from, self.from
            ))),
            Some(c) if c.to != self.to => Err(E2eError::Context(format!(
                "sealed for {:?}, delivered to {:?}",
                c.to, self.to
            ))),
            Some(c) if c.group_id != self.group_id || c.epoch != self.epoch => {
                Err(E2eError::Context(format!(
                    "sealed for group {:?} epoch {:?}, delivered for group {:?} epoch {:?}",
                    c.group_id, c.epoch, self.group_id, self.epoch
                )))
            }
            Some(c) if c.n == 0 || !is_lower_hex(&c.sid, 16) => Err(E2eError::Context(
                "the payload carries no counter (an older client, or forged)".into(),
            )),
            Some(c) => Ok(Stamp { sid: c.sid, n: c.n }),
        }
    }
}

/// A payload with its context, as sealed: the payload's fields and `"ctx"`.
#[derive(Serialize)]
struct SealedOut<'a, T> {
    #[serde(flatten)]
    payload: &'a T,
    ctx: &'a Context,
}

/// A payload as opened: its context may be missing (an older client's).
#[derive(Deserialize)]
struct SealedIn<T> {
    #[serde(flatten)]
    payload: T,
    #[serde(default)]
    ctx: Option<Context>,
}

/// A user's own RSA key pair.
pub struct Identity {
    private: PrivateKey,
    public: PeerKey,
}

impl Identity {
    /// RSA-PSS(SHA-256) signature of `bytes` (roster statements, 7.9).
    pub fn sign(&self, bytes: &[u8]) -> Result<Vec<u8>, E2eError> {
        self.private
            .pss_sign::<Sha256>(bytes)
            .map(|sig| sig.to_vec())
            .map_err(|e| E2eError::Crypto(format!("PSS signing: {e}")))
    }

    /// Makes a new RSA-3072 key pair from the OS RNG (~0.3 s optimised).
    pub fn generate() -> Result<Identity, E2eError> {
        let private = PrivateKey::try_generate().map_err(|e| E2eError::Rng(e.to_string()))?;
        Identity::from_private(private)
    }

    /// Reads an unencrypted PKCS#8 DER private key (as written by [`Identity::to_pkcs8_der`]).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Identity, E2eError> {
        let private = PrivateKey::from_pkcs8_der(der)
            .map_err(|e| E2eError::BadKey(format!("private key is not RSA PKCS#8 DER: {e}")))?;
        Identity::from_private(private)
    }

    fn from_private(private: PrivateKey) -> Result<Identity, E2eError> {
        let public = PeerKey::from_public(private.to_public_key())?;
        Ok(Identity { private, public })
    }

    /// The private key as unencrypted PKCS#8 DER. Only ever store it inside the encrypted
    /// store.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.private
            .to_pkcs8_der()
            .expect("a two-prime RSA key made or decoded by rsa always encodes as PKCS#8")
            .as_bytes()
            .to_vec()
    }

    /// The public key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, LF endings).
    pub fn public_pem(&self) -> String {
        self.public.pem.clone()
    }

    /// The public half, as peers see it.
    pub fn peer_key(&self) -> &PeerKey {
        &self.public
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("bits", &(self.public.key.size() * 8))
            .finish_non_exhaustive()
    }
}

/// Another user's RSA public key.
#[derive(Clone)]
pub struct PeerKey {
    key: PublicKey,
    /// SubjectPublicKeyInfo DER, what the safety number hashes.
    spki_der: Vec<u8>,
    /// Canonical SPKI PEM (LF line endings).
    pem: String,
}

impl PeerKey {
    /// Parses a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`); refuses keys smaller
    /// than [`MIN_RSA_BITS`].
    pub fn from_pem(pem: &str) -> Result<PeerKey, E2eError> {
        let key = PublicKey::from_public_key_pem(pem.trim())
            .map_err(|e| E2eError::BadKey(format!("not an RSA public key PEM: {e}")))?;
        PeerKey::from_public(key)
    }

    fn from_public(key: PublicKey) -> Result<PeerKey, E2eError> {
        let bits = key.size() * 8;
        if bits < MIN_RSA_BITS {
            return Err(E2eError::BadKey(format!(
                "RSA key of {bits} bits is smaller than the minimum of {MIN_RSA_BITS}"
            )));
        }
        let spki_der = key
            .to_public_key_der()
            .map_err(|e| E2eError::BadKey(format!("cannot encode public key: {e}")))?
            .into_vec();
        let pem = key
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| E2eError::BadKey(format!("cannot encode public key: {e}")))?;
        Ok(PeerKey { key, spki_der, pem })
    }

    /// Verifies an RSA-PSS(SHA-256) signature of `bytes` made with this key's pair.
    pub fn verify(&self, bytes: &[u8], sig: &[u8]) -> Result<(), E2eError> {
        self.key
            .pss_verify::<Sha256>(bytes, sig)
            .map_err(|_| E2eError::BadSignature)
    }

    /// The key as canonical SubjectPublicKeyInfo PEM (what to pin and compare).
    pub fn pem(&self) -> &str {
        &self.pem
    }
}

impl PartialEq for PeerKey {
    fn eq(&self, other: &PeerKey) -> bool {
        self.spki_der == other.spki_der
    }
}

impl Eq for PeerKey {}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerKey")
            .field("bits", &(self.key.size() * 8))
            .finish_non_exhaustive()
    }
}

/// Safety number of two public keys (PEM strings): the same whichever order they are given.
///
/// Hashes the two SPKI DER encodings, sorted bytewise, each prefixed by its length as a
/// u32 big-endian, and shows 12 groups of 5 decimal digits, space separated; each group is
/// a big-endian u64 of 5 hash bytes mod 100000. The hash is SHA-512, not SHA-256: 12
/// groups need 60 bytes and SHA-256 has only 32.
pub fn safety_number(a_pem: &str, b_pem: &str) -> Result<String, E2eError> {
    let a = PeerKey::from_pem(a_pem)?;
    let b = PeerKey::from_pem(b_pem)?;
    let (first, second) = if a.spki_der <= b.spki_der {
        (&a.spki_der, &b.spki_der)
    } else {
        (&b.spki_der, &a.spki_der)
    };
    let mut hasher = Sha512::new();
    for der in [first, second] {
        let len = u32::try_from(der.len())
            .map_err(|_| E2eError::BadKey("public key DER longer than 4 GiB".into()))?;
        hasher.update(len.to_be_bytes());
        hasher.update(der);
    }
    let digest = hasher.finalize();
    let groups: Vec<String> = digest
        .chunks_exact(5)
        .take(12)
        .map(|chunk| {
            let value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            format!("{:05}", value % 100_000)
        })
        .collect();
    Ok(groups.join(" "))
}

/// A pairwise conversation key: `id` = 16 lowercase hex chars (8 random bytes), `key` = a
/// Fernet key (url-safe base64 of 32 random bytes, as `fernet::Fernet::generate_key` gives).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConversationKey {
    /// Random key id, 16 lowercase hex chars; travels in clear in every envelope.
    pub id: String,
    /// The Fernet key (secret).
    pub key: String,
}

impl ConversationKey {
    /// Makes a fresh random key and id.
    ///
    /// # Panics
    /// If the operating system RNG fails (as `Fernet::encrypt` itself would for its IV).
    pub fn generate() -> ConversationKey {
        ConversationKey {
            id: fastchat_common::hex::encode(&os_random::<8>()),
            key: URL_SAFE.encode(os_random::<32>()),
        }
    }
}

/// What travels as the opaque `body` string of a `send` frame, as JSON:
///
/// `{"v":2,"type":"offer","key_id":"..","wrapped":"<std base64 of RSA-OAEP(SHA-256)
/// ciphertext of the Fernet key string's UTF-8 bytes>","sig":"<std base64 RSA-PSS(SHA-256)
/// signature>"}` or `{"v":2,"type":"text","key_id":"..","token":"<Fernet token>"}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// A conversation key for the recipient, wrapped with their public key and signed by
    /// the sender. Open with [`open_offer`].
    Offer {
        /// Envelope version, [`ENVELOPE_VERSION`].
        v: u32,
        /// Id of the offered key.
        key_id: String,
        /// Std base64 of the RSA-OAEP(SHA-256) ciphertext of the Fernet key string.
        wrapped: String,
        /// Std base64 of the RSA-PSS(SHA-256) signature (see [`make_offer`]).
        sig: String,
    },
    /// A text sealed with the conversation key `key_id`. Open with [`open_text`].
    Text {
        /// Envelope version, [`ENVELOPE_VERSION`].
        v: u32,
        /// Id of the conversation key the token is sealed with.
        key_id: String,
        /// Fernet token of the JSON [`TextPayload`].
        token: String,
    },
    /// A text for a group, sealed with the group key `key_id` of `epoch`. Open with
    /// [`open_text`] and that group key.
    GroupText {
        /// Envelope version, [`ENVELOPE_VERSION`].
        v: u32,
        group_id: i64,
        /// Id of the group key the token is sealed with.
        key_id: String,
        /// The key's epoch (see [`GroupKeyGrant`]).
        epoch: i32,
        /// Fernet token of the JSON [`TextPayload`].
        token: String,
    },
    /// A delivery receipt sealed with the conversation key `key_id` shared with the
    /// recipient. Open with [`open_receipt`]. The type is visible (not the contents), so
    /// a client can tell, without decrypting, that it must not receipt a receipt.
    Receipt {
        /// Envelope version, [`ENVELOPE_VERSION`].
        v: u32,
        /// Id of the conversation key the token is sealed with.
        key_id: String,
        /// Fernet token of the JSON [`ReceiptPayload`].
        token: String,
    },
    /// A request to the sender of messages that did not open here: offer key `key_id`
    /// again and send those messages again (direct), or grant group key `key_id`
    /// (`group_id` set). Not secret; signed by the requester with RSA-PSS (see
    /// [`make_key_request`]), so only the peer itself can cause a re-send.
    KeyRequest {
        /// Envelope version, [`ENVELOPE_VERSION`].
        v: u32,
        /// The key asked for.
        key_id: String,
        /// The group whose key it is, for a group key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<i64>,
        /// Server message ids (as the requester received them) of the direct messages to
        /// send again; empty for a group key. At most [`MAX_REQUESTED_MESSAGES`].
        #[serde(default)]
        msg_ids: Vec<i64>,
        /// The requester's clock, unix ms.
        ts: u64,
        /// Std base64 of the RSA-PSS(SHA-256) signature.
        sig: String,
    },
}

/// Most messages one key request names.
pub const MAX_REQUESTED_MESSAGES: usize = 64;

/// Domain separation of key-request signatures.
const KEY_REQUEST_SIG_CONTEXT: &str = "fastchat-key-request-v1";

/// What a verified [`Envelope::KeyRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRequest {
    pub key_id: String,
    pub group_id: Option<i64>,
    pub msg_ids: Vec<i64>,
    pub ts: u64,
}

/// The bytes a key request's signature covers: context, requester, recipient, key id,
/// group id (or `-`), the message ids joined by `,`, and the time, one per line.
fn key_request_signed_bytes(from: &str, to: &str, r: &KeyRequest) -> Vec<u8> {
    let ids: Vec<String> = r.msg_ids.iter().map(i64::to_string).collect();
    let group = r
        .group_id
        .map_or_else(|| "-".to_string(), |g| g.to_string());
    format!(
        "{KEY_REQUEST_SIG_CONTEXT}\n{from}\n{to}\n{}\n{group}\n{}\n{}",
        r.key_id,
        ids.join(","),
        r.ts
    )
    .into_bytes()
}

/// Signs a key request `from` (us) → `to`.
pub fn make_key_request(
    me: &Identity,
    from: &str,
    to: &str,
    request: &KeyRequest,
) -> Result<Envelope, E2eError> {
    check_name(from)?;
    check_name(to)?;
    check_key_id(&request.key_id)?;
    if request.msg_ids.len() > MAX_REQUESTED_MESSAGES {
        return Err(E2eError::BadPayload(
            "too many messages in one key request".into(),
        ));
    }
    let sig = me
        .private
        .pss_sign::<Sha256>(&key_request_signed_bytes(from, to, request))
        .map_err(|e| E2eError::Crypto(format!("PSS signing: {e}")))?;
    Ok(Envelope::KeyRequest {
        v: ENVELOPE_VERSION,
        key_id: request.key_id.clone(),
        group_id: request.group_id,
        msg_ids: request.msg_ids.clone(),
        ts: request.ts,
        sig: STANDARD.encode(sig),
    })
}

/// Verifies a key request `from` → `to` (us) against the requester's pinned key.
pub fn open_key_request(
    from: &str,
    to: &str,
    requester: &PeerKey,
    request: &KeyRequest,
    sig: &str,
) -> Result<(), E2eError> {
    check_name(from)?;
    check_name(to)?;
    check_key_id(&request.key_id)?;
    if request.msg_ids.len() > MAX_REQUESTED_MESSAGES {
        return Err(E2eError::BadPayload(
            "too many messages in one key request".into(),
        ));
    }
    let sig = STANDARD.decode(sig).map_err(|_| E2eError::BadSignature)?;
    requester
        .key
        .pss_verify::<Sha256>(&key_request_signed_bytes(from, to, request), &sig)
        .map_err(|_| E2eError::BadSignature)
}

impl Envelope {
    /// The JSON string to put in a `send` frame's `body`.
    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("an Envelope of strings and integers serialises to JSON")
    }

    /// Parses a received `body`; refuses unknown versions and malformed key ids.
    pub fn from_body(body: &str) -> Result<Envelope, E2eError> {
        let envelope: Envelope = serde_json::from_str(body)
            .map_err(|e| E2eError::BadPayload(format!("not an envelope: {e}")))?;
        let v = envelope.version();
        if v != ENVELOPE_VERSION {
            let whose = if v < ENVELOPE_VERSION {
                "the sender's client is older than this one and must be updated"
            } else {
                "the sender's client is newer than this one: update this one"
            };
            return Err(E2eError::BadPayload(format!(
                "unsupported envelope version {v} ({whose})"
            )));
        }
        check_key_id(envelope.key_id())?;
        Ok(envelope)
    }

    /// The envelope version (`v`).
    pub fn version(&self) -> u32 {
        match self {
            Envelope::Offer { v, .. }
            | Envelope::Text { v, .. }
            | Envelope::GroupText { v, .. }
            | Envelope::Receipt { v, .. }
            | Envelope::KeyRequest { v, .. } => *v,
        }
    }

    /// The conversation key id the envelope refers to.
    pub fn key_id(&self) -> &str {
        match self {
            Envelope::Offer { key_id, .. }
            | Envelope::Text { key_id, .. }
            | Envelope::GroupText { key_id, .. }
            | Envelope::Receipt { key_id, .. }
            | Envelope::KeyRequest { key_id, .. } => key_id,
        }
    }
}

/// Plaintext inside a text token (JSON): `{"mid":"<32 lowercase hex: sender's random
/// 128-bit message id>","ts":<unix ms u64>,"text":"..."}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TextPayload {
    /// A group key handed over the pairwise channel (then `text` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_key: Option<GroupKeyGrant>,
    /// A file announced to the recipient(s) (then `text` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileOffer>,
    /// The sender's random message id (32 lowercase hex), for de-duplication.
    pub mid: String,
    /// Sender's clock when written, unix milliseconds.
    pub ts: u64,
    /// The message text.
    pub text: String,
}

/// Plaintext bytes per file chunk (the sealed chunk fits a frame comfortably).
pub const FILE_CHUNK: usize = fastchat_common::proto::FILE_CHUNK_BYTES as usize;

/// A file as its sender announces it, inside an end-to-end encrypted message:
/// where the relay keeps it, its name, size and SHA-256, and the key of its chunks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FileOffer {
    pub file_id: i64,
    pub name: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the whole file.
    pub sha256: String,
    /// The Fernet key of the chunks (fresh for every file).
    pub key: String,
    /// 32 hex chars: the file's random nonce, inside every chunk.
    pub nonce: String,
    pub chunks: u32,
}

/// Seals chunk `index` of `total`: a Fernet token of `nonce ‖ index ‖ total ‖ data`
/// (index and total as u32 big-endian), so a chunk from another file, another place or
/// a shortened file does not open as this one.
pub fn seal_chunk(
    key: &str,
    nonce: &[u8; 16],
    index: u32,
    total: u32,
    data: &[u8],
) -> Result<String, E2eError> {
    let fernet = fernet_for(key)?;
    let mut plain = Vec::with_capacity(24 + data.len());
    plain.extend_from_slice(nonce);
    plain.extend_from_slice(&index.to_be_bytes());
    plain.extend_from_slice(&total.to_be_bytes());
    plain.extend_from_slice(data);
    Ok(fernet.encrypt(&plain))
}

/// Opens chunk `index` of `total` of the file with `nonce`; any mismatch is an error.
pub fn open_chunk(
    key: &str,
    nonce: &[u8; 16],
    index: u32,
    total: u32,
    token: &str,
) -> Result<Vec<u8>, E2eError> {
    let fernet = fernet_for(key)?;
    let plain = fernet_decrypt(&fernet, token).map_err(|_| E2eError::Decrypt)?;
    if plain.len() < 24
        || plain[..16] != nonce[..]
        || plain[16..20] != index.to_be_bytes()
        || plain[20..24] != total.to_be_bytes()
    {
        return Err(E2eError::Decrypt);
    }
    Ok(plain[24..].to_vec())
}

/// A fresh Fernet key for a file.
pub fn new_file_key() -> String {
    ConversationKey::generate().key
}

/// A group key as an admin hands it to a member over their pairwise channel:
/// `{"group_id":7,"key_id":"<16 hex>","epoch":2,"key":"<Fernet key>"}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GroupKeyGrant {
    pub group_id: i64,
    pub key_id: String,
    /// The group's key epoch this key was made for (it grows when members leave).
    pub epoch: i32,
    pub key: String,
}

/// Seals a group text with the group key of `epoch`.
pub fn seal_group_text(
    key: &ConversationKey,
    group_id: i64,
    epoch: i32,
    payload: &TextPayload,
) -> Result<Envelope, E2eError> {
    match seal_text(key, payload)? {
        Envelope::Text { v, key_id, token } => Ok(Envelope::GroupText {
            v,
            group_id,
            key_id,
            epoch,
            token,
        }),
        other => Ok(other),
    }
}

/// A new random 128-bit message id, as 32 lowercase hex chars.
///
/// # Panics
/// If the operating system RNG fails.
pub fn new_message_id() -> String {
    fastchat_common::hex::encode(&os_random::<16>())
}

/// Wraps `key` for `peer` and signs the offer as `me`.
///
/// The signature covers exactly the UTF-8 bytes of
/// `"fastchat-offer-v1\n{from}\n{to}\n{key_id}\n{wrapped}"` (`wrapped` = the base64 string),
/// so an offer cannot be replayed under other names. `from` and `to` must not contain a
/// newline.
pub fn make_offer(
    me: &Identity,
    from: &str,
    to: &str,
    peer: &PeerKey,
    key: &ConversationKey,
) -> Result<Envelope, E2eError> {
    check_name(from)?;
    check_name(to)?;
    check_key_id(&key.id)?;
    check_fernet_key(&key.key)?;
    let ciphertext = peer
        .key
        .oaep_encrypt::<Sha256>(key.key.as_bytes())
        .map_err(|e| E2eError::Crypto(format!("OAEP encryption: {e}")))?;
    let wrapped = STANDARD.encode(ciphertext);
    let signed = offer_signed_bytes(from, to, &key.id, &wrapped);
    let sig = me
        .private
        .pss_sign::<Sha256>(&signed)
        .map_err(|e| E2eError::Crypto(format!("PSS signing: {e}")))?;
    Ok(Envelope::Offer {
        v: ENVELOPE_VERSION,
        key_id: key.id.clone(),
        wrapped,
        sig: STANDARD.encode(sig),
    })
}

/// Opens an offer `from` → `to` (`to` is us): verifies the PSS signature with the sender's
/// key FIRST, and only then OAEP-decrypts; returns the key.
///
/// A bad signature returns [`E2eError::BadSignature`] without attempting any RSA
/// decryption; a failed decryption is [`E2eError::Decrypt`] with no detail.
pub fn open_offer(
    me: &Identity,
    from: &str,
    to: &str,
    sender: &PeerKey,
    key_id: &str,
    wrapped: &str,
    sig: &str,
) -> Result<ConversationKey, E2eError> {
    check_name(from)?;
    check_name(to)?;
    check_key_id(key_id)?;
    // A signature that is not even base64 is simply not a valid signature.
    let sig = STANDARD.decode(sig).map_err(|_| E2eError::BadSignature)?;
    let signed = offer_signed_bytes(from, to, key_id, wrapped);
    sender
        .key
        .pss_verify::<Sha256>(&signed, &sig)
        .map_err(|_| E2eError::BadSignature)?;

    // Authentic from here on: the sender signed exactly these bytes.
    let ciphertext = STANDARD
        .decode(wrapped)
        .map_err(|_| E2eError::BadPayload("wrapped key is not base64".into()))?;
    let plain = me
        .private
        .oaep_decrypt::<Sha256>(&ciphertext)
        .map_err(|_| E2eError::Decrypt)?;
    let key = String::from_utf8(plain).map_err(|_| E2eError::Decrypt)?;
    check_fernet_key(&key)?;
    Ok(ConversationKey {
        id: key_id.to_string(),
        key,
    })
}

/// Seals a text with a conversation key into an [`Envelope::Text`].
pub fn seal_text(key: &ConversationKey, payload: &TextPayload) -> Result<Envelope, E2eError> {
    check_message_id(&payload.mid)?;
    Ok(Envelope::Text {
        v: ENVELOPE_VERSION,
        key_id: key.id.clone(),
        token: seal_json(key, payload, "text")?,
    })
}

/// Encrypts a payload's JSON with a conversation key: the Fernet token.
fn seal_json<T: Serialize>(
    key: &ConversationKey,
    payload: &T,
    what: &str,
) -> Result<String, E2eError> {
    check_key_id(&key.id)?;
    let fernet = fernet_for(&key.key)?;
    let json = serde_json::to_vec(payload)
        .map_err(|e| E2eError::BadPayload(format!("cannot encode {what} payload: {e}")))?;
    Ok(fernet.encrypt(&json))
}

/// Decrypts a Fernet token made with a conversation key and parses its JSON payload.
fn open_json<T: serde::de::DeserializeOwned>(
    key: &ConversationKey,
    token: &str,
    what: &str,
) -> Result<T, E2eError> {
    let fernet = fernet_for(&key.key)?;
    let plain = fernet_decrypt(&fernet, token).map_err(|_| E2eError::Decrypt)?;
    serde_json::from_slice(&plain)
        .map_err(|e| E2eError::BadPayload(format!("{what} payload is not valid JSON: {e}")))
}

/// Seals a text (or grant, or file announcement) for a direct chat with its context.
pub fn seal_text_in(
    key: &ConversationKey,
    payload: &TextPayload,
    ctx: &Context,
) -> Result<Envelope, E2eError> {
    check_message_id(&payload.mid)?;
    Ok(Envelope::Text {
        v: ENVELOPE_VERSION,
        key_id: key.id.clone(),
        token: seal_json(key, &SealedOut { payload, ctx }, "text")?,
    })
}

/// Seals a group text with its context (sender, group and epoch inside).
pub fn seal_group_text_in(
    key: &ConversationKey,
    payload: &TextPayload,
    ctx: &Context,
) -> Result<Envelope, E2eError> {
    let (Some(group_id), Some(epoch)) = (ctx.group_id, ctx.epoch) else {
        return Err(E2eError::BadPayload(
            "a group text needs a group and an epoch".into(),
        ));
    };
    match seal_text_in(key, payload, ctx)? {
        Envelope::Text { v, key_id, token } => Ok(Envelope::GroupText {
            v,
            group_id,
            key_id,
            epoch,
            token,
        }),
        other => Ok(other),
    }
}

/// Opens a text token sealed with `key`, refusing it unless its sealed context is
/// `expected` ([`E2eError::Context`]).
pub fn open_text_in(
    key: &ConversationKey,
    token: &str,
    expected: &Context,
) -> Result<(TextPayload, Stamp), E2eError> {
    let (payload, stamp): (TextPayload, Stamp) = open_in(key, token, "text", expected)?;
    check_message_id(&payload.mid)?;
    Ok((payload, stamp))
}

/// Opens a payload sealed with its context, refusing it unless that is `expected`.
fn open_in<T: serde::de::DeserializeOwned>(
    key: &ConversationKey,
    token: &str,
    what: &str,
    expected: &Context,
) -> Result<(T, Stamp), E2eError> {
    let sealed: SealedIn<T> = open_json(key, token, what)?;
    let stamp = expected.check(sealed.ctx)?;
    Ok((sealed.payload, stamp))
}

/// Seals a receipt with its context.
pub fn seal_receipt_in(
    key: &ConversationKey,
    payload: &ReceiptPayload,
    ctx: &Context,
) -> Result<Envelope, E2eError> {
    check_message_id(&payload.mid)?;
    Ok(Envelope::Receipt {
        v: ENVELOPE_VERSION,
        key_id: key.id.clone(),
        token: seal_json(key, &SealedOut { payload, ctx }, "receipt")?,
    })
}

/// Opens a receipt, refusing it unless its sealed context is `expected`.
pub fn open_receipt_in(
    key: &ConversationKey,
    token: &str,
    expected: &Context,
) -> Result<(ReceiptPayload, Stamp), E2eError> {
    let (payload, stamp): (ReceiptPayload, Stamp) = open_in(key, token, "receipt", expected)?;
    check_message_id(&payload.mid)?;
    Ok((payload, stamp))
}

/// Opens a text token sealed with `key` (without a context check: the load tester's
/// own texts, and tools).
pub fn open_text(key: &ConversationKey, token: &str) -> Result<TextPayload, E2eError> {
    let payload: TextPayload = open_json(key, token, "text")?;
    check_message_id(&payload.mid)?;
    Ok(payload)
}

/// Plaintext inside a receipt token (JSON): which of the recipient's messages the
/// sender of the receipt has stored on its device, named by their sender message ids.
///
/// `{"mid":"<32 hex>","ts":1795568656123,"mids":["<32 hex>"]}`
///
/// Server message ids are deliberately not used: the relay chooses them, so a receipt
/// naming them would let a relay mark a message it dropped as delivered.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReceiptPayload {
    /// The receipt's own random message id (32 lowercase hex).
    pub mid: String,
    /// Sender's clock when written, unix milliseconds.
    pub ts: u64,
    /// Sender message ids (`mid`) of the texts stored, direct and group alike.
    #[serde(default)]
    pub mids: Vec<String>,
}

/// Seals a receipt with a conversation key into an [`Envelope::Receipt`].
pub fn seal_receipt(key: &ConversationKey, payload: &ReceiptPayload) -> Result<Envelope, E2eError> {
    check_message_id(&payload.mid)?;
    Ok(Envelope::Receipt {
        v: ENVELOPE_VERSION,
        key_id: key.id.clone(),
        token: seal_json(key, payload, "receipt")?,
    })
}

/// Opens a receipt token sealed with `key`.
pub fn open_receipt(key: &ConversationKey, token: &str) -> Result<ReceiptPayload, E2eError> {
    let payload: ReceiptPayload = open_json(key, token, "receipt")?;
    check_message_id(&payload.mid)?;
    Ok(payload)
}

/// Decrypts a Fernet token regardless of its timestamp.
///
/// `Fernet::decrypt` refuses tokens stamped more than 60 s in the future, so a peer whose
/// clock runs fast could not be read, and a store saved before the clock was set back
/// could not be opened (reported as a wrong password). We use no TTLs, so the timestamp
/// carries nothing we need: decrypt "at" a far-future time, which disables only that check.
pub(crate) fn fernet_decrypt(
    fernet: &Fernet,
    token: &str,
) -> Result<Vec<u8>, fernet::DecryptionError> {
    // u64::MAX / 2 leaves room for fernet's `now + 60` without overflow.
    fernet.decrypt_at_time(token, None, u64::MAX / 2)
}

/// The bytes an offer signature covers.
fn offer_signed_bytes(from: &str, to: &str, key_id: &str, wrapped: &str) -> Vec<u8> {
    format!("{OFFER_SIG_CONTEXT}\n{from}\n{to}\n{key_id}\n{wrapped}").into_bytes()
}

fn fernet_for(key: &str) -> Result<Fernet, E2eError> {
    Fernet::new(key).ok_or_else(|| {
        E2eError::BadKey("conversation key is not url-safe base64 of 32 bytes".into())
    })
}

fn check_fernet_key(key: &str) -> Result<(), E2eError> {
    fernet_for(key).map(|_| ())
}

/// A user name inside signed bytes: a newline would make the fields ambiguous.
fn check_name(name: &str) -> Result<(), E2eError> {
    if name.is_empty() || name.contains('\n') {
        return Err(E2eError::BadPayload(format!("invalid user name {name:?}")));
    }
    Ok(())
}

fn check_key_id(id: &str) -> Result<(), E2eError> {
    if !is_lower_hex(id, 16) {
        return Err(E2eError::BadPayload(format!(
            "key id {id:?} is not 16 lowercase hex chars"
        )));
    }
    Ok(())
}

fn check_message_id(mid: &str) -> Result<(), E2eError> {
    if !is_lower_hex(mid, 32) {
        return Err(E2eError::BadPayload(format!(
            "message id {mid:?} is not 32 lowercase hex chars"
        )));
    }
    Ok(())
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `N` bytes from the OS RNG, or a clear error.
pub(crate) fn try_os_random<const N: usize>() -> Result<[u8; N], E2eError> {
    let mut buf = [0u8; N];
    SysRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| E2eError::Rng(e.to_string()))?;
    Ok(buf)
}

/// `N` bytes from the OS RNG; panics if it fails, like `fernet` and `rand::rng()` do.
fn os_random<const N: usize>() -> [u8; N] {
    match try_os_random::<N>() {
        Ok(buf) => buf,
        Err(e) => panic!("{e}: no safe randomness is available"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_sealed_chunk_is_exactly_the_longest_token_relays_take() {
        let key = new_file_key();
        let full = seal_chunk(&key, &[7; 16], 3, 9, &vec![1u8; FILE_CHUNK]).unwrap();
        assert_eq!(full.len(), fastchat_common::proto::MAX_CHUNK_TOKEN);
        let short = seal_chunk(&key, &[7; 16], 8, 9, &[1u8; 100]).unwrap();
        assert!(short.len() < full.len());
    }
    use std::sync::OnceLock;

    /// Alice, Bob and Carol, generated once: RSA keygen is the slow part of these tests.
    fn people() -> &'static [Identity; 3] {
        static PEOPLE: OnceLock<[Identity; 3]> = OnceLock::new();
        PEOPLE
            .get_or_init(|| [(); 3].map(|()| Identity::generate().expect("OS RNG works in tests")))
    }

    fn offer_parts(env: &Envelope) -> (String, String, String) {
        match env {
            Envelope::Offer {
                key_id,
                wrapped,
                sig,
                ..
            } => (key_id.clone(), wrapped.clone(), sig.clone()),
            other => panic!("expected an offer, got {other:?}"),
        }
    }

    fn alice_offers_bob() -> (ConversationKey, String, String, String) {
        let [alice, bob, _] = people();
        let key = ConversationKey::generate();
        let env = make_offer(alice, "alice", "bob", bob.peer_key(), &key).unwrap();
        let (key_id, wrapped, sig) = offer_parts(&env);
        (key, key_id, wrapped, sig)
    }

    #[test]
    fn offer_made_by_alice_opens_at_bob() {
        let [alice, bob, _] = people();
        let (key, key_id, wrapped, sig) = alice_offers_bob();
        assert_eq!(key_id, key.id);
        let opened = open_offer(
            bob,
            "alice",
            "bob",
            alice.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        )
        .unwrap();
        assert_eq!(opened, key);
    }

    #[test]
    fn tampered_signature_is_refused() {
        let [alice, bob, _] = people();
        let (_, key_id, wrapped, sig) = alice_offers_bob();
        let mut raw = STANDARD.decode(&sig).unwrap();
        raw[10] ^= 1;
        let bad = STANDARD.encode(raw);
        let r = open_offer(
            bob,
            "alice",
            "bob",
            alice.peer_key(),
            &key_id,
            &wrapped,
            &bad,
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
        let r = open_offer(
            bob,
            "alice",
            "bob",
            alice.peer_key(),
            &key_id,
            &wrapped,
            "%%",
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
    }

    #[test]
    fn tampered_wrapped_key_is_refused_before_decrypting() {
        let [alice, bob, _] = people();
        let (_, key_id, wrapped, sig) = alice_offers_bob();
        // Not even base64: if decryption came first this would be BadPayload or Decrypt.
        let r = open_offer(bob, "alice", "bob", alice.peer_key(), &key_id, "AAAA", &sig);
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
        let other_id = "0123456789abcdef";
        let r = open_offer(
            bob,
            "alice",
            "bob",
            alice.peer_key(),
            other_id,
            &wrapped,
            &sig,
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
    }

    #[test]
    fn wrong_sender_key_is_refused() {
        let [_, bob, carol] = people();
        let (_, key_id, wrapped, sig) = alice_offers_bob();
        let r = open_offer(
            bob,
            "alice",
            "bob",
            carol.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
    }

    #[test]
    fn swapped_from_and_to_are_refused() {
        let [alice, bob, _] = people();
        let (_, key_id, wrapped, sig) = alice_offers_bob();
        let r = open_offer(
            bob,
            "bob",
            "alice",
            alice.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
        let r = open_offer(
            bob,
            "alice",
            "carol",
            alice.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        );
        assert!(matches!(r, Err(E2eError::BadSignature)), "{r:?}");
    }

    #[test]
    fn offer_for_someone_else_does_not_decrypt() {
        let [alice, _, carol] = people();
        let (_, key_id, wrapped, sig) = alice_offers_bob();
        // Carol intercepts Bob's offer: the signature is fine, the decryption is not.
        let r = open_offer(
            carol,
            "alice",
            "bob",
            alice.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        );
        assert!(matches!(r, Err(E2eError::Decrypt)), "{r:?}");
    }

    #[test]
    fn names_with_newlines_are_refused() {
        let [alice, bob, _] = people();
        let key = ConversationKey::generate();
        let r = make_offer(alice, "alice\nbob", "bob", bob.peer_key(), &key);
        assert!(matches!(r, Err(E2eError::BadPayload(_))), "{r:?}");
    }

    #[test]
    fn receipt_round_trip_and_envelope_type() {
        let key = ConversationKey::generate();
        let payload = ReceiptPayload {
            mid: new_message_id(),
            ts: 1_700_000_000_123,
            mids: vec![new_message_id()],
        };
        let env = seal_receipt(&key, &payload).unwrap();
        let body = env.to_body();
        assert!(
            body.starts_with(r#"{"type":"receipt","v":2,"key_id":""#),
            "{body}"
        );
        let Envelope::Receipt { token, .. } = Envelope::from_body(&body).unwrap() else {
            panic!("expected a receipt: {body}");
        };
        assert_eq!(open_receipt(&key, &token).unwrap(), payload);
        let other = ConversationKey::generate();
        assert!(matches!(
            open_receipt(&other, &token),
            Err(E2eError::Decrypt)
        ));
    }

    #[test]
    fn text_round_trip() {
        let key = ConversationKey::generate();
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: new_message_id(),
            ts: 1_700_000_000_123,
            text: "héllo, wörld \u{1F600}".into(),
        };
        let env = seal_text(&key, &payload).unwrap();
        let Envelope::Text { v, key_id, token } = &env else {
            panic!("expected text, got {env:?}");
        };
        assert_eq!((*v, key_id.as_str()), (2, key.id.as_str()));
        assert!(!token.contains("héllo"));
        let parsed = Envelope::from_body(&env.to_body()).unwrap();
        assert_eq!(parsed, env);
        assert_eq!(open_text(&key, token).unwrap(), payload);
    }

    #[test]
    fn the_sealed_context_and_counter_are_checked_and_given_back() {
        let key = ConversationKey::generate();
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: new_message_id(),
            ts: 1_700_000_000_123,
            text: "hi".into(),
        };
        let sealed = |ctx: &Context| match seal_text_in(&key, &payload, ctx).unwrap() {
            Envelope::Text { token, .. } => token,
            other => panic!("{other:?}"),
        };
        let stamp = Stamp {
            sid: "0123456789abcdef".into(),
            n: 7,
        };
        let token = sealed(&Context::direct("alice", "bob").stamped(stamp.clone()));
        let opened = open_text_in(&key, &token, &Context::direct("alice", "bob")).unwrap();
        assert_eq!(opened, (payload.clone(), stamp));
        for wrong in [
            Context::direct("bob", "alice"),
            Context::direct("carol", "bob"),
            Context::group("alice", 7, 1),
        ] {
            assert!(matches!(
                open_text_in(&key, &token, &wrong),
                Err(E2eError::Context(_))
            ));
        }
        let no_sid = Stamp {
            sid: String::new(),
            n: 7,
        };
        for unstamped in [
            sealed(&Context::direct("alice", "bob")),
            sealed(&Context::direct("alice", "bob").stamped(no_sid)),
        ] {
            assert!(matches!(
                open_text_in(&key, &unstamped, &Context::direct("alice", "bob")),
                Err(E2eError::Context(why)) if why.contains("counter")
            ));
        }
    }

    #[test]
    fn wrong_fernet_key_fails() {
        let key = ConversationKey::generate();
        let other = ConversationKey::generate();
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: new_message_id(),
            ts: 1,
            text: "secret".into(),
        };
        let Envelope::Text { token, .. } = seal_text(&key, &payload).unwrap() else {
            panic!("seal_text makes text envelopes");
        };
        assert!(matches!(open_text(&other, &token), Err(E2eError::Decrypt)));
        assert!(matches!(open_text(&key, "garbage"), Err(E2eError::Decrypt)));
        let broken = ConversationKey {
            id: key.id.clone(),
            key: "short".into(),
        };
        assert!(matches!(
            open_text(&broken, &token),
            Err(E2eError::BadKey(_))
        ));
    }

    #[test]
    fn token_from_a_fast_clock_still_opens() {
        let key = ConversationKey::generate();
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: new_message_id(),
            ts: 2,
            text: "from the future".into(),
        };
        let json = serde_json::to_vec(&payload).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = Fernet::new(&key.key)
            .unwrap()
            .encrypt_at_time(&json, now + 3600);
        assert!(Fernet::new(&key.key).unwrap().decrypt(&token).is_err());
        assert_eq!(open_text(&key, &token).unwrap(), payload);
    }

    #[test]
    fn payload_with_bad_message_id_is_refused() {
        let key = ConversationKey::generate();
        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: "not-hex".into(),
            ts: 3,
            text: "x".into(),
        };
        assert!(matches!(
            seal_text(&key, &payload),
            Err(E2eError::BadPayload(_))
        ));
        let token = Fernet::new(&key.key)
            .unwrap()
            .encrypt(br#"{"mid":"XYZ","ts":1,"text":"x"}"#);
        assert!(matches!(
            open_text(&key, &token),
            Err(E2eError::BadPayload(_))
        ));
    }

    #[test]
    fn safety_number_is_symmetric_and_depends_on_both_keys() {
        let [alice, bob, carol] = people();
        let (a, b, c) = (alice.public_pem(), bob.public_pem(), carol.public_pem());
        let ab = safety_number(&a, &b).unwrap();
        assert_eq!(ab, safety_number(&b, &a).unwrap());
        assert_ne!(ab, safety_number(&a, &c).unwrap());
        assert_ne!(ab, safety_number(&c, &b).unwrap());
        let groups: Vec<&str> = ab.split(' ').collect();
        assert_eq!(groups.len(), 12, "{ab}");
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|d| d.is_ascii_digit())));
        // Trailing whitespace or CRLF around a PEM does not change anything.
        let crlf = format!("{}\r\n", b.replace('\n', "\r\n"));
        assert_eq!(ab, safety_number(&a, &crlf).unwrap());
        assert!(matches!(
            safety_number(&a, "not a key"),
            Err(E2eError::BadKey(_))
        ));
    }

    #[test]
    fn pkcs8_der_round_trip() {
        let [alice, bob, _] = people();
        let der = alice.to_pkcs8_der();
        let again = Identity::from_pkcs8_der(&der).unwrap();
        assert_eq!(again.public_pem(), alice.public_pem());
        assert_eq!(again.to_pkcs8_der(), der);
        // The restored key can open what was wrapped for the original.
        let key = ConversationKey::generate();
        let env = make_offer(bob, "bob", "alice", alice.peer_key(), &key).unwrap();
        let (key_id, wrapped, sig) = offer_parts(&env);
        let opened = open_offer(
            &again,
            "bob",
            "alice",
            bob.peer_key(),
            &key_id,
            &wrapped,
            &sig,
        )
        .unwrap();
        assert_eq!(opened, key);
        assert!(matches!(
            Identity::from_pkcs8_der(b"nope"),
            Err(E2eError::BadKey(_))
        ));
    }

    #[test]
    fn public_pem_is_spki() {
        let [alice, _, _] = people();
        let pem = alice.public_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert!(
            pem.trim_end().ends_with("-----END PUBLIC KEY-----"),
            "{pem}"
        );
        let peer = PeerKey::from_pem(&pem).unwrap();
        assert_eq!(&peer, alice.peer_key());
        assert_eq!(peer.pem(), pem);
        assert!(format!("{alice:?}").contains("3072"));
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let small = PrivateKey::new(&mut SysRng, 1024).unwrap();
        let pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        assert!(matches!(PeerKey::from_pem(&pem), Err(E2eError::BadKey(_))));
    }

    #[test]
    fn envelope_json_is_exactly_the_wire_format() {
        let offer = Envelope::Offer {
            v: 2,
            key_id: "00112233445566ff".into(),
            wrapped: "d3JhcHBlZA==".into(),
            sig: "c2ln".into(),
        };
        let json: serde_json::Value = serde_json::from_str(&offer.to_body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v":2,"type":"offer","key_id":"00112233445566ff",
                               "wrapped":"d3JhcHBlZA==","sig":"c2ln"})
        );
        let text = Envelope::Text {
            v: 2,
            key_id: "00112233445566ff".into(),
            token: "gAAAA".into(),
        };
        let json: serde_json::Value = serde_json::from_str(&text.to_body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v":2,"type":"text","key_id":"00112233445566ff","token":"gAAAA"})
        );
        let parsed = Envelope::from_body(
            r#"{"v":2,"type":"offer","key_id":"00112233445566ff","wrapped":"d3JhcHBlZA==","sig":"c2ln"}"#,
        )
        .unwrap();
        assert_eq!(parsed, offer);

        let payload = TextPayload {
            group_key: None,
            file: None,
            mid: "0123456789abcdef0123456789abcdef".into(),
            ts: 5,
            text: "hi".into(),
        };
        assert_eq!(
            serde_json::to_value(&payload).unwrap(),
            serde_json::json!({"mid":"0123456789abcdef0123456789abcdef","ts":5,"text":"hi"})
        );
    }

    #[test]
    fn bad_envelopes_are_refused() {
        for body in [
            "",
            "{}",
            r#"{"v":1,"type":"text","key_id":"00112233445566ff","token":"t"}"#,
            r#"{"v":2,"type":"shout","key_id":"00112233445566ff","token":"t"}"#,
            r#"{"v":2,"type":"text","key_id":"ABC","token":"t"}"#,
            r#"{"v":2,"type":"text","key_id":"00112233445566ff"}"#,
        ] {
            let r = Envelope::from_body(body);
            assert!(matches!(r, Err(E2eError::BadPayload(_))), "{body}: {r:?}");
        }
    }

    #[test]
    fn random_ids_have_the_documented_shape() {
        let key = ConversationKey::generate();
        assert!(is_lower_hex(&key.id, 16), "{}", key.id);
        assert!(Fernet::new(&key.key).is_some());
        assert_eq!(URL_SAFE.decode(&key.key).unwrap().len(), 32);
        let mid = new_message_id();
        assert!(is_lower_hex(&mid, 32), "{mid}");
        assert_ne!(mid, new_message_id());
        assert_ne!(key, ConversationKey::generate());
    }
}
