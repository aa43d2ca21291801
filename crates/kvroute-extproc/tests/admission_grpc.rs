//! Flow control over a real gRPC socket: a request's headers are held while the pool is
//! saturated, the body Envoy keeps sending waits with them, and the request is routed whole
//! once the pool has room; a stream the client drops while waiting leaves the queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use kvroute_endpoints::{PodLoad, Registry};
use kvroute_extproc::{
    Admission, AdmissionCollector, ExtProcConfig, ExtProcService, Metrics, Router,
};
use kvroute_scheduler::admission::{AdmissionSettings, FlowSettings};
use kvroute_scheduler::{Scheduler, SchedulerHandle};
use prometheus_client::encoding::text::encode;
use test_support::envoy::*;
use test_support::{chat_body, registry};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

type Answers = tonic::Streaming<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse>;

struct Served {
    client: ExternalProcessorClient<tonic::transport::Channel>,
    registry: Arc<Registry>,
    prom: prometheus_client::registry::Registry,
    _stop: tokio_util::sync::DropGuard,
}

/// A server over one endpoint with flow control on, its dispatcher running.
async fn serve() -> Served {
    let registry = registry(&[8001]);
    let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
    let router = Router::new(
        Arc::clone(&registry),
        Arc::new(SchedulerHandle::new(Scheduler::least_in_flight(0))),
        ExtProcConfig::default(),
        Metrics::register(&mut prom),
    );
    let admission = Admission::new(
        Arc::clone(&registry),
        None,
        AdmissionSettings {
            flow: Some(FlowSettings::default()),
            ..AdmissionSettings::default()
        },
    );
    prom.register_collector(Box::new(AdmissionCollector(Arc::clone(&admission))));
    let stop = CancellationToken::new();
    tokio::spawn(Arc::clone(&admission).run(stop.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(
                ExtProcService::new(router)
                    .with_admission(admission)
                    .into_server(),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Served {
        client,
        registry,
        prom,
        _stop: stop.drop_guard(),
    }
}

impl Served {
    async fn open(&mut self) -> (mpsc::Sender<ProcessingRequest>, Answers) {
        let (tx, rx) = mpsc::channel::<ProcessingRequest>(8);
        let answers = self
            .client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, answers)
    }

    fn waiting(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.prom).unwrap();
        out.lines()
            .find(|l| l.starts_with("kvroute_flow_control_queue_size{"))
            .unwrap_or("")
            .to_owned()
    }

    /// Records a scrape of every endpoint, now, with `waiting` requests queued.
    fn scraped(&self, waiting: u32) {
        for e in self.registry.snapshot().iter() {
            let load = PodLoad {
                waiting,
                ..PodLoad::default()
            };
            e.record_scrape(load, Instant::now());
        }
    }
}

async fn eventually(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_held_request_is_routed_whole_once_the_pool_has_room() {
    let mut s = serve().await;
    // Never scraped: saturated.
    let (tx, mut answers) = s.open().await;
    let body = chat_body(2_000);
    tx.send(full_duplex_chat_headers()).await.unwrap();
    tx.send(request_body(&body, true)).await.unwrap();
    let held = tokio::time::timeout(Duration::from_millis(300), answers.message()).await;
    assert!(held.is_err(), "answered while saturated: {held:?}");
    assert!(s.waiting().ends_with(" 1"), "{}", s.waiting());
    s.scraped(0);
    let first = answers.message().await.unwrap().unwrap();
    assert!(
        set_header(&first, "x-gateway-destination-endpoint").is_some(),
        "{first:?}"
    );
    let rest = answers.message().await.unwrap().unwrap();
    assert_eq!(streamed_body(&[rest]), (body, true));
    assert_eq!(s.waiting(), "", "the queue is empty");
}

#[tokio::test]
async fn a_client_gone_while_waiting_leaves_the_queue() {
    let mut s = serve().await;
    let (tx, answers) = s.open().await;
    tx.send(full_duplex_chat_headers()).await.unwrap();
    assert!(
        eventually(|| s.waiting().ends_with(" 1")).await,
        "not queued"
    );
    drop((tx, answers));
    assert!(
        eventually(|| s.waiting().is_empty()).await,
        "still queued: {}",
        s.waiting()
    );
    // Once the pool has room a new request goes at once.
    s.scraped(0);
    let (tx, mut answers) = s.open().await;
    tx.send(full_duplex_chat_headers()).await.unwrap();
    tx.send(request_body(&chat_body(500), true)).await.unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert!(set_header(&first, "x-gateway-destination-endpoint").is_some());
}
