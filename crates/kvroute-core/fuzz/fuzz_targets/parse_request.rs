//! Any bytes as a completions or chat-completions body: a parsed request or a `ParseError`
//! (answered 400), never a panic.

#![no_main]

use kvroute_core::{ApiKind, InferenceRequest, RequestHints};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for api in [ApiKind::Completions, ApiKind::ChatCompletions] {
        let _ = InferenceRequest::parse(api, data, RequestHints::default());
    }
});
