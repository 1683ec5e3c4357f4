//! The tonic codec of the generated client and server: prost's, with two changes that make
//! decoding safe against hostile senders. A `ModelInferRequest` is checked by
//! [`crate::wire::check_infer_request`] before prost allocates anything, so what it would
//! take once decoded is bounded by its size; and a message prost cannot decode is the
//! sender's fault, INVALID_ARGUMENT naming the message, not INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

use crate::wire::{WireError, check_infer_request};

/// A check of a message's encoded bytes before it is decoded.
pub trait Prescan {
    /// `Err` refuses the message before it is decoded; most messages are small and fixed
    /// in shape, and take it as it comes.
    fn prescan(_encoded: &[u8]) -> Result<(), Status> {
        Ok(())
    }
}

impl Prescan for crate::inference::ModelInferRequest {
    fn prescan(encoded: &[u8]) -> Result<(), Status> {
        match check_infer_request(encoded) {
            Ok(_) => Ok(()),
            Err(WireError::Malformed(message)) => Err(Status::invalid_argument(message)),
            Err(too_large @ WireError::TooLarge { .. }) => {
                Err(Status::resource_exhausted(too_large.to_string()))
            }
        }
    }
}

/// The codec `tonic-prost-build` generates the service with (`codec_path`).
#[derive(Debug, Clone)]
pub struct CheckedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CheckedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for CheckedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Prescan + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(PhantomData)
    }
}

/// prost's decoder behind [`Prescan`].
#[derive(Debug, Clone)]
pub struct CheckedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Prescan> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf;
        // tonic hands the decoder one whole message in one contiguous buffer; were it
        // ever in pieces, they are joined first, never decoded unchecked.
        let decoded = if buf.chunk().len() == buf.remaining() {
            U::prescan(buf.chunk())?;
            U::decode(buf)
        } else {
            let whole = buf.copy_to_bytes(buf.remaining());
            U::prescan(&whole)?;
            U::decode(whole)
        };
        decoded.map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "cannot decode {}: {e}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("the message")
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
