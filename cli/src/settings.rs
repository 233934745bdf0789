//! Where gitstore and the agent are, which token to send, and the agent's own settings for
//! `kiln doctor`.
//!
//! Each value comes from the first of: a flag, the environment, `.kiln/local/credentials.env` in
//! the current directory (written by `make up`), `/etc/kiln/kiln.env` (a production box's service
//! settings), a default. Tokens come from the environment or those files only, never from a flag:
//! arguments are visible to every user in `ps`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `make up`'s settings, relative to the directory `kiln` runs in.
pub(crate) const LOCAL_CREDENTIALS: &str = ".kiln/local/credentials.env";
/// The service settings of a production box (systemd `EnvironmentFile=` format).
pub(crate) const SYSTEM_ENV: &str = "/etc/kiln/kiln.env";

/// Where a value came from, so messages can say what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A flag or the environment variable of that name.
    Env(&'static str),
    File(PathBuf),
    /// Derived from a listen address in the named file.
    Listen(PathBuf),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Env(var) => match flag_name(var) {
                "" => f.write_str(var),
                flag => write!(f, "--{flag} or {var}"),
            },
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Listen(p) => write!(f, "the listen address in {}", p.display()),
            Source::Default => f.write_str("the default"),
        }
    }
}

fn flag_name(var: &str) -> &'static str {
    match var {
        "KILN_GIT_URL" => "git-url",
        "KILN_AGENT_URL" => "agent-url",
        _ => "",
    }
}

/// A base URL and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) url: String,
    pub(crate) source: Source,
    /// The variable that sets it, for messages.
    pub(crate) var: &'static str,
}

impl Endpoint {
    /// Whether someone configured it (as opposed to the built-in default).
    pub(crate) fn configured(&self) -> bool {
        self.source != Source::Default
    }
}

/// Which token a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenUse {
    /// Reading or rebuilding: a client token for its own projects, or the admin token for all.
    Read,
    /// Pushing: only a client token owns projects.
    Push,
}

pub(crate) struct Settings {
    git_url: Option<String>,
    agent_url: Option<String>,
    prefer_admin: bool,
    /// Parsed env files, in lookup order.
    files: Vec<(PathBuf, HashMap<String, String>)>,
    /// Whether `make up`'s layout is here, so local paths are the defaults.
    local_root: Option<PathBuf>,
}

impl Settings {
    pub(crate) fn load(
        git_url: Option<String>,
        agent_url: Option<String>,
        prefer_admin: bool,
    ) -> Self {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let local = cwd.join(LOCAL_CREDENTIALS);
        let mut files = Vec::new();
        let mut local_root = None;
        if let Some(vars) = read_env_file(&local) {
            files.push((local.clone(), vars));
            local_root = local.parent().map(Path::to_owned);
        }
        if let Some(vars) = read_env_file(Path::new(SYSTEM_ENV)) {
            files.push((PathBuf::from(SYSTEM_ENV), vars));
        }
        Self {
            git_url: git_url.filter(|s| !s.is_empty()),
            agent_url: agent_url.filter(|s| !s.is_empty()),
            prefer_admin,
            files,
            local_root,
        }
    }

    /// `key` from the environment, then the env files.
    pub(crate) fn var(&self, key: &'static str) -> Option<(String, Source)> {
        if let Some(v) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
            return Some((v, Source::Env(key)));
        }
        self.files.iter().find_map(|(path, vars)| {
            vars.get(key)
                .filter(|v| !v.is_empty())
                .map(|v| (v.clone(), Source::File(path.clone())))
        })
    }

    /// Every `KILN_*` setting the env files give and the environment does not, for a child that
    /// reads its settings from the environment.
    pub(crate) fn file_env(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (_, vars) in &self.files {
            for (k, v) in vars {
                let set = std::env::var_os(k).is_some() || out.iter().any(|(o, _)| o == k);
                if k.starts_with("KILN_") && !set {
                    out.push((k.clone(), v.clone()));
                }
            }
        }
        out
    }

    pub(crate) fn git(&self) -> Endpoint {
        self.endpoint(
            self.git_url.clone(),
            "KILN_GIT_URL",
            "KILN_GITSTORE_LISTEN",
            "127.0.0.1:7070",
        )
    }

    pub(crate) fn agent(&self) -> Endpoint {
        self.endpoint(
            self.agent_url.clone(),
            "KILN_AGENT_URL",
            "KILN_AGENT_LISTEN",
            "127.0.0.1:7080",
        )
    }

    fn endpoint(
        &self,
        flag: Option<String>,
        var: &'static str,
        listen_var: &'static str,
        default_listen: &str,
    ) -> Endpoint {
        let (url, source) = if let Some(u) = flag {
            (u, Source::Env(var))
        } else if let Some((u, s)) = self.var(var) {
            (u, s)
        } else if let Some((addr, s)) = self.var(listen_var) {
            let from = match s {
                Source::File(p) => Source::Listen(p),
                other => other,
            };
            (url_for_listen(&addr), from)
        } else {
            (url_for_listen(default_listen), Source::Default)
        };
        Endpoint {
            url: url.trim_end_matches('/').to_owned(),
            source,
            var,
        }
    }

    /// The token to send, or a message saying how to provide one.
    pub(crate) fn token(&self, usage: TokenUse) -> anyhow::Result<String> {
        let client = self.var("KILN_TOKEN").map(|(t, _)| t);
        let admin = self.var("KILN_ADMIN_TOKEN").map(|(t, _)| t);
        match usage {
            TokenUse::Push => client.ok_or_else(|| {
                anyhow::anyhow!(
                    "no client token: set KILN_TOKEN to a client token (projects belong to the \
                     client that pushed them; the admin token cannot push). Create one with \
                     POST /api/clients or `kiln-gitstore create-client <name>`"
                )
            }),
            TokenUse::Read => {
                let pick = if self.prefer_admin {
                    admin.or(client)
                } else {
                    client.or(admin)
                };
                pick.ok_or_else(|| {
                    anyhow::anyhow!(
                        "no token: set KILN_TOKEN (a client token) or KILN_ADMIN_TOKEN, or run \
                         kiln in the directory where `make up` wrote {LOCAL_CREDENTIALS}"
                    )
                })
            }
        }
    }

    /// A setting of the agent's, with the default the agent itself would use here.
    pub(crate) fn agent_path(&self, key: &'static str) -> (PathBuf, Source) {
        if let Some((v, s)) = self.var(key) {
            return (PathBuf::from(v), s);
        }
        let local = |rel: &str| self.local_root.as_ref().map(|r| r.join(rel));
        let default = match key {
            "KILN_AGENT_STATE" => local("agent").unwrap_or_else(|| "/var/lib/kiln-agent".into()),
            "KILN_PUBLISH_DIR" => local("www").unwrap_or_else(|| "/var/lib/kiln-agent/www".into()),
            "KILN_AGENT_VOLUME" => self.agent_path("KILN_AGENT_STATE").0.join("volume"),
            "KILN_NODE" => "/usr/bin/node".into(),
            "KILN_PNPM" => "/usr/bin/pnpm".into(),
            _ => PathBuf::new(),
        };
        (default, Source::Default)
    }

    /// The blob store URL: set, or `make up`'s local store.
    pub(crate) fn store_url(&self) -> Option<(String, Source)> {
        self.var("KILN_STORE_URL").or_else(|| {
            let root = self.local_root.as_ref()?;
            Some((
                format!("file://{}", root.join("store").display()),
                Source::Default,
            ))
        })
    }
}

/// `http://` URL for a listen address; a wildcard address is reached on loopback.
pub(crate) fn url_for_listen(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}", a.port())
        }
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("http://[::1]:{}", a.port()),
        Ok(a) => format!("http://{a}"),
        Err(_) => format!("http://{listen}"),
    }
}

/// `KEY=VALUE` lines; `#` comments, blank lines, `export ` and matching quotes are allowed.
pub(crate) fn parse_env(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| v.strip_prefix(*a)?.strip_suffix(*b))
            .unwrap_or(v);
        out.insert(k.trim().to_owned(), v.to_owned());
    }
    out
}

fn read_env_file(path: &Path) -> Option<HashMap<String, String>> {
    std::fs::read_to_string(path).ok().map(|t| parse_env(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_parse_like_systemd_and_sh() {
        let vars = parse_env(
            "# written by make up\n\nKILN_TOKEN=kiln_abc_def\nexport KILN_GIT_URL=\"http://127.0.0.1:7070\"\n KILN_X = 'y' \nnot a line\n",
        );
        assert_eq!(vars["KILN_TOKEN"], "kiln_abc_def");
        assert_eq!(vars["KILN_GIT_URL"], "http://127.0.0.1:7070");
        assert_eq!(vars["KILN_X"], "y");
        assert_eq!(vars.len(), 3);
    }

    #[test]
    fn listen_addresses_become_reachable_urls() {
        assert_eq!(url_for_listen("0.0.0.0:7070"), "http://127.0.0.1:7070");
        assert_eq!(url_for_listen("[::]:7080"), "http://[::1]:7080");
        assert_eq!(url_for_listen("10.0.0.4:7070"), "http://10.0.0.4:7070");
        assert_eq!(url_for_listen("gitstore:7070"), "http://gitstore:7070");
    }
}
