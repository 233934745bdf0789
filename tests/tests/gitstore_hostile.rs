//! Hostile pushes, one test each: trees built with git plumbing (`hash-object -w`, `mktree`,
//! `mktree --missing`, `hash-object -t tree --literally` for bytes mktree refuses, `commit-tree`)
//! that would plant a `.git`, escape the checkout, or break a limit; refs outside branches and
//! tags; malformed objects; invalid project ids. Each must be refused with the offending path (or
//! rule) in what `git push` prints, and must leave the store exactly as it was.

use kiln_tests::*;

/// A node with `project` seeded by one small clean commit, and a scratch repo holding that commit.
struct Case {
    node: Gitstore,
    token: String,
    repo: Repo,
    seed: String,
    _work: tempfile::TempDir,
}

const PROJECT: &str = "target";

impl Case {
    fn new() -> Self {
        Self::with(Options::default())
    }

    fn with(opts: Options) -> Self {
        let node = Gitstore::start_with(opts);
        let token = node.create_client("generator");
        let work = tempfile::tempdir().unwrap();
        let repo = Repo::init(&work.path().join("repo"));
        let seed = repo.commit_file("README.md", "seed\n");
        let out = repo.push(&node.git_url(&token, PROJECT), &["main"]);
        assert!(
            out.ok,
            "the clean seed push was refused, so the server refuses everything:\n{}",
            out.stderr
        );
        Self {
            node,
            token,
            repo,
            seed,
            _work: work,
        }
    }

    fn blob(&self, content: &[u8]) -> String {
        let out = self
            .repo
            .git_with_input(&["hash-object", "-w", "--stdin"], content);
        assert!(out.ok, "hash-object: {}", out.stderr);
        out.stdout.trim().to_owned()
    }

    /// `git mktree -z [--missing]` from (mode, type, id, name) entries.
    fn mktree(&self, entries: &[(&str, &str, &str, &str)], missing: bool) -> String {
        let mut input = Vec::new();
        for (mode, kind, id, name) in entries {
            input.extend_from_slice(format!("{mode} {kind} {id}\t{name}\0").as_bytes());
        }
        let mut args = vec!["mktree", "-z"];
        if missing {
            args.push("--missing");
        }
        let out = self.repo.git_with_input(&args, &input);
        assert!(out.ok, "mktree {entries:?}: {}", out.stderr);
        out.stdout.trim().to_owned()
    }

    /// A tree object written byte for byte (`hash-object -t tree --literally`), for entries
    /// `git mktree` refuses to write. Entries are written in the order given.
    fn literal_tree(&self, entries: &[(&str, &[u8], &str)]) -> String {
        let mut raw = Vec::new();
        for (mode, name, id) in entries {
            raw.extend_from_slice(mode.as_bytes());
            raw.push(b' ');
            raw.extend_from_slice(name);
            raw.push(0);
            raw.extend_from_slice(&hex::decode(id).expect("hex object id"));
        }
        let out = self.repo.git_with_input(
            &["hash-object", "-t", "tree", "--literally", "-w", "--stdin"],
            &raw,
        );
        assert!(out.ok, "hash-object --literally: {}", out.stderr);
        out.stdout.trim().to_owned()
    }

    /// A one-file directory tree (`config` inside), the typical payload of a planted `.git`.
    fn config_dir(&self) -> String {
        let cfg = self.blob(b"[core]\n\tfsmonitor = touch /tmp/pwned\n");
        self.mktree(&[("100644", "blob", &cfg, "config")], false)
    }

    fn commit(&self, tree: &str, parent: &str) -> String {
        self.repo
            .git_ok(&["commit-tree", tree, "-p", parent, "-m", "hostile commit"])
    }

    /// Pushes `refspecs`, asserts git reports failure, that main still points at the seed and
    /// that not one file under the project's store prefix changed; returns git's stderr.
    fn refused(&self, refspecs: &[&str]) -> String {
        let store = self.node.store_dir();
        let before = store_snapshot(&store, PROJECT);
        assert_eq!(generation(&store, PROJECT), 1);
        let url = self.node.git_url(&self.token, PROJECT);
        let out = self.repo.push(&url, refspecs);
        assert!(
            !out.ok,
            "hostile push {refspecs:?} was accepted:\n{}",
            out.stderr
        );
        assert_eq!(
            store_snapshot(&store, PROJECT),
            before,
            "a refused push changed the store (manifest generation or packs)"
        );
        assert_eq!(generation(&store, PROJECT), 1);
        let ls = self.repo.git_ok(&["ls-remote", &url, "refs/heads/main"]);
        assert!(ls.starts_with(&self.seed), "main moved: {ls}");
        out.stderr
    }

    /// Commits `tree` on the current main and pushes it; panics unless the push is accepted.
    fn accepted(&self, tree: &str) {
        let url = self.node.git_url(&self.token, PROJECT);
        let main = self.repo.git_ok(&["ls-remote", &url, "refs/heads/main"]);
        let parent = main.split('\t').next().unwrap().to_owned();
        let commit = self.commit(tree, &parent);
        let out = self
            .repo
            .push(&url, &[&format!("{commit}:refs/heads/main")]);
        assert!(
            out.ok,
            "a push within the limits was refused:\n{}",
            out.stderr
        );
    }

    /// Builds a commit on the seed with `tree`, pushes it to main, and asserts the refusal names
    /// `path` as the hook reports it (`push refused: <path>: <reason>`).
    fn refuses_tree_naming(&self, tree: &str, path: &str) -> String {
        let commit = self.commit(tree, &self.seed);
        let err = self.refused(&[&format!("{commit}:refs/heads/main")]);
        assert!(
            err.contains(&format!("push refused: {path}: ")),
            "expected the refusal to name {path:?}; git printed:\n{err}"
        );
        err
    }
}

/// Tree `{ <name>/config }` with a directory name mktree accepts.
fn refuses_directory_named(name: &str) {
    let c = Case::new();
    let inner = c.config_dir();
    let root = c.mktree(&[("040000", "tree", &inner, name)], false);
    let err = c.refuses_tree_naming(&root, name);
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn refuses_dotgit_directory() {
    refuses_directory_named(".git");
}

#[test]
fn refuses_dotgit_upper_case() {
    refuses_directory_named(".GIT");
}

#[test]
fn refuses_dotgit_with_trailing_dot() {
    refuses_directory_named(".git.");
}

#[test]
fn refuses_dotgit_with_trailing_space() {
    refuses_directory_named(".Git ");
}

#[test]
fn refuses_ntfs_short_name_git_tilde_1() {
    refuses_directory_named("git~1");
}

#[test]
fn refuses_dotgit_ntfs_index_allocation_stream() {
    refuses_directory_named(".git::$INDEX_ALLOCATION");
}

#[test]
fn refuses_dotgit_with_hfs_ignorable_code_point() {
    refuses_directory_named(".g\u{200c}it");
}

#[test]
fn refuses_dotgit_as_a_file() {
    let c = Case::new();
    let b = c.blob(b"gitdir: /etc\n");
    let root = c.mktree(&[("100644", "blob", &b, ".git")], false);
    c.refuses_tree_naming(&root, ".git");
}

#[test]
fn refuses_nested_dotgit_config() {
    let c = Case::new();
    let dotgit = c.config_dir();
    let src = c.mktree(&[("040000", "tree", &dotgit, ".git")], true);
    let root = c.mktree(&[("040000", "tree", &src, "src")], true);
    let err = c.refuses_tree_naming(&root, "src/.git");
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn refuses_dotdot_entry() {
    let c = Case::new();
    let inner = c.config_dir();
    let root = c.mktree(&[("040000", "tree", &inner, "..")], true);
    c.refuses_tree_naming(&root, "..");
}

#[test]
fn refuses_dot_entry() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.mktree(&[("100644", "blob", &b, ".")], false);
    c.refuses_tree_naming(&root, ".");
}

#[test]
fn refuses_entry_name_containing_a_slash() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"src/../../escape", &b)]);
    let err = c.refuses_tree_naming(&root, "src/../../escape");
    assert!(err.contains("must not contain `/`"), "{err}");
}

#[test]
fn refuses_absolute_path_entry_name() {
    let c = Case::new();
    let b = c.blob(b"root::0:0::/root:/bin/sh\n");
    let root = c.literal_tree(&[("100644", b"/etc/passwd", &b)]);
    c.refuses_tree_naming(&root, "/etc/passwd");
}

#[test]
fn refuses_entry_name_with_a_backslash() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.mktree(&[("100644", "blob", &b, "..\\..\\evil.bat")], false);
    c.refuses_tree_naming(&root, "..\\..\\evil.bat");
}

/// A tree entry named `bad<ESC>[31mname` (an ANSI colour sequence), pushed; returns stderr.
fn push_name_with_escape_sequence() -> String {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.mktree(&[("100644", "blob", &b, "bad\u{1b}[31mname")], false);
    let commit = c.commit(&root, &c.seed);
    c.refused(&[&format!("{commit}:refs/heads/main")])
}

#[test]
fn refuses_control_character_in_name() {
    let err = push_name_with_escape_sequence();
    assert!(
        err.contains("push refused: bad") && err.contains("control characters are not allowed"),
        "{err}"
    );
}

#[test]
fn refusal_does_not_echo_raw_control_characters_to_the_pusher() {
    // The name is attacker-chosen and the refusal goes to the pusher's terminal: it must arrive
    // escaped (e.g. `bad\x1b[31mname`), not as a live escape sequence.
    let err = push_name_with_escape_sequence();
    assert!(
        !err.contains('\u{1b}'),
        "gitstore echoed a raw ESC from a tree entry name to the pusher: {err:?}"
    );
}

#[test]
fn refuses_symlink_to_etc_shadow() {
    let c = Case::new();
    let target = c.blob(b"/etc/shadow");
    let root = c.mktree(&[("120000", "blob", &target, "shadow")], false);
    let err = c.refuses_tree_naming(&root, "shadow");
    assert!(err.contains("absolute"), "{err}");
}

#[test]
fn refuses_symlink_escaping_the_checkout() {
    // `src/up -> ../../outside`: one `..` reaches the root, the second leaves the checkout.
    let c = Case::new();
    let target = c.blob(b"../../outside");
    let src = c.mktree(&[("120000", "blob", &target, "up")], false);
    let root = c.mktree(&[("040000", "tree", &src, "src")], false);
    let err = c.refuses_tree_naming(&root, "src/up");
    assert!(err.contains("outside the repository"), "{err}");
}

#[test]
fn refuses_symlink_into_dotgit_config() {
    let c = Case::new();
    let target = c.blob(b".git/config");
    let root = c.mktree(&[("120000", "blob", &target, "cfg")], false);
    let err = c.refuses_tree_naming(&root, "cfg");
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn refuses_symlink_climbing_through_a_named_directory() {
    // `x/../../y` looks like `../y` lexically, but `x` may itself be a symlink.
    let c = Case::new();
    let target = c.blob(b"x/../../y");
    let src = c.mktree(&[("120000", "blob", &target, "link")], false);
    let root = c.mktree(&[("040000", "tree", &src, "src")], false);
    c.refuses_tree_naming(&root, "src/link");
}

#[test]
fn refuses_gitlink_submodule() {
    let c = Case::new();
    let root = c.mktree(
        &[(
            "160000",
            "commit",
            "1111111111111111111111111111111111111111",
            "vendor",
        )],
        true,
    );
    let err = c.refuses_tree_naming(&root, "vendor");
    assert!(err.contains("submodules"), "{err}");
}

#[test]
fn refuses_file_over_max_file_bytes() {
    let c = Case::with(Options::args(&["--max-file-bytes", "1024"]));
    let big = c.blob(&[b'a'; 4096]);
    let small = c.blob(&[b'b'; 1000]);
    let assets = c.mktree(
        &[
            ("100644", "blob", &big, "big.bin"),
            ("100644", "blob", &small, "small.bin"),
        ],
        false,
    );
    let root = c.mktree(&[("040000", "tree", &assets, "assets")], false);
    let err = c.refuses_tree_naming(&root, "assets/big.bin");
    assert!(err.contains("1024-byte limit"), "{err}");
    // A file of exactly the limit is fine.
    let at_limit = c.blob(&[b'c'; 1024]);
    let root = c.mktree(&[("100644", "blob", &at_limit, "limit.bin")], false);
    c.accepted(&root);
}

#[test]
fn refuses_tree_with_too_many_files() {
    let c = Case::with(Options::args(&["--max-tree-files", "5"]));
    let entries: Vec<(String, String)> = (0..7)
        .map(|i| (c.blob(format!("{i}\n").as_bytes()), format!("f{i}.js")))
        .collect();
    let refs: Vec<(&str, &str, &str, &str)> = entries
        .iter()
        .map(|(id, name)| ("100644", "blob", id.as_str(), name.as_str()))
        .collect();
    let src = c.mktree(&refs, false);
    let root = c.mktree(&[("040000", "tree", &src, "src")], false);
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(err.contains("more than 5 files"), "{err}");
    // Exactly five files are fine.
    let src = c.mktree(&refs[..5], false);
    c.accepted(&c.mktree(&[("040000", "tree", &src, "src")], false));
}

#[test]
fn refuses_tree_nested_too_deep() {
    let c = Case::with(Options::args(&["--max-tree-depth", "3"]));
    let b = c.blob(b"deep\n");
    let mut tree = c.mktree(&[("100644", "blob", &b, "f.txt")], false);
    for d in ["e", "d", "c", "b", "a"] {
        tree = c.mktree(&[("040000", "tree", &tree, d)], false);
    }
    let err = c.refuses_tree_naming(&tree, "a/b/c/d");
    assert!(err.contains("deeper than 3"), "{err}");
}

#[test]
fn accepts_directories_nested_exactly_max_tree_depth() {
    // `--max-tree-depth 3` and the refusal text "directories nest deeper than 3 levels": a file
    // in a/b/c/ sits in directories nested exactly 3 levels deep, so it is within the limit.
    let c = Case::with(Options::args(&["--max-tree-depth", "3"]));
    let b = c.blob(b"deep\n");
    let mut tree = c.mktree(&[("100644", "blob", &b, "f.txt")], false);
    for d in ["c", "b", "a"] {
        tree = c.mktree(&[("040000", "tree", &tree, d)], false);
    }
    c.accepted(&tree);
}

#[test]
fn refuses_push_over_max_push_bytes() {
    use sha2::Digest;
    let c = Case::with(Options::args(&["--max-push-bytes", "4096"]));
    // 32 KB that zlib cannot shrink: a SHA-512 chain.
    let mut data = Vec::new();
    let mut block = sha2::Sha512::digest(b"kiln").to_vec();
    while data.len() < 32 << 10 {
        block = sha2::Sha512::digest(&block).to_vec();
        data.extend_from_slice(&block);
    }
    let b = c.blob(&data);
    let readme = c.repo.git_ok(&["rev-parse", "HEAD:README.md"]);
    let root = c.mktree(
        &[
            ("100644", "blob", &readme, "README.md"),
            ("100644", "blob", &b, "noise.bin"),
        ],
        false,
    );
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(
        err.contains("exceeds maximum allowed size") || err.contains("4096-byte limit"),
        "the refusal does not name the size limit:\n{err}"
    );
}

#[test]
fn refuses_malformed_tree_with_unsorted_entries() {
    // git's fsck (receive.fsckObjects) rejects it before the hook runs.
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"b.js", &b), ("100644", b"a.js", &b)]);
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(err.contains("treeNotSorted"), "{err}");
}

#[test]
fn refuses_malformed_tree_with_duplicate_entries() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"a.js", &b), ("100644", b"a.js", &b)]);
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(err.contains("duplicateEntries"), "{err}");
}

#[test]
fn refuses_hostile_tree_hidden_below_a_clean_tip() {
    let c = Case::new();
    let inner = c.config_dir();
    let bad_tree = c.mktree(&[("040000", "tree", &inner, ".git")], false);
    let bad = c.commit(&bad_tree, &c.seed);
    let clean_tree = c.repo.git_ok(&["rev-parse", "HEAD^{tree}"]);
    let tip = c.commit(&clean_tree, &bad);
    let err = c.refused(&[&format!("{tip}:refs/heads/main")]);
    assert!(err.contains("push refused: .git: "), "{err}");
}

#[test]
fn refuses_whole_push_when_one_of_its_refs_is_hostile() {
    let c = Case::new();
    let good = c.repo.commit_file("src/ok.js", "export const OK = 1;\n");
    let inner = c.config_dir();
    let bad_tree = c.mktree(&[("040000", "tree", &inner, ".git")], false);
    let bad = c.commit(&bad_tree, &c.seed);
    let err = c.refused(&[
        &format!("{good}:refs/heads/main"),
        &format!("{bad}:refs/heads/evil"),
    ]);
    assert!(err.contains("push refused: .git: "), "{err}");
}

#[test]
fn refuses_tag_pointing_at_a_tree() {
    let c = Case::new();
    let tree = c.repo.git_ok(&["rev-parse", "HEAD^{tree}"]);
    let err = c.refused(&[&format!("{tree}:refs/tags/tree-tag")]);
    assert!(
        err.contains("refs/tags/tree-tag") && err.contains("must point at a commit"),
        "{err}"
    );
}

#[test]
fn refuses_notes_ref_outside_branches_and_tags() {
    let c = Case::new();
    let err = c.refused(&["main:refs/notes/x"]);
    assert!(
        err.contains("push refused: refs/notes/x: only branches"),
        "{err}"
    );
}

#[test]
fn refuses_pull_request_ref_outside_branches_and_tags() {
    let c = Case::new();
    let err = c.refused(&["main:refs/pull/1/head"]);
    assert!(
        err.contains("push refused: refs/pull/1/head: only branches"),
        "{err}"
    );
}

const RULE: &str = "use 1 to 63 characters from a-z, 0-9 and '-'";

/// An invalid project id: git shows the rule as `remote:`, curl gets it in a 400 body, the API
/// answers 400 with it, and nothing appears in the store.
fn rejects_project_id(bad: &str) {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Bad");
    let url = g.git_url(&token, bad);

    let push = app.push(&url, &["main"]);
    assert!(!push.ok, "push to project {bad:?} accepted");
    assert!(
        push.stderr.contains("remote: invalid project id") && push.stderr.contains(RULE),
        "git did not show the rule for {bad:?}:\n{}",
        push.stderr
    );
    assert!(push.stderr.contains("400"), "{}", push.stderr);
    let clone = Repo::try_clone(&url, &work.path().join("c"), &[]).expect_err("clone succeeded");
    assert!(clone.stderr.contains(RULE), "{}", clone.stderr);

    for service in ["git-upload-pack", "git-receive-pack"] {
        let r = g.http(
            "GET",
            &format!("/git/{bad}.git/info/refs?service={service}"),
            Some(&token),
            None,
        );
        assert_eq!(r.status, 400, "{bad} {service}: {}", r.body);
        assert!(r.body.contains(RULE), "{bad} {service}: {}", r.body);
    }
    let body = serde_json::json!({ "id": bad }).to_string();
    let api = g.http("POST", "/api/projects", Some(&token), Some(&body));
    assert_eq!(api.status, 400, "{}", api.body);
    assert!(
        api.json()["message"].as_str().unwrap().contains(RULE),
        "{}",
        api.body
    );
    let projects = g.store_dir().join("projects");
    let listed: Vec<_> = std::fs::read_dir(&projects)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(listed.is_empty(), "store gained projects: {listed:?}");
}

#[test]
fn rejects_project_id_with_upper_case_and_underscore() {
    rejects_project_id("Bad_Name");
}

#[test]
fn rejects_project_id_starting_with_a_dash() {
    rejects_project_id("-x");
}

#[test]
fn rejects_project_id_of_64_characters() {
    rejects_project_id(&"a".repeat(64));
}

#[test]
fn rejects_project_id_with_a_dot_dot() {
    rejects_project_id("..");
}
