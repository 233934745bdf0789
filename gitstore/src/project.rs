//! Project ids: the one name a project has in URLs, blob keys, directories and DNS labels.

use std::fmt;

/// A validated project id: `[a-z0-9][a-z0-9-]{0,62}` without `--`.
///
/// The rule makes one string safe everywhere a project name appears: a DNS label (preview origins),
/// a URL path segment, a blob-storage prefix and a directory name. `--` is reserved: pinned build
/// hosts are `<build>--<project>`, which must never name another project. Parsing is the only way
/// to get one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ProjectId(String);

/// The id broke the naming rule; the message states the rule so a client can fix its request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid project id {shown:?}: use 1 to 63 characters from a-z, 0-9 and '-', starting with a letter or digit, with no '--'")]
pub struct InvalidProjectId {
    shown: String,
}

impl ProjectId {
    pub fn parse(s: &str) -> Result<Self, InvalidProjectId> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && !s.contains("--");
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            // Echo at most a short prefix: the id comes from an untrusted URL.
            Err(InvalidProjectId {
                shown: s.chars().take(70).collect(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ProjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_shape() {
        for ok in ["a", "0", "my-app", "a1-b2-c3", &"x".repeat(63), "9-"] {
            assert!(ProjectId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else_with_the_rule() {
        for bad in [
            "",
            "-a",
            "A",
            "my_app",
            "a.b",
            "a/b",
            "..",
            "é",
            " a",
            "a ",
            &"x".repeat(64),
            "7--shop",
            "a--b",
        ] {
            let err = ProjectId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("a-z, 0-9 and '-'"), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn parse_agrees_with_the_regex(s in "\\PC{0,70}") {
            let re_ok = !s.is_empty() && s.len() <= 63
                && s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.contains("--");
            prop_assert_eq!(ProjectId::parse(&s).is_ok(), re_ok);
        }
    }
}
