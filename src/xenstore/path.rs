//! XenStore path rules (xenstored `is_valid_nodename`): absolute paths start with `/`,
//! relative ones are resolved under the caller's `/local/domain/<domid>`; components are
//! non-empty and use `[A-Za-z0-9-/_@]`; special watch paths start with `@`.

use super::wire::{ABS_PATH_MAX, REL_PATH_MAX};

/// Whether `c` may appear in a node name.
fn valid_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'@')
}

/// Resolves `path` for a connection whose home is `/local/domain/<domid>` and validates it.
/// Returns the absolute path, or `None` if xenstored would answer `EINVAL`.
pub fn canonicalize(path: &str, domid: u32) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let abs = if path.starts_with('/') {
        if path.len() > ABS_PATH_MAX {
            return None;
        }
        path.to_owned()
    } else {
        if path.len() > REL_PATH_MAX {
            return None;
        }
        format!("/local/domain/{domid}/{path}")
    };
    if abs == "/" {
        return Some(abs);
    }
    if abs.ends_with('/') || abs.contains("//") || !abs.bytes().all(valid_char) {
        return None;
    }
    Some(abs)
}

/// Whether `path` names a special watch (`@introduceDomain`, `@releaseDomain`).
pub fn is_special(path: &str) -> bool {
    path.starts_with('@')
}

/// The parent of an absolute path (`/a/b` -> `/a`, `/a` -> `/`), `None` for `/`.
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last component of an absolute path.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `child` is `parent` or lies below it.
pub fn is_subpath(parent: &str, child: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    child == parent
        || (child.len() > parent.len()
            && child.starts_with(parent)
            && child.as_bytes()[parent.len()] == b'/')
}

/// Joins a directory and a child name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        assert_eq!(canonicalize("/a/b", 0).as_deref(), Some("/a/b"));
        assert_eq!(
            canonicalize("device/vif", 5).as_deref(),
            Some("/local/domain/5/device/vif")
        );
        assert_eq!(canonicalize("/", 0).as_deref(), Some("/"));
        for bad in ["", "/a/", "/a//b", "/a b", "/a\u{e9}", "/a.b"] {
            assert_eq!(canonicalize(bad, 0), None, "{bad:?}");
        }
        assert_eq!(
            canonicalize(&format!("/{}", "a".repeat(ABS_PATH_MAX)), 0),
            None
        );
    }

    #[test]
    fn tree_helpers() {
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        assert_eq!(basename("/a/b"), "b");
        assert!(is_subpath("/a", "/a/b"));
        assert!(is_subpath("/a", "/a"));
        assert!(!is_subpath("/a", "/ab"));
        assert!(is_subpath("/", "/x"));
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
    }
}
