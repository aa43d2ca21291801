//! Who may read `/metrics` (upstream's `--metrics-endpoint-auth`): the caller's bearer token
//! is reviewed by the API server (a `TokenReview`), and the user it names must be allowed
//! `get` on the non-resource URL `/metrics` (a `SubjectAccessReview`), as
//! controller-runtime's metrics filter asks. Answers are cached for a minute per token, so a
//! scraper costs the API server two calls a minute, not two a scrape.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};

/// How long a review's answer is reused.
const CACHE_FOR: Duration = Duration::from_secs(60);

/// Tokens remembered at most; beyond, the oldest answers are dropped.
const CACHE_ENTRIES: usize = 1_024;

/// A caller's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The token is valid and its user may read `/metrics`.
    Allowed,
    /// The token is not valid (or there is none): 401.
    Unauthenticated,
    /// The token is valid, its user may not: 403.
    Forbidden,
}

/// Reviews bearer tokens against the API server; cheap to clone.
#[derive(Clone)]
pub struct MetricsAuth {
    client: Client,
    cache: Arc<Mutex<HashMap<String, (Verdict, Instant)>>>,
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsAuth").finish_non_exhaustive()
    }
}

impl MetricsAuth {
    /// Reviews through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Arc::default(),
        }
    }

    /// What the API server says of `token` for `get /metrics`. An API server that cannot
    /// be asked is an error (the caller answers 503, and nothing is cached).
    pub async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let now = Instant::now();
        if let Some((verdict, at)) = self.cache().get(token)
            && now.duration_since(*at) < CACHE_FOR
        {
            return Ok(*verdict);
        }
        let verdict = self.ask(token).await?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, at)| now.duration_since(*at) < CACHE_FOR);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (verdict, now));
        Ok(verdict)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Verdict, Instant)>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn ask(&self, token: &str) -> Result<Verdict, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let Some(status) = reviewed.status.filter(|s| s.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let user = status.user.unwrap_or_default();
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".to_owned()),
                    verb: Some("get".to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let decided = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        Ok(if decided.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}
