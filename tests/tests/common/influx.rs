//! The harness's InfluxDB ([`linkpulse_testbed::influx`]) for tests: the same calls, panicking
//! with the error instead of returning it.
#![allow(dead_code)]

use std::{collections::BTreeMap, path::PathBuf};

#[allow(unused_imports)] // not every test compares points
pub use linkpulse_testbed::influx::{diff_point, expected_point};
use serde_json::Value;

pub struct Influx(pub linkpulse_testbed::influx::Influx);

impl std::ops::Deref for Influx {
    type Target = linkpulse_testbed::influx::Influx;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Influx {
    pub fn start(ns: &str, addr: std::net::Ipv4Addr, dir: PathBuf, db: &str) -> Influx {
        Influx(
            linkpulse_testbed::influx::Influx::start(ns, addr, dir, db)
                .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    pub fn spawn(&mut self) {
        self.0.spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }

    pub fn exec(&self, q: &str) -> Value {
        self.0.exec(q).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn query(&self, db: &str, q: &str) -> Value {
        self.0.query(db, q).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn points(&self, db: &str) -> BTreeMap<(String, String, u64), BTreeMap<String, Value>> {
        self.0.points(db).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn count(&self, db: &str) -> u64 {
        self.0.count(db).unwrap_or_else(|e| panic!("{e}"))
    }
}
