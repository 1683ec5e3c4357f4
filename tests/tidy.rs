//! Repository hygiene checked by `cargo test`: every Rust file opens with a `//!` line
//! saying what it is for (rust-analyzer's tidy rule).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(root, &mut files);
    assert!(files.len() > 10, "found only {files:?}");
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().starts_with("//!"))
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! line: {missing:#?}"
    );
}

/// The gateway's modules (file paths under `gateway/src`, without `.rs` and `/mod`) and
/// the modules each one names through `use crate::…` or `crate::…::`, tests left out.
fn gateway_imports() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module = |p: &Path| {
        let rel = p.strip_prefix(&src).unwrap().with_extension("");
        let name = rel.to_string_lossy().replace('\\', "/");
        name.strip_suffix("/mod").unwrap_or(&name).to_owned()
    };
    let modules: std::collections::BTreeSet<String> = files.iter().map(|f| module(f)).collect();
    let mut graph = std::collections::BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut deps = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let path: String = text[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let parts: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            // The longest prefix that is a module of the crate.
            if let Some(m) = (1..=parts.len())
                .rev()
                .map(|k| parts[..k].join("/"))
                .find(|m| modules.contains(m))
            {
                deps.insert(m);
            }
        }
        let me = module(file);
        deps.remove(&me);
        graph.insert(me, deps);
    }
    graph
}

#[test]
fn the_gateway_has_no_import_cycles() {
    let graph = gateway_imports();
    assert!(graph.len() > 20, "found only {graph:?}");
    // Depth-first search for a back edge; the cycle found is printed whole.
    fn visit(
        m: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(m.to_owned());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_owned());
        for dep in graph.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(m.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle in the gateway: {}", cycle.join(" -> "));
        }
    }
    // metrics is a leaf: it knows prometheus and the outcome it labels, nothing else.
    assert_eq!(
        graph["metrics"].iter().collect::<Vec<_>>(),
        ["error"],
        "metrics should name only error::Outcome"
    );
}
