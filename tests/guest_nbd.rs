//! nbd-client against Ember, with a QEMU guest playing the host (the test machines'
//! kernels have no nbd module): the guest loads virtio_net and nbd.ko, reaches Ember's
//! NBD TCP listener through QEMU user networking (10.0.2.2 is the host's loopback),
//! writes and reads `/dev/nbd0`, discards, and disconnects cleanly.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::*;
use std::time::Duration;

fn guest_script(port: u16) -> String {
    format!(
        r#"
set -e
for m in failover net_failover virtio_net nbd; do insmod /lib/modules/$m.ko; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
nbd-client -N vol-n 10.0.2.2 {port} /dev/nbd0
echo "NBD-SIZE $(cat /sys/block/nbd0/size)"
yes "nbd-guest" | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/nbd0 bs=64k seek=16 oflag=direct conv=fsync,notrunc 2>/dev/null
dd if=/dev/nbd0 of=/tmp/r bs=64k skip=16 count=16 iflag=direct 2>/dev/null
[ "$(md5sum < /tmp/r)" = "$(md5sum < /tmp/p)" ] || {{ echo "NBD-MISMATCH"; exit 4; }}
blkdiscard -o 3145728 -l 1048576 /dev/nbd0
nbd-client -d /dev/nbd0
echo GUEST-NBD-OK
"#
    )
}

#[test]
fn guest_nbd_client_over_tcp() {
    require_tool("qemu-system-x86_64");
    let g = guest::Guest::get();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    sparse_file(&file, 64 << 20);
    // Something to discard.
    std::fs::write(&file, vec![0x5au8; 4 << 20]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::spawn(
        dir.path(),
        &[
            "export",
            "--file",
            file.to_str().unwrap(),
            "--nbd",
            &listen,
            "--name",
            "vol-n",
        ],
    );
    wait_for_tcp(&listen, Duration::from_secs(30));
    let initrd = g.initrd(dir.path(), &guest_script(port));
    let mut args = guest::base_args(&g, &initrd, 512);
    args.extend(
        [
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut q = guest::Qemu::spawn(dir.path(), &args);
    let (rc, console) = q.wait_exit(Duration::from_secs(600));
    assert_eq!(
        rc,
        0,
        "guest failed; console:\n{console}\nemberd log:\n{}",
        daemon.log_text()
    );
    assert!(
        console.contains(&format!("NBD-SIZE {}", (64u64 << 20) / 512)),
        "{console}"
    );
    let data = std::fs::read(&file).unwrap();
    let want: Vec<u8> = "nbd-guest\n".bytes().cycle().take(1 << 20).collect();
    assert!(
        data[1 << 20..2 << 20] == want[..],
        "guest's write on the host"
    );
    assert!(
        data[3 << 20..4 << 20].iter().all(|&b| b == 0),
        "discarded range"
    );
    assert!(
        data[2 << 20..3 << 20].iter().all(|&b| b == 0x5a),
        "untouched range"
    );
}
