//! The module graph follows the data path (docs/ARCHITECTURE.md): each
//! top-level module imports only those below it, `wire` never reaches guest
//! memory, and `migration` (the machines) touches neither `transport` nor
//! tokio nor sockets. Read from the sources, so an import that breaks the
//! order fails here, naming the file.

use std::path::{Path, PathBuf};

/// The top-level modules, lowest first. A module may import only those of
/// a lower rank.
const RANKS: &[(&str, u32)] = &[
    ("units", 0),
    ("cpu", 0),
    ("page", 0),
    ("memory", 1),
    ("kvm", 2),
    ("codec", 3),
    ("digest", 4),
    ("wire", 5),
    ("migration", 6),
    ("transport", 7),
    ("agent", 8),
    ("bench", 9),
    ("fuzz", 10),
];

/// What `wire` may import: it owns its own page-size constant.
const WIRE_MAY: &[&str] = &["units", "cpu", "page", "codec"];

fn rank(top: &str) -> Option<u32> {
    RANKS.iter().find(|(n, _)| *n == top).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's module path under `src/` (`migration/sim/net.rs` is
/// `["migration", "sim", "net"]`; a `mod.rs` names its folder).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// The top-level modules a line's paths reach (`crate::x`, or enough
/// `super::` to climb to the crate root).
fn reached(line: &str, depth: usize) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        match rest.strip_prefix('{') {
            // `crate::{a::X, b}`: each item's first name (a group that
            // spans lines is refused by the caller).
            Some(group) => out.extend(
                group
                    .split(['}', ','])
                    .map(|item| ident(item.trim()))
                    .filter(|n| !n.is_empty()),
            ),
            None => out.push(ident(rest)),
        }
    }
    if depth > 0 {
        let climb = "super::".repeat(depth);
        for (i, _) in code.match_indices(&climb) {
            let before = code[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[i + climb.len()..];
            if !rest.starts_with("super::") {
                out.push(ident(rest));
            }
        }
    }
    out
}

#[test]
fn imports_run_down_the_data_path_and_the_machines_do_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let path = module_path(rel);
        let top = path[0].as_str();
        // The binary (main.rs, cli/) and the crate root may import anything;
        // any other module must have its place in the order.
        if ["main", "lib", "cli"].contains(&top) {
            continue;
        }
        let Some(own) = rank(top) else {
            wrong.push(format!("{}: module {top} has no rank", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let at = format!("{}:{}", rel.display(), n + 1);
            let code = line.split("//").next().unwrap_or("");
            if code.trim_end().ends_with("crate::{") {
                wrong.push(format!(
                    "{at}: a crate:: group over lines (write one per line)"
                ));
            }
            for to in reached(line, path.len()) {
                seen += 1;
                let Some(r) = rank(&to) else {
                    // A climb of `super::` inside an inline module (tests)
                    // lands in the file's own module: only `crate::` names
                    // a top-level module for sure.
                    let named = code.contains(&format!("crate::{to}")) || code.contains("crate::{");
                    if named && !to.is_empty() {
                        wrong.push(format!("{at}: {top} imports {to}, which has no rank"));
                    }
                    continue;
                };
                if to == top {
                    continue;
                }
                if r >= own {
                    wrong.push(format!("{at}: {top} imports {to}, which is not below it"));
                }
                if top == "wire" && !WIRE_MAY.contains(&to.as_str()) {
                    wrong.push(format!("{at}: wire imports {to}"));
                }
            }
            if top == "migration"
                && ["tokio", "TcpStream", "TcpListener", "std::net::"]
                    .iter()
                    .any(|w| code.contains(w))
            {
                wrong.push(format!("{at}: the machines do IO: {}", code.trim()));
            }
        }
    }
    assert!(
        seen > 100,
        "read {} files, found {seen} imports",
        files.len()
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_both_kinds_of_path() {
    assert_eq!(reached("use crate::wire::Frame;", 2), ["wire"]);
    assert_eq!(reached("use super::super::memory::X;", 2), ["memory"]);
    assert_eq!(reached("use super::sibling::X;", 2), Vec::<String>::new());
    assert_eq!(
        reached("// crate::agent in a comment", 1),
        Vec::<String>::new()
    );
    assert_eq!(
        module_path(Path::new("migration/sim/mod.rs")),
        ["migration", "sim"]
    );
    assert_eq!(
        reached("use crate::{transport::Conn, wire};", 1),
        ["transport", "wire"]
    );
}
