//! Frames: the unit of the decrypted byte stream of every link.
//!
//! A frame is a `u32` big-endian length followed by that many bytes of a UTF-8 JSON
//! object tagged by `"t"`. Frames are independent of Noise message boundaries: one Noise
//! message may hold many frames and one frame may span several Noise messages.

use serde::Serialize;

/// Default maximum frame length (64 KiB), configurable per server.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Buffer capacity kept on an idle link; more is released once consumed.
pub const IDLE_CAPACITY: usize = 16 * 1024;

/// Why a byte stream could not be turned into frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix names more bytes than the link allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
}

/// Appends `value` as one frame to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Serialising our own protocol types into a Vec cannot fail: they hold only strings,
    // numbers, vectors and maps with string keys.
    serde_json::to_writer(&mut *out, value).expect("protocol types always serialise");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends raw JSON bytes as one frame (tests and tools that craft frames by hand).
pub fn encode_raw_into(json: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
}

/// Incremental frame decoder over a growing buffer of plaintext.
///
/// Bytes are appended with [`FrameBuffer::extend`]; [`FrameBuffer::next_frame`] yields a
/// complete frame's JSON bytes, `Ok(None)` while the next frame is still incomplete.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
    /// Bytes of a refused (too long) frame still to drop as they arrive: the stream
    /// stays in step, so a reader that can carry on after one bad frame may.
    skipping: usize,
}

impl FrameBuffer {
    /// A decoder refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameBuffer {
            buf: Vec::new(),
            start: 0,
            max_frame,
            skipping: 0,
        }
    }

    /// Appends decrypted bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Appends up to `max` bytes that `fill` writes into the buffer's tail and reports
    /// the length of (decryption in place, without a scratch buffer).
    pub fn extend_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + max, 0);
        match fill(&mut self.buf[old..]) {
            Ok(n) => {
                self.buf.truncate(old + n.min(max));
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(old);
                Err(e)
            }
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame's JSON bytes, if there is one. A frame over the limit is
    /// refused once (`TooLong`) and then dropped as its bytes arrive; the frames after it
    /// come as usual (servers close the connection instead; a client may go on).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if self.skipping > 0 {
            let drop = self.skipping.min(self.buf.len() - self.start);
            self.start += drop;
            self.skipping -= drop;
            if self.skipping > 0 {
                self.compact();
                return Ok(None);
            }
        }
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.max_frame {
            self.skipping = len.saturating_add(4);
            return Err(FrameError::TooLong {
                len,
                max: self.max_frame,
            });
        }
        if avail.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let begin = self.start + 4;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// Moves the unread tail to the front once enough has been consumed, so the buffer
    /// does not grow without bound on a long-lived link.
    fn compact(&mut self) {
        if self.start == self.buf.len() && self.buf.capacity() > IDLE_CAPACITY {
            // Everything consumed after a burst: give the memory back.
            self.buf = Vec::new();
            self.start = 0;
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames_of(stream: &[u8], chunk: usize, max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut fb = FrameBuffer::new(max);
        let mut out = Vec::new();
        for piece in stream.chunks(chunk.max(1)) {
            fb.extend(piece);
            while let Some(f) = fb.next_frame()? {
                out.push(f.to_vec());
            }
        }
        Ok(out)
    }

    #[test]
    fn encodes_length_prefix() {
        let mut out = Vec::new();
        encode_into(&serde_json::json!({"t": "ping"}), &mut out);
        assert_eq!(&out[..4], &(out.len() as u32 - 4).to_be_bytes());
        assert_eq!(&out[4..], br#"{"t":"ping"}"#);
    }

    #[test]
    fn refuses_long_frames_before_buffering_them() {
        let mut fb = FrameBuffer::new(10);
        fb.extend(&100u32.to_be_bytes());
        assert_eq!(
            fb.next_frame(),
            Err(FrameError::TooLong { len: 100, max: 10 })
        );
    }

    #[test]
    fn after_a_refused_frame_the_next_ones_still_come() {
        let mut stream = Vec::new();
        encode_raw_into(b"first", &mut stream);
        encode_raw_into(&[b'x'; 50], &mut stream);
        encode_raw_into(b"after", &mut stream);
        for chunk in [1, 3, 7, 100] {
            let mut fb = FrameBuffer::new(10);
            let (mut frames, mut refused) = (Vec::new(), 0);
            for piece in stream.chunks(chunk) {
                fb.extend(piece);
                loop {
                    match fb.next_frame() {
                        Ok(Some(f)) => frames.push(f.to_vec()),
                        Ok(None) => break,
                        Err(FrameError::TooLong { len: 50, max: 10 }) => refused += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            }
            assert_eq!(
                frames,
                [b"first".to_vec(), b"after".to_vec()],
                "chunk {chunk}"
            );
            assert_eq!(refused, 1);
        }
    }

    proptest! {
        #[test]
        fn any_split_yields_the_same_frames(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            chunk in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for p in &payloads {
                encode_raw_into(p, &mut stream);
            }
            prop_assert_eq!(frames_of(&stream, chunk, 300).unwrap(), payloads);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..50) {
            // Any outcome is fine as long as it is a value, not a panic or a hang.
            let _ = frames_of(&bytes, chunk, 1024);
        }
    }
}
