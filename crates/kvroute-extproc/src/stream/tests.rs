use std::sync::Arc;

use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::processing_mode::{
    BodySendMode, HeaderSendMode,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use kvroute_endpoints::Registry;
use kvroute_scheduler::{Scheduler, SchedulerHandle};
use prometheus_client::encoding::text::encode;
use proptest::prelude::*;
use test_support::envoy::*;
use test_support::{chat_body, registry, split};

use super::*;

const CHAT: &str = "/v1/chat/completions";
const SSE: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";

struct Harness {
    registry: Arc<Registry>,
    prom: prometheus_client::registry::Registry,
    router: Arc<Router>,
}

impl Harness {
    fn new(ports: &[u16]) -> Self {
        Self::with(ports, ExtProcConfig::default(), 0)
    }

    fn with(ports: &[u16], config: ExtProcConfig, fallbacks: usize) -> Self {
        Self::scheduled(ports, config, body_reading(fallbacks))
    }

    fn scheduled(ports: &[u16], config: ExtProcConfig, scheduler: Scheduler) -> Self {
        let scheduler = Arc::new(SchedulerHandle::new(scheduler));
        let registry = registry(ports);
        let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
        let metrics = Metrics::register(&mut prom);
        let router = Router::new(Arc::clone(&registry), scheduler, config, metrics);
        Self {
            registry,
            prom,
            router,
        }
    }

    fn stream(&self) -> StreamState {
        StreamState::new(Arc::clone(&self.router))
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.prom).unwrap();
        assert!(!out.contains(".."), "one full stop per help text: {out}");
        out
    }

    fn in_flight(&self) -> usize {
        self.registry.snapshot().iter().map(|e| e.in_flight()).sum()
    }
}

/// Fewest requests in flight, with a LoRA-affinity scorer of weight 0 so that bodies are read
/// and parsed (routing stays by load, and no prefix is remembered).
pub(crate) fn body_reading(fallbacks: usize) -> Scheduler {
    let yaml = format!(
        "plugins:
- {{type: load-scorer, parameters: {{headroom: 1}}}}
- {{type: lora-affinity-scorer}}
- {{type: max-score-picker, parameters: {{maxNumOfEndpoints: {}}}}}
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: load-scorer, weight: 1}}
  - {{pluginRef: lora-affinity-scorer, weight: 0}}
  - {{pluginRef: max-score-picker}}
",
        fallbacks + 1
    );
    kvroute_scheduler::EndpointPickerConfig::load(&yaml, &kvroute_scheduler::BuildContext::new(16))
        .unwrap()
}

/// A scheduler whose plugins read no body routes at the request headers, whatever the body
/// mode: the body flows through unparsed (echoed in full-duplex mode), and where Envoy waits
/// for the headers answer it is asked not to send the body at all.
#[test]
fn a_profile_that_reads_no_body_routes_at_the_headers() {
    let h = Harness::scheduled(
        &[8001, 8002],
        ExtProcConfig::default(),
        Scheduler::least_in_flight(0),
    );
    let mut s = h.stream();
    let out = send(&mut s, full_duplex_headers(CHAT));
    assert_eq!(kinds(&out), ["request_headers"]);
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_some());
    assert!(
        out[0].mode_override.is_none(),
        "full duplex takes no override"
    );
    // Not JSON at all: nobody reads it, so it passes.
    let out = send(&mut s, request_body(b"not json", true));
    assert_eq!(streamed_body(&out), (b"not json".to_vec(), true));
    assert_eq!(h.in_flight(), 1);

    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::Buffered, BodySendMode::Streamed, false),
    );
    assert_eq!(kinds(&out), ["request_headers"]);
    let mode = out[0].mode_override.expect("asks Envoy to keep the body");
    assert_eq!(mode.request_body_mode, BodySendMode::None as i32);
    assert_eq!(mode.response_body_mode, BodySendMode::Streamed as i32);
    // DEFAULT would turn trailers off for this request.
    assert_eq!(mode.request_trailer_mode, HeaderSendMode::Send as i32);
    assert_eq!(mode.response_trailer_mode, HeaderSendMode::Send as i32);
    // Were it sent anyway, it is let through.
    let out = send(&mut s, request_body(b"{", true));
    assert_eq!(kinds(&out), ["request_body"]);
    assert_eq!(h.in_flight(), 2);

    // No override where Envoy ignores it (full-duplex response), nor where the response's
    // mode is only assumed (no protocol_config): it would restate the wrong one.
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(
            BodySendMode::Buffered,
            BodySendMode::FullDuplexStreamed,
            false,
        ),
    );
    assert!(out[0].mode_override.is_none());
    let mut s = h.stream();
    let out = send(&mut s, request_headers("POST", CHAT, &[], false));
    assert_eq!(kinds(&out), ["request_headers"]);
    assert!(out[0].mode_override.is_none());
}

fn send(s: &mut StreamState, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
    let mut out = Vec::new();
    s.on_message(msg, &mut out).unwrap();
    messages(out)
}

/// Answers as envoy-types messages, to inspect them.
fn messages(out: Vec<Outbound>) -> Vec<ProcessingResponse> {
    out.into_iter().map(Outbound::into_message).collect()
}

fn first(
    mode: BodySendMode,
    response: BodySendMode,
    without_waiting: bool,
    method: &str,
    path: &str,
    eos: bool,
) -> ProcessingRequest {
    with_config(
        request_headers(method, path, &[("x-request-id", "r1")], eos),
        protocol_config(mode, response, without_waiting),
    )
}

/// A chat request's headers (a body follows) in the given modes.
fn chat_headers(
    request: BodySendMode,
    response: BodySendMode,
    without_waiting: bool,
) -> ProcessingRequest {
    first(request, response, without_waiting, "POST", CHAT, false)
}

fn full_duplex_headers(path: &str) -> ProcessingRequest {
    first(
        BodySendMode::FullDuplexStreamed,
        BodySendMode::FullDuplexStreamed,
        false,
        "POST",
        path,
        false,
    )
}

#[test]
fn full_duplex_defers_headers_until_the_body_is_complete() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = h.stream();
    let body = chat_body(150_000);
    assert!(send(&mut s, full_duplex_headers(CHAT)).is_empty());
    let chunks = split(&body, 3);
    for c in &chunks[..2] {
        assert!(send(&mut s, request_body(c, false)).is_empty());
    }
    let out = send(&mut s, request_body(&chunks[2], true));
    assert_eq!(kinds(&out)[0], "request_headers");
    assert!(kinds(&out)[1..].iter().all(|k| *k == "request_body"));
    assert!(out.len() >= 4, "150 kB is re-cut into ≤62 kB pieces");
    let dest = set_header(&out[0], "x-gateway-destination-endpoint").unwrap();
    assert!(
        dest == "127.0.0.1:8001" || dest == "127.0.0.1:8002",
        "{dest}"
    );
    assert_eq!(
        metadata_destination(&out[0]),
        Some(dest),
        "header and metadata agree"
    );
    assert!(common(&out[0]).unwrap().clear_route_cache);
    assert_eq!(
        set_header(&out[0], "content-length"),
        Some(body.len().to_string().as_str()),
        "the whole body's length, as upstream's picker states it"
    );
    assert_eq!(streamed_body(&out[1..]), (body.clone(), true));
    assert!(
        out[1..]
            .iter()
            .all(|r| streamed(r).unwrap().0.len() <= 62_000)
    );
    assert_eq!(h.in_flight(), 1);
    assert_eq!(s.target().unwrap().address().to_string(), dest);

    // Response: headers pass, SSE chunks echoed back, usage read, slot released.
    let out = send(&mut s, response_headers(200, "text/event-stream", false));
    assert_eq!(kinds(&out), ["response_headers"]);
    let (a, b) = SSE.split_at(40);
    let out = send(&mut s, response_body(a, false));
    assert_eq!(streamed(&out[0]), Some((a, false)));
    let out = send(&mut s, response_body(b, true));
    assert_eq!(streamed(&out[0]), Some((b, true)));
    assert_eq!(h.in_flight(), 0);
    let m = h.metrics();
    assert!(
        m.contains(r#"kvroute_requests_total{outcome="routed"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"kvroute_responses_total{class="2xx"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"kvroute_endpoint_tokens_total{{endpoint="{dest}",kind="completion"}} 4"#
        )),
        "{m}"
    );
    assert!(
        m.contains("kvroute_decision_duration_seconds_count 1"),
        "{m}"
    );
}

#[test]
fn full_duplex_with_trailers_ends_body_at_the_trailers() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    let body = br#"{"model":"m","prompt":"hello"}"#;
    send(&mut s, full_duplex_headers("/v1/completions"));
    assert!(send(&mut s, request_body(body, false)).is_empty());
    let out = send(&mut s, request_trailers());
    assert_eq!(
        kinds(&out),
        ["request_headers", "request_body", "request_trailers"]
    );
    assert_eq!(streamed_body(&out[1..2]), (body.to_vec(), false));
}

#[test]
fn a_second_end_of_stream_is_ignored() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    let body = br#"{"model":"m","prompt":"hello"}"#;
    send(&mut s, full_duplex_headers("/v1/completions"));
    assert_eq!(send(&mut s, request_body(body, true)).len(), 2);
    assert!(send(&mut s, request_body(b"junk", true)).is_empty());
}

#[test]
fn buffered_routes_on_the_body_response() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::Buffered, BodySendMode::None, false),
    );
    assert_eq!(kinds(&out), ["request_headers"]);
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_none());
    let out = send(&mut s, request_body(&chat_body(4096), true));
    assert_eq!(kinds(&out), ["request_body"]);
    assert_eq!(
        set_header(&out[0], "x-gateway-destination-endpoint"),
        Some("127.0.0.1:8001")
    );
    assert_eq!(metadata_destination(&out[0]), Some("127.0.0.1:8001"));
    assert!(streamed(&out[0]).is_none(), "the body is not mutated");
    let out = send(&mut s, response_headers(200, "application/json", false));
    assert_eq!(kinds(&out), ["response_headers"]);
    let out = send(
        &mut s,
        response_body(
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            true,
        ),
    );
    assert_eq!(kinds(&out), ["response_body"]);
    assert!(streamed(&out[0]).is_none());
    assert_eq!(h.in_flight(), 0);
}

#[test]
fn streamed_without_waiting_answers_headers_then_each_chunk() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    assert!(
        send(
            &mut s,
            chat_headers(BodySendMode::Streamed, BodySendMode::Streamed, true)
        )
        .is_empty()
    );
    let body = chat_body(1000);
    let chunks = split(&body, 4);
    for c in &chunks[..3] {
        assert!(send(&mut s, request_body(c, false)).is_empty());
    }
    let out = send(&mut s, request_body(&chunks[3], true));
    assert_eq!(
        kinds(&out),
        [
            "request_headers",
            "request_body",
            "request_body",
            "request_body",
            "request_body"
        ]
    );
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_some());
    assert!(out[1..].iter().all(|r| streamed(r).is_none()));
}

#[test]
fn streamed_waiting_asks_for_buffering_and_routes_on_the_buffered_body() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::Streamed, BodySendMode::None, false),
    );
    assert_eq!(kinds(&out), ["request_headers"]);
    let provisional = set_header(&out[0], "x-gateway-destination-endpoint")
        .unwrap()
        .to_owned();
    let over = out[0].mode_override.unwrap();
    assert_eq!(over.request_body_mode, BodySendMode::Buffered as i32);
    assert_eq!(h.in_flight(), 1);
    let out = send(&mut s, request_body(&chat_body(500), true));
    let dest = set_header(&out[0], "x-gateway-destination-endpoint").unwrap();
    assert_eq!(
        h.in_flight(),
        1,
        "the provisional claim was replaced, not added to"
    );
    assert_eq!(s.target().unwrap().address().to_string(), dest);
    let _ = provisional;
}

#[test]
fn streamed_waiting_keeps_the_provisional_destination_when_chunks_keep_coming() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::Streamed, BodySendMode::None, false),
    );
    let provisional = set_header(&out[0], "x-gateway-destination-endpoint")
        .unwrap()
        .to_owned();
    let out = send(&mut s, request_body(b"{\"model\":", false));
    assert_eq!(kinds(&out), ["request_body"]);
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_none());
    let out = send(&mut s, request_body(b"\"m\"}", true));
    assert_eq!(kinds(&out), ["request_body"]);
    assert_eq!(s.target().unwrap().address().to_string(), provisional);
    assert!(h.metrics().contains(r#"outcome="routed_by_load"} 1"#));
}

#[test]
fn trailers_after_answered_body_messages_get_only_a_trailers_answer() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::BufferedPartial, BodySendMode::None, false),
    );
    assert_eq!(kinds(&out), ["request_headers"]);
    let out = send(&mut s, request_trailers());
    assert_eq!(kinds(&out), ["request_trailers"]);
    assert_eq!(h.in_flight(), 0, "nothing routed, nothing charged");

    let mut s = h.stream();
    send(
        &mut s,
        chat_headers(BodySendMode::Streamed, BodySendMode::None, false),
    );
    let out = send(&mut s, request_trailers());
    assert_eq!(kinds(&out), ["request_trailers"]);
    assert_eq!(h.in_flight(), 1, "the provisional destination stands");
}

#[test]
fn a_truncated_buffered_partial_body_is_routed_by_load_on_its_answer() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    send(
        &mut s,
        chat_headers(BodySendMode::BufferedPartial, BodySendMode::None, false),
    );
    let out = send(
        &mut s,
        request_body(b"{\"model\":\"m\",\"messages\":[", false),
    );
    assert_eq!(kinds(&out), ["request_body"]);
    assert_eq!(
        set_header(&out[0], "x-gateway-destination-endpoint"),
        Some("127.0.0.1:8001")
    );
    assert!(h.metrics().contains(r#"outcome="routed_by_load"} 1"#));
}

#[test]
fn no_endpoint_for_a_provisional_pick_is_a_503() {
    let h = Harness::new(&[]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        chat_headers(BodySendMode::Streamed, BodySendMode::None, false),
    );
    let imm = immediate(&out[0]).unwrap();
    assert_eq!(imm.status.unwrap().code, 503);
    assert_eq!(
        String::from_utf8_lossy(&imm.body),
        "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"
    );
    let reason = imm
        .headers
        .as_ref()
        .unwrap()
        .set_headers
        .iter()
        .find(|h| h.header.as_ref().unwrap().key == crate::protocol::DROPPED_REASON_HEADER);
    assert_eq!(
        reason.unwrap().header.as_ref().unwrap().raw_value,
        b"rejected-no-endpoints"
    );
    assert!(send(&mut s, request_body(b"{}", true)).is_empty());
    assert!(send(&mut s, request_trailers()).is_empty());
}

#[test]
fn without_protocol_config_the_assumed_mode_applies() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    assert!(send(&mut s, request_headers("POST", CHAT, &[], false)).is_empty());
    let out = send(&mut s, request_body(&chat_body(300), true));
    assert_eq!(kinds(&out), ["request_headers", "request_body"]);
    assert!(streamed(&out[1]).is_some(), "full duplex by default");

    let config = ExtProcConfig {
        assumed_body_mode: BodySendMode::Buffered,
        ..ExtProcConfig::default()
    };
    let h = Harness::with(&[8001], config, 0);
    let mut s = h.stream();
    let out = send(&mut s, request_headers("POST", CHAT, &[], false));
    assert_eq!(kinds(&out), ["request_headers"]);
    let out = send(&mut s, request_body(&chat_body(300), true));
    assert_eq!(kinds(&out), ["request_body"]);
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_some());
}

#[test]
fn bodyless_and_non_inference_requests_route_by_load_at_once() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        first(
            BodySendMode::FullDuplexStreamed,
            BodySendMode::FullDuplexStreamed,
            false,
            "GET",
            "/v1/models",
            true,
        ),
    );
    assert_eq!(kinds(&out), ["request_headers"]);
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_some());

    let mut s = h.stream();
    let out = send(&mut s, full_duplex_headers("/v1/embeddings"));
    assert_eq!(kinds(&out), ["request_headers"]);
    let out = send(&mut s, request_body(b"{\"input\":", false));
    assert_eq!(streamed(&out[0]), Some((&b"{\"input\":"[..], false)));
    let out = send(&mut s, request_body(b"\"x\"}", true));
    assert_eq!(streamed(&out[0]), Some((&b"\"x\"}"[..], true)));
    assert!(h.metrics().contains(r#"outcome="routed_by_load"} 2"#));
}

#[test]
fn malformed_bodies_get_a_400_with_a_json_error() {
    for body in [&b"{not json"[..], b"{}", br#"{"model":"m"}"#, b""] {
        let h = Harness::new(&[8001]);
        let mut s = h.stream();
        send(&mut s, full_duplex_headers(CHAT));
        let out = send(&mut s, request_body(body, true));
        assert_eq!(kinds(&out), ["immediate"]);
        let imm = immediate(&out[0]).unwrap();
        assert_eq!(imm.status.unwrap().code, 400);
        let text = String::from_utf8(imm.body.clone()).unwrap();
        assert!(text.starts_with("inference error: BadRequest - "), "{text}");
        assert!(text.len() > 35, "{text}");
        assert_eq!(h.in_flight(), 0);
        assert!(h.metrics().contains(r#"outcome="bad_request"} 1"#));
        assert!(send(&mut s, request_body(b"more", true)).is_empty());
    }
}

#[test]
fn bodies_over_the_limit_get_a_413_before_buffering_the_rest() {
    let config = ExtProcConfig {
        max_body_bytes: 100,
        ..ExtProcConfig::default()
    };
    let h = Harness::with(&[8001], config, 0);
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    assert!(send(&mut s, request_body(&[b' '; 60], false)).is_empty());
    let out = send(&mut s, request_body(&[b' '; 60], false));
    assert_eq!(immediate(&out[0]).unwrap().status.unwrap().code, 413);
    assert!(h.metrics().contains(r#"outcome="body_too_large"} 1"#));
}

#[test]
fn no_endpoint_gets_a_503() {
    let h = Harness::new(&[]);
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    let out = send(&mut s, request_body(&chat_body(300), true));
    assert_eq!(immediate(&out[0]).unwrap().status.unwrap().code, 503);
    let mut s = h.stream();
    let out = send(&mut s, request_headers("GET", "/v1/models", &[], true));
    assert_eq!(immediate(&out[0]).unwrap().status.unwrap().code, 503);
    assert!(h.metrics().contains(r#"outcome="no_endpoint"} 2"#));
}

#[test]
fn the_subset_hint_restricts_candidates() {
    let h = Harness::new(&[8001, 8002, 8003]);
    for _ in 0..6 {
        let mut s = h.stream();
        let out = send(
            &mut s,
            with_subset(
                request_headers("GET", "/v1/models", &[], true),
                &["127.0.0.1:8002"],
            ),
        );
        assert_eq!(
            set_header(&out[0], "x-gateway-destination-endpoint"),
            Some("127.0.0.1:8002")
        );
    }
    let mut s = h.stream();
    let out = send(
        &mut s,
        with_subset(
            request_headers("GET", "/v1/models", &[], true),
            &["127.0.0.1"],
        ),
    );
    assert!(
        set_header(&out[0], "x-gateway-destination-endpoint").is_some(),
        "bare IP matches"
    );
    for subset in [&[][..], &["10.9.9.9:80"][..]] {
        let mut s = h.stream();
        let out = send(
            &mut s,
            with_subset(request_headers("GET", "/v1/models", &[], true), subset),
        );
        assert_eq!(immediate(&out[0]).unwrap().status.unwrap().code, 503);
    }
}

#[test]
fn fallbacks_are_a_comma_list_in_header_and_metadata() {
    let h = Harness::with(&[8001, 8002, 8003], ExtProcConfig::default(), 2);
    let mut s = h.stream();
    let out = send(&mut s, request_headers("GET", "/v1/models", &[], true));
    let dest = set_header(&out[0], "x-gateway-destination-endpoint").unwrap();
    assert_eq!(dest.split(',').count(), 3, "{dest}");
    assert_eq!(metadata_destination(&out[0]), Some(dest));
    assert_eq!(h.in_flight(), 1, "only the primary is charged");
}

#[test]
fn the_served_endpoint_takes_the_in_flight_count() {
    let h = Harness::with(&[8001, 8002], ExtProcConfig::default(), 1);
    let mut s = h.stream();
    let out = send(&mut s, request_headers("GET", "/v1/models", &[], true));
    let dest = set_header(&out[0], "x-gateway-destination-endpoint").unwrap();
    let fallback = dest.split(',').nth(1).unwrap().to_owned();
    send(
        &mut s,
        with_served(response_headers(200, "application/json", false), &fallback),
    );
    assert_eq!(s.target().unwrap().address().to_string(), fallback);
    assert_eq!(h.in_flight(), 1);
}

/// With the response body not sent (response body mode NONE, which spares every streamed
/// chunk a round trip through kvroute), the response headers end the prefill backlog and
/// the stream's end (Envoy keeps it open until the response is over) the request.
#[test]
fn without_response_body_the_headers_end_the_backlog_and_the_stream_the_request() {
    let h = Harness::new(&[8001]);
    let backlog = || h.registry.snapshot()[0].prefill_backlog();
    let mut s = h.stream();
    send(
        &mut s,
        chat_headers(BodySendMode::Buffered, BodySendMode::None, false),
    );
    send(&mut s, request_body(&chat_body(300), true));
    assert!(backlog() > 0);
    let out = send(&mut s, response_headers(200, "text/event-stream", false));
    assert_eq!(kinds(&out), ["response_headers"]);
    assert_eq!((backlog(), h.in_flight()), (0, 1));
    drop(s);
    assert_eq!(h.in_flight(), 0);
}

#[test]
fn the_prefill_backlog_lasts_until_the_first_bytes_of_the_answer() {
    let h = Harness::new(&[8001]);
    let backlog = || h.registry.snapshot()[0].prefill_backlog();
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    send(&mut s, request_body(&chat_body(300), true));
    // Nothing is cached anywhere: the whole prompt, as estimated from its text, is queued.
    let prompt = backlog();
    assert!(prompt > 0, "{prompt}");
    send(&mut s, response_headers(200, "text/event-stream", false));
    send(&mut s, response_body(b"", false));
    assert_eq!(backlog(), prompt, "headers and empty chunks are not tokens");
    send(&mut s, response_body(b"data: {}\n\n", false));
    assert_eq!((backlog(), h.in_flight()), (0, 1));
    send(&mut s, response_body(b"data: [DONE]\n\n", true));
    assert_eq!(h.in_flight(), 0);

    // A request that never answers gives its backlog back when its stream ends.
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    send(&mut s, request_body(&chat_body(300), true));
    assert_eq!(backlog(), prompt);
    drop(s);
    assert_eq!(backlog(), 0);
}

/// Only a streamed answer's first bytes time the endpoint's prefill speed: a whole answer's
/// come once it is generated, and response headers (response body mode NONE) may come
/// before any token.
#[test]
fn only_a_streamed_answers_first_bytes_teach_the_endpoints_speed() {
    let h = Harness::new(&[8001]);
    let speed = || h.registry.snapshot()[0].prefill_us_per_token();
    let streamed = chat_body(4000);
    let whole = String::from_utf8(streamed.clone())
        .unwrap()
        .replace(r#""stream":true"#, r#""stream":false"#);
    assert_ne!(whole.as_bytes(), streamed.as_slice());
    for _ in 0..8 {
        let mut s = h.stream();
        send(&mut s, full_duplex_headers(CHAT));
        send(&mut s, request_body(whole.as_bytes(), true));
        send(&mut s, response_headers(200, "application/json", false));
        send(&mut s, response_body(b"{}", true));
        let mut s = h.stream();
        send(
            &mut s,
            chat_headers(BodySendMode::Buffered, BodySendMode::None, false),
        );
        send(&mut s, request_body(&streamed, true));
        send(&mut s, response_headers(200, "text/event-stream", true));
    }
    assert_eq!(speed(), None, "nothing timed a prefill");
    for _ in 0..4 {
        let mut s = h.stream();
        send(&mut s, full_duplex_headers(CHAT));
        send(&mut s, request_body(&streamed, true));
        send(&mut s, response_headers(200, "text/event-stream", false));
        send(&mut s, response_body(b"data: {}\n\n", true));
    }
    assert!(speed().is_some(), "four streamed answers did");
    assert_eq!(h.registry.snapshot()[0].prefill_backlog(), 0);
}

/// One streamed chat answer with `status` to `body`, reporting `usage_tokens` prompt
/// tokens when given.
fn answer(h: &Harness, body: &[u8], status: u16, usage_tokens: Option<u64>) {
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    send(&mut s, request_body(body, true));
    send(&mut s, response_headers(status, "text/event-stream", false));
    send(&mut s, response_body(b"data: {\"choices\":[]}\n\n", false));
    if let Some(tokens) = usage_tokens {
        let event = format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{tokens},\"completion_tokens\":3}}}}\n\n"
        );
        send(&mut s, response_body(event.as_bytes(), false));
    }
    send(&mut s, response_body(b"data: [DONE]\n\n", true));
}

/// A chat body of about `bytes` bytes of prompt, and its prompt's bytes as the index reads
/// them.
fn chat_prompt(bytes: usize) -> (Vec<u8>, u64) {
    let body = chat_body(bytes);
    let read = InferenceRequest::parse(ApiKind::ChatCompletions, &body, Default::default())
        .unwrap()
        .prompt
        .index_bytes() as u64;
    (body, read)
}

/// The `prompt_tokens` an answer reports, against the prompt's text, teach the endpoint its
/// tokenizer's bytes per token; an answer without usage, or a failed one, teaches nothing.
#[test]
fn the_usage_an_answer_reports_teaches_the_endpoints_bytes_per_token() {
    let h = Harness::new(&[8001]);
    let learnt = || h.registry.snapshot()[0].prompt_bytes_per_token();
    let (body, bytes) = chat_prompt(4000);
    for _ in 0..4 {
        answer(&h, &body, 200, None);
        answer(&h, &body, 500, Some(bytes / 2));
    }
    assert_eq!(learnt(), None);
    for _ in 0..4 {
        answer(&h, &body, 200, Some(bytes / 2));
    }
    let v = learnt().unwrap();
    assert!((1.99..=2.01).contains(&v), "{v}");
}

/// Answers without usage count their prompts' bytes, which the pod's own count of the
/// prompts it finished (`vllm:request_prompt_tokens`, scraped) turns into bytes per token;
/// a failed answer counts nothing.
#[test]
fn answers_without_usage_teach_bytes_per_token_through_the_pods_count() {
    let h = Harness::new(&[8001]);
    let ep = h.registry.snapshot()[0].clone();
    let (body, bytes) = chat_prompt(4000);
    let scrape = |finished: u64| {
        let prompts = kvroute_endpoints::PromptTotals {
            tokens: (finished * bytes / 3) as f64,
            requests: finished as f64,
        };
        let load = kvroute_endpoints::PodLoad {
            prompts: Some(prompts),
            ..Default::default()
        };
        ep.record_scrape(load, std::time::Instant::now());
    };
    scrape(0);
    for finished in 1..=4 {
        answer(&h, &body, 200, None);
        answer(&h, &body, 500, None);
        assert_eq!(ep.prompt_bytes_per_token(), None);
        scrape(finished);
    }
    let v = ep.prompt_bytes_per_token().unwrap();
    assert!((2.99..=3.01).contains(&v), "{v}");
}

#[test]
fn a_stream_dropped_mid_response_releases_its_slot() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    send(&mut s, request_body(&chat_body(300), true));
    send(&mut s, response_headers(200, "text/event-stream", false));
    send(&mut s, response_body(b"data: {}\n\n", false));
    assert_eq!(h.in_flight(), 1);
    drop(s);
    assert_eq!(h.in_flight(), 0);
    assert!(
        h.metrics()
            .contains(r#"kvroute_responses_total{class="2xx"} 1"#),
        "counted by the status it had"
    );

    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    send(&mut s, request_body(&chat_body(300), true));
    drop(s);
    assert_eq!(h.in_flight(), 0);
    assert!(
        h.metrics()
            .contains(r#"kvroute_responses_total{class="aborted"} 1"#),
        "no response seen"
    );
}

#[test]
fn a_response_without_body_ends_at_its_headers() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    send(&mut s, request_headers("GET", "/health", &[], true));
    send(&mut s, response_headers(503, "text/plain", true));
    assert_eq!(h.in_flight(), 0);
    assert!(
        h.metrics()
            .contains(r#"kvroute_responses_total{class="5xx"} 1"#)
    );
}

#[test]
fn out_of_order_messages_are_protocol_errors() {
    let h = Harness::new(&[8001]);
    let mut out = Vec::new();
    let mut s = h.stream();
    assert_eq!(
        s.on_message(request_body(b"x", true), &mut out),
        Err(ExtProcError::OutOfOrder("request body"))
    );
    let mut s = h.stream();
    assert_eq!(
        s.on_message(ProcessingRequest::default(), &mut out),
        Err(ExtProcError::EmptyMessage)
    );
    let mut s = h.stream();
    s.on_message(request_headers("GET", "/", &[], true), &mut out)
        .unwrap();
    assert_eq!(
        s.on_message(request_headers("GET", "/", &[], true), &mut out),
        Err(ExtProcError::OutOfOrder("request headers"))
    );
}

proptest! {
    /// However Envoy cuts a body, in full-duplex mode kvroute hands back exactly the same
    /// bytes after one headers answer, and routes once.
    #[test]
    fn full_duplex_hands_back_the_exact_body(size in 100usize..200_000, pieces in 1usize..40) {
        let h = Harness::new(&[8001, 8002]);
        let mut s = h.stream();
        let body = chat_body(size);
        let chunks = split(&body, pieces);
        let mut out = send(&mut s, full_duplex_headers(CHAT));
        let last = chunks.len() - 1;
        for (i, c) in chunks.iter().enumerate() {
            out.extend(send(&mut s, request_body(c, i == last)));
        }
        prop_assert_eq!(kinds(&out).iter().filter(|k| **k == "request_headers").count(), 1);
        prop_assert_eq!(kind(&out[0]), "request_headers");
        prop_assert_eq!(streamed_body(&out[1..]), (body, true));
        prop_assert_eq!(h.in_flight(), 1);
    }
}

/// Envoy cuts a body into many small chunks; the parser needs it joined anyway, and the
/// joined buffer goes back in as few messages as its length allows.
#[test]
fn a_body_in_many_chunks_goes_back_in_as_few_messages_as_its_length_allows() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = h.stream();
    let body = chat_body(220 << 10);
    send(&mut s, full_duplex_headers(CHAT));
    let chunks = split(&body, body.len().div_ceil(16 << 10));
    let last = chunks.len() - 1;
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        out.extend(send(&mut s, request_body(c, i == last)));
    }
    assert_eq!(kind(&out[0]), "request_headers");
    assert_eq!(out.len() - 1, body.len().div_ceil(protocol::MAX_CHUNK));
    assert_eq!(streamed_body(&out[1..]), (body, true));
}

#[test]
fn a_heavy_decision_is_left_to_the_caller_and_resumed() {
    let h = Harness::new(&[8001, 8002]);
    let mut s = StreamState::deferring(Arc::clone(&h.router));
    // No plugin tokenizes: parsing alone is cheap up to PARSE_INLINE_BYTES.
    let small = chat_body(100_000);
    assert!(small.len() > DEFAULT_INLINE_DECISION_BYTES);
    send(&mut s, full_duplex_headers(CHAT));
    let out = send(&mut s, request_body(&small, true));
    assert!(
        s.take_job().is_none(),
        "a body to parse only is decided inline"
    );
    assert_eq!(kind(&out[0]), "request_headers");

    let big = chat_body(PARSE_INLINE_BYTES + 1_000);
    let mut s = StreamState::deferring(Arc::clone(&h.router));
    send(&mut s, full_duplex_headers(CHAT));
    let out = send(&mut s, request_body(&big, true));
    assert!(
        out.is_empty(),
        "nothing is answered before the decision: {out:?}"
    );
    let job = s.take_job().expect("a large body is left to the pool");
    assert!(s.take_job().is_none());
    // The job owns everything it needs: it could run on any thread.
    let outcome = std::thread::spawn(move || job.run()).join().unwrap();
    let mut out = Vec::new();
    s.resume(outcome, &mut out);
    let out = messages(out);
    assert_eq!(kind(&out[0]), "request_headers");
    assert!(set_header(&out[0], "x-gateway-destination-endpoint").is_some());
    assert_eq!(
        streamed_body(&out[1..]),
        (big, true),
        "the body follows, whole"
    );
    assert_eq!(h.in_flight(), 2);

    // A malformed large body is refused by the job, as inline.
    let mut s = StreamState::deferring(Arc::clone(&h.router));
    send(&mut s, full_duplex_headers(CHAT));
    send(
        &mut s,
        request_body(&vec![b'{'; PARSE_INLINE_BYTES + 1], true),
    );
    let outcome = s.take_job().unwrap().run();
    let mut out = Vec::new();
    s.resume(outcome, &mut out);
    let out = messages(out);
    assert_eq!(
        immediate(&out[0]).unwrap().status.as_ref().unwrap().code,
        400
    );
}

#[test]
fn a_session_token_comes_back_on_the_response_and_brings_the_session_home() {
    let config = "
plugins: [{type: session-affinity-scorer}, {type: load-scorer}]
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: load-scorer}
";
    let scheduler = kvroute_scheduler::EndpointPickerConfig::load(
        config,
        &kvroute_scheduler::BuildContext::new(16),
    )
    .unwrap();
    let h = Harness::scheduled(&[8001, 8002, 8003], ExtProcConfig::default(), scheduler);
    // The first turn: routed by load; its answer carries the token of who served it.
    let mut s = h.stream();
    let out = send(&mut s, request_headers("GET", "/v1/models", &[], true));
    let served = set_header(&out[0], "x-gateway-destination-endpoint")
        .unwrap()
        .to_owned();
    let out = send(&mut s, response_headers(200, "application/json", false));
    let token = set_header(&out[0], "x-session-token").unwrap().to_owned();
    // Later turns send it back and go to the same endpoint, though it is the busiest.
    let mut held: Vec<StreamState> = Vec::new();
    for _ in 0..4 {
        let mut s = h.stream();
        let out = send(
            &mut s,
            request_headers("GET", "/v1/models", &[("x-session-token", &token)], true),
        );
        assert_eq!(
            set_header(&out[0], "x-gateway-destination-endpoint"),
            Some(served.as_str())
        );
        // Still in flight: the endpoint only gets busier.
        held.push(s);
    }
    assert_eq!(h.in_flight(), 5);
}

/// Disaggregated serving: the decode pod is the destination, the prefill pod goes to its
/// sidecar in `x-prefiller-host-port`, and the prefill pod carries the prompt's backlog (and
/// an in-flight slot) until the answer starts.
#[test]
fn a_disaggregated_decision_names_the_prefill_pod_to_the_sidecar() {
    let yaml = "plugins:
- type: prefill-filter
- type: decode-filter
- type: load-scorer
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: load-scorer}]}
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: load-scorer}]}
";
    let scheduler = kvroute_scheduler::EndpointPickerConfig::load(
        yaml,
        &kvroute_scheduler::BuildContext::new(16),
    )
    .unwrap();
    let h = Harness::scheduled(&[8001, 8002], ExtProcConfig::default(), scheduler);
    let mut endpoints: Vec<_> = h
        .registry
        .snapshot()
        .iter()
        .map(|e| e.endpoint().clone())
        .collect();
    for (e, role) in endpoints.iter_mut().zip(["prefill", "decode"]) {
        e.labels.insert("llm-d.ai/role".into(), role.into());
    }
    h.registry.replace(endpoints);
    let pod = |port: u16| {
        h.registry
            .snapshot()
            .iter()
            .find(|e| e.address().port() == port)
            .map(|e| (e.prefill_backlog(), e.in_flight()))
            .unwrap()
    };
    let mut s = h.stream();
    send(&mut s, full_duplex_headers(CHAT));
    let out = send(&mut s, request_body(&chat_body(300), true));
    assert_eq!(
        set_header(&out[0], "x-gateway-destination-endpoint"),
        Some("127.0.0.1:8002")
    );
    assert_eq!(
        set_header(&out[0], "x-prefiller-host-port"),
        Some("127.0.0.1:8001")
    );
    let (backlog, in_flight) = pod(8001);
    assert!(backlog > 0 && in_flight == 1, "{backlog} {in_flight}");
    assert_eq!(
        pod(8002),
        (0, 1),
        "the decode pod computes none of the prompt"
    );
    send(&mut s, response_headers(200, "text/event-stream", false));
    send(&mut s, response_body(b"data: {}\n\n", false));
    assert_eq!(
        pod(8001),
        (0, 0),
        "the prompt is computed once the answer starts"
    );
    assert_eq!(pod(8002), (0, 1));
    drop(s);
    assert_eq!(pod(8002), (0, 0));
}

/// A client cannot steer a decode pod's sidecar: a prefill header it sends is removed
/// whenever kvroute did not choose one.
#[test]
fn a_client_sent_prefill_header_is_removed() {
    let h = Harness::new(&[8001]);
    let mut s = h.stream();
    let out = send(
        &mut s,
        request_headers(
            "GET",
            "/v1/models",
            &[("x-prefiller-host-port", "10.0.0.1:80")],
            true,
        ),
    );
    let mutation = common(&out[0]).unwrap().header_mutation.as_ref().unwrap();
    assert!(
        mutation
            .remove_headers
            .iter()
            .any(|h| h == "x-prefiller-host-port"),
        "{mutation:?}"
    );
    assert_eq!(set_header(&out[0], "x-prefiller-host-port"), None);
}
