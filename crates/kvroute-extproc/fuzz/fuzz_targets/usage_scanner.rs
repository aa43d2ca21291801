//! Any bytes as a response body, JSON or server-sent events, cut into one to three chunks:
//! the scanner reads a usage or none, never panics, and what it reads does not depend on
//! where the body was cut (it is compared with the body fed whole).
//!
//! Input layout: three control bytes, then the body. The first picks the number of chunks
//! (`1 + b % 3`), the next two where the cuts fall (`b * len / 256`).

#![no_main]

use kvroute_extproc::usage::UsageScanner;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (control, body) = data.split_at(data.len().min(3));
    let [chunks, a, b] = <[u8; 3]>::try_from(control).unwrap_or_default();
    let len = body.len();
    let mut cuts = [usize::from(a) * len / 256, usize::from(b) * len / 256];
    cuts.sort_unstable();
    let cuts = &cuts[..usize::from(chunks % 3)];
    for content_type in ["text/event-stream", "application/json"] {
        let mut whole = UsageScanner::for_content_type(content_type);
        whole.feed(body);
        let whole = whole.finish();

        let mut chunked = UsageScanner::for_content_type(content_type);
        let mut last = 0;
        for &cut in cuts.iter().chain([&len]) {
            chunked.feed(&body[last..cut]);
            last = cut;
        }
        assert_eq!(chunked.finish(), whole, "{content_type} cut at {cuts:?}");
    }
});
