//! An in-process Kubernetes API server, so that kube-rs runs its real list/watch code paths
//! in tests: there is no kube-apiserver, envtest or kind on these machines.
//!
//! It keeps what the protocol promises a client, not what an apiserver does inside:
//! - one resource version counter for every object (as etcd's revision), written into
//!   `metadata.resourceVersion` on each change;
//! - `GET` lists filtered by `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined)
//!   and `fieldSelector` (`metadata.name`, `metadata.namespace`), paginated by `limit` and
//!   `continue`; list items carry no `kind`/`apiVersion`, as a real server's do not;
//! - `watch=true` streams of `ADDED`/`MODIFIED`/`DELETED` lines from a resource version,
//!   `BOOKMARK`s when asked (`allowWatchBookmarks`), an `ERROR` event with a `410 Gone`
//!   status when that version was compacted away, and the stream closed after
//!   `timeoutSeconds`;
//! - a resource nobody installed answers `404` with a `Status` body (a missing CRD);
//! - `TokenReview` and `SubjectAccessReview` creations, answered from the tokens a test
//!   sets ([`ApiServer::token`]).
//!
//! Faults a test can cause: [`ApiServer::compact`] (history dropped: older watches get
//! `410`), [`ApiServer::drop_watches`] (connections cut), [`ApiServer::stop`] and
//! [`ApiServer::start_again`] (refused connections, then the same store on the same port,
//! as a restarted apiserver in front of the same etcd).
//!
//! Where it is simpler than a real server: a `continue` page reads the current objects after
//! the last name returned, not the first page's snapshot (the watch from the first page's
//! version replays every change after it, so a client ends in the same state); no
//! authentication, admission, defaulting or schema validation.

// A fake for tests: a broken test setup (a port that will not bind, an object without a
// name) panics with its message, as the test's own code would.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// A kind of object the server serves (a built-in, or an installed CRD's version).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Resource {
    /// `""` for the core group.
    pub group: String,
    /// `v1`, `v1alpha2`, ...
    pub version: String,
    /// Lower-case plural in the URL: `pods`, `inferencepools`.
    pub plural: String,
    /// `Pod`, `InferencePool`.
    pub kind: String,
}

impl Resource {
    /// Core `v1` pods.
    pub fn pods() -> Self {
        Self::new("", "v1", "pods", "Pod")
    }

    /// `InferencePool` of `inference.networking.k8s.io/v1`.
    pub fn inference_pool() -> Self {
        Self::new(
            "inference.networking.k8s.io",
            "v1",
            "inferencepools",
            "InferencePool",
        )
    }

    /// `InferenceObjective` of `llm-d.ai/v1alpha2`.
    pub fn inference_objective() -> Self {
        Self::new(
            "llm-d.ai",
            "v1alpha2",
            "inferenceobjectives",
            "InferenceObjective",
        )
    }

    /// A namespaced resource of `group/version`.
    pub fn new(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

/// Requests the server answered, by kind: what a test asserts to know the client took a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// List requests (each page counts).
    pub lists: u64,
    /// Watch requests.
    pub watches: u64,
    /// `410 Gone` answers to watches from a compacted version.
    pub gone: u64,
    /// `404` answers (resource not installed, or object missing).
    pub not_found: u64,
    /// Token and access reviews answered.
    pub reviews: u64,
}

/// The running fake; dropping it stops the listener and closes every watch.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listening: Option<CancellationToken>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    /// Watches from a version below this get `410 Gone`.
    compacted_below: u64,
    installed: HashMap<String, Resource>,
    /// (collection prefix + plural, namespace, name) -> object with metadata.resourceVersion.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    next_watch: u64,
    served: Served,
    /// Bearer token -> (user, may it get /metrics).
    tokens: HashMap<String, (String, bool)>,
    calls: BTreeSet<(String, String, String, String)>,
}

#[derive(Debug, Clone)]
struct Change {
    revision: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug)]
struct Watch {
    id: u64,
    collection: String,
    namespace: String,
    filter: Filter,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    bookmarks: bool,
    kind: String,
    api_version: String,
}

#[derive(Debug, Clone, Default)]
struct Filter {
    labels: Vec<LabelTerm>,
    name: Option<String>,
}

#[derive(Debug, Clone)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

type Body = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// Starts on an ephemeral 127.0.0.1 port, serving core pods.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        shared.state().install(Resource::pods());
        let mut server = Self {
            addr,
            shared,
            listening: None,
        };
        server.listen(listener);
        server
    }

    /// `http://127.0.0.1:port`, for `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file's text pointing at this server with `namespace` as the default,
    /// for a binary that reads `KUBECONFIG`.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// Serves `resource` from now on, as installing its CRD does.
    pub fn install(&self, resource: Resource) {
        self.shared.state().install(resource);
    }

    /// Creates or replaces an object (`metadata.name` and `metadata.namespace` required);
    /// returns the revision it was stored at.
    pub fn apply(&self, resource: &Resource, object: Value) -> u64 {
        self.shared.state().apply(resource, object)
    }

    /// Deletes an object if present; returns whether it was.
    pub fn delete(&self, resource: &Resource, namespace: &str, name: &str) -> bool {
        self.shared.state().delete(resource, namespace, name)
    }

    /// Forgets the change history: a watch from any version before now is answered
    /// `410 Gone` and the client must list again.
    pub fn compact(&self) {
        let mut state = self.shared.state();
        state.compacted_below = state.revision + 1;
        state.history.clear();
    }

    /// Ends every open watch stream (the connection goes, as on a network cut).
    pub fn drop_watches(&self) {
        self.shared.state().watches.clear();
    }

    /// Sends a bookmark at the current revision on every watch that asked for them.
    pub fn bookmark(&self) {
        self.shared.state().bookmark();
    }

    /// Every call made so far, as RBAC sees it: (API group, resource, verb, namespace), the
    /// verb `get`, `list` or `watch`; calls for resources not installed included.
    pub fn calls(&self) -> BTreeSet<(String, String, String, String)> {
        self.shared.state().calls.clone()
    }

    /// Makes `token` a valid bearer token for `user`, who may (or may not) `get /metrics`,
    /// as the reviews kvroute asks for (`--metrics-endpoint-auth`) will say.
    pub fn token(&self, token: &str, user: &str, may_read_metrics: bool) {
        self.shared
            .state()
            .tokens
            .insert(token.into(), (user.into(), may_read_metrics));
    }

    /// Requests answered so far.
    pub fn served(&self) -> Served {
        self.shared.state().served
    }

    /// Stops listening and cuts every watch; connections are refused until
    /// [`ApiServer::start_again`].
    pub fn stop(&mut self) {
        if let Some(token) = self.listening.take() {
            token.cancel();
        }
        self.drop_watches();
    }

    /// Listens again on the same port with the same objects, after [`ApiServer::stop`].
    pub async fn start_again(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("re-binding {}: {e}", self.addr),
            }
        };
        self.listen(listener);
    }

    fn listen(&mut self, listener: TcpListener) {
        let token = CancellationToken::new();
        self.listening = Some(token.clone());
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let shared = Arc::clone(&shared);
                let conn_token = token.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(shared.handle(req).await) }
                    });
                    let conn =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = conn_token.cancelled() => {}
                    }
                });
            }
        });
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pod as the kubelet reports it: `Running`, with `ip`, and a `Ready` condition.
pub fn pod(namespace: &str, name: &str, ip: &str, labels: &[(&str, &str)], ready: bool) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// A v1 `InferencePool` selecting `labels` on `ports`, its picker the Service `kvroute`.
pub fn inference_pool(
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    ports: &[u16],
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    let ports: Vec<Value> = ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "targetPorts": ports,
            "endpointPickerRef": {"name": "kvroute", "portNumber": 9002, "failureMode": "FailOpen"},
        },
    })
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked holding the lock leaves plain data behind; go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = parse_query(req.uri().query().unwrap_or(""));
        if req.method() == hyper::Method::POST {
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            return match body {
                Ok(body) => self.review(&path, &body),
                Err(_) => status(StatusCode::BAD_REQUEST, "unreadable body"),
            };
        }
        if req.method() != hyper::Method::GET {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and reviews are served",
            );
        }
        // The body of a GET is ignored; drain it so the connection stays usable.
        let _ = req.into_body().collect().await;
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        let Some((collection, namespace, name)) = self.route(&path, watch) else {
            self.state().served.not_found += 1;
            return status(
                StatusCode::NOT_FOUND,
                &format!("the server could not find the requested resource ({path})"),
            );
        };
        let filter = match Filter::parse(&query) {
            Ok(f) => f,
            Err(e) => return status(StatusCode::BAD_REQUEST, &e),
        };
        if let Some(name) = name {
            return self.get(&collection, &namespace, &name);
        }
        if watch {
            return self.watch(collection, namespace, filter, &query);
        }
        self.list(&collection, &namespace, &filter, &query)
    }

    /// `(collection, namespace, name)` of a namespaced path, if its resource is installed.
    fn route(&self, path: &str, watch: bool) -> Option<(String, String, Option<String>)> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (prefix, group, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => (format!("/api/{v}"), "", rest),
            ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), *g, rest),
            _ => return None,
        };
        let (namespace, plural, name) = match rest {
            ["namespaces", ns, plural] => (*ns, *plural, None),
            ["namespaces", ns, plural, name] => (*ns, *plural, Some((*name).to_owned())),
            _ => return None,
        };
        let verb = match (&name, watch) {
            (Some(_), _) => "get",
            (None, true) => "watch",
            (None, false) => "list",
        };
        let collection = format!("{prefix}/{plural}");
        let mut state = self.state();
        state.calls.insert((
            group.to_owned(),
            plural.to_owned(),
            verb.to_owned(),
            namespace.to_owned(),
        ));
        state
            .installed
            .contains_key(&collection)
            .then(|| (collection, namespace.to_owned(), name))
    }

    /// `TokenReview` and `SubjectAccessReview` creations, answered from what the test set
    /// with [`ApiServer::token`].
    fn review(&self, path: &str, body: &[u8]) -> Response<Body> {
        let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "not JSON");
        };
        let mut state = self.state();
        let (group, plural) = match path {
            "/apis/authentication.k8s.io/v1/tokenreviews" => {
                ("authentication.k8s.io", "tokenreviews")
            }
            "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                ("authorization.k8s.io", "subjectaccessreviews")
            }
            _ => {
                state.served.not_found += 1;
                return status(
                    StatusCode::NOT_FOUND,
                    &format!("no such resource to create ({path})"),
                );
            }
        };
        state
            .calls
            .insert((group.into(), plural.into(), "create".into(), String::new()));
        state.served.reviews += 1;
        let answer = if plural == "tokenreviews" {
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            match state.tokens.get(token) {
                Some((user, _)) => json!({"authenticated": true, "user": {"username": user}}),
                None => json!({"authenticated": false}),
            }
        } else {
            let user = review["spec"]["user"].as_str().unwrap_or_default();
            let attrs = &review["spec"]["nonResourceAttributes"];
            let allowed = attrs["path"] == "/metrics"
                && attrs["verb"] == "get"
                && state.tokens.values().any(|(u, may)| u == user && *may);
            json!({"allowed": allowed})
        };
        review["status"] = answer;
        json_response(StatusCode::CREATED, &review)
    }

    fn get(&self, collection: &str, namespace: &str, name: &str) -> Response<Body> {
        let mut state = self.state();
        let key = (collection.to_owned(), namespace.to_owned(), name.to_owned());
        match state.objects.get(&key) {
            Some(obj) => json_response(StatusCode::OK, obj),
            None => {
                state.served.not_found += 1;
                status(StatusCode::NOT_FOUND, &format!("\"{name}\" not found"))
            }
        }
    }

    fn list(
        &self,
        collection: &str,
        namespace: &str,
        filter: &Filter,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        let mut state = self.state();
        state.served.lists += 1;
        let resource = state.installed[collection].clone();
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|&l| l > 0);
        // A continue token is "revision/last name returned".
        let (revision, after) = match query.get("continue") {
            Some(token) => match token.split_once('/') {
                Some((rev, name)) => match rev.parse::<u64>() {
                    Ok(rev) => (rev, Some(name.to_owned())),
                    Err(_) => return status(StatusCode::BAD_REQUEST, "bad continue token"),
                },
                None => return status(StatusCode::BAD_REQUEST, "bad continue token"),
            },
            None => (state.revision, None),
        };
        if after.is_some() && revision < state.compacted_below {
            return status(
                StatusCode::GONE,
                "The provided continue parameter is too old to display a consistent list result.",
            );
        }
        let mut items = Vec::new();
        let mut more = None;
        for ((coll, ns, name), obj) in &state.objects {
            if coll != collection || ns != namespace {
                continue;
            }
            if after.as_deref().is_some_and(|a| name.as_str() <= a) || !filter.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() == l) {
                more = Some(format!("{revision}/{}", items_last_name(&items)));
                break;
            }
            let mut item = obj.clone();
            if let Some(map) = item.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            items.push(item);
        }
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if let Some(token) = more {
            metadata["continue"] = Value::String(token);
        }
        json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", resource.kind),
                "apiVersion": resource.api_version(),
                "metadata": metadata,
                "items": items,
            }),
        )
    }

    fn watch(
        self: &Arc<Self>,
        collection: String,
        namespace: String,
        filter: Filter,
        query: &HashMap<String, String>,
    ) -> Response<Body> {
        let mut state = self.state();
        state.served.watches += 1;
        let resource = state.installed[&collection].clone();
        let from: u64 = match query.get("resourceVersion").map(|v| v.parse::<u64>()) {
            None => state.revision,
            Some(Ok(v)) => v,
            Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "bad resourceVersion"),
        };
        let (tx, rx) = mpsc::channel(65_536);
        // From "0" a watch starts at the current state (sends no history), as a real
        // server's watch cache does for any version it still holds as "now".
        let gone = from != 0 && from + 1 < state.compacted_below;
        if gone {
            state.served.gone += 1;
            let line = json!({
                "type": "ERROR",
                "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", state.compacted_below),
                    "reason": "Expired", "code": 410,
                },
            });
            let _ = tx.try_send(Ok(Frame::data(to_line(&line))));
        } else {
            for change in state.history.iter().filter(|c| {
                from != 0
                    && c.revision > from
                    && c.collection == collection
                    && c.namespace == namespace
            }) {
                if filter.matches(&change.object) || change.kind != "ADDED" {
                    let kind = if filter.matches(&change.object) {
                        change.kind
                    } else {
                        "DELETED"
                    };
                    let _ = tx.try_send(Ok(Frame::data(event_line(kind, &change.object))));
                }
            }
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(1_800);
            let bookmarks = query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true");
            state.next_watch += 1;
            let id = state.next_watch;
            state.watches.push(Watch {
                id,
                collection,
                namespace,
                filter,
                tx: tx.clone(),
                bookmarks,
                kind: resource.kind.clone(),
                api_version: resource.api_version(),
            });
            // The server ends a watch after its timeout; the client resumes from its version.
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(timeout)).await;
                shared.state().watches.retain(|w| w.id != id);
            });
        }
        drop(state);
        drop(tx);
        let body = StreamBody::new(ReceiverStream::new(rx));
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .expect("static response parts")
    }
}

impl State {
    fn install(&mut self, resource: Resource) {
        let key = format!("{}/{}", resource.prefix(), resource.plural);
        self.installed.insert(key, resource);
    }

    fn apply(&mut self, resource: &Resource, mut object: Value) -> u64 {
        let collection = format!("{}/{}", resource.prefix(), resource.plural);
        assert!(
            self.installed.contains_key(&collection),
            "{collection} is not installed"
        );
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .expect("metadata.namespace")
            .to_owned();
        self.revision += 1;
        let revision = self.revision;
        object["apiVersion"] = Value::String(resource.api_version());
        object["kind"] = Value::String(resource.kind.clone());
        object["metadata"]["resourceVersion"] = Value::String(revision.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = Value::String(format!("uid-{namespace}-{name}-{revision}"));
        }
        let key = (collection.clone(), namespace.clone(), name);
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let old = self.objects.insert(key, object.clone());
        let change = Change {
            revision,
            collection,
            namespace,
            kind,
            object,
        };
        self.publish(&change, old.as_ref());
        self.history.push(change);
        revision
    }

    fn delete(&mut self, resource: &Resource, namespace: &str, name: &str) -> bool {
        let collection = format!("{}/{}", resource.prefix(), resource.plural);
        let key = (collection.clone(), namespace.to_owned(), name.to_owned());
        let Some(mut object) = self.objects.remove(&key) else {
            return false;
        };
        self.revision += 1;
        object["metadata"]["resourceVersion"] = Value::String(self.revision.to_string());
        let change = Change {
            revision: self.revision,
            collection,
            namespace: namespace.to_owned(),
            kind: "DELETED",
            object,
        };
        self.publish(&change, None);
        self.history.push(change);
        true
    }

    /// Sends a change to the watches it concerns. An object that stops matching a watch's
    /// selector is `DELETED` for it, and one that starts matching is `ADDED`, as a real
    /// server's watch cache translates them.
    fn publish(&mut self, change: &Change, old: Option<&Value>) {
        self.watches.retain(|w| {
            if w.collection != change.collection || w.namespace != change.namespace {
                return !w.tx.is_closed();
            }
            let now = w.filter.matches(&change.object);
            let before = old.is_some_and(|o| w.filter.matches(o));
            let kind = match (change.kind, before, now) {
                ("DELETED", _, true) => "DELETED",
                ("DELETED", _, false) => return !w.tx.is_closed(),
                (_, false, true) => "ADDED",
                (_, true, true) => "MODIFIED",
                (_, true, false) => "DELETED",
                (_, false, false) => return !w.tx.is_closed(),
            };
            w.tx.try_send(Ok(Frame::data(event_line(kind, &change.object))))
                .is_ok()
        });
    }

    fn bookmark(&mut self) {
        let revision = self.revision.to_string();
        self.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let line = json!({
                "type": "BOOKMARK",
                "object": {"kind": w.kind, "apiVersion": w.api_version, "metadata": {"resourceVersion": revision}},
            });
            w.tx.try_send(Ok(Frame::data(to_line(&line)))).is_ok()
        });
    }
}

impl Filter {
    fn parse(query: &HashMap<String, String>) -> Result<Self, String> {
        let mut filter = Self::default();
        if let Some(selector) = query.get("labelSelector") {
            for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                let parsed = if let Some((k, v)) = term.split_once("!=") {
                    LabelTerm::NotEquals(k.trim().into(), v.trim().into())
                } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('='))
                {
                    LabelTerm::Equals(k.trim().into(), v.trim().into())
                } else if let Some(k) = term.strip_prefix('!') {
                    LabelTerm::Absent(k.trim().into())
                } else if term.contains(' ') || term.contains('(') {
                    return Err(format!(
                        "unable to parse requirement: {term:?} (set-based selectors are not served here)"
                    ));
                } else {
                    LabelTerm::Exists(term.into())
                };
                filter.labels.push(parsed);
            }
        }
        if let Some(fields) = query.get("fieldSelector") {
            for term in fields.split(',').filter(|t| !t.is_empty()) {
                match term.split_once('=') {
                    Some(("metadata.name", v)) => {
                        filter.name = Some(v.trim_start_matches('=').into())
                    }
                    Some(("metadata.namespace", _)) => {}
                    _ => return Err(format!("field label not supported: {term}")),
                }
            }
        }
        Ok(filter)
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        if let Some(name) = &self.name
            && meta["name"].as_str() != Some(name.as_str())
        {
            return false;
        }
        let label = |k: &str| meta["labels"].get(k).and_then(Value::as_str);
        self.labels.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::Absent(k) => label(k).is_none(),
        })
    }
}

fn items_last_name(items: &[Value]) -> String {
    items
        .last()
        .and_then(|i| i["metadata"]["name"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    to_line(&json!({"type": kind, "object": object}))
}

fn to_line(value: &Value) -> Bytes {
    let mut line = serde_json::to_vec(value).expect("a JSON value serialises");
    line.push(b'\n');
    Bytes::from(line)
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(
            serde_json::to_vec(value).expect("a JSON value serialises"),
        ))))
        .expect("static response parts")
}

/// A `metav1.Status` failure, as the apiserver answers errors.
fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::GONE => "Expired",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "MethodNotAllowed",
    };
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
