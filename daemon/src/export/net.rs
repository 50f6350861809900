//! The service address: added and removed with iproute2's `ip` (in the network namespace the
//! node runs in), announced by gratuitous ARP as Pacemaker's IPaddr2 does (`send_arp`), so
//! hosts and switches move to the new primary's MAC at once instead of after their ARP
//! cache times out. IPv6 relies on the kernel's own unsolicited neighbour advertisement
//! (`ndisc_notify`) or the hosts' neighbour discovery.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use super::config::ExportConfig;

/// Gratuitous ARPs sent after the address is added, and the pause between them.
pub const ANNOUNCE_COUNT: u32 = 3;
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(200);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Adds the service address (already there counts as done) and announces it.
pub fn add_address(e: &ExportConfig) -> Result<(), String> {
    let addr = e.address_with_prefix();
    match ip(&["addr", "add", &addr, "dev", &e.interface]) {
        Ok(()) => {}
        Err(m) if m.contains("File exists") => {}
        Err(m) => return Err(m),
    }
    if let IpAddr::V4(v4) = e.address {
        let iface = e.interface.clone();
        // The first at once; the rest from a thread of their own, so bring-up goes on.
        if let Err(err) = gratuitous_arp(&iface, v4) {
            tracing::warn!(interface = %iface, address = %v4, "cannot send a gratuitous ARP: {err}");
        }
        let spawned = std::thread::Builder::new().name("garp".into()).spawn(move || {
            for _ in 1..ANNOUNCE_COUNT {
                std::thread::sleep(ANNOUNCE_INTERVAL);
                let _ = gratuitous_arp(&iface, v4);
            }
        });
        if let Err(err) = spawned {
            tracing::warn!("cannot start the thread that repeats the gratuitous ARP: {err}");
        }
    }
    Ok(())
}

/// Removes the service address (not there counts as done).
pub fn remove_address(e: &ExportConfig) -> Result<(), String> {
    match ip(&["addr", "del", &e.address_with_prefix(), "dev", &e.interface]) {
        Ok(()) => Ok(()),
        Err(m) if m.contains("Cannot assign requested address") || m.contains("Cannot find device") => Ok(()),
        Err(m) => Err(m),
    }
}

/// Is the address on the interface? (`ip -o addr show dev IF`.)
pub fn has_address(e: &ExportConfig) -> bool {
    Command::new("ip")
        .args(["-o", "addr", "show", "dev", &e.interface])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            let want = format!(" {} ", e.address_with_prefix());
            text.lines().any(|l| l.contains(&want))
        })
        .unwrap_or(false)
}

/// Broadcasts one gratuitous ARP request (sender and target address both `ip`) on `iface`:
/// every neighbour that knows `ip` moves it to this interface's MAC.
pub fn gratuitous_arp(iface: &str, ip: Ipv4Addr) -> std::io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let name = std::ffi::CString::new(iface).map_err(|_| std::io::Error::other("interface name holds a NUL"))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(ETH_P_ARP.to_be())) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let mac = hardware_address(fd.as_raw_fd(), &name)?;
    // ARP over Ethernet (RFC 826): htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request).
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ip.octets());
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the buffer and the address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            arp.as_ptr().cast(),
            arp.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn hardware_address(fd: i32, name: &std::ffi::CStr) -> std::io::Result<[u8; 6]> {
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.to_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other("interface name too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR set the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}
