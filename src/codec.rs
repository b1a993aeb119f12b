//! The gRPC message codec of every generated client and server: prost, as
//! `tonic_prost::ProstCodec`, with two changes to what each message costs.
//!
//! - **Encoding** writes the message into a `Vec` sized by `encoded_len` and
//!   copies it into tonic's buffer once. prost writes a varint a byte at a
//!   time, and each byte put into tonic's `BytesMut`-backed buffer is a
//!   bounds check and a `memcpy` call of its own: some 70 of them for a
//!   FindMissingBlobsResponse of ten digests.
//! - **Decoding** of a message of at most [`SLICE_DECODE_MAX`] bytes reads a
//!   plain byte slice, where every varint byte read from tonic's buffer is an
//!   `advance` of a `BytesMut`. Larger messages (blob data, ByteStream
//!   chunks) are decoded from tonic's buffer as before, so their `bytes`
//!   fields stay zero-copy slices of the received frame.
//!
//! Decoding errors map to INTERNAL, as tonic's own codec does. Every
//! integration test goes through this codec: small and large messages,
//! unary and streaming, client and server.

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Messages up to this size are decoded from a byte slice (their `bytes`
/// fields are copied, which at this size costs less than the buffer's
/// per-byte bookkeeping); larger ones from tonic's buffer.
pub const SLICE_DECODE_MAX: usize = 4096;

/// The codec named by the generated code (`build.rs`, `codec_path`).
#[derive(Debug)]
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

/// Encodes a `T` (see the module docs).
#[derive(Debug)]
pub struct ProstEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let mut bytes = Vec::with_capacity(item.encoded_len());
        item.encode_raw(&mut bytes);
        buf.put_slice(&bytes);
        Ok(())
    }
}

/// Decodes a `U` (see the module docs).
#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let decoded = if len <= SLICE_DECODE_MAX && buf.chunk().len() >= len {
            let item = U::decode(&buf.chunk()[..len]);
            buf.advance(len);
            item
        } else {
            U::decode(buf)
        };
        decoded
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}
