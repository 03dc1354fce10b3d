//! Object URLs: the one place that decides what `s3://bucket/key` and `file:///path` mean and
//! which of them are acceptable. Spec validation, the object store and the CLI all parse through
//! here, so a key that escapes its prefix is refused the same way everywhere.

use std::fmt;

/// Why a URL was refused. The message is written for the person who typed the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("unsupported scheme in {0:?}: only s3:// and file:// are accepted")]
    Scheme(String),
    #[error("{0:?} has no bucket name")]
    NoBucket(String),
    #[error("bucket name in {0:?} is not a valid S3 bucket name")]
    BadBucket(String),
    #[error("{0:?} has a '..' or '.' path segment")]
    DotSegment(String),
    #[error("{0:?} has an empty path segment ('//')")]
    EmptySegment(String),
    #[error("file URL {0:?} must be absolute (file:///path)")]
    RelativeFile(String),
    #[error("{0:?} has a control character or backslash")]
    BadChar(String),
    #[error("{0:?} has no key (nothing after the bucket)")]
    NoKey(String),
}

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A bucket on the configured S3-compatible server.
    S3 { bucket: String },
    /// The local filesystem, rooted at `/`.
    File,
}

/// A parsed, checked object URL. `key` never starts with `/` and never holds `.`/`..` segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUrl {
    pub location: Location,
    /// For S3, the object key. For files, the absolute path without its leading `/`.
    pub key: String,
}

impl ObjectUrl {
    /// Parses a URL that names one object (a source, or an output file).
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        let url = Self::parse_prefix(raw)?;
        if url.key.is_empty() || url.key.ends_with('/') {
            return Err(UrlError::NoKey(raw.to_string()));
        }
        Ok(url)
    }

    /// Parses a URL that names a prefix (an output folder). A trailing `/` is kept in `key`,
    /// and an empty key (the bucket root) is allowed.
    pub fn parse_prefix(raw: &str) -> Result<Self, UrlError> {
        if raw.chars().any(|c| c.is_control() || c == '\\') {
            return Err(UrlError::BadChar(raw.to_string()));
        }
        let (location, path) = if let Some(rest) = raw.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(UrlError::NoBucket(raw.to_string()));
            }
            if !valid_bucket(bucket) {
                return Err(UrlError::BadBucket(raw.to_string()));
            }
            (
                Location::S3 {
                    bucket: bucket.to_string(),
                },
                key,
            )
        } else if let Some(rest) = raw.strip_prefix("file://") {
            // file://host/path is not something we can honour; only the empty host.
            let Some(abs) = rest.strip_prefix('/') else {
                return Err(UrlError::RelativeFile(raw.to_string()));
            };
            (Location::File, abs)
        } else {
            return Err(UrlError::Scheme(raw.to_string()));
        };
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        if !trimmed.is_empty() {
            for seg in trimmed.split('/') {
                match seg {
                    "" => return Err(UrlError::EmptySegment(raw.to_string())),
                    "." | ".." => return Err(UrlError::DotSegment(raw.to_string())),
                    _ => {}
                }
            }
        } else if path.starts_with('/') {
            return Err(UrlError::EmptySegment(raw.to_string()));
        }
        Ok(ObjectUrl {
            location,
            key: path.to_string(),
        })
    }

    /// Appends a relative name (such as `720p.mp4`) to a prefix URL. The name must be a single
    /// plain segment, so a rendition name can never climb out of the output prefix.
    pub fn join(&self, name: &str) -> Result<Self, UrlError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(UrlError::DotSegment(format!("{self}{name}")));
        }
        if name.chars().any(|c| c.is_control() || c == '\\') {
            return Err(UrlError::BadChar(name.to_string()));
        }
        let mut key = self.key.clone();
        if !key.is_empty() && !key.ends_with('/') {
            key.push('/');
        }
        key.push_str(name);
        Ok(ObjectUrl {
            location: self.location.clone(),
            key,
        })
    }

    /// The local path of a `file://` URL.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        match self.location {
            Location::File => Some(std::path::Path::new("/").join(&self.key)),
            Location::S3 { .. } => None,
        }
    }
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.as_bytes()
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && b.as_bytes()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::S3 { bucket } => write!(f, "s3://{bucket}/{}", self.key),
            Location::File => write!(f, "file:///{}", self.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_and_file() {
        let u = ObjectUrl::parse("s3://media/in/cat.mp4").expect("valid");
        assert_eq!(
            u.location,
            Location::S3 {
                bucket: "media".into()
            }
        );
        assert_eq!(u.key, "in/cat.mp4");
        assert_eq!(u.to_string(), "s3://media/in/cat.mp4");
        let f = ObjectUrl::parse("file:///tmp/x.mp4").expect("valid");
        assert_eq!(
            f.local_path().expect("file"),
            std::path::Path::new("/tmp/x.mp4")
        );
        assert_eq!(f.to_string(), "file:///tmp/x.mp4");
    }

    #[test]
    fn refuses_escapes_and_other_schemes() {
        let bad = [
            ("http://x/y", "Scheme"),
            ("s3:///key", "NoBucket"),
            ("s3://Media/key", "BadBucket"),
            ("s3://media/a/../b", "DotSegment"),
            ("s3://media/./b", "DotSegment"),
            ("s3://media//b", "EmptySegment"),
            ("file://relative/x", "RelativeFile"),
            ("file:///a/../../etc/passwd", "DotSegment"),
            ("s3://media/a\\b", "BadChar"),
            ("s3://media/a\nb", "BadChar"),
            ("s3://media/", "NoKey"),
        ];
        for (raw, want) in bad {
            let err = ObjectUrl::parse(raw).expect_err(raw);
            assert!(format!("{err:?}").starts_with(want), "{raw}: got {err:?}");
        }
    }

    #[test]
    fn prefixes_and_join() {
        let p = ObjectUrl::parse_prefix("s3://media/out/cat/").expect("valid");
        assert_eq!(
            p.join("720p.mp4").expect("join").to_string(),
            "s3://media/out/cat/720p.mp4"
        );
        let root = ObjectUrl::parse_prefix("s3://media").expect("valid");
        assert_eq!(root.join("a.mp4").expect("join").key, "a.mp4");
        assert!(p.join("../x").is_err());
        assert!(p.join("..").is_err());
        assert!(p.join("a/b").is_err());
    }
}
