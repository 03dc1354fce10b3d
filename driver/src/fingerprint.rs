//! Node fingerprinting: whether this node can run transcode workers, and what it offers. The
//! driver is HEALTHY only when the configured worker binary is an executable file, GStreamer's
//! `gst-inspect-1.0` runs, and a writable cgroup hierarchy exists. It reports the driver and
//! GStreamer versions, the cgroup version in use and one boolean attribute per H.264/AAC encoder
//! in the GStreamer registry, so jobspecs can constrain on e.g.
//! `${attr.driver.transcode.encoder.x264enc}`. GStreamer is queried through its command-line
//! tool so the driver does not link GStreamer itself.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::cgroup::Layout;
use crate::config::PluginConfig;
use crate::proto::drivers::fingerprint_response::HealthState;
use crate::proto::drivers::FingerprintResponse;
use crate::proto::structs::{attribute, Attribute};

/// Encoders worth advertising: software and hardware H.264 encoders, and AAC encoders.
pub const KNOWN_ENCODERS: &[&str] = &[
    "x264enc",
    "openh264enc",
    "vaapih264enc",
    "vah264enc",
    "vah264lpenc",
    "nvh264enc",
    "nvcudah264enc",
    "qsvh264enc",
    "msdkh264enc",
    "v4l2h264enc",
    "omxh264enc",
    "avenc_h264_omx",
    "avenc_aac",
    "fdkaacenc",
    "voaacenc",
    "faac",
];

const GST_INSPECT: &str = "gst-inspect-1.0";
const GST_TIMEOUT: Duration = Duration::from_secs(20);

/// What one fingerprint found, comparable so that only changes need resending.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub health: HealthState,
    pub description: String,
    pub attributes: BTreeMap<String, AttrValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Bool(bool),
}

impl Fingerprint {
    pub fn to_proto(&self) -> FingerprintResponse {
        let attributes: HashMap<String, Attribute> = self
            .attributes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    AttrValue::Str(s) => attribute::Value::StringVal(s.clone()),
                    AttrValue::Bool(b) => attribute::Value::BoolVal(*b),
                };
                (
                    k.clone(),
                    Attribute {
                        value: Some(value),
                        unit: String::new(),
                    },
                )
            })
            .collect();
        FingerprintResponse {
            attributes,
            health: self.health as i32,
            health_description: self.description.clone(),
            err: String::new(),
        }
    }
}

/// Resolves the worker binary (a path, or a bare name searched in PATH) and checks that it is
/// an executable regular file.
pub fn resolve_worker_binary(name: &str) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
            .unwrap_or_default()
    };
    let mut last = format!("worker binary {name:?} not found in PATH");
    for c in candidates {
        match std::fs::metadata(&c) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                return Ok(std::fs::canonicalize(&c).unwrap_or(c));
            }
            Ok(m) if m.is_file() => {
                last = format!("worker binary {} is not executable", c.display());
            }
            Ok(_) => last = format!("worker binary {} is not a regular file", c.display()),
            Err(e) if name.contains('/') => {
                last = format!("worker binary {}: {e}", c.display());
            }
            Err(_) => {}
        }
    }
    Err(last)
}

async fn run_gst(args: &[&str]) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(GST_INSPECT);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(GST_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{GST_INSPECT} did not answer within {GST_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {GST_INSPECT}: {e} (install gstreamer1.0-tools)"))?;
    if !out.status.success() {
        return Err(format!(
            "{GST_INSPECT} {} failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "GStreamer 1.22.0" from `gst-inspect-1.0 --version`.
pub fn parse_gst_version(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("GStreamer ")
            .map(|v| v.trim().to_owned())
    })
}

/// Element names from the plain `gst-inspect-1.0` listing ("plugin:  element: description").
pub fn parse_elements(listing: &str) -> Vec<String> {
    entries(listing).map(|(e, _)| e.to_owned()).collect()
}

/// `(element, long name)` of each `plugin:  element: long name` line of a gst-inspect listing.
fn entries(listing: &str) -> impl Iterator<Item = (&str, &str)> {
    listing.lines().filter_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _plugin = parts.next()?;
        let element = parts.next()?.trim();
        let about = parts.next()?;
        (!element.is_empty() && !element.contains(' ')).then_some((element, about))
    })
}

/// The H.264 and AAC encoders in a `gst-inspect-1.0 --types=Encoder/...` listing, told by the
/// element's name or long name. The registry's klass filter finds encoders this driver has
/// never heard of (a vendor's hardware plugin), which a fixed list would miss.
pub fn h264_aac_encoders(listing: &str) -> Vec<String> {
    entries(listing)
        .filter(|(element, about)| {
            let text = format!("{element} {about}").to_ascii_lowercase();
            text.contains("h.264") || text.contains("264") || text.contains("aac")
        })
        .map(|(e, _)| e.to_owned())
        .collect()
}

/// GStreamer's version and the H.264/AAC encoders it has: the known ones that are present,
/// plus any other element the registry classes as a video or audio encoder of those formats.
pub async fn gstreamer() -> Result<(String, Vec<String>), String> {
    let version = parse_gst_version(&run_gst(&["--version"]).await?)
        .ok_or_else(|| format!("{GST_INSPECT} --version printed no GStreamer version"))?;
    let elements = parse_elements(&run_gst(&[]).await?);
    let mut encoders: Vec<String> = KNOWN_ENCODERS
        .iter()
        .filter(|e| elements.iter().any(|x| x == *e))
        .map(|e| (*e).to_owned())
        .collect();
    for klass in ["Encoder/Video", "Encoder/Audio"] {
        let listing = run_gst(&[&format!("--types={klass}")]).await?;
        for e in h264_aac_encoders(&listing) {
            if !encoders.contains(&e) {
                encoders.push(e);
            }
        }
    }
    encoders.sort();
    Ok((version, encoders))
}

/// Computes the fingerprint. `layout` is the cgroup hierarchy found at start-up (or why none).
pub async fn compute(
    config: Option<&PluginConfig>,
    layout: &Result<Layout, String>,
) -> Fingerprint {
    let mut attributes = BTreeMap::new();
    attributes.insert(
        "driver.transcode.version".to_owned(),
        AttrValue::Str(env!("CARGO_PKG_VERSION").to_owned()),
    );
    let Some(config) = config else {
        return Fingerprint {
            health: HealthState::Undetected,
            description: "waiting for the agent's plugin configuration (SetConfig)".into(),
            attributes,
        };
    };
    let mut problems = Vec::new();
    let mut undetected = false;
    match resolve_worker_binary(&config.worker_binary) {
        Ok(p) => {
            attributes.insert(
                "driver.transcode.worker_binary".into(),
                AttrValue::Str(p.display().to_string()),
            );
        }
        Err(e) => {
            undetected = true;
            problems.push(e);
        }
    }
    let mut encoder_count = 0;
    let mut gst_version = String::new();
    match gstreamer().await {
        Ok((version, encoders)) => {
            attributes.insert(
                "driver.transcode.gstreamer_version".into(),
                AttrValue::Str(version.clone()),
            );
            encoder_count = encoders.len();
            for e in encoders {
                attributes.insert(
                    format!("driver.transcode.encoder.{e}"),
                    AttrValue::Bool(true),
                );
            }
            gst_version = version;
        }
        Err(e) => {
            undetected = true;
            problems.push(format!("GStreamer is not usable: {e}"));
        }
    }
    let mut cgroup = "none";
    match layout {
        Ok(l) => match l.probe_writable(&config.cgroup_parent) {
            Ok(()) => cgroup = l.name(),
            Err(e) => problems.push(format!(
                "cgroup {} under {:?} is not writable: {e}",
                l.name(),
                config.cgroup_parent
            )),
        },
        Err(e) => problems.push(e.clone()),
    }
    attributes.insert(
        "driver.transcode.cgroup".into(),
        AttrValue::Str(cgroup.into()),
    );
    if problems.is_empty() {
        Fingerprint {
            health: HealthState::Healthy,
            description: format!(
                "ready: GStreamer {gst_version}, {encoder_count} H.264/AAC encoders, cgroup {cgroup}"
            ),
            attributes,
        }
    } else {
        Fingerprint {
            // Missing dependencies mean "not detected"; a node that has them but cannot
            // create cgroups is detected but unhealthy.
            health: if undetected {
                HealthState::Undetected
            } else {
                HealthState::Unhealthy
            },
            description: problems.join("; "),
            attributes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoders_are_told_by_name_or_long_name() {
        let listing = "x264:  x264enc: x264 H.264 Encoder\n\
                       openh264:  openh264enc: OpenH264 video encoder\n\
                       vendor:  acmeavcenc: Acme H.264 hardware encoder\n\
                       libav:  avenc_mpeg4: libav MPEG-4 part 2 encoder\n\
                       voaacenc:  voaacenc: AAC audio encoder\n\
                       lame:  lamemp3enc: L.A.M.E. mp3 encoder\n\
                       Total count: 6 elements\n";
        assert_eq!(
            h264_aac_encoders(listing),
            ["x264enc", "openh264enc", "acmeavcenc", "voaacenc"]
        );
    }

    #[test]
    fn parses_gst_output() {
        assert_eq!(
            parse_gst_version("gst-inspect-1.0 version 1.22.0\nGStreamer 1.22.0\nhttps://x\n"),
            Some("1.22.0".into())
        );
        let listing = "x264:  x264enc: libx264 H.264 Encoder\n\
                       libav:  avenc_aac: libav AAC (Advanced Audio Coding) encoder\n\
                       typefindfunctions: video/x-h264: h264, x264, 264\n\
                       uvch264:  uvch264deviceprovider (GstDeviceProviderFactory)\n\
                       \n\
                       Total count: 2 plugins\n";
        let e = parse_elements(listing);
        assert!(e.contains(&"x264enc".to_owned()));
        assert!(e.contains(&"avenc_aac".to_owned()));
        assert!(!e.iter().any(|x| x.contains("deviceprovider")));
    }

    #[test]
    fn worker_binary_checks() {
        let dir = std::env::temp_dir().join(format!("fp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("worker");
        std::fs::write(&f, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = resolve_worker_binary(f.to_str().expect("utf8")).expect_err("not executable");
        assert!(e.contains("not executable"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(resolve_worker_binary(f.to_str().expect("utf8")).is_ok());
        assert!(resolve_worker_binary("definitely-not-a-transcode-worker").is_err());
        assert!(resolve_worker_binary("sh").is_ok(), "sh is in PATH");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
