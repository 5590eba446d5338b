//! Types, validation and wire formats shared by the membrane `agent` and `dns-server`.
//!
//! Nothing here opens a socket: this crate is the contract between the two binaries.
//! - [`name`]: validated DNS-label newtypes (namespace, membrane id, service, tag);
//! - [`envelope`]: the relay's message envelope, its Maildir file format and socket frames;
//! - [`model`]: registration, membrane and namespace views, events, the JSON error shape.
#![forbid(unsafe_code)]

pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod model;
pub mod name;
pub mod relay_auth;

pub use model::{
    CreateNamespace, Endpoint, ErrorBody, ErrorDetail, Event, HealthState, MembraneView,
    NamespaceSettings, NamespaceView, Proto, RegisterResponse, Registration, ServiceSpec,
};
pub use name::{LabelError, MembraneId, NamespaceName, ServiceName, Tag};
