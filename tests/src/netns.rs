//! Two sites in network namespaces joined by a veth link that the test cuts and heals.
//! Addresses live inside the namespaces only (10.77.N.1 in site A, 10.77.N.2 in site B).

use std::process::Command;

pub struct Sites {
    pub a: String,
    pub b: String,
    pub addr_a: String,
    pub addr_b: String,
    veth_a: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (Debian: iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (network namespace tests need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Sites {
    /// Creates namespaces `mb<tag>a` and `mb<tag>b` with a veth link between them. `tag`
    /// must be unique among tests running at once (it also picks the subnet).
    pub fn create(tag: u8) -> Sites {
        let id = format!("{}{}", std::process::id() % 10000, tag);
        let (a, b) = (format!("mb{id}a"), format!("mb{id}b"));
        let (va, vb) = (format!("mb{id}va"), format!("mb{id}vb"));
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["-n", &a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b]);
        let (addr_a, addr_b) = (format!("10.77.{tag}.1"), format!("10.77.{tag}.2"));
        ip(&["-n", &a, "addr", "add", &format!("{addr_a}/30"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{addr_b}/30"), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        Sites { a, b, addr_a, addr_b, veth_a: va }
    }

    /// Moves the calling thread (and the threads it starts from now on) into site A.
    pub fn enter_a(&self) {
        let path = format!("/var/run/netns/{}", self.a);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace fd we hold open; it changes only this thread's
        // network namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns into {}: {}", self.a, std::io::Error::last_os_error());
    }

    /// Cuts the link between the sites (the veth goes down on both ends).
    pub fn cut(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.a, "link", "set", &self.veth_a, "up"]);
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}
