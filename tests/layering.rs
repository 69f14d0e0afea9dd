//! The crate's layering, checked: data flows one way, and a module never imports one above it.
//!
//! Every top-level module of `src/` has a layer (the table below). A `crate::…` path in a
//! module's code may name only modules of its own layer or lower; two features on the same
//! layer (attribution, DNS) never name each other. Within the crate, no two modules import each
//! other in a cycle (a child reaching its own ancestors is fine; siblings that import each
//! other are not). A new top-level module must be placed in the table before this test passes.
//!
//! The check reads the source as text (no root, no build of the crate under test): comments
//! are dropped, then every `crate::…` and `super::…` path is resolved against the module
//! tree that the file layout defines. Test code (`tests.rs` files and `#[cfg(test)] mod`
//! blocks) is left out: a unit test may build its fixtures with a higher layer's helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest layer first. Higher layers may import lower ones, never the other
/// way round. Modules on one line share a layer and may not import each other, except the pairs
/// in [`SAME_LAYER_ALLOWED`].
const LAYERS: &[&[&str]] = &[
    // Leaves: netlink framing, the validated configuration (no system access), and the change
    // flag each event watcher marks.
    &["wire", "config", "change_flag"],
    // What exists on the cell: silk's store, the kernel's routes and links.
    &["inventory"],
    // Pure: (config, inventory) -> desired rules and a decision per container.
    &["policy"],
    // The agent's nf_tables tables: model, smallest change, messages, socket.
    &["dataplane"],
    // Features built on the dataplane; neither knows the other.
    &["attribution", "dns"],
    // Blocked attempts as lines in the apps' own log streams (Loggregator), from attribution.
    &["app_logs"],
    // What the loop reports: the status snapshot and the metric registry the loop records into.
    &["status", "metrics"],
    // The loop: events + timer -> one pass -> at most one batch.
    &["reconcile"],
    // The HTTP endpoint of a running agent.
    &["health"],
    // Its client (`status`, `explain`, `blocked`), which reads the endpoint's bodies.
    &["client"],
    // The one place that starts and wires the daemon's tasks.
    &["daemon"],
    // The command line.
    &["cli"],
];

/// Same-layer imports that are allowed: (importer, imported).
const SAME_LAYER_ALLOWED: &[(&str, &str)] = &[
    // Metrics render the status the loop publishes (at scrape time).
    ("metrics", "status"),
];

/// Files outside the layering: the crate root declares every module, `main` only calls `cli`.
const UNLAYERED: &[&str] = &["lib", "main"];

/// One import found in a file: the module path that names it, and the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    module: Vec<String>,
    line: usize,
}

/// A module of the crate: its path (`["inventory", "store", "chunked"]`) and its source file.
#[derive(Debug, Clone)]
struct Module {
    path: Vec<String>,
    file: PathBuf,
    source: String,
}

fn crate_modules() -> Vec<Module> {
    read_modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn assert_clean(what: &str, result: Result<(), Vec<String>>) {
    if let Err(problems) = result {
        panic!("{what}:\n  {}", problems.join("\n  "));
    }
}

#[test]
fn no_module_imports_a_higher_layer() {
    assert_clean("layering violations", check_layers(&crate_modules()));
}

#[test]
fn no_import_cycles_between_modules() {
    assert_clean("import cycles", check_cycles(&crate_modules()));
}

#[test]
fn the_checker_finds_what_it_looks_for() {
    let failures: Vec<String> = self_checks()
        .into_iter()
        .filter_map(|(name, result)| result.err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "checker self-checks failed:\n  {}",
        failures.join("\n  ")
    );
}

/// Every `.rs` file below `root`, as a module of the crate.
fn read_modules(root: &Path) -> Vec<Module> {
    let mut files = Vec::new();
    collect_rs(root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let source = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let relative = file.strip_prefix(root).expect("below src");
            Module {
                path: module_path(relative),
                file,
                source,
            }
        })
        .collect()
}

fn collect_rs(dir: &Path, into: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rs(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// `inventory/store/mod.rs` -> `[inventory, store]`; `dns/filter.rs` -> `[dns, filter]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut path: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

/// The source without comments (line comments, doc comments, block comments) and string
/// literals, so a doc link or a message that names a module is not an import.
fn code_only(source: &str) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(source.len());
    let bytes = source.as_bytes();
    let mut i = 0;
    let mut block_depth = 0usize;
    let mut in_string = false;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if block_depth > 0 {
            if rest.starts_with(b"*/") {
                block_depth -= 1;
                i += 2;
            } else if rest.starts_with(b"/*") {
                block_depth += 1;
                i += 2;
            } else {
                if bytes[i] == b'\n' {
                    out.push(b'\n');
                }
                i += 1;
            }
            continue;
        }
        if in_string {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    out.push(b'"');
                    i += 1;
                }
                b'\n' => {
                    out.push(b'\n');
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        if rest.starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if rest.starts_with(b"/*") {
            block_depth = 1;
            i += 2;
            continue;
        }
        if bytes[i] == b'"' && !is_char_literal_quote(bytes, i) {
            in_string = true;
            out.push(b'"');
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The code without its `#[cfg(test)] mod … { … }` blocks (blanked, so line numbers stay).
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(at) = out[from..].find("#[cfg(test)]") {
        let start = from + at;
        let after = out[start + "#[cfg(test)]".len()..].trim_start();
        let after = ["pub(crate) ", "pub(super) ", "pub "]
            .iter()
            .find_map(|vis| after.strip_prefix(vis))
            .unwrap_or(after);
        let is_inline_module = after.starts_with("mod ")
            && after
                .find(['{', ';'])
                .is_some_and(|i| after.as_bytes()[i] == b'{');
        if !is_inline_module {
            from = start + 1;
            continue;
        }
        let Some(open) = out[start..].find('{').map(|i| start + i) else {
            break;
        };
        let close = matching_brace(&out[open + 1..]).map_or(out.len(), |i| open + 1 + i + 1);
        let blanked: String = out[start..close]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(start..close, &blanked);
        from = start + blanked.len();
    }
    out
}

/// `'"'` is a character literal, not the start of a string.
fn is_char_literal_quote(bytes: &[u8], i: usize) -> bool {
    i > 0 && bytes[i - 1] == b'\'' && bytes.get(i + 1) == Some(&b'\'')
}

/// Every module path a file's code names, resolved to absolute crate paths: `crate::a::b`,
/// `super::x` (relative to the file's module), and the paths inside `use crate::a::{b, c::d}`.
fn imports(module: &Module) -> Vec<Import> {
    if module.path.last().is_some_and(|last| last == "tests") {
        return Vec::new();
    }
    let code = without_test_modules(&code_only(&module.source));
    let mut found = Vec::new();
    for (index, line) in code.lines().enumerate() {
        for start in path_starts(line) {
            for path in expand_path(&line[start..]) {
                if let Some(resolved) = resolve(&module.path, &path) {
                    found.push(Import {
                        module: resolved,
                        line: index + 1,
                    });
                }
            }
        }
    }
    found
}

/// Where `crate::` or `super::` paths start on a line (not inside a longer identifier).
fn path_starts(line: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    for keyword in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = line[from..].find(keyword) {
            let start = from + at;
            let preceded_by_ident = line[..start]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
            if !preceded_by_ident {
                starts.push(start);
            }
            from = start + keyword.len();
        }
    }
    starts
}

/// The segment lists a path expression names, expanding one level of `{a, b::c}` groups:
/// `crate::x::{y, z::w}` -> `[crate,x,y]`, `[crate,x,z,w]`.
fn expand_path(text: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        segments.push(rest[..end].to_string());
        rest = &rest[end..];
        if let Some(after) = rest.strip_prefix("::") {
            rest = after;
            if let Some(group) = rest.strip_prefix('{') {
                let close = matching_brace(group).unwrap_or(group.len());
                return split_group(&group[..close])
                    .into_iter()
                    .flat_map(|item| {
                        expand_path(item.trim()).into_iter().map(|tail| {
                            let mut full = segments.clone();
                            full.extend(tail);
                            full
                        })
                    })
                    .chain(std::iter::once(segments.clone()))
                    .collect();
            }
        } else {
            break;
        }
    }
    vec![segments]
}

fn matching_brace(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn split_group(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// An absolute path for `segments` as written in the module `from`, or `None` for a path that
/// does not start at the crate root or a parent (`std::…`, a local name).
fn resolve(from: &[String], segments: &[String]) -> Option<Vec<String>> {
    let mut resolved: Vec<String>;
    let mut rest = segments;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            resolved = Vec::new();
            rest = &rest[1..];
        }
        Some("super") => {
            resolved = from.to_vec();
            while rest.first().is_some_and(|s| s == "super") {
                resolved.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    resolved.extend(rest.iter().filter(|s| *s != "self").cloned());
    Some(resolved)
}

/// The longest prefix of `path` that is a module of the crate (a file), if any.
fn owning_module<'a>(known: &'a BTreeSet<Vec<String>>, path: &[String]) -> Option<&'a Vec<String>> {
    (1..=path.len()).rev().find_map(|n| known.get(&path[..n]))
}

fn layer_of(top: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&top))
}

/// Every import of a higher layer, or of another module on the same layer, as a message.
fn check_layers(modules: &[Module]) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for module in modules {
        let Some(top) = module.path.first() else {
            continue;
        };
        if UNLAYERED.contains(&top.as_str()) {
            continue;
        }
        let Some(own_layer) = layer_of(top) else {
            problems.push(format!(
                "{}: top-level module `{top}` has no layer: place it in LAYERS (tests/layering.rs)",
                module.file.display()
            ));
            continue;
        };
        for import in imports(module) {
            let Some(target) = import.module.first() else {
                continue;
            };
            if target == top {
                continue;
            }
            let Some(target_layer) = layer_of(target) else {
                if !UNLAYERED.contains(&target.as_str()) {
                    problems.push(format!(
                        "{}:{}: imports `{}`, which has no layer",
                        module.file.display(),
                        import.line,
                        import.module.join("::")
                    ));
                }
                continue;
            };
            let allowed = target_layer < own_layer
                || (target_layer == own_layer
                    && SAME_LAYER_ALLOWED.contains(&(top.as_str(), target.as_str())));
            if !allowed {
                problems.push(format!(
                    "{}:{}: `{top}` (layer {own_layer}) imports `{}` (layer {target_layer}): a module imports only lower layers",
                    module.file.display(),
                    import.line,
                    import.module.join("::")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Cycles between modules: edges are imports of another module that is not the importer's own
/// ancestor or descendant (a parent declares and re-exports its children; a child may use its
/// parent's types). What is left must be acyclic.
fn check_cycles(modules: &[Module]) -> Result<(), Vec<String>> {
    let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for module in modules {
        let from = &module.path;
        let entry = edges.entry(from.clone()).or_default();
        for import in imports(module) {
            let Some(to) = owning_module(&known, &import.module) else {
                continue;
            };
            if to.starts_with(from) || from.starts_with(to) {
                continue;
            }
            entry.insert(to.clone());
        }
    }
    let mut problems = Vec::new();
    let mut state: BTreeMap<Vec<String>, Visit> = BTreeMap::new();
    let mut stack = Vec::new();
    for start in edges.keys() {
        find_cycles(start, &edges, &mut state, &mut stack, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    Open,
    Done,
}

fn find_cycles(
    node: &Vec<String>,
    edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    state: &mut BTreeMap<Vec<String>, Visit>,
    stack: &mut Vec<Vec<String>>,
    problems: &mut Vec<String>,
) {
    match state.get(node) {
        Some(Visit::Done) => return,
        Some(Visit::Open) => {
            let from = stack.iter().position(|n| n == node).unwrap_or(0);
            let cycle: Vec<String> = stack[from..]
                .iter()
                .chain(std::iter::once(node))
                .map(|p| p.join("::"))
                .collect();
            problems.push(format!("import cycle: {}", cycle.join(" -> ")));
            return;
        }
        None => {}
    }
    state.insert(node.clone(), Visit::Open);
    stack.push(node.clone());
    if let Some(targets) = edges.get(node) {
        for target in targets {
            find_cycles(target, edges, state, stack, problems);
        }
    }
    stack.pop();
    state.insert(node.clone(), Visit::Done);
}

/// Positive controls: the checker finds what it is there to find, on small synthetic trees.
fn self_checks() -> Vec<(&'static str, Result<(), String>)> {
    fn module(path: &str, source: &str) -> Module {
        Module {
            path: path.split('/').map(String::from).collect(),
            file: PathBuf::from(format!("src/{path}.rs")),
            source: source.to_string(),
        }
    }
    fn expect_problem(result: Result<(), Vec<String>>, needle: &str) -> Result<(), String> {
        match result {
            Ok(()) => Err(format!(
                "no problem reported; expected one mentioning {needle:?}"
            )),
            Err(problems) if problems.iter().any(|p| p.contains(needle)) => Ok(()),
            Err(problems) => Err(format!("expected {needle:?} in {problems:?}")),
        }
    }
    vec![
        (
            "upward_import_is_reported",
            expect_problem(
                check_layers(&[
                    module(
                        "policy",
                        "use crate::config::Config;\nuse crate::reconcile::Reconciler;",
                    ),
                    module("reconcile", ""),
                ]),
                "imports `reconcile::Reconciler`",
            ),
        ),
        (
            "grouped_upward_import_is_reported",
            expect_problem(
                check_layers(&[module(
                    "inventory",
                    "use crate::{config, dataplane::model::X};",
                )]),
                "imports `dataplane::model::X`",
            ),
        ),
        (
            "sideways_feature_import_is_reported",
            expect_problem(
                check_layers(&[module("attribution", "fn f(_: crate::dns::Refusal) {}")]),
                "imports `dns::Refusal`",
            ),
        ),
        ("downward_import_passes", {
            check_layers(&[module(
                "reconcile",
                "use crate::{config::Config, inventory::store, policy};\n// crate::cli in a comment\nconst S: &str = \"crate::cli\";",
            )])
            .map_err(|p| format!("{p:?}"))
        }),
        (
            "unplaced_module_is_reported",
            expect_problem(check_layers(&[module("newthing", "")]), "has no layer"),
        ),
        (
            "sibling_cycle_is_reported",
            expect_problem(
                check_cycles(&[
                    module(
                        "inventory/store",
                        "mod chunked; mod incremental; use chunked::X;",
                    ),
                    module("inventory/store/chunked", "use super::incremental::Index;"),
                    module("inventory/store/incremental", "use super::chunked::Parse;"),
                ]),
                "import cycle",
            ),
        ),
        ("test_code_is_left_out", {
            check_cycles(&[
                module("dataplane/plan", "use super::batch::Op;"),
                module(
                    "dataplane/batch",
                    "fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::dataplane::plan;\n}\n",
                ),
                module("dataplane/dump/tests", "use crate::dataplane::plan;"),
                module(
                    "dataplane/dump",
                    "#[cfg(test)]\nmod tests;\nuse super::plan::x;",
                ),
            ])
            .map_err(|p| format!("{p:?}"))
        }),
        ("child_using_parent_is_no_cycle", {
            check_cycles(&[
                module(
                    "inventory/store",
                    "pub use self::parse::Entry;\nuse crate::inventory::store::parse::x;",
                ),
                module("inventory/store/parse", "use super::Sink;"),
            ])
            .map_err(|p| format!("{p:?}"))
        }),
    ]
}
