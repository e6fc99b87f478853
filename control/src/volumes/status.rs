//! Statuses of volumes and snapshots, and every move between them in one place.
//!
//! ```text
//!             Built                 Attached            LastDetached
//!  creating ─────────▶ available ─────────▶ in-use ─────────────▶ available
//!     │ BuildFailed,     │ │ ▲  DeleteStarted      (also from in-use, reserved: Attached)
//!     │ NodeRestarted    │ ▼ │  DeleteAbandoned (back to the previous status)
//!     └──────▶ error ──▶ deleting ──DeleteFailed──▶ error_deleting
//!                        │   └── row removed when the bytes are gone
//!            Reserved    ▼             (ForceDeleteStarted: also from error_deleting)
//!                     reserved ──Attached──▶ in-use;  ──LastDetached──▶ available
//! ```
//!
//! `reserved` is a volume with an attachment of the attachments API that has no
//! connector yet (no front end). An admin's `os-reset_status` ([`Event::Reset`]) moves
//! a volume or snapshot that no running operation owns (not `creating`, `deleting`) to
//! `available`, `error`, `in-use` or `error_deleting`.
//!
//! Snapshots follow the same graph without `in-use` and `reserved` (one [`Status`] and
//! one [`Event`] serve both). The database applies a move as a compare-and-swap (`UPDATE … WHERE
//! status IN (from)`), so two requests racing for one object cannot both win: the loser
//! changes nothing and is told 409.
//!
//! [`Status::allows`] and [`Status::snapshot_allows`] say what a request may do with a
//! volume or snapshot in a status, and the answer when it may not (400 naming the
//! status, 409 when the object is being deleted).

use crate::error::ApiError;

/// The status of a volume or a snapshot, as Cinder spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Its bytes are being made (create, clone, snapshot).
    Creating,
    /// Ready (a volume: not attached).
    Available,
    /// A volume attached at least once (never a snapshot).
    InUse,
    /// Its bytes are being removed.
    Deleting,
    /// Making it failed (or the node stopped meanwhile); only delete is allowed.
    Error,
    /// The bytes could not be removed; an admin must look.
    ErrorDeleting,
    /// A volume reserved by an attachment without a connector (attachments API).
    Reserved,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 7] = [
        Status::Creating,
        Status::Available,
        Status::InUse,
        Status::Deleting,
        Status::Error,
        Status::ErrorDeleting,
        Status::Reserved,
    ];

    /// The statuses an admin may reset a volume or snapshot to (`os-reset_status`).
    pub const RESETTABLE: [Status; 4] = [
        Status::Available,
        Status::Error,
        Status::InUse,
        Status::ErrorDeleting,
    ];

    /// The API and database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Available => "available",
            Status::InUse => "in-use",
            Status::Deleting => "deleting",
            Status::Error => "error",
            Status::ErrorDeleting => "error_deleting",
            Status::Reserved => "reserved",
        }
    }

    /// Parse the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a volume's or snapshot's status changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The background create, clone or snapshot finished.
    Built,
    /// It failed.
    BuildFailed,
    /// The node restarted while it ran (start-up reconciliation).
    NodeRestarted,
    /// A volume's attachment was made.
    Attached,
    /// A volume's last attachment ended (the database also checks none is left).
    LastDetached,
    /// A delete took the object (new clones of it are refused from now on); the status
    /// it left is recorded.
    DeleteStarted,
    /// The delete could not take the lock: back to the recorded status.
    DeleteAbandoned,
    /// The bytes could not be removed.
    DeleteFailed,
    /// An attachment without a connector reserved an available volume.
    Reserved,
    /// An admin's forced delete took the object (also from `error_deleting`).
    ForceDeleteStarted,
    /// An admin's `os-reset_status` to this status (one of [`Status::RESETTABLE`]).
    Reset(Status),
}

/// Where a transition goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This status.
    To(Status),
    /// The status recorded when the delete started.
    Previous,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 14] = [
        Event::Built,
        Event::BuildFailed,
        Event::NodeRestarted,
        Event::Attached,
        Event::LastDetached,
        Event::DeleteStarted,
        Event::DeleteAbandoned,
        Event::DeleteFailed,
        Event::Reserved,
        Event::ForceDeleteStarted,
        Event::Reset(Status::Available),
        Event::Reset(Status::Error),
        Event::Reset(Status::InUse),
        Event::Reset(Status::ErrorDeleting),
    ];

    /// Does this move record the status it leaves (to give it back)?
    pub fn records_previous(self) -> bool {
        matches!(self, Event::DeleteStarted | Event::ForceDeleteStarted)
    }

    /// The statuses the move starts from, and where it goes: the one table.
    pub fn transition(self) -> (&'static [Status], Target) {
        use Status::*;
        match self {
            Event::Built => (&[Creating], Target::To(Available)),
            Event::BuildFailed | Event::NodeRestarted => (&[Creating], Target::To(Error)),
            Event::Attached => (&[Available, InUse, Reserved], Target::To(InUse)),
            Event::LastDetached => (&[InUse, Reserved], Target::To(Available)),
            Event::DeleteStarted => (&[Available, Error], Target::To(Deleting)),
            Event::DeleteAbandoned => (&[Deleting], Target::Previous),
            Event::DeleteFailed => (&[Deleting], Target::To(ErrorDeleting)),
            Event::Reserved => (&[Available], Target::To(Reserved)),
            Event::ForceDeleteStarted => (&[Available, Error, ErrorDeleting], Target::To(Deleting)),
            Event::Reset(to) => (
                &[Available, InUse, Error, ErrorDeleting, Reserved],
                Target::To(to),
            ),
        }
    }
}

/// What a request wants to do with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotUse {
    /// Be the source of a new volume.
    CloneSource,
    /// Be deleted.
    Delete,
    /// Be deleted by an admin's `os-force_delete`.
    ForceDelete,
    /// Change its name, description or metadata.
    Describe,
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
    /// Be deleted by an admin's `os-force_delete` (attachments and snapshots are
    /// checked apart).
    ForceDelete,
    /// Change its type (`os-retype`).
    Retype,
    /// Change a flag or its metadata (`os-set_bootable`, `os-update_readonly_flag`,
    /// metadata, name).
    Describe,
}

impl Status {
    /// May volume `id` in this status be used so? The API's answer when not.
    pub fn allows(self, id: &str, what: VolumeUse) -> Result<(), ApiError> {
        use Status::*;
        let ok = match what {
            VolumeUse::Attach => matches!(self, Available | InUse | Reserved),
            VolumeUse::Extend | VolumeUse::CloneSource | VolumeUse::Retype => {
                matches!(self, Available | InUse)
            }
            VolumeUse::Snapshot { force } => self == Available || (self == InUse && force),
            VolumeUse::Delete => matches!(self, Available | Error),
            VolumeUse::ForceDelete => matches!(self, Available | Error | ErrorDeleting),
            VolumeUse::Describe => !matches!(self, Deleting),
        };
        if ok {
            return Ok(());
        }
        let (who, need) = match what {
            VolumeUse::Attach => ("volume", "available, in-use or reserved to be attached"),
            VolumeUse::Retype => ("volume", "available or in-use to be retyped"),
            VolumeUse::Describe => ("volume", "not being deleted"),
            VolumeUse::ForceDelete => (
                "volume",
                "available, error or error_deleting to be force-deleted",
            ),
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
        if self == Deleting && !matches!(what, VolumeUse::Delete | VolumeUse::ForceDelete) {
            return Err(ApiError::conflict(format!("{who} {id} is being deleted")));
        }
        Err(ApiError::bad_request(format!(
            "{who} {id} is {self}; it must be {need}"
        )))
    }

    /// May snapshot `id` in this status be used so? The API's answer when not.
    pub fn snapshot_allows(self, id: &str, what: SnapshotUse) -> Result<(), ApiError> {
        use Status::*;
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
            SnapshotUse::ForceDelete if matches!(self, Available | Error | ErrorDeleting) => Ok(()),
            SnapshotUse::ForceDelete => Err(ApiError::bad_request(format!(
                "snapshot {id} is {self}; it must be available, error or error_deleting to be \
                 force-deleted"
            ))),
            SnapshotUse::Describe if self == Deleting => Err(ApiError::conflict(format!(
                "snapshot {id} is being deleted"
            ))),
            SnapshotUse::Describe => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const ALL: [Status; 7] = Status::ALL;

    #[test]
    fn spellings_round_trip() {
        for s in ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("in_use"), None);
    }

    #[test]
    fn the_use_table() {
        let code = |s: Status, u| s.allows("v", u).map_err(|e| e.status);
        for s in ALL {
            let ok = matches!(s, Status::Available | Status::InUse);
            let reserved = s == Status::Reserved;
            assert_eq!(code(s, VolumeUse::Attach).is_ok(), ok || reserved, "{s}");
            assert_eq!(code(s, VolumeUse::Extend).is_ok(), ok, "{s}");
            assert_eq!(code(s, VolumeUse::CloneSource).is_ok(), ok, "{s}");
        }
        assert_eq!(
            code(Status::Deleting, VolumeUse::CloneSource),
            Err(StatusCode::CONFLICT)
        );
        assert_eq!(
            code(Status::Error, VolumeUse::CloneSource),
            Err(StatusCode::BAD_REQUEST)
        );
        let snap = |f| VolumeUse::Snapshot { force: f };
        assert!(code(Status::InUse, snap(true)).is_ok());
        let e = Status::InUse.allows("v", snap(false)).unwrap_err();
        assert!(e.message.contains("force"), "{}", e.message);
        assert_eq!(
            code(Status::Deleting, snap(true)),
            Err(StatusCode::CONFLICT)
        );
        assert!(code(Status::Error, VolumeUse::Delete).is_ok());
        let e = Status::InUse.allows("v", VolumeUse::Delete).unwrap_err();
        assert!(e.message.contains("terminate"), "{}", e.message);
        assert_eq!(
            code(Status::Deleting, VolumeUse::Delete),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            Status::Deleting
                .snapshot_allows("s", SnapshotUse::CloneSource)
                .map_err(|e| e.status),
            Err(StatusCode::CONFLICT)
        );
        assert!(Status::Error
            .snapshot_allows("s", SnapshotUse::Delete)
            .is_ok());
    }

    #[test]
    fn every_move_leaves_from_somewhere_else_or_restores() {
        for e in Event::ALL {
            let (from, to) = e.transition();
            assert!(!from.is_empty(), "{e:?}");
            if let Target::To(t) = to {
                // Only Attached (a second attachment) and an admin's Reset may stay
                // where they are.
                let may_stay = matches!(e, Event::Attached | Event::Reset(_));
                assert!(!from.contains(&t) || may_stay, "{e:?}");
                // A reset never lands in a status a running operation owns.
                if let Event::Reset(s) = e {
                    assert!(Status::RESETTABLE.contains(&s), "{e:?}");
                }
            }
        }
    }
}
