//! Process tests: the real `dns-server` binary on port 0 with a temporary data dir.

mod process {
    mod cli;
    mod dig;
    mod durability;
    pub mod harness;
    mod limits;
    mod secondaries;
    mod storage;
    pub mod xfr;
}
