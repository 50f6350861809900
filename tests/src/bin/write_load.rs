//! A primary under load, as a process a test can kill with SIGKILL: opens the volume of
//! `--config` as primary (the engine without ublk), waits for the link, prints "writing", and
//! writes random 4 KiB blocks at depth 16 until it is killed.

use std::time::Duration;

use metroblk_tests::writer::TestPrimary;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let config = args.get(1).expect("usage: write_load CONFIG");
    let cfg = metroblk::config::NodeConfig::load(std::path::Path::new(config)).expect("config");
    let v = cfg.volumes[0].clone();
    let mut p = TestPrimary::open(&v, &cfg.name, 16, std::process::id() as u64);
    p.wait_link(Duration::from_secs(30));
    println!("writing");
    loop {
        p.write_random(64, 0, v.size, Duration::from_secs(60));
    }
}
