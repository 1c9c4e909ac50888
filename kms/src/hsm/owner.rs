//! Which token objects this kms instance made, and may therefore destroy.
//!
//! Every object kms makes carries a CKA_ID of [`OBJECT_ID_LEN`] bytes: the marker
//! [`ID_MARKER`], the [`InstanceId`] of the instance that made it, and 16 random bytes. The
//! objects are not modifiable, so the id is what the token says, not what a store says.
//! An instance is one initialised keyring: `init` makes its identity, and a copy restored
//! from a backup takes a new one at its first start, so that a restore drill on the
//! production token never destroys what production made (a sweep of "orphans", a scheduled
//! destruction production cancelled, a master key rotation). Objects made before ids
//! carried the marker ("untagged": 16 random bytes, or an audit key's share set id) belong
//! to the instance that was upgraded in place, and to no restored copy.
//!
//! **Invariant:** [`crate::hsm::Hsm::destroy`] reads the object's CKA_ID from the token and
//! destroys only what [`Ownership::owns`] says; nothing else in kms destroys a token object.

use std::fmt;

/// The first bytes of the CKA_ID of every object kms makes.
pub(crate) const ID_MARKER: &[u8; 4] = b"kms1";
/// The length of an instance identity.
const INSTANCE_LEN: usize = 8;
/// Random bytes after the marker and the instance.
const RANDOM_LEN: usize = 16;
/// The length of the CKA_ID of an object kms makes.
pub(crate) const OBJECT_ID_LEN: usize = ID_MARKER.len() + INSTANCE_LEN + RANDOM_LEN;

/// One initialised keyring's identity: 8 random bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstanceId([u8; INSTANCE_LEN]);

impl InstanceId {
    /// A fresh random identity.
    pub(crate) fn random() -> Option<Self> {
        let mut b = [0u8; INSTANCE_LEN];
        getrandom::fill(&mut b).ok()?;
        Some(Self(b))
    }

    /// Parses 16 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER.decode(s.as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceId({self})")
    }
}

/// Who made an object, as its CKA_ID says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Maker {
    /// An instance, by the marker.
    Instance(InstanceId),
    /// Made before ids carried the marker (or outside kms): a non-empty id without it.
    Untagged,
    /// No CKA_ID at all: never destroyed by kms.
    Nobody,
}

/// Who made the object whose CKA_ID is `id`.
pub(crate) fn maker(id: &[u8]) -> Maker {
    if id.is_empty() {
        return Maker::Nobody;
    }
    match id.strip_prefix(ID_MARKER.as_slice()) {
        Some(rest) if id.len() == OBJECT_ID_LEN => rest
            .get(..INSTANCE_LEN)
            .and_then(|i| <[u8; INSTANCE_LEN]>::try_from(i).ok())
            .map_or(Maker::Untagged, |i| Maker::Instance(InstanceId(i))),
        _ => Maker::Untagged,
    }
}

/// What this process may destroy in the token: the objects of its own instance, of the
/// instances it took over, and, for the instance upgraded in place, untagged objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// This instance (`None` until a seal record is authenticated or made).
    pub instance: Option<InstanceId>,
    /// Instances whose objects this one took over (`kms operator take-over`).
    pub adopted: Vec<InstanceId>,
    /// Whether untagged objects are this instance's.
    pub untagged: bool,
}

impl Ownership {
    /// Whether the object whose CKA_ID is `id` is this instance's to destroy.
    pub(crate) fn owns(&self, id: &[u8]) -> bool {
        match maker(id) {
            Maker::Instance(i) => self.instance == Some(i) || self.adopted.contains(&i),
            Maker::Untagged => self.untagged,
            Maker::Nobody => false,
        }
    }

    /// A fresh CKA_ID for an object this instance makes, or `None` before it has an
    /// identity or when the random source fails.
    pub(crate) fn new_object_id(&self) -> Option<Vec<u8>> {
        let instance = self.instance?;
        let mut random = [0u8; RANDOM_LEN];
        getrandom::fill(&mut random).ok()?;
        let mut id = Vec::with_capacity(OBJECT_ID_LEN);
        id.extend_from_slice(ID_MARKER);
        id.extend_from_slice(&instance.0);
        id.extend_from_slice(&random);
        Some(id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_owns_what_it_made_and_what_it_took_over_only() {
        let a = InstanceId::random().unwrap();
        let b = InstanceId::random().unwrap();
        let c = InstanceId::random().unwrap();
        let mine = Ownership {
            instance: Some(a),
            adopted: vec![b],
            untagged: false,
        };
        let made_a = mine.new_object_id().unwrap();
        assert_eq!(made_a.len(), OBJECT_ID_LEN);
        assert_eq!(maker(&made_a), Maker::Instance(a));
        assert!(mine.owns(&made_a));
        let other = Ownership {
            instance: Some(b),
            ..Ownership::default()
        };
        assert!(mine.owns(&other.new_object_id().unwrap()));
        let stranger = Ownership {
            instance: Some(c),
            ..Ownership::default()
        };
        let made_c = stranger.new_object_id().unwrap();
        assert!(!mine.owns(&made_c));
        assert!(!stranger.owns(&made_a));
        // Untagged ids (the old 16 random bytes, an audit key's 8-byte set id, a marker with
        // the wrong length) belong only to an owner of untagged objects; an empty id to nobody.
        for untagged in [
            vec![7u8; 16],
            vec![1u8; 8],
            [&ID_MARKER[..], &[0u8; 9]].concat(),
        ] {
            assert_eq!(maker(&untagged), Maker::Untagged);
            assert!(!mine.owns(&untagged));
            assert!(
                Ownership {
                    untagged: true,
                    ..mine.clone()
                }
                .owns(&untagged)
            );
        }
        assert!(
            !Ownership {
                untagged: true,
                ..mine.clone()
            }
            .owns(&[])
        );
        // No identity yet: no ids made, nothing owned but (if said) untagged objects.
        assert!(Ownership::default().new_object_id().is_none());
        assert!(!Ownership::default().owns(&made_a));
        assert_eq!(
            InstanceId::from_hex(&a.to_string()),
            Some(a),
            "hex round trip"
        );
        assert_eq!(InstanceId::from_hex("00"), None);
    }
}
