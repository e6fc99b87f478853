//! Statuses of volumes and snapshots, and every move between them in one place.
//!
//! ```text
//!             Built                 Attached            LastDetached
//!  creating ─────────▶ available ─────────▶ in-use ─────────────▶ available
//!     │ BuildFailed,       │ ▲  DeleteStarted      (also from in-use: Attached)
//!     │ NodeRestarted      ▼ │  DeleteAbandoned (back to the previous status)
//!     └──────▶ error ──▶ deleting ──DeleteFailed──▶ error_deleting
//!                            └── row removed when the bytes are gone
//! ```
//!
//! Snapshots follow the same graph without `in-use`. The database applies a move as
//! a compare-and-swap (`UPDATE … WHERE status IN (from)`), so two requests racing for
//! one volume cannot both win: the loser changes nothing and is told 409.
//!
//! [`VolumeStatus::allows`] and [`SnapshotStatus::allows`] say what a request may do
//! with an object in a status, and the answer when it may not (400 naming the status,
//! 409 when the object is being deleted).

use crate::error::ApiError;

/// A volume's status, as Cinder spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeStatus {
    /// Its bytes are being made (create, clone).
    Creating,
    /// Ready, not attached.
    Available,
    /// Attached at least once.
    InUse,
    /// Its bytes are being removed.
    Deleting,
    /// A create failed (or the node stopped during it); only delete is allowed.
    Error,
    /// The bytes could not be removed; an admin must look.
    ErrorDeleting,
}

/// A snapshot's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// Its bytes are being copied.
    Creating,
    /// Ready.
    Available,
    /// Its bytes are being removed.
    Deleting,
    /// The copy failed.
    Error,
    /// The bytes could not be removed.
    ErrorDeleting,
}

macro_rules! spelled {
    ($t:ident { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// The API and database spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($t::$v => $s),* }
            }
            /// Parse the database spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some($t::$v),)* _ => None }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled!(VolumeStatus {
    Creating => "creating",
    Available => "available",
    InUse => "in-use",
    Deleting => "deleting",
    Error => "error",
    ErrorDeleting => "error_deleting",
});

spelled!(SnapshotStatus {
    Creating => "creating",
    Available => "available",
    Deleting => "deleting",
    Error => "error",
    ErrorDeleting => "error_deleting",
});

/// Why a volume's status changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeEvent {
    /// The background create or clone finished.
    Built,
    /// It failed.
    BuildFailed,
    /// The node restarted while it ran (start-up reconciliation).
    NodeRestarted,
    /// An attachment was made.
    Attached,
    /// The last attachment ended (the database also checks none is left).
    LastDetached,
    /// A delete took the volume (new clones are refused from now on).
    DeleteStarted,
    /// The delete could not take the lock: the volume goes back to where it was.
    DeleteAbandoned,
    /// The bytes could not be removed.
    DeleteFailed,
}

/// Where a transition goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<S> {
    /// This status.
    To(S),
    /// The status recorded when the delete started.
    Previous,
}

impl VolumeEvent {
    /// The statuses the move starts from, and where it goes.
    pub fn transition(self) -> (&'static [VolumeStatus], Target<VolumeStatus>) {
        use VolumeStatus::*;
        match self {
            VolumeEvent::Built => (&[Creating], Target::To(Available)),
            VolumeEvent::BuildFailed | VolumeEvent::NodeRestarted => {
                (&[Creating], Target::To(Error))
            }
            VolumeEvent::Attached => (&[Available, InUse], Target::To(InUse)),
            VolumeEvent::LastDetached => (&[InUse], Target::To(Available)),
            VolumeEvent::DeleteStarted => (&[Available, Error], Target::To(Deleting)),
            VolumeEvent::DeleteAbandoned => (&[Deleting], Target::Previous),
            VolumeEvent::DeleteFailed => (&[Deleting], Target::To(ErrorDeleting)),
        }
    }
}

/// Why a snapshot's status changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotEvent {
    /// The copy finished.
    Built,
    /// It failed.
    BuildFailed,
    /// The node restarted while it ran.
    NodeRestarted,
    /// A delete took the snapshot.
    DeleteStarted,
    /// The delete could not take the lock: back to the status it had.
    DeleteAbandoned {
        /// The status before the delete started (`available` or `error`).
        previous: SnapshotStatus,
    },
    /// The bytes could not be removed.
    DeleteFailed,
}

impl SnapshotEvent {
    /// The statuses the move starts from, and where it goes.
    pub fn transition(self) -> (&'static [SnapshotStatus], Target<SnapshotStatus>) {
        use SnapshotStatus::*;
        match self {
            SnapshotEvent::Built => (&[Creating], Target::To(Available)),
            SnapshotEvent::BuildFailed | SnapshotEvent::NodeRestarted => {
                (&[Creating], Target::To(Error))
            }
            SnapshotEvent::DeleteStarted => (&[Available, Error], Target::To(Deleting)),
            SnapshotEvent::DeleteAbandoned { previous } => (&[Deleting], Target::To(previous)),
            SnapshotEvent::DeleteFailed => (&[Deleting], Target::To(ErrorDeleting)),
        }
    }
}

/// What a request wants to do with a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeUse {
    /// `os-initialize_connection`.
    Attach,
    /// `os-extend`.
    Extend,
    /// Be the source of a clone.
    CloneSource,
    /// Be snapshotted (`force`: also while in use, point in time).
    Snapshot {
        /// The request's `force`.
        force: bool,
    },
    /// Be deleted (attachments and snapshots are checked apart).
    Delete,
}

impl VolumeStatus {
    /// May volume `id` in this status be used so? The API's answer when not.
    pub fn allows(self, id: &str, what: VolumeUse) -> Result<(), ApiError> {
        use VolumeStatus::*;
        let ok = match what {
            VolumeUse::Attach | VolumeUse::Extend | VolumeUse::CloneSource => {
                matches!(self, Available | InUse)
            }
            VolumeUse::Snapshot { force } => self == Available || (self == InUse && force),
            VolumeUse::Delete => matches!(self, Available | Error),
        };
        if ok {
            return Ok(());
        }
        let (who, need) = match what {
            VolumeUse::Attach => ("volume", "available or in-use to be attached"),
            VolumeUse::Extend => ("volume", "available or in-use to be extended"),
            VolumeUse::CloneSource => ("source volume", "available or in-use"),
            VolumeUse::Snapshot { .. } if self == InUse => {
                return Err(ApiError::bad_request(format!(
                    "volume {id} is in-use: pass \"force\": true for a point-in-time snapshot \
                     of a volume in use"
                )))
            }
            VolumeUse::Snapshot { .. } => ("volume", "available"),
            VolumeUse::Delete if self == InUse => {
                return Err(ApiError::bad_request(format!(
                    "volume {id} is in use: terminate its connections first"
                )))
            }
            VolumeUse::Delete => ("volume", "available or error to be deleted"),
        };
        if self == Deleting && what != VolumeUse::Delete {
            return Err(ApiError::conflict(format!("{who} {id} is being deleted")));
        }
        Err(ApiError::bad_request(format!(
            "{who} {id} is {self}; it must be {need}"
        )))
    }
}

/// What a request wants to do with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotUse {
    /// Be the source of a new volume.
    CloneSource,
    /// Be deleted.
    Delete,
}

impl SnapshotStatus {
    /// May snapshot `id` in this status be used so? The API's answer when not.
    pub fn allows(self, id: &str, what: SnapshotUse) -> Result<(), ApiError> {
        use SnapshotStatus::*;
        match what {
            SnapshotUse::CloneSource if self == Available => Ok(()),
            SnapshotUse::CloneSource if self == Deleting => Err(ApiError::conflict(format!(
                "snapshot {id} is being deleted"
            ))),
            SnapshotUse::CloneSource => Err(ApiError::bad_request(format!(
                "snapshot {id} is {self}; it must be available"
            ))),
            SnapshotUse::Delete if matches!(self, Available | Error) => Ok(()),
            SnapshotUse::Delete => Err(ApiError::bad_request(format!(
                "snapshot {id} is {self}; it must be available or error to be deleted"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const ALL: [VolumeStatus; 6] = [
        VolumeStatus::Creating,
        VolumeStatus::Available,
        VolumeStatus::InUse,
        VolumeStatus::Deleting,
        VolumeStatus::Error,
        VolumeStatus::ErrorDeleting,
    ];

    #[test]
    fn spellings_round_trip() {
        for s in ALL {
            assert_eq!(VolumeStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(VolumeStatus::parse("in_use"), None);
        assert_eq!(
            SnapshotStatus::parse("error_deleting"),
            Some(SnapshotStatus::ErrorDeleting)
        );
    }

    #[test]
    fn the_use_table() {
        let code = |s: VolumeStatus, u| s.allows("v", u).map_err(|e| e.status);
        for s in ALL {
            let ok = matches!(s, VolumeStatus::Available | VolumeStatus::InUse);
            assert_eq!(code(s, VolumeUse::Attach).is_ok(), ok, "{s}");
            assert_eq!(code(s, VolumeUse::Extend).is_ok(), ok, "{s}");
            assert_eq!(code(s, VolumeUse::CloneSource).is_ok(), ok, "{s}");
        }
        assert_eq!(
            code(VolumeStatus::Deleting, VolumeUse::CloneSource),
            Err(StatusCode::CONFLICT)
        );
        assert_eq!(
            code(VolumeStatus::Error, VolumeUse::CloneSource),
            Err(StatusCode::BAD_REQUEST)
        );
        let snap = |f| VolumeUse::Snapshot { force: f };
        assert!(code(VolumeStatus::InUse, snap(true)).is_ok());
        let e = VolumeStatus::InUse.allows("v", snap(false)).unwrap_err();
        assert!(e.message.contains("force"), "{}", e.message);
        assert_eq!(
            code(VolumeStatus::Deleting, snap(true)),
            Err(StatusCode::CONFLICT)
        );
        assert!(code(VolumeStatus::Error, VolumeUse::Delete).is_ok());
        let e = VolumeStatus::InUse
            .allows("v", VolumeUse::Delete)
            .unwrap_err();
        assert!(e.message.contains("terminate"), "{}", e.message);
        assert_eq!(
            code(VolumeStatus::Deleting, VolumeUse::Delete),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            SnapshotStatus::Deleting
                .allows("s", SnapshotUse::CloneSource)
                .map_err(|e| e.status),
            Err(StatusCode::CONFLICT)
        );
        assert!(SnapshotStatus::Error
            .allows("s", SnapshotUse::Delete)
            .is_ok());
    }

    #[test]
    fn every_move_leaves_from_somewhere_else_or_restores() {
        use VolumeEvent::*;
        for e in [
            Built,
            BuildFailed,
            NodeRestarted,
            Attached,
            LastDetached,
            DeleteStarted,
            DeleteAbandoned,
            DeleteFailed,
        ] {
            let (from, to) = e.transition();
            assert!(!from.is_empty(), "{e:?}");
            if let Target::To(t) = to {
                // Only Attached may stay where it is (a second attachment).
                assert!(!from.contains(&t) || e == Attached, "{e:?}");
            }
        }
    }
}
