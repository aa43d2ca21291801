//! The tonic side: one [`StreamState`] per gRPC stream, driven by the response stream
//! itself, so a stream's state lives exactly as long as Envoy keeps the stream open and
//! nothing is spawned per request.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::stream::{Router, StreamState};

/// Slack over the body limit for the rest of a buffered-mode message (headers, metadata).
const MESSAGE_OVERHEAD: usize = 1 << 20;

/// The `envoy.service.ext_proc.v3.ExternalProcessor` service.
#[derive(Clone, Debug)]
pub struct ExtProcService {
    router: Arc<Router>,
}

impl ExtProcService {
    /// A service routing with `router`.
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }

    /// The tonic server for this service, accepting messages up to twice the body limit: a
    /// buffered-mode body over the limit then still reaches the state machine, which answers
    /// it 413, instead of failing gRPC decoding (which Envoy would turn into a 500).
    pub fn into_server(self) -> ExternalProcessorServer<Self> {
        let limit = self.router.config().max_body_bytes.saturating_mul(2) + MESSAGE_OVERHEAD;
        ExternalProcessorServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(ResponseStream {
            inbound: request.into_inner(),
            state: StreamState::new(Arc::clone(&self.router)),
            pending: VecDeque::new(),
            scratch: Vec::new(),
            done: false,
        }))
    }
}

/// The answers to one ext_proc stream, produced as Envoy's messages are read.
#[derive(Debug)]
pub struct ResponseStream {
    inbound: Streaming<ProcessingRequest>,
    state: StreamState,
    pending: VecDeque<ProcessingResponse>,
    scratch: Vec<ProcessingResponse>,
    done: bool,
}

impl Stream for ResponseStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
                None => {
                    this.done = true;
                }
                Some(Err(status)) => {
                    // Envoy reset the stream (client gone, timeout): nothing to answer.
                    debug!(%status, "ext_proc stream ended by the data plane");
                    this.done = true;
                }
                Some(Ok(msg)) => {
                    if let Err(e) = this.state.on_message(msg, &mut this.scratch) {
                        this.state.router_metrics().stream_error();
                        this.done = true;
                        return Poll::Ready(Some(Err(Status::invalid_argument(e.to_string()))));
                    }
                    this.pending.extend(this.scratch.drain(..));
                }
            }
        }
    }
}
