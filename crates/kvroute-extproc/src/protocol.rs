//! The endpoint-picker protocol's names and the shapes of Envoy messages kvroute sends.
//! Everything that turns a decision into ext_proc protobufs lives here, so the state machine
//! reads as the protocol and not as protobuf plumbing.

use std::collections::HashMap;

use bytes::Bytes;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, TrailersResponse, processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// Request header (and `envoy.lb` metadata key) naming the chosen endpoint(s).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Dynamic-metadata namespace of the destination, and of the served endpoint on responses.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Metadata key, under [`LB_NAMESPACE`], of the endpoint that actually served the request.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// Metadata namespace the data plane uses to restrict the candidates.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key, under [`SUBSET_NAMESPACE`], of the candidate list.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Largest body chunk sent back to Envoy: below the 64 KiB that some data planes accept,
/// the same figure the reference endpoint picker uses.
pub const MAX_CHUNK: usize = 62_000;

/// A header to set, replacing any value the client sent.
pub(crate) fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..HeaderValueOption::default()
    }
}

/// The value of header `name` (lower-case) in an Envoy header map.
pub(crate) fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    let h = headers?.headers.iter().find(|h| h.key == name)?;
    if h.raw_value.is_empty() {
        Some(h.value.as_str())
    } else {
        std::str::from_utf8(&h.raw_value).ok()
    }
}

/// `CommonResponse` that lets the message through unchanged.
pub(crate) fn pass() -> CommonResponse {
    CommonResponse::default()
}

/// The header that names the prefill endpoint to the decode pod's routing sidecar
/// (disaggregated serving), as llm-d's sidecar reads it.
pub const PREFILLER_HEADER: &str = "x-prefiller-host-port";

/// The routing mutation: the destination header (and the prefill endpoint's, when the
/// prompt is computed elsewhere; any such header the client sent is removed otherwise, so a
/// client cannot steer a decode pod's sidecar) plus a route cache clear, so Envoy matches
/// the route again on the new header. The body is handed back unchanged, so its length is
/// left alone (Envoy drops `content-length` itself where a mode streams the body).
pub(crate) fn route_to(destination: &str, prefiller: Option<&str>) -> CommonResponse {
    let mut set_headers = vec![set_header(DESTINATION_HEADER, destination)];
    let mut remove_headers = Vec::new();
    match prefiller {
        Some(p) => set_headers.push(set_header(PREFILLER_HEADER, p)),
        None => remove_headers.push(PREFILLER_HEADER.to_owned()),
    }
    CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers,
            remove_headers,
        }),
        clear_route_cache: true,
        ..CommonResponse::default()
    }
}

/// [`route_to`], also stating the body's length, as upstream's picker does when it hands a
/// body back whole: the model server then reads a `Content-Length` body rather than a
/// chunked one (where Envoy keeps it).
pub(crate) fn route_with_length(
    destination: &str,
    prefiller: Option<&str>,
    length: usize,
) -> CommonResponse {
    let mut response = route_to(destination, prefiller);
    if let Some(mutation) = &mut response.header_mutation {
        mutation
            .set_headers
            .push(set_header("content-length", &length.to_string()));
    }
    response
}

/// `dynamic_metadata = {"envoy.lb": {"x-gateway-destination-endpoint": destination}}`.
pub(crate) fn destination_metadata(destination: &str) -> Struct {
    let inner = Struct {
        fields: HashMap::from([(DESTINATION_HEADER.to_owned(), string_value(destination))]),
    };
    Struct {
        fields: HashMap::from([(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Strings found at `namespace.key` of a request's metadata: a list of strings, or one string
/// holding a comma-separated list. `None` when the key is absent.
pub(crate) fn metadata_strings(
    metadata: &HashMap<String, Struct>,
    namespace: &str,
    key: &str,
) -> Option<Vec<String>> {
    let value = metadata.get(namespace)?.fields.get(key)?;
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    match value.kind.as_ref()? {
        Kind::StringValue(s) => Some(split(s)),
        Kind::ListValue(list) => Some(
            list.values
                .iter()
                .filter_map(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(split(s)),
                    _ => None,
                })
                .flatten()
                .collect(),
        ),
        _ => Some(Vec::new()),
    }
}

pub(crate) fn headers_response(
    common: CommonResponse,
    metadata: Option<Struct>,
    mode_override: Option<ProcessingMode>,
) -> ProcessingResponse {
    ProcessingResponse {
        dynamic_metadata: metadata,
        mode_override,
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(common),
            },
        )),
        ..ProcessingResponse::default()
    }
}

pub(crate) fn request_body_response(
    common: CommonResponse,
    metadata: Option<Struct>,
) -> ProcessingResponse {
    ProcessingResponse {
        dynamic_metadata: metadata,
        response: Some(processing_response::Response::RequestBody(BodyResponse {
            response: Some(common),
        })),
        ..ProcessingResponse::default()
    }
}

/// The answer to the response headers: pass, setting `set` (none for most requests).
pub(crate) fn response_headers_response(set: &[(&'static str, String)]) -> ProcessingResponse {
    let mut common = pass();
    if !set.is_empty() {
        common.header_mutation = Some(HeaderMutation {
            set_headers: set.iter().map(|(k, v)| set_header(k, v)).collect(),
            remove_headers: Vec::new(),
        });
    }
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(
            HeadersResponse {
                response: Some(common),
            },
        )),
        ..ProcessingResponse::default()
    }
}

pub(crate) fn response_body_response(common: CommonResponse) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseBody(BodyResponse {
            response: Some(common),
        })),
        ..ProcessingResponse::default()
    }
}

pub(crate) fn trailers_response(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request {
            processing_response::Response::RequestTrailers(t)
        } else {
            processing_response::Response::ResponseTrailers(t)
        }),
        ..ProcessingResponse::default()
    }
}

/// `body` in pieces of at most [`MAX_CHUNK`] bytes: slices, never copies. An empty body is
/// one empty piece.
pub(crate) fn pieces(mut body: Bytes) -> impl Iterator<Item = Bytes> {
    let mut last = false;
    std::iter::from_fn(move || {
        if last {
            return None;
        }
        if body.len() > MAX_CHUNK {
            return Some(body.split_to(MAX_CHUNK));
        }
        last = true;
        Some(std::mem::take(&mut body))
    })
}

/// Why kvroute answered a request itself: the HTTP status and upstream's error code name
/// (`pkg/common/error/error.go` in llm-d-router), which clients and dashboards built on the
/// upstream picker match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReply {
    /// 400: the body is not a valid inference request.
    BadRequest,
    /// 413: the body is over `--max-body-bytes` (upstream has no such limit of its own).
    TooLarge,
    /// 503 with `x-llm-d-request-dropped-reason: rejected-no-endpoints`: no endpoint to
    /// route to.
    NoEndpoints,
    /// 503: kvroute's own decision queue is full.
    Overloaded,
    /// 429 with `x-llm-d-request-dropped-reason: rejected-saturated`: admission shed the
    /// request (sheddable while the pool is saturated, or its flow-control band full).
    Saturated,
    /// 429 with `x-llm-d-request-dropped-reason: rejected-ttl-expired`: it waited in the
    /// flow-control queue for its whole TTL.
    TtlExpired,
}

/// Upstream's header naming why a request was dropped.
pub const DROPPED_REASON_HEADER: &str = "x-llm-d-request-dropped-reason";

impl LocalReply {
    fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::TooLarge => 413,
            Self::NoEndpoints | Self::Overloaded => 503,
            Self::Saturated | Self::TtlExpired => 429,
        }
    }

    /// Upstream's `x-llm-d-request-dropped-reason` value, for the drops it names.
    fn dropped_reason(self) -> Option<&'static str> {
        match self {
            Self::NoEndpoints => Some("rejected-no-endpoints"),
            Self::Saturated => Some("rejected-saturated"),
            Self::TtlExpired => Some("rejected-ttl-expired"),
            Self::BadRequest | Self::TooLarge | Self::Overloaded => None,
        }
    }

    /// Upstream's code name (kvroute's own for 413, which upstream never sends).
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequest",
            Self::TooLarge => "RequestEntityTooLarge",
            Self::NoEndpoints | Self::Overloaded => "ServiceUnavailable",
            Self::Saturated | Self::TtlExpired => "ResourceExhausted",
        }
    }
}

/// A local reply in place of the upstream one, as upstream's picker words it: the body
/// `inference error: <Code> - <message>` in plain text, and for the drops upstream names
/// (no endpoints, saturated, queue TTL) the dropped-reason header.
pub(crate) fn immediate(reply: LocalReply, message: &str) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", "text/plain; charset=utf-8")];
    if let Some(reason) = reply.dropped_reason() {
        set_headers.push(set_header(DROPPED_REASON_HEADER, reason));
    }
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(reply.status()),
                }),
                headers: Some(HeaderMutation {
                    set_headers,
                    remove_headers: Vec::new(),
                }),
                body: format!("inference error: {} - {message}", reply.code()).into_bytes(),
                grpc_status: None,
                details: format!("kvroute_{}", reply.code()),
            },
        )),
        ..ProcessingResponse::default()
    }
}

/// An override of the request body mode (to BUFFERED, so a STREAMED-mode filter still lets
/// kvroute read the whole body before Envoy picks the upstream; to NONE, when no configured
/// plugin reads it). An override replaces every mode: the response body mode is restated as
/// configured, and both trailer modes as SEND, since DEFAULT would mean SKIP for trailers
/// (kvroute answers trailers in every phase); header modes stay DEFAULT, which is SEND.
pub(crate) fn request_body_mode(
    request_body_mode: BodySendMode,
    response_body_mode: BodySendMode,
) -> ProcessingMode {
    ProcessingMode {
        request_body_mode: request_body_mode as i32,
        response_body_mode: response_body_mode as i32,
        request_trailer_mode: HeaderSendMode::Send as i32,
        response_trailer_mode: HeaderSendMode::Send as i32,
        ..ProcessingMode::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_a_large_body_into_slices() {
        let big = Bytes::from(vec![2; MAX_CHUNK * 2 + 1]);
        let out: Vec<Bytes> = pieces(big.clone()).collect();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [MAX_CHUNK, MAX_CHUNK, 1]);
        assert_eq!(
            out[1].as_ptr(),
            big[MAX_CHUNK..].as_ptr(),
            "pieces are slices"
        );
        let small: Vec<Bytes> = pieces(Bytes::from(vec![1; 10])).collect();
        assert_eq!(small.iter().map(Bytes::len).collect::<Vec<_>>(), [10]);
        assert_eq!(pieces(Bytes::new()).collect::<Vec<_>>(), vec![Bytes::new()]);
    }

    #[test]
    fn drops_carry_upstreams_status_code_and_reason() {
        for (reply, status, reason) in [
            (LocalReply::Saturated, 429, Some("rejected-saturated")),
            (LocalReply::TtlExpired, 429, Some("rejected-ttl-expired")),
            (LocalReply::NoEndpoints, 503, Some("rejected-no-endpoints")),
            (LocalReply::Overloaded, 503, None),
            (LocalReply::BadRequest, 400, None),
        ] {
            let Some(processing_response::Response::ImmediateResponse(r)) =
                immediate(reply, "m").response
            else {
                panic!("{reply:?} is not an immediate response");
            };
            assert_eq!(r.status.unwrap().code, status);
            let found = r
                .headers
                .unwrap()
                .set_headers
                .into_iter()
                .filter_map(|h| h.header)
                .find(|h| h.key == DROPPED_REASON_HEADER)
                .map(|h| String::from_utf8(h.raw_value).unwrap());
            assert_eq!(found.as_deref(), reason, "{reply:?}");
            let body = String::from_utf8(r.body).unwrap();
            assert_eq!(body, format!("inference error: {} - m", reply.code()));
        }
    }

    #[test]
    fn metadata_strings_accepts_list_or_comma_string() {
        let list = Value {
            kind: Some(Kind::ListValue(
                envoy_types::pb::google::protobuf::ListValue {
                    values: vec![string_value("10.0.0.1:8000"), string_value("10.0.0.2:8000")],
                },
            )),
        };
        let mut md = HashMap::from([(
            SUBSET_NAMESPACE.to_owned(),
            Struct {
                fields: HashMap::from([(SUBSET_KEY.to_owned(), list)]),
            },
        )]);
        assert_eq!(
            metadata_strings(&md, SUBSET_NAMESPACE, SUBSET_KEY).unwrap(),
            vec!["10.0.0.1:8000", "10.0.0.2:8000"]
        );
        md.get_mut(SUBSET_NAMESPACE)
            .unwrap()
            .fields
            .insert(SUBSET_KEY.to_owned(), string_value("a:1, b:2"));
        assert_eq!(
            metadata_strings(&md, SUBSET_NAMESPACE, SUBSET_KEY).unwrap(),
            vec!["a:1", "b:2"]
        );
        assert!(metadata_strings(&md, SUBSET_NAMESPACE, "other").is_none());
    }
}
