//! nginx's configuration, rendered from the templates in `nginx/` with Kiln's settings.
//!
//! `kiln nginx render` prints nginx.conf (or writes it atomically with `--out`); `kiln nginx
//! check` runs `nginx -t` on a rendering and says what nginx objects to. The templates are
//! embedded, so the binary renders anywhere; `--templates DIR` swaps in an edited copy.
//!
//! Every value is validated before it reaches a template: nginx.conf is a language, and a `;`,
//! `$`, quote or newline pasted into it unchecked would change what the configuration means.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

const CONF_TEMPLATE: &str = include_str!("../../nginx/nginx.conf.tera");
const PAGE_TEMPLATE: &str = include_str!("../../nginx/404.html.tera");
const CONF_NAME: &str = "nginx.conf.tera";
const PAGE_NAME: &str = "404.html.tera";

/// Project ids as nginx matches them: the rule of `gitstore::ProjectId`.
const PROJECT_RE: &str = "[a-z0-9][a-z0-9-]{0,62}";

/// What `{project}` stands for while the preview URL is parsed (braces are not valid in a host).
const PROJECT_PLACEHOLDER: &str = "kiln-project-placeholder";

/// Replaced by nginx's `$kiln_project` after the page is escaped (which would mangle the `$`).
const PAGE_PROJECT_SENTINEL: &str = "KILNPROJECTSENTINEL";

/// Paths of the front door: a project with one of these ids is not reachable when previews are
/// served at the root path.
const FRONT_DOOR_PATHS: &[&str] = &[
    "git",
    "api",
    "gitstore",
    "sync-project",
    "build",
    "cancel",
    "status",
    "logs",
    "share",
    "healthz",
];

#[derive(clap::Args)]
pub(crate) struct Args {
    // Boxed: the settings would make this the largest of the CLI's commands by far.
    #[command(subcommand)]
    cmd: Box<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Print nginx.conf for these settings, or write it atomically with --out.
    Render {
        #[command(flatten)]
        settings: Settings,
        /// Write here (through a temporary file and a rename) instead of printing.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Render to a temporary file and run `nginx -t -c` on it.
    Check {
        #[command(flatten)]
        settings: Settings,
        /// The nginx binary to test with.
        #[arg(
            long,
            env = "KILN_NGINX_BIN",
            default_value = "nginx",
            value_name = "PATH"
        )]
        nginx: PathBuf,
    },
}

/// The settings nginx.conf is rendered from: the same KILN_* variables the systemd units and
/// `make up` give gitstore and the agent.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct Settings {
    /// The front door (previews and the APIs); plain HTTP, or the redirect to HTTPS with TLS.
    #[arg(
        long,
        env = "KILN_HTTP_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    http_listen: String,
    /// Where HTTPS listens when a certificate is set [default: the HTTP address, port 443].
    #[arg(long, env = "KILN_HTTPS_LISTEN", value_name = "ADDR")]
    https_listen: Option<String>,
    /// gitstore's listen address, the upstream of /git/ and /api/.
    #[arg(
        long,
        env = "KILN_GITSTORE_LISTEN",
        default_value = "127.0.0.1:7070",
        value_name = "ADDR"
    )]
    gitstore_listen: String,
    /// The agent's listen address, the upstream of /build/, /status/, /logs/ and /healthz.
    #[arg(
        long,
        env = "KILN_AGENT_LISTEN",
        default_value = "127.0.0.1:7080",
        value_name = "ADDR"
    )]
    agent_listen: String,
    /// The agent's publish directory: <dir>/<project>/current/.
    #[arg(
        long,
        env = "KILN_PUBLISH_DIR",
        default_value = "/var/lib/kiln-agent/www",
        value_name = "DIR"
    )]
    publish_dir: PathBuf,
    /// Where previews are served: a path (http://host:8080/preview -> /preview/<project>/) or
    /// one origin per project (https://{project}.preview.example.com).
    #[arg(
        long,
        env = "KILN_PREVIEW_URL",
        default_value = "http://127.0.0.1:8080/preview",
        value_name = "URL"
    )]
    preview_url: String,
    /// Space-separated origins allowed to frame previews [default: any, frame-ancestors *].
    #[arg(long, env = "KILN_GENERATOR_ORIGINS", value_name = "ORIGINS")]
    generator_origins: Option<String>,
    // Strings, not paths: an env file may set them empty to mean "no TLS", which clap's path
    // parser refuses.
    /// TLS certificate (a wildcard one in origin mode); with --tls-key, serves HTTPS.
    #[arg(long, env = "KILN_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<String>,
    /// The certificate's private key.
    #[arg(long, env = "KILN_TLS_KEY", value_name = "FILE")]
    tls_key: Option<String>,
    /// nginx's pid file and temporary files; must exist and be traversable by the workers.
    #[arg(
        long,
        env = "KILN_NGINX_RUNTIME_DIR",
        default_value = "/run/kiln-nginx",
        value_name = "DIR"
    )]
    runtime_dir: PathBuf,
    /// A file, or `stderr` (the journal under systemd) [default: <runtime-dir>/error.log].
    #[arg(long, env = "KILN_NGINX_ERROR_LOG", value_name = "FILE|stderr")]
    error_log: Option<String>,
    /// A file, `syslog:...`, or `off`.
    #[arg(
        long,
        env = "KILN_NGINX_ACCESS_LOG",
        default_value = "off",
        value_name = "FILE|off"
    )]
    access_log: String,
    /// The user nginx's workers run as when the master runs as root; empty for nginx's default.
    #[arg(
        long,
        env = "KILN_NGINX_USER",
        default_value = "www-data",
        value_name = "USER"
    )]
    user: String,
    /// Where dynamic modules are looked for: brotli_static is used when its module is there.
    #[arg(
        long,
        env = "KILN_NGINX_MODULES_DIR",
        default_value = "/usr/lib/nginx/modules",
        value_name = "DIR"
    )]
    modules_dir: PathBuf,
    /// A front door for several build VMs: the agents' API addresses (comma or space separated).
    /// Each preview request asks one of them (`/route/<project>`) which VM's nginx serves the
    /// project, and is proxied there; nothing is served from this machine's disk.
    #[arg(
        long,
        env = "KILN_ROUTE_AGENTS",
        value_name = "ADDRS",
        default_value = ""
    )]
    route_agents: String,
    /// Read nginx.conf.tera and 404.html.tera from DIR instead of the built-in copies.
    #[arg(long, env = "KILN_NGINX_TEMPLATES", value_name = "DIR")]
    templates: Option<PathBuf>,
}

/// Why a configuration could not be rendered or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenderError {
    #[error("{setting}={value:?}: {reason}")]
    Setting {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("reading template {path}")]
    ReadTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {name}: {}", tera_chain(source))]
    Template {
        name: &'static str,
        #[source]
        source: tera::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Tera's Display names only the outermost step ("Failed to render"): the cause is in the chain.
fn tera_chain(e: &tera::Error) -> String {
    let mut out = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        let _ = write!(out, ": {c}");
        cur = c.source();
    }
    out
}

fn bad(setting: &'static str, value: impl Into<String>, reason: impl Into<String>) -> RenderError {
    RenderError::Setting {
        setting,
        value: value.into(),
        reason: reason.into(),
    }
}

pub(crate) fn run(a: Args) -> anyhow::Result<()> {
    match *a.cmd {
        Cmd::Render { settings, out } => {
            let r = render(&settings)?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            match out {
                Some(path) => write_atomically(&path, r.conf.as_bytes())?,
                None => print!("{}", r.conf),
            }
            Ok(())
        }
        Cmd::Check { settings, nginx } => check(&settings, &nginx),
    }
}

/// A rendered nginx.conf and what the operator should know about it.
#[derive(Debug)]
pub(crate) struct Rendered {
    pub(crate) conf: String,
    pub(crate) warnings: Vec<String>,
}

#[derive(serde::Serialize)]
struct Context {
    mode: &'static str,
    preview_url: String,
    path_prefix: String,
    path_prefix_re: String,
    origin_domain: String,
    origin_domain_re: String,
    project_re: &'static str,
    http_listen: String,
    /// The `listen` parameters of the servers that serve content.
    listen: String,
    tls: Option<Tls>,
    gitstore: String,
    agent: String,
    publish_dir: String,
    runtime_dir: String,
    error_log: String,
    access_log: String,
    user: Option<String>,
    brotli_module: Option<String>,
    frame_ancestors: String,
    pages: Pages,
    /// Agents asked where a project's previews are (front door mode); empty: served from disk.
    route_agents: Vec<String>,
}

#[derive(serde::Serialize)]
struct Tls {
    cert: String,
    key: String,
    /// ":8443" when HTTPS is not on 443, for the redirect from HTTP.
    port_suffix: String,
}

#[derive(serde::Serialize)]
struct Pages {
    not_found: String,
    no_preview: String,
}

/// How previews are addressed, from KILN_PREVIEW_URL.
#[derive(Debug, PartialEq, Eq)]
enum Previews {
    /// `/prefix/<project>/` on the front door; prefix is "" or "/a/b".
    Path { prefix: String },
    /// `<project>.<domain>`, each its own origin.
    Origin { domain: String },
}

pub(crate) fn render(s: &Settings) -> Result<Rendered, RenderError> {
    let mut warnings = Vec::new();
    let previews = previews(&s.preview_url)?;
    let http_listen = listen_addr("KILN_HTTP_LISTEN", &s.http_listen)?;
    let tls = match (non_empty_path(&s.tls_cert), non_empty_path(&s.tls_key)) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let https = match s.https_listen.as_deref().filter(|v| !v.trim().is_empty()) {
                Some(v) => listen_addr("KILN_HTTPS_LISTEN", v)?,
                None => SocketAddr::new(http_listen.ip(), 443),
            };
            if https == http_listen {
                return Err(bad(
                    "KILN_HTTPS_LISTEN",
                    https.to_string(),
                    "is the same address as KILN_HTTP_LISTEN, which redirects to it",
                ));
            }
            Some((
                https,
                Tls {
                    cert: conf_path("KILN_TLS_CERT", cert)?,
                    key: conf_path("KILN_TLS_KEY", key)?,
                    port_suffix: if https.port() == 443 {
                        String::new()
                    } else {
                        format!(":{}", https.port())
                    },
                },
            ))
        }
        (Some(_), None) => {
            return Err(bad(
                "KILN_TLS_KEY",
                "",
                "is needed with KILN_TLS_CERT: set both or neither",
            ))
        }
        (None, Some(_)) => {
            return Err(bad(
                "KILN_TLS_CERT",
                "",
                "is needed with KILN_TLS_KEY: set both or neither",
            ))
        }
    };
    let listen = match &tls {
        // `http2` as a listen parameter: the `http2` directive needs nginx 1.25.1, and Debian 12
        // ships 1.22 (newer nginx accepts the parameter with a deprecation warning).
        Some((https, _)) => format!("{https} ssl http2"),
        None => http_listen.to_string(),
    };
    let publish_dir = conf_path("KILN_PUBLISH_DIR", &s.publish_dir)?;
    let runtime_dir = conf_path("KILN_NGINX_RUNTIME_DIR", &s.runtime_dir)?;
    let error_log = match s.error_log.as_deref().map(str::trim) {
        None | Some("") => format!("\"{runtime_dir}/error.log\""),
        Some("stderr") => "stderr".to_owned(),
        Some(v) => format!("\"{}\"", conf_path("KILN_NGINX_ERROR_LOG", Path::new(v))?),
    };
    let access_log = match s.access_log.trim() {
        "" | "off" => "off".to_owned(),
        v if v.starts_with("syslog:") => {
            if !v[7..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":/=_.,-".contains(&b))
            {
                return Err(bad(
                    "KILN_NGINX_ACCESS_LOG",
                    v,
                    "a syslog target may use only letters, digits and :/=_.,-",
                ));
            }
            v.to_owned()
        }
        v => format!("\"{}\"", conf_path("KILN_NGINX_ACCESS_LOG", Path::new(v))?),
    };
    let user = match s.user.split_whitespace().collect::<Vec<_>>().as_slice() {
        [] => None,
        names @ ([_] | [_, _]) => {
            for n in names {
                let ok = n.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_lowercase()
                        || b == b'_'
                        || (i > 0 && (b.is_ascii_digit() || b == b'-'))
                });
                if !ok {
                    return Err(bad(
                        "KILN_NGINX_USER",
                        &s.user,
                        "give a user name, optionally followed by a group name",
                    ));
                }
            }
            Some(names.join(" "))
        }
        _ => {
            return Err(bad(
                "KILN_NGINX_USER",
                &s.user,
                "give a user name, optionally followed by a group name",
            ))
        }
    };
    let brotli = s.modules_dir.join("ngx_http_brotli_static_module.so");
    let brotli_module = if brotli.is_file() {
        Some(conf_path("KILN_NGINX_MODULES_DIR", &brotli)?)
    } else {
        None
    };

    let (mode, path_prefix, origin_domain) = match &previews {
        Previews::Path { prefix } => {
            if prefix.is_empty() {
                warnings.push(format!(
                    "previews are served at /<project>/, beside the front door's own paths: \
                     projects named {} cannot be reached; give KILN_PREVIEW_URL a path such as /preview",
                    FRONT_DOOR_PATHS.join(", ")
                ));
            }
            ("path", prefix.clone(), String::new())
        }
        Previews::Origin { domain } => ("origin", String::new(), domain.clone()),
    };

    let (conf_src, page_src) = templates(s.templates.as_deref())?;
    let mut tera = tera::Tera::default();
    tera.autoescape_on(vec![".html.tera"]);
    tera.add_raw_template(PAGE_NAME, &page_src)
        .map_err(|source| RenderError::Template {
            name: PAGE_NAME,
            source,
        })?;
    tera.add_raw_template(CONF_NAME, &conf_src)
        .map_err(|source| RenderError::Template {
            name: CONF_NAME,
            source,
        })?;
    let page = |project: Option<&str>| -> Result<String, RenderError> {
        let mut ctx = tera::Context::new();
        ctx.insert("project", &project.unwrap_or(""));
        let html = tera
            .render(PAGE_NAME, &ctx)
            .map_err(|source| RenderError::Template {
                name: PAGE_NAME,
                source,
            })?;
        Ok(nginx_string(html.trim()).replace(PAGE_PROJECT_SENTINEL, "${kiln_project}"))
    };
    let pages = Pages {
        not_found: page(None)?,
        no_preview: page(Some(PAGE_PROJECT_SENTINEL))?,
    };

    let ctx = Context {
        mode,
        preview_url: s.preview_url.trim().to_owned(),
        path_prefix_re: regex_escape(&path_prefix),
        path_prefix,
        origin_domain_re: regex_escape(&origin_domain),
        origin_domain,
        project_re: PROJECT_RE,
        http_listen: http_listen.to_string(),
        listen,
        tls: tls.map(|(_, t)| t),
        gitstore: upstream("KILN_GITSTORE_LISTEN", &s.gitstore_listen)?,
        agent: upstream("KILN_AGENT_LISTEN", &s.agent_listen)?,
        publish_dir,
        runtime_dir,
        error_log,
        access_log,
        user,
        brotli_module,
        frame_ancestors: frame_ancestors(s.generator_origins.as_deref())?,
        pages,
        route_agents: s
            .route_agents
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|a| !a.is_empty())
            .map(|a| upstream("KILN_ROUTE_AGENTS", a))
            .collect::<Result<_, _>>()?,
    };
    let ctx = tera::Context::from_serialize(&ctx).map_err(|source| RenderError::Template {
        name: CONF_NAME,
        source,
    })?;
    let conf = tera
        .render(CONF_NAME, &ctx)
        .map_err(|source| RenderError::Template {
            name: CONF_NAME,
            source,
        })?;
    // Tera keeps the newline after the template's leading comment.
    let conf = conf.trim_start().to_owned();
    Ok(Rendered { conf, warnings })
}

fn templates(dir: Option<&Path>) -> Result<(String, String), RenderError> {
    let Some(dir) = dir else {
        return Ok((CONF_TEMPLATE.to_owned(), PAGE_TEMPLATE.to_owned()));
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| RenderError::ReadTemplate { path, source })
    };
    Ok((read(CONF_NAME)?, read(PAGE_NAME)?))
}

fn previews(url: &str) -> Result<Previews, RenderError> {
    const S: &str = "KILN_PREVIEW_URL";
    const PATH_RULE: &str =
        "its path may only hold segments of letters, digits and ._~- (e.g. /preview)";
    let url = url.trim();
    // The URL parser drops tabs and newlines silently; the rendering quotes the URL verbatim.
    if url.chars().any(char::is_control) {
        return Err(bad(S, url, "remove the control characters"));
    }
    let origin_mode = url.contains("{project}");
    let parsed = url::Url::parse(&url.replace("{project}", PROJECT_PLACEHOLDER)).map_err(|e| {
        bad(
            S,
            url,
            format!("not a URL ({e}); use e.g. http://127.0.0.1:8080/preview"),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(S, url, "use an http:// or https:// URL"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad(S, url, "remove the query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(S, url, "remove the user name and password"));
    }
    let host = parsed.host_str().unwrap_or_default();
    if origin_mode {
        let domain = host
            .strip_prefix(PROJECT_PLACEHOLDER)
            .and_then(|d| d.strip_prefix('.'))
            .filter(|_| url.matches("{project}").count() == 1)
            .ok_or_else(|| {
                bad(
                    S,
                    url,
                    "{project} must be the first label of the host and appear once, \
                     e.g. https://{project}.preview.example.com",
                )
            })?;
        let labels_ok = domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !labels_ok || domain.len() > 253 {
            return Err(bad(S, url, "the domain after {project}. is not a DNS name"));
        }
        // The agent builds origin-mode apps with Vite's base "/".
        if parsed.path() != "/" {
            return Err(bad(
                S,
                url,
                "with {project} in the host, previews are served at / of their origin: remove the path",
            ));
        }
        Ok(Previews::Origin {
            domain: domain.to_owned(),
        })
    } else {
        let prefix = parsed.path().trim_end_matches('/');
        // The parser resolves "." and ".." and percent-encodes; the agent uses the text as given.
        let written = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("");
        if written.trim_end_matches('/') != prefix {
            return Err(bad(S, url, PATH_RULE));
        }
        let ok = prefix.split('/').skip(1).all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        });
        if !ok {
            return Err(bad(S, url, PATH_RULE));
        }
        let first = prefix.split('/').nth(1).unwrap_or("");
        if FRONT_DOOR_PATHS.contains(&first) {
            return Err(bad(
                S,
                url,
                format!("/{first}/ belongs to the front door: choose another path, e.g. /preview"),
            ));
        }
        Ok(Previews::Path {
            prefix: prefix.to_owned(),
        })
    }
}

fn listen_addr(setting: &'static str, v: &str) -> Result<SocketAddr, RenderError> {
    v.trim().parse().map_err(|_| {
        bad(
            setting,
            v,
            "use IP:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:80 or [::]:80",
        )
    })
}

/// An upstream to reach a service listening on `v`: a wildcard address is reached on loopback.
fn upstream(setting: &'static str, v: &str) -> Result<String, RenderError> {
    let mut a = listen_addr(setting, v)?;
    if a.ip().is_unspecified() {
        a.set_ip(match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(a.to_string())
}

fn non_empty_path(p: &Option<String>) -> Option<&Path> {
    p.as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(Path::new)
}

/// An absolute path, without a trailing slash, safe inside a double-quoted nginx string.
fn conf_path(setting: &'static str, p: &Path) -> Result<String, RenderError> {
    let shown = p.display().to_string();
    let s = p
        .to_str()
        .ok_or_else(|| bad(setting, &shown, "is not valid UTF-8"))?;
    if !p.is_absolute() {
        return Err(bad(setting, s, "use an absolute path"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || matches!(c, '"' | '\'' | '\\' | '$' | ';' | '{' | '}'))
    {
        return Err(bad(
            setting,
            s,
            format!("{c:?} cannot appear in a path nginx is given"),
        ));
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// The CSP `frame-ancestors` sources: each origin checked, `*` when none is configured.
fn frame_ancestors(v: Option<&str>) -> Result<String, RenderError> {
    const S: &str = "KILN_GENERATOR_ORIGINS";
    let tokens: Vec<&str> = v.unwrap_or("").split_whitespace().collect();
    if tokens.is_empty() {
        return Ok("*".to_owned());
    }
    let mut out = Vec::new();
    for t in &tokens {
        let source = match *t {
            "*" | "'self'" | "https:" | "http:" => t.to_string(),
            "'none'" if tokens.len() == 1 => t.to_string(),
            _ => origin_source(t).ok_or_else(|| {
                bad(
                    S,
                    *t,
                    "give origins like https://app.example.com or http://localhost:5173 \
                     (scheme, host, optional port; no path), separated by spaces",
                )
            })?,
        };
        out.push(source);
    }
    Ok(out.join(" "))
}

/// `scheme://host[:port]` (host may start with `*.`), with a trailing `/` dropped.
fn origin_source(t: &str) -> Option<String> {
    let (scheme, rest) = t.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_body = host.strip_prefix("*.").unwrap_or(host);
    let host_ok = !host_body.is_empty()
        && host_body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        || (host.starts_with('[')
            && host.ends_with(']')
            && host[1..host.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':'));
    let port_ok = port.is_none_or(|p| p == "*" || (!p.is_empty() && p.parse::<u16>().is_ok()));
    (host_ok && port_ok).then(|| t.strip_suffix('/').unwrap_or(t).to_ascii_lowercase())
}

/// Text for a single-quoted nginx string. `$` would start a variable and nginx has no escape for
/// it, so it becomes the HTML entity (the text is HTML).
fn nginx_string(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\'', "\\'")
        .replace('$', "&#36;")
}

/// A literal for a PCRE pattern; inputs are already limited to URL-safe characters.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && !matches!(c, '/' | '-' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Writes through a temporary file in the same directory, fsynced, then renamed over `path`:
/// a running nginx reloading meanwhile reads the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RenderError> {
    let err = |source| RenderError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".nginx.conf.")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn check(s: &Settings, nginx: &Path) -> anyhow::Result<()> {
    let r = render(s)?;
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    anyhow::ensure!(
        s.runtime_dir.is_dir(),
        "the runtime directory {} does not exist: create it (under systemd, \
         RuntimeDirectory=kiln-nginx) or pass --runtime-dir",
        s.runtime_dir.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("kiln-nginx-check-")
        .tempdir()?;
    let file = dir.path().join("nginx.conf");
    std::fs::write(&file, &r.conf)?;
    let out = match Command::new(nginx).arg("-t").arg("-c").arg(&file).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{} not found: install nginx (apt-get install -y nginx) or pass --nginx",
            nginx.display()
        ),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("running {}", nginx.display()))),
    };
    let report = explain(
        &String::from_utf8_lossy(&out.stderr),
        &file.to_string_lossy(),
        &r.conf,
    );
    if out.status.success() {
        // What nginx warns about (e.g. `user` when not run as root), without its "syntax is ok".
        for l in report.lines().filter(|l| !l.starts_with("nginx: ")) {
            eprintln!("{l}");
        }
        println!("nginx -t accepts the configuration");
        Ok(())
    } else {
        eprint!("{report}");
        anyhow::bail!("nginx -t rejected the rendered configuration (see above)")
    }
}

/// nginx -t's output with the temporary file's name replaced, and each line it points at quoted
/// from the rendering (the file is gone once the check returns).
fn explain(output: &str, file: &str, conf: &str) -> String {
    let lines: Vec<&str> = conf.lines().collect();
    let mut out = String::new();
    for l in output.lines() {
        let _ = writeln!(out, "{}", l.replace(file, "nginx.conf"));
        if let Some(n) = l
            .split_once(&format!("{file}:"))
            .and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|n| (1..=lines.len()).contains(n))
        {
            let _ = writeln!(out, "    line {n}: {}", lines[n - 1].trim());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["kiln-nginx"];
        argv.extend(args);
        Cli::parse_from(argv).s
    }

    fn render_with(args: &[&str]) -> Result<Rendered, RenderError> {
        render(&settings(args))
    }

    fn setting_error(args: &[&str]) -> String {
        match render_with(args) {
            Err(e @ RenderError::Setting { .. }) => e.to_string(),
            other => panic!("expected a setting error, got {other:?}"),
        }
    }

    #[test]
    fn path_mode_serves_under_the_preview_urls_path() {
        let r = render_with(&["--preview-url", "http://127.0.0.1:8080/preview/"]).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert!(r.conf.contains(
            r#"location ~ "^/preview/(?<kiln_project>[a-z0-9][a-z0-9-]{0,62})(?<kiln_path>/.*)$""#
        ));
        assert!(!r.conf.contains("server_name \"~^"), "no per-project hosts");
        assert!(r.conf.contains("frame-ancestors *"));
    }

    #[test]
    fn origin_mode_matches_project_hosts_and_drops_path_mode() {
        let r = render_with(&["--preview-url", "https://{project}.preview.example.com"]).unwrap();
        assert!(r.conf.contains(
            r#"server_name "~^(?<kiln_project>[a-z0-9][a-z0-9-]{0,62})\.preview\.example\.com$";"#
        ));
        assert!(!r.conf.contains("^/preview/"));
    }

    #[test]
    fn a_root_path_warns_about_shadowed_project_ids() {
        let r = render_with(&["--preview-url", "https://preview.example.com"]).unwrap();
        assert!(r.warnings[0].contains("git, api"), "{:?}", r.warnings);
    }

    #[test]
    fn rejects_preview_urls_nginx_cannot_serve_as_the_agent_builds_them() {
        for (url, says) in [
            ("https://{project}.example.com/app", "remove the path"),
            ("https://app.{project}.example.com", "first label"),
            ("https://{project}.{project}.example.com", "first label"),
            ("http://127.0.0.1:8080/git", "front door"),
            ("http://127.0.0.1:8080/pre view", "segments"),
            ("http://127.0.0.1:8080/a/../b", "segments"),
            ("ftp://example.com/preview", "http"),
            ("http://127.0.0.1:8080/preview?x=1", "query"),
            ("/preview", "not a URL"),
        ] {
            let e = setting_error(&["--preview-url", url]);
            assert!(
                e.contains("KILN_PREVIEW_URL") && e.contains(says),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn frame_ancestors_takes_checked_origins_only() {
        let r = render_with(&[
            "--generator-origins",
            "https://gen.example.com  http://localhost:5173/ https://*.example.org",
        ])
        .unwrap();
        assert!(r.conf.contains(
            "frame-ancestors https://gen.example.com http://localhost:5173 https://*.example.org\""
        ));
        for hostile in [
            "https://a.example.com; script-src *",
            "https://a.example.com/path",
            "javascript:alert(1)",
            "https://a.example.com\"",
            "'unsafe-inline'",
        ] {
            let e = setting_error(&["--generator-origins", hostile]);
            assert!(e.contains("KILN_GENERATOR_ORIGINS"), "{hostile}: {e}");
        }
    }

    #[test]
    fn rejects_paths_that_would_change_the_configs_meaning() {
        for p in [
            "/srv/www;",
            "/srv/$www",
            "/srv/\"www",
            "relative/www",
            "/srv/{x}",
        ] {
            let e = setting_error(&["--publish-dir", p]);
            assert!(e.contains("KILN_PUBLISH_DIR"), "{p}: {e}");
        }
    }

    #[test]
    fn tls_needs_both_files_and_redirects_to_the_https_port() {
        let e = setting_error(&["--tls-cert", "/etc/kiln/cert.pem"]);
        assert!(e.contains("KILN_TLS_KEY"), "{e}");
        let r = render_with(&[
            "--tls-cert",
            "/etc/kiln/cert.pem",
            "--tls-key",
            "/etc/kiln/key.pem",
            "--http-listen",
            "0.0.0.0:80",
        ])
        .unwrap();
        assert!(r
            .conf
            .contains("listen 0.0.0.0:443 ssl http2 default_server;"));
        assert!(r.conf.contains("return 301 https://$host$request_uri;"));
        let r = render_with(&[
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--https-listen",
            "127.0.0.1:8443",
        ])
        .unwrap();
        assert!(r
            .conf
            .contains("return 301 https://$host:8443$request_uri;"));
    }

    #[test]
    fn a_front_door_routes_previews_to_the_agents_and_serves_nothing_from_disk() {
        for mode in [
            "http://127.0.0.1:8080/preview",
            "https://{project}.preview.example.com",
        ] {
            let r = render_with(&[
                "--preview-url",
                mode,
                "--route-agents",
                "10.0.0.4:7080, 10.0.0.5:7080",
            ])
            .unwrap();
            assert!(
                r.conf.contains("server 10.0.0.4:7080 max_fails=1"),
                "{mode}"
            );
            assert!(
                r.conf.contains("server 10.0.0.5:7080 max_fails=1"),
                "{mode}"
            );
            assert!(r.conf.contains("auth_request /_kiln_route;"), "{mode}");
            assert!(!r.conf.contains("/current"), "{mode}: serves from disk");
        }
        let e = setting_error(&["--route-agents", "10.0.0.4:7080;deny"]);
        assert!(e.contains("KILN_ROUTE_AGENTS"), "{e}");
    }

    #[test]
    fn wildcard_upstreams_are_reached_on_loopback() {
        let r = render_with(&[
            "--gitstore-listen",
            "0.0.0.0:7070",
            "--agent-listen",
            "[::]:7080",
        ])
        .unwrap();
        assert!(r.conf.contains("server 127.0.0.1:7070;"));
        assert!(r.conf.contains("server [::1]:7080;"));
    }

    #[test]
    fn the_404_page_is_one_nginx_string_with_the_project_filled_in_by_nginx() {
        let r = render_with(&[]).unwrap();
        let page = r
            .conf
            .split("return 404 '")
            .nth(2)
            .and_then(|rest| rest.split("';\n").next())
            .unwrap();
        assert!(page.contains("<code>${kiln_project}</code>"), "{page}");
        assert!(!page.contains(PAGE_PROJECT_SENTINEL));
        assert_eq!(page.matches('$').count(), 1, "{page}");
    }

    #[test]
    fn templates_can_be_overridden_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONF_NAME), "# custom {{ mode }}\n").unwrap();
        std::fs::write(dir.path().join(PAGE_NAME), "page").unwrap();
        let r = render_with(&["--templates", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(r.conf, "# custom path\n");
        std::fs::remove_file(dir.path().join(PAGE_NAME)).unwrap();
        let e = render_with(&["--templates", dir.path().to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains(PAGE_NAME), "{e}");
    }

    #[test]
    fn brotli_is_used_only_when_its_module_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().to_str().unwrap();
        let r = render_with(&["--modules-dir", modules]).unwrap();
        assert!(!r.conf.contains("brotli"));
        std::fs::write(dir.path().join("ngx_http_brotli_static_module.so"), "").unwrap();
        let r = render_with(&["--modules-dir", modules]).unwrap();
        assert!(r.conf.contains("load_module") && r.conf.contains("brotli_static on;"));
    }

    #[test]
    fn render_out_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nginx.conf");
        std::fs::write(&out, "old").unwrap();
        write_atomically(&out, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn explain_quotes_the_line_nginx_points_at() {
        let text = explain(
            "nginx: [emerg] unknown directive \"bogus\" in /tmp/x/nginx.conf:2\n",
            "/tmp/x/nginx.conf",
            "events {}\nbogus on;\n",
        );
        assert!(text.contains("in nginx.conf:2"), "{text}");
        assert!(text.contains("line 2: bogus on;"), "{text}");
    }
}
