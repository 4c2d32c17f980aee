//! Integration tests: the service on a real gRPC port, Bitbucket faked over
//! real HTTP on loopback. One binary, one module per capability.

mod harness;

mod cli;
mod foundation;
mod hostile;
mod login;
mod operate;
mod refresh;
mod secrets;
mod security;
