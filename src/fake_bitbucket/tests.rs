//! Tests of the fake, over real HTTP on loopback.
