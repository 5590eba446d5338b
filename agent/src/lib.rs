//! `agent`: the membrane sidecar.
#![forbid(unsafe_code)]
