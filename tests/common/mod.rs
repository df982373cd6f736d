//! Shared helpers for integration tests.
#![allow(dead_code)]

pub mod data;
pub mod golden;
pub mod mpi;
pub mod selftest;
