//! Architecture Invariant: no import circle between the daemon's source files.
//!
//! Each file's `crate::…` and `super::…` paths name the module files it uses; the graph of
//! those edges must have no cycle. So the engine (`volume/`) never reaches up to what opens
//! and drives it (`lifecycle/`, connectors, sync source, control), and a reader can take the
//! modules bottom-up. Test modules (`mod tests` after `#[cfg(test)]`, `tests.rs`) and comments
//! are left out: tests may use anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every non-test source file of the crate, by module path (`volume/queue.rs` is
/// `["volume", "queue"]`, `volume/mod.rs` is `["volume"]`, `lib.rs` is `[]`).
fn source_files(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read the source directory").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut p = prefix.to_vec();
            p.push(name);
            source_files(&path, &p, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem == "tests" {
                continue;
            }
            let mut m = prefix.to_vec();
            if !matches!(stem, "mod" | "lib" | "main") {
                m.push(stem.to_string());
            }
            out.insert(m, path);
        }
    }
}

/// The text a file compiles outside tests, without comments.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" // ").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The module paths a file's code names through `crate::` and `super::` (with one level of
/// `{a, b::c}` groups), before resolution to files.
fn named_paths(code: &str, this: &Module) -> Vec<Module> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    for start in ["crate", "super"] {
        let needle = format!("{start}::");
        let mut from = 0;
        while let Some(at) = code[from..].find(&needle).map(|i| i + from) {
            from = at + needle.len();
            if at > 0 && is_ident_byte(bytes[at - 1]) {
                continue;
            }
            let mut base: Module =
                if start == "super" { this[..this.len().saturating_sub(1)].to_vec() } else { vec![] };
            let mut i = from;
            loop {
                let seg_end = (i..bytes.len()).find(|&k| !is_ident_byte(bytes[k])).unwrap_or(bytes.len());
                if seg_end > i {
                    base.push(code[i..seg_end].to_string());
                }
                i = seg_end;
                if code[i..].starts_with("::{") {
                    let close = code[i..].find('}').map(|k| k + i).unwrap_or(bytes.len());
                    for item in code[i + 3..close].split(',') {
                        let first = item.trim().split("::").next().unwrap_or("").trim();
                        let first: String = first.bytes().take_while(|&b| is_ident_byte(b)).map(char::from).collect();
                        if !first.is_empty() && first != "self" {
                            let mut p = base.clone();
                            p.push(first);
                            out.push(p);
                        }
                    }
                    break;
                }
                if code[i..].starts_with("::") {
                    i += 2;
                    continue;
                }
                break;
            }
            out.push(base);
        }
    }
    out
}

/// Each file's edges to the module files it uses (the longest module prefix of each path).
fn import_graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    source_files(&src, &[], &mut files);
    assert!(files.contains_key(&vec!["volume".to_string()]), "no volume/mod.rs under {}", src.display());
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        let code = code_of(&std::fs::read_to_string(path).expect("read a source file"));
        let mut edges = BTreeSet::new();
        for named in named_paths(&code, module) {
            let target = (1..=named.len()).rev().map(|k| named[..k].to_vec()).find(|p| files.contains_key(p));
            if let Some(t) = target.filter(|t| t != module) {
                edges.insert(t);
            }
        }
        graph.insert(module.clone(), edges);
    }
    graph
}

/// A cycle through `from`, as module paths, if there is one.
fn cycle_through(graph: &BTreeMap<Module, BTreeSet<Module>>, from: &Module) -> Option<Vec<Module>> {
    let mut stack = vec![(from.clone(), vec![from.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in &graph[&at] {
            if next == from {
                let mut cycle = path.clone();
                cycle.push(from.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "lib".to_string()
    } else {
        m.join("/")
    }
}

#[test]
fn no_source_file_imports_a_file_that_imports_it_back() {
    let graph = import_graph();
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_through(&graph, m))
        .map(|c| c.iter().map(show).collect::<Vec<_>>().join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import circles:\n{}", cycles.join("\n"));
}

#[test]
fn the_engine_uses_only_parts_below_it() {
    let graph = import_graph();
    // The check above could pass on a graph it failed to read: make sure it sees the engine's
    // real edges, and that the engine does not use what spawns it.
    let queue = graph.get(&vec!["volume".to_string(), "queue".to_string()]).expect("volume/queue.rs");
    for below in [&["bitmap"][..], &["peer", "handoff"], &["peer", "link"], &["fencing", "shared"]] {
        let m: Module = below.iter().map(|s| s.to_string()).collect();
        assert!(queue.contains(&m), "volume/queue.rs should use {}: {queue:?}", show(&m));
    }
    for (module, edges) in graph.iter().filter(|(m, _)| m.first().is_some_and(|f| f == "volume")) {
        for e in edges {
            let upward = matches!(e.first().map(String::as_str), Some("lifecycle" | "control" | "node" | "frontend"))
                || e == &vec!["peer".to_string(), "connector".to_string()]
                || e == &vec!["resync".to_string(), "source".to_string()]
                || e == &vec!["bitmap".to_string(), "writer".to_string()];
            assert!(!upward, "{} uses {}, which drives the engine", show(module), show(e));
        }
    }
}
