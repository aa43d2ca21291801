//! Any bytes as a completions or chat-completions body: a parsed request or a `ParseError`
//! (answered 400), never a panic; and a parsed request has the shape its API names.

#![no_main]

use kvroute_core::{ApiKind, InferenceRequest, Prompt, RequestHints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for api in [ApiKind::Completions, ApiKind::ChatCompletions] {
        if let Ok(r) = InferenceRequest::parse(api, data, RequestHints::default()) {
            assert_eq!(r.api, api);
            assert_eq!(
                matches!(r.prompt, Prompt::Chat(_)),
                api == ApiKind::ChatCompletions
            );
        }
    }
});
