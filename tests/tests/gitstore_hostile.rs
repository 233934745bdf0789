//! The gitstore half of Kiln's hostile-input catalogue: one `hostile_<case>` test per case.
//!
//! Pushes: trees built with git plumbing (`hash-object -w`, `mktree`, `mktree --missing`,
//! `hash-object -t tree --literally` for bytes mktree refuses, `commit-tree`) that would plant a
//! `.git`, escape the checkout, or break a limit; refs outside branches and tags; malformed
//! objects; invalid project ids. Each must be refused with the offending path (or rule) in what
//! `git push` prints, and must leave the store exactly as it was.
//!
//! What stock `git push` will not send goes through the smart-HTTP protocol raw (a pkt-line
//! command list, then a pack that git itself wrote): thin packs whose base the server lacks, ref
//! names git's client refuses to write. The transport: headers and bodies trickled in to hold
//! connections open. The API: non-UTF-8, control characters and traversal in every path and
//! commit parameter. Each of these must be refused with the answer a user reads (the push
//! report, or a 4xx and its message, never a 500), leave the store as it was, and leave the
//! node serving a clean push and clone of another project.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
/// A second project of the same client, which the node must keep serving while `PROJECT` is
/// under attack.
const BYSTANDER: &str = "bystander";
const ZERO_ID: &str = "0000000000000000000000000000000000000000";

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
        let before = self.snapshot();
        let url = self.node.git_url(&self.token, PROJECT);
        let out = self.repo.push(&url, refspecs);
        assert!(
            !out.ok,
            "hostile push {refspecs:?} was accepted:\n{}",
            out.stderr
        );
        self.assert_untouched(&before);
        out.stderr
    }

    /// The project's files in the store, taken while it still holds only the seed.
    fn snapshot(&self) -> BTreeMap<String, u64> {
        let store = self.node.store_dir();
        assert_eq!(generation(&store, PROJECT), 1);
        store_snapshot(&store, PROJECT)
    }

    /// Asserts the store holds exactly `before` for the project and main still is the seed.
    fn assert_untouched(&self, before: &BTreeMap<String, u64>) {
        let store = self.node.store_dir();
        let after = store_snapshot(&store, PROJECT);
        assert!(
            &after == before,
            "a refused push changed the store: generation {} lists refs {}\nbefore: {before:?}\nafter:  {after:?}",
            generation(&store, PROJECT),
            latest_manifest(&store, PROJECT).map_or("none".into(), |m| m["refs"].to_string()),
        );
        let url = self.node.git_url(&self.token, PROJECT);
        let ls = self.repo.git_ok(&["ls-remote", &url, "refs/heads/main"]);
        assert!(ls.starts_with(&self.seed), "main moved: {ls}");
    }

    /// Pushes a new project and clones it back: the node still does its job for everyone else.
    /// Call it once per node (a second call would push an unrelated history).
    fn still_serves_another_project(&self) {
        let work = tempfile::tempdir().unwrap();
        let repo = Repo::init(&work.path().join("bystander"));
        let head = repo.commit_file("index.html", "<h1>still served</h1>\n");
        let url = self.node.git_url(&self.token, BYSTANDER);
        let out = repo.push(&url, &["main"]);
        assert!(
            out.ok,
            "after the hostile input, a clean push of another project was refused:\n{}",
            out.stderr
        );
        let clone = Repo::try_clone(&url, &work.path().join("clone"), &[]).unwrap_or_else(|o| {
            panic!(
                "after the hostile input, a clone of another project failed:\n{}",
                o.stderr
            )
        });
        assert_eq!(clone.head(), head, "the clone is not what was pushed");
    }

    /// Sends one ref update and `pack` to git-receive-pack as a raw smart-HTTP request, the way
    /// a client other than stock git could.
    fn raw_push(&self, old: &str, new: &str, refname: &[u8], pack: &[u8]) -> Report {
        let mut command = format!("{old} {new} ").into_bytes();
        command.extend_from_slice(refname);
        command.extend_from_slice(b"\0 report-status side-band-64k agent=kiln-tests\n");
        let mut body = pkt_line(&command);
        body.extend_from_slice(b"0000");
        body.extend_from_slice(pack);
        let auth = format!("Bearer {}", self.token);
        let r = http(
            "POST",
            &format!(
                "{}/git/{PROJECT}.git/git-receive-pack",
                self.node.base_url()
            ),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/x-git-receive-pack-request"),
            ],
            &body,
        );
        Report::parse(&r)
    }

    /// Asks the node to create `refname` at the seed, a commit it already holds (so the pack is
    /// empty); asserts receive-pack reports `ng` for it and the store is untouched.
    fn refuses_raw_ref(&self, refname: &[u8]) -> Report {
        let before = self.snapshot();
        let pack = git_stdout(&self.repo, &["pack-objects", "--stdout"], b"");
        let report = self.raw_push(ZERO_ID, &self.seed, refname, &pack);
        let mut ng = b"ng ".to_vec();
        ng.extend_from_slice(refname);
        ng.push(b' ');
        assert!(
            report.has_line(&ng),
            "the node did not report `ng` for ref {:?}:\n{report}",
            refname.escape_ascii().to_string()
        );
        self.assert_untouched(&before);
        report
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
fn hostile_dotgit_directory_refused() {
    refuses_directory_named(".git");
}

#[test]
fn hostile_dotgit_upper_case_refused() {
    refuses_directory_named(".GIT");
}

#[test]
fn hostile_dotgit_with_trailing_dot_refused() {
    refuses_directory_named(".git.");
}

#[test]
fn hostile_dotgit_with_trailing_space_refused() {
    refuses_directory_named(".Git ");
}

#[test]
fn hostile_ntfs_short_name_git_tilde_1_refused() {
    refuses_directory_named("git~1");
}

#[test]
fn hostile_dotgit_ntfs_index_allocation_stream_refused() {
    refuses_directory_named(".git::$INDEX_ALLOCATION");
}

#[test]
fn hostile_dotgit_with_hfs_ignorable_code_point_refused() {
    refuses_directory_named(".g\u{200c}it");
}

#[test]
fn hostile_dotgit_as_a_file_refused() {
    let c = Case::new();
    let b = c.blob(b"gitdir: /etc\n");
    let root = c.mktree(&[("100644", "blob", &b, ".git")], false);
    c.refuses_tree_naming(&root, ".git");
}

#[test]
fn hostile_nested_dotgit_config_refused() {
    let c = Case::new();
    let dotgit = c.config_dir();
    let src = c.mktree(&[("040000", "tree", &dotgit, ".git")], true);
    let root = c.mktree(&[("040000", "tree", &src, "src")], true);
    let err = c.refuses_tree_naming(&root, "src/.git");
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn hostile_dotdot_entry_refused() {
    let c = Case::new();
    let inner = c.config_dir();
    let root = c.mktree(&[("040000", "tree", &inner, "..")], true);
    c.refuses_tree_naming(&root, "..");
}

#[test]
fn hostile_dot_entry_refused() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.mktree(&[("100644", "blob", &b, ".")], false);
    c.refuses_tree_naming(&root, ".");
}

#[test]
fn hostile_entry_name_containing_a_slash_refused() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"src/../../escape", &b)]);
    let err = c.refuses_tree_naming(&root, "src/../../escape");
    assert!(err.contains("must not contain `/`"), "{err}");
}

#[test]
fn hostile_absolute_path_entry_name_refused() {
    let c = Case::new();
    let b = c.blob(b"root::0:0::/root:/bin/sh\n");
    let root = c.literal_tree(&[("100644", b"/etc/passwd", &b)]);
    c.refuses_tree_naming(&root, "/etc/passwd");
}

#[test]
fn hostile_entry_name_with_a_backslash_refused() {
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
fn hostile_control_character_in_name_refused() {
    let err = push_name_with_escape_sequence();
    assert!(
        err.contains("push refused: bad") && err.contains("control characters are not allowed"),
        "{err}"
    );
}

#[test]
fn hostile_control_character_in_name_not_echoed_raw() {
    // The name is attacker-chosen and the refusal goes to the pusher's terminal: it must arrive
    // escaped (e.g. `bad\x1b[31mname`), not as a live escape sequence.
    let err = push_name_with_escape_sequence();
    assert!(
        !err.contains('\u{1b}'),
        "gitstore echoed a raw ESC from a tree entry name to the pusher: {err:?}"
    );
}

#[test]
fn hostile_symlink_to_etc_shadow_refused() {
    let c = Case::new();
    let target = c.blob(b"/etc/shadow");
    let root = c.mktree(&[("120000", "blob", &target, "shadow")], false);
    let err = c.refuses_tree_naming(&root, "shadow");
    assert!(err.contains("absolute"), "{err}");
}

#[test]
fn hostile_symlink_escaping_the_checkout_refused() {
    // `src/up -> ../../outside`: one `..` reaches the root, the second leaves the checkout.
    let c = Case::new();
    let target = c.blob(b"../../outside");
    let src = c.mktree(&[("120000", "blob", &target, "up")], false);
    let root = c.mktree(&[("040000", "tree", &src, "src")], false);
    let err = c.refuses_tree_naming(&root, "src/up");
    assert!(err.contains("outside the repository"), "{err}");
}

#[test]
fn hostile_symlink_into_dotgit_config_refused() {
    let c = Case::new();
    let target = c.blob(b".git/config");
    let root = c.mktree(&[("120000", "blob", &target, "cfg")], false);
    let err = c.refuses_tree_naming(&root, "cfg");
    assert!(err.contains("reserved"), "{err}");
}

#[test]
fn hostile_symlink_climbing_through_a_named_directory_refused() {
    // `x/../../y` looks like `../y` lexically, but `x` may itself be a symlink.
    let c = Case::new();
    let target = c.blob(b"x/../../y");
    let src = c.mktree(&[("120000", "blob", &target, "link")], false);
    let root = c.mktree(&[("040000", "tree", &src, "src")], false);
    c.refuses_tree_naming(&root, "src/link");
}

#[test]
fn hostile_gitlink_submodule_refused() {
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
fn hostile_file_over_max_file_bytes_refused() {
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
fn hostile_tree_with_too_many_files_refused() {
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
fn hostile_tree_nested_too_deep_refused() {
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
fn hostile_push_over_max_push_bytes_refused() {
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
fn hostile_malformed_tree_with_unsorted_entries_refused() {
    // git's fsck (receive.fsckObjects) rejects it before the hook runs.
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"b.js", &b), ("100644", b"a.js", &b)]);
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(err.contains("treeNotSorted"), "{err}");
}

#[test]
fn hostile_malformed_tree_with_duplicate_entries_refused() {
    let c = Case::new();
    let b = c.blob(b"x\n");
    let root = c.literal_tree(&[("100644", b"a.js", &b), ("100644", b"a.js", &b)]);
    let commit = c.commit(&root, &c.seed);
    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(err.contains("duplicateEntries"), "{err}");
}

#[test]
fn hostile_tree_hidden_below_a_clean_tip_refused() {
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
fn hostile_ref_among_clean_ones_refuses_the_whole_push() {
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
fn hostile_tag_pointing_at_a_tree_refused() {
    let c = Case::new();
    let tree = c.repo.git_ok(&["rev-parse", "HEAD^{tree}"]);
    let err = c.refused(&[&format!("{tree}:refs/tags/tree-tag")]);
    assert!(
        err.contains("refs/tags/tree-tag") && err.contains("must point at a commit"),
        "{err}"
    );
}

#[test]
fn hostile_notes_ref_outside_branches_and_tags_refused() {
    let c = Case::new();
    let err = c.refused(&["main:refs/notes/x"]);
    assert!(
        err.contains("push refused: refs/notes/x: only branches"),
        "{err}"
    );
}

#[test]
fn hostile_pull_request_ref_outside_branches_and_tags_refused() {
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
fn hostile_project_id_with_upper_case_and_underscore_rejected() {
    rejects_project_id("Bad_Name");
}

#[test]
fn hostile_project_id_starting_with_a_dash_rejected() {
    rejects_project_id("-x");
}

#[test]
fn hostile_project_id_of_64_characters_rejected() {
    rejects_project_id(&"a".repeat(64));
}

#[test]
fn hostile_project_id_with_a_dot_dot_rejected() {
    rejects_project_id("..");
}

// ---------------------------------------------------------------------------------------------
// What stock `git push` will not send: raw smart HTTP
// ---------------------------------------------------------------------------------------------

/// One pkt-line: four hex digits of length (themselves included), then the data.
fn pkt_line(data: &[u8]) -> Vec<u8> {
    let mut line = format!("{:04x}", data.len() + 4).into_bytes();
    line.extend_from_slice(data);
    line
}

/// The payloads of a run of pkt-lines. Parsing stops at the first bytes that are not a pkt-line
/// (a plain-text error body, say), which [`Report`]'s display then shows whole.
fn pkt_payloads(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let Some(len) = std::str::from_utf8(&data[..4])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
        else {
            break;
        };
        // 0000 flush, 0001 delimiter and 0002 response-end carry nothing.
        if len < 4 {
            data = &data[4..];
            continue;
        }
        if len > data.len() {
            break;
        }
        out.push(&data[4..len]);
        data = &data[len..];
    }
    out
}

/// What git-receive-pack answered a raw push: the HTTP status, its report-status lines
/// (`unpack <result>`, then `ok <ref>` or `ng <ref> <reason>`) and the text git shows the pusher
/// as `remote:` lines (side-band channels 2 and 3).
struct Report {
    status: u16,
    lines: Vec<Vec<u8>>,
    remote: String,
    raw: Vec<u8>,
}

impl Report {
    fn parse(r: &Response) -> Self {
        let mut report_channel = Vec::new();
        let mut remote = String::new();
        for payload in pkt_payloads(&r.bytes) {
            match payload.split_first() {
                Some((1, data)) => report_channel.extend_from_slice(data),
                Some((2 | 3, data)) => remote.push_str(&String::from_utf8_lossy(data)),
                _ => {}
            }
        }
        let lines = pkt_payloads(&report_channel)
            .into_iter()
            .map(|l| l.strip_suffix(b"\n").unwrap_or(l).to_vec())
            .collect();
        Self {
            status: r.status,
            lines,
            remote,
            raw: r.bytes.clone(),
        }
    }

    fn has_line(&self, prefix: &[u8]) -> bool {
        self.lines.iter().any(|l| l.starts_with(prefix))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "HTTP {}", self.status)?;
        for line in &self.lines {
            writeln!(f, "  {}", line.escape_ascii())?;
        }
        writeln!(f, "remote: {}", self.remote.escape_debug())?;
        if self.lines.is_empty() {
            writeln!(f, "body: {}", self.raw.escape_ascii())?;
        }
        Ok(())
    }
}

/// git's stdout byte for byte: the harness decodes output as text, which would corrupt a pack.
fn git_stdout(repo: &Repo, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(&repo.path)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting git");
    // The inputs here are a few lines, far below a pipe's buffer: writing all of it before
    // reading cannot deadlock. Dropping the handle closes git's stdin.
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .expect("writing git's stdin");
    let out = child.wait_with_output().expect("waiting for git");
    assert!(
        out.status.success(),
        "git {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn hostile_thin_pack_with_missing_base() {
    let c = Case::new();
    // C1 adds big.txt and never reaches the node; C2 adds one line. A client that believed the
    // node had C1 sends C2's big.txt as a delta against C1's.
    let lines: String = (1..=2000).map(|i| format!("line {i}\n")).collect();
    let c1 = c.repo.commit_file("big.txt", &lines);
    let c2 = c
        .repo
        .commit_file("big.txt", format!("{lines}one more line\n"));
    let pack = git_stdout(
        &c.repo,
        &["pack-objects", "--revs", "--thin", "--stdout"],
        format!("{c2}\n^{c1}\n").as_bytes(),
    );
    let scratch = tempfile::tempdir().unwrap();
    let fix =
        Repo::init(scratch.path()).git_with_input(&["index-pack", "--stdin", "--fix-thin"], &pack);
    assert!(
        !fix.ok && fix.stderr.contains("unresolved delta"),
        "the pack is not thin, so this test would prove nothing: {}",
        fix.stderr
    );

    let before = c.snapshot();
    let report = c.raw_push(&c.seed, &c2, b"refs/heads/main", &pack);
    // Smart HTTP carries a refused push in a 200 response; the report says what happened.
    assert_eq!(report.status, 200, "{report}");
    assert!(
        report.has_line(b"unpack index-pack abnormal exit")
            && report.has_line(b"ng refs/heads/main unpacker error"),
        "the thin pack was not refused as unpackable:\n{report}"
    );
    assert!(
        report.remote.contains("pack has 1 unresolved delta"),
        "git's reason did not reach the pusher:\n{report}"
    );
    c.assert_untouched(&before);
    c.still_serves_another_project();
}

/// Peak resident memory (VmHWM, in KiB) of the node's server process, found by its listen
/// address: the hooks and git children it starts are other processes.
fn server_peak_rss_kib(node: &Gitstore) -> u64 {
    let listen = node.base_url().trim_start_matches("http://").to_owned();
    for e in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours = args.first().is_some_and(|a| a.ends_with(b"kiln-gitstore"))
            && args.contains(&&b"serve"[..])
            && args.contains(&listen.as_bytes());
        if !ours {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        return status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {}", e.path().display()));
    }
    panic!("no kiln-gitstore serve process listening on {listen}");
}

#[test]
fn hostile_pack_bomb() {
    const LIMIT: u64 = 1 << 20;
    const INFLATED: u64 = 128 << 20;
    let c = Case::with(Options::args(&[
        "--max-file-bytes",
        &LIMIT.to_string(),
        "--max-push-bytes",
        &LIMIT.to_string(),
    ]));
    // A sparse file reads back as zeros: git compresses 128 MiB of them about a thousandfold,
    // and the test never holds them in memory.
    let zeros = c.repo.path.join("zeros.bin");
    std::fs::File::create(&zeros)
        .and_then(|f| f.set_len(INFLATED))
        .expect("sparse file");
    let blob = c.repo.git_ok(&["hash-object", "-w", "zeros.bin"]);
    std::fs::remove_file(&zeros).expect("removing the sparse file");
    let root = c.mktree(&[("100644", "blob", &blob, "zeros.bin")], false);
    let commit = c.commit(&root, &c.seed);
    let pack = git_stdout(
        &c.repo,
        &["pack-objects", "--revs", "--stdout"],
        format!("{commit}\n^{}\n", c.seed).as_bytes(),
    );
    assert!(
        (pack.len() as u64) < LIMIT / 4,
        "the bomb's pack is {} bytes: the push-size limit alone would stop it, so this test \
         would not reach the inflated-size check",
        pack.len()
    );

    let err = c.refused(&[&format!("{commit}:refs/heads/main")]);
    assert!(
        err.contains(&format!(
            "push refused: zeros.bin: file is {INFLATED} bytes, over the {LIMIT}-byte limit"
        )),
        "the refusal does not name the file and the limit:\n{err}"
    );
    let peak = server_peak_rss_kib(&c.node);
    assert!(
        peak * 1024 < INFLATED / 2,
        "the server process peaked at {peak} KiB while refusing a {INFLATED}-byte bomb: it \
         inflated what it should only have measured"
    );
    let health = c.node.http("GET", "/healthz", None, None);
    assert_eq!(health.status, 200, "{}", health.body);
    c.still_serves_another_project();
}

#[test]
fn hostile_non_utf8_in_ref_name() {
    let c = Case::new();
    let before = c.snapshot();
    let report = c.refuses_raw_ref(b"refs/heads/\xff\xfe");
    assert!(
        report
            .remote
            .contains("kiln: could not read the ref updates; push refused"),
        "{report}"
    );
    // The commit API takes a branch in JSON, which must be UTF-8.
    let mut body = format!(r#"{{"message":"m","parent":"{}","branch":""#, c.seed).into_bytes();
    body.extend_from_slice(b"\xff\xfe");
    body.extend_from_slice(br#"","files":{"a.txt":"a"}}"#);
    let auth = format!("Bearer {}", c.token);
    let r = http(
        "POST",
        &format!("{}/api/projects/{PROJECT}/commits", c.node.base_url()),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "bad_json", "{}", r.body);
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid commit request: ")),
        "{}",
        r.body
    );
    c.assert_untouched(&before);
    c.still_serves_another_project();
}

#[test]
fn hostile_control_character_in_ref_name() {
    let c = Case::new();
    c.refuses_raw_ref(b"refs/heads/a\x01b");
    c.still_serves_another_project();
}

#[test]
fn hostile_space_in_ref_name() {
    // The hook reads `<old> <new> <ref>` lines; a space inside the name must not cut it short
    // into another, valid, ref name (`refs/heads/a`).
    let c = Case::new();
    c.refuses_raw_ref(b"refs/heads/a b");
    c.still_serves_another_project();
}

#[test]
fn hostile_dot_dot_in_ref_name() {
    let c = Case::new();
    c.refuses_raw_ref(b"refs/heads/../../escape");
    c.still_serves_another_project();
}

#[test]
fn hostile_lock_suffix_in_ref_name() {
    // git keeps `<ref>.lock` files beside refs while it updates them; no ref may have that name.
    let c = Case::new();
    c.refuses_raw_ref(b"refs/heads/x.lock");
    c.still_serves_another_project();
}

// ---------------------------------------------------------------------------------------------
// API parameters
// ---------------------------------------------------------------------------------------------

/// Sends one API request and asserts the answer refuses it with a message: a 4xx (never a
/// 500) whose body says `expect`, shows no raw control character, and carries none of `secrets`.
fn refuses_request(
    c: &Case,
    token: &str,
    (method, path, body): (&str, &str, Option<&str>),
    expect: &str,
    secrets: &[&str],
) {
    let r = c.node.http(method, path, Some(token), body);
    let shown = format!("{method} {path} {}", body.unwrap_or_default());
    assert!(
        (400..500).contains(&r.status) && !r.body.trim().is_empty(),
        "{shown}: expected a 4xx with a message, got {}: {:?}",
        r.status,
        r.body
    );
    assert!(
        r.body.contains(expect),
        "{shown}: answered {} without saying {expect:?}: {:?}",
        r.status,
        r.body
    );
    assert!(
        !r.body.chars().any(|ch| ch.is_control() && ch != '\n'),
        "{shown}: the answer echoes a raw control character: {:?}",
        r.body
    );
    assert!(
        r.header("x-injected").is_none(),
        "{shown}: a CR LF in a parameter became a response header"
    );
    for secret in secrets {
        assert!(
            !r.body.contains(secret),
            "{shown}: the answer holds content from outside the repository: {:?}",
            r.body
        );
    }
}

#[test]
fn hostile_non_utf8_and_control_characters_in_query_parameters() {
    let c = Case::new();
    let before = c.snapshot();
    let p = PROJECT;
    let not_a_commit = "is not a commit id";
    let not_utf8 = "Invalid UTF-8";
    let cases: &[(&str, &str)] = &[
        (
            &format!("/api/projects/{p}/tree?commit=%FF%00"),
            not_a_commit,
        ),
        (&format!("/api/projects/{p}/tree?commit=%00"), not_a_commit),
        (
            &format!("/api/projects/{p}/tree?commit=%C0%AE%C0%AE"),
            not_a_commit,
        ),
        (
            &format!("/api/projects/{p}/tree?commit=%1b%5b31m"),
            not_a_commit,
        ),
        (
            &format!("/api/projects/{p}/files/README.md?commit=%0d%0aX-Injected:%20y"),
            not_a_commit,
        ),
        (
            &format!("/api/projects/{p}/diff?from=%FF&to=%00"),
            not_a_commit,
        ),
        (&format!("/api/projects/{p}/diff?to=%C0%AE"), not_a_commit),
        (
            &format!("/api/projects/{p}/files/%00"),
            "NUL bytes are not allowed",
        ),
        (
            &format!("/api/projects/{p}/files/README.md%00.png"),
            "NUL bytes are not allowed",
        ),
        (&format!("/api/projects/{p}/files/%FF"), not_utf8),
        (
            &format!("/api/projects/{p}/files/%C0%AE%C0%AE/etc/passwd"),
            not_utf8,
        ),
        (
            &format!("/api/projects/{p}/files/a%0d%0aX-Injected:%20y"),
            "control characters are not allowed",
        ),
        (
            &format!("/api/projects/{p}/files/%1b%5b31m"),
            "control characters are not allowed",
        ),
        ("/api/projects/%FF/tree", not_utf8),
        (&format!("/api/projects/{p}%00/tree"), "invalid project id"),
        (
            &format!("/git/{p}.git/info/refs?service=%FF%00"),
            "?service=git-upload-pack or git-receive-pack is required",
        ),
    ];
    for (path, expect) in cases {
        refuses_request(&c, &c.token, ("GET", path, None), expect, &[]);
    }
    let share = r#"{"mode":"view","commit":"\u0000\u001b[31m"}"#;
    let shares = format!("/api/projects/{p}/shares");
    refuses_request(
        &c,
        &c.token,
        ("POST", &shares, Some(share)),
        not_a_commit,
        &[],
    );
    c.assert_untouched(&before);
    c.still_serves_another_project();
}

/// The percent-encoded form of `s`, with `.`, `/` and `\` encoded too, as a client that hopes
/// a server decodes after it routes would send it.
fn encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

#[test]
fn hostile_traversal_in_every_parameter() {
    const ADMIN: &str = "kiln-test-admin-token-0123456789";
    let c = Case::with(Options {
        admin_token: Some(ADMIN.into()),
        ..Options::default()
    });
    let store = c.node.store_dir();
    let before = c.snapshot();
    let listing = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store.join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let (projects, clients) = (listing("projects"), listing("clients"));

    // A file no request may read, outside every repository, and one every Linux host has.
    let outside = tempfile::tempdir().unwrap();
    let secret_path = outside.path().join("secret.txt");
    let secret = format!("kiln sentinel {:?}", Instant::now());
    std::fs::write(&secret_path, &secret).unwrap();
    let abs = secret_path.to_str().expect("UTF-8 temp dir").to_owned();
    let climb = format!("{}{}", "../".repeat(16), abs.trim_start_matches('/'));
    let secrets = [secret.as_str(), "root:x:0:0"];

    // As they appear in a URL: raw, percent-encoded, absolute, backslashed, double-encoded.
    let in_url = [
        climb.clone(),
        encoded(&climb),
        format!("/{abs}"),
        encoded(&abs),
        "..%5c..%5c..%5c..%5cetc%5cpasswd".to_owned(),
        "%252e%252e%252f%252e%252e%252fetc%252fpasswd".to_owned(),
    ];
    // As they appear in a JSON string.
    let in_json = [
        climb.clone(),
        abs.clone(),
        "..\\..\\..\\..\\etc\\passwd".to_owned(),
        "/etc/passwd".to_owned(),
    ];

    let p = PROJECT;
    let seed = &c.seed;
    let mut requests: Vec<(String, &str, String, Option<String>)> = Vec::new();
    let mut add = |token: &str, method: &'static str, path: String, body: Option<String>| {
        requests.push((token.to_owned(), method, path, body));
    };
    for x in &in_url {
        let t = c.token.as_str();
        for method in ["GET", "DELETE"] {
            add(t, method, format!("/api/projects/{x}"), None);
        }
        add(t, "PATCH", format!("/api/projects/{x}"), Some("{}".into()));
        for route in ["tree", "diff", "shares"] {
            add(t, "GET", format!("/api/projects/{x}/{route}"), None);
        }
        add(t, "POST", format!("/api/projects/{x}/restore"), None);
        add(t, "GET", format!("/api/projects/{p}/files/{x}"), None);
        add(t, "GET", format!("/api/projects/{p}/files/src/{x}"), None);
        add(t, "GET", format!("/api/projects/{p}/tree?commit={x}"), None);
        add(
            t,
            "GET",
            format!("/api/projects/{p}/files/README.md?commit={x}"),
            None,
        );
        add(t, "GET", format!("/api/projects/{p}/diff?from={x}"), None);
        add(t, "GET", format!("/api/projects/{p}/diff?to={x}"), None);
        add(t, "DELETE", format!("/api/projects/{p}/shares/{x}"), None);
        add(
            t,
            "GET",
            format!("/git/{x}.git/info/refs?service=git-upload-pack"),
            None,
        );
        add(
            t,
            "GET",
            format!("/git/{p}.git/info/refs?service={x}"),
            None,
        );
        add(ADMIN, "DELETE", format!("/api/clients/{x}"), None);
        add(
            ADMIN,
            "PATCH",
            format!("/api/clients/{x}"),
            Some("{}".into()),
        );
    }
    for x in &in_json {
        let t = c.token.as_str();
        let s = serde_json::Value::from(x.as_str()).to_string();
        add(
            t,
            "POST",
            "/api/projects".into(),
            Some(format!(r#"{{"id":{s}}}"#)),
        );
        add(
            t,
            "POST",
            format!("/api/projects/{p}/shares"),
            Some(format!(r#"{{"mode":"view","commit":{s}}}"#)),
        );
        add(
            t,
            "POST",
            "/api/projects/fresh/import".into(),
            Some(format!(r#"{{"share":{s}}}"#)),
        );
        let commit = |field: &str| format!(r#"{{"message":"m","parent":"{seed}",{field}}}"#);
        add(
            t,
            "POST",
            format!("/api/projects/{p}/commits"),
            Some(commit(&format!(r#""files":{{{s}:"pwned"}}"#))),
        );
        add(
            t,
            "POST",
            format!("/api/projects/{p}/commits"),
            Some(commit(&format!(r#""files":{{"link":{{"symlink":{s}}}}}"#))),
        );
        add(
            t,
            "POST",
            format!("/api/projects/{p}/commits"),
            Some(commit(&format!(r#""branch":{s},"files":{{"a.txt":"a"}}"#))),
        );
    }
    for (token, method, path, body) in &requests {
        // Which words the message holds depends on the route; that there is one does not.
        refuses_request(&c, token, (method, path, body.as_deref()), "", &secrets);
    }
    c.assert_untouched(&before);
    assert_eq!(
        listing("projects"),
        projects,
        "a request added or removed a project"
    );
    assert_eq!(
        listing("clients"),
        clients,
        "a request added or removed a client"
    );
    c.still_serves_another_project();
}

// ---------------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------------

/// How long a client may hold a connection while it trickles in one request before the node
/// must drop it: gitstore gives headers 20 s, and a body 20 s before it must average 500 bytes
/// a second (`gitstore::http::Timeouts`).
const SLOW_CLIENT_LIMIT: Duration = Duration::from_secs(30);
/// Room on top of the limit for a loaded test machine.
const SLOW_CLIENT_SLACK: Duration = Duration::from_secs(5);

/// Sends `bytes` on a non-blocking connection; false once the server has let go of it (an
/// answer, such as a 408, counts as letting go, as do EOF and a reset).
fn still_open(s: &mut TcpStream, bytes: &[u8]) -> bool {
    match s.write(bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return false,
    }
    // EOF or an answer ends the request either way; only "nothing yet" means still held.
    let mut buf = [0u8; 512];
    s.read(&mut buf)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
}

fn connect(c: &Case) -> TcpStream {
    let addr = c.node.base_url().trim_start_matches("http://").to_owned();
    TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"))
}

/// While slow connections are held: /healthz, the API and git all answer.
fn serves_others_meanwhile(c: &Case) {
    let health = c.node.http("GET", "/healthz", None, None);
    assert_eq!(health.status, 200, "{}", health.body);
    let info = c.node.http(
        "GET",
        &format!("/api/projects/{PROJECT}"),
        Some(&c.token),
        None,
    );
    assert_eq!(info.status, 200, "{}", info.body);
    assert_eq!(info.json()["commit"], c.seed.as_str(), "{}", info.body);
    c.still_serves_another_project();
}

#[test]
fn hostile_slowloris_headers() {
    const CONNECTIONS: usize = 50;
    let c = Case::new();
    let before = c.snapshot();
    // At a byte a second the headers outlast the deadline, so no connection ever completes one.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {}",
        "a".repeat(200)
    )
    .into_bytes();
    let mut open: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let s = connect(&c);
            s.set_nonblocking(true).expect("non-blocking socket");
            s
        })
        .collect();
    let started = Instant::now();
    let mut sent = 0;
    while !open.is_empty() && started.elapsed() < SLOW_CLIENT_LIMIT + SLOW_CLIENT_SLACK {
        let byte = [request[sent.min(request.len() - 1)]];
        sent += 1;
        open.retain_mut(|s| still_open(s, &byte));
        if sent == 2 {
            serves_others_meanwhile(&c);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        open.is_empty(),
        "kiln-gitstore still held {} of {CONNECTIONS} connections open {:.0?} after they began \
         sending request headers at one byte a second; it must drop them within \
         {SLOW_CLIENT_LIMIT:?} (no header read timeout)",
        open.len(),
        started.elapsed()
    );
    c.assert_untouched(&before);
}

#[test]
fn hostile_slow_body() {
    const BYTES_PER_SECOND: usize = 4;
    let c = Case::new();
    let before = c.snapshot();
    let commit = c.repo.commit_file("slow.txt", "sent four bytes a second\n");
    let pack = git_stdout(
        &c.repo,
        &["pack-objects", "--revs", "--stdout"],
        format!("{commit}\n^{}\n", c.seed).as_bytes(),
    );
    let mut body =
        pkt_line(format!("{} {commit} refs/heads/main\0 report-status\n", c.seed).as_bytes());
    body.extend_from_slice(b"0000");
    body.extend_from_slice(&pack);
    let deadline = SLOW_CLIENT_LIMIT + SLOW_CLIENT_SLACK;
    assert!(
        body.len() > BYTES_PER_SECOND * deadline.as_secs() as usize,
        "a {}-byte body would arrive whole before the deadline",
        body.len()
    );

    let mut s = connect(&c);
    write!(
        s,
        "POST /git/{PROJECT}.git/git-receive-pack HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/x-git-receive-pack-request\r\n\
         Content-Length: {}\r\n\r\n",
        c.token,
        body.len()
    )
    .expect("sending the headers");
    s.set_nonblocking(true).expect("non-blocking socket");
    let started = Instant::now();
    let mut chunks = body.chunks(BYTES_PER_SECOND);
    let mut open = true;
    let mut rounds = 0;
    while open && started.elapsed() < deadline {
        open = still_open(&mut s, chunks.next().unwrap_or_default());
        rounds += 1;
        if rounds == 2 {
            // Another project: pushes to the target queue behind this one on the project's
            // lock, which is how pushes to one project are ordered.
            c.still_serves_another_project();
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        !open,
        "kiln-gitstore still held a git-receive-pack request open {:.0?} after its body began \
         arriving at {BYTES_PER_SECOND} bytes a second; it must drop it within \
         {SLOW_CLIENT_LIMIT:?} (no body timeout)",
        started.elapsed()
    );
    drop(s);
    c.assert_untouched(&before);
}
