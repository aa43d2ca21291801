//! The reference pages say what the code does: every `kvroute serve` flag and every plugin
//! type is in `docs/configuration.md`, and every flag written there exists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use kvroute_scheduler::config::PluginType;

fn doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"))
        .unwrap()
}

/// Long flags (`--name`) in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at + 2;
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .map_or(text.len(), |e| start + e);
        let before_ok = i + at == 0 || !bytes[i + at - 1].is_ascii_alphanumeric();
        if end > start && before_ok && bytes[start].is_ascii_lowercase() {
            out.insert(text[start..end].to_owned());
        }
        i = end.max(start);
    }
    out
}

fn help(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_serve_flag_is_documented_and_every_documented_flag_exists() {
    let mut code = flags(&help(&["serve", "--help"]));
    code.extend(flags(&help(&["--help"])));
    code.remove("help");
    code.remove("version");
    let doc = doc();
    let section =
        &doc[doc.find("## `kvroute serve` flags").unwrap()..doc.find("## Shape").unwrap()];
    let documented = flags(section);
    let missing: Vec<_> = code.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "flags missing from docs/configuration.md: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&code).collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md names flags kvroute does not take: {stale:?}"
    );
}

#[test]
fn every_plugin_type_is_documented() {
    let doc = doc();
    for t in PluginType::ALL {
        let name = t.as_str();
        assert!(
            doc.contains(&format!("| `{name}` ")),
            "plugin type {name} has no row in docs/configuration.md"
        );
    }
}
