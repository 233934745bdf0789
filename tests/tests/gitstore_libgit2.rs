//! libgit2 (the `git2` crate) against a real gitstore, the way an app embedding libgit2 talks to
//! Kiln: the client token goes in as the HTTP Basic password from a credentials callback, pushes
//! report per-ref results through `push_update_reference`, and what the server prints comes back
//! on the progress sideband. Covers a first push that creates the project, a follow-up commit, a
//! libgit2 clone of both, a wrong token, and hostile trees the server must refuse with its reason.

use std::path::Path;

use git2::build::RepoBuilder;
use git2::{
    Cred, CredentialType, ErrorClass, FetchOptions, ObjectType, Oid, PushOptions, RemoteCallbacks,
    Repository, Signature, Sort,
};
use kiln_tests::*;

/// The Basic user name; gitstore only reads the password.
const USER: &str = "kiln";

/// What one libgit2 push reported, as an application using libgit2 would collect it.
struct Pushed {
    /// `Remote::push`'s own result: transport and authentication failures. A ref the server
    /// refuses is not an error here; it shows up in `statuses`.
    result: Result<(), git2::Error>,
    /// `(ref, status)` from `push_update_reference`; `None` means the server accepted the ref.
    statuses: Vec<(String, Option<String>)>,
    /// Everything the server sent on the progress sideband (what stock git prints as `remote:`).
    sideband: String,
    /// How many times libgit2 asked the credentials callback for a password.
    credential_requests: usize,
}

impl Pushed {
    /// Panics, with everything libgit2 reported, unless the push landed every ref.
    fn assert_accepted(&self, what: &str) {
        assert!(
            self.result.is_ok(),
            "{what}: libgit2 push failed: {:?}\nserver said:\n{}",
            self.result,
            self.sideband
        );
        assert!(
            !self.statuses.is_empty() && self.statuses.iter().all(|(_, s)| s.is_none()),
            "{what}: the server refused a ref: {:?}\nserver said:\n{}",
            self.statuses,
            self.sideband
        );
    }
}

/// Pushes `refspecs` from `repo` to `url` with libgit2, answering every credentials request with
/// `token` as the Basic password.
fn push(repo: &Repository, url: &str, token: &str, refspecs: &[&str]) -> Pushed {
    let mut statuses = Vec::new();
    let mut sideband = Vec::new();
    let mut credential_requests = 0;
    let result = {
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(|_url, _user_from_url, allowed| {
            credential_requests += 1;
            assert!(
                allowed.contains(CredentialType::USER_PASS_PLAINTEXT),
                "gitstore's challenge did not offer Basic (user/password): {allowed:?}"
            );
            Cred::userpass_plaintext(USER, token)
        });
        callbacks.sideband_progress(|text| {
            sideband.extend_from_slice(text);
            true
        });
        callbacks.push_update_reference(|name, status| {
            statuses.push((name.to_owned(), status.map(str::to_owned)));
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(callbacks);
        let mut remote = repo
            .remote_anonymous(url)
            .expect("libgit2 accepts the remote URL");
        remote.push(refspecs, Some(&mut opts))
    };
    Pushed {
        result,
        statuses,
        sideband: String::from_utf8_lossy(&sideband).into_owned(),
        credential_requests,
    }
}

/// Clones `url` into `dest` with libgit2, with `token` as the Basic password.
fn clone(url: &str, token: &str, dest: &Path) -> Repository {
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(|_url, _user_from_url, _allowed| Cred::userpass_plaintext(USER, token));
    let mut fetch = FetchOptions::new();
    fetch.remote_callbacks(callbacks);
    RepoBuilder::new()
        .fetch_options(fetch)
        .clone(url, dest)
        .unwrap_or_else(|e| panic!("libgit2 clone of {url} failed: {e}"))
}

/// A fixed identity, so nothing depends on the machine's git configuration.
fn signature() -> Signature<'static> {
    Signature::now("Kiln Test", "test@kiln.invalid").expect("valid signature")
}

/// Writes `rel` in `repo`'s work tree, stages it and commits it on HEAD with libgit2.
fn commit_file(repo: &Repository, rel: &str, content: &str) -> Oid {
    let workdir = repo.workdir().expect("a work tree");
    let path = workdir.join(rel);
    std::fs::create_dir_all(path.parent().expect("file has a parent")).expect("mkdir");
    std::fs::write(&path, content).expect("writing file");
    let mut index = repo.index().expect("index");
    index.add_path(Path::new(rel)).expect("staging the file");
    index.write().expect("writing the index");
    let tree = repo
        .find_tree(index.write_tree().expect("writing the tree"))
        .expect("tree");
    let parent = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .expect("HEAD commit");
    let sig = signature();
    repo.commit(
        Some("HEAD"),
        &sig,
        &sig,
        &format!("update {rel}"),
        &tree,
        &[&parent],
    )
    .expect("committing")
}

/// A commit of `tree` on `parent`, not on any branch.
fn commit_tree(repo: &Repository, tree: Oid, parent: Oid) -> Oid {
    let tree = repo.find_tree(tree).expect("tree");
    let parent = repo.find_commit(parent).expect("parent commit");
    let sig = signature();
    repo.commit(None, &sig, &sig, "hostile commit", &tree, &[&parent])
        .expect("committing")
}

/// `refs/heads/main` of `project` as the project API reports it, and the generation.
fn server_main(g: &Gitstore, token: &str, project: &str) -> (String, u64) {
    let info = g.http(
        "GET",
        &format!("/api/projects/{project}"),
        Some(token),
        None,
    );
    assert_eq!(info.status, 200, "{}", info.body);
    let v = info.json();
    (
        v["refs"]["refs/heads/main"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        v["generation"].as_u64().expect("generation is a number"),
    )
}

/// A node, a client token, and `project` seeded by a libgit2 push of the Vite app, with the
/// scratch repository (opened with libgit2) and the seed commit.
struct Seeded {
    node: Gitstore,
    token: String,
    repo: Repository,
    seed: Oid,
    _work: tempfile::TempDir,
}

impl Seeded {
    fn new(project: &str) -> Self {
        let node = Gitstore::start();
        let token = node.create_client("generator");
        let work = tempfile::tempdir().unwrap();
        let app = vite_app(&work.path().join("app"), "Seed");
        let repo = Repository::open(&app.path).expect("libgit2 opens the app");
        let seed = repo.head().unwrap().target().unwrap();
        let pushed = push(
            &repo,
            &node.anonymous_git_url(project),
            &token,
            &["refs/heads/main"],
        );
        pushed.assert_accepted("seed push");
        Self {
            node,
            token,
            repo,
            seed,
            _work: work,
        }
    }

    /// Pushes `commit` to main of `project` and asserts the server refused it with a reason
    /// naming `path`, leaving the store and main as they were; returns the sideband text.
    fn refused(&self, project: &str, commit: Oid, path: &str) -> String {
        let store = self.node.store_dir();
        let before = store_snapshot(&store, project);
        let pushed = push(
            &self.repo,
            &self.node.anonymous_git_url(project),
            &self.token,
            &[&format!("{commit}:refs/heads/main")],
        );
        // libgit2 finishes the push normally; the refusal is per ref.
        assert!(
            pushed.result.is_ok(),
            "libgit2 failed instead of reporting the refusal: {:?}\nserver said:\n{}",
            pushed.result,
            pushed.sideband
        );
        assert_eq!(pushed.statuses.len(), 1, "{:?}", pushed.statuses);
        let (name, status) = &pushed.statuses[0];
        assert_eq!(name, "refs/heads/main");
        let status = status.as_deref().unwrap_or_else(|| {
            panic!(
                "the hostile push was accepted; server said:\n{}",
                pushed.sideband
            )
        });
        assert!(
            status.contains("pre-receive hook declined"),
            "unexpected ref status {status:?}"
        );
        assert!(
            pushed
                .sideband
                .contains(&format!("kiln: push refused: {path}: ")),
            "the server's refusal naming {path:?} did not reach libgit2's sideband:\n{}",
            pushed.sideband
        );
        assert_eq!(
            store_snapshot(&store, project),
            before,
            "a refused push changed the store"
        );
        assert_eq!(
            server_main(&self.node, &self.token, project),
            (self.seed.to_string(), 1),
            "a refused push moved main"
        );
        pushed.sideband
    }
}

#[test]
fn libgit2_pushes_a_new_project_then_a_second_commit_and_clones_both_back() {
    let g = Gitstore::start();
    let token = g.create_client("generator");
    let work = tempfile::tempdir().unwrap();
    let app = vite_app(&work.path().join("app"), "Shop");
    let repo = Repository::open(&app.path).expect("libgit2 opens the app");
    let url = g.anonymous_git_url("shop");

    // (1) The first push creates the project; the server confirms durability on the sideband.
    let first = repo.head().unwrap().target().unwrap();
    let pushed = push(&repo, &url, &token, &["refs/heads/main"]);
    pushed.assert_accepted("first push");
    assert!(
        pushed.credential_requests >= 1,
        "gitstore never challenged for credentials"
    );
    assert_eq!(pushed.statuses, vec![("refs/heads/main".to_owned(), None)]);
    assert!(
        pushed.sideband.contains("stored durably as generation 1"),
        "the push did not confirm durability:\n{}",
        pushed.sideband
    );
    assert_eq!(server_main(&g, &token, "shop"), (first.to_string(), 1));

    // (2) A one-file commit made with libgit2 fast-forwards main.
    let header = "export default function Header({ title }) { return <h1 className=\"title\">{title}</h1> }\n";
    let second = commit_file(&repo, "src/components/Header.jsx", header);
    let pushed = push(&repo, &url, &token, &["refs/heads/main"]);
    pushed.assert_accepted("second push");
    assert!(
        pushed.sideband.contains("stored durably as generation 2"),
        "{}",
        pushed.sideband
    );
    assert_eq!(server_main(&g, &token, "shop"), (second.to_string(), 2));

    // (3) A libgit2 clone checks out main with both commits and the files as pushed.
    let cloned = clone(&url, &token, &work.path().join("clone"));
    let head = cloned.head().expect("clone has a HEAD");
    assert_eq!(head.name(), Some("refs/heads/main"));
    assert_eq!(head.target(), Some(second));
    let mut walk = cloned.revwalk().unwrap();
    walk.set_sorting(Sort::TOPOLOGICAL).unwrap();
    walk.push_head().unwrap();
    let history: Vec<Oid> = walk.map(|c| c.unwrap()).collect();
    assert_eq!(history, vec![second, first], "the clone's history of main");
    let tip = cloned.find_commit(second).unwrap();
    assert_eq!(tip.message(), Some("update src/components/Header.jsx"));
    assert_eq!(
        tip.tree_id(),
        repo.find_commit(second).unwrap().tree_id(),
        "the clone's tree differs from what was pushed"
    );
    let checkout = cloned.workdir().expect("a work tree");
    assert_eq!(
        std::fs::read_to_string(checkout.join("src/components/Header.jsx")).unwrap(),
        header
    );
    assert_eq!(
        std::fs::read(checkout.join("src/App.jsx")).unwrap(),
        std::fs::read(app.path.join("src/App.jsx")).unwrap()
    );
    assert_eq!(
        std::fs::read(checkout.join("package-lock.json")).unwrap(),
        std::fs::read(app.path.join("package-lock.json")).unwrap()
    );
    assert!(
        cloned.statuses(None).unwrap().is_empty(),
        "the fresh checkout is not clean"
    );
}

#[test]
fn libgit2_push_with_a_wrong_token_fails_authentication_and_changes_nothing() {
    let s = Seeded::new("wrong");
    let store = s.node.store_dir();
    let before = store_snapshot(&store, "wrong");
    commit_file(&s.repo, "src/x.js", "export const X = 1;\n");
    let url = s.node.anonymous_git_url("wrong");

    let mut forged = s.token.clone();
    forged.pop();
    forged.push(if s.token.ends_with('a') { 'b' } else { 'a' });
    for bad in ["kiln_aaaaaaaaaaaa_notarealsecret", forged.as_str()] {
        let pushed = push(&s.repo, &url, bad, &["refs/heads/main"]);
        let err = match pushed.result {
            Ok(()) => panic!(
                "push with token {bad:?} succeeded; ref statuses {:?}",
                pushed.statuses
            ),
            Err(e) => e,
        };
        // gitstore answered every offered password with a new 401 challenge; libgit2 asks the
        // callback again each time and gives up after its replay limit ("too many redirects or
        // authentication replays"), before any pack is sent.
        assert!(
            pushed.credential_requests > 1,
            "token {bad:?}: libgit2 asked for credentials {} time(s); error: {err}",
            pushed.credential_requests
        );
        assert_eq!(err.class(), ErrorClass::Http, "token {bad:?}: {err:?}");
        assert!(
            err.message().contains("authentication"),
            "token {bad:?}: libgit2 did not say authentication failed: {err:?}"
        );
        assert!(
            pushed.statuses.is_empty(),
            "token {bad:?}: refs were reported: {:?}",
            pushed.statuses
        );
    }
    assert_eq!(store_snapshot(&store, "wrong"), before);
    assert_eq!(
        server_main(&s.node, &s.token, "wrong"),
        (s.seed.to_string(), 1)
    );
}

#[test]
fn libgit2_sees_the_refusal_of_a_tree_with_a_dotgit_directory() {
    let s = Seeded::new("target");
    let repo = &s.repo;
    // `.GIT/config`, the way an attacker would plant a repository config on a checkout of a
    // case-insensitive file system. The inner tree comes from a TreeBuilder.
    let config = repo
        .blob(b"[core]\n\tfsmonitor = touch /tmp/kiln-pwned\n")
        .unwrap();
    let mut inner = repo.treebuilder(None).unwrap();
    inner.insert("config", config, 0o100644).unwrap();
    let inner = inner.write().unwrap();
    // libgit2 protects its users: a TreeBuilder will not name an entry `.GIT` in any case...
    let mut root = repo.treebuilder(None).unwrap();
    let refused = match root.insert(".GIT", inner, 0o040000) {
        Ok(_) => panic!("libgit2's TreeBuilder accepted `.GIT`"),
        Err(e) => e,
    };
    assert!(refused.message().contains("invalid name"), "{refused:?}");
    // ...so the root tree is written to the object database as raw bytes, as a hostile client
    // (or another implementation) would.
    let mut raw = b"40000 .GIT\0".to_vec();
    raw.extend_from_slice(inner.as_bytes());
    let root = repo.odb().unwrap().write(ObjectType::Tree, &raw).unwrap();
    let entry = repo
        .find_tree(root)
        .unwrap()
        .get(0)
        .map(|e| e.name_bytes().to_vec());
    assert_eq!(entry.as_deref(), Some(b".GIT".as_slice()));

    let commit = commit_tree(repo, root, s.seed);
    let said = s.refused("target", commit, ".GIT");
    assert!(said.contains("reserved"), "{said}");
}

#[test]
fn libgit2_sees_the_refusal_of_a_symlink_escaping_the_checkout_built_with_tree_builder() {
    let s = Seeded::new("target");
    let repo = &s.repo;
    // The seed's files plus `src/up -> ../../outside`: one `..` reaches the root, the second
    // leaves the checkout. Built entirely with libgit2's TreeBuilder.
    let seed_tree = repo.find_commit(s.seed).unwrap().tree().unwrap();
    let src = seed_tree
        .get_name("src")
        .expect("the app has src/")
        .to_object(repo)
        .unwrap()
        .peel_to_tree()
        .unwrap();
    let target = repo.blob(b"../../outside").unwrap();
    let mut src_builder = repo.treebuilder(Some(&src)).unwrap();
    src_builder.insert("up", target, 0o120000).unwrap();
    let src = src_builder.write().unwrap();
    let mut root = repo.treebuilder(Some(&seed_tree)).unwrap();
    root.insert("src", src, 0o040000).unwrap();
    let root = root.write().unwrap();

    let commit = commit_tree(repo, root, s.seed);
    let said = s.refused("target", commit, "src/up");
    assert!(said.contains("outside the repository"), "{said}");
}
