//! The task spec, the public contract that publishers in any language write (ARCHITECTURE §5),
//! its ladder presets, and its validation. A spec is checked here once, before any row is
//! written; everything downstream works from the resolved [`ValidSpec`].

use crate::url::{ObjectUrl, UrlError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// One rung of the output ladder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rendition {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub video_kbps: u32,
    /// Ignored for sources without audio.
    #[serde(default = "default_audio_kbps")]
    pub audio_kbps: u32,
}

fn default_audio_kbps() -> u32 {
    128
}

/// The output container. `hls` is reserved for a later release and refused by validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    #[default]
    Mp4,
    Hls,
}

/// The x264 speed/quality trade-off. Names are x264's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecPreset {
    Ultrafast,
    Superfast,
    #[default]
    Veryfast,
    Faster,
    Fast,
    Medium,
    Slow,
}

impl CodecPreset {
    pub fn as_str(self) -> &'static str {
        match self {
            CodecPreset::Ultrafast => "ultrafast",
            CodecPreset::Superfast => "superfast",
            CodecPreset::Veryfast => "veryfast",
            CodecPreset::Faster => "faster",
            CodecPreset::Fast => "fast",
            CodecPreset::Medium => "medium",
            CodecPreset::Slow => "slow",
        }
    }
}

/// What a publisher asks for. Unknown fields are refused, so a misspelt optional field is an
/// error rather than a silent default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub source: String,
    pub output: String,
    /// A ladder preset name (`hd`, `sd`); `renditions` wins when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renditions: Option<Vec<Rendition>>,
    #[serde(default)]
    pub container: Container,
    #[serde(default)]
    pub codec_preset: CodecPreset,
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How many times the task may be claimed before a lost worker makes it `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The source's sha256 (64 hex digits) when the publisher knows it. The worker checks the
    /// pulled bytes against it: a mismatch is pulled once more, and a second mismatch fails
    /// the task (`source_checksum_mismatch`), since the stored object itself is then bad.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const MAX_WIDTH: u32 = 7680;
pub const MAX_HEIGHT: u32 = 4320;
pub const VIDEO_KBPS: (u32, u32) = (50, 200_000);
pub const AUDIO_KBPS: (u32, u32) = (16, 512);
pub const MAX_RENDITIONS: usize = 16;
pub const PRIORITY: (i32, i32) = (-1000, 1000);
pub const MAX_IDEMPOTENCY_KEY: usize = 200;
pub const MAX_ATTEMPTS: (u32, u32) = (1, 20);

/// One rung of a preset: `(name, width, height, video kbps, audio kbps)`.
pub type PresetRung = (&'static str, u32, u32, u32, u32);

/// The ladder presets by name.
pub const PRESETS: &[(&str, &[PresetRung])] = &[
    (
        "hd",
        &[
            ("1080p", 1920, 1080, 5000, 128),
            ("720p", 1280, 720, 3000, 128),
            ("480p", 854, 480, 1500, 96),
            ("360p", 640, 360, 800, 96),
        ],
    ),
    (
        "sd",
        &[("480p", 854, 480, 1200, 96), ("240p", 426, 240, 400, 64)],
    ),
];

/// The renditions of a named preset, or `None` for an unknown name.
pub fn preset(name: &str) -> Option<Vec<Rendition>> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, rungs)| {
        rungs
            .iter()
            .map(|&(name, width, height, video_kbps, audio_kbps)| Rendition {
                name: name.to_string(),
                width,
                height,
                video_kbps,
                audio_kbps,
            })
            .collect()
    })
}

/// What is wrong with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecProblem {
    Missing,
    BadUrl(UrlError),
    NotAPrefix,
    UnknownPreset(String),
    OutOfRange { min: i64, max: i64, got: i64 },
    Odd(u32),
    Duplicate(String),
    BadName(String),
    TooMany { max: usize },
    TooLong { max: usize },
    Unsupported(&'static str),
    NotSha256,
}

/// A spec refused by validation; `field` is a JSON path such as `renditions[1].width`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: SpecProblem,
}

impl fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpecProblem::Missing => f.write_str("is required"),
            SpecProblem::NotSha256 => f.write_str("must be 64 hexadecimal digits (a sha256)"),
            SpecProblem::BadUrl(e) => write!(f, "{e}"),
            SpecProblem::NotAPrefix => f.write_str("must be a prefix ending in '/'"),
            SpecProblem::UnknownPreset(p) => write!(
                f,
                "unknown preset {p:?} (known: {})",
                PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SpecProblem::OutOfRange { min, max, got } => {
                write!(f, "{got} is out of range {min}..={max}")
            }
            SpecProblem::Odd(v) => write!(f, "{v} must be even (4:2:0 chroma needs even sizes)"),
            SpecProblem::Duplicate(n) => write!(f, "duplicate rendition name {n:?}"),
            SpecProblem::BadName(n) => write!(
                f,
                "{n:?} is not a valid name (1-32 characters of a-z, A-Z, 0-9, '_', '-')"
            ),
            SpecProblem::TooMany { max } => write!(f, "at most {max} renditions"),
            SpecProblem::TooLong { max } => write!(f, "longer than {max} characters"),
            SpecProblem::Unsupported(what) => write!(f, "{what} is not supported yet"),
        }
    }
}

/// A spec that passed validation, with its ladder resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub source: ObjectUrl,
    pub output: ObjectUrl,
    pub renditions: Vec<Rendition>,
    pub spec: TaskSpec,
}

fn err(field: impl Into<String>, problem: SpecProblem) -> SpecError {
    SpecError {
        field: field.into(),
        problem,
    }
}

fn range(field: String, got: i64, (min, max): (i64, i64)) -> Result<(), SpecError> {
    if got < min || got > max {
        return Err(err(field, SpecProblem::OutOfRange { min, max, got }));
    }
    Ok(())
}

fn valid_name(n: &str) -> bool {
    (1..=32).contains(&n.len())
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

impl TaskSpec {
    /// Checks every field and resolves the ladder. The first problem found is returned.
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        if self.source.is_empty() {
            return Err(err("source", SpecProblem::Missing));
        }
        let source =
            ObjectUrl::parse(&self.source).map_err(|e| err("source", SpecProblem::BadUrl(e)))?;
        if self.output.is_empty() {
            return Err(err("output", SpecProblem::Missing));
        }
        if !self.output.ends_with('/') {
            return Err(err("output", SpecProblem::NotAPrefix));
        }
        let output = ObjectUrl::parse_prefix(&self.output)
            .map_err(|e| err("output", SpecProblem::BadUrl(e)))?;
        if self.container == Container::Hls {
            return Err(err("container", SpecProblem::Unsupported("hls")));
        }
        range(
            "priority".into(),
            i64::from(self.priority),
            (i64::from(PRIORITY.0), i64::from(PRIORITY.1)),
        )?;
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                return Err(err("idempotency_key", SpecProblem::Missing));
            }
            if key.chars().count() > MAX_IDEMPOTENCY_KEY {
                return Err(err(
                    "idempotency_key",
                    SpecProblem::TooLong {
                        max: MAX_IDEMPOTENCY_KEY,
                    },
                ));
            }
        }
        if let Some(h) = &self.source_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err("source_sha256", SpecProblem::NotSha256));
            }
        }
        if let Some(m) = self.max_attempts {
            range(
                "max_attempts".into(),
                i64::from(m),
                (i64::from(MAX_ATTEMPTS.0), i64::from(MAX_ATTEMPTS.1)),
            )?;
        }
        let (renditions, base) = match (&self.renditions, &self.preset) {
            (Some(r), _) => (r.clone(), "renditions"),
            (None, Some(p)) => (
                preset(p).ok_or_else(|| err("preset", SpecProblem::UnknownPreset(p.clone())))?,
                "preset",
            ),
            (None, None) => return Err(err("renditions", SpecProblem::Missing)),
        };
        if renditions.is_empty() {
            return Err(err(base, SpecProblem::Missing));
        }
        if renditions.len() > MAX_RENDITIONS {
            return Err(err(
                base,
                SpecProblem::TooMany {
                    max: MAX_RENDITIONS,
                },
            ));
        }
        let mut seen = HashSet::new();
        for (i, r) in renditions.iter().enumerate() {
            let f = |name: &str| format!("renditions[{i}].{name}");
            if !valid_name(&r.name) {
                return Err(err(f("name"), SpecProblem::BadName(r.name.clone())));
            }
            if !seen.insert(r.name.as_str()) {
                return Err(err(f("name"), SpecProblem::Duplicate(r.name.clone())));
            }
            for (field, v, max) in [
                ("width", r.width, MAX_WIDTH),
                ("height", r.height, MAX_HEIGHT),
            ] {
                range(f(field), i64::from(v), (2, i64::from(max)))?;
                if v % 2 != 0 {
                    return Err(err(f(field), SpecProblem::Odd(v)));
                }
            }
            range(
                f("video_kbps"),
                i64::from(r.video_kbps),
                (i64::from(VIDEO_KBPS.0), i64::from(VIDEO_KBPS.1)),
            )?;
            range(
                f("audio_kbps"),
                i64::from(r.audio_kbps),
                (i64::from(AUDIO_KBPS.0), i64::from(AUDIO_KBPS.1)),
            )?;
            // The output key is `<output><name>.mp4`; `join` refuses anything that could escape.
            output
                .join(&format!("{}.mp4", r.name))
                .map_err(|e| err(f("name"), SpecProblem::BadUrl(e)))?;
        }
        Ok(ValidSpec {
            source,
            output,
            renditions,
            spec: self.clone(),
        })
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TaskSpec {
        serde_json::from_str(
            r#"{"source": "s3://media/in/cat.mp4", "output": "s3://media/out/cat/",
                "preset": "hd",
                "renditions": [{"name": "720p", "width": 1280, "height": 720, "video_kbps": 3000, "audio_kbps": 128}],
                "container": "mp4", "priority": 0, "idempotency_key": "cat-v1"}"#,
        )
        .expect("the architecture's example spec parses")
    }

    #[test]
    fn a_source_sha256_must_be_64_hex_digits() {
        let mut s = base();
        s.source_sha256 = Some("ab".repeat(32));
        assert!(s.validate().is_ok());
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33)] {
            s.source_sha256 = Some(bad.to_string());
            let e = s.validate().expect_err(bad);
            assert_eq!(e.field, "source_sha256", "{bad:?}");
        }
    }

    #[test]
    fn example_spec_is_valid_and_renditions_win() {
        let v = base().validate().expect("valid");
        assert_eq!(v.renditions.len(), 1);
        assert_eq!(v.renditions[0].name, "720p");
        assert_eq!(
            v.output.join("720p.mp4").expect("join").to_string(),
            "s3://media/out/cat/720p.mp4"
        );
    }

    #[test]
    fn presets_resolve() {
        let mut s = base();
        s.renditions = None;
        let v = s.validate().expect("valid");
        let names: Vec<_> = v.renditions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["1080p", "720p", "480p", "360p"]);
        assert_eq!(v.renditions[0].video_kbps, 5000);
        assert_eq!(preset("sd").expect("sd").len(), 2);
        for (name, _) in PRESETS {
            let mut s = base();
            s.renditions = None;
            s.preset = Some(name.to_string());
            s.validate().expect("every preset is itself valid");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutator = fn(&mut TaskSpec);
        let cases: Vec<(&str, Mutator)> = vec![
            ("source", |s| s.source = "http://x/y".into()),
            ("source", |s| s.source = "s3://media/../etc".into()),
            ("source", |s| s.source = String::new()),
            ("output", |s| s.output = "s3://media/out".into()),
            ("output", |s| s.output = "file://rel/".into()),
            ("preset", |s| {
                s.renditions = None;
                s.preset = Some("4k".into())
            }),
            ("renditions", |s| {
                s.renditions = None;
                s.preset = None
            }),
            ("renditions", |s| s.renditions = Some(vec![])),
            ("renditions[0].width", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].width = 1281
                }
            }),
            ("renditions[0].height", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].height = 4322
                }
            }),
            ("renditions[0].width", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].width = 0
                }
            }),
            ("renditions[0].video_kbps", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].video_kbps = 10
                }
            }),
            ("renditions[0].audio_kbps", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].audio_kbps = 5000
                }
            }),
            ("renditions[0].name", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    r[0].name = "../x".into()
                }
            }),
            ("renditions[1].name", |s| {
                if let Some(r) = s.renditions.as_mut() {
                    let dup = r[0].clone();
                    r.push(dup)
                }
            }),
            ("priority", |s| s.priority = 5000),
            ("idempotency_key", |s| {
                s.idempotency_key = Some("k".repeat(201))
            }),
            ("max_attempts", |s| s.max_attempts = Some(0)),
            ("container", |s| s.container = Container::Hls),
        ];
        for (field, mutate) in cases {
            let mut s = base();
            mutate(&mut s);
            let e = s.validate().expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<TaskSpec, _> = serde_json::from_str(
            r#"{"source":"s3://media/a.mp4","output":"s3://media/o/","presett":"hd"}"#,
        );
        assert!(r
            .expect_err("unknown field")
            .to_string()
            .contains("presett"));
    }

    #[test]
    fn spec_round_trips() {
        let s = base();
        let json = serde_json::to_string(&s).expect("serialize");
        let back: TaskSpec = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(s, back);
    }
}
