//! The ext_proc messages as they cross the wire, with body chunks as [`Bytes`]. A chunk
//! Envoy sends is sliced out of the gRPC frame buffer, not copied into a fresh vector, and
//! full-duplex mode hands slices back: a chunk is copied once on the way in (frames into one
//! message) and once on the way out (into the encode buffer).
//! envoy-types' generated messages hold bodies in `Vec<u8>`, so the body-carrying messages
//! are declared here, field for field with `envoy/service/ext_proc/v3/external_processor.proto`,
//! and everything else is envoy-types' own.

use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
    processing_request,
};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A message from Envoy (`ProcessingRequest`), with the fields kvroute reads; the others
/// (attributes, observability mode, flow-control windows) are skipped while decoding.
#[derive(Clone, PartialEq, Message)]
pub struct Inbound {
    /// What the message carries.
    #[prost(oneof = "InboundKind", tags = "2, 3, 4, 5, 6, 7")]
    pub request: Option<InboundKind>,
    /// Metadata Envoy forwards (the data plane's subset hint, the served endpoint).
    #[prost(message, optional, tag = "8")]
    pub metadata_context: Option<Metadata>,
    /// The filter's processing modes, on the first message of a stream (Envoy 1.34+).
    #[prost(message, optional, tag = "11")]
    pub protocol_config: Option<ProtocolConfiguration>,
}

/// The `request` oneof of a `ProcessingRequest`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum InboundKind {
    /// The request's headers.
    #[prost(message, tag = "2")]
    RequestHeaders(HttpHeaders),
    /// The response's headers.
    #[prost(message, tag = "3")]
    ResponseHeaders(HttpHeaders),
    /// A piece (or, buffered, all) of the request body.
    #[prost(message, tag = "4")]
    RequestBody(Body),
    /// A piece of the response body.
    #[prost(message, tag = "5")]
    ResponseBody(Body),
    /// The request's trailers.
    #[prost(message, tag = "6")]
    RequestTrailers(HttpTrailers),
    /// The response's trailers.
    #[prost(message, tag = "7")]
    ResponseTrailers(HttpTrailers),
}

/// `HttpBody`: a body chunk.
#[derive(Clone, PartialEq, Message)]
pub struct Body {
    /// The bytes, a slice of the frame they arrived in.
    #[prost(bytes = "bytes", tag = "1")]
    pub body: Bytes,
    /// Whether this is the last chunk.
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

impl From<ProcessingRequest> for Inbound {
    /// envoy-types' message as kvroute reads it (the body vectors become `Bytes` without a
    /// copy); for tests and benches that build messages with envoy-types.
    fn from(m: ProcessingRequest) -> Self {
        use processing_request::Request as R;
        let body = |b: envoy_types::pb::envoy::service::ext_proc::v3::HttpBody| Body {
            body: Bytes::from(b.body),
            end_of_stream: b.end_of_stream,
        };
        Self {
            request: m.request.map(|r| match r {
                R::RequestHeaders(h) => InboundKind::RequestHeaders(h),
                R::ResponseHeaders(h) => InboundKind::ResponseHeaders(h),
                R::RequestBody(b) => InboundKind::RequestBody(body(b)),
                R::ResponseBody(b) => InboundKind::ResponseBody(body(b)),
                R::RequestTrailers(t) => InboundKind::RequestTrailers(t),
                R::ResponseTrailers(t) => InboundKind::ResponseTrailers(t),
            }),
            metadata_context: m.metadata_context,
            protocol_config: m.protocol_config,
        }
    }
}

/// A message to Envoy.
// Answers wait briefly in a per-stream queue; boxing the large variant would cost an
// allocation per answer to save a few hundred bytes of queue.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Outbound {
    /// Any answer, built with envoy-types.
    Message(ProcessingResponse),
    /// A body chunk handed back in full-duplex streamed mode: a `ProcessingResponse` whose
    /// `request_body` (or `response_body`) carries a `CommonResponse` with a
    /// `streamed_response` body mutation, encoded straight from the slice.
    Chunk {
        /// The request body (else the response body).
        request: bool,
        /// The bytes.
        body: Bytes,
        /// Whether this is the last chunk.
        end_of_stream: bool,
    },
}

/// An answer did not fit in the buffer given to encode it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an ext_proc answer of {required} bytes does not fit in the {remaining} left")]
pub struct EncodeError {
    /// Bytes the answer needs.
    pub required: usize,
    /// Bytes the buffer had left.
    pub remaining: usize,
}

/// `ProcessingResponse.request_body` / `.response_body`.
const REQUEST_BODY: u32 = 3;
const RESPONSE_BODY: u32 = 4;
/// `BodyResponse.response`, `CommonResponse.body_mutation`,
/// `BodyMutation.streamed_response`, `StreamedBodyResponse.body` / `.end_of_stream`.
const BODY_RESPONSE_RESPONSE: u32 = 1;
const COMMON_BODY_MUTATION: u32 = 3;
const MUTATION_STREAMED: u32 = 3;
const STREAMED_BODY: u32 = 1;
const STREAMED_END: u32 = 2;

/// Length of a length-delimited field `tag` holding `len` bytes.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn delimited_header(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

impl Outbound {
    /// Writes the message's protobuf encoding to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        match self {
            Self::Message(m) => m.encode(buf).map_err(|e| EncodeError {
                required: e.required_capacity(),
                remaining: e.remaining(),
            }),
            Self::Chunk {
                request,
                body,
                end_of_stream,
            } => {
                // Innermost first: each level is its fields' length behind a key.
                let streamed = if body.is_empty() {
                    0
                } else {
                    delimited_len(STREAMED_BODY, body.len())
                } + if *end_of_stream {
                    key_len(STREAMED_END) + 1
                } else {
                    0
                };
                let mutation = delimited_len(MUTATION_STREAMED, streamed);
                let common = delimited_len(COMMON_BODY_MUTATION, mutation);
                let response = delimited_len(BODY_RESPONSE_RESPONSE, common);
                let tag = if *request {
                    REQUEST_BODY
                } else {
                    RESPONSE_BODY
                };
                let total = delimited_len(tag, response);
                if buf.remaining_mut() < total {
                    return Err(EncodeError {
                        required: total,
                        remaining: buf.remaining_mut(),
                    });
                }
                delimited_header(tag, response, buf);
                delimited_header(BODY_RESPONSE_RESPONSE, common, buf);
                delimited_header(COMMON_BODY_MUTATION, mutation, buf);
                delimited_header(MUTATION_STREAMED, streamed, buf);
                if !body.is_empty() {
                    delimited_header(STREAMED_BODY, body.len(), buf);
                    buf.put_slice(body);
                }
                if *end_of_stream {
                    encode_key(STREAMED_END, WireType::Varint, buf);
                    encode_varint(1, buf);
                }
                Ok(())
            }
        }
    }

    /// The same message as envoy-types builds it (the chunk copied into a vector); for tests
    /// and benches that inspect answers with envoy-types.
    pub fn into_message(self) -> ProcessingResponse {
        match self {
            Self::Message(m) => m,
            Self::Chunk {
                request,
                body,
                end_of_stream,
            } => {
                let mut buf = Vec::new();
                Self::Chunk {
                    request,
                    body,
                    end_of_stream,
                }
                .encode(&mut buf)
                .unwrap_or_else(|_| unreachable!("a Vec grows as needed"));
                ProcessingResponse::decode(buf.as_slice())
                    .unwrap_or_else(|e| unreachable!("kvroute's own encoding decodes: {e}"))
            }
        }
    }
}

impl From<ProcessingResponse> for Outbound {
    fn from(m: ProcessingResponse) -> Self {
        Self::Message(m)
    }
}

/// The gRPC codec of kvroute's ext_proc service: [`Inbound`] in, [`Outbound`] out.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtProcCodec;

/// Encodes [`Outbound`] messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutboundEncoder;

/// Decodes [`Inbound`] messages, slicing body chunks out of the frame buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct InboundDecoder;

impl Codec for ExtProcCodec {
    type Encode = Outbound;
    type Decode = Inbound;
    type Encoder = OutboundEncoder;
    type Decoder = InboundDecoder;

    fn encoder(&mut self) -> OutboundEncoder {
        OutboundEncoder
    }

    fn decoder(&mut self) -> InboundDecoder {
        InboundDecoder
    }
}

impl Encoder for OutboundEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding an ext_proc answer: {e}")))
    }
}

impl Decoder for InboundDecoder {
    type Item = Inbound;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        Inbound::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed ext_proc message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::ext_proc::v3::{
        BodyMutation, CommonResponse, HttpBody, StreamedBodyResponse, body_mutation,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::protocol;

    /// A body chunk handed back in full-duplex mode, as envoy-types builds it.
    fn streamed_chunk(body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
        CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..StreamedBodyResponse::default()
                    },
                )),
            }),
            ..CommonResponse::default()
        }
    }

    proptest! {
        /// A chunk encoded by hand reads back, with envoy-types, as the message kvroute
        /// would build with envoy-types.
        #[test]
        fn a_chunk_encodes_as_envoy_types_would(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            end_of_stream: bool,
            request: bool,
        ) {
            let chunk = Outbound::Chunk { request, body: Bytes::from(body.clone()), end_of_stream };
            let mut ours = Vec::new();
            chunk.encode(&mut ours).unwrap();
            let common = streamed_chunk(body, end_of_stream);
            let expected = if request {
                protocol::request_body_response(common, None)
            } else {
                protocol::response_body_response(common)
            };
            prop_assert_eq!(ProcessingResponse::decode(ours.as_slice()).unwrap(), expected.clone());
            prop_assert_eq!(ours, expected.encode_to_vec());
        }

        /// Whatever envoy-types encodes, kvroute's message reads the same.
        #[test]
        fn inbound_reads_what_envoy_types_writes(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            end_of_stream: bool,
            response: bool,
        ) {
            let http = HttpBody { body, end_of_stream, ..HttpBody::default() };
            let m = ProcessingRequest {
                request: Some(if response {
                    processing_request::Request::ResponseBody(http)
                } else {
                    processing_request::Request::RequestBody(http)
                }),
                observability_mode: true,
                ..ProcessingRequest::default()
            };
            let decoded = Inbound::decode(Bytes::from(m.encode_to_vec())).unwrap();
            prop_assert_eq!(decoded, Inbound::from(m));
        }
    }

    #[test]
    fn a_body_is_sliced_from_the_frame_not_copied() {
        let m = ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: vec![7; 100_000],
                end_of_stream: true,
                ..HttpBody::default()
            })),
            ..ProcessingRequest::default()
        };
        let frame = Bytes::from(m.encode_to_vec());
        let range = frame.as_ptr_range();
        let Some(InboundKind::RequestBody(b)) = Inbound::decode(frame.clone()).unwrap().request
        else {
            panic!("a request body")
        };
        assert!(
            range.contains(&b.body.as_ptr()),
            "the body points into the frame"
        );
        assert_eq!(b.body.len(), 100_000);
    }
}
