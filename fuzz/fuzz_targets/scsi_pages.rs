//! The SCSI data a hostile target returns to the initiator, after the iSCSI layer
//! delivered it: REPORT TARGET PORT GROUPS (ALUA), the target-port designators of VPD
//! 0x83, PERSISTENT RESERVE IN (READ KEYS, READ RESERVATION), sense data and the pages
//! read at login. Every parser gets the same bytes: any bytes give a value or `None`,
//! never a panic, with bounded output; what decodes re-encodes to the same groups.
#![no_main]

use ember_blockdev::backend::scsi::{self, alua, pr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // ALUA.
    let _ = alua::tpgs(data);
    let ids = alua::parse_port_ids(data);
    if let Some(groups) = alua::parse_rtpg(data) {
        assert!(groups.len() <= 1024);
        let mut want = 0usize;
        for g in &groups {
            assert!(g.ports.len() <= 255);
            want += 8 + 4 * g.ports.len();
        }
        assert!(want <= data.len());
        let _ = alua::state_of(&groups, ids);
        // Known states survive an encode/decode round trip.
        let known: Vec<(u16, u8, bool, &[u16])> = groups
            .iter()
            .filter_map(|g| Some((g.id, g.state?.bits(), g.preferred, g.ports.as_slice())))
            .collect();
        let again = alua::parse_rtpg(&alua::encode_rtpg(&known)).expect("own encoding");
        assert_eq!(again.len(), known.len());
        for (a, k) in again.iter().zip(&known) {
            assert_eq!((a.id, a.preferred, a.ports.as_slice()), (k.0, k.2, k.3));
            assert_eq!(a.state.map(alua::AluaState::bits), Some(k.1));
        }
    }
    // Persistent reservations.
    if let Some(k) = pr::parse_read_keys(data) {
        assert!(k.keys.len() * 8 <= data.len());
    }
    if let Some(Some(r)) = pr::parse_read_reservation(data) {
        let _ = r.ty.map(pr::PrType::code);
    }
    // The pages and sense data read at login and on errors.
    let _ = scsi::Sense::parse(data);
    let _ = scsi::parse_designators(data);
    let _ = scsi::parse_report_luns(data);
    let _ = scsi::parse_serial(data);
    let _ = scsi::parse_supported_vpd(data);
    let _ = scsi::StdInquiry::parse(data);
    let _ = scsi::Capacity::parse(data);
    let _ = scsi::BlockLimits::parse(data);
    let _ = scsi::Provisioning::parse(data);
});
