//! zstd for `compressed-blobs` ByteStream resources and compressed batch
//! updates: a streaming decoder whose output is bounded by the blob's declared
//! size (a small compressed message cannot make the server allocate more than
//! it agreed to store), and a streaming encoder for compressed reads.

use std::io;

use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Output produced per decoding step.
const OUT_STEP: usize = 256 * 1024;

/// Why compressed data was refused.
#[derive(Debug, thiserror::Error)]
pub enum ZstdError {
    /// The data is not valid zstd (the decoder's error).
    #[error("invalid zstd data: {0}")]
    Invalid(io::Error),
    /// The data decompresses to more than the blob's declared size (given,
    /// in bytes); decoding stops there.
    #[error("zstd data decompresses to more than the declared {0} bytes")]
    TooLong(u64),
    /// The data ends before its last frame does.
    #[error("zstd data ends in the middle of a frame")]
    Truncated,
}

impl From<ZstdError> for tonic::Status {
    fn from(e: ZstdError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// A streaming zstd decoder that refuses to produce more than `limit` bytes.
pub struct BoundedDecoder {
    ctx: Decoder<'static>,
    out: Vec<u8>,
    produced: u64,
    limit: u64,
    /// The last hint from zstd: 0 once a frame is complete.
    hint: usize,
}

impl BoundedDecoder {
    /// A decoder for a blob of `limit` bytes.
    pub fn new(limit: u64) -> Result<BoundedDecoder, ZstdError> {
        Ok(BoundedDecoder {
            ctx: Decoder::new().map_err(ZstdError::Invalid)?,
            out: vec![0; OUT_STEP],
            produced: 0,
            limit,
            hint: 1,
        })
    }

    /// Decodes some of `input[*pos..]`, advancing `pos`; returns the bytes
    /// produced (at most a step's worth). Call until `pos == input.len()` and
    /// the returned slice is shorter than a full step.
    pub fn step(&mut self, input: &[u8], pos: &mut usize) -> Result<&[u8], ZstdError> {
        let mut inb = InBuffer::around(input);
        inb.set_pos(*pos);
        let mut outb = OutBuffer::around(&mut self.out[..]);
        self.hint = self
            .ctx
            .run(&mut inb, &mut outb)
            .map_err(ZstdError::Invalid)?;
        let n = outb.pos();
        *pos = inb.pos();
        self.produced += n as u64;
        if self.produced > self.limit {
            return Err(ZstdError::TooLong(self.limit));
        }
        Ok(&self.out[..n])
    }

    /// Whether a full step of output was produced last time (more may be
    /// pending even with no input left).
    pub fn is_full_step(n: usize) -> bool {
        n == OUT_STEP
    }

    /// Checks the compressed stream ended at a frame boundary.
    pub fn finish(&self) -> Result<(), ZstdError> {
        if self.hint == 0 {
            Ok(())
        } else {
            Err(ZstdError::Truncated)
        }
    }
}

/// Decompresses a whole small buffer (a batch update), refusing output larger
/// than `limit`.
pub fn decompress_bounded(data: &[u8], limit: u64) -> Result<Vec<u8>, ZstdError> {
    let mut dec = BoundedDecoder::new(limit)?;
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let chunk = dec.step(data, &mut pos)?;
        let full = BoundedDecoder::is_full_step(chunk.len());
        out.extend_from_slice(chunk);
        if pos >= data.len() && !full {
            break;
        }
    }
    if !data.is_empty() {
        dec.finish()?;
    }
    Ok(out)
}

/// A streaming zstd encoder for compressed reads.
pub struct StreamEncoder {
    ctx: Encoder<'static>,
    out: Vec<u8>,
}

impl StreamEncoder {
    /// A new encoder (level 1: fast; the point is the wire, not the ratio).
    pub fn new() -> io::Result<StreamEncoder> {
        Ok(StreamEncoder {
            ctx: Encoder::new(1)?,
            out: vec![0; OUT_STEP],
        })
    }

    /// Compresses `input`, returning whatever compressed output is ready.
    pub fn push(&mut self, input: &[u8]) -> io::Result<Vec<u8>> {
        let mut result = Vec::new();
        let mut inb = InBuffer::around(input);
        while inb.pos() < input.len() {
            let mut outb = OutBuffer::around(&mut self.out[..]);
            self.ctx.run(&mut inb, &mut outb)?;
            let n = outb.pos();
            result.extend_from_slice(&self.out[..n]);
        }
        Ok(result)
    }

    /// Ends the frame, returning the remaining output.
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        let mut result = Vec::new();
        loop {
            let mut outb = OutBuffer::around(&mut self.out[..]);
            let left = self.ctx.finish(&mut outb, true)?;
            let n = outb.pos();
            result.extend_from_slice(&self.out[..n]);
            if left == 0 {
                return Ok(result);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_round_trip() {
        let data = vec![7u8; 3 * OUT_STEP + 5];
        let mut enc = StreamEncoder::new().unwrap();
        let mut z = enc.push(&data).unwrap();
        z.extend(enc.finish().unwrap());
        assert_eq!(decompress_bounded(&z, data.len() as u64).unwrap(), data);
        assert!(matches!(
            decompress_bounded(&z, data.len() as u64 - 1),
            Err(ZstdError::TooLong(_))
        ));
        assert!(decompress_bounded(&z[..z.len() / 2], data.len() as u64).is_err());
        assert!(decompress_bounded(b"not zstd", 100).is_err());
    }
}
