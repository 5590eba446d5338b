//! Validated DNS-label newtypes: namespaces, membrane ids, service names, capabilities and tags.
//!
//! Every name in the system ends up as a DNS label (`_perception._tcp.cognitive-system.`,
//! `visual-worker-1.cognitive-system.`) and as a directory name on the shared volume, so all
//! of them obey one rule: 1 to 63 characters of `a-z`, `0-9` and `-`, not starting or ending
//! with `-`. Input is case-insensitive and normalised to lowercase.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// The string is empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// What was being validated ("namespace", "membrane id", ...).
        kind: &'static str,
    },
    /// The string is longer than 63 characters.
    #[error("{kind} {value:?} is {len} characters long; the limit is 63")]
    TooLong {
        /// What was being validated.
        kind: &'static str,
        /// The (possibly truncated) offending value.
        value: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The string contains a character outside `a-z0-9-`.
    #[error("{kind} {value:?} contains {ch:?}; only letters a-z, digits and '-' are allowed")]
    BadChar {
        /// What was being validated.
        kind: &'static str,
        /// The offending value.
        value: String,
        /// The first offending character.
        ch: char,
    },
    /// The string starts or ends with a hyphen.
    #[error("{kind} {value:?} must not start or end with '-'")]
    Hyphen {
        /// What was being validated.
        kind: &'static str,
        /// The offending value.
        value: String,
    },
}

/// Validates `input` as a DNS label and returns it lowercased.
///
/// ```
/// use shared::name::validate_label;
/// assert_eq!(validate_label("namespace", "Cognitive-System").unwrap(), "cognitive-system");
/// assert!(validate_label("namespace", "").is_err());
/// assert!(validate_label("namespace", "-edge").is_err());
/// assert!(validate_label("namespace", "a.b").is_err());
/// assert!(validate_label("namespace", &"x".repeat(64)).is_err());
/// ```
pub fn validate_label(kind: &'static str, input: &str) -> Result<String, LabelError> {
    if input.is_empty() {
        return Err(LabelError::Empty { kind });
    }
    let shown = || input.chars().take(80).collect::<String>();
    if input.len() > 63 {
        return Err(LabelError::TooLong {
            kind,
            value: shown(),
            len: input.len(),
        });
    }
    if let Some(ch) = input
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(LabelError::BadChar {
            kind,
            value: shown(),
            ch,
        });
    }
    if input.starts_with('-') || input.ends_with('-') {
        return Err(LabelError::Hyphen {
            kind,
            value: shown(),
        });
    }
    Ok(input.to_ascii_lowercase())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and lowercases `input`.
            pub fn new(input: &str) -> Result<Self, LabelError> {
                validate_label($kind, input).map(Self)
            }
            /// The normalised (lowercase) label.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = LabelError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A namespace name, served as the DNS zone `<name>.`.
    ///
    /// ```
    /// use shared::name::NamespaceName;
    /// let ns: NamespaceName = "Cognitive-System".parse().unwrap();
    /// assert_eq!(ns.as_str(), "cognitive-system");
    /// assert!("cognitive_system".parse::<NamespaceName>().is_err());
    /// ```
    NamespaceName,
    "namespace"
);
label_type!(
    /// A membrane id, unique within its namespace.
    ///
    /// ```
    /// use shared::name::MembraneId;
    /// assert_eq!(MembraneId::new("Visual-Worker-1").unwrap().as_str(), "visual-worker-1");
    /// assert!(MembraneId::new("../etc").is_err());
    /// ```
    MembraneId,
    "membrane id"
);
label_type!(
    /// A service name, served as `_<name>._tcp.<namespace>.`.
    ///
    /// ```
    /// use shared::name::ServiceName;
    /// assert!(ServiceName::new("perception").is_ok());
    /// assert!(ServiceName::new("_perception").is_err());
    /// ```
    ServiceName,
    "service name"
);
label_type!(
    /// A capability or tag, served as a DNS-SD subtype `_<label>._sub._<svc>._tcp.<ns>.`.
    ///
    /// ```
    /// use shared::name::Tag;
    /// assert!(Tag::new("gpu").is_ok());
    /// assert!(Tag::new("has space").is_err());
    /// ```
    Tag,
    "capability or tag"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_edges() {
        assert_eq!(validate_label("x", "a").unwrap(), "a");
        assert_eq!(validate_label("x", "0").unwrap(), "0");
        assert!(validate_label("x", &"a".repeat(63)).is_ok());
        assert!(validate_label("x", "a-b").is_ok());
    }

    #[test]
    fn rejects_each_rule_with_its_own_error() {
        assert!(matches!(
            validate_label("x", ""),
            Err(LabelError::Empty { .. })
        ));
        assert!(matches!(
            validate_label("x", &"a".repeat(64)),
            Err(LabelError::TooLong { len: 64, .. })
        ));
        assert!(matches!(
            validate_label("x", "a_b"),
            Err(LabelError::BadChar { ch: '_', .. })
        ));
        assert!(matches!(
            validate_label("x", "é"),
            Err(LabelError::BadChar { .. })
        ));
        assert!(matches!(
            validate_label("x", "a-"),
            Err(LabelError::Hyphen { .. })
        ));
        assert!(matches!(
            validate_label("x", "a/b"),
            Err(LabelError::BadChar { .. })
        ));
    }

    #[test]
    fn error_message_names_kind_and_value() {
        let e = MembraneId::new("bad id").unwrap_err().to_string();
        assert!(e.contains("membrane id"), "{e}");
        assert!(e.contains("bad id"), "{e}");
    }

    #[test]
    fn serde_validates() {
        let id: MembraneId = serde_json::from_str("\"Perception\"").unwrap();
        assert_eq!(id.as_str(), "perception");
        assert!(serde_json::from_str::<MembraneId>("\"no good\"").is_err());
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"perception\"");
    }
}
