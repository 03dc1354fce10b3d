//! The GStreamer transcoder. Being written.
