//! The crate's layers, held: base modules never import a front-end,
//! front-ends never import each other, only the composition root wires
//! them (README, "Architecture"). Reads every `crate::…` path in `src/`.

use std::collections::BTreeSet;
use std::path::Path;

const BASE: &[&str] = &[
    "config",
    "identity",
    "authz",
    "store",
    "metrics",
    "transport",
    "telemetry",
    "pki",
    "bus",
];
const FRONT_ENDS: &[&str] = &["http", "oauth", "admin", "mqtt", "wamp", "tunnel"];
const ROOT: &[&str] = &["gateway", "main", "lib"];

/// Edges against the layers that exist, each with why (none today). One
/// that no longer occurs must leave this list, so it only shrinks.
const KNOWN: &[(&str, &str, &str)] = &[];

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

fn allowed(from: &str, to: &str) -> bool {
    if ROOT.contains(&from) {
        return true;
    }
    BASE.contains(&to) && (BASE.contains(&from) || FRONT_ENDS.contains(&from))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_import_only_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let known: Vec<String> = BASE
        .iter()
        .chain(FRONT_ENDS)
        .chain(ROOT)
        .map(|m| m.to_string())
        .collect();
    let mut edges = BTreeSet::new();
    for file in &all {
        let from = module_of(&src, file);
        assert!(
            known.contains(&from),
            "src/{from} is in no layer: add it to BASE, FRONT_ENDS or ROOT (and the README)"
        );
        let text = std::fs::read_to_string(file).unwrap();
        for (i, _) in text.match_indices("crate::") {
            // `tollgate::crate::` never occurs; a path is `crate::<module>`.
            let rest = &text[i + "crate::".len()..];
            let to: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !to.is_empty() && to != from && known.contains(&to) {
                edges.insert((from.clone(), to));
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, to) in &edges {
        let excused = KNOWN.iter().any(|(f, t, _)| f == from && t == to);
        if !allowed(from, to) && !excused {
            wrong.push(format!("{from} -> {to}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers (base never imports a front-end; front-ends never import each other): {wrong:?}"
    );
    let healed: Vec<String> = KNOWN
        .iter()
        .filter(|(f, t, _)| !edges.contains(&(f.to_string(), t.to_string())))
        .map(|(f, t, why)| format!("{f} -> {t} ({why})"))
        .collect();
    assert!(
        healed.is_empty(),
        "no longer imported: remove from KNOWN: {healed:?}"
    );
}
