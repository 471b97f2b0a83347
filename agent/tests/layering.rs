//! The agent's modules keep the layering its crate documentation states:
//! the table in `src/lib.rs` lists them bottom-up, and the code outside
//! tests of each module may use only modules listed before it. This fails
//! on an import cycle (one of its edges points up) and on a module the
//! table does not place.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The modules in the order of the crate documentation's layer table.
fn documented_order() -> Vec<String> {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    let mut order = Vec::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//! |")) {
        let Some(modules) = line.split('|').nth(1) else {
            continue;
        };
        for name in modules.split(',') {
            if let Some(name) = name
                .trim()
                .strip_prefix("[`")
                .and_then(|n| n.strip_suffix("`]"))
            {
                order.push(name.to_owned());
            }
        }
    }
    order
}

/// Each top-level module (`src/x.rs` or `src/x/`) and the rust files it is made of.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src()).expect("src/") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .expect("a UTF-8 name")
            .to_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let files = if path.is_dir() {
            rust_files(&path)
        } else {
            vec![path]
        };
        modules.entry(name).or_default().extend(files);
    }
    modules
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("a module directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level modules `code` names through `crate::`: in paths
/// (`crate::a::b`) and in groups (`use crate::{a, b::{c, d}}`).
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut segment_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && segment_start && (c.is_alphanumeric() || c == '_') {
                    word.push(c);
                    continue;
                }
                if !word.is_empty() {
                    found.insert(std::mem::take(&mut word));
                    segment_start = false;
                }
                if depth == 1 && c == ',' {
                    segment_start = true;
                }
            }
        } else {
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !word.is_empty() {
                found.insert(word);
            }
        }
    }
    found
}

/// A file's code outside its tests (the test module comes last, by convention).
fn non_test_code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("a source file");
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let order = documented_order();
    let modules = modules();
    let placed: BTreeSet<&String> = order.iter().collect();
    let missing: Vec<&String> = modules.keys().filter(|m| !placed.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "the layer table in src/lib.rs does not place {missing:?}"
    );
    let stale: Vec<&String> = order.iter().filter(|m| !modules.contains_key(*m)).collect();
    assert!(
        stale.is_empty(),
        "the layer table in src/lib.rs names modules that do not exist: {stale:?}"
    );
    let rank = |module: &str| order.iter().position(|m| m == module);
    let mut upward = Vec::new();
    for (module, files) in &modules {
        let own = rank(module).expect("placed above");
        for file in files {
            for used in crate_references(&non_test_code(file)) {
                let Some(used_rank) = rank(&used) else {
                    continue;
                };
                if used != *module && used_rank > own {
                    upward.push(format!(
                        "{} uses crate::{used}, which is above {module}",
                        file.strip_prefix(src()).unwrap_or(file).display()
                    ));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up the layers (or round in a cycle):\n{}",
        upward.join("\n")
    );
}

#[test]
fn references_are_found_in_paths_and_groups() {
    let code = "use crate::{a, b::{c, d}, e::f};\nfn x() { crate::g::h(); }";
    let found: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "e", "g"]);
}
