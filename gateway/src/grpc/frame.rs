//! gRPC message framing (the 5-byte length prefix), for both sides.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Below this size a message goes out as one buffer (one h2 DATA frame, one write);
/// above it the chunks go out as they are, so large tensors are never copied.
const COALESCE_BELOW: usize = 64 * 1024;

/// The gRPC frame for `message` (a list of chunks) as body writes: `(chunk, end_of_stream)`.
pub(crate) fn frame(message: &[Bytes]) -> Vec<(Bytes, bool)> {
    let len: usize = message.iter().map(Bytes::len).sum();
    let mut head = BytesMut::with_capacity(5 + if len < COALESCE_BELOW { len } else { 0 });
    head.put_u8(0);
    head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    if len < COALESCE_BELOW {
        for chunk in message {
            head.extend_from_slice(chunk);
        }
        return vec![(head.freeze(), true)];
    }
    let mut out = Vec::with_capacity(message.len() + 1);
    out.push((head.freeze(), false));
    let last = message.len().saturating_sub(1);
    out.extend(
        message
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i == last)),
    );
    out
}

/// The message inside one gRPC frame.
pub(crate) fn unframe(mut frame: Bytes) -> Result<Bytes, String> {
    if frame.len() < 5 {
        return Err(format!(
            "a gRPC frame needs 5 header bytes, got {}",
            frame.len()
        ));
    }
    let compressed = frame.get_u8();
    let len = frame.get_u32() as usize;
    if compressed != 0 {
        return Err("compressed gRPC messages are not supported; disable compression".to_owned());
    }
    if frame.len() != len {
        return Err(format!(
            "the gRPC frame announces {len} bytes but carries {}",
            frame.len()
        ));
    }
    Ok(frame)
}

/// A body gathered from the chunks it arrives in: one chunk (the usual case) is kept as
/// it is, without a copy; more are joined.
#[derive(Default)]
pub(crate) struct Gather {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Gather {
    pub(crate) fn push(&mut self, chunk: Bytes) {
        match (self.first.take(), self.joined.as_mut()) {
            (_, Some(all)) => all.extend_from_slice(&chunk),
            (None, None) => self.first = Some(chunk),
            (Some(f), None) => {
                let mut all = BytesMut::with_capacity(f.len() + chunk.len());
                all.extend_from_slice(&f);
                all.extend_from_slice(&chunk);
                self.joined = Some(all);
            }
        }
    }

    pub(crate) fn finish(self) -> Bytes {
        self.joined
            .map(BytesMut::freeze)
            .or(self.first)
            .unwrap_or_default()
    }
}
