//! Path policy for git tree entries: decides whether a name, a relative path
//! or a symlink target is safe to materialise in a working tree.
//!
//! gitstore refuses hostile pushes with it, and the agent re-checks paths it
//! receives from diffs before writing files. The rules mirror git's own
//! `core.protectNTFS` / `core.protectHFS` checks, so a tree accepted here can
//! neither plant a `.git` directory nor escape the checkout, on Linux or on
//! Windows and macOS clients. Everything here is pure: no I/O, no git types.

use thiserror::Error;

/// Common file-system limit on one name (ext4, NTFS, APFS).
const MAX_NAME_LEN: usize = 255;
/// Linux `PATH_MAX`; longer targets cannot be followed anyway.
const MAX_TARGET_LEN: usize = 4096;

/// Why an entry is refused. The message names the problem; the caller adds the path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("empty names are not allowed")]
    Empty,
    #[error("`.` is not allowed as a name")]
    Dot,
    #[error("`..` is not allowed as a name")]
    DotDot,
    #[error("a name must not contain `/` or `\\`")]
    Separator,
    #[error("NUL bytes are not allowed")]
    Nul,
    #[error("control characters are not allowed")]
    Control,
    #[error("names longer than 255 bytes are not allowed")]
    TooLong,
    #[error("names of only dots and spaces are not allowed, Windows reads them as `.` or `..`")]
    DotsAndSpaces,
    #[error("`.git` in any spelling is reserved")]
    DotGit,
    #[error("absolute paths are not allowed")]
    Absolute,
    #[error("empty symlink targets are not allowed")]
    SymlinkEmpty,
    #[error("symlink targets longer than 4096 bytes are not allowed")]
    SymlinkTooLong,
    #[error("the symlink target points outside the repository")]
    SymlinkEscapes,
    #[error("a symlink target may use `..` only at its start, since an earlier directory may itself be a symlink")]
    SymlinkDotDotAfterName,
    #[error("the symlink target has a refused component: {0}")]
    SymlinkComponent(Box<PathError>),
}

/// Checks one tree entry name (a single path component as stored in a git tree, raw bytes).
pub fn check_component(name: &[u8]) -> Result<(), PathError> {
    match name {
        b"" => return Err(PathError::Empty),
        b"." => return Err(PathError::Dot),
        b".." => return Err(PathError::DotDot),
        _ => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Err(PathError::TooLong);
    }
    // NUL before the generic control check: it truncates C strings, which is
    // a different (worse) problem than a garbled terminal.
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    if name.iter().any(|&b| b == b'/' || b == b'\\') {
        return Err(PathError::Separator);
    }
    if name.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(PathError::Control);
    }
    // Windows strips trailing dots and spaces, so `...` or `. ` open `.`/`..`.
    if name.iter().all(|&b| b == b'.' || b == b' ') {
        return Err(PathError::DotsAndSpaces);
    }
    if is_dotgit(name) {
        return Err(PathError::DotGit);
    }
    Ok(())
}

/// Checks a symlink target (the blob contents) for a symlink located at
/// `link_path` (a '/'-joined path relative to the tree root, e.g. `b"src/lib/x"`).
///
/// The target must be relative and must stay inside the tree when resolved
/// from the link's parent directory. `..` is accepted only as a leading run:
/// the kernel resolves `..` physically, so `s/..` with `s -> .` would reach the
/// checkout's parent even though it looks harmless lexically. Named components
/// follow [`check_component`], so a link cannot point into the checkout's `.git`.
pub fn check_symlink_target(link_path: &[u8], target: &[u8]) -> Result<(), PathError> {
    // The depth below comes from link_path, so a malformed one must fail closed.
    check_relative_path(link_path)?;
    if target.is_empty() {
        return Err(PathError::SymlinkEmpty);
    }
    if target.len() > MAX_TARGET_LEN {
        return Err(PathError::SymlinkTooLong);
    }
    if target.contains(&0) {
        return Err(PathError::Nul);
    }
    // `C:...` is drive-relative or absolute for Windows clients.
    let drive = target.len() >= 2 && target[0].is_ascii_alphabetic() && target[1] == b':';
    if target[0] == b'/' || drive {
        return Err(PathError::Absolute);
    }
    // How many `..` the link's parent directory can afford before leaving the root.
    let mut depth = link_path.iter().filter(|&&b| b == b'/').count();
    let mut descended = false;
    for component in target.split(|&b| b == b'/') {
        match component {
            // POSIX treats `a//b` and `a/./b` as `a/b`.
            b"" | b"." => {}
            b".." if descended => return Err(PathError::SymlinkDotDotAfterName),
            b".." => depth = depth.checked_sub(1).ok_or(PathError::SymlinkEscapes)?,
            name => {
                check_component(name).map_err(|e| PathError::SymlinkComponent(Box::new(e)))?;
                descended = true;
            }
        }
    }
    Ok(())
}

/// Checks a whole relative path ('/'-separated) by checking each component; for the agent, which receives paths from diffs.
pub fn check_relative_path(path: &[u8]) -> Result<(), PathError> {
    // Say "absolute" rather than "empty name" for the leading empty component.
    if path.first() == Some(&b'/') {
        return Err(PathError::Absolute);
    }
    path.split(|&b| b == b'/').try_for_each(check_component)
}

/// True if `name` opens the `.git` directory on some client file system.
fn is_dotgit(name: &[u8]) -> bool {
    // HFS+ silently drops these code points, so `.g\u{200c}it` is `.git` on macOS.
    let stripped: String;
    let name = match std::str::from_utf8(name) {
        Ok(s) if !s.is_ascii() => {
            stripped = s.chars().filter(|&c| !is_hfs_ignorable(c)).collect();
            stripped.as_bytes()
        }
        _ => name,
    };
    // `git~1` is the NTFS 8.3 short name Windows gives `.git`.
    [b".git".as_slice(), b"git~1"].iter().any(|prefix| {
        name.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
            && is_ntfs_trailer(&name[prefix.len()..])
    })
}

/// NTFS ignores trailing dots and spaces, and `name:stream` opens a data
/// stream of `name` itself, so either trailer still addresses the directory.
fn is_ntfs_trailer(rest: &[u8]) -> bool {
    for &b in rest {
        match b {
            b':' => return true,
            b'.' | b' ' => {}
            _ => return false,
        }
    }
    true
}

/// The code points git's `is_hfs_dotgit` skips.
fn is_hfs_ignorable(c: char) -> bool {
    matches!(c, '\u{200C}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{206A}'..='\u{206F}' | '\u{FEFF}')
}

/// A client's path as it may be shown back in a refusal: control characters escaped, so a
/// refusal cannot carry terminal escapes to the pusher's terminal (git's `remote:` lines), a log
/// or a console.
pub(crate) fn printable(path: &str) -> String {
    path.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use PathError::*;

    #[test]
    fn refuses_hostile_names() {
        let long = "a".repeat(256);
        // Spellings are '|'-separated to keep the table compact.
        let cases = [
            (Empty, ""),
            (Dot, "."),
            (DotDot, ".."),
            (Separator, "a/b|/etc|a\\b|C:\\x|\\"),
            (Nul, "a\0b|\0"),
            (Control, "a\nb|a\tb|\x1b[31mred|del\x7f"),
            (TooLong, &long),
            (DotsAndSpaces, "...|....|. |.. | "),
            (
                DotGit,
                ".git|.GIT|.Git|.git.|.GIT |.git. .|.git...|git~1|GIT~1|Git~1. ",
            ),
            (
                DotGit,
                ".git::$INDEX_ALLOCATION|.git:foo|.git. :x|git~1:$DATA",
            ),
            (
                DotGit,
                ".g\u{200c}it|\u{feff}.git|.gi\u{200d}t|.GIT\u{206a}|.\u{202a}git\u{200f}.",
            ),
        ];
        for (want, names) in cases {
            for name in names.split('|') {
                assert_eq!(
                    check_component(name.as_bytes()),
                    Err(want.clone()),
                    "{name:?}"
                );
            }
        }
    }

    #[test]
    fn refuses_non_utf8_control_and_length_by_bytes() {
        assert_eq!(check_component(b"\xff\x01"), Err(Control));
        assert_eq!(check_component("é".repeat(128).as_bytes()), Err(TooLong));
    }

    #[test]
    fn accepts_ordinary_names() {
        let names = ".gitignore|.github|.gitkeep|git|.gitattributes|.gitmodules|..foo|foo..bar\
            |node_modules|é.txt|日本語|git~2|git~10|.git~1|.git-foo|a.git|g\u{200c}it|foo.|a:b|\u{200c}";
        let max = "a".repeat(255);
        for name in names.split('|').chain([max.as_str()]) {
            assert_eq!(check_component(name.as_bytes()), Ok(()), "{name:?}");
        }
        assert_eq!(check_component(b"\xff\xfe"), Ok(()));
    }

    #[test]
    fn relative_paths() {
        let cases: &[(&str, Result<(), PathError>)] = &[
            ("a/b/c", Ok(())),
            ("src/é.rs", Ok(())),
            (".github/workflows/ci.yml", Ok(())),
            ("", Err(Empty)),
            ("/a", Err(Absolute)),
            ("a//b", Err(Empty)),
            ("a/", Err(Empty)),
            ("a/../b", Err(DotDot)),
            ("./a", Err(Dot)),
            ("a/.git/config", Err(DotGit)),
            ("a\\..\\b", Err(Separator)),
        ];
        for (path, want) in cases {
            assert_eq!(&check_relative_path(path.as_bytes()), want, "{path:?}");
        }
    }

    #[test]
    fn symlink_targets() {
        let comp = |e| Err(SymlinkComponent(Box::new(e)));
        let long = "a/".repeat(2049);
        let cases: &[(&str, &str, Result<(), PathError>)] = &[
            ("link", "../x", Err(SymlinkEscapes)),
            ("a/link", "../x", Ok(())),
            ("a/link", "..", Ok(())),
            ("link", "a/../../x", Err(SymlinkDotDotAfterName)),
            ("link", "/etc/shadow", Err(Absolute)),
            ("link", "C:/Windows", Err(Absolute)),
            ("link", "./x", Ok(())),
            ("link", ".", Ok(())),
            ("link", "x//y/", Ok(())),
            // Lexically this is `a/y`, but `x` could be a symlink (say to `.`)
            // and the kernel would then climb physically: refused.
            ("a/b/link", "x/../../y", Err(SymlinkDotDotAfterName)),
            ("a/b/link", "../../y", Ok(())),
            ("a/b/link", "../../../y", Err(SymlinkEscapes)),
            ("a/b/link", "./.././../y/./z", Ok(())),
            ("link", "", Err(SymlinkEmpty)),
            ("link", "a\0b", Err(Nul)),
            ("link", &long, Err(SymlinkTooLong)),
            ("a/link", "../.git/config", comp(DotGit)),
            ("link", "x/GIT~1", comp(DotGit)),
            ("link", "..\\..\\x", comp(Separator)),
            ("link", "x/...", comp(DotsAndSpaces)),
            ("link", "x\ny", comp(Control)),
            ("../link", "x", Err(DotDot)),
            ("/link", "x", Err(Absolute)),
        ];
        for (link, target, want) in cases {
            let got = check_symlink_target(link.as_bytes(), target.as_bytes());
            assert_eq!(&got, want, "{link:?} -> {target:?}");
        }
    }

    #[test]
    fn messages_are_sentences() {
        assert_eq!(DotGit.to_string(), "`.git` in any spelling is reserved");
        let nested = SymlinkComponent(Box::new(DotGit)).to_string();
        assert!(nested.ends_with("any spelling is reserved"), "{nested}");
    }

    /// Independent lexical resolver: `None` if the target climbs above the root.
    fn resolve(link: &[String], target: &[String]) -> Option<Vec<String>> {
        let mut dir = link[..link.len() - 1].to_vec();
        for c in target {
            match c.as_str() {
                "." => {}
                ".." => {
                    dir.pop()?;
                }
                _ => dir.push(c.clone()),
            }
        }
        Some(dir)
    }

    proptest! {
        #[test]
        fn plain_names_accepted(name in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}") {
            let lower = name.to_ascii_lowercase();
            prop_assume!(!lower.starts_with(".git") && !lower.starts_with("git~1"));
            prop_assert_eq!(check_component(name.as_bytes()), Ok(()));
        }

        #[test]
        fn slash_or_nul_refused(
            pre in proptest::collection::vec(any::<u8>(), 0..20),
            bad in prop_oneof![Just(b'/'), Just(0u8)],
            post in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let name = [pre, vec![bad], post].concat();
            prop_assert!(check_component(&name).is_err());
        }

        #[test]
        fn relative_path_never_panics(path in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = check_relative_path(&path);
        }

        #[test]
        fn accepted_targets_stay_inside(
            link in proptest::collection::vec("[a-z]{1,5}", 1..5),
            target in proptest::collection::vec("[a-z]{1,5}|\\.\\.|\\.", 1..8),
        ) {
            let verdict = check_symlink_target(link.join("/").as_bytes(), target.join("/").as_bytes());
            let resolved = resolve(&link, &target);
            if verdict.is_ok() {
                prop_assert!(resolved.is_some(), "accepted but escapes: {:?} -> {:?}", link, target);
            }
            if resolved.is_none() {
                prop_assert!(verdict.is_err());
            }
        }
    }
}
