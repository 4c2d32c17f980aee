//! Integration tests: the service on a real gRPC port, Bitbucket faked over
//! real HTTP on loopback. One binary, one module per capability.

mod harness;

mod budget;
mod cli;
mod fake_process;
mod foundation;
mod hostile;
mod login;
mod operate;
mod refresh;
mod secrets;
mod security;
mod shared_cache;
