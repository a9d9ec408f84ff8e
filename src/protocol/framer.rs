//! The one incremental framer of protocol messages after startup (a tag
//! byte, a 4-byte length, the body), fed whatever chunks a socket read
//! returned: the relay follows the server's messages with it (to know
//! when the session is idle and where a message of pgbastion's own may
//! go), and the query audit frames both directions with it.
//!
//! It never holds a whole stream: only the bodies of the message types a
//! caller asks for, each up to the limit it gives (longer ones are
//! reported with their length alone).

/// One complete message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    /// The body, when its type was asked for and it fit the limit; empty
    /// otherwise.
    pub body: &'a [u8],
    /// The body's length, kept or not.
    pub len: usize,
    /// Its type was asked for but it was longer than the limit.
    pub cut: bool,
}

/// A length no protocol message has (below 4, the length field's own
/// size): the stream is not the protocol it should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a message length below 4: the stream cannot be framed")]
pub struct Unframed;

/// Follows one direction's message boundaries.
#[derive(Debug, Default)]
pub struct Framer {
    header: [u8; 5],
    /// Header bytes of the current message seen so far.
    have: usize,
    /// Inside a body (the header is complete).
    in_body: bool,
    /// Body bytes of the current message still to come.
    remaining: usize,
    /// The current message's body length.
    len: usize,
    /// Its body is being kept (asked for, within the limit).
    keep: bool,
    cut: bool,
    body: Vec<u8>,
    /// A bad length was seen: boundaries are unknown from then on.
    lost: bool,
}

/// Bodies kept below this size keep their buffer for the next message
/// (a ReadyForQuery per transaction costs no allocation); larger ones
/// give it back.
const REUSE_BELOW: usize = 1024;

impl Framer {
    /// Feeds the next bytes of the stream; calls `done` for each message
    /// they complete. `wanted(tag)`: the largest body of that type to keep
    /// (None: not kept). After `Unframed`, every later call fails too.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        wanted: impl Fn(u8) -> Option<usize>,
        mut done: impl FnMut(Frame<'_>),
    ) -> Result<(), Unframed> {
        if self.lost {
            return Err(Unframed);
        }
        while !data.is_empty() {
            if !self.in_body {
                let n = (5 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have < 5 {
                    return Ok(());
                }
                self.start_body(&wanted)?;
            }
            let n = self.remaining.min(data.len());
            if self.keep {
                self.body.extend_from_slice(&data[..n]);
            }
            self.remaining -= n;
            data = &data[n..];
            if self.remaining == 0 {
                self.finish(&mut done);
            }
        }
        Ok(())
    }

    /// The header is complete: reads its length and decides whether the
    /// body is kept.
    fn start_body(&mut self, wanted: &impl Fn(u8) -> Option<usize>) -> Result<(), Unframed> {
        let [tag, a, b, c, d] = self.header;
        let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
        let Some(body_len) = len.checked_sub(4) else {
            self.lost = true;
            return Err(Unframed);
        };
        self.len = body_len;
        self.remaining = body_len;
        self.in_body = true;
        self.cut = false;
        self.keep = match wanted(tag) {
            Some(limit) if body_len <= limit => true,
            Some(_) => {
                self.cut = true;
                false
            }
            None => false,
        };
        Ok(())
    }

    fn finish(&mut self, done: &mut impl FnMut(Frame<'_>)) {
        done(Frame {
            tag: self.header[0],
            body: &self.body,
            len: self.len,
            cut: self.cut,
        });
        self.in_body = false;
        self.have = 0;
        if self.body.capacity() > REUSE_BELOW {
            self.body = Vec::new();
        } else {
            self.body.clear();
        }
    }

    /// Between two messages: everything fed so far ended a message, so a
    /// message of pgbastion's own may go next. Never, once lost.
    pub fn at_boundary(&self) -> bool {
        !self.lost && !self.in_body && self.have == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        crate::protocol::message::build(tag, body)
    }

    fn frames(f: &mut Framer, data: &[u8], out: &mut Vec<(u8, Vec<u8>, usize, bool)>) {
        f.feed(
            data,
            |t| (t == b'C').then_some(8),
            |m| out.push((m.tag, m.body.to_vec(), m.len, m.cut)),
        )
        .unwrap();
    }

    #[test]
    fn frames_across_every_split() {
        let mut stream = msg(b'D', b"row data");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'C', b"INSERT\0"));
        stream.extend(msg(b'Z', b"I"));
        let want = vec![
            (b'D', vec![], 8, false),
            (b'C', vec![], 9, true),
            (b'C', b"INSERT\0".to_vec(), 7, false),
            (b'Z', vec![], 1, false),
        ];
        for split in 0..stream.len() {
            let (mut f, mut got) = (Framer::default(), Vec::new());
            frames(&mut f, &stream[..split], &mut got);
            assert_eq!(
                f.at_boundary(),
                [0, 13, 27, 39].contains(&split),
                "split at {split}"
            );
            frames(&mut f, &stream[split..], &mut got);
            assert_eq!(got, want, "split at {split}");
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn a_bad_length_loses_the_stream_for_good() {
        let mut f = Framer::default();
        assert_eq!(f.feed(&[b'Z', 0, 0, 0, 3], |_| None, |_| {}), Err(Unframed));
        assert!(!f.at_boundary());
        assert_eq!(f.feed(&msg(b'Z', b"I"), |_| None, |_| {}), Err(Unframed));
    }

    #[test]
    fn an_empty_body_completes_with_its_header() {
        let mut f = Framer::default();
        let mut n = 0;
        f.feed(
            &msg(b'1', b""),
            |_| Some(0),
            |m| {
                assert_eq!((m.tag, m.len, m.cut), (b'1', 0, false));
                n += 1;
            },
        )
        .unwrap();
        assert_eq!(n, 1);
        assert!(f.at_boundary());
    }
}
