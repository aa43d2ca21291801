//! Envoy's side of an ext_proc stream: the messages it sends and readers for the answers.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeadersResponse, HttpBody, HttpHeaders, HttpTrailers,
    ImmediateResponse, ProcessingRequest, ProcessingResponse, ProtocolConfiguration, body_mutation,
    processing_request::Request, processing_response::Response,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

/// Modes as Envoy announces them on a stream's first message.
pub fn protocol_config(
    request_body: BodySendMode,
    response_body: BodySendMode,
    body_without_waiting: bool,
) -> ProtocolConfiguration {
    ProtocolConfiguration {
        request_body_mode: request_body as i32,
        response_body_mode: response_body as i32,
        send_body_without_waiting_for_header_response: body_without_waiting,
    }
}

/// The first message of a chat completion's stream in `FULL_DUPLEX_STREAMED` mode both ways
/// (the `deploy/envoy` setup): its headers, a body to follow.
pub fn full_duplex_chat_headers() -> ProcessingRequest {
    with_config(
        request_headers("POST", "/v1/chat/completions", &[], false),
        protocol_config(
            BodySendMode::FullDuplexStreamed,
            BodySendMode::FullDuplexStreamed,
            false,
        ),
    )
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: (*k).to_owned(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    }
}

/// Request headers of a `method` request to `path`, with `extra` headers.
pub fn request_headers(
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    end_of_stream: bool,
) -> ProcessingRequest {
    let mut all = vec![
        (":method", method),
        (":path", path),
        (":authority", "gateway"),
        (":scheme", "http"),
    ];
    all.extend_from_slice(extra);
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(header_map(&all)),
            end_of_stream,
            ..HttpHeaders::default()
        })),
        ..ProcessingRequest::default()
    }
}

/// The same message with `config` attached, as on a stream's first message.
pub fn with_config(mut msg: ProcessingRequest, config: ProtocolConfiguration) -> ProcessingRequest {
    msg.protocol_config = Some(config);
    msg
}

/// The same message with the data plane's subset hint listing `endpoints`.
pub fn with_subset(mut msg: ProcessingRequest, endpoints: &[&str]) -> ProcessingRequest {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: endpoints
                .iter()
                .map(|e| Value {
                    kind: Some(Kind::StringValue((*e).to_owned())),
                })
                .collect(),
        })),
    };
    msg.metadata_context = Some(metadata(
        "envoy.lb.subset_hint",
        "x-gateway-destination-endpoint-subset",
        list,
    ));
    msg
}

/// The same message with `envoy.lb` / `x-gateway-destination-endpoint-served` = `served`.
pub fn with_served(mut msg: ProcessingRequest, served: &str) -> ProcessingRequest {
    msg.metadata_context = Some(metadata(
        "envoy.lb",
        "x-gateway-destination-endpoint-served",
        Value {
            kind: Some(Kind::StringValue(served.to_owned())),
        },
    ));
    msg
}

fn metadata(namespace: &str, key: &str, value: Value) -> Metadata {
    Metadata {
        filter_metadata: HashMap::from([(
            namespace.to_owned(),
            Struct {
                fields: HashMap::from([(key.to_owned(), value)]),
            },
        )]),
        ..Metadata::default()
    }
}

/// A request body chunk.
pub fn request_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestBody(HttpBody {
            body: body.to_vec(),
            end_of_stream,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    }
}

/// Request trailers.
pub fn request_trailers() -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestTrailers(HttpTrailers::default())),
        ..ProcessingRequest::default()
    }
}

/// Response headers with `status` and `content_type`.
pub fn response_headers(status: u16, content_type: &str, end_of_stream: bool) -> ProcessingRequest {
    let status = status.to_string();
    ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(header_map(&[
                (":status", status.as_str()),
                ("content-type", content_type),
            ])),
            end_of_stream,
            ..HttpHeaders::default()
        })),
        ..ProcessingRequest::default()
    }
}

/// A response body chunk.
pub fn response_body(body: &[u8], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::ResponseBody(HttpBody {
            body: body.to_vec(),
            end_of_stream,
            ..HttpBody::default()
        })),
        ..ProcessingRequest::default()
    }
}

/// Which answer a response is, by name.
pub fn kind(r: &ProcessingResponse) -> &'static str {
    match &r.response {
        Some(Response::RequestHeaders(_)) => "request_headers",
        Some(Response::ResponseHeaders(_)) => "response_headers",
        Some(Response::RequestBody(_)) => "request_body",
        Some(Response::ResponseBody(_)) => "response_body",
        Some(Response::RequestTrailers(_)) => "request_trailers",
        Some(Response::ResponseTrailers(_)) => "response_trailers",
        Some(Response::ImmediateResponse(_)) => "immediate",
        Some(Response::StreamedImmediateResponse(_)) => "streamed_immediate",
        None => "none",
    }
}

/// The kinds of a list of answers, in order.
pub fn kinds(rs: &[ProcessingResponse]) -> Vec<&'static str> {
    rs.iter().map(kind).collect()
}

/// The common part of a headers or body answer.
pub fn common(r: &ProcessingResponse) -> Option<&CommonResponse> {
    match &r.response {
        Some(
            Response::RequestHeaders(HeadersResponse { response })
            | Response::ResponseHeaders(HeadersResponse { response }),
        ) => response.as_ref(),
        Some(
            Response::RequestBody(BodyResponse { response })
            | Response::ResponseBody(BodyResponse { response }),
        ) => response.as_ref(),
        _ => None,
    }
}

/// A header the answer sets.
pub fn set_header<'a>(r: &'a ProcessingResponse, name: &str) -> Option<&'a str> {
    common(r)?
        .header_mutation
        .as_ref()?
        .set_headers
        .iter()
        .filter_map(|o| o.header.as_ref())
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(&h.raw_value).ok())
}

/// `envoy.lb` / `x-gateway-destination-endpoint` in the answer's dynamic metadata.
pub fn metadata_destination(r: &ProcessingResponse) -> Option<&str> {
    let ns = r.dynamic_metadata.as_ref()?.fields.get("envoy.lb")?;
    let Some(Kind::StructValue(inner)) = &ns.kind else {
        return None;
    };
    match &inner.fields.get("x-gateway-destination-endpoint")?.kind {
        Some(Kind::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// The streamed body piece an answer carries: `(bytes, end_of_stream)`.
pub fn streamed(r: &ProcessingResponse) -> Option<(&[u8], bool)> {
    match common(r)?.body_mutation.as_ref()?.mutation.as_ref()? {
        body_mutation::Mutation::StreamedResponse(s) => Some((&s.body, s.end_of_stream)),
        _ => None,
    }
}

/// The streamed bytes of all answers, joined, and whether the last one ended the stream.
pub fn streamed_body(rs: &[ProcessingResponse]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    let mut end = false;
    for (bytes, eos) in rs.iter().filter_map(streamed) {
        body.extend_from_slice(bytes);
        end = eos;
    }
    (body, end)
}

/// The local reply, if the answer is one.
pub fn immediate(r: &ProcessingResponse) -> Option<&ImmediateResponse> {
    match &r.response {
        Some(Response::ImmediateResponse(i)) => Some(i),
        _ => None,
    }
}
