//! Tests of the VM harness itself (tests/vm/run.sh, init.sh, tests/src/vm.rs): a VM that dies
//! before the test script starts is booted again, and says so; a script that fails is never
//! run twice. Each boot costs about 10 s of two cores under TCG.
//!
//! Run: `cargo test -p metroblk-tests --test vm_harness -- --nocapture`

use std::time::Duration;

use metroblk_tests::vm::{self, VmOptions};

const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn a_boot_that_dies_once_is_retried_and_the_script_runs_once() {
    let mut opts = VmOptions::new(TIMEOUT);
    opts.fail_boots = 1;
    let run = vm::run_script_with("echo script-ran\n", &opts).expect("the second boot runs the script");
    assert_eq!(run.status, 0, "{}", run.output);
    assert!(
        run.output.contains("vm: boot attempt 1 of 3 died before the test script started (")
            && run.output.contains("retrying"),
        "the retry is announced: {}",
        run.output
    );
    assert!(run.output.contains("Kernel panic"), "the reason names the panic: {}", run.output);
    assert_eq!(run.output.matches("script-ran").count(), 1, "{}", run.output);
    // (A second retry is possible: a real boot can die under TCG too, which is the point.)
}

#[test]
fn a_failing_script_is_not_retried() {
    let run = vm::run_script_with("echo script-ran\nexit 3\n", &VmOptions::new(TIMEOUT)).expect("the VM ran");
    assert_eq!(run.status, 3);
    assert_eq!(run.output.matches("script-ran").count(), 1, "{}", run.output);
    // A boot that died on its own may have been retried, but never once the script ran.
    let ran_at = run.output.find("script-ran").unwrap();
    assert!(!run.output[ran_at..].contains("retrying"), "retried after the script started: {}", run.output);
}

#[test]
fn three_dead_boots_are_a_harness_error_that_says_why() {
    let mut opts = VmOptions::new(TIMEOUT);
    opts.fail_boots = 3;
    let err = vm::run_script_with("echo script-ran\n", &opts).expect_err("no boot reached the script");
    let text = format!("{err:#}");
    assert!(text.contains("died before the test script started, 3 time(s) in a row"), "{text}");
    assert!(!text.contains("script-ran"), "{text}");
}
