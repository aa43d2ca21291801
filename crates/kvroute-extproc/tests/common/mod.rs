//! The ext_proc service on a real gRPC socket, in process, for the tests beside this folder.

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use kvroute_endpoints::Registry;
use kvroute_extproc::{Admission, ExtProcConfig, ExtProcService, Metrics, Router};
use kvroute_scheduler::{Scheduler, SchedulerHandle};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::{Channel, Server};

/// What an ext_proc stream answers.
pub(crate) type Answers = tonic::Streaming<ProcessingResponse>;

/// A served router (fewest requests in flight) and a client of it.
pub(crate) struct Served {
    pub(crate) client: ExternalProcessorClient<Channel>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) prom: prometheus_client::registry::Registry,
    _stop: DropGuard,
}

/// Builds the admission a test serves with, over the registry, registering its metrics.
pub(crate) type BuildAdmission =
    dyn Fn(&Arc<Registry>, &mut prometheus_client::registry::Registry) -> Arc<Admission>;

/// Serves endpoints on `ports`; with `admission` (built over the registry, given the
/// metrics registry to register in), its dispatcher runs until the `Served` is dropped.
pub(crate) async fn serve(ports: &[u16], admission: Option<&BuildAdmission>) -> Served {
    let registry = test_support::registry(ports);
    let mut prom = prometheus_client::registry::Registry::with_prefix("kvroute");
    let router = Router::new(
        Arc::clone(&registry),
        Arc::new(SchedulerHandle::new(Scheduler::least_in_flight(0))),
        ExtProcConfig::default(),
        Metrics::register(&mut prom),
    );
    let stop = CancellationToken::new();
    let mut service = ExtProcService::new(router);
    if let Some(build) = admission {
        let admission = build(&registry, &mut prom);
        tokio::spawn(Arc::clone(&admission).run(stop.clone()));
        service = service.with_admission(admission);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(service.into_server())
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
    /// Opens one ext_proc stream, as Envoy does per HTTP request.
    pub(crate) async fn open(&mut self) -> (mpsc::Sender<ProcessingRequest>, Answers) {
        let (tx, rx) = mpsc::channel::<ProcessingRequest>(8);
        let answers = self
            .client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, answers)
    }
}
